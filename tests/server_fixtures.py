"""A tiny character-level tokenizer over the tiny checkpoints' 100 ids, with a ChatML chat
template, written on the fly (the checkpoints have none)."""

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<unk>", "<|im_end|>", "<|im_start|>"]
# Every id has a text that encodes back to it (so that replies in a conversation's history give
# back the tokens generated): no "<", ">" or "|", which could spell a special token.
CHARACTERS = (" \n" + string.ascii_letters + string.digits
              + "".join(c for c in string.punctuation if c not in "<>|") + "àáâä")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


REPLACEABLE = "àáâä^`~"  # characters that markers may take the places of


def write_tokenizer(directory, chat_template=CHAT_TEMPLATE, markers=()):
    """tokenizer.json and tokenizer_config.json in `directory`: ids < 100, EOS <|im_end|>.
    markers: up to 7 texts (tool-call tags) that become ordinary added tokens, in the places of
    characters that tests do not need (REPLACEABLE)."""
    assert len(markers) <= len(REPLACEABLE)
    characters = [c for c in CHARACTERS if c not in REPLACEABLE[:len(markers)]]
    vocab = {token: i for i, token in enumerate(SPECIAL + list(characters))}
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL)
    tokenizer.add_tokens(list(markers))
    assert tokenizer.get_vocab_size() == 100
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<|im_end|>",
                            chat_template=chat_template).save_pretrained(directory)
