"""Fine-tuning test material: a model directory with a tokenizer that fits the tiny vocabulary,
and jsonl data directories cut from the repository's Shakespeare excerpt."""

import json
import shutil

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from corpus import shakespeare_lines

# A chat template that renders turn by turn, so assistant turns can be located.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_tokenizer(directory, vocab_size=100):
    """A BPE tokenizer of the tiny checkpoints' vocabulary size, with eos and a chat template."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, limit_alphabet=60,
                                  special_tokens=["<|endoftext|>", "<unk>"])
    tokenizer.train_from_iterator(shakespeare_lines(2000), trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}))


def model_with_tokenizer(checkpoint_dir, directory):
    """A copy of a tiny checkpoint directory with the tiny tokenizer added."""
    shutil.copytree(checkpoint_dir, directory)
    write_tokenizer(directory)
    return directory


def write_data(directory, train=32, valid=8, test=8, kind="text"):
    """train/valid/test.jsonl of Shakespeare lines as "text" or "prompt"/"completion" records."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = iter(shakespeare_lines(train + valid + test, skip=2000))  # not the tokenizer's
    for name, count in (("train", train), ("valid", valid), ("test", test)):
        records = []
        for _ in range(count):
            line = next(lines)
            if kind == "text":
                records.append({"text": line})
            else:
                records.append({"prompt": line[:10], "completion": line[10:]})
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory
