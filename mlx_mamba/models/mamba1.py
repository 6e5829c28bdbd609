"""Mamba1 mixer: selective SSM (Gu & Dao, 2023), with an optional RMSNorm on dt, B and C:
weightless in Falcon-Mamba, with weights in Jamba."""

import math

import mlx.core as mx
import mlx.nn as nn

from .. import ops
from ..cache import MambaCache
from ..ops.reference import discretize_dt
from .conv import causal_conv1d, windows_after
from .sharding import apply_plan, shard_input, shard_output, share


def _without_bias(linear, x):
    """x @ Wᵀ of a Linear or QuantizedLinear; the scan adds dt_proj's bias itself, in float32."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.quantized_matmul(x, linear.weight, linear.scales, linear.get("biases"), True,
                                   linear.group_size, linear.bits, linear.mode)
    return x @ linear.weight.T


# Jamba's names for the RMSNorms on dt, B and C.
NORMS = ("dt_layernorm", "b_layernorm", "c_layernorm")


class Mamba1(nn.Module):
    """x (B, T, d_model) -> (B, T, d_model). Parameter names follow the transformers checkpoints."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", conv_bias=True,
                 bias=False, mixer_rms_eps=None, mixer_rms_weights=False):
        super().__init__()
        d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.mixer_rms_eps = mixer_rms_eps
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        # S4D-real initialisation of A and a log-uniform Δ in [1e-3, 1e-1], as in the paper.
        self.A_log = mx.log(mx.broadcast_to(mx.arange(1, d_state + 1, dtype=mx.float32),
                                            (d_inner, d_state)))
        self.D = mx.ones((d_inner,))
        dt = mx.exp(mx.random.uniform(math.log(1e-3), math.log(1e-1), (d_inner,)))
        self.dt_proj.bias = dt + mx.log(-mx.expm1(-dt))  # softplus⁻¹(dt)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        if mixer_rms_weights:
            for name, dims in zip(NORMS, (self.dt_rank, d_state, d_state)):
                setattr(self, name, nn.RMSNorm(dims, eps=mixer_rms_eps))

    def make_cache(self, batch_size=1):
        d_inner, width = self.conv1d.weight.shape[:2]
        return MambaCache.zeros(batch_size, width - 1, d_inner, (d_inner, self.d_state),
                                self.conv1d.weight.dtype)  # never quantized

    def _ssm_inputs(self, x):
        # x (..., E) -> delta (..., E) before bias and softplus, B and C (..., N).
        delta, B, C = mx.split(self.x_proj(x), [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
        if self.mixer_rms_eps is not None:
            weights = [self[name].weight if name in self else None for name in NORMS]
            # The weights stay float32 (as all norms'); the result keeps the input's dtype.
            delta, B, C = (mx.fast.rms_norm(v, w, self.mixer_rms_eps).astype(v.dtype)
                           for v, w in zip((delta, B, C), weights))
        return _without_bias(self.dt_proj, delta), B, C

    def __call__(self, x, cache=None, mask=None):
        """mask (B, T): 0 marks left padding, which leaves the conv window and the state as they
        were, so a padded row gets exactly what it gets alone, also over a non-empty cache."""
        x, z = mx.split(self.in_proj(x), 2, axis=-1)
        marked = cache is not None and cache.trail is not None
        windows = windows_after(cache.conv, x) if marked else None
        x, window = causal_conv1d(x, self.conv1d.weight, self.conv1d.get("bias"),
                                  cache.conv if cache else None, mask)
        x = nn.silu(x)
        delta, B, C = self._ssm_inputs(x)
        if marked:  # rewindable: the decode step's recurrence, keeping each token's state
            A = -mx.exp(self.A_log.astype(mx.float32))
            ys = []
            for t, window in enumerate(windows):
                y, ssm = ops.selective_scan_step(cache.ssm, x[:, t], delta[:, t], A, B[:, t],
                                                 C[:, t], self.D, z[:, t], self.dt_proj.bias, True)
                cache.conv, cache.ssm = window, ssm
                cache.remember()
                ys.append(y)
            return self.out_proj(mx.stack(ys, axis=1))
        bias, softplus = self.dt_proj.bias, True
        if mask is not None:
            # Δ = 0 on padding: exp(0·A) = 1 keeps the state and Δ·x = 0 adds nothing to it.
            delta = discretize_dt(delta, bias, softplus) * mask[..., None].astype(mx.float32)
            bias, softplus = None, False
        y, state = ops.selective_scan(
            x, delta, -mx.exp(self.A_log.astype(mx.float32)), B, C, self.D, z, bias, softplus,
            cache.ssm if cache else None, True)
        if cache is not None:
            cache.conv, cache.ssm = window, state
        return self.out_proj(y)

    def step(self, x, cache):
        """One token: x (B, d_model) -> (B, d_model); advances `cache` in place."""
        x, z = mx.split(self.in_proj(x), 2, axis=-1)
        x, cache.conv = causal_conv1d(x[:, None], self.conv1d.weight,
                                      self.conv1d.get("bias"), cache.conv)
        x = nn.silu(x[:, 0])
        delta, B, C = self._ssm_inputs(x)
        y, cache.ssm = ops.selective_scan_step(
            cache.ssm, x, delta, -mx.exp(self.A_log.astype(mx.float32)), B, C, self.D, z,
            self.dt_proj.bias, True)
        cache.remember()
        return self.out_proj(y)

    def shard(self, group):
        """Tensor parallel, in place: this rank keeps its share of the channels (in_proj's x and
        z rows, the conv, dt_proj's rows, A_log, D, and the columns of x_proj and out_proj).
        x_proj contracts over every channel: its partial Δ, B, C are summed over the group (one
        sum of dt_rank + 2N per token) before the norms that follow. Returns the plan."""
        E = self.conv1d.weight.shape[0]
        c0, c1 = share(E, group, "Mamba1 channels (d_inner)")
        channels = [(c0, c1)]
        plan = shard_input(self, "in_proj", channels + [(E + c0, E + c1)])
        plan.update(shard_input(self, "dt_proj", channels))
        local = {f"conv1d.{name}": (0, channels) for name in ("weight", "bias")
                 if name in self.conv1d}
        local.update({name: (0, channels) for name in ("A_log", "D")})
        apply_plan(self, local)
        plan.update(local)
        plan.update(shard_output(self, "x_proj", channels, group, "Mamba1 x_proj"))
        plan.update(shard_output(self, "out_proj", channels, group, "Mamba1 out_proj"))
        return plan
