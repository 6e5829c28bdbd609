"""What quantization costs in quality: held-out perplexity of the reference model
(benchmarks/reference_models.py) in bfloat16 and quantized by every method here, next to mlx-lm
measuring the same files with its own perplexity code.

Methods: round-to-nearest at 4 and 3 bits; the mixed recipes (convert.py --quant-predicate);
dynamic_quant at 3.5 and 4.5 bits per weight; DWQ from 3 bits. Bits per weight: stored bits of
the quantized layers (scales and biases included, bfloat16) per parameter. Perplexity: the
last 10% of tinyshakespeare, which neither the tokenizer nor the model saw. Calibration
(dynamic_quant, DWQ) uses training text only.

    python benchmarks/reference_models.py && python benchmarks/quant_quality.py
"""

import argparse
import platform
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from reference_models import held_out_tokens, reference_model, splits

from mlx_mamba.convert import convert, save_model
from mlx_mamba.dwq import distill
from mlx_mamba.dynamic_quant import dynamic_quantization
from mlx_mamba.loader import cast, load, load_model
from mlx_mamba.perplexity import evaluate_perplexity, make_sequences
from mlx_mamba.quant_recipes import RECIPES
from mlx_mamba.quantize import bits_per_weight, quantize_model


def calibration(tokenizer, length, count):
    tokens = np.array(tokenizer.encode(splits()[0][-200_000:]), np.int32)
    return make_sequences(tokens, length, count)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sequence-length", type=int, default=128)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--dwq-iters", type=int, default=60)
    args = p.parse_args()
    source = reference_model()
    float_model, tokenizer = load(source)
    held_out = held_out_tokens(tokenizer)
    sequences = make_sequences(held_out, args.sequence_length, args.num_samples)
    print(f"# {platform.machine()} {platform.system()}, MLX {mx.__version__}, default device "
          f"{mx.default_device()}; {source.name}, {sequences.size} held-out tokens")

    def ppl(model):
        return evaluate_perplexity(model, sequences.ravel(), args.sequence_length)[:2]

    base, base_error = ppl(float_model)
    print(f"{'method':28} {'bpw':>6} {'ppl':>9} {'± se':>7} {'increase':>9}")
    print(f"{'bfloat16':28} {16:6.2f} {base:9.3f} {base_error:7.3f} {'':>9}")

    def report(name, model, ppl_error=None):
        value, error = ppl_error or ppl(model)
        print(f"{name:28} {bits_per_weight(model):6.2f} {value:9.3f} {error:7.3f} "
              f"{100 * (value / base - 1):8.2f}%", flush=True)

    scratch = Path(tempfile.mkdtemp(prefix="quant-quality-"))
    converted = {}
    for name, kwargs in [("rtn 4-bit", dict(q_bits=4)), ("rtn 3-bit", dict(q_bits=3))] + [
            (recipe, dict(quant_predicate=recipe)) for recipe in RECIPES]:
        out = scratch / name.replace(" ", "_")
        convert(source, out, quantize=True, **kwargs)
        converted[name] = out
        report(name, load_model(out))

    calibration_tokens = calibration(tokenizer, args.sequence_length, 4)
    for target in (3.5, 4.5):
        model = load_model(source)
        start = time.perf_counter()
        quantization, _ = dynamic_quantization(model, calibration_tokens, target)
        quantize_model(model, quantization)
        model.config.quantization = quantization
        report(f"dynamic_quant {target} ({time.perf_counter() - start:.0f}s)", model)
        out = scratch / f"dynamic_{target}"
        save_model(out, dict(tree_flatten(model.parameters())), model.config, source)
        converted[f"dynamic_quant {target}"] = out

    teacher = load_model(source, dtype=mx.float32)
    student = load_model(source, dtype=mx.float32)
    quantize_model(student, {"group_size": 64, "bits": 3, "mode": "affine"})
    start = time.perf_counter()
    losses = distill(student, teacher, calibration(tokenizer, args.sequence_length, 16),
                     iters=args.dwq_iters, batch_size=4, learning_rate=1e-3)
    student.load_weights(list(cast(dict(tree_flatten(student.parameters())),
                                   mx.bfloat16).items()))
    report(f"dwq 3-bit ({time.perf_counter() - start:.0f}s, KL {losses[0]:.3f}->"
           f"{np.mean(losses[-10:]):.3f})", student)

    # mlx-lm on the same files: its loader and its own perplexity code (per-token errors).
    from mlx_lm.perplexity import eval_ppl
    from mlx_lm.utils import load_model as mlx_lm_load_model

    print("# mlx-lm, same files, its eval_ppl")
    for name, out in converted.items():
        model, _ = mlx_lm_load_model(out)
        value, error = eval_ppl(model, mx.array(sequences), batch_size=8)
        print(f"mlx-lm {name:21} {'':6} {value:9.3f} {error:7.3f} "
              f"{100 * (value / base - 1):8.2f}%", flush=True)


if __name__ == "__main__":
    main()
