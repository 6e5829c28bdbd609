"""Distilled weight quantization (DWQ): the scales and biases of a quantized model trained so that
its next-token distributions match the float model's (KL divergence).

    python -m mlx_mamba.dwq --model M --mlx-path DST --data FILE_OR_DIR [--q-bits N]
        [--quant-predicate NAME] [--iters N] [--learning-rate LR]

The packed integer weights stay as round-to-nearest made them; only the per-group scales and
biases of the affine layers below 8 bits move (as mlx-lm's DWQ), so the result is an ordinary
quantized model of the same size, read by `load` and mlx-lm like any other.
"""

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from . import cli
from .checkpoint import CheckpointError
from .config import ConfigError
from .convert import ConvertError, check_destination, predicate_quantization, save_model
from .dynamic_quant import calibration_tokens, kl_divergence, load_float_model
from .loader import cast, load_model
from .quant_modes import QuantizationError, quantization_params
from .quant_recipes import RECIPES
from .quantize import QUANTIZED_TYPES, quantize_model
from .tuner.datasets import DataError


def trainable_quantization(model):
    """Freeze `model` but the scales and biases of its affine layers below 8 bits."""
    model.freeze()
    for _, module in model.named_modules():
        if isinstance(module, QUANTIZED_TYPES) and module.mode == "affine" and module.bits < 8:
            module.unfreeze(keys=["scales", "biases"], recurse=False)


def distill(student, teacher, tokens, iters=100, batch_size=4, learning_rate=1e-4,
            log=None):
    """Train `student`'s scales and biases towards `teacher` on the (K, N) int `tokens`;
    returns the distillation loss (KL) of each step."""
    trainable_quantization(student)
    optimizer = optim.Adam(learning_rate=learning_rate)
    tokens = np.asarray(tokens)

    def loss(model, inputs, targets):
        return kl_divergence(targets, model(inputs))

    loss_and_grad = nn.value_and_grad(student, loss)
    student.train()
    teacher.eval()
    losses = []
    for step in range(iters):
        rows = [(step * batch_size + i) % len(tokens) for i in range(batch_size)]
        inputs = mx.array(tokens[rows])
        value, grads = loss_and_grad(student, inputs, mx.stop_gradient(teacher(inputs)))
        optimizer.update(student, grads)
        mx.eval(student.trainable_parameters(), optimizer.state, value)
        losses.append(value.item())
        if log is not None:
            log(step + 1, losses[-1])
    student.eval()
    return losses


def mean_kl(student, teacher, tokens, batch_size=4):
    """The mean KL(teacher || student) over the (K, N) `tokens`."""
    total = 0.0
    for start in range(0, len(tokens), batch_size):
        inputs = mx.array(np.asarray(tokens[start:start + batch_size]))
        total += kl_divergence(teacher(inputs), student(inputs)).item() * len(inputs)
    return total / len(tokens)


def dwq(model_path, mlx_path, data=None, q_bits=3, q_group_size=64, quant_predicate=None,
        iters=200, batch_size=4, learning_rate=1e-4, sequence_length=256, num_samples=32):
    """Quantize the float model at `model_path` (bits or a recipe), distill its scales and
    biases on `data`, save it to `mlx_path`; returns (KL before, KL after) on held-out tokens."""
    check_destination(mlx_path, "--mlx-path")
    source, teacher, location, tokenizer = load_float_model(model_path, "DWQ")
    tokens = calibration_tokens(teacher, tokenizer, data, sequence_length, num_samples)
    held_out = max(1, len(tokens) // 8)
    train, valid = (tokens[:-held_out], tokens[-held_out:]) if len(tokens) > 1 else (tokens,) * 2
    # Trained in float32: Adam's small steps vanish in bfloat16 scales; saved in the stored dtype.
    dtype = teacher.backbone.embeddings.weight.dtype
    student = load_model(source, dtype=mx.float32)
    quantization = quantization_params(q_bits if quant_predicate is None else None, q_group_size)
    if quant_predicate is not None:
        quantization = predicate_quantization(quant_predicate, student, quantization)
    quantize_model(student, quantization)
    student.config.quantization = quantization
    before = mean_kl(student, teacher, valid, batch_size)
    print(f"Held-out KL before: {before:.5f}", flush=True)
    from tqdm import tqdm

    with tqdm(total=iters, desc="DWQ", file=sys.stderr) as bar:
        def log(step, value):
            bar.update(1)
            bar.set_postfix(kl=f"{value:.4f}")

        distill(student, teacher, train, iters, batch_size, learning_rate, log)
    after = mean_kl(student, teacher, valid, batch_size)
    print(f"Held-out KL after: {after:.5f}", flush=True)
    save_model(Path(mlx_path), cast(dict(tree_flatten(student.parameters())), dtype),
               student.config, location)
    print(f"[INFO] Saved to {mlx_path}")
    return before, after


def parser():
    p = cli.ArgumentParser(prog="python -m mlx_mamba.dwq", description=__doc__.split("\n")[0])
    cli.add_model_arguments(p, tokenizer=False, model_help="a float model directory or repo id")
    p.add_argument("--mlx-path", required=True, help="The new directory to write")
    p.add_argument("--data", help="Calibration text: a text file or a directory with test.jsonl "
                   "(else valid.jsonl) (default: text sampled from the model itself)")
    p.add_argument("--q-bits", type=int, default=3, help="Bits per weight (affine)")
    p.add_argument("--q-group-size", type=int, default=64, help="Group size")
    p.add_argument("--quant-predicate", choices=tuple(RECIPES),
                   help="A mixed-precision recipe (default: --q-bits for every layer)")
    p.add_argument("--iters", type=cli.integer(1), default=200, help="Training steps")
    p.add_argument("--batch-size", type=cli.integer(1), default=4, help="Sequences per step")
    p.add_argument("--learning-rate", type=cli.number(above=0), default=1e-4,
                   help="Adam's learning rate")
    p.add_argument("--sequence-length", type=cli.integer(2), default=256,
                   help="Tokens per calibration sequence")
    p.add_argument("--num-samples", type=cli.integer(1), default=32,
                   help="Calibration sequences (an eighth held out)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    status = cli.run(
        lambda: dwq(args.model, args.mlx_path, args.data, args.q_bits, args.q_group_size,
                    args.quant_predicate, args.iters, args.batch_size, args.learning_rate,
                    args.sequence_length, args.num_samples),
        (DataError, ConfigError, CheckpointError, ConvertError, QuantizationError, OSError),
        interrupted="nothing was saved")
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
