"""Per-layer decoding state: the last inputs of the causal conv and the SSM state, constant size."""

import mlx.core as mx


class MambaCache:
    """One layer's state. conv (B, K-1, C): the conv's last inputs; ssm: the SSM state in float32,
    (B, E, N) for Mamba1 and (B, H, P, N) for Mamba2. Updated in place by the layer."""

    def __init__(self, conv, ssm):
        self.conv = conv
        self.ssm = ssm

    @classmethod
    def zeros(cls, batch_size, conv_width, conv_channels, ssm_shape, dtype=mx.float32):
        return cls(mx.zeros((batch_size, conv_width, conv_channels), dtype=dtype),
                   mx.zeros((batch_size, *ssm_shape), dtype=mx.float32))

    @property
    def state(self):
        return [self.conv, self.ssm]

    @state.setter
    def state(self, arrays):
        self.conv, self.ssm = arrays
