"""Which layers are quantized, decided by one predicate at convert and at load time.

Quantized: the projections (Mamba's in_proj, out_proj, x_proj, dt_proj; attention's q/k/v/o_proj;
the MLPs' and the experts' gate/up/down_proj; MoE latent projections), the embedding and the
untied lm_head, which together hold nearly all the parameters. Never quantized: the depthwise conv
(K=4 taps per channel: nothing to group), the norms, A_log, D and dt_bias (tiny, and the
recurrence exp(Δ·A) amplifies their errors), and the MoE router and its bias (tiny, and a small
error there changes which experts a token goes to, a discrete jump rather than noise). A layer whose input size is not a multiple of the group size
stays in full precision; Mamba1's dt_proj, whose input is dt_rank wide (48 for mamba-130m), is the
usual case.
"""

import mlx.nn as nn

from .models.moe import QuantizedExpertLinear

QUANTIZED_LAYERS = ("in_proj", "out_proj", "x_proj", "dt_proj", "embeddings", "lm_head",
                    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                    "latent_in", "latent_out")

QUANTIZED_TYPES = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedExpertLinear)


def is_quantizable(path, module):
    """Whether the layer at `path` is of a kind this package quantizes (whatever the group)."""
    return path.rsplit(".", 1)[-1] in QUANTIZED_LAYERS and hasattr(module, "to_quantized")


def fits_group(module, group_size):
    return module.weight.shape[-1] % group_size == 0


def should_quantize(path, module, group_size):
    return is_quantizable(path, module) and fits_group(module, group_size)


def layer_settings(quantization, path):
    """The {"group_size", "bits", "mode"} of layer `path`: its own entry (mlx-lm's layout for
    mixed precision: per-module entries beside the defaults) or the defaults."""
    own = quantization.get(path)
    if isinstance(own, dict):
        return {"mode": quantization.get("mode", "affine"), **own}
    return {k: quantization[k] for k in ("group_size", "bits")} | {
        "mode": quantization.get("mode", "affine")}


def quantize_model(model: nn.Module, quantization: dict) -> None:
    """Quantize `model` in place as `quantization` ({"group_size", "bits", "mode"}, with
    per-module entries `{path: {"group_size", "bits", "mode"}}` for mixed precision) says.

    Used on a model holding real weights (convert.py) and on a fresh model before quantized
    weights are loaded into it (`load`): both pick the same layers.
    """
    def predicate(path, module):
        settings = layer_settings(quantization, path)
        return should_quantize(path, module, settings["group_size"]) and settings

    nn.quantize(model, quantization["group_size"], quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def quantized_bits(model: nn.Module):
    """{path: bits} of the model's quantized layers."""
    return {path: module.bits for path, module in model.named_modules()
            if isinstance(module, QUANTIZED_TYPES)}


def unfit_layers(model: nn.Module, group_size):
    """[(path, input size)] of the quantizable layers that stay in full precision."""
    return [(path, module.weight.shape[-1]) for path, module in model.named_modules()
            if is_quantizable(path, module) and not fits_group(module, group_size)]


def bits_per_weight(model: nn.Module):
    """Average stored bits per parameter of the quantized layers, scales and biases included."""
    stored = count = 0
    for _, module in model.named_modules():
        if isinstance(module, QUANTIZED_TYPES):
            stored += sum(v.nbytes for k, v in module.parameters().items()
                          if k in ("weight", "scales", "biases"))
            count += module.weight.size * 32 // module.bits
    return 8 * stored / count if count else None

