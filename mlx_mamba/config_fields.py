"""Typed fields of a raw config dict (a checkpoint's config.json or params.json), read so that
every error names the file's field; and the fields that several families spell alike."""

import math

from .quant_modes import QuantizationError, quantization_params


class ConfigError(ValueError):
    """A configuration this package cannot use; the message names the field."""


REQUIRED = object()
# No real checkpoint has more layers; a reader that lays out one entry per layer checks the count
# first, so that a hostile count fails here instead of filling memory.
MAX_LAYERS = 10_000


def is_integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


def as_float(value, name="time_step_limit"):
    # transformers writes infinity as {"__float__": "Infinity"}; plain JSON writers as Infinity.
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    if isinstance(value, bool):
        raise ConfigError(f"field {name!r} holds {value!r}: expected a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"field {name!r} holds {value!r}: expected a number") from None


def get(config, name, default=REQUIRED, kind="positive", where=""):
    """config[name] (or `default` when absent), checked to be of `kind`: "positive" or "count"
    (an int > 0 or >= 0), "layers" (1 to MAX_LAYERS), "number" (finite or infinite float),
    "positive_number", "bool", "text", "ids" (token ids: an int, a list of ints or null). The
    error names the field."""
    label = where + name
    if name not in config:
        if default is REQUIRED:
            raise ConfigError(f"missing field {label!r}")
        return default
    value = config[name]
    if value is None and kind != "ids" and default is not REQUIRED:
        return default  # configs spell some unset fields as null
    if kind in ("positive", "count"):
        if not is_integer(value) or value < (1 if kind == "positive" else 0):
            raise ConfigError(f"field {label!r} is {value!r}: expected "
                              f"{'a positive' if kind == 'positive' else 'a non-negative'} integer")
    elif kind == "layers":
        if not is_integer(value) or not 1 <= value <= MAX_LAYERS:
            raise ConfigError(f"field {label!r} is {value!r}: expected 1 to {MAX_LAYERS} layers")
    elif kind in ("number", "positive_number"):
        value = as_float(value, label)
        if value != value or (kind == "positive_number" and not value > 0):
            raise ConfigError(f"field {label!r} is {config[name]!r}: expected a "
                              f"{'positive ' if kind == 'positive_number' else ''}number")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"field {label!r} is {value!r}: expected true or false")
    elif kind == "text":
        if not isinstance(value, str):
            raise ConfigError(f"field {label!r} is {value!r}: expected a string")
    elif kind == "ids":
        items = value if isinstance(value, list) else [value]
        if not all(v is None or (is_integer(v) and v >= 0) for v in items):
            raise ConfigError(f"field {label!r} is {value!r}: expected token ids")
    return value


def dt_limit(config, name="time_step_limit", where=""):
    """A (low, high) pair of Δ bounds, infinity spelled either way."""
    value = config.get(name, (0.0, math.inf))
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"field {where + name!r} is {value!r}: expected [low, high]")
    return tuple(as_float(v, where + name) for v in value)


def quantization(config):
    """The checked `quantization` block of a converted model's config, or None."""
    block = config.get("quantization")
    if block is None:
        return None
    if not isinstance(block, dict) or not {"group_size", "bits"} <= set(block):
        raise ConfigError(f"field 'quantization' is {block!r}: expected {{\"group_size\", "
                          "\"bits\", \"mode\"}")
    checked = _quantization_entry(block, "quantization")
    for path, entry in block.items():  # mixed precision: mlx-lm's per-module entries
        if path not in ("group_size", "bits", "mode"):
            if not isinstance(entry, dict) or not {"group_size", "bits"} <= set(entry):
                raise ConfigError(f"field 'quantization.{path}' is {entry!r}: expected "
                                  "{\"group_size\", \"bits\", \"mode\"}")
            checked[path] = _quantization_entry(entry, f"quantization.{path}")
    return checked


def _quantization_entry(block, where):
    try:
        return quantization_params(block["bits"], block["group_size"], block.get("mode", "affine"))
    except QuantizationError as e:
        raise ConfigError(f"field {where!r}: {e}") from None


def common_fields(config):
    """Token ids and quantization, shared by every transformers flavour."""
    tokens = {k: get(config, k, None, "ids") for k in ("bos_token_id", "eos_token_id",
                                                        "pad_token_id") if k in config}
    return dict(quantization=quantization(config), **tokens)


def attention_fields(config):
    """The attention sizes every hybrid family spells the same way."""
    heads = get(config, "num_attention_heads")
    hidden = get(config, "hidden_size")
    head_dim = get(config, "head_dim", None) or hidden // heads
    return dict(attn_heads=heads, attn_kv_heads=get(config, "num_key_value_heads", heads),
                attn_head_dim=get({"head_dim": head_dim}, "head_dim"),
                attn_bias=get(config, "attention_bias", False, "bool"))


def rope_theta(config):
    """RoPE's base from `rope_parameters` (transformers 5) or `rope_theta` (older configs);
    only the default (unscaled) RoPE is supported."""
    params = config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"field 'rope_parameters' is {params!r}: expected an object")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"field 'rope_parameters.rope_type' is {kind!r}: only 'default' RoPE "
                          "is supported")
    if "rope_theta" in params:
        return get(params, "rope_theta", kind="positive_number", where="rope_parameters.")
    return get(config, "rope_theta", 10000.0, "positive_number")


def layer_kinds(names, aliases, field):
    """Map a family's per-layer names to the stack's kinds; unknown names are an error."""
    if not isinstance(names, (list, tuple)) or not names:
        raise ConfigError(f"field {field!r} is {names!r}: expected a list of layer types")
    kinds = []
    for i, name in enumerate(names):
        if name not in aliases:
            raise ConfigError(f"field {field!r}: layer {i} is {name!r}, expected one of "
                              f"{', '.join(sorted(aliases))}")
        kinds.append(aliases[name])
    return tuple(kinds)
