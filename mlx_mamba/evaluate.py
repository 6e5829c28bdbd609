"""Evaluate a model on lm-evaluation-harness tasks.

    python -m mlx_mamba.evaluate --model M --tasks T [T ...] [--num-fewshot K] [--limit N]
        [--batch-size B] [--output-dir DIR] [--seed S] [--apply-chat-template]

The flags are mlx-lm's `mlx_lm.evaluate` where they mean the same (--num-shots is a second name
of --num-fewshot). The model is lm_eval_model.MambaLM; the results are printed as lm-eval's
table and written as JSON to --output-dir. Needs the `eval` extra: pip install "mlx-mamba[eval]".
"""

import json
import re
import sys
from pathlib import Path

import mlx.core as mx

from . import cli
from .checkpoint import CheckpointError
from .config import ConfigError
from .decoder import GenerationError
from .sample import MAX_SEED
from .scoring import ScoringError

INSTALL = 'pip install "mlx-mamba[eval]"'


class EvaluationError(ValueError):
    """A task, model or setting that the evaluation cannot use; the message says which."""


def parser():
    p = cli.ArgumentParser(prog="python -m mlx_mamba.evaluate",
                           description="Evaluate a model on lm-evaluation-harness tasks.")
    cli.add_model_arguments(p)
    p.add_argument("--tasks", nargs="+", required=True,
                   help="lm-eval task or group names (space or comma separated)")
    p.add_argument("--num-fewshot", "--num-shots", dest="num_fewshot", type=cli.integer(0),
                   help="Examples before each question (default: each task's own)")
    p.add_argument("--limit", type=cli.integer(1),
                   help="Evaluate only the first N examples of each task (default: all)")
    p.add_argument("--batch-size", type=cli.integer(1), default=8,
                   help="Sequences scored at once, and contexts prefilled at once")
    p.add_argument("--max-length", type=cli.integer(1), default=2048,
                   help="Tokens the model reads before each scored token (lm-eval's window)")
    p.add_argument("--max-tokens", type=cli.integer(1),
                   help="Generated tokens per request (default: each task's own, else 256)")
    p.add_argument("--output-dir", default=".", help="Where the results JSON is written")
    p.add_argument("--seed", type=cli.integer(0, MAX_SEED), default=123,
                   help="Seed of the few-shot choice and of any sampling")
    cli.add_switch(p, "--apply-chat-template",
                   "Put the prompts through the tokenizer's chat template")
    cli.add_switch(p, "--fewshot-as-multiturn",
                   "With --apply-chat-template: each few-shot example is a turn of its own")
    p.add_argument("--include-path", help="A directory of task YAML files to add to lm-eval's")
    cli.add_switch(p, "--no-context-reuse",
                   "Prefill every request's context, even one shared with others (to measure)")
    return p


def task_names(tasks, include_path=None):
    """lm-eval's TaskManager and the task names of `tasks` (names, comma-separated or not);
    EvaluationError naming the unknown ones."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise EvaluationError(f"--include-path {include_path}: no such directory")
    manager = TaskManager(include_path=include_path)
    names = [name for text in tasks for name in re.split(r"[,\s]+", text) if name]
    unknown = [name for name in names if not manager.match_tasks([name])]
    if unknown or not names:
        raise EvaluationError(f"unknown task {', '.join(unknown) or repr(' '.join(tasks))}: "
                              "`lm-eval ls tasks` lists the tasks")
    return manager, names


def output_file(directory, model, names, num_fewshot):
    """The results file: its name says the model, the shots and the tasks."""
    parts = ["eval", Path(model).name or model.replace("/", "_")]
    if num_fewshot is not None:
        parts.append(f"{num_fewshot:02d}shot")
    return Path(directory) / ("_".join(parts + names) + ".json")


def evaluate(args):
    try:
        import lm_eval
        from lm_eval.utils import handle_non_serializable, make_table

        from .lm_eval_model import MambaLM
    except ImportError as e:
        raise EvaluationError(f"lm-eval is not installed ({e}): {INSTALL}") from None
    manager, names = task_names(args.tasks, args.include_path)
    if args.fewshot_as_multiturn and not args.apply_chat_template:
        raise EvaluationError("--fewshot-as-multiturn needs --apply-chat-template")
    out = output_file(args.output_dir, args.model, names, args.num_fewshot)
    out.parent.mkdir(parents=True, exist_ok=True)
    mx.random.seed(args.seed)
    lm = MambaLM(args.model, args.tokenizer, batch_size=args.batch_size,
                 max_length=args.max_length, max_tokens=args.max_tokens,
                 reuse_context=not args.no_context_reuse, seed=args.seed)
    if args.apply_chat_template and not getattr(lm.tokenizer, "chat_template", None):
        raise EvaluationError(f"{args.model}: the tokenizer has no chat template")
    results = lm_eval.simple_evaluate(
        model=lm, tasks=names, num_fewshot=args.num_fewshot, limit=args.limit,
        task_manager=manager, apply_chat_template=args.apply_chat_template,
        fewshot_as_multiturn=args.fewshot_as_multiturn, random_seed=args.seed,
        numpy_random_seed=args.seed, torch_random_seed=args.seed,
        fewshot_random_seed=args.seed, log_samples=False)
    print(make_table(results))
    kept = {k: results[k] for k in ("results", "groups", "n-shot", "versions", "configs")
            if k in results}
    out.write_text(json.dumps(kept, indent=2, default=handle_non_serializable))
    print(f"Results written to {out}")


def main(argv=None):
    args = parser().parse_args(argv)
    errors = (EvaluationError, ScoringError, GenerationError, ConfigError, CheckpointError,
              OSError)
    status = cli.run(lambda: evaluate(args), errors)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
