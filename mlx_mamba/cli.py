"""What the command lines share: help that shows every default, flag types that check their
values as they are parsed, and one `error: ...` line on stderr for every user error."""

import argparse
import math
import sys


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless it is required, an on/off switch, or its
    help already says what happens without it (the flags whose default is None)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.required or any(action.default is v for v in (None, False, argparse.SUPPRESS))
                or "default" in text):
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with HelpFormatter, whose errors are one `error: ...` line (exit 2)."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def fail(error):
    """Print `error` (a ValueError or OSError) as one line on stderr; an OSError naming a file
    reads "FILE: reason", without "[Errno N]"."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        message = f"{error.filename}: {error.strerror}"
    else:
        message = " ".join(str(error).split())
    print(f"error: {message}", file=sys.stderr, flush=True)


def run(command, errors, interrupted=""):
    """Runs a command line's work, `command()`, and returns its exit status: 0; 1 after one
    `error:` line for a user error (one of `errors`); 130 on Ctrl-C, saying `interrupted`."""
    try:
        command()
    except errors as e:
        fail(e)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted{'; ' if interrupted else ''}{interrupted}", file=sys.stderr)
        return 130
    return 0


def integer(minimum, maximum=None):
    """An argparse type: an integer in [minimum, maximum]."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"{text}: expected an integer {bound}")
        return value

    return parse


def number(minimum=None, *, above=None):
    """An argparse type: a finite float, >= minimum or > above when given."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text}: expected a finite number")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"{text}: expected a number >= {minimum}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"{text}: expected a number > {above}")
        return value

    return parse


def boolean(text):
    """An argparse type for `--flag [true|false]`: mlx-lm writes `--verbose True`."""
    value = text.lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")


def add_model_arguments(parser, tokenizer=True,
                        model_help="a converted, transformers or original directory, or a repo id"):
    """--model (and --tokenizer), as every command that loads a model takes them."""
    parser.add_argument("--model", required=True, help=model_help)
    if tokenizer:
        parser.add_argument(
            "--tokenizer", default=None,
            help="a directory, tokenizer.json file or repo id with the tokenizer, instead of the "
                 "model's own (default: the model's; state-spaces originals get "
                 "EleutherAI/gpt-neox-20b's from the hub)")


def add_switch(parser, flag, help):
    """A flag that is off by default, on when given bare or as `FLAG true`, off as `FLAG false`."""
    parser.add_argument(flag, type=boolean, nargs="?", const=True, default=False,
                        metavar="true|false", help=help)
