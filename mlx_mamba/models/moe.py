"""Mixture of experts: a router picks top-k experts per token; the experts' weights are stacked
(E, out, in) and applied with `mx.gather_mm` / `mx.gather_qmm` over tokens sorted by expert, never a
loop over experts. Routing follows the family: softmax scores over all experts, the top-k
renormalised (Granite: the same as a softmax over the top-k logits) or not (Jamba), or sigmoid
scores with a correction bias, chosen within the best groups, normalised and scaled
(Nemotron 3)."""

import math

import mlx.core as mx
import mlx.nn as nn

from .mlp import ACTIVATIONS, GATED, MLP
from .sharding import all_sum, apply_plan, columns_plan, prefixed, shard_input, share


def _top_k(scores, k):
    """The ids (N, k) of the k highest scores per row. The choice is discrete: gradients reach the
    router through the chosen experts' weights, never through the ids."""
    return mx.stop_gradient(mx.argpartition(-scores, k - 1, axis=-1)[:, :k])


class ExpertLinear(nn.Module):
    """E linear maps stacked: x (..., in) with expert ids (...) -> (..., out)."""

    def __init__(self, n_experts, in_dims, out_dims):
        super().__init__()
        bound = 1 / math.sqrt(in_dims)
        self.weight = mx.random.uniform(-bound, bound, (n_experts, out_dims, in_dims))

    def __call__(self, x, experts, sorted_indices=False):
        weight, dtype = self.weight, x.dtype
        if dtype != mx.float32 and mx.default_device() == mx.cpu:
            # MLX 0.32's CPU gather_mm takes float32 only; Metal and CUDA take every float dtype.
            x, weight = x.astype(mx.float32), weight.astype(mx.float32)
        y = mx.gather_mm(x[..., None, :], weight.swapaxes(-1, -2), rhs_indices=experts,
                         sorted_indices=sorted_indices)[..., 0, :]
        return y.astype(dtype)

    def to_quantized(self, group_size=64, bits=4, mode="affine"):
        return QuantizedExpertLinear(self, group_size, bits, mode)


class QuantizedExpertLinear(nn.Module):
    def __init__(self, linear, group_size, bits, mode):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        quantized = mx.quantize(linear.weight, group_size, bits, mode=mode)
        self.weight, self.scales = quantized[0], quantized[1]
        if len(quantized) > 2 and quantized[2] is not None:
            self.biases = quantized[2]
        self.freeze()

    def __call__(self, x, experts, sorted_indices=False):
        return mx.gather_qmm(x[..., None, :], self.weight, self.scales, self.get("biases"),
                             rhs_indices=experts, transpose=True, group_size=self.group_size,
                             bits=self.bits, mode=self.mode,
                             sorted_indices=sorted_indices)[..., 0, :]


class Experts(nn.Module):
    """E MLPs of the same shape, gated or not, applied to each token's chosen experts."""

    def __init__(self, n_experts, d_model, hidden, activation):
        super().__init__()
        self.activation = activation
        if GATED[activation]:
            self.gate_proj = ExpertLinear(n_experts, d_model, hidden)
        self.up_proj = ExpertLinear(n_experts, d_model, hidden)
        self.down_proj = ExpertLinear(n_experts, hidden, d_model)

    def __call__(self, x, experts):
        """x (N, D), experts (N, k) -> (N, k, D), each token through each of its experts."""
        n, k = experts.shape
        # Sorted by expert, consecutive rows share a weight matrix: gather_mm's fast path.
        order = mx.argsort(experts.flatten())
        rows = x[order // k]  # (N*k, D)
        # One id per row: the layout whose gradient gather_mm's sorted path computes (MLX 0.32
        # fails to differentiate it with ids of shape (N*k, 1)).
        chosen = experts.flatten()[order]  # (N*k,)
        act = ACTIVATIONS[self.activation]
        h = act(self.up_proj(rows, chosen, True)) if "gate_proj" not in self else \
            act(self.gate_proj(rows, chosen, True)) * self.up_proj(rows, chosen, True)
        y = self.down_proj(h, chosen, True)  # (N*k, D)
        return y[mx.argsort(order)].reshape(n, k, -1)


class MoE(nn.Module):
    """x (..., d_model) -> (..., d_model): the routed experts' weighted sum, plus the shared
    expert's output when there is one."""

    def __init__(self, d_model, n_experts, top_k, hidden, activation="silu", shared_hidden=0,
                 router="softmax", groups=1, topk_groups=1, normalize=True, scale=1.0,
                 latent=0, bias=False):
        super().__init__()
        self.top_k, self.router_kind = top_k, router
        self.groups, self.topk_groups = groups, topk_groups
        self.normalize, self.scale = normalize, scale
        self.router = nn.Linear(d_model, n_experts, bias=False)
        if router == "sigmoid":
            self.score_bias = mx.zeros((n_experts,))
        if latent:
            self.latent_in = nn.Linear(d_model, latent, bias=bias)
            self.latent_out = nn.Linear(latent, d_model, bias=bias)
        self.experts = Experts(n_experts, latent or d_model, hidden, activation)
        if shared_hidden:
            self.shared_experts = MLP(d_model, shared_hidden, activation, bias)
        self._group = None  # tensor parallel: the experts' outputs are partial sums over it

    def shard(self, group):
        """Tensor parallel, in place: every expert keeps this rank's share of its hidden size
        (gate and up rows, down columns); routing stays whole and identical on every rank, and
        the experts' weighted sum is summed over the group once. The shared expert is an MLP
        split the same way. Returns the plan."""
        hidden = self.experts.up_proj.weight.shape[1]
        rows = [share(hidden, group, "experts' intermediate size")]
        down = columns_plan(self.experts.down_proj, rows, group, "experts' down_proj")
        plan = prefixed("experts.down_proj", down)
        apply_plan(self.experts.down_proj, down)
        for name in ("gate_proj", "up_proj"):
            if name in self.experts:
                plan.update(prefixed("experts", shard_input(self.experts, name, rows)))
        if "shared_experts" in self:  # its partial sum joins the experts' in one all_sum
            plan.update(prefixed("shared_experts", self.shared_experts.shard(group, False)))
        self._group = group
        return plan

    def route(self, x):
        """x (N, D) -> expert ids (N, k), weights (N, k) in float32: the top-k scores."""
        # Routing decides discrete choices: computed in float32 whatever the weights' dtype.
        logits = x.astype(mx.float32) @ self.router.weight.astype(mx.float32).T
        scores = mx.softmax(logits, axis=-1) if self.router_kind == "softmax" else mx.sigmoid(logits)
        choice = scores + self.score_bias.astype(mx.float32) if "score_bias" in self else scores
        if self.topk_groups < self.groups:
            n, e = choice.shape
            grouped = choice.reshape(n, self.groups, e // self.groups)
            group_scores = mx.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)  # (N, groups)
            threshold = mx.sort(group_scores, axis=-1)[:, -self.topk_groups][:, None]
            keep = (group_scores >= threshold)[..., None]
            choice = mx.where(keep, grouped, -math.inf).reshape(n, e)
        experts = _top_k(choice, self.top_k)
        weights = mx.take_along_axis(scores, experts, axis=-1)
        if self.normalize:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        return experts, weights * self.scale

    def __call__(self, x, cache=None, mask=None):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        experts, weights = self.route(flat)
        inner = self.latent_in(flat) if "latent_in" in self else flat
        y = (self.experts(inner, experts) * weights[..., None].astype(x.dtype)).sum(axis=1)
        # Tensor parallel, y is this rank's partial sum: everything up to the one all_sum is
        # linear in it (latent_out included), so a single sum serves the experts and the shared
        # expert; the biases that every rank added are then taken out but once.
        if "latent_out" in self:
            y = self.latent_out(y)
        y = y.reshape(shape)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        if self._group is None:
            return y
        y = all_sum(y, self._group)
        excess = self._group.size() - 1  # copies of the replicated biases in the sum
        if "latent_out" in self and "bias" in self.latent_out:
            y = y - excess * self.latent_out.bias
        if "shared_experts" in self and "bias" in self.shared_experts.down_proj:
            y = y - excess * self.shared_experts.down_proj.bias
        return y

    def step(self, x, cache=None):
        return self(x)

    def make_cache(self, batch_size=1):
        return None
