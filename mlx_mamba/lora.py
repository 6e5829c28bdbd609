"""Fine-tune a Mamba or hybrid model with LoRA, DoRA, QLoRA (LoRA over a quantized model) or fully.

    python -m mlx_mamba.lora --model M --train --data DIR [--fine-tune-type lora|dora|full] ...
    python -m mlx_mamba.lora --model M --test --data DIR --adapter-path adapters

DIR holds train.jsonl and valid.jsonl (test.jsonl for --test); see tuner/datasets.py for the
record formats. Data-parallel over several processes or Macs when started by `mlx.launch`.
"""

import itertools
import math
import sys
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from . import cli
from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .files import check_directory_path
from .loader import find_tokenizer, load_model, load_tokenizer, resolve
from .sample import MAX_SEED
from .tuner.adapters import (ADAPTER_FILE, AdapterError, apply_adapters, check_adapter_config,
                             load_adapter_weights, load_adapters, save_adapters)
from .tuner.datasets import DataError, iterate_batches, load_split, warn
from .tuner.schedules import SCHEDULES, make_schedule
from .tuner.trainer import TrainingError, evaluate, train

OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}


def build_parser():
    parser = cli.ArgumentParser(prog="python -m mlx_mamba.lora",
                                description=__doc__.split("\n")[0])
    add = parser.add_argument
    cli.add_model_arguments(parser)
    add("--train", action="store_true",
        help="train adapters (or the model itself with --fine-tune-type full)")
    add("--test", action="store_true", help="report loss and perplexity on DIR/test.jsonl")
    add("--data", default="data", help="directory with train.jsonl, valid.jsonl, test.jsonl")
    add("--fine-tune-type", choices=["lora", "dora", "full"], default="lora",
        help="what trains")
    add("--num-layers", type=int, default=None,
        help="adapt the last N residual blocks; -1 for all (default: 16, or all when fewer)")
    add("--lora-rank", type=cli.integer(1), default=8, help="rank of the LoRA update")
    add("--lora-scale", type=cli.number(), default=20.0, help="scale of the LoRA update")
    add("--lora-dropout", type=cli.number(0.0), default=0.0,
        help="dropout on the LoRA input, in [0, 1)")
    add("--train-ssm-params", action="store_true",
        help="also train A_log, D, the dt bias and the conv of the adapted blocks' Mamba mixers")
    add("--iters", type=cli.integer(1), default=1000, help="optimizer steps")
    add("--batch-size", type=cli.integer(1), default=4,
        help="sequences per batch, over all processes")
    add("--grad-accumulation-steps", type=cli.integer(1), default=1,
        help="batches per optimizer step")
    add("--learning-rate", type=cli.number(above=0.0), default=1e-5, help="peak learning rate")
    add("--lr-schedule", choices=SCHEDULES, default="constant", help="learning-rate schedule")
    add("--warmup-steps", type=cli.integer(0), default=0, help="linear warmup steps")
    add("--min-learning-rate", type=cli.number(0.0), default=0.0,
        help="end of a cosine or linear decay")
    add("--optimizer", choices=sorted(OPTIMIZERS), default="adam", help="optimizer")
    add("--max-seq-length", type=cli.integer(2), default=2048,
        help="longer sequences are truncated")
    add("--grad-checkpoint", action="store_true",
        help="recompute each block in the backward pass: less memory, more time")
    add("--steps-per-report", type=cli.integer(1), default=10, help="steps between loss reports")
    add("--steps-per-eval", type=cli.integer(1), default=200, help="steps between validations")
    add("--val-batches", type=cli.integer(-1), default=25,
        help="validation batches; -1 for all, 0 for none")
    add("--test-batches", type=int, default=500, help="test batches; -1 for all")
    add("--save-every", type=cli.integer(0), default=100,
        help="checkpoint every N steps; 0 only at the end")
    add("--adapter-path", default="adapters", help="where adapters are saved and read")
    add("--resume-adapter-file", help="start from these adapter weights (default: fresh ones)")
    add("--seed", type=cli.integer(0, MAX_SEED), default=0,
        help="seed of the initialization, dropout and data order")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.train or args.test):
        parser.error("nothing to do: pass --train, --test or both")
    if args.lora_dropout >= 1.0:
        parser.error(f"--lora-dropout {args.lora_dropout}: expected a probability in [0, 1)")
    if args.lora_dropout and args.grad_checkpoint:
        parser.error("--lora-dropout with --grad-checkpoint: the recomputed backward pass would "
                     "draw other dropout masks than the forward pass; use one of them")
    if args.train and args.warmup_steps >= args.iters:
        parser.error(f"--warmup-steps {args.warmup_steps}: expected 0 <= N < --iters "
                     f"({args.iters})")
    if args.min_learning_rate > args.learning_rate:
        parser.error(f"--min-learning-rate {args.min_learning_rate}: expected at most "
                     f"--learning-rate ({args.learning_rate})")
    if args.test_batches == 0 or args.test_batches < -1:
        parser.error(f"--test-batches {args.test_batches}: expected N >= 1, or -1 for all")
    if args.num_layers is not None and args.num_layers != -1 and args.num_layers < 1:
        parser.error(f"--num-layers {args.num_layers}: expected a positive number or -1 for all")
    return parser, args


def adapter_config(args, n_layers):
    """The adapter_config.json of a run: what apply_adapters reads, and every flag as a record."""
    num_layers = args.num_layers if args.num_layers is not None else min(16, n_layers)
    return dict(vars(args), num_layers=num_layers, lora_parameters={
        "rank": args.lora_rank, "scale": args.lora_scale, "dropout": args.lora_dropout})


def batches(examples, args, limit=-1, loop=False):
    """Training batches for ever when `loop`, else a list of the first `limit` (-1: all)."""
    batch_iter = iterate_batches(examples, args.batch_size, args.seed, loop)
    if loop:
        return batch_iter
    return list(itertools.islice(batch_iter, None if limit == -1 else limit))


def run(args, world):
    rank0 = world.rank() == 0
    log = print if rank0 else (lambda *a, **k: None)
    data_warn = warn if rank0 else (lambda message: None)
    mx.random.seed(args.seed)
    path = resolve(args.model)
    model_config = load_config(path)
    if args.train:  # checked now, not after loading the data or training
        config = adapter_config(args, model_config.n_layer)
        check_adapter_config(config, model_config.n_layer)
        check_directory_path(args.adapter_path)
    if world.size() > 1:
        log(f"Data-parallel training on {world.size()} processes")
    tokenizer = load_tokenizer(find_tokenizer(path, args.tokenizer), model_config.eos_token_id)
    if tokenizer is None:
        raise DataError(f"{args.tokenizer or path}: no tokenizer (tokenizer.json or "
                        "tokenizer_config.json) to tokenize the data with; pass --tokenizer")
    log("Loading datasets", flush=True)
    splits = (["train", "valid"] if args.train else []) + (["test"] if args.test else [])
    data = {name: load_split(args.data, name, tokenizer, args.max_seq_length,
                             model_config.vocab_size, data_warn)
            for name in splits}
    log("Loading pretrained model", flush=True)
    model = load_model(path)

    if args.train:
        apply_adapters(model, config)
        if args.resume_adapter_file:
            log(f"Loading fine-tuned weights from {args.resume_adapter_file}")
            load_adapter_weights(model, args.resume_adapter_file)
        trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        total = sum(v.size for _, v in tree_flatten(model.parameters()))
        log(f"Trainable parameters: {100 * trainable / total:.3f}% "
            f"({trainable / 1e6:.3f}M/{total / 1e6:.3f}M)")
        schedule = make_schedule(args.lr_schedule, args.learning_rate, args.iters,
                                 args.warmup_steps, args.min_learning_rate)
        optimizer = OPTIMIZERS[args.optimizer](learning_rate=schedule)
        adapter_path = Path(args.adapter_path)

        def save(iteration):
            files = save_adapters(model, adapter_path, config, iteration)
            log(f"Iter {iteration}: Saved adapter weights to {' and '.join(map(str, files))}.")

        log("Training", flush=True)
        train(model, optimizer, batches(data["train"], args, loop=True), iters=args.iters,
              val_batches=batches(data["valid"], args, args.val_batches),
              steps_per_eval=args.steps_per_eval, steps_per_report=args.steps_per_report,
              grad_accumulation_steps=args.grad_accumulation_steps, save_every=args.save_every,
              save=save, grad_checkpoint=args.grad_checkpoint, world=world, log=log)
        if rank0:
            save_adapters(model, adapter_path, config)
            log(f"Saved final weights to {adapter_path / ADAPTER_FILE}.")
    else:
        log(f"Loading adapters from {args.adapter_path}")
        load_adapters(model, args.adapter_path)

    if args.test:
        log("Testing", flush=True)
        loss = evaluate(model, batches(data["test"], args, args.test_batches), world)
        log(f"Test loss {loss:.3f}, Test ppl {math.exp(loss):.3f}.")


def main(argv=None):
    parser, args = parse_args(argv)
    world = mx.distributed.init()
    if args.batch_size % world.size():
        parser.error(f"--batch-size {args.batch_size} does not split over {world.size()} "
                     "processes: use a multiple of the process count")
    return cli.run(lambda: run(args, world),
                   (AdapterError, CheckpointError, ConfigError, DataError, TrainingError, OSError),
                   interrupted=f"the last checkpoint in {args.adapter_path} is intact")


if __name__ == "__main__":
    sys.exit(main())
