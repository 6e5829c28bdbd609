"""`python -m mlx_mamba.info --model M`: what a checkpoint is before its weights are downloaded:
architecture, layer pattern, sizes, parameter counts, weight memory per dtype and quantization,
and cache memory per 1,000 tokens of context. Reads only the config (from the hub, only
config.json / params.json are fetched); nothing is allocated (see `sizes`)."""

import sys
from collections import Counter

import mlx.core as mx
from mlx.utils import tree_flatten

from . import cli, sizes
from .config import ConfigError, load_config, read_config
from .families import config_format
from .loader import resolve
from .quantize import bits_per_weight, quantized_bits

CONFIG_FILES = ["config.json", "params.json"]
# One character per layer: its mixer, then (separately) its feed-forward. Mamba2 beside
# attention (Falcon-H1) is "P"; a Mamba2 layer fed by a shared transformer block (Zamba2) "H".
KIND_CHARS = {"mamba1": "M", "mamba2": "M", "mamba3": "M", "attention": "*", "mlp": "-",
              "moe": "E", "parallel": "P", "hybrid": "H", "": "."}
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
QUANTIZED_BITS = (8, 4, 3)
GROUP_SIZE = 64
CONTEXT = 1000  # tokens


def pattern(config, kind):
    """The layers' mixers (kind "layer") or feed-forwards (kind "ffn") as one string."""
    which = config.layer_type if kind == "layer" else config.ffn_type
    return "".join(KIND_CHARS[which(i)] for i in range(config.n_layer))


def describe(config, raw):
    """The lines `info` prints for a ModelConfig and the raw config dict it came from."""
    c = config
    flavour = config_format(raw)
    architectures = raw.get("architectures")
    name = architectures[0] if isinstance(architectures, list) and architectures \
        and isinstance(architectures[0], str) else ""
    lines = [f"architecture: {c.model_type}" + (f" ({name})" if name else "")
             + ("" if flavour == "transformers" else f", {flavour} config"),
             f"layers: {c.n_layer}, hidden size {c.d_model}, vocabulary {c.vocab_size}"
             + (", tied embeddings" if c.tie_embeddings else ""),
             f"layer pattern: {pattern(c, 'layer')}"]
    if c.ffn_types:
        lines.append(f"feed-forward:  {pattern(c, 'ffn')}")
    lines.append("  (M Mamba, * attention, - MLP, E mixture of experts, P Mamba2 beside "
                 "attention, H Mamba2 after a shared block, . none)")
    kinds = c.kinds
    if {"mamba1"} & kinds:
        lines.append(f"Mamba1: width {c.d_inner}, state {c.d_state}, conv {c.d_conv}, "
                     f"dt rank {c.dt_rank}")
    if {"mamba2", "parallel", "hybrid", "mamba3"} & kinds:
        lines.append(f"{'Mamba-3' if 'mamba3' in kinds else 'Mamba2'}: {c.n_heads} heads of "
                     f"{c.head_dim}, state {c.d_state}, {c.n_groups} groups"
                     + ("" if "mamba3" in kinds else f", conv {c.d_conv}"))
    if {"attention", "parallel", "hybrid"} & kinds:
        lines.append(f"attention: {c.attn_heads} query heads, {c.attn_kv_heads} key/value heads "
                     f"of {c.attn_head_dim}"
                     + (f", RoPE base {c.rope_theta:g}" if c.rope_theta else ", no positions"))
    if "moe" in kinds:
        lines.append(f"experts: {c.top_k} of {c.n_experts} per token, size {c.expert_size}"
                     + (f", shared expert size {c.shared_expert_size}"
                        if c.shared_expert_size else ""))
    counts = sizes.parameter_count(c)
    lines.append(f"parameters: {_count(counts.total)}"
                 + (f", {_count(counts.active)} active per token" if "moe" in kinds else ""))
    weights = [f"{name} {_bytes(sizes.weight_bytes(c, dtype))}" for name, dtype in DTYPES.items()]
    lines.append("weights: " + ", ".join(weights))
    quantized = [f"{bits}-bit {_bytes(sizes.weight_bytes(c, mx.bfloat16, q))}" for bits, q in
                 ((b, {"bits": b, "group_size": GROUP_SIZE, "mode": "affine"})
                  for b in QUANTIZED_BITS)]
    lines.append(f"quantized (group size {GROUP_SIZE}, bfloat16 scales and biases): "
                 + ", ".join(quantized))
    if c.quantization:  # a converted model: what its files hold
        lines += converted(c)
    per_token, state = sizes.cache_bytes(c, mx.bfloat16)
    attention = sum(c.layer_type(i) in ("attention", "parallel", "hybrid")
                    for i in range(c.n_layer))
    lines.append(f"KV cache (bfloat16): {_bytes(per_token * CONTEXT)} per {CONTEXT:,} tokens of "
                 f"context per sequence ({attention} attention layers)" if attention else
                 "KV cache: none (no attention layers)")
    lines.append(f"SSM state: {_bytes(state)} per sequence, constant: it does not grow with the "
                 "context (float32 state, bfloat16 conv window)")
    return lines


def converted(config):
    """The lines on a converted model's quantization: its size and, when the layers differ in
    bits (mixed precision: per-module entries in `quantization`), which layers have which."""
    q = config.quantization
    model = sizes.lazy_model(config, mx.bfloat16)
    size = _bytes(sum(v.nbytes for _, v in tree_flatten(model.parameters())))
    bits = quantized_bits(model)
    widths = sorted(set(bits.values()))
    if len(widths) <= 1:
        return [f"as converted ({q['mode']} {q['bits']}-bit, group size {q['group_size']}): {size}"]
    lines = [f"as converted ({q['mode']}, mixed {'/'.join(map(str, widths))}-bit, default "
             f"{q['bits']}-bit, group size {q['group_size']}): {size}, "
             f"{bits_per_weight(model):.2f} bits per quantized weight (scales and biases "
             "included)"]
    for width in widths:
        names = Counter(path.rsplit(".", 1)[-1] for path, b in bits.items() if b == width)
        lines.append(f"  {width}-bit: {sum(names.values())} layers ("
                     + ", ".join(f"{name} x{n}" if n > 1 else name
                                 for name, n in sorted(names.items())) + ")")
    return lines


def _count(n):
    return f"{n / 1e9:.2f}B ({n:,})" if n >= 1e9 else f"{n / 1e6:.1f}M ({n:,})"


def _bytes(n):
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def info(model):
    """The description of a local checkpoint directory or a hub repo id (config only)."""
    path = resolve(model, allow_patterns=CONFIG_FILES)
    _, raw = read_config(path)
    return [f"model: {model}", *describe(load_config(path), raw)]


def build_parser():
    parser = cli.ArgumentParser(
        prog="python -m mlx_mamba.info",
        description="What a checkpoint is before its weights are downloaded: architecture, layer "
                    "pattern, sizes, parameter counts, weight memory per dtype and quantization, "
                    "cache memory per 1,000 tokens of context. Reads only the config.")
    cli.add_model_arguments(parser, tokenizer=False,
                            model_help="a local checkpoint directory or a Hugging Face repo id "
                                       "(only its config.json or params.json is downloaded)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return cli.run(lambda: print("\n".join(info(args.model))), (ConfigError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
