"""Every checkpoint flavour this package reads, one module each, and the registry that picks one.

A family module reads its config and maps its tensor names to this package's one layer stack
(models/model.py): `backbone.embeddings`, `backbone.layers.{i}.norm`, `.mixer` (Mamba,
attention, MLP or MoE), `.ffn_norm` and `.ffn` (the feed-forward after the mixer, if any),
`backbone.norm_f`, `lm_head`; MoE parts `router`, `score_bias`, `experts.{gate,up,down}_proj`
(stacked over experts), `shared_experts`. A family module has:
- `read_config(dict) -> dict`: the ModelConfig fields of its config file;
- `to_model_names(weights, config)` where its checkpoints name tensors otherwise, and for a hybrid
  `to_checkpoint_names(weights, config)`, its inverse, so converted models keep its names;
- for a pure flavour that converted models are written in, `write_config(config) -> dict`
  (a hybrid's converted config is its own config.json, kept as `source_config`);
- `MLX_LM_LAYOUT = True` where its quantized checkpoints are written in mlx-lm's layout, so that
  the per-module quantization entries of its config name mlx-lm's module paths.
"""

import mlx.core as mx

from ..config_fields import ConfigError
from . import (bamba, falcon_h1, granitemoehybrid, jamba, mamba, mamba2, mistral, nemotron_h,
               state_spaces, zamba2)

# transformers `model_type` -> its family module.
TRANSFORMERS = {"mamba": mamba, "mamba2": mamba2, "falcon_mamba": mamba, "bamba": bamba,
                "falcon_h1": falcon_h1, "granitemoehybrid": granitemoehybrid, "jamba": jamba,
                "nemotron_h": nemotron_h, "zamba2": zamba2}
# A pure model's config does not say which layout its checkpoint has (a state-spaces original
# and its transformers port read to the same ModelConfig), so each of these renames its own
# names, and touches no other.
PURE_LAYOUTS = (mistral, state_spaces)


def config_format(config):
    """Which flavour a raw config dict is: "transformers", "state-spaces" or "mistral"."""
    if "model_type" in config and "dim" not in config:
        return "transformers"
    if "d_model" in config or "ssm_cfg" in config:
        return "state-spaces"
    if "dim" in config and "n_layers" in config:
        return "mistral"
    raise ConfigError(
        "unrecognised config: expected a transformers config ('model_type'), a state-spaces "
        "config ('d_model', 'ssm_cfg') or a Mistral params.json ('dim', 'n_layers')")


def read_fields(config):
    """The ModelConfig fields of a raw config dict of any flavour."""
    form = config_format(config)
    if form != "transformers":
        return {"state-spaces": state_spaces, "mistral": mistral}[form].read_config(config)
    model_type = config["model_type"]
    if not isinstance(model_type, str) or model_type not in TRANSFORMERS:
        raise ConfigError(f"field 'model_type' is {model_type!r}: expected one of "
                          f"{', '.join(TRANSFORMERS)}")
    return TRANSFORMERS[model_type].read_config(config)


def write_config(config):
    """The config.json of a converted model: a hybrid's own, or the mamba, mamba2 or
    falcon_mamba form, or for Mamba-3 the state-spaces form."""
    if config.family:
        written = {k: v for k, v in config.source_config.items() if k != "quantization"}
    elif config.arch == "mamba3":
        written = state_spaces.write_config(config)
    else:
        written = TRANSFORMERS[config.model_type].write_config(config)
    if config.quantization is not None:
        written["quantization"] = (quantization_paths(config.quantization, to_checkpoint_names,
                                                      config) if names_modules(config)
                                   else config.quantization)
    return written


def names_modules(config):
    """Whether the config's per-module quantization entries name the checkpoint's modules
    (mlx-lm's paths, for a family whose quantized files are in mlx-lm's layout) rather than this
    package's."""
    return bool(config.family) and getattr(TRANSFORMERS[config.family], "MLX_LM_LAYOUT", False)


def quantization_paths(quantization, rename, config):
    """`quantization` with its per-module entries (mlx-lm's mixed precision) under the module
    paths that `rename` (`to_model_names` or `to_checkpoint_names`) gives: a hybrid's checkpoint
    names its modules as its tensors. A packed module's entry goes to both halves, and back."""
    renamed = {}
    for path, entry in quantization.items():
        if not isinstance(entry, dict):  # the defaults
            renamed[path] = entry
            continue
        # A placeholder tensor, never evaluated; two rows so that a packed one splits.
        for name in rename({f"{path}.weight": mx.zeros((2, 2))}, config):
            renamed[name.removesuffix(".weight")] = entry
    return renamed


def to_model_names(weights, config):
    """A checkpoint's tensors under this package's parameter names and shapes: the family's
    names mapped, torch's depthwise conv kernel (C, 1, K) made MLX's (C, K, 1), a tied head
    dropped."""
    if config.family:
        weights = TRANSFORMERS[config.family].to_model_names(weights, config)
    else:
        for layout in PURE_LAYOUTS:
            weights = layout.to_model_names(weights, config)
    renamed = {}
    for name, value in weights.items():
        if name.endswith("conv1d.weight") and value.ndim == 3 and value.shape[1] == 1:
            value = value.swapaxes(1, 2)
        renamed[name] = value
    if config.tie_embeddings:
        renamed.pop("lm_head.weight", None)
    return renamed


def to_checkpoint_names(weights, config):
    """The names a model's tensors have in its family's transformers checkpoints (the inverse of
    `to_model_names` for converted models; pure Mamba models already use them)."""
    if not config.family:
        return weights
    return TRANSFORMERS[config.family].to_checkpoint_names(weights, config)
