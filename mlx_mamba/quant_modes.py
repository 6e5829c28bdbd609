"""The quantization settings MLX can apply: each mode with its group sizes and bits, checked
where convert's flags and a converted model's config name them."""


# mode -> (group sizes, bits), the defaults first, as mlx-lm 0.32's convert; the float modes
# allow only their own pair.
MODES = {"affine": ((64, 32, 128), (4, 2, 3, 5, 6, 8)), "mxfp4": ((32,), (4,)),
         "nvfp4": ((16,), (4,)), "mxfp8": ((32,), (8,))}


class QuantizationError(ValueError):
    """Quantization settings that MLX cannot apply; the message names the setting."""


def accepted(values):
    return "|".join(map(str, sorted(values)))


def quantization_params(bits=None, group_size=None, mode="affine"):
    """The {"group_size", "bits", "mode"} entry of config.json, defaults filled in and checked."""
    if mode not in MODES:
        raise QuantizationError(f"--q-mode {mode!r}: expected one of {', '.join(MODES)}")
    group_sizes, bit_widths = MODES[mode]
    group_size = group_sizes[0] if group_size is None else group_size
    bits = bit_widths[0] if bits is None else bits
    if group_size not in group_sizes:
        raise QuantizationError(f"--q-group-size {group_size}: --q-mode {mode} takes "
                                f"{accepted(group_sizes)}")
    if bits not in bit_widths:
        raise QuantizationError(f"--q-bits {bits}: --q-mode {mode} takes {accepted(bit_widths)}")
    return {"group_size": group_size, "bits": bits, "mode": mode}
