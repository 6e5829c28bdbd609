"""What the generating command lines (generate, chat, server) share: mlx-lm's sampling flags,
the speculative-decoding flags, and the model they load, sharded under `mlx.launch`."""

from . import cli
from .checkpoint import CheckpointError
from .config import ConfigError
from .decoder import GenerationError
from .sample import MAX_SEED
from .speculative import MAX_DRAFT_TOKENS


def add_sampling_arguments(parser):
    """mlx-lm's sampling flags, shared by the generate and chat commands."""
    add = parser.add_argument
    add("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    add("--top-p", type=float, default=1.0, help="keep the most likely tokens of this mass")
    add("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 keeps every token")
    add("--min-p", type=float, default=0.0,
        help="keep tokens at least this fraction as likely as the most likely one")
    add("--repetition-penalty", type=float, default=None,
        help="divide the logits of tokens already seen by this (default: none)")
    add("--seed", type=cli.integer(0, MAX_SEED), default=None,
        help="seed of the sampling (default: unseeded, a different draw each run)")


def add_draft_arguments(parser):
    """The speculative-decoding flags, shared by the generate and server commands."""
    add = parser.add_argument
    add("--draft-model", default=None,
        help="decode speculatively with this smaller model (same tokenizer) proposing tokens "
             "(default: none); the text stays the model's own")
    add("--num-draft-tokens", type=cli.integer(1, MAX_DRAFT_TOKENS), default=3,
        help="tokens proposed per round by --draft-model or --prompt-lookup")
    add("--prompt-lookup", metavar="N", type=cli.integer(1), default=None,
        help="decode speculatively without a draft model: propose what followed the latest "
             "earlier match of the context's last N (or fewer) tokens (default: off)")


def load_draft(args, tokenizer):
    """The --draft-model, checked to share the model's token ids."""
    from .loader import load
    from .speculative import check_same_tokenizer

    try:
        draft, draft_tokenizer = load(args.draft_model)
    except OSError as e:
        raise GenerationError(e if args.draft_model in str(e) else f"{args.draft_model}: {e}") \
            from None
    if draft_tokenizer is not None:
        check_same_tokenizer(tokenizer, draft_tokenizer)
    return draft


def load_model(args, world=None):
    """The model and tokenizer; tensor parallel (or pipeline) over `world` when it has several
    processes (every process fails, with its own error or one saying that another failed, or none
    does). Without a world this process loads the whole model."""
    from .loader import load
    from .sharded import agree, sharded_load

    processes = 1 if world is None else world.size()
    model = tokenizer = error = None
    try:
        if processes == 1:
            model, tokenizer = load(args.model, tokenizer=args.tokenizer)
        elif args.pipeline:
            model, tokenizer = sharded_load(args.model, pipeline_group=world,
                                            tokenizer=args.tokenizer)
        else:
            model, tokenizer = sharded_load(args.model, world, tokenizer=args.tokenizer)
    except OSError as e:  # hub errors do not always name the repo
        named = args.model in str(e) or (args.tokenizer and args.tokenizer in str(e))
        error = GenerationError(e if named else f"{args.model}: {e}")
    except (ConfigError, CheckpointError, ValueError) as e:  # ShardingError is a ValueError
        error = e
    if processes > 1:
        agree(world, error)
    elif error is not None:
        raise error
    if tokenizer is None:
        raise GenerationError(f"{args.tokenizer or args.model}: no tokenizer that transformers "
                              "reads (tokenizer.json or tokenizer_config.json): pass --tokenizer "
                              "with a directory, a tokenizer.json file or a repo id")
    return model, tokenizer
