"""Feed-forward layers: SiLU-gated (Bamba, Granite) or squared-ReLU without a gate (Nemotron-H)."""

import mlx.core as mx
import mlx.nn as nn

from .sharding import apply_plan, columns_plan, prefixed, shard_input, shard_output, share


def relu2(x):
    return mx.square(nn.relu(x))


ACTIVATIONS = {"silu": nn.silu, "gelu": nn.gelu, "relu2": relu2}
GATED = {"silu": True, "gelu": True, "relu2": False}


class MLP(nn.Module):
    """x (..., d_model) -> (..., d_model): down(act(gate(x)) * up(x)), or down(act(up(x))).
    multipliers (gate, down) scale the gate's pre-activation and the output (Falcon-H1's µP)."""

    def __init__(self, d_model, hidden, activation="silu", bias=False, multipliers=(1.0, 1.0)):
        super().__init__()
        self.activation = activation
        self.gate_multiplier, self.down_multiplier = multipliers
        if GATED[activation]:
            self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def __call__(self, x, cache=None, mask=None, extra=None):
        """extra: (gate, up) terms added to those projections (Zamba2's adapters), or None."""
        act = ACTIVATIONS[self.activation]
        if "gate_proj" not in self:
            return self.down_proj(act(self.up_proj(x)))
        gate, up = self.gate_proj(x), self.up_proj(x)
        if extra is not None:
            gate, up = gate + extra[0], up + extra[1]
        if self.gate_multiplier != 1.0:
            gate = gate * self.gate_multiplier
        y = self.down_proj(act(gate) * up)
        return y * self.down_multiplier if self.down_multiplier != 1.0 else y

    def shard(self, group, summed=True):
        """Tensor parallel, in place: gate and up keep this rank's rows of the hidden size, down
        its columns, and sums over the group; with summed=False the output is this rank's
        partial sum (bias included), which the caller sums with its own. Returns the plan."""
        hidden = self.up_proj.weight.shape[0]
        rows = [share(hidden, group, "MLP intermediate size")]
        plan = {}
        for name in ("gate_proj", "up_proj"):
            if name in self:
                plan.update(shard_input(self, name, rows))
        if summed:
            plan.update(shard_output(self, "down_proj", rows, group, "MLP down_proj"))
        else:
            down = columns_plan(self.down_proj, rows, group, "MLP down_proj")
            apply_plan(self.down_proj, down)
            plan.update(prefixed("down_proj", down))
        return plan

    def step(self, x, cache=None):
        return self(x)

    def make_cache(self, batch_size=1):
        return None
