"""What a config's model holds, read from the config alone: its tensors under the checkpoint's
names, its parameter counts, the memory of its weights per dtype and quantization, and of its
cache per token of context.

Nothing is allocated: the model is built with MLX's lazy arrays (its initialisers are graph
nodes until evaluated) and only shapes and dtypes are read, never values, so a 398B-parameter
config is described in milliseconds."""

import dataclasses
import re

import mlx.core as mx
from mlx.utils import tree_flatten

from .cache import KVCache, LayerCaches
from .families import to_checkpoint_names
from .config import ModelConfig
from .loader import build_model, cast

# A routed expert's tensors in the stack's names (the shared experts are `shared_experts.`).
ROUTED_EXPERT = re.compile(r"\.experts\.")


@dataclasses.dataclass(frozen=True)
class Counts:
    total: int
    active: int  # per token: the routed experts count top_k / n_experts of their parameters


def lazy_model(config: ModelConfig, dtype=None):
    """The model of `config`, never evaluated; floating weights in `dtype` (those the loader keeps
    in float32 stay so), quantized as `config.quantization` says."""
    quantization, config = config.quantization, dataclasses.replace(config, quantization=None)
    model = build_model(config)
    if dtype is not None:
        model.load_weights(list(cast(dict(tree_flatten(model.parameters())), dtype).items()))
    if quantization:
        from .quantize import quantize_model

        quantize_model(model, quantization)
    return model


def tensor_shapes(config: ModelConfig):
    """{name: shape} of the tensors convert.py writes for `config`, under the checkpoint's names."""
    weights = dict(tree_flatten(lazy_model(config).parameters()))
    return {name: tuple(value.shape) for name, value in to_checkpoint_names(weights, config).items()}


def parameter_count(config: ModelConfig) -> Counts:
    """Total and active (per token) parameters of the model `config` describes."""
    total = routed = 0
    # A converted checkpoint's config says how it is quantized; its parameters are the same.
    model = lazy_model(dataclasses.replace(config, quantization=None))
    for name, value in tree_flatten(model.parameters()):
        total += value.size
        routed += value.size if ROUTED_EXPERT.search(name) else 0
    active = total - routed + (routed * config.top_k // config.n_experts if routed else 0)
    return Counts(total, active)


def weight_bytes(config: ModelConfig, dtype=mx.bfloat16, quantization=None):
    """Bytes of the weights as loaded: floating tensors in `dtype` (norms and the SSM's A_log,
    D, dt_bias in float32, as the loader keeps them); with `quantization` ({"bits",
    "group_size", "mode"}), the quantized layers' packed weights, scales and biases."""
    config = dataclasses.replace(config, quantization=quantization)
    return sum(v.nbytes for _, v in tree_flatten(lazy_model(config, dtype).parameters()))


def cache_bytes(config: ModelConfig, dtype=mx.bfloat16):
    """(bytes per token of context, constant bytes) of one sequence's cache: attention's keys and
    values grow with the context, the Mamba layers' conv window and SSM state do not."""
    per_token = constant = 0
    for cache in _flat(lazy_model(config, dtype).make_cache(1)):
        if isinstance(cache, KVCache):
            _, heads, _, head_dim = cache.shape
            per_token += 2 * heads * head_dim * dtype.size
        else:
            constant += sum(array.nbytes for array in cache.state)
    return per_token, constant


def _flat(caches):
    for cache in caches:
        if isinstance(cache, LayerCaches):
            yield from _flat(cache.parts.values())
        elif cache is not None:
            yield cache
