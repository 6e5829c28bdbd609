"""Mamba2 mixer: state-space duality (Dao & Gu, 2024), with the gated RMSNorm taken per group."""

import math

import mlx.core as mx
import mlx.nn as nn

from .. import ops
from ..cache import MambaCache
from ..ops.reference import discretize_dt
from .conv import causal_conv1d, windows_after
from .sharding import (all_sum, apply_plan, readers_share, shard_input, shard_output, share,
                       shifted, take)


def gated_rms_norm(y, z, weight, groups, eps, before_gate=False, spanning=None):
    """RMSNorm of y ⊙ silu(z) over each of `groups` contiguous slices of the last axis, times weight
    (before_gate: RMSNorm of y times weight, then ⊙ silu(z), as Falcon-H1 has it).

    Normalising per group (not over the whole width) is what mamba_ssm does; it matters for
    checkpoints with n_groups > 1 such as Mamba-Codestral.

    spanning: (distributed group, norm group index, norm group count, norm group width) when the
    last axis is this rank's part of one norm group that spans ranks (tensor parallel): its sum
    of squares is then summed over the ranks, one number per norm group and token.
    """
    gate = nn.silu(z.astype(mx.float32))
    gated = y.astype(mx.float32) if before_gate else y.astype(mx.float32) * gate
    grouped = gated.reshape(*gated.shape[:-1], groups, -1)
    if spanning is None:
        normed = mx.fast.rms_norm(grouped, None, eps).reshape(gated.shape)
    else:
        group, index, count, width = spanning
        squares = mx.square(grouped).sum(axis=-1)  # (..., 1): this rank's part of its norm group
        slots = squares * (mx.arange(count) == index)  # (..., count), zero but at its group
        total = all_sum(slots, group)[..., index:index + 1, None]
        normed = (grouped * mx.rsqrt(total / width + eps)).reshape(gated.shape)
    if before_gate:
        return (weight * normed * gate).astype(y.dtype)
    return weight * normed.astype(y.dtype)


class Mamba2(nn.Module):
    """x (B, T, d_model) -> (B, T, d_model). Parameter names follow the transformers checkpoints."""

    def __init__(self, d_model, d_state=128, d_conv=4, expand=2, head_dim=64, n_groups=1,
                 chunk_size=256, dt_limit=(0.0, math.inf), conv_bias=True, bias=False,
                 norm_eps=1e-5, d_inner=None, gate_norm="after_gate", projection_multipliers=None):
        """d_inner: the SSM width H * P, by default expand * d_model (Nemotron-H sets it).
        gate_norm: "after_gate" (mamba_ssm), "before_gate" or "none" (Falcon-H1's options).
        projection_multipliers: five factors on in_proj's z, x, B, C and dt rows (Falcon-H1's µP)."""
        super().__init__()
        d_inner = d_inner or expand * d_model
        if d_inner % head_dim or (d_inner // head_dim) % n_groups:
            raise ValueError(f"expand * d_model ({d_inner}) must split into heads of {head_dim} "
                             f"whose count divides into {n_groups} groups")
        self.d_inner, self.d_state, self.head_dim = d_inner, d_state, head_dim
        self.n_heads, self.n_groups = d_inner // head_dim, n_groups
        self.chunk_size, self.dt_limit, self.norm_eps = chunk_size, tuple(dt_limit), norm_eps
        conv_channels = d_inner + 2 * n_groups * d_state
        self.in_proj = nn.Linear(d_model, conv_channels + d_inner + self.n_heads, bias=bias)
        self.conv1d = nn.Conv1d(conv_channels, conv_channels, d_conv, groups=conv_channels,
                                bias=conv_bias)
        # A in [1, 16] and a log-uniform Δ in [1e-3, 1e-1], as mamba_ssm initialises them.
        self.A_log = mx.log(mx.random.uniform(1.0, 16.0, (self.n_heads,)))
        dt = mx.exp(mx.random.uniform(math.log(1e-3), math.log(1e-1), (self.n_heads,)))
        self.dt_bias = dt + mx.log(-mx.expm1(-dt))  # softplus⁻¹(dt)
        self.D = mx.ones((self.n_heads,))
        self.gate_norm = gate_norm
        if gate_norm != "none":
            self.norm = nn.RMSNorm(d_inner, eps=norm_eps)  # used as the weight of the gated norm
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self._multipliers, self._spanning = None, None
        if projection_multipliers is not None:
            sizes = (d_inner, d_inner, n_groups * d_state, n_groups * d_state, self.n_heads)
            self._multipliers = mx.concatenate(
                [mx.full((n,), m) for n, m in zip(sizes, projection_multipliers)])

    def make_cache(self, batch_size=1):
        channels, width = self.conv1d.weight.shape[:2]
        return MambaCache.zeros(batch_size, width - 1, channels,
                                (self.n_heads, self.head_dim, self.d_state),
                                self.conv1d.weight.dtype)  # never quantized

    def _split(self, projected, window, mask=None):
        # projected (..., T, F) -> z (..., T, E), x (..., T, H, P), B, C (..., T, G, N), dt (..., T, H)
        bc = self.n_groups * self.d_state
        z, xBC, dt = mx.split(projected, [self.d_inner, 2 * self.d_inner + 2 * bc], axis=-1)
        xBC, window = causal_conv1d(xBC, self.conv1d.weight, self.conv1d.get("bias"), window, mask)
        x, B, C = mx.split(nn.silu(xBC), [self.d_inner, self.d_inner + bc], axis=-1)
        lead = x.shape[:-1]
        return (z, x.reshape(*lead, self.n_heads, self.head_dim),
                B.reshape(*lead, self.n_groups, self.d_state),
                C.reshape(*lead, self.n_groups, self.d_state), dt, window)

    def _project(self, x):
        projected = self.in_proj(x)
        if self._multipliers is None:
            return projected
        return projected * self._multipliers.astype(projected.dtype)

    def _output(self, y, z):
        y = y.reshape(*z.shape)
        if self.gate_norm == "none":
            return self.out_proj(y * nn.silu(z))
        return self.out_proj(gated_rms_norm(y, z, self.norm.weight, self.n_groups, self.norm_eps,
                                            self.gate_norm == "before_gate", self._spanning))

    def shard(self, group):
        """Tensor parallel, in place: this rank keeps its share of the heads (their z, x and dt
        rows of in_proj, conv channels, A_log, D, dt_bias, norm weights and out_proj columns) and
        the B/C groups those heads read; out_proj sums over the group. Returns the plan."""
        E, H, P, G, N = self.d_inner, self.n_heads, self.head_dim, self.n_groups, self.d_state
        h0, h1 = share(H, group, "Mamba2 heads (d_inner / head_dim)")
        g0, g1 = readers_share(H, G, group, "Mamba2 n_groups")
        heads, channels = [(h0, h1)], [(h0 * P, h1 * P)]
        conv = channels + [(E + g0 * N, E + g1 * N), (E + (G + g0) * N, E + (G + g1) * N)]
        rows = channels + shifted(conv, E) + shifted(heads, 2 * E + 2 * G * N)
        plan = shard_input(self, "in_proj", rows)
        for name in ("weight", "bias"):
            if name in self.conv1d:
                plan[f"conv1d.{name}"] = (0, conv)
        for name in ("A_log", "D", "dt_bias"):
            plan[name] = (0, heads)
        if "norm" in self:
            plan["norm.weight"] = (0, channels)
        apply_plan(self, {k: v for k, v in plan.items() if not k.startswith("in_proj.")})
        plan.update(shard_output(self, "out_proj", channels, group, "Mamba2 out_proj"))
        if self._multipliers is not None:
            self._multipliers = take(self._multipliers, 0, rows)
        if G % group.size():  # the norm group of these heads spans ranks
            self._spanning = (group, g0, G, E // G)
        self.d_inner, self.n_heads, self.n_groups = (h1 - h0) * P, h1 - h0, g1 - g0
        return plan

    def __call__(self, x, cache=None, mask=None):
        """mask (B, T): 0 marks left padding, which leaves the conv window and the state as they
        were, so a padded row gets exactly what it gets alone, also over a non-empty cache."""
        projected = self._project(x)
        z, x, B, C, dt, window = self._split(projected, cache.conv if cache else None, mask)
        bias, softplus, limit = self.dt_bias, True, self.dt_limit
        if cache is not None and cache.trail is not None:
            return self._stepwise(projected, z, x, B, C, dt, cache)
        if mask is not None:
            # Δ = 0 on padding: exp(0·A) = 1 keeps the state and Δ·x = 0 adds nothing to it.
            dt = discretize_dt(dt, bias, softplus, limit) * mask[..., None].astype(mx.float32)
            bias, softplus, limit = None, False, (0.0, math.inf)
        y, state = ops.ssd(
            x, dt, -mx.exp(self.A_log.astype(mx.float32)), B, C, self.chunk_size, self.D,
            None, bias, softplus, limit, cache.ssm if cache else None, True)
        if cache is not None:
            cache.conv, cache.ssm = window, state
        return self._output(y, z)

    def _stepwise(self, projected, z, x, B, C, dt, cache):
        """A rewindable cache's window: the decode step's recurrence token by token, keeping
        each token's state (the projections and the conv stay parallel)."""
        bc = self.n_groups * self.d_state
        conv_inputs = projected[..., self.d_inner:2 * self.d_inner + 2 * bc]
        A = -mx.exp(self.A_log.astype(mx.float32))
        ys = []
        for t, window in enumerate(windows_after(cache.conv, conv_inputs)):
            y, ssm = ops.ssd_step(cache.ssm, x[:, t], dt[:, t], A, B[:, t], C[:, t], self.D,
                                  None, self.dt_bias, True, self.dt_limit)
            cache.conv, cache.ssm = window, ssm
            cache.remember()
            ys.append(y)
        return self._output(mx.stack(ys, axis=1), z)

    def step(self, x, cache):
        """One token: x (B, d_model) -> (B, d_model); advances `cache` in place."""
        z, x, B, C, dt, cache.conv = self._split(self._project(x)[:, None], cache.conv)
        y, cache.ssm = ops.ssd_step(
            cache.ssm, x[:, 0], dt[:, 0], -mx.exp(self.A_log.astype(mx.float32)), B[:, 0],
            C[:, 0], self.D, None, self.dt_bias, True, self.dt_limit)
        cache.remember()
        return self._output(y, z[:, 0])
