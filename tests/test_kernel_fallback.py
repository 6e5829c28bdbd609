"""The first-use check of the kernels: a kernel that does not build, does not run or gives a wrong
answer is reported once and replaced by the reference path, for forward, step and gradient work.

Failures are injected into the emulated kernels of tests/metal_emulator: source text the compiler
rejects, a kernel factory that raises, and outputs that are off.
"""
import warnings

import mlx.core as mx
import pytest

from comparing import assert_close
from kernel_texts import PLANTED_NAN, plant
from metal_emulator import harness
from mlx_mamba import ops
from mlx_mamba.ops import kernel_ops, kernel_source

pytestmark = pytest.mark.skipif(harness.compiler() is None,
                                reason="g++ is missing: the kernel emulator compiles kernels with it")

SHAPE = dict(b=1, L=5, H=2, P=4, G=1, N=128)  # 8 channels a group: 32 lanes x 4 states, CPG = 4, TC = 8


@pytest.fixture
def checking(monkeypatch):
    """Emulated kernels, checked on first use as outside the tests."""
    harness.install(monkeypatch)
    monkeypatch.delenv("MLX_MAMBA_KERNEL_CHECK", raising=False)  # the suite turns the check off (conftest.py)
    kernel_ops._kernel.cache_clear()
    kernel_ops._trusted.cache_clear()
    yield
    kernel_ops._kernel.cache_clear()
    kernel_ops._trusted.cache_clear()


@pytest.fixture(params=["metal", "cuda"])
def backend(request, checking):
    return request.param


def inputs():
    # x, z (b, L, H, P); dt (b, L, H); A, D, dt_bias (H,); B, C (b, L, G, N); states (b, H, P, N)
    s = SHAPE
    mx.random.seed(7)
    r = lambda *shape: mx.random.normal(shape)  # noqa: E731
    return dict(x=r(s["b"], s["L"], s["H"], s["P"]), dt=r(s["b"], s["L"], s["H"]), A=-mx.exp(r(s["H"])),
                B=r(s["b"], s["L"], s["G"], s["N"]), C=r(s["b"], s["L"], s["G"], s["N"]), D=r(s["H"]),
                z=r(s["b"], s["L"], s["H"], s["P"]), dt_bias=r(s["H"]) * 0.1, dt_softplus=True,
                initial_states=r(s["b"], s["H"], s["P"], s["N"]))


def forward(backend):
    return ops.ssd(**inputs(), chunk_size=4, return_final_states=True, backend=backend)


def step(backend):
    x = inputs()
    first = {k: x[k][:, 0] for k in ("x", "dt", "B", "C", "z")}
    return ops.ssd_step(x["initial_states"], **first, A=x["A"], D=x["D"], dt_bias=x["dt_bias"],
                        dt_softplus=True, backend=backend)


def gradients(backend):
    x = inputs()
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]

    def loss(*arrays):
        y, last = ops.ssd(**dict(x, **dict(zip(names, arrays))), chunk_size=4, return_final_states=True,
                          backend=backend)
        return (y * y).sum() + last.sum()
    return mx.grad(loss, argnums=tuple(range(len(names))))(*(x[k] for k in names))


PATHS = {"forward": (forward, "fwd"), "step": (step, "fwd"), "gradient": (gradients, "bwd")}


def reject_source(monkeypatch, kind):
    monkeypatch.setitem(kernel_source.BODIES, kind, kernel_source.BODIES[kind] + "\n  this is not C++;\n")


def factory_raises(monkeypatch, kind):
    for backend, factory in (("metal", "metal_kernel"), ("cuda", "cuda_kernel")):
        build = getattr(mx.fast, factory)

        def refuse(*args, _build=build, **kw):
            if kw["name"].endswith(kind):
                raise RuntimeError(f"[{factory}] planted compile error")
            return _build(*args, **kw)
        monkeypatch.setattr(mx.fast, factory, refuse)


def wrong_answer(monkeypatch, kind):
    run = harness.EmulatedKernel.__call__

    def off_by_one(self, **kw):
        outs = run(self, **kw)
        return [outs[0] + 1, *outs[1:]] if self.name.endswith(kind) else outs
    monkeypatch.setattr(harness.EmulatedKernel, "__call__", off_by_one)


INJECTIONS = {"source rejected": (reject_source, "EmulatorError"),
              "factory raises": (factory_raises, "planted compile error"),
              "wrong answer": (wrong_answer, "differs from the reference")}


def launches(kind):
    return sum(launch["name"].endswith(kind) for launch in harness.LAUNCHES)


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("path", PATHS)
def test_a_failing_kernel_falls_back_once(backend, monkeypatch, path, injection):
    run, kind = PATHS[path]
    inject, named = INJECTIONS[injection]
    inject(monkeypatch, kind)
    want = run("reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = run(backend)
        tried = launches(kind)
        again = run(backend)
    # The reference's answer (gradients: up to the kernel's forward y, which the loss uses)
    for got in (first, again):
        assert_close(dict(enumerate(got)), dict(enumerate(want)), 1e-5)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert named in messages[0] and "MLX_MAMBA_BACKEND=reference" in messages[0]
    assert f"the {backend} " in messages[0]
    assert launches(kind) == tried  # the broken kernel is not tried again


def test_a_kernel_writing_nan_into_some_gradients_falls_back(backend, monkeypatch):
    """The issue's planted bug: the forward kernel's checkpoints of a thread's channels saved over
    its first channel's. Its gradient errors on the check's input are [1e-7, nan, nan, 1e-7, nan,
    ...]: a max() over them would trust it; each output judged on its own, it falls back."""
    plant(monkeypatch, *PLANTED_NAN)
    want = gradients("reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = gradients(backend)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "backward (gradient) scan kernel" in messages[0], messages
    assert "its gradient of dt holds NaN or Inf" in messages[0], messages[0]
    assert_close(dict(enumerate(got)), dict(enumerate(want)), 1e-5)


def test_a_working_kernel_is_checked_once_and_used(backend):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gradients(backend)
        checked = len(harness.LAUNCHES)
        got = gradients(backend)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    # Again: no check, only the op's own launches (forward, forward saving states, backward).
    assert len(harness.LAUNCHES) - checked == 3
    assert_close(dict(enumerate(got)), dict(enumerate(gradients("reference"))), 1e-5)
    assert kernel_ops._trusted.cache_info().currsize == 2  # forward and backward, one key each


def test_import_checks_nothing():
    import importlib
    kernel_ops._trusted.cache_clear()
    for name in ("metal", "cuda"):
        importlib.import_module(f"mlx_mamba.ops.{name}")
    assert kernel_ops._trusted.cache_info().currsize == 0


def test_check_runs_the_instantiation_it_vouches_for():
    """The check's input (N = S * NPL states, one head of CPG channels a group) gets the same
    template sizes."""
    for kind in ("fwd", "bwd"):
        for N in (1, 4, 12, 16, 17, 40, 64, 100, 128, 256, 1024):
            for P, heads_per_group in ((1, 1), (1, 3), (1, 5), (1, 1536), (3, 1), (4, 2), (64, 1),
                                       (64, 24), (96, 1)):
                layout = kernel_ops._layout(kind, N, P, P * heads_per_group)
                check = kernel_ops._layout(kind, layout.S * layout.NPL, layout.CPG, layout.CPG)
                assert check == layout, (kind, N, P, heads_per_group)


@pytest.mark.parametrize("model", ["mamba1", "mamba2"])
def test_the_check_runs_the_kernel_that_ops_without_options_run(checking, model):
    """Metal compiles a kernel apart for inputs of fewer than 8 elements: the placeholders of
    absent inputs must not make the op's kernel another one than the check's."""
    mx.random.seed(8)
    r = lambda *shape: mx.random.normal(shape)  # noqa: E731
    if model == "mamba1":  # 16 channels, N = 16
        ops.selective_scan(r(1, 3, 16), mx.abs(r(1, 3, 16)), -mx.exp(r(16, 16)), r(1, 3, 16), r(1, 3, 16),
                           backend="metal")
    else:  # 8 heads of 4 channels, one group, N = 16
        ops.ssd(r(1, 3, 8, 4), mx.abs(r(1, 3, 8)), -mx.exp(r(8)), r(1, 3, 1, 16), r(1, 3, 1, 16), 4,
                backend="metal")
    checked, used = harness.LAUNCHES[-2:]
    assert kernel_ops._trusted.cache_info().currsize == 1
    assert used["kernel"] == checked["kernel"] and used["text"] == checked["text"]
