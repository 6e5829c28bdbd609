"""The text the tests read and the tokenizers made from it, all inside the repository
(tests/data/README.md): nothing outside a fresh clone is needed."""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SHAKESPEARE = Path(__file__).resolve().parent / "data" / "tinyshakespeare-excerpt.txt"
EOS = "<|endoftext|>"


def shakespeare_lines(count, skip=0):
    """`count` lines of more than 20 characters, after the first `skip` of them."""
    lines = [line for line in SHAKESPEARE.read_text().splitlines() if len(line) > 20]
    if skip + count > len(lines):
        raise ValueError(f"{SHAKESPEARE} has {len(lines)} long lines, not {skip + count}")
    return lines[skip:skip + count]


def write_byte_level_tokenizer(file, vocab_size=1000):
    """A tokenizer.json made as GPT-NeoX's is (byte-level BPE, <|endoftext|> = id 0), trained on
    the excerpt; the real one is 1.5 MB. Every byte has a token, so any text encodes, and a
    character outside ASCII spans several tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(shakespeare_lines(2000), trainer)
    tokenizer.save(str(file))
    return file
