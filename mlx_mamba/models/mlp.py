"""Feed-forward layers: SiLU-gated (Bamba, Granite) or squared-ReLU without a gate (Nemotron-H)."""

import mlx.core as mx
import mlx.nn as nn


def relu2(x):
    return mx.square(nn.relu(x))


ACTIVATIONS = {"silu": nn.silu, "relu2": relu2}
GATED = {"silu": True, "relu2": False}


class MLP(nn.Module):
    """x (..., d_model) -> (..., d_model): down(act(gate(x)) * up(x)), or down(act(up(x)))."""

    def __init__(self, d_model, hidden, activation="silu", bias=False):
        super().__init__()
        self.activation = activation
        if GATED[activation]:
            self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def __call__(self, x, cache=None, mask=None):
        act = ACTIVATIONS[self.activation]
        h = act(self.gate_proj(x)) * self.up_proj(x) if "gate_proj" in self else act(self.up_proj(x))
        return self.down_proj(h)

    def step(self, x, cache=None):
        return self(x)

    def make_cache(self, batch_size=1):
        return None
