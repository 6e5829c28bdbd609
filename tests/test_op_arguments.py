"""Every argument of the scan ops is checked, from shapes alone, with a message naming it."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_mamba import ops


def zeros(*shape):
    return mx.zeros(shape)


# batch 2, length 5, channels 3, d_state 4
SCAN = dict(u=zeros(2, 5, 3), delta=zeros(2, 5, 3), A=zeros(3, 4), B=zeros(2, 5, 4),
            C=zeros(2, 5, 4), D=zeros(3), z=zeros(2, 5, 3), delta_bias=zeros(3),
            state=zeros(2, 3, 4))
SCAN_STEP = dict(SCAN, u=zeros(2, 3), delta=zeros(2, 3), B=zeros(2, 4), C=zeros(2, 4),
                 z=zeros(2, 3))
# batch 2, length 5, heads 6, head_dim 4, groups 3, d_state 5
SSD = dict(x=zeros(2, 5, 6, 4), dt=zeros(2, 5, 6), A=zeros(6), B=zeros(2, 5, 3, 5),
           C=zeros(2, 5, 3, 5), chunk_size=4, D=zeros(6), z=zeros(2, 5, 6, 4), dt_bias=zeros(6),
           initial_states=zeros(2, 6, 4, 5))
SSD_STEP = dict(x=zeros(2, 6, 4), dt=zeros(2, 6), A=zeros(6), B=zeros(2, 3, 5), C=zeros(2, 3, 5),
                D=zeros(6), z=zeros(2, 6, 4), dt_bias=zeros(6), state=zeros(2, 6, 4, 5))
VALID = dict(selective_scan=SCAN, selective_scan_step=SCAN_STEP, ssd=SSD, ssd_step=SSD_STEP)

# (op, bad arguments, the message)
BAD = [
    ("selective_scan", dict(u=zeros(2, 5)),
     "selective_scan: u has shape (2, 5); expected (batch, length, channels)"),
    ("selective_scan", dict(delta=zeros(2, 5, 4)),
     "selective_scan: delta has shape (2, 5, 4); expected (batch=2, length=5, channels=3)"),
    ("selective_scan", dict(A=zeros(3)),
     "selective_scan: A has shape (3,); expected (channels=3, d_state)"),
    ("selective_scan", dict(B=zeros(2, 5, 5)),
     "selective_scan: B has shape (2, 5, 5); expected (batch=2, length=5, d_state=4)"),
    ("selective_scan", dict(C=zeros(2, 4, 4)),
     "selective_scan: C has shape (2, 4, 4); expected (batch=2, length=5, d_state=4)"),
    ("selective_scan", dict(D=zeros(3, 1)),
     "selective_scan: D has shape (3, 1); expected (channels=3,)"),
    ("selective_scan", dict(z=zeros(1, 5, 3)),
     "selective_scan: z has shape (1, 5, 3); expected (batch=2, length=5, channels=3)"),
    ("selective_scan", dict(delta_bias=zeros(4)),
     "selective_scan: delta_bias has shape (4,); expected (channels=3,)"),
    ("selective_scan", dict(state=zeros(2, 4, 3)),
     "selective_scan: state has shape (2, 4, 3); expected (batch=2, channels=3, d_state=4)"),
    ("selective_scan", dict(u=mx.zeros((2, 5, 3), dtype=mx.int32)),
     "selective_scan: u has dtype mlx.core.int32; expected a floating-point dtype"),
    ("selective_scan", dict(B=mx.zeros((2, 5, 4), dtype=mx.bool_)),
     "selective_scan: B has dtype mlx.core.bool"),
    ("selective_scan", dict(u=np.zeros((2, 5, 3), np.float32)),
     "selective_scan: u must be an mx.array, got ndarray"),
    ("selective_scan", dict(A=None), "selective_scan: A must be an mx.array, got NoneType"),
    ("selective_scan", dict(u=zeros(2, 0, 3), delta=zeros(2, 0, 3)),
     "selective_scan: u has shape (2, 0, 3), an empty length axis; every size must be at least 1"),
    ("selective_scan", dict(delta_softplus="yes"),
     "selective_scan: delta_softplus must be True or False, got 'yes'"),
    ("selective_scan", dict(return_last_state=mx.array(True)),
     "selective_scan: return_last_state must be True or False, got an mx.array of shape ()"),
    ("selective_scan_step", dict(state=None),
     "selective_scan_step: state must be an mx.array, got NoneType"),
    ("selective_scan_step", dict(u=zeros(2, 5, 3)),
     "selective_scan_step: u has shape (2, 5, 3); expected (batch, channels)"),
    ("selective_scan_step", dict(B=zeros(2, 5, 4)),
     "selective_scan_step: B has shape (2, 5, 4); expected (batch=2, d_state=4)"),
    ("selective_scan_step", dict(state=zeros(2, 3, 5)),
     "selective_scan_step: state has shape (2, 3, 5); expected (batch=2, channels=3, d_state=4)"),
    ("ssd", dict(x=zeros(2, 5, 24)),
     "ssd: x has shape (2, 5, 24); expected (batch, length, heads, head_dim)"),
    ("ssd", dict(dt=zeros(2, 5, 24)),
     "ssd: dt has shape (2, 5, 24); expected (batch=2, length=5, heads=6)"),
    ("ssd", dict(A=zeros(6, 1)), "ssd: A has shape (6, 1); expected (heads=6,)"),
    ("ssd", dict(B=zeros(2, 5, 15)),
     "ssd: B has shape (2, 5, 15); expected (batch=2, length=5, groups, d_state)"),
    ("ssd", dict(C=zeros(2, 5, 3, 6)),
     "ssd: C has shape (2, 5, 3, 6); expected (batch=2, length=5, groups=3, d_state=5)"),
    ("ssd", dict(B=zeros(2, 5, 4, 5), C=zeros(2, 5, 4, 5)),
     "ssd: the 6 heads of x do not split evenly into the 4 groups of B and C"),
    ("ssd", dict(D=zeros(4)),
     "ssd: D has shape (4,); expected (heads=6,) or (heads=6, head_dim=4)"),
    ("ssd", dict(D=zeros(6, 5)),
     "ssd: D has shape (6, 5); expected (heads=6,) or (heads=6, head_dim=4)"),
    ("ssd", dict(z=zeros(2, 5, 6, 3)),
     "ssd: z has shape (2, 5, 6, 3); expected (batch=2, length=5, heads=6, head_dim=4)"),
    ("ssd", dict(dt_bias=zeros(1)), "ssd: dt_bias has shape (1,); expected (heads=6,)"),
    ("ssd", dict(initial_states=zeros(2, 6, 4, 4)),
     "ssd: initial_states has shape (2, 6, 4, 4); expected (batch=2, heads=6, head_dim=4, "
     "d_state=5)"),
    ("ssd", dict(x=mx.zeros((2, 5, 6, 4), dtype=mx.complex64)),
     "ssd: x has dtype mlx.core.complex64; expected a floating-point dtype"),
    ("ssd", dict(chunk_size=0), "ssd: chunk_size must be a positive integer, got 0"),
    ("ssd", dict(chunk_size=2.5), "ssd: chunk_size must be a positive integer, got 2.5"),
    ("ssd", dict(chunk_size=True), "ssd: chunk_size must be a positive integer, got True"),
    ("ssd", dict(chunk_size=None), "ssd: chunk_size must be a positive integer, got None"),
    ("ssd", dict(dt_limit=(0.1,)),
     "ssd: dt_limit must be a pair of numbers (lo, hi) with lo <= hi, got (0.1,)"),
    ("ssd", dict(dt_limit=(2.0, 1.0)), "ssd: dt_limit must be a pair of numbers"),
    ("ssd", dict(dt_limit=(0.0, math.nan)), "ssd: dt_limit must be a pair of numbers"),
    ("ssd", dict(dt_limit=mx.array([0.0, 1.0])),
     "ssd: dt_limit must be a pair of numbers (lo, hi) with lo <= hi, got an mx.array of shape (2,)"),
    ("ssd", dict(dt_limit=None), "ssd: dt_limit must be a pair of numbers"),
    ("ssd", dict(dt_softplus=None), "ssd: dt_softplus must be True or False, got None"),
    ("ssd", dict(return_final_states="no"), "ssd: return_final_states must be True or False"),
    ("ssd_step", dict(state=zeros(2, 6, 4)),
     "ssd_step: state has shape (2, 6, 4); expected (batch=2, heads=6, head_dim=4, d_state=5)"),
    ("ssd_step", dict(x=zeros(2, 6, 4, 1)),
     "ssd_step: x has shape (2, 6, 4, 1); expected (batch, heads, head_dim)"),
    ("ssd_step", dict(dt=zeros(2, 5, 6)),
     "ssd_step: dt has shape (2, 5, 6); expected (batch=2, heads=6)"),
    ("ssd_step", dict(B=zeros(2, 4, 5), C=zeros(2, 4, 5)),
     "ssd_step: the 6 heads of x do not split evenly into the 4 groups of B and C"),
    ("ssd_step", dict(C=zeros(2, 3, 6)),
     "ssd_step: C has shape (2, 3, 6); expected (batch=2, groups=3, d_state=5)"),
    ("ssd_step", dict(D=zeros(6, 3)),
     "ssd_step: D has shape (6, 3); expected (heads=6,) or (heads=6, head_dim=4)"),
    ("ssd_step", dict(dt_limit=[0.0]), "ssd_step: dt_limit must be a pair of numbers"),
]


@pytest.mark.parametrize("op, bad, message", BAD, ids=[f"{op}-{'-'.join(bad)}" for op, bad, _ in BAD])
def test_bad_argument_is_named(op, bad, message):
    with pytest.raises(ops.OpArgumentError) as error:
        getattr(ops, op)(**{**VALID[op], **bad})
    assert message in str(error.value)
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize("op", VALID)
def test_valid_arguments_pass(op):
    # Mamba2's D may also be (heads, head_dim).
    extra = dict(D=zeros(6, 4)) if op.startswith("ssd") else {}
    for arguments in (VALID[op], {**VALID[op], **extra}):
        mx.eval(getattr(ops, op)(**arguments))



def test_remembered_checks_tell_equal_values_of_other_types_apart():
    # A passed check is remembered by the arguments' shapes and values; 4.0 == 4 and 1 == True.
    ops.ssd(**SSD, dt_softplus=True)
    with pytest.raises(ops.OpArgumentError, match="chunk_size must be a positive integer, got 4.0"):
        ops.ssd(**dict(SSD, chunk_size=4.0), dt_softplus=True)
    with pytest.raises(ops.OpArgumentError, match="dt_softplus must be True or False, got 1"):
        ops.ssd(**SSD, dt_softplus=1)
