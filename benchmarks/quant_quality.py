"""What quantization costs: held-out perplexity, file size and decode speed of the reference
models (benchmarks/reference_models.py: a Mamba2 and a Granite 4.0-H-layout hybrid) in bfloat16
and quantized by every method here, and by mlx-lm's own tools on the same float files.

Ours: round-to-nearest at 4 and 3 bits and the mixed recipes (`convert`), dynamic_quant at 3.5
and 4.5 bits per weight (one sensitivity table for both), DWQ from 3 bits. mlx-lm's: `mlx_lm.convert`
at 4 and 3 bits and with its recipes, its dynamic_quant (sensitivities by gradient, one low and
one high width, threshold searched to the bit budget) at the same two budgets, its DWQ from
3 bits; where a tool refuses a model, the row says why.

Columns: bits per weight (stored bits of the quantized layers, bfloat16 scales and biases
included, per parameter: the same measure for every row); weight bytes (the written
*.safetensors files); perplexity on the last 10% of tinyshakespeare (unseen by tokenizer and
model) by our code and by mlx-lm's `eval_ppl`, each with its increase over the float model
measured by the same code (ours loads mlx-lm's files only where their layer names are ours),
ours with the paired standard error of that increase (over the sequences' mean losses: below
it, two methods are not told apart); the mean KL divergence of the next-token distributions from
the float model's on the same held-out tokens (our code: how far quantization moved the model,
which, unlike the perplexity, cannot improve by chance); decode speed (tokens per second after
the first, greedy, best of three, by the generate of the tool that wrote the file). Calibration
(dynamic_quant, DWQ) uses training text only, the same for both tools.

    python benchmarks/quant_quality.py --models mamba2 hybrid
"""

import argparse
import copy
import json
import math
import platform
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from reference_models import CACHE, CONFIGS, held_out_tokens, reference_model, splits

from mlx_mamba import load
from mlx_mamba.convert import convert, save_model
from mlx_mamba.dwq import distill
from mlx_mamba.generate import stream_generate
from mlx_mamba.dynamic_quant import dynamic_quantization, kl_divergence, layer_sensitivity
from mlx_mamba.loader import cast, load_model
from mlx_mamba.perplexity import make_sequences, perplexity_of, token_losses
from mlx_mamba.quant_recipes import RECIPES
from mlx_mamba.quantize import bits_per_weight, quantize_model

PROMPT = "ROMEO:\nWhat light through yonder window breaks?\n"


def calibration(tokenizer, length, count):
    tokens = np.array(tokenizer.encode(splits()[0][-200_000:]), np.int32)
    return make_sequences(tokens, length, count)


def weight_bytes(directory):
    return sum(file.stat().st_size for file in Path(directory).glob("*.safetensors"))


class Bench:
    """The rows of one reference model: each written model measured the same way."""

    def __init__(self, source, sequences, decode_tokens):
        self.source, self.sequences, self.decode_tokens = source, sequences, decode_tokens
        self.rows, self.base = [], {}

    def ours_measures(self, directory):
        """Perplexity, the per-sequence mean losses and the held-out logits, by our code."""
        model = load_model(directory)
        losses = token_losses(model, self.sequences)
        logits = [model(mx.array(self.sequences[i:i + 8, :-1])).astype(mx.float32)
                  for i in range(0, len(self.sequences), 8)]
        mx.eval(logits)
        return perplexity_of(losses)[0], losses.mean(axis=1), logits

    def fidelity(self, row, losses, logits):
        """The paired standard error of the perplexity's increase over the float model (its
        per-sequence mean losses' differences), and the mean KL divergence of the next-token
        distributions from the float model's: how far quantization moved the model, which the
        perplexity of a small held-out text resolves only to that error."""
        if row["method"] == "bfloat16":
            self.base_losses, self.base_logits = losses, logits
            return
        difference = losses - self.base_losses
        row["ppl_ours_se"] = float(difference.std(ddof=1) / np.sqrt(len(difference)))
        row["kl"] = float(np.mean([kl_divergence(a, b).item()
                                   for a, b in zip(self.base_logits, logits)]))

    def mlx_lm_ppl(self, model):
        from mlx_lm.perplexity import eval_ppl

        return eval_ppl(model, mx.array(self.sequences), batch_size=8)[0]

    def ours_decode(self, directory):
        return self.fastest(stream_generate, *load(directory))

    def mlx_lm_decode(self, model, tokenizer):
        from mlx_lm import stream_generate as mlx_lm_stream

        return self.fastest(mlx_lm_stream, model, tokenizer)

    def fastest(self, stream, model, tokenizer):
        """The best of three greedy decodes: other jobs on the shared cores only slow it."""
        speeds = []
        for _ in range(3):
            for response in stream(model, tokenizer, PROMPT, max_tokens=self.decode_tokens):
                pass
            speeds.append(response.generation_tps)
        return max(speeds)

    def measure(self, method, tool, directory, bpw=None):
        """Add the row of the model written to `directory` by `tool` ("ours" or "mlx-lm")."""
        from mlx_lm.utils import load as mlx_lm_load

        row = dict(method=method, tool=tool, bpw=bpw, bytes=weight_bytes(directory))
        try:
            row["ppl_ours"], losses, logits = self.ours_measures(directory)
            self.fidelity(row, losses, logits)
            row["bpw"] = row["bpw"] or bits_per_weight(load_model(directory))
            if tool == "ours":
                row["decode"] = self.ours_decode(directory)
        except Exception as error:  # mlx-lm's names for a hybrid's per-layer bits, say
            row["ours_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        try:
            model, tokenizer = mlx_lm_load(str(directory))
            row["ppl_mlx_lm"] = self.mlx_lm_ppl(model)
            row["bpw"] = row["bpw"] or bits_per_weight(model)
            if tool == "mlx-lm":
                row["decode"] = self.mlx_lm_decode(model, tokenizer)
        except Exception as error:
            row["mlx_lm_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        if method == "bfloat16":
            self.base = {k: row.get(k) for k in ("ppl_ours", "ppl_mlx_lm")}
            row["bpw"] = 16.0
            if tool == "ours":  # the float model: decode speed by both tools
                row["decode"] = self.ours_decode(directory)
                row["decode_mlx_lm"] = self.mlx_lm_decode(*mlx_lm_load(str(directory)))
        self.rows.append(row)
        print(format_row(row, self.base), flush=True)

    def refused(self, method, tool, error):
        row = dict(method=method, tool=tool, refused=f"{type(error).__name__}: "
                   f"{str(error).splitlines()[0][:160]}")
        self.rows.append(row)
        print(format_row(row, self.base), flush=True)


def _increase(value, base, error=None):
    if value is None or not base:
        return ""
    spread = f" ± {100 * error:.2f}" if error is not None else ""
    return f"{value:.3f} ({100 * (value / base - 1):+.2f}%{spread})"


def format_row(row, base):
    if "refused" in row:
        return f"| {row['method']} | {row['tool']} | refused: {row['refused']} | | | | | |"
    decode = f"{row['decode']:.0f}" if row.get("decode") else ""
    if row.get("decode_mlx_lm"):
        decode += f" (mlx-lm {row['decode_mlx_lm']:.0f})"
    notes = "; ".join(row[k] for k in ("ours_error", "mlx_lm_error") if k in row)
    bpw = f"{row['bpw']:.2f}" if row.get("bpw") else ""
    ours = _increase(row.get("ppl_ours"), base.get("ppl_ours"), row.get("ppl_ours_se"))
    theirs = _increase(row.get("ppl_mlx_lm"), base.get("ppl_mlx_lm"))
    kl = f"{1000 * row['kl']:.2f}" if "kl" in row else ""
    return (f"| {row['method']} | {row['tool']} | {bpw} | {row['bytes']:,} | {ours or 'n/a'} | "
            f"{theirs or 'n/a'} | {kl} | {decode} |" + (f" {notes}" if notes else ""))


HEADER = ("| method | written by | bits/weight | weight bytes | perplexity, our code (± paired "
          "standard error) | perplexity, mlx-lm's eval_ppl | KL from bfloat16 (x 1e-3), our code "
          "| decode tokens/s |\n| --- | --- | --- | --- | --- | --- | --- | --- |")


def mlx_lm_target(model, target, group_size):
    """mlx-lm's dynamic_quant budget (bits over every parameter, float ones included) that
    means `target` bits per weight over the quantized layers only (this benchmark's measure)."""
    quantized = floating_bytes = floating = 0
    for _, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        parameters = dict(tree_flatten(module.parameters()))
        if hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0:
            quantized += module.weight.size
            parameters.pop("weight")
        floating += sum(v.size for v in parameters.values())
        floating_bytes += sum(v.nbytes for v in parameters.values())
    return (target * quantized + 8 * floating_bytes) / (quantized + floating)


def run_ours(bench, source, tokenizer, scratch, args):
    for name, kwargs in [("round to nearest, 4-bit", dict(q_bits=4)),
                         ("round to nearest, 3-bit", dict(q_bits=3))] + [
            (f"`{recipe}`", dict(quant_predicate=recipe)) for recipe in RECIPES]:
        out = scratch / f"ours-{len(bench.rows)}"
        convert(source, out, quantize=True, q_group_size=64, **kwargs)
        bench.measure(name, "ours", out)

    start = time.perf_counter()
    sensitivity = layer_sensitivity(load_model(source), calibration(
        tokenizer, args.sequence_length, args.calibration_samples))
    print(f"(dynamic_quant's sensitivity table: {time.perf_counter() - start:.0f}s)", flush=True)
    for target in (3.5, 4.5):
        model = load_model(source)
        quantization, _ = dynamic_quantization(model, None, target, sensitivity=sensitivity)
        quantize_model(model, quantization)
        model.config.quantization = quantization
        out = scratch / f"ours-dq{target}"
        save_model(out, dict(tree_flatten(model.parameters())), model.config, source)
        bench.measure(f"dynamic_quant {target}", "ours", out)

    dwq_tokens = calibration(tokenizer, args.sequence_length, 16)
    teacher = load_model(source, dtype=mx.float32)
    for name, quantization in [("3-bit", {"group_size": 64, "bits": 3, "mode": "affine"})]:
        student = load_model(source, dtype=mx.float32)
        quantize_model(student, quantization)
        student.config.quantization = quantization
        start = time.perf_counter()
        losses = distill(student, teacher, dwq_tokens, iters=args.dwq_iters, batch_size=4,
                         learning_rate=args.dwq_learning_rate)
        out = scratch / f"ours-dwq-{len(bench.rows)}"
        save_model(out, cast(dict(tree_flatten(student.parameters())), mx.bfloat16),
                   student.config, source)
        bench.measure(f"DWQ from {name}, {args.dwq_iters} steps ({time.perf_counter() - start:.0f}s"
                      f", KL {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f})", "ours", out)


def run_mlx_lm(bench, source, tokenizer, scratch, args):
    from mlx_lm.convert import QUANT_RECIPES, convert as mlx_lm_convert
    from mlx_lm.quant.dwq import dwq_quantize
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold
    from mlx_lm.utils import load as mlx_lm_load, quantize_model as mlx_lm_quantize, save

    for name, kwargs in [("round to nearest, 4-bit", dict(q_bits=4)),
                         ("round to nearest, 3-bit", dict(q_bits=3))] + [
            (f"`{recipe}`", dict(quant_predicate=recipe)) for recipe in QUANT_RECIPES]:
        out = scratch / f"mlx-lm-{len(bench.rows)}"
        try:
            mlx_lm_convert(str(source), str(out), quantize=True, q_group_size=64, **kwargs)
        except Exception as error:
            bench.refused(name, "mlx-lm", error)
            continue
        bench.measure(name, "mlx-lm", out)

    data = mx.array(calibration(tokenizer, args.sequence_length, args.calibration_samples))
    for target, low, high in ((3.5, 2, 4), (4.5, 3, 5)):
        name = f"dynamic_quant {target} ({low}/{high}-bit)"
        try:
            model, mlx_tokenizer, config = mlx_lm_load(str(source), return_config=True)
            start = time.perf_counter()
            sensitivities = dict(estimate_sensitivities(model, data, low, 64, high, 64))
            threshold = estimate_threshold(model, sensitivities, mlx_lm_target(model, target, 64),
                                           low, 64, high, 64)

            def predicate(path, module):
                if not hasattr(module, "to_quantized"):
                    return False
                return {"bits": high, "group_size": 64} if sensitivities[path] > threshold \
                    else True

            model, config = mlx_lm_quantize(model, config, 64, low, quant_predicate=predicate)
            out = scratch / f"mlx-lm-dq{target}"
            save(out, source, model, mlx_tokenizer, config)
        except Exception as error:
            bench.refused(name, "mlx-lm", error)
            continue
        bench.measure(f"{name} ({time.perf_counter() - start:.0f}s)", "mlx-lm", out)

    name = f"DWQ from 3-bit, {args.dwq_iters} steps"
    try:
        teacher, mlx_tokenizer, config = mlx_lm_load(str(source), return_config=True)
        student = copy.deepcopy(teacher)
        student, config = mlx_lm_quantize(student, config, 64, 3)
        sequences = [(row.tolist(), 0) for row in calibration(tokenizer, args.sequence_length + 1,
                                                                16)]
        # Its loop runs one pass over the data: the sequences repeated for the same step count
        # as ours (the first 1/8 of them held out for its validation loss, as ours does).
        held, train_rows = sequences[:2], sequences[2:]
        repeats = math.ceil(args.dwq_iters * 4 / len(train_rows))
        start = time.perf_counter()
        dwq_quantize(student, lambda batch, i, split: teacher(batch),
                     optim.Adam(learning_rate=args.dwq_learning_rate, bias_correction=True),
                     (train_rows * repeats)[:args.dwq_iters * 4], held * 2, batch_size=4,
                     max_seq_length=args.sequence_length + 1, seed=0)
        out = scratch / "mlx-lm-dwq"
        save(out, source, student, mlx_tokenizer, config)
    except Exception as error:
        bench.refused(name, "mlx-lm", error)
        return
    bench.measure(f"{name} ({time.perf_counter() - start:.0f}s)", "mlx-lm", out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--cache", type=Path, default=CACHE,
                   help="where the reference models are (trained there when absent)")
    p.add_argument("--sequence-length", type=int, default=128)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--calibration-samples", type=int, default=8,
                   help="sequences of training text that measure dynamic_quant's sensitivities")
    p.add_argument("--dwq-iters", type=int, default=20)
    p.add_argument("--dwq-learning-rate", type=float, default=2e-4)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--output", type=Path, help="also write the rows here as JSON")
    p.add_argument("--skip-mlx-lm", action="store_true")
    args = p.parse_args()
    results = {}
    for name in args.models:
        source = reference_model(name, cache=args.cache)
        record = json.loads((source / "training.json").read_text())
        _, tokenizer = load(source)
        sequences = make_sequences(held_out_tokens(tokenizer), args.sequence_length,
                                   args.num_samples)
        print(f"\n## {name}: {record['parameters'] / 1e6:.2f}M parameters, {record['stopped']} "
              f"at step {record['steps']}\n\n{platform.machine()} {platform.system()}, MLX "
              f"{mx.__version__}, {mx.default_device()}; {sequences.size} held-out tokens in "
              f"{len(sequences)} sequences of {args.sequence_length}\n\n{HEADER}", flush=True)
        bench = Bench(source, sequences, args.decode_tokens)
        bench.measure("bfloat16", "ours", source)
        scratch = Path(tempfile.mkdtemp(prefix=f"quant-quality-{name}-"))
        try:
            run_ours(bench, source, tokenizer, scratch, args)
            if not args.skip_mlx_lm:
                run_mlx_lm(bench, source, tokenizer, scratch, args)
        finally:
            shutil.rmtree(scratch)
        results[name] = dict(training=record, rows=bench.rows)
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
