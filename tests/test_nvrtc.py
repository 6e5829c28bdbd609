"""The CUDA kernels through NVIDIA's compiler: every kernel the package hands to
`mx.fast.cuda_kernel` (forward and backward; a decode step is the forward kernel with L = 1), for
each dtype and the template sizes of real checkpoints, wrapped as MLX wraps it (the emulator's
`harness.cuda_source`), compiled by NVRTC from its PyPI wheel for sm_80 and sm_90 as MLX compiles
custom kernels on those GPUs (see nvrtc_compiler.py).

MLX's own utils.cuh cannot be installed here (KERNELS.md says why): the kernels are compiled
against nvrtc_mlx_utils.cuh, which declares what it declares. To compile against MLX's real device
headers, point MLX_MAMBA_MLX_DEVICE_HEADERS at a directory holding them (mlx/backend/cuda/device of
an MLX source tree at the installed version).
"""
import os
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import pytest

import nvrtc_compiler
from metal_emulator import harness
from mlx_mamba.ops import kernel_ops
from mlx_mamba.ops import kernel_source as ks

FOUND = nvrtc_compiler.locate()
pytestmark = pytest.mark.skipif(
    FOUND is None, reason="NVIDIA's compiler is not installed: the wheels nvidia-cuda-nvrtc, "
    "nvidia-cuda-runtime and nvidia-cuda-cccl (pip install -e '.[test]' on Linux x86-64)")

HEADER_NAME = "mlx/backend/cuda/device/utils.cuh"
# (N, channels per B/C group) of real checkpoints. Mamba1 (N = 16): d_inner 1536 (130m) to 5120
# (2.8b). Mamba2, P = 64: N = 128 with one group (mamba2-130m: 1536, mamba2-2.7b: 5120) or eight
# (Codestral, Nemotron-H: 16 heads = 1024 channels a group); N = 64 (Zamba2: 64 heads, one group).
CHECKPOINT_SHAPES = [(16, 1536), (16, 5120), (128, 1536), (128, 5120), (128, 1024), (64, 4096)]
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Inputs in the scan's dtype T; `params` is int32, every other input float32 (kernel_ops._launch).
T_INPUTS = {"u", "dt", "Bm", "Cm", "z", "gy"}


def _template(dtype, N, channels_per_group):
    S, NPL, CPG, TC = kernel_ops._layout(N, channels_per_group)
    return [("T", dtype), ("S", S), ("NPL", NPL), ("CPG", CPG), ("TC", TC)]


def _signature(kind, dtype):
    """(input dtypes, output dtypes) of kernel `kind` for scan dtype `dtype`."""
    names = ks.FWD_INPUTS if kind == "fwd" else ks.BWD_INPUTS
    ins = [dtype if n in T_INPUTS else mx.int32 if n == "params" else mx.float32 for n in names]
    outs = [dtype if kind == "fwd" and n == "y" else mx.float32
            for n in (ks.FWD_OUTPUTS if kind == "fwd" else ks.BWD_OUTPUTS)]
    return ins, outs


def wrapped(kind, dtype, template, source=None):
    """(kernel name, full text) of kernel `kind` as MLX compiles it; `source` replaces the body."""
    header, body = ks.render("cuda", kind)
    kernel = types.SimpleNamespace(
        name=f"mlx_mamba_scan_{kind}", header=header, source=body if source is None else source,
        input_names=ks.FWD_INPUTS if kind == "fwd" else ks.BWD_INPUTS,
        output_names=ks.FWD_OUTPUTS if kind == "fwd" else ks.BWD_OUTPUTS)
    ins, outs = _signature(kind, dtype)
    return harness.cuda_source(kernel, [mx.zeros((1,), d) for d in ins], outs, template)


def _device_headers():
    real = os.environ.get("MLX_MAMBA_MLX_DEVICE_HEADERS")
    if real:
        return {f"mlx/backend/cuda/device/{p.name}": p.read_text() for p in Path(real).iterdir()
                if p.suffix in (".h", ".cuh")}
    return {HEADER_NAME: (Path(__file__).parent / "nvrtc_mlx_utils.cuh").read_text()}


def _cases():
    cases = {}
    for kind in ("fwd", "bwd"):
        for dname, dtype in DTYPES.items():
            for N, cpg in CHECKPOINT_SHAPES:
                template = _template(dtype, N, cpg)
                sizes = "_".join(f"{k}{v}" for k, v in template[1:])
                for arch in nvrtc_compiler.ARCHITECTURES:
                    cases[f"{kind}-{dname}-{sizes}-{arch}"] = (kind, dtype, template, arch)
    return cases  # distinct layouts only: shapes with the same template sizes give one case


CASES = _cases()


@pytest.fixture(scope="module")
def compiler():
    return nvrtc_compiler.Nvrtc(*FOUND)


@pytest.fixture(scope="module")
def compiled(compiler):
    """Every case compiled once, two at a time (NVRTC releases the GIL): case -> result or error."""
    def build(case):
        kind, dtype, template, arch = CASES[case]
        try:
            return compiler.compile(*wrapped(kind, dtype, template), arch, _device_headers())
        except nvrtc_compiler.NvrtcError as e:
            return e

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(CASES, pool.map(build, CASES)))


@pytest.mark.parametrize("case", CASES)
def test_kernel_compiles(compiled, case):
    result = compiled[case]
    if isinstance(result, nvrtc_compiler.NvrtcError):
        pytest.fail(str(result), pytrace=False)
    mangled, cubin_bytes, _ = result
    assert "custom_kernel_mlx_mamba_scan" in mangled and cubin_bytes > 0


def test_every_checkpoint_layout_is_compiled():
    layouts = {tuple(_template(mx.float32, N, cpg)[1:]) for N, cpg in CHECKPOINT_SHAPES}
    compiled_layouts = {tuple(t[1:]) for _, _, t, _ in CASES.values()}
    assert layouts == compiled_layouts and len(CASES) == 2 * 3 * 2 * len(layouts)


@pytest.mark.parametrize("planted, message", [
    ("  undeclared_thing += 1;\n", 'identifier "undeclared_thing" is undefined'),
    ("  float broken = ;\n", "expected an expression"),
])
def test_a_broken_kernel_fails_with_the_compiler_log(compiler, planted, message):
    template = _template(mx.float16, 128, 1024)
    body = ks.render("cuda", "bwd")[1]
    with pytest.raises(nvrtc_compiler.NvrtcError) as e:
        compiler.compile(*wrapped("bwd", mx.float16, template, body + planted), "sm_90", _device_headers())
    assert message in str(e.value) and "NVRTC rejected" in str(e.value)


def test_signature_matches_the_launches(monkeypatch):
    """The dtypes and template sizes compiled here are the ones kernel_ops launches: every launch
    of a float16 Mamba2 scan and its gradient is recorded (the kernels return zeros)."""
    launches = []

    class Recorder:
        def __init__(self, name, input_names, output_names, source, header="", **_):
            self.kind = "fwd" if input_names == ks.FWD_INPUTS else "bwd"

        def __call__(self, *, inputs, output_shapes, output_dtypes, template, **_):
            launches.append((self.kind, [a.dtype for a in inputs], list(output_dtypes), list(template)))
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]

    monkeypatch.setattr(mx.fast, "cuda_kernel", Recorder)
    kernel_ops._kernel.cache_clear()
    batch, L, H, P, G, N = 1, 3, 4, 64, 2, 64
    x = mx.zeros((batch, L, H, P), mx.float16)
    dt = mx.zeros((batch, L, H), mx.float16)
    B = mx.zeros((batch, L, G, N), mx.float16)

    def loss(x):
        return kernel_ops.ssd("cuda", x, dt, -mx.ones((H,)), B, B, 256, mx.ones((H,)), x, mx.zeros((H,)),
                              True, (0.0, float("inf")), None, False).astype(mx.float32).sum()

    mx.eval(mx.grad(loss)(x))
    kernel_ops._kernel.cache_clear()
    assert {kind for kind, *_ in launches} == {"fwd", "bwd"}
    for kind, ins, outs, template in launches:
        assert (ins, outs) == _signature(kind, mx.float16)
        assert template == _template(mx.float16, N, H // G * P)
