"""Mixed-precision recipes: which layers keep more bits, by name (mlx-lm's recipe names).

`mixed_L_H` quantizes every layer to L bits except these, at H bits:
- the embedding and the lm_head (a tied embedding is the head);
- Mamba1's x_proj and dt_proj: they make Δ, B and C (Quamba and MambaQuant find these inputs of
  the recurrence the most sensitive; exp(Δ·A) amplifies their errors), and they are small;
- in the "more bits" layers, the mixer's input and output projections: Mamba's in_proj (whose
  rows include Δ, B and C) and out_proj (whose input, after the gated norm, has the outliers),
  attention's v_proj and o_proj, the MLP's down_proj. The "more bits" layers are mlx-lm's
  choice (after llama.cpp's Q4_K_M): the first and last eighth of the layers and every third
  layer between;
- Zamba2's shared blocks (each runs in many layers).

A packed tensor takes one bit width: MLX quantizes a layer with one width, so Δ, B and C rows
cannot have more bits than the z and x rows of the same in_proj; the recipes give the whole
in_proj more bits in the "more bits" layers instead.

mlx-lm's recipes of the same names give the high bits to v_proj and down_proj in those layers and
to lm_head; they have no Mamba layer names (mlx-lm refuses them on a model without down_proj).
"""

from .quant_modes import QuantizationError, quantization_params
from .quantize import should_quantize

RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}
ALWAYS_HIGH = ("embeddings", "lm_head", "x_proj", "dt_proj")
HIGH_IN_CHOSEN_LAYERS = ("in_proj", "out_proj", "v_proj", "o_proj", "down_proj")


def uses_more_bits(index, n_layer):
    """Whether layer `index` of `n_layer` is one of the "more bits" layers."""
    return (index < n_layer // 8 or index >= 7 * n_layer // 8
            or (index - n_layer // 8) % 3 == 2)


def high_precision(path, n_layer):
    """Whether the recipes give the layer at module path `path` the high bit width."""
    name, parts = path.rsplit(".", 1)[-1], path.split(".")
    if name in ALWAYS_HIGH or parts[:2] == ["backbone", "blocks"]:
        return True
    if parts[:2] == ["backbone", "layers"] and name in HIGH_IN_CHOSEN_LAYERS:
        return uses_more_bits(int(parts[2]), n_layer)
    return False


def recipe_quantization(name, model, group_size=None):
    """The `quantization` entry (mlx-lm's layout: defaults at the low width, a per-module entry
    for each layer at the high width) of recipe `name` for `model`."""
    if name not in RECIPES:
        raise QuantizationError(f"--quant-predicate {name!r}: expected one of "
                                f"{', '.join(RECIPES)}")
    low, high = RECIPES[name]
    quantization = quantization_params(low, group_size)
    n_layer = len(model.backbone.layers)
    for path, module in model.named_modules():
        if should_quantize(path, module, quantization["group_size"]) \
                and high_precision(path, n_layer):
            quantization[path] = quantization_params(high, quantization["group_size"])
    return quantization
