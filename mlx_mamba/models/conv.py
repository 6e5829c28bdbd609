"""The causal depthwise convolution of both mixers, continuing from a cached window."""

import mlx.core as mx


def causal_conv1d(x, weight, bias=None, window=None):
    """x (B, T, C); weight (C, K, 1) (MLX layout); bias (C,); window (B, K-1, C) earlier inputs.

    Returns (y (B, T, C), new window (B, K-1, C)). Without a window the sequence starts from zeros.
    The kernel is applied as K shifted multiply-adds: K is tiny (4), and on MLX's CPU backend this
    took a third of the time of a grouped convolution with one channel per group.
    """
    width = weight.shape[1]
    if window is None:
        window = mx.zeros((x.shape[0], width - 1, x.shape[2]), dtype=x.dtype)
    padded = mx.concatenate([window.astype(x.dtype), x], axis=1)  # (B, T+K-1, C)
    length = x.shape[1]
    taps = weight[:, :, 0].T  # (K, C)
    y = padded[:, :length] * taps[0]
    for k in range(1, width):
        y = y + padded[:, k:k + length] * taps[k]
    if bias is not None:
        y = y + bias
    return y, padded[:, length:]


def apply_mask(x, mask):
    """x (B, T, C) with the positions where mask (B, T) is 0 set to zero; x itself without a mask."""
    return x if mask is None else x * mask[..., None].astype(x.dtype)
