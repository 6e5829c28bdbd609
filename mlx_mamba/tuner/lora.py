"""LoRA and DoRA layers over a frozen `nn.Linear` or `nn.QuantizedLinear` (QLoRA), and their fusion.

LoRA (Hu et al., 2021): y = W x + b + scale · B A x, with A (rank × in) random and B zero at the
start, so a fresh adapter leaves the model unchanged. DoRA (Liu et al., 2024) splits the adapted
weight into a direction and a learned per-row magnitude m:
y = m ⊙ (W + scale · B A) x / ‖W + scale · B A‖_row + b, with m starting at ‖W‖_row.
Here A is stored transposed as `lora_a` (in, rank) and B as `lora_b` (rank, out).
"""

import math

import mlx.core as mx
import mlx.nn as nn


def dense_weight(layer):
    """The float weight of a layer, dequantized when it is quantized (any layer with `scales`:
    QuantizedLinear, QuantizedEmbedding, QuantizedExpertLinear): in the scales' dtype in affine
    mode, in bfloat16 in the fp4/fp8 modes, whose scales are uint8."""
    if "scales" in layer:
        return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), layer.group_size,
                             layer.bits, layer.mode)
    return layer.weight


def _dims(linear):
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return in_dims, out_dims


class LoRALinear(nn.Module):
    """`linear` (frozen) plus a trainable low-rank update.

    Besides being called, the layer exposes the `weight` and `bias` it applies: Mamba1 reads
    `dt_proj.weight` directly because the scan adds dt_proj's bias itself, in float32. (The
    input dropout only acts when the layer is called.)
    """

    def __init__(self, linear, rank=8, scale=20.0, dropout=0.0):
        super().__init__()
        in_dims, out_dims = _dims(linear)
        if rank < 1:
            raise ValueError(f"LoRA rank {rank}: expected a positive integer")
        self.linear = linear.freeze()
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def delta(self):
        """scale · B A as an (out, in) matrix."""
        return self.scale * (self.lora_a @ self.lora_b).T

    @property
    def weight(self):
        return self.fused_weight().astype(dense_weight(self.linear).dtype)

    @property
    def bias(self):
        return self.linear.get("bias")

    def __call__(self, x):
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return y + (self.scale * z).astype(y.dtype)

    def fused_weight(self):
        return dense_weight(self.linear) + self.delta()


class DoRALinear(LoRALinear):
    """LoRA's update with a learned magnitude `m` (out,) per output row."""

    def __init__(self, linear, rank=8, scale=20.0, dropout=0.0):
        super().__init__(linear, rank, scale, dropout)
        self.m = mx.linalg.norm(dense_weight(linear).astype(mx.float32), axis=1)

    def _row_factor(self):
        # m / ‖W + ΔW‖ per row: turns the LoRA output into DoRA's; float32 for the norm.
        adapted = dense_weight(self.linear).astype(mx.float32) + self.delta()
        return self.m / mx.linalg.norm(adapted, axis=1)

    def __call__(self, x):
        bias = self.linear.get("bias")
        y = self.linear(x) if bias is None else self.linear(x) - bias
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        out = (self._row_factor() * (y + self.scale * z)).astype(y.dtype)
        return out if bias is None else out + bias

    def fused_weight(self):
        return self._row_factor()[:, None] * super().fused_weight()


def fuse_linear(layer, dequantize=False):
    """The plain layer equal to an adapted `layer`: Linear, or QuantizedLinear again when the base
    was quantized (the update is then rounded to the base's quantization) unless `dequantize`."""
    base = layer.linear
    weight = layer.weight
    bias = base.get("bias")
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    fused.weight = weight
    if bias is not None:
        fused.bias = bias
    if isinstance(base, nn.QuantizedLinear) and not dequantize:
        return nn.QuantizedLinear.from_linear(fused, base.group_size, base.bits, base.mode)
    return fused
