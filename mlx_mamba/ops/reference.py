"""Pure-MLX scans: the path that runs everywhere, and the ground truth the kernels are tested against.

Both scans are parallel over the sequence: no Python loop runs once per token. The state
recurrence h_t = a_t h_{t-1} + b_t is solved blockwise (see `linear_scan`), and Mamba2 uses the
chunked state-space-duality form, where each chunk is a masked matrix product.
"""

import functools
import math

import mlx.core as mx
import mlx.nn as nn

from .recompute import segmented

# Positions per block in `linear_scan`: the scan runs a short loop over a block's positions for
# every block at once, then recurses over the blocks' end states.
SCAN_BLOCK = 8

# Tokens per segment of the Mamba1 scan (see `selective_scan`).
SCAN_SEGMENT = 64

LOG2_E = 1.4426950408889634

# Longest SSD chunk of this path. The work within a chunk grows with its length, the work between
# chunks does not; on MLX's CPU backend chunks of 64 cost about half of the usual 256, and the
# chunk length never changes the result.
MAX_SSD_CHUNK = 64

# Tokens per segment of the SSD scan (see `ssd`): the backward pass holds one segment's chunk
# states and scores at a time.
SSD_SEGMENT = 256


def exp(x):
    """e^x, computed as 2^(x log2 e): the same to float32 precision, and about twice as fast as
    mx.exp on MLX's CPU backend, where the scans spend much of their time in exponentials."""
    return mx.power(2.0, x * LOG2_E)


def discretize_dt(dt, bias=None, softplus=False, limit=(0.0, math.inf)):
    """The step size Δ in float32: dt (+ bias), softplus, clamped to `limit`."""
    dt = dt.astype(mx.float32)
    if bias is not None:
        dt = dt + bias.astype(mx.float32)
    if softplus:
        dt = nn.softplus(dt)
    lo, hi = limit
    if lo > 0.0 or hi < math.inf:
        dt = mx.clip(dt, lo, hi)
    return dt


def _gate(y, D, u, z):
    if D is not None:
        y = y + D.astype(mx.float32) * u.astype(mx.float32)
    if z is not None:
        y = y * nn.silu(z.astype(mx.float32))
    return y


def _per_head_dim(D):
    # Mamba2's D, (H,) or (H, P) -> broadcastable against (..., H, P).
    return D[:, None] if D is not None and D.ndim == 1 else D


def _shift_blocks(x, first):
    # (B, n, ...) -> (B, n, ...): block k receives block k-1's value, block 0 receives `first`.
    return mx.concatenate([first[:, None], x[:, :-1]], axis=1)


def linear_scan(a, b, initial=None):
    """h_t = a_t * h_{t-1} + b_t along axis 1, h_{-1} = initial (zero when None).

    a, b (B, L, ...) float32, a broadcastable to b. Returns h (B, L, ...).
    Blockwise: within blocks of SCAN_BLOCK positions a short loop runs over all blocks at once;
    the blocks' end states are then scanned the same way, recursively, so the work is linear in L
    and the number of graph nodes grows with log L, not L. Only products of decays in [0, 1]
    appear, so strong and weak decay alike stay finite.
    """
    a = a.reshape((1,) * (b.ndim - a.ndim) + a.shape)
    a = mx.broadcast_to(a, b.shape[:2] + a.shape[2:])
    if initial is not None:
        # h_0 = a_0 h_{-1} + b_0: the initial state enters with the first input.
        b = mx.concatenate([b[:, :1] + a[:, :1] * mx.expand_dims(initial, 1), b[:, 1:]], axis=1)
    length = b.shape[1]
    if length <= SCAN_BLOCK:
        return _scan_loop(a, b)[1]
    blocks = -(-length // SCAN_BLOCK)
    pad = blocks * SCAN_BLOCK - length
    if pad:
        widths = [(0, 0), (0, pad)] + [(0, 0)] * (b.ndim - 2)
        a = mx.pad(a, widths, constant_values=1.0)
        b = mx.pad(b, widths)
    shape = (b.shape[0], blocks, SCAN_BLOCK) + b.shape[2:]
    blocked = lambda x: x.reshape(shape[:3] + x.shape[2:])  # noqa: E731
    a_in, h_in = _scan_loop(blocked(a), blocked(b), axis=2)
    h_blocks = linear_scan(a_in[:, :, -1], h_in[:, :, -1])
    h_carry = _shift_blocks(h_blocks, mx.zeros_like(h_blocks[:, 0]))
    return (h_in + a_in * mx.expand_dims(h_carry, 2)).reshape(b.shape)[:, :length]


def _scan_loop(a, b, axis=1):
    # (cumulative product of a, h) along `axis` by a plain loop over its (few) positions.
    at = lambda x, t: x[(slice(None),) * axis + (t,)]  # noqa: E731
    a_cum, h = [at(a, 0)], [at(b, 0)]
    for t in range(1, a.shape[axis]):
        a_cum.append(a_cum[-1] * at(a, t))
        h.append(h[-1] * at(a, t) + at(b, t))
    return mx.stack(a_cum, axis), mx.stack(h, axis)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   state=None, return_last_state=False):
    """Mamba1 scan. u, delta, z (B, L, D); A (D, N); B, C (B, L, N); state (B, D, N).

    The (B, L, D, N) states exist only SCAN_SEGMENT tokens at a time: each segment is scanned in
    parallel, contracted with C, and hands its last state to the next, so a long prefill needs
    memory for one segment rather than for the whole sequence, and so does the backward pass,
    which recomputes each segment from its entering state (see `recompute.segmented`).
    """
    delta = discretize_dt(delta, delta_bias, delta_softplus)  # (B, L, D)
    inputs = delta * u.astype(mx.float32)  # (B, L, D)
    B, C = B.astype(mx.float32), C.astype(mx.float32)
    if state is None:
        state = mx.zeros((u.shape[0],) + A.shape, mx.float32)
    y, state = segmented(_selective_scan_segment, SCAN_SEGMENT, [delta, inputs, B, C],
                         [A.astype(mx.float32)], state.astype(mx.float32))
    y = _gate(y, D, u, z).astype(u.dtype)
    return (y, state) if return_last_state else y


def _selective_scan_segment(delta, inputs, B, C, A, state):
    # (B, S, D), (B, S, D), (B, S, N), (B, S, N), (D, N), (B, D, N) -> y (B, S, D), last state.
    decay = exp(delta[..., None] * A)  # (B, S, D, N)
    h = linear_scan(decay, inputs[..., None] * B[:, :, None, :], state)
    return (h * C[:, :, None, :]).sum(-1), h[:, -1]


def selective_scan_step(state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                        delta_softplus=False):
    """One Mamba1 token. state (B, D, N); u, delta, z (B, D); A (D, N); B, C (B, N)."""
    delta = discretize_dt(delta, delta_bias, delta_softplus)  # (B, D)
    decay = mx.exp(delta[..., None] * A.astype(mx.float32))  # (B, D, N)
    inputs = (delta * u.astype(mx.float32))[..., None] * B.astype(mx.float32)[:, None, :]
    state = decay * state.astype(mx.float32) + inputs
    y = (state @ C.astype(mx.float32)[..., None]).squeeze(-1)  # (B, D)
    return _gate(y, D, u, z).astype(u.dtype), state


def segment_sums(x):
    """(..., T) -> (..., T, T): entry [i, j] = x[j+1] + ... + x[i] for i >= j, -inf above.

    Summed directly rather than as a difference of cumulative sums, which loses precision
    when the sums grow large (strong decay over a long chunk).
    """
    T = x.shape[-1]
    strictly_lower = mx.tril(mx.ones((T, T), dtype=mx.bool_), k=-1)
    repeated = mx.where(strictly_lower, mx.expand_dims(x, -1), 0.0)
    sums = mx.cumsum(repeated, axis=-2)
    lower = mx.tril(mx.ones((T, T), dtype=mx.bool_))
    return mx.where(lower, sums, -mx.inf)


def ssd(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
        dt_limit=(0.0, math.inf), initial_states=None, return_final_states=False):
    """Mamba2 chunked SSD. x (B, L, H, P); dt (B, L, H); A, dt_bias (H,); D (H,) or (H, P);
    B, C (B, L, G, N).

    Segments of SSD_SEGMENT tokens are solved in turn (see `_ssd_segment`), each from the state
    the one before ends with; the backward pass recomputes each from its entering state
    (`recompute.segmented`), so its memory does not grow with the chunk states of the sequence.
    """
    batch, length, heads, head_dim = x.shape
    dt = discretize_dt(dt, dt_bias, dt_softplus, dt_limit)  # (b, L, H)
    dA = dt * A.astype(mx.float32)
    xdt = x.astype(mx.float32) * dt[..., None]  # (b, L, H, P)
    if initial_states is None:
        initial_states = mx.zeros((batch, heads, head_dim, B.shape[3]), mx.float32)
    chunk = min(chunk_size, MAX_SSD_CHUNK, length)
    segment = chunk * max(1, SSD_SEGMENT // chunk)  # whole chunks: no padding within
    y, final = segmented(functools.partial(_ssd_segment, chunk), segment,
                         [xdt, dA, B.astype(mx.float32), C.astype(mx.float32)], [],
                         initial_states.astype(mx.float32))
    y = _gate(y, _per_head_dim(D), x, z).astype(x.dtype)
    return (y, final) if return_final_states else y


def _ssd_segment(chunk, xdt, dA, B32, C32, initial_states):
    """SSD over one segment. xdt (b, L, H, P) = Δx; dA (b, L, H) = ΔA; B32, C32 (b, L, G, N);
    initial_states (b, H, P, N). Returns y (b, L, H, P) before D and the gate, and the last state.

    Heads are grouped as (G, H/G) so that B and C are shared by the heads of a group without
    being copied. Within a chunk: Y = (C Bᵀ ∘ exp(segsum(ΔA))) (Δx); between chunks the
    chunk-end states are carried by `linear_scan`.
    """
    batch, length, heads, head_dim = xdt.shape
    groups, d_state = B32.shape[2], B32.shape[3]
    per_group = heads // groups
    chunk = min(chunk, length)
    chunks = -(-length // chunk)
    pad = chunks * chunk - length
    if pad:
        # Zero Δ after the end: decay 1 and input 0, so the final state is unchanged.
        dA = mx.pad(dA, [(0, 0), (0, pad), (0, 0)])
        xdt = mx.pad(xdt, [(0, 0), (0, pad), (0, 0), (0, 0)])
        B32 = mx.pad(B32, [(0, 0), (0, pad), (0, 0), (0, 0)])
        C32 = mx.pad(C32, [(0, 0), (0, pad), (0, 0), (0, 0)])

    # Heads as (G, h): h heads share each group's B and C. Products are arranged as 3-D batched
    # matrix multiplies with the heads of a group merged where they share an operand: MLX's CPU
    # backend multiplies a few large matrices far faster than many small or broadcast ones.
    n = batch * chunks * groups
    X = xdt.reshape(batch, chunks, chunk, groups, per_group, head_dim)  # (b, c, l, G, h, P)
    dA = dA.reshape(batch, chunks, chunk, groups, per_group).transpose(0, 1, 3, 4, 2)
    Bc = B32.reshape(batch, chunks, chunk, groups, d_state).transpose(0, 1, 3, 2, 4)
    Cc = C32.reshape(batch, chunks, chunk, groups, d_state).transpose(0, 1, 3, 2, 4)
    Bc, Cc = Bc.reshape(n, chunk, d_state), Cc.reshape(n, chunk, d_state)  # (bcG, l, N)
    log_decay = mx.cumsum(dA, axis=-1)  # (b, c, G, h, l)

    # Within each chunk: Y = (C Bᵀ ∘ exp(segsum(ΔA))) (Δx), per head.
    CB = (Cc @ Bc.swapaxes(1, 2)).reshape(batch, chunks, groups, 1, chunk, chunk)
    scores = (CB * exp(segment_sums(dA))).reshape(-1, chunk, chunk)  # (bcGh, l, l)
    heads_first = X.transpose(0, 1, 3, 4, 2, 5).reshape(-1, chunk, head_dim)  # (bcGh, l, P)
    y = (scores @ heads_first).reshape(batch, chunks, groups, per_group, chunk, head_dim)
    y = y.transpose(0, 1, 2, 4, 3, 5)  # (b, c, G, l, h, P)

    # Each chunk's own end state: sum over l of decay-to-end · (Δx) ⊗ B.
    to_end = exp(log_decay[..., -1:] - log_decay).transpose(0, 1, 4, 2, 3)  # (b, c, l, G, h)
    weighted = (X * to_end[..., None]).transpose(0, 1, 3, 4, 5, 2)  # (b, c, G, h, P, l)
    chunk_states = (weighted.reshape(n, per_group * head_dim, chunk) @ Bc).reshape(
        batch, chunks, groups, per_group, head_dim, d_state)
    # The states entering each chunk, carried across chunks by the same linear scan as Mamba1.
    chunk_decay = mx.exp(log_decay[..., -1])[..., None, None]  # (b, c, G, h, 1, 1)
    initial_states = initial_states.reshape(batch, groups, per_group, head_dim, d_state)
    end_states = linear_scan(chunk_decay, chunk_states, initial_states)
    entering = _shift_blocks(end_states, initial_states)
    from_entering = Cc @ entering.reshape(n, per_group * head_dim, d_state).swapaxes(1, 2)
    from_entering = from_entering.reshape(batch, chunks, groups, chunk, per_group, head_dim)
    y = y + exp(log_decay).transpose(0, 1, 2, 4, 3)[..., None] * from_entering

    y = y.transpose(0, 1, 3, 2, 4, 5).reshape(batch, chunks * chunk, heads, head_dim)[:, :length]
    return y, end_states[:, -1].reshape(batch, heads, head_dim, d_state)


def ssd_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, math.inf)):
    """One Mamba2 token. state (B, H, P, N); x, z (B, H, P); dt (B, H); D (H,) or (H, P);
    B, C (B, G, N)."""
    batch, heads, head_dim = x.shape
    groups, d_state = B.shape[1], B.shape[2]
    dt = discretize_dt(dt, dt_bias, dt_softplus, dt_limit)  # (b, H)
    decay = mx.exp(dt * A.astype(mx.float32))
    state = state.astype(mx.float32).reshape(batch, groups, heads // groups, head_dim, d_state)
    xdt = (x.astype(mx.float32) * dt[..., None]).reshape(batch, groups, -1, head_dim, 1)
    B32 = B.astype(mx.float32)[:, :, None, None, :]  # (b, G, 1, 1, N)
    C32 = C.astype(mx.float32)[:, :, None, :, None]  # (b, G, 1, N, 1)
    state = decay.reshape(batch, groups, -1, 1, 1) * state + xdt * B32
    y = (state @ C32).reshape(batch, heads, head_dim)
    y = _gate(y, _per_head_dim(D), x, z).astype(x.dtype)
    return y, state.reshape(batch, heads, head_dim, d_state)
