"""Plain float64 loops over time: the independent ground truth for the scan ops."""

import numpy as np


def softplus(x):
    return np.logaddexp(x, 0.0)


def silu(x):
    return x / (1.0 + np.exp(-x))


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   state=None):
    """Returns (y (B, L, D), last state (B, D, N)); every input a float64 numpy array."""
    batch, length, channels = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias
    if delta_softplus:
        delta = softplus(delta)
    h = np.zeros((batch, channels, A.shape[1])) if state is None else state.copy()
    y = np.zeros_like(u)
    for t in range(length):
        dt = delta[:, t, :, None]
        h = np.exp(dt * A) * h + dt * u[:, t, :, None] * B[:, t, None, :]
        y[:, t] = (h * C[:, t, None, :]).sum(-1)
    if D is not None:
        y = y + D * u
    if z is not None:
        y = y * silu(z)
    return y, h


def ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
        dt_limit=(0.0, np.inf), initial_states=None):
    """Returns (y (B, L, H, P), final states (B, H, P, N))."""
    batch, length, heads, head_dim = x.shape
    per_group = heads // B.shape[2]
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = softplus(dt)
    dt = np.clip(dt, *dt_limit)
    Bh = np.repeat(B, per_group, axis=2)  # (b, L, H, N)
    Ch = np.repeat(C, per_group, axis=2)
    h = (np.zeros((batch, heads, head_dim, B.shape[3])) if initial_states is None
         else initial_states.copy())
    y = np.zeros_like(x)
    for t in range(length):
        d = dt[:, t, :, None, None]
        h = np.exp(d * A[:, None, None]) * h + d * x[:, t, :, :, None] * Bh[:, t, :, None, :]
        y[:, t] = (h * Ch[:, t, :, None, :]).sum(-1)
    if D is not None:
        y = y + (D[:, None] if D.ndim == 1 else D) * x  # D (H,) or (H, P)
    if z is not None:
        y = y * silu(z)
    return y, h
