"""Logits equal transformers' on tiny checkpoints of every flavour, loaded through `mlx_mamba.load`."""

import mlx.core as mx
import numpy as np
import pytest
import torch

import mlx_mamba
from checkpoints import FLAVOURS
from comparing import assert_close

TOLERANCE = 2e-4  # max |ours - transformers| relative to the logits' scale, float32


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_logits_match_transformers(checkpoint, flavour, tokenizer_file):
    directory, reference = checkpoint(flavour)
    # Originals ship no tokenizer, and the hub is out of reach: a local one is passed.
    model, _ = mlx_mamba.load(directory, tokenizer=tokenizer_file)
    ids = np.random.default_rng(1).integers(0, 100, size=(2, 37))  # 37: not a multiple of chunks
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    logits = model(mx.array(ids))
    assert logits.shape == expected.shape
    error = assert_close(logits, expected, TOLERANCE, name=f"{flavour}'s logits")
    print(f"{flavour}: relative logit error {error:.2e}")
