"""Per-layer bit widths from measured sensitivity, to an average bit budget.

    python -m mlx_mamba.dynamic_quant --model M --target-bpw B --mlx-path DST [--data FILE_OR_DIR]

Sensitivity: for each quantizable layer and each bit width, that layer alone is quantized (the
rest stay float) and the KL divergence of the model's next-token distribution from the float
model's is measured on calibration tokens. Assuming the layers' damages add up, bits are then
assigned greedily: every layer starts at the fewest bits, and the upgrade that removes the most
KL per added byte is taken, among those that still fit the budget, until none fits.

Bits per weight: stored bits (packed weights, scales and biases) per parameter of the quantized
layers, as convert.py reports; it cannot exceed the target and ends within the smallest
upgrade's step below it. Layers whose input does not fit the group size stay float, as always.
"""

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from . import cli
from .checkpoint import CheckpointError
from .config import ConfigError
from .convert import ConvertError, check_destination, save_model
from .loader import find_tokenizer, load_model, load_tokenizer, resolve
from .perplexity import make_sequences, read_tokens
from .quant_modes import MODES, QuantizationError, quantization_params
from .quantize import quantize_model, should_quantize
from .tuner.datasets import DataError

BITS = MODES["affine"][1]


def kl_divergence(teacher_logits, student_logits):
    """Mean over positions of KL(teacher || student) of the next-token distributions."""
    teacher = nn.log_softmax(teacher_logits.astype(mx.float32), axis=-1)
    student = nn.log_softmax(student_logits.astype(mx.float32), axis=-1)
    return (mx.exp(teacher) * (teacher - student)).sum(-1).mean()


def _set_module(model, path, module):
    model.update_modules(tree_unflatten([(path, module)]))


def candidate_layers(model, group_size):
    """{path: module} of the layers that can be quantized with `group_size`."""
    return {path: module for path, module in model.named_modules()
            if should_quantize(path, module, group_size)}


def layer_sensitivity(model, tokens, group_size=64, bits=BITS, progress=None):
    """{path: {bits: KL}}: the KL from the float model when only that layer is quantized.

    tokens: (K, N) int calibration sequences."""
    inputs = mx.array(np.asarray(tokens))
    model.eval()
    reference = model(inputs)
    mx.eval(reference)
    sensitivity = {}
    for path, module in candidate_layers(model, group_size).items():
        sensitivity[path] = {}
        for b in bits:
            _set_module(model, path, module.to_quantized(group_size=group_size, bits=b))
            sensitivity[path][b] = kl_divergence(reference, model(inputs)).item()
            if progress is not None:
                progress(1)
        _set_module(model, path, module)
    return sensitivity


def stored_bits(module, bits, group_size, scale_bits):
    """Bits that `module`'s weight takes quantized: packed values, one scale and bias a group."""
    size = module.weight.size
    return size * bits + (size // group_size) * 2 * scale_bits


def assign_bits(sensitivity, sizes, target_bpw):
    """{path: bits} within `target_bpw` bits per weight, greedily by KL saved per bit spent.

    sensitivity: {path: {bits: KL}}; sizes: {path: (parameters, {bits: stored bits})}."""
    choice = {path: min(options) for path, options in sensitivity.items()}
    budget = target_bpw * sum(n for n, _ in sizes.values())
    spent = sum(sizes[p][1][b] for p, b in choice.items())
    if spent > budget:
        lowest = spent / sum(n for n, _ in sizes.values())
        raise QuantizationError(f"--target-bpw {target_bpw}: the fewest bits already take "
                                f"{lowest:.3f} bits per weight")
    while True:
        best = None
        for path, b in choice.items():
            for higher, kl in sensitivity[path].items():
                cost = sizes[path][1][higher] - sizes[path][1][b]
                if higher <= b or spent + cost > budget:
                    continue
                gain = (sensitivity[path][b] - kl) / cost
                if best is None or gain > best[0]:
                    best = (gain, path, higher, cost)
        if best is None:
            return choice
        _, path, higher, cost = best
        choice[path], spent = higher, spent + cost


def dynamic_quantization(model, tokens, target_bpw, group_size=64, progress=None,
                         sensitivity=None):
    """The `quantization` entry (defaults plus per-module entries, mlx-lm's layout) that meets
    `target_bpw` with the least measured damage, and the bits per weight it gives.

    sensitivity: `layer_sensitivity(model, tokens, group_size)` when already measured (one table
    serves every budget); `tokens` are then not used."""
    layers = candidate_layers(model, group_size)
    scale_bits = 8 * next(iter(layers.values())).weight.dtype.size
    if sensitivity is None:
        sensitivity = layer_sensitivity(model, tokens, group_size, progress=progress)
    sizes = {p: (m.weight.size, {b: stored_bits(m, b, group_size, scale_bits) for b in BITS})
             for p, m in layers.items()}
    choice = assign_bits(sensitivity, sizes, target_bpw)
    default = max(set(choice.values()), key=list(choice.values()).count)
    quantization = quantization_params(default, group_size)
    for path, b in sorted(choice.items()):
        if b != default:
            quantization[path] = quantization_params(b, group_size)
    bpw = sum(sizes[p][1][b] for p, b in choice.items()) / sum(n for n, _ in sizes.values())
    return quantization, bpw


def calibration_tokens(model, tokenizer, data, sequence_length, num_samples):
    """(K, N) calibration tokens from `data`, or, without data, sampled from the model itself."""
    if data is not None:
        tokens = read_tokens(data, tokenizer, model.config.vocab_size)
        if len(tokens) < sequence_length:
            raise DataError(f"{data}: {len(tokens)} tokens, fewer than one sequence of "
                            f"--sequence-length {sequence_length}")
        return make_sequences(tokens, sequence_length, num_samples)
    from .generate import stream_generate

    start = model.config.bos_token_id or 0
    rows = []
    for seed in range(num_samples):
        row = [start] + [r.token for r in stream_generate(
            model, tokenizer, [start], max_tokens=sequence_length - 1, temp=1.0, seed=seed)]
        rows.append((row * sequence_length)[:sequence_length])  # an early eos: repeat it
    return np.array(rows, np.int32)


def load_float_model(model_path, tool):
    """(directory, model, tokenizer location, tokenizer) of the float model that `tool` quantizes;
    the tokenizer reads its calibration text."""
    source = resolve(model_path)
    model = load_model(source)
    if model.config.quantization:
        raise ConvertError(f"{source}: already quantized; {tool} starts from a float model")
    location = find_tokenizer(source)
    tokenizer = load_tokenizer(location, model.config.eos_token_id)
    if tokenizer is None:
        raise DataError(f"{source}: the model has no tokenizer to read calibration text with")
    return source, model, location, tokenizer


def dynamic_quant(model_path, mlx_path, target_bpw, data=None, sequence_length=256,
                  num_samples=4, group_size=64):
    """Quantize the float model at `model_path` to `target_bpw` and save it to `mlx_path`;
    returns the bits per weight reached."""
    check_destination(mlx_path, "--mlx-path")
    source, model, location, tokenizer = load_float_model(model_path, "dynamic_quant")
    tokens = calibration_tokens(model, tokenizer, data, sequence_length, num_samples)
    from tqdm import tqdm

    count = len(candidate_layers(model, group_size)) * len(BITS)
    with tqdm(total=count, desc="Sensitivity", unit="layer-bits", file=sys.stderr) as bar:
        quantization, bpw = dynamic_quantization(model, tokens, target_bpw, group_size, bar.update)
    quantize_model(model, quantization)
    model.config.quantization = quantization
    save_model(Path(mlx_path), dict(tree_flatten(model.parameters())), model.config, location)
    print(f"[INFO] Saved to {mlx_path}")
    return bpw


def parser():
    p = cli.ArgumentParser(prog="python -m mlx_mamba.dynamic_quant",
                           description="Per-layer bits from measured sensitivity, to a budget.")
    cli.add_model_arguments(p, tokenizer=False, model_help="a float model directory or repo id")
    p.add_argument("--mlx-path", required=True, help="The new directory to write")
    p.add_argument("--target-bpw", type=cli.number(above=0), required=True,
                   help="Average stored bits per weight of the quantized layers (scales and "
                   "biases included)")
    p.add_argument("--data", help="Calibration text: a text file or a directory with test.jsonl "
                   "(else valid.jsonl) (default: text sampled from the model itself)")
    p.add_argument("--sequence-length", type=cli.integer(2), default=256,
                   help="Tokens per calibration sequence")
    p.add_argument("--num-samples", type=cli.integer(1), default=4,
                   help="Calibration sequences")
    p.add_argument("--q-group-size", type=int, choices=MODES["affine"][0], default=64,
                   help="Group size")
    return p


def main(argv=None):
    args = parser().parse_args(argv)

    def command():
        bpw = dynamic_quant(args.model, args.mlx_path, args.target_bpw, args.data,
                            args.sequence_length, args.num_samples, args.q_group_size)
        print(f"{bpw:.3f} bits per weight")

    status = cli.run(command, (DataError, ConfigError, CheckpointError, ConvertError,
                               QuantizationError, OSError), interrupted="nothing was saved")
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
