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


def write_tokenizer(directory):
    """tokenizer.json and tokenizer_config.json in `directory`: ids < 100, EOS <|im_end|>."""
    vocab = {token: i for i, token in enumerate(SPECIAL + list(CHARACTERS))}
    assert len(vocab) == 100
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<|im_end|>",
                            chat_template=CHAT_TEMPLATE).save_pretrained(directory)
