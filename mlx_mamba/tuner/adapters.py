"""Which parameters train, and the adapter files: `adapters.safetensors` + `adapter_config.json`.

An adapter config is a dict: fine_tune_type ("lora", "dora" or "full"), num_layers (the last N
residual blocks; -1 for all; by default 16, or all when fewer), lora_parameters {rank, scale,
dropout, keys} and train_ssm_params. The same dict, saved next to the weights, rebuilds the
adapted model for resuming, testing and fusing.
"""

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..config_fields import is_integer
from ..files import replace_atomically, save_safetensors
from ..models.mamba1 import Mamba1
from ..models.mamba2 import Mamba2
from ..models.mamba3 import Mamba3
from ..models.moe import QuantizedExpertLinear
from .lora import DoRALinear, LoRALinear

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"

# The projections that LoRA adapts when no keys are given, by layer kind. An MoE's are those of its
# shared expert: the routed experts (stacked weights, not linear layers) and the router stay
# frozen under LoRA and DoRA; full fine-tuning trains them.
DEFAULT_KEYS = {"mamba1": ("in_proj", "x_proj", "dt_proj", "out_proj"),
                "mamba2": ("in_proj", "out_proj"),
                "mamba3": ("in_proj", "out_proj"),
                "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
                "mlp": ("gate_proj", "up_proj", "down_proj"),
                "moe": ("shared_experts.gate_proj", "shared_experts.up_proj",
                        "shared_experts.down_proj")}
DEFAULT_KEYS["parallel"] = DEFAULT_KEYS["mamba2"] + DEFAULT_KEYS["attention"]  # side by side
# Zamba2's hybrid layer: its Mamba2. The shared transformer block it invokes is adapted once,
# as attention and MLP, for every layer that invokes it; the layer's own per-invocation
# adapters and linear map train only in full fine-tuning.
DEFAULT_KEYS["hybrid"] = DEFAULT_KEYS["mamba2"]
SHARED_BLOCK_KEYS = DEFAULT_KEYS["attention"] + DEFAULT_KEYS["mlp"]
# The SSM's own parameters, trained by full fine-tuning and optionally next to LoRA.
SSM_PARAMETERS = ["A_log", "D", "dt_bias", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o"]
# Parameters that no gradient trains: the MoE routing bias is a load-balancing statistic (a
# buffer in transformers), and its gradient is zero since it only moves the discrete top-k choice.
NOT_TRAINED = ["score_bias"]


class AdapterError(ValueError):
    """Adapter files or settings that do not fit; the message names the file or setting."""


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_adapter_config(config, n_layer=None):
    """Raise AdapterError naming the first field of an adapter config of the wrong type or range,
    or (given the model's layer count `n_layer`) asking for more layers than the model has."""
    if not isinstance(config, dict):
        raise AdapterError(f"the adapter config is a {type(config).__name__}: expected an object")
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora", "full"):
        raise AdapterError(f"fine_tune_type {kind!r}: expected lora, dora or full")
    num_layers = config.get("num_layers", -1)  # absent: the default, which fits every model
    if not (is_integer(num_layers) and (num_layers == -1 or num_layers >= 1)):
        raise AdapterError(f"num_layers {num_layers!r}: expected a positive integer, or -1 for all")
    if n_layer is not None and num_layers > n_layer:
        raise AdapterError(f"num_layers {num_layers}: the model has {n_layer} layers (use -1 for "
                           "all)")
    if not isinstance(config.get("train_ssm_params", False), bool):
        raise AdapterError(f"train_ssm_params {config['train_ssm_params']!r}: expected true or "
                           "false")
    lora = config.get("lora_parameters", {})
    if not isinstance(lora, dict):
        raise AdapterError(f"lora_parameters {lora!r}: expected an object")
    rank, scale = lora.get("rank", 8), lora.get("scale", 20.0)
    dropout, keys = lora.get("dropout", 0.0), lora.get("keys")
    if not (is_integer(rank) and rank >= 1):
        raise AdapterError(f"lora_parameters.rank {rank!r}: expected a positive integer")
    if not _is_number(scale):
        raise AdapterError(f"lora_parameters.scale {scale!r}: expected a finite number")
    if not (_is_number(dropout) and 0.0 <= dropout < 1.0):
        raise AdapterError(f"lora_parameters.dropout {dropout!r}: expected a probability in "
                           "[0, 1)")
    if keys is not None and not (isinstance(keys, list)
                                 and all(isinstance(k, str) and k for k in keys)):
        raise AdapterError(f"lora_parameters.keys {keys!r}: expected a list of projection names")


def adapted_modules(model, num_layers):
    """[(module, its default LoRA keys)]: the last `num_layers` residual blocks (-1: all), and
    the shared blocks that they invoke (Zamba2)."""
    config, n_layer = model.config, len(model.backbone.layers)
    num_layers = n_layer if num_layers == -1 else num_layers  # checked by check_adapter_config
    indices = range(n_layer - num_layers, n_layer)
    modules = [(model.backbone.layers[i], default_keys(config, i)) for i in indices]
    shared = sorted({config.shared_block(i)[0] for i in indices
                     if config.layer_type(i) == "hybrid"})
    return modules + [(model.backbone.blocks[b], SHARED_BLOCK_KEYS) for b in shared]


def linear_layers(block):
    """{path in the block: layer} of its linear layers, quantized or not."""
    return {path: module for path, module in block.named_modules()
            if isinstance(module, (nn.Linear, nn.QuantizedLinear))}


def matches(path, key):
    # A key names a projection ("up_proj") or the end of its path ("shared_experts.up_proj").
    return path == key or path.endswith("." + key)


def default_keys(config, index):
    kinds = (config.layer_type(index), config.ffn_type(index))
    return tuple(key for kind in kinds if kind for key in DEFAULT_KEYS[kind])


def lora_targets(modules, keys):
    """[(module, [paths])]: the linear layers to adapt in each of `modules`, those that `keys`
    name, or each module's defaults when `keys` is None. A given key that names no linear layer
    of any module is an error."""
    targets, used = [], set()
    for module, defaults in modules:
        # In the keys' order: the adapters draw their random initialisation in that order.
        paths = {}
        for key in keys or defaults:
            found = [path for path in linear_layers(module) if matches(path, key)]
            paths.update(dict.fromkeys(found))
            if found:
                used.add(key)
        targets.append((module, list(paths)))
    unknown = [k for k in keys or () if k not in used]
    if unknown:
        known = sorted({path.rsplit(".", 1)[-1] for module, _ in modules
                        for path in linear_layers(module)})
        raise AdapterError(f"LoRA key {unknown[0]!r}: no adapted layer has such a linear "
                           f"projection (they have {', '.join(known)})")
    return targets


def apply_adapters(model, config):
    """Freeze `model` and make the parameters that `config` trains trainable, in place."""
    check_adapter_config(config, model.config.n_layer)
    kind = config.get("fine_tune_type", "lora")
    modules = adapted_modules(model, config.get("num_layers", min(16, model.config.n_layer)))
    if kind == "full":
        if any(isinstance(m, (nn.QuantizedLinear, QuantizedExpertLinear))
               for module, _ in modules for _, m in module.named_modules()):
            raise AdapterError("full fine-tuning needs a float model: this one is quantized (use "
                               "lora or dora, or fine-tune the unquantized model)")
        model.freeze()
        for module, _ in modules:
            module.unfreeze().freeze(keys=NOT_TRAINED, strict=False)
        return model
    lora = config.get("lora_parameters", {})
    rank, scale, dropout = lora.get("rank", 8), lora.get("scale", 20.0), lora.get("dropout", 0.0)
    targets = lora_targets(modules, lora.get("keys"))
    model.freeze()
    cls = DoRALinear if kind == "dora" else LoRALinear
    for module, paths in targets:
        layers = linear_layers(module)
        module.update_modules(tree_unflatten(
            [(path, cls(layers[path], rank, scale, dropout)) for path in paths]))
        if config.get("train_ssm_params", False):
            for _, mixer in module.named_modules():
                if isinstance(mixer, (Mamba1, Mamba2, Mamba3)):
                    train_ssm_parameters(mixer)
    return model


def train_ssm_parameters(mixer):
    mixer.unfreeze(recurse=False, keys=SSM_PARAMETERS)
    if "conv1d" in mixer:  # Mamba-3 has none
        mixer.conv1d.unfreeze()
    if "dt_proj" in mixer:  # Mamba1 keeps its dt bias in dt_proj (inside a LoRA layer too)
        mixer.dt_proj.unfreeze(keys=["bias"])


def trainable_weights(model):
    return dict(tree_flatten(model.trainable_parameters()))


def load_adapter_weights(model, file):
    """Load a saved adapter file into an adapted model; every tensor must fit a trainable one."""
    file = Path(file)
    if not file.is_file():
        raise AdapterError(f"{file}: adapter file not found")
    try:
        weights = mx.load(str(file), format="safetensors")
    except Exception as e:  # MLX raises bare RuntimeError/ValueError on a damaged file
        raise AdapterError(f"{file}: not a readable safetensors file ({e})") from None
    expected = trainable_weights(model)
    for name, value in weights.items():
        if name not in expected:
            raise AdapterError(f"{file}: tensor {name!r} is not a trainable parameter of this "
                               "model and adapter config")
        if value.shape != expected[name].shape:
            raise AdapterError(f"{file}: tensor {name!r} has shape {tuple(value.shape)}, the "
                               f"model expects {tuple(expected[name].shape)}")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise AdapterError(f"{file}: missing tensor {missing[0]!r}")
    model.load_weights(list(weights.items()), strict=False)
    return model


def read_adapter_config(adapter_path):
    file = Path(adapter_path) / CONFIG_FILE
    if not file.is_file():
        raise AdapterError(f"{file}: adapter config not found")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
        check_adapter_config(config)
    except (AdapterError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{file}: {e}" if isinstance(e, AdapterError) else
                           f"{file}: not valid JSON ({e})") from None
    return config


def load_adapters(model, adapter_path):
    """Adapt `model` as saved in `adapter_path` and load the adapter weights, in place."""
    try:
        apply_adapters(model, read_adapter_config(adapter_path))
    except AdapterError as e:
        file = Path(adapter_path) / CONFIG_FILE
        raise AdapterError(e if str(e).startswith(str(file)) else f"{file}: {e}") from None
    return load_adapter_weights(model, Path(adapter_path) / ADAPTER_FILE)


def save_adapters(model, adapter_path, config, iteration=None):
    """Write the trainable weights and the config into `adapter_path`; with `iteration`, also a
    numbered copy (0000100_adapters.safetensors) that later saves do not overwrite."""
    adapter_path = Path(adapter_path)
    adapter_path.mkdir(parents=True, exist_ok=True)
    weights = trainable_weights(model)
    replace_atomically(adapter_path / CONFIG_FILE,
                       lambda f: f.write_text(json.dumps(config, indent=2, default=str)))
    files = [adapter_path / ADAPTER_FILE]
    if iteration is not None:
        files.append(adapter_path / f"{iteration:07d}_{ADAPTER_FILE}")
    for file in files:
        replace_atomically(file, lambda f: save_safetensors(f, weights))
    return files
