"""Mamba-3's scan in pure MLX: the trapezoidal state update solved in chunks, as SSD solves Mamba2's.

    h_t = α_t h_{t-1} + β_t Σ_r v_{t-1,r} k_{t-1,r}ᵀ + γ_t Σ_r v_{t,r} k_{t,r}ᵀ,   y_{t,r} = h_t q_{t,r}

with α = exp(ΔA), β = (1-λ)Δα, γ = λΔ (λ the trapezoid's mix). Token s enters the state with γ_s at
its own step and with (1-λ_{s+1})Δ_{s+1}·α_{s+1} at the next, so from step s+1 on it is weighted by
w_s = γ_s + (1-λ_{s+1})Δ_{s+1} times the decay exp(ΔA_{s+1} + ... + ΔA_t). The scan is therefore
SSD with the input weight w_s, except on the diagonal (t = s), whose weight is γ_s. The ranks of a
MIMO layer are summed in the state: within a chunk, (token, rank) pairs are the rows of one matrix.
"""

import functools
import math

import mlx.core as mx

from .recompute import segmented
from .reference import exp, linear_scan, segment_sums


TWO_PI = 2 * math.pi
# 2π as float32 plus the remainder: subtracting the two in turn takes whole turns off an angle
# without the 1.7e-7 rad per turn that float32's 2π alone would leave (3e-4 after 2000 turns).
TWO_PI_HIGH = mx.array(TWO_PI, mx.float32).item()
TWO_PI_LOW = TWO_PI - TWO_PI_HIGH

# Positions per block of `wrapped_cumsum`.
ANGLE_BLOCK = 8

# (token, rank) rows per chunk of `mamba3_scan`: l = CHUNK_ROWS / R tokens. Per token and head a
# chunk costs l·R²·(N + P) multiply-adds within it and 2·R·N·P between chunks, whatever l; the
# carry across chunks costs N·P / l. The sum is least near l ∝ 1/R; 32 rows measured fastest on
# MLX's CPU backend (for SISO and for MIMO of rank 4), and the chunk length never changes the result.
CHUNK_ROWS = 32

# (token, rank) rows per segment of `mamba3_scan`: the backward pass holds one segment's chunk
# states and scores at a time.
SEGMENT_ROWS = 256


def wrap(angle):
    """angle mod 2π, in [0, 2π) up to rounding."""
    turns = mx.floor(angle / TWO_PI)
    return angle - turns * TWO_PI_HIGH - turns * TWO_PI_LOW


def wrapped_cumsum(x):
    """Cumulative sums along axis 1, mod 2π, of x (b, L, ...) float32.

    Summed blockwise with every partial sum wrapped, as the official kernel wraps its running
    angle per chunk: a plain cumulative sum grows with L (thousands of radians after a few
    thousand tokens) and loses float32 precision that wrapping at the end cannot recover.
    """
    length = x.shape[1]
    if length <= ANGLE_BLOCK:
        return wrap(mx.cumsum(x, axis=1))
    blocks = -(-length // ANGLE_BLOCK)
    pad = blocks * ANGLE_BLOCK - length
    x = mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    within = mx.cumsum(x.reshape(x.shape[0], blocks, ANGLE_BLOCK, *x.shape[2:]), axis=2)
    ends = wrapped_cumsum(wrap(within[:, :, -1]))  # (b, blocks, ...): each block's end angle
    before = mx.concatenate([mx.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1)
    return wrap(within + mx.expand_dims(before, 2)).reshape(x.shape)[:, :length]


def _fold_previous(state, k, v, weight):
    # state (b, H, P, N) + weight (b, H) · Σ_r v_r k_rᵀ, k (b, H, R, N), v (b, H, R, P).
    return state + weight[..., None, None] * (v.swapaxes(-1, -2) @ k)


def mamba3_scan(q, k, v, dA, dt, trap, chunk_size, initial=None):
    """q, k (b, L, H, R, N); v (b, L, H, R, P); dA (= ΔA, log α), dt (Δ), trap (λ) (b, L, H);
    all float32. initial: (state (b, H, P, N), k (b, H, R, N), v (b, H, R, P)), the state after
    the token before and that token's k and v; None for a sequence's start.

    Returns y (b, L, H, R, P), y_{t,r} = h_t q_{t,r}, and the last state h_L (b, H, P, N).
    Segments of SEGMENT_ROWS (token, rank) rows are solved in turn, and recomputed one at a time
    by the backward pass (`recompute.segmented`).
    """
    batch, length, heads, rank, d_state = q.shape
    gamma = trap * dt
    previous = (1 - trap) * dt  # β_t / α_t: the weight of token t-1's k, v at step t
    weight = gamma + mx.pad(previous[:, 1:], [(0, 0), (0, 1), (0, 0)])  # w_s
    if initial is None:
        state = mx.zeros((batch, heads, v.shape[-1], d_state), mx.float32)
    else:
        state, k_prev, v_prev = initial
        state = _fold_previous(state, k_prev, v_prev, previous[:, 0])
    chunk = min(chunk_size, max(CHUNK_ROWS // rank, 1), length)
    segment = chunk * max(1, SEGMENT_ROWS // (chunk * rank))  # whole chunks
    # The states are kept transposed, hᵀ (N, P), so that Q hᵀ reads a contiguous operand.
    y, last = segmented(functools.partial(_scan_segment, chunk), segment,
                        [q, k, v, dA, weight, gamma], [], state.swapaxes(-1, -2))
    return y, last.swapaxes(-1, -2)


def _scan_segment(chunk, q, k, v, dA, weight, gamma, state):
    """The scan over one segment: inputs as `mamba3_scan`'s, with w_s (`weight`) and γ (`gamma`)
    (b, L, H) in place of Δ and λ, and the entering state hᵀ (b, H, N, P). Returns y and the last
    hᵀ. The last token's weight already holds the next token's β, so a state carried from one
    segment to the next is the one carried between chunks."""
    batch, length, heads, rank, d_state = q.shape
    head_dim = v.shape[-1]
    chunk = min(chunk, length)
    chunks = -(-length // chunk)
    pad = chunks * chunk - length
    if pad:
        # Zero ΔA and weights after the end: decay 1, nothing added, the last state unchanged.
        pad_time = lambda a: mx.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
        q, k, v, dA, weight, gamma = map(pad_time, (q, k, v, dA, weight, gamma))

    def rows(a):  # (b, L, H, R, X) -> (b, c, H, l·R, X): a chunk's (token, rank) pairs as rows
        a = a.reshape(batch, chunks, chunk, heads, rank, a.shape[-1])
        return a.transpose(0, 1, 3, 2, 4, 5).reshape(batch, chunks, heads, chunk * rank, -1)

    def per_chunk(a):  # (b, L, H) -> (b, c, H, l)
        return a.reshape(batch, chunks, chunk, heads).transpose(0, 1, 3, 2)

    def per_row(a):  # (b, c, H, l) -> (b, c, H, l·R, 1)
        return mx.repeat(a, rank, axis=-1)[..., None]

    Q, K, V = rows(q), rows(k), rows(v)
    dA, weight, gamma = per_chunk(dA), per_chunk(weight), per_chunk(gamma)
    log_decay = mx.cumsum(dA, axis=-1)  # (b, c, H, l)

    # Within each chunk: Y = (Q Kᵀ ∘ M) V, M[t, s] = decay(t, s) · (w_s below the diagonal, γ_s on it),
    # the same for every pair of ranks: M multiplies Q Kᵀ seen as (l, R, l, R), unrepeated.
    below = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_), k=-1)
    mix = exp(segment_sums(dA)) * mx.where(below, weight[..., None, :], gamma[..., None, :])
    scores = (Q @ K.swapaxes(-1, -2)).reshape(batch, chunks, heads, chunk, rank, chunk, rank)
    scores = scores * mix[..., :, None, :, None]
    y = scores.reshape(batch, chunks, heads, chunk * rank, chunk * rank) @ V  # (b, c, H, l·R, P)

    # Each chunk's own end state, carried across chunks by the same linear scan as Mamba1/2.
    to_end = exp(log_decay[..., -1:] - log_decay) * weight  # (b, c, H, l)
    chunk_states = K.swapaxes(-1, -2) @ (V * per_row(to_end))  # (b, c, H, N, P)
    chunk_decay = mx.exp(log_decay[..., -1])[..., None, None]
    end_states = linear_scan(chunk_decay, chunk_states, state)
    entering = mx.concatenate([state[:, None], end_states[:, :-1]], axis=1)
    y = y + per_row(exp(log_decay)) * (Q @ entering)

    y = y.reshape(batch, chunks, heads, chunk, rank, head_dim).transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(batch, chunks * chunk, heads, rank, head_dim)[:, :length]
    return y, end_states[:, -1]


def mamba3_step(state, q, k, v, dA, dt, trap, k_prev, v_prev):
    """One token. state (b, H, P, N); q, k, k_prev (b, H, R, N); v, v_prev (b, H, R, P);
    dA, dt, trap (b, H); all float32. Returns y (b, H, R, P) and the new state."""
    alpha = mx.exp(dA)
    state = _fold_previous(alpha[..., None, None] * state, k_prev, v_prev, (1 - trap) * dt * alpha)
    state = _fold_previous(state, k, v, trap * dt)
    return q @ state.swapaxes(-1, -2), state
