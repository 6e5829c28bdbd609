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


def mamba3_rotation_pairs(d_state, rope_fraction, is_mimo):
    """The (first, second) components each angle turns: (2i, 2i+1) for SISO, (i, i + N/2) for
    MIMO, for i below the angle count S (floor(N·rope_fraction), made even, halved)."""
    angles = int(d_state * rope_fraction) // 2
    if is_mimo:
        return [(i, i + d_state // 2) for i in range(angles)]
    return [(2 * i, 2 * i + 1) for i in range(angles)]


def mamba3(params, u, d_state, headdim, ngroups=1, rope_fraction=0.5, A_floor=1e-4,
           is_mimo=False, mimo_rank=1, is_outproj_norm=False, state=None, eps=1e-5,
           A_activation="heavy_tail"):
    """The official Mamba3 module's mathematics, one token, batch row and head at a time.
    A_activation "softplus": A = -softplus(dd_A), as the March 2026 release has it.

    params: the official parameter names -> float64 arrays; u (b, L, d_model).
    state: (angle (b, H, S), ssm (b, H, P, N), k (b, R, H, N), v (b, H, P)) or None.
    Returns (out (b, L, d_model), state after the last token).
    """
    batch, length, _ = u.shape
    N, P, G, R = d_state, headdim, ngroups, mimo_rank if is_mimo else 1
    H = params["D"].shape[0]
    pairs = mamba3_rotation_pairs(N, rope_fraction, is_mimo)
    sizes = [H * P, H * P, R * G * N, R * G * N, H, H, H, len(pairs)]
    z, x, B, C, dd_dt, dd_A, trap, angles = np.split(
        u @ params["in_proj.weight"].T, np.cumsum(sizes)[:-1], axis=-1)
    if state is None:
        state = (np.zeros((batch, H, len(pairs))), np.zeros((batch, H, P, N)),
                 np.zeros((batch, R, H, N)), np.zeros((batch, H, P)))
    angle, h, k_prev, x_prev = (a.copy() for a in state)
    mimo = {name: params[name] if is_mimo else np.ones((H, 1, P))
            for name in ("mimo_x", "mimo_z", "mimo_o")}

    def key(row, name, b, t, head, r):  # B or C after norm, bias and rotation
        raw = row[b, t].reshape(R, G, N)[r, head // (H // G)]
        vec = raw / np.sqrt(np.mean(raw ** 2) + eps) * params[f"{name}_norm.weight"]
        vec = vec + params[f"{name}_bias"][head, r]
        out = vec.copy()
        for i, (p, q) in enumerate(pairs):
            c, s = np.cos(angle[b, head, i]), np.sin(angle[b, head, i])
            out[p], out[q] = vec[p] * c - vec[q] * s, vec[p] * s + vec[q] * c
        return out

    out = np.zeros((batch, length, H * P))
    for t in range(length):
        for b in range(batch):
            for head in range(H):
                dt = softplus(dd_dt[b, t, head] + params["dt_bias"][head])
                a = dd_A[b, t, head]
                if A_activation == "softplus":
                    A = min(-softplus(a), -A_floor)
                else:
                    A = min(-(1 + a if a >= 0 else 1 / (1 - a)), -A_floor)
                lam = 1 / (1 + np.exp(-trap[b, t, head]))
                angle[b, head] = np.mod(angle[b, head] + np.pi * np.tanh(angles[b, t]) * dt,
                                        2 * np.pi)
                cols = slice(head * P, (head + 1) * P)
                ks = [key(B, "B", b, t, head, r) for r in range(R)]
                qs = [key(C, "C", b, t, head, r) for r in range(R)]
                vs = [x[b, t, cols] * mimo["mimo_x"][head, r] for r in range(R)]
                vs_prev = [x_prev[b, head] * mimo["mimo_x"][head, r] for r in range(R)]
                alpha = np.exp(A * dt)
                h[b, head] = (alpha * h[b, head]
                              + (1 - lam) * dt * alpha * sum(
                                  np.outer(vs_prev[r], k_prev[b, r, head]) for r in range(R))
                              + lam * dt * sum(np.outer(vs[r], ks[r]) for r in range(R)))
                for r in range(R):
                    y = h[b, head] @ qs[r] + params["D"][head] * vs[r]
                    if is_outproj_norm:
                        y = y / np.sqrt(np.mean(y ** 2) + eps) * params["norm.weight"][cols]
                    y = y * silu(z[b, t, cols] * mimo["mimo_z"][head, r])
                    out[b, t, cols] += y * mimo["mimo_o"][head, r]
                k_prev[b, :, head] = ks
                x_prev[b, head] = x[b, t, cols]
    return out @ params["out_proj.weight"].T, (angle, h, k_prev, x_prev)
