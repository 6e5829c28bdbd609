"""Fine-tuning speed and memory: iterations/s, tokens/s and peak memory of LoRA (or DoRA, full)
training steps on random weights of a given shape, over Shakespeare in the GPT-NeoX tokenizer.

The numbers are the trainer's own progress lines (`Iter N: Train loss ..., It/sec, Tokens/sec,
Peak mem`), so they measure exactly what `python -m mlx_mamba.lora` does per step. Peak memory
is mx.get_peak_memory() after the model is built, so it includes the weights.

    python benchmarks/lora.py                                 # small shapes, CPU-friendly
    python benchmarks/lora.py --shape mamba-130m --seq-length 512 --batch-size 4 --grad-checkpoint
"""

import argparse
import math
import platform
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from mlx_mamba.config import ModelConfig
from mlx_mamba.models import Model
from mlx_mamba.tuner import apply_adapters, iterate_batches, train
from mlx_mamba.tuner.datasets import Example

SHAPES = {
    "small": dict(arch="mamba1", d_model=256, n_layer=8, d_state=16),
    "small2": dict(arch="mamba2", d_model=256, n_layer=8, d_state=64, head_dim=64),
    "mamba-130m": dict(arch="mamba1", d_model=768, n_layer=24, d_state=16),
    "mamba2-130m": dict(arch="mamba2", d_model=768, n_layer=24, d_state=128, head_dim=64),
}
VOCAB = 50280
TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "tinyshakespeare-excerpt.txt"


def make_model(shape):
    fields = dict(SHAPES[shape])
    if fields["arch"] == "mamba1":
        fields["dt_rank"] = math.ceil(fields["d_model"] / 16)
    model = Model(ModelConfig(vocab_size=VOCAB, **fields))
    mx.eval(model.parameters())
    return model


def shakespeare_examples(length, count):
    """`count` sequences of `length` tokens, cut from the corpus."""
    from transformers import PreTrainedTokenizerFast

    from mlx_mamba.loader import STATE_SPACES_TOKENIZER, locate_tokenizer

    file = locate_tokenizer(STATE_SPACES_TOKENIZER) / "tokenizer.json"
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(file))
    text = TEXT.read_text()[: 6 * length * count]
    tokens = np.array(tokenizer.encode(text), np.int32)
    if len(tokens) < length * count:
        raise SystemExit(f"the corpus holds only {len(tokens)} tokens")
    trained = np.ones(length, bool)
    trained[0] = False
    return [Example(tokens[i * length:(i + 1) * length], trained) for i in range(count)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--fine-tune-type", choices=["lora", "dora", "full"], default="lora")
    parser.add_argument("--num-layers", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--grad-checkpoint", action="store_true")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args()

    print(f"{platform.platform()}, MLX {mx.__version__}, device {mx.default_device()}")
    print(f"{args.shape}, {args.fine_tune_type}, batch {args.batch_size} x {args.seq_length} "
          f"tokens, {args.dtype}, grad checkpoint {args.grad_checkpoint}")
    mx.random.seed(0)
    model = make_model(args.shape)
    model.set_dtype(getattr(mx, args.dtype))
    apply_adapters(model, {"fine_tune_type": args.fine_tune_type, "num_layers": args.num_layers})
    examples = shakespeare_examples(args.seq_length + 1, 4 * args.batch_size)
    mx.reset_peak_memory()
    # The first step is warm-up (allocation, any lazy initialisation); the next ones are reported.
    batches = iterate_batches(examples, args.batch_size)
    train(model, optim.Adam(learning_rate=1e-5), batches, iters=1, steps_per_report=1,
          grad_checkpoint=args.grad_checkpoint, log=lambda *a, **k: None)
    train(model, optim.Adam(learning_rate=1e-5), batches, iters=args.iters,
          steps_per_report=args.iters)


if __name__ == "__main__":
    main()
