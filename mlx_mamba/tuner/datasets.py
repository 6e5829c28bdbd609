"""Training data: jsonl files of {"text"}, {"prompt", "completion"} or {"messages"} records,
tokenized, and batches of them.

Which tokens the loss counts: every token of a "text"; the completion (and the end-of-sequence
token after it) of a prompt/completion pair; the assistant turns of "messages", rendered with the
tokenizer's chat template (an assistant turn is the tokens that the template adds after the
generation prompt, so the role header is not trained on).

Batches are padded on the right. A Mamba model is causal: the output at position t depends only
on tokens up to t, so right-padding never reaches the logits of a real token, and the padded
positions carry loss weight 0. (The final state does see the padding; training never uses it.)
"""

import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..token_ids import TokenIdError, check_token_ids


class DataError(ValueError):
    """Unusable training data; the message names the file (and line)."""


class Example(NamedTuple):
    tokens: np.ndarray  # (L,) int32
    trained: np.ndarray  # (L,) bool: token i is a target whose loss counts; trained[0] is False


class Batch(NamedTuple):
    inputs: np.ndarray  # (B, T) int32, padded on the right
    targets: np.ndarray  # (B, T) int32: inputs shifted by one
    weights: np.ndarray  # (B, T) float32: 1 where the loss counts, 0 on prompts and padding
    lengths: np.ndarray  # (B,) int32: real input tokens per row

    def rows(self, start, stop):
        return Batch(*(field[start:stop] for field in self))


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_split(directory, name, tokenizer, max_seq_length, vocab_size=None, log=warn):
    """The examples of `directory/name.jsonl`, each at most `max_seq_length` tokens."""
    directory = Path(directory)
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
        raise DataError(f"{directory}: {problem}; the data directory holds train.jsonl, "
                        "valid.jsonl and test.jsonl")
    file = directory / f"{name}.jsonl"
    if not file.is_file():
        raise DataError(f"{file}: not found (the data directory needs {name}.jsonl)")
    examples, longest, truncated, emptied = [], 0, 0, 0
    for line_number, record in read_jsonl(file):
        where = f"{file}:{line_number}"
        tokens, trained = tokenize(record, tokenizer, where)
        if vocab_size is not None:
            try:
                tokens = check_token_ids(tokens, vocab_size)
            except TokenIdError as e:
                raise DataError(f"{where}: {e}: is the tokenizer the model's own?") from None
        if len(tokens) > max_seq_length:
            truncated += 1
            longest = max(longest, len(tokens))
            tokens, trained = tokens[:max_seq_length], trained[:max_seq_length]
            if not any(trained):
                emptied += 1
                continue
        examples.append(Example(np.array(tokens, np.int32), np.array(trained, bool)))
    if truncated:
        log(f"{file}: {truncated} sequence(s) longer than --max-seq-length {max_seq_length} "
            f"(longest {longest} tokens) were truncated"
            + (f"; {emptied} left nothing to train on and were dropped" if emptied else ""))
    if not examples:
        raise DataError(f"{file}: no examples" + (" left after truncation" if emptied else ""))
    return examples


def read_jsonl(file):
    """(line number, record) for every non-blank line of a jsonl file."""
    with open(file, "rb") as f:
        for line_number, line in enumerate(f, 1):
            try:
                line = line.decode("utf-8-sig" if line_number == 1 else "utf-8")  # BOM or not
            except UnicodeDecodeError as e:
                raise DataError(f"{file}:{line_number}: not UTF-8 text (byte {e.start + 1} of the "
                                "line): jsonl data is UTF-8 JSON, one object per line") from None
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}:{line_number}: not valid JSON ({e.msg}, column "
                                f"{e.colno})") from None
            except RecursionError:
                raise DataError(f"{file}:{line_number}: JSON nested too deeply") from None


def tokenize(record, tokenizer, where):
    """(tokens, trained) of one record: lists of ids and of booleans, the same length."""
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        tokens = _with_eos(tokenizer.encode(record["text"]), tokenizer)
        trained = [False] + [True] * (len(tokens) - 1)
    elif isinstance(record, dict) and isinstance(record.get("prompt"), str) \
            and isinstance(record.get("completion"), str):
        prompt = tokenizer.encode(record["prompt"])
        completion = _with_eos(tokenizer.encode(record["completion"], add_special_tokens=False),
                               tokenizer)
        tokens, trained = prompt + completion, [False] * len(prompt) + [True] * len(completion)
    elif isinstance(record, dict) and _is_conversation(record.get("messages")):
        tokens, trained = _chat(record["messages"], tokenizer, where)
    else:
        raise DataError(f'{where}: expected an object with "text", "prompt" and "completion", or '
                        f'"messages" (a list of {{"role", "content"}}) with string values')
    if len(tokens) < 2 or not any(trained[1:]):
        raise DataError(f"{where}: nothing to train on (the record tokenizes to {len(tokens)} "
                        "token(s) with no target for the loss)")
    return tokens, trained


def _with_eos(tokens, tokenizer):
    eos = tokenizer.eos_token_id
    return tokens + [eos] if eos is not None and tokens[-1:] != [eos] else tokens


def _is_conversation(messages):
    return isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)


def _chat(messages, tokenizer, where):
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f'{where}: "messages" need a tokenizer with a chat template; this one has '
                        'none (use "text" or "prompt"/"completion" records)')

    def render(conversation, prompt=False):
        if not conversation:
            return []
        try:
            return list(tokenizer.apply_chat_template(
                conversation, tokenize=True, add_generation_prompt=prompt, return_dict=False))
        except Exception as e:  # the template's own checks (roles must alternate, ...)
            raise DataError(f"{where}: the chat template rejects these messages ({e})") from None

    tokens = render(messages)
    trained = [False] * len(tokens)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], prompt=True), render(messages[:i + 1])
        start, end = len(before), len(through)
        if tokens[:start] != before or tokens[:end] != through:
            raise DataError(f"{where}: the chat template does not render the conversation turn by "
                            "turn, so the assistant turns cannot be found")
        trained[start:end] = [True] * (end - start)
    return tokens, trained


def make_batch(examples, size):
    """One right-padded batch of `size` rows; rows beyond `examples` are empty (weight 0)."""
    length = max(len(e.tokens) for e in examples) - 1
    batch = Batch(np.zeros((size, length), np.int32), np.zeros((size, length), np.int32),
                  np.zeros((size, length), np.float32), np.zeros(size, np.int32))
    for row, example in enumerate(examples):
        n = len(example.tokens) - 1
        batch.inputs[row, :n] = example.tokens[:-1]
        batch.targets[row, :n] = example.tokens[1:]
        batch.weights[row, :n] = example.trained[1:]
        batch.lengths[row] = n
    return batch


def iterate_batches(examples, batch_size, seed=0, loop=True):
    """Batches of examples of similar length (less padding), in shuffled order each epoch, for
    ever when `loop`. The last batch of an epoch is filled up with empty rows. Every process
    with the same seed sees the same batches: a distributed rank takes its rows of each."""
    if not examples:
        raise DataError("no examples to make batches of")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise DataError(f"batch size {batch_size!r}: expected a positive integer")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].tokens))
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng = np.random.default_rng(seed)
    while True:
        for g in (rng.permutation(len(groups)) if loop else range(len(groups))):
            yield make_batch([examples[i] for i in groups[g]], batch_size)
        if not loop:
            return
