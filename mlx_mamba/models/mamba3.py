"""Mamba-3 mixer (state-spaces/mamba `mamba_ssm/modules/mamba3.py`; Lahoti et al., 2026).

Against Mamba2: no conv1d; a data-dependent A per token; B and C RMS-normalised with a per-head
bias and rotated by data-dependent angles; a trapezoidal state update that mixes the previous
token's k vᵀ into each step; optionally several ranks per head (MIMO). Parameter names, shapes
and numerics follow the official module, so its checkpoints load unchanged.
"""

import math

import mlx.core as mx
import mlx.nn as nn

from ..cache import Mamba3Cache
from ..ops.mamba3 import mamba3_scan, mamba3_step, wrap, wrapped_cumsum
from ..ops.reference import exp
from .mamba2 import gated_rms_norm
from .sharding import apply_plan, readers_share, shard_input, shard_output, share, shifted

NORM_EPS = 1e-5  # B_norm, C_norm and the output norm


def heavy_tail(x):
    """1 + x for x >= 0, 1 / (1 - x) below: positive, continuous, differentiable at 0."""
    return mx.maximum(x, 0.0) + 1.0 / (1.0 - mx.minimum(x, 0.0))


# A = -f(dd_A): the official module's heavy tail (since June 2026), or the softplus of its
# March 2026 release, which checkpoints trained then need. Either is clamped at -A_floor.
A_ACTIVATIONS = {"heavy_tail": heavy_tail, "softplus": nn.softplus}


def silu(x):
    """x·sigmoid(x) through `exp` (a power of 2), half the time of nn.silu on MLX's CPU backend,
    where the gate's R·d_inner exponentials per token are much of MIMO's cost outside matrix
    products. The exponent stops at 80, so e^-x and its gradient stay finite (x < -80: ~1e-33)."""
    return x / (1.0 + exp(mx.minimum(-x, 80.0)))


class Mamba3(nn.Module):
    """x (B, T, d_model) -> (B, T, d_model). Keyword names are the official constructor's."""

    def __init__(self, d_model, d_state=128, expand=2, headdim=64, ngroups=1, rope_fraction=0.5,
                 dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, A_floor=1e-4,
                 is_outproj_norm=False, is_mimo=False, mimo_rank=4,
                 fuse_pregate_headwise_norm=True, chunk_size=64, A_activation="heavy_tail"):
        """fuse_pregate_headwise_norm selects an official kernel; the result is the same.
        A_activation (ours; the official module has no switch): "heavy_tail" or "softplus"."""
        super().__init__()
        if A_activation not in A_ACTIVATIONS:
            raise ValueError(f"A_activation is {A_activation!r}: expected 'heavy_tail' or "
                             "'softplus'")
        d_inner = int(expand * d_model)
        if rope_fraction not in (0.5, 1.0):
            raise ValueError(f"rope_fraction is {rope_fraction!r}: expected 0.5 or 1.0")
        if d_inner % headdim or (d_inner // headdim) % ngroups:
            raise ValueError(f"expand * d_model ({d_inner}) must split into heads of headdim "
                             f"{headdim} whose count divides into ngroups {ngroups}")
        if d_state % 2 or d_state * rope_fraction < 2:
            raise ValueError(f"d_state is {d_state}: expected an even number (rotated in pairs) "
                             f"with at least one pair rotated (rope_fraction {rope_fraction})")
        if is_mimo and mimo_rank < 1:
            raise ValueError(f"mimo_rank is {mimo_rank}: expected at least 1")
        self.d_inner, self.d_state, self.headdim, self.ngroups = d_inner, d_state, headdim, ngroups
        self.nheads = d_inner // headdim
        self.rank = mimo_rank if is_mimo else 1
        self.is_mimo, self.is_outproj_norm = is_mimo, is_outproj_norm
        self.A_floor, self.chunk_size = A_floor, chunk_size
        self.A_activation = A_activation
        rotated = int(d_state * rope_fraction) // 2 * 2
        self.num_rope_angles = rotated // 2
        H, R = self.nheads, self.rank
        self._sections = self._in_proj_sections()
        self.in_proj = nn.Linear(d_model, self._sections[-1] + self.num_rope_angles, bias=False)
        # A log-uniform Δ in [dt_min, dt_max], floored, as the official module initialises it.
        dt = mx.exp(mx.random.uniform(math.log(dt_min), math.log(dt_max), (H,)))
        dt = mx.maximum(dt, dt_init_floor)
        self.dt_bias = dt + mx.log(-mx.expm1(-dt))  # softplus⁻¹(dt)
        self.B_bias = mx.ones((H, R, d_state))
        self.C_bias = mx.ones((H, R, d_state))
        self.B_norm = nn.RMSNorm(d_state, eps=NORM_EPS)
        self.C_norm = nn.RMSNorm(d_state, eps=NORM_EPS)
        if is_mimo:
            self.mimo_x = mx.full((H, R, headdim), 1.0 / R)
            self.mimo_z = mx.ones((H, R, headdim))
            self.mimo_o = mx.full((H, R, headdim), 1.0 / R)
        self.D = mx.ones((H,))
        if is_outproj_norm:
            self.norm = nn.RMSNorm(d_inner, eps=NORM_EPS)  # the weight of the per-head gated norm
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def _in_proj_sections(self):
        # in_proj rows: z, x, B, C (each laid out (r, g, n)), dd_dt, dd_A, trap, angles.
        E, H, bc = self.d_inner, self.nheads, self.d_state * self.ngroups * self.rank
        return [E, 2 * E, 2 * E + bc, 2 * E + 2 * bc, 2 * E + 2 * bc + H, 2 * E + 2 * bc + 2 * H,
                2 * E + 2 * bc + 3 * H]

    def shard(self, group):
        """Tensor parallel, in place: this rank keeps its share of the heads (their rows of
        in_proj, dt_bias, D, the B/C biases, the MIMO projections, the norm and out_proj's
        columns) and the B/C groups they read; the rotation angles, shared by every head, stay
        whole. The output norm is per head: no communication but out_proj's sum. The plan."""
        E, H, P, G, N, R = (self.d_inner, self.nheads, self.headdim, self.ngroups, self.d_state,
                            self.rank)
        h0, h1 = share(H, group, "Mamba-3 heads (d_inner / headdim)")
        g0, g1 = readers_share(H, G, group, "Mamba-3 ngroups")
        heads, channels = [(h0, h1)], [(h0 * P, h1 * P)]
        bc = [(r * G * N + g0 * N, r * G * N + g1 * N) for r in range(R)]
        dd_dt, dd_A, trap, angles = self._sections[3:]
        rows = (channels + shifted(channels, E) + shifted(bc, 2 * E)
                + shifted(bc, 2 * E + G * R * N) + [(s + h0, s + h1) for s in (dd_dt, dd_A, trap)]
                + [(angles, angles + self.num_rope_angles)])
        plan = shard_input(self, "in_proj", rows)
        local = {name: (0, heads) for name in ("dt_bias", "D", "B_bias", "C_bias", "mimo_x",
                                                   "mimo_z", "mimo_o") if name in self}
        if "norm" in self:
            local["norm.weight"] = (0, channels)
        apply_plan(self, local)
        plan.update(local)
        plan.update(shard_output(self, "out_proj", channels, group, "Mamba-3 out_proj"))
        self.d_inner, self.nheads, self.ngroups = (h1 - h0) * P, h1 - h0, g1 - g0
        self._sections = self._in_proj_sections()
        return plan

    def make_cache(self, batch_size=1):
        return Mamba3Cache.zeros(batch_size, self.nheads, self.headdim, self.d_state, self.rank,
                                 self.num_rope_angles)

    def _keys(self, bc, norm, bias):
        # (b, L, R·G·N) -> RMS-normalised over N, plus the per-head bias: (b, L, H, R, N).
        # Head h reads group h // (H / G); the bias's broadcast does the repeat over heads.
        b, length = bc.shape[:2]
        G, R, N = self.ngroups, self.rank, self.d_state
        bc = bc.reshape(b, length, R, G, N).astype(mx.float32)
        bc = mx.fast.rms_norm(bc, norm.weight.astype(mx.float32), NORM_EPS).swapaxes(2, 3)
        bias = bias.astype(mx.float32).reshape(G, self.nheads // G, R, N)
        return (bc[:, :, :, None] + bias).reshape(b, length, self.nheads, R, N)

    def _rotate(self, a, cos, sin):
        """Rotate S pairs of a (..., N) by the angles: SISO pairs (2i, 2i+1) as the Triton
        kernels, MIMO pairs (i, i + N/2) as the TileLang kernels. cos, sin (..., S)."""
        S = cos.shape[-1]
        if not self.is_mimo:
            pairs = a[..., :2 * S].reshape(*a.shape[:-1], S, 2)
            first, second = pairs[..., 0], pairs[..., 1]
            turned = mx.stack([first * cos - second * sin, first * sin + second * cos], axis=-1)
            return mx.concatenate([turned.reshape(*a.shape[:-1], 2 * S), a[..., 2 * S:]], axis=-1)
        half = a.shape[-1] // 2
        first, second = a[..., :S], a[..., half:half + S]
        return mx.concatenate([first * cos - second * sin, a[..., S:half],
                               first * sin + second * cos, a[..., half + S:]], axis=-1)

    def _prepare(self, u, cache, mask):
        """u (b, L, d_model) -> z, x (b, L, H, P); q, k (b, L, H, R, N); ΔA, Δ, λ (b, L, H);
        the accumulated angles (b, L, H, S). Everything but z in float32."""
        f32 = lambda a: a.astype(mx.float32)  # noqa: E731
        z, x, B, C, dd_dt, dd_A, trap, angles = mx.split(self.in_proj(u), self._sections, axis=-1)
        dt = nn.softplus(f32(dd_dt) + f32(self.dt_bias))
        if mask is not None:
            dt = dt * f32(mask)[..., None]  # Δ = 0 on padding: no decay, no input, no turn
        A = mx.minimum(-A_ACTIVATIONS[self.A_activation](f32(dd_A)), -self.A_floor)
        # θ_t = θ_{t-1} + π tanh(angles_t) Δ_t: shared angles, each head turning with its own Δ.
        turn = math.pi * mx.tanh(f32(angles))[:, :, None, :] * dt[..., None]
        angle = wrap(cache.angle[:, None] + wrapped_cumsum(turn))
        cos, sin = mx.cos(angle)[..., None, :], mx.sin(angle)[..., None, :]
        q = self._rotate(self._keys(C, self.C_norm, self.C_bias), cos, sin)
        k = self._rotate(self._keys(B, self.B_norm, self.B_bias), cos, sin)
        lead = u.shape[:-1]
        return (z.reshape(*lead, self.nheads, self.headdim),
                f32(x).reshape(*lead, self.nheads, self.headdim), q, k, A * dt, dt,
                mx.sigmoid(f32(trap)), angle)

    def _values(self, x):
        # x (..., H, P) -> v (..., H, R, P): MIMO projects x up to its ranks.
        return x[..., None, :] * self.mimo_x if self.is_mimo else x[..., None, :]

    def _output(self, y, v, z, dtype):
        """y, v (..., H, R, P); z (..., H, P) -> (..., d_model): + D v, the gate (after the
        per-head norm with is_outproj_norm), the ranks mixed by mimo_o."""
        H, R, P = self.nheads, self.rank, self.headdim
        y = y + self.D.astype(mx.float32)[:, None, None] * v
        z = z[..., None, :].astype(mx.float32)  # (..., H, 1, P)
        if self.is_mimo:
            z = z * self.mimo_z
        if self.is_outproj_norm:
            # Normalised over P for each head and rank, with the head's weight for every rank.
            weight = mx.broadcast_to(self.norm.weight.reshape(H, 1, P), (H, R, P)).reshape(-1)
            flat = lambda a: a.reshape(*a.shape[:-3], H * R * P)  # noqa: E731
            y = gated_rms_norm(flat(y), flat(z), weight, H * R, NORM_EPS, True).reshape(y.shape)
        else:
            y = y * silu(z)
        y = (y * self.mimo_o).sum(-2) if self.is_mimo else y[..., 0, :]
        return self.out_proj(y.reshape(*y.shape[:-2], self.d_inner).astype(dtype))

    def __call__(self, u, cache=None, mask=None):
        """mask (B, T): 0 marks left padding, which leaves the state, the angles and the
        previous token's k and x as they were, so a padded row gets what it gets alone."""
        state = cache if cache is not None else self.make_cache(u.shape[0])
        z, x, q, k, dA, dt, trap, angle = self._prepare(u, state, mask)
        if state.trail is not None:  # rewindable: step by step, keeping each token's state
            ys = []
            for t in range(u.shape[1]):
                y, ssm = mamba3_step(state.ssm, q[:, t], k[:, t], self._values(x[:, t]),
                                     dA[:, t], dt[:, t], trap[:, t], state.k.swapaxes(1, 2),
                                     self._values(state.v))
                state.state = [angle[:, t], ssm, k[:, t].swapaxes(1, 2), x[:, t]]
                state.remember()
                ys.append(y)
            return self._output(mx.stack(ys, axis=1), self._values(x), z, u.dtype)
        k_prev = state.k.swapaxes(1, 2)  # (b, H, R, N)
        if mask is not None:
            # Padding carries the previous token's k and x, so the first real token's trapezoid
            # takes the token before the padding (Δ = 0 makes the padding add nothing itself).
            real = mask.astype(mx.bool_)[:, :, None, None]
            k = mx.where(real[..., None], k, k_prev[:, None])
            x = mx.where(real, x, state.v[:, None])
        v = self._values(x)
        y, ssm = mamba3_scan(q, k, v, dA, dt, trap, self.chunk_size,
                             (state.ssm, k_prev, self._values(state.v)))
        state.state = [angle[:, -1], ssm, k[:, -1].swapaxes(1, 2), x[:, -1]]
        return self._output(y, v, z, u.dtype)

    def step(self, u, cache):
        """One token: u (B, d_model) -> (B, d_model); advances `cache` in place."""
        z, x, q, k, dA, dt, trap, angle = self._prepare(u[:, None], cache, None)
        x, k = x[:, 0], k[:, 0]
        v = self._values(x)
        y, ssm = mamba3_step(cache.ssm, q[:, 0], k, v, dA[:, 0], dt[:, 0], trap[:, 0],
                             cache.k.swapaxes(1, 2), self._values(cache.v))
        cache.state = [angle[:, 0], ssm, k.swapaxes(1, 2), x]
        cache.remember()
        return self._output(y, v, z[:, 0], u.dtype)
