"""Conversion time and peak memory of convert.py, side by side with mlx-lm's convert, and the
weight error of each quantization mode.

Both converters run as separate processes on the same random 130m-shaped transformers
checkpoints (Mamba1 and Mamba2, float32 safetensors plus the GPT-NeoX tokenizer), alternating,
several rounds; wall time is the median, peak memory the largest resident set size of the
process (from wait4). The quantization errors are those of the weights (see
`quantization_errors` for why not logits).

    python benchmarks/convert.py                   # both shapes, float32 and 4-bit, 3 rounds
    python benchmarks/convert.py --errors          # also the weight error of every mode
"""

import argparse
import contextlib
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "mamba-130m": ("MambaConfig", "MambaForCausalLM",
                   dict(hidden_size=768, num_hidden_layers=24, state_size=16, vocab_size=50280)),
    "mamba2-130m": ("Mamba2Config", "Mamba2ForCausalLM",
                    dict(hidden_size=768, num_hidden_layers=24, state_size=128, head_dim=64,
                         num_heads=24, n_groups=1, vocab_size=50288, tie_word_embeddings=True)),
}
CONVERTERS = {
    "mlx-mamba": [sys.executable, str(ROOT / "convert.py")],
    "mlx-lm": [sys.executable, "-m", "mlx_lm", "convert"],
}
MODES = [("affine", 8), ("affine", 4), ("mxfp4", 4), ("nvfp4", 4), ("mxfp8", 8)]


def write_checkpoint(name, directory):
    """A random transformers checkpoint of `name`'s shape with the GPT-NeoX tokenizer, written by
    a child process (kept for later runs): a child's peak RSS counts its parent's memory at the
    fork, so this process must stay small."""
    if not (directory / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--write", name, str(directory)], check=True)
    return directory


def _write(name, directory):
    import torch
    import transformers

    config_class, model_class, kwargs = SHAPES[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs))
    model.save_pretrained(directory)
    from mlx_mamba.loader import STATE_SPACES_TOKENIZER, locate_tokenizer

    shutil.copyfile(locate_tokenizer(STATE_SPACES_TOKENIZER) / "tokenizer.json",
                    directory / "tokenizer.json")


def timed_run(command):
    """(seconds, peak resident MiB) of one process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.read().decode()}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def compare_converters(source, work, flags, rounds):
    """{converter: (median seconds, peak MiB)}, or {converter: error line} where it fails."""
    results = {name: [] for name in CONVERTERS}
    for _ in range(rounds):
        for name, command in CONVERTERS.items():
            if isinstance(results[name], str):
                continue
            out = work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            try:
                results[name].append(timed_run([*command, "--hf-path", str(source),
                                                "--mlx-path", str(out), *flags]))
            except RuntimeError as e:
                results[name] = str(e).strip().splitlines()[-1]
            shutil.rmtree(out, ignore_errors=True)
    return {name: runs if isinstance(runs, str) else
            (statistics.median(s for s, _ in runs), max(m for _, m in runs))
            for name, runs in results.items()}


def describe(result, base):
    if isinstance(result, str):
        return f"failed: {result}"
    seconds, memory = result
    line = f"{seconds:6.2f} s, peak RSS {memory:5.0f} MiB"
    if not isinstance(base, str):
        line += f"  ({seconds / base[0]:.2f}x mlx-lm's time, {memory / base[1]:.2f}x its memory)"
    return line


def quantization_errors(source, work):
    """{(mode, bits): (relative RMS error of the quantized weights, bytes of the weights)}.

    Weights, not logits: a random 130m-shaped model (transformers' init) is chaotic, a relative
    weight perturbation of 1e-4 moves its logits by ~30%, so its logit error says nothing about
    a trained model's; tests/test_convert.py prints the logit error of a small, stable model.
    """
    import mlx.core as mx

    from mlx_mamba.convert import convert
    from mlx_mamba.quant_modes import quantization_params

    errors = {}
    for mode, bits in MODES:
        group_size = quantization_params(bits, None, mode)["group_size"]
        out = work / f"{mode}-{bits}"
        shutil.rmtree(out, ignore_errors=True)
        with contextlib.redirect_stdout(io.StringIO()):
            convert(source, out, quantize=True, q_bits=bits, q_mode=mode)
        stored = {k: v for f in out.glob("model*.safetensors") for k, v in mx.load(str(f)).items()}
        original = {k: v for f in source.glob("model*.safetensors")
                    for k, v in mx.load(str(f)).items()}
        squared = total = 0.0
        for name in stored:
            if name.endswith(".scales"):
                layer = name[: -len(".scales")]
                quantized = mx.dequantize(stored[f"{layer}.weight"], stored[name],
                                          stored.get(f"{layer}.biases"), group_size, bits, mode)
                weight = original[f"{layer}.weight"]
                squared += float(((quantized.astype(mx.float32) - weight) ** 2).sum())
                total += float((weight ** 2).sum())
        size = sum(f.stat().st_size for f in out.glob("model*.safetensors"))
        errors[(mode, bits)] = ((squared / total) ** 0.5, size)
        shutil.rmtree(out)
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=3, help="0: no timing")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mlx-mamba-convert-bench"))
    parser.add_argument("--errors", action="store_true",
                        help="also measure the weight error of every quantization mode")
    parser.add_argument("--write", nargs=2, metavar=("SHAPE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        return _write(args.write[0], Path(args.write[1]))

    import mlx.core as mx

    print(f"machine: {platform.system()} {platform.machine()}, {os.cpu_count()} cores; "
          f"MLX {mx.__version__}, {mx.default_device()} backend")
    args.work.mkdir(parents=True, exist_ok=True)
    sources = {name: write_checkpoint(name, args.work / name) for name in args.shapes}
    for name, source in sources.items():
        size = sum(f.stat().st_size for f in source.glob("*.safetensors")) / 2**20
        for flags in ([], ["-q"]) if args.rounds else ():
            results = compare_converters(source, args.work, flags, args.rounds)
            print(f"\n{name} ({size:.0f} MiB float32) {'4-bit' if flags else 'float32'}")
            for converter, result in results.items():
                print(f"  {converter:10s} {describe(result, results['mlx-lm'])}")
    for name, source in sources.items() if args.errors else ():  # last: it grows this process
        print(f"\n{name}: relative RMS error of the quantized weights, size of all weights")
        for (mode, bits), (error, nbytes) in quantization_errors(source, args.work).items():
            print(f"  {mode:6s} {bits}-bit  {error:.2e}  {nbytes / 2**20:5.0f} MiB")


if __name__ == "__main__":
    main()
