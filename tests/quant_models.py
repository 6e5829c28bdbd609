"""Deeper tiny checkpoints for the quantization tests: eight layers, every projection a multiple
of 64 wide, so that per-layer bit choices show and no layer is left float for its width."""

import pytest

from checkpoints import FLAVOURS, VOCAB, write_checkpoint

DEEP = {
    "mamba2_deep": ("Mamba2ForCausalLM", dict(
        hidden_size=64, num_hidden_layers=8, state_size=16, expand=2, conv_kernel=4, num_heads=8,
        head_dim=16, chunk_size=8, n_groups=1, vocab_size=VOCAB, tie_word_embeddings=True), "hf"),
    "mamba1_deep": ("MambaForCausalLM", dict(
        hidden_size=64, num_hidden_layers=8, state_size=16, expand=2, conv_kernel=4,
        time_step_rank=64, vocab_size=VOCAB, tie_word_embeddings=False), "hf"),
}


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """{flavour: checkpoint directory} of DEEP."""
    with pytest.MonkeyPatch.context() as patch:
        made = {}
        for name, flavour in DEEP.items():
            patch.setitem(FLAVOURS, name, flavour)
            made[name] = tmp_path_factory.mktemp(name)
            write_checkpoint(name, made[name])
    return made
