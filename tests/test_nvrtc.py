"""The CUDA kernels through NVIDIA's compiler: every kernel the package hands to
`mx.fast.cuda_kernel` (forward and backward; a decode step is the forward kernel with L = 1), for
each dtype and the template sizes of real checkpoints, wrapped as MLX wraps it
(kernel_texts.wrapped), compiled by NVRTC from its PyPI wheel for sm_80 and sm_90 as MLX compiles
custom kernels on those GPUs (nvrtc_compiler.py).

MLX's own utils.cuh cannot be installed here (KERNELS.md says why): the kernels are compiled
against nvrtc_mlx_utils.cuh, which declares the same names. To compile against MLX's real device
headers, point MLX_MAMBA_MLX_DEVICE_HEADERS at a directory holding them (mlx/backend/cuda/device of
an MLX source tree at the installed version).
"""
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import pytest

import kernel_texts
import nvrtc_compiler
from mlx_mamba.ops import kernel_source as ks

FOUND = nvrtc_compiler.locate()
pytestmark = pytest.mark.skipif(
    FOUND is None, reason="NVIDIA's compiler is not installed: the wheels nvidia-cuda-nvrtc, "
    "nvidia-cuda-runtime and nvidia-cuda-cccl (pip install -e '.[test]' on Linux x86-64)")


def _device_headers():
    """{include name: text} of MLX's device headers, which MLX hands NVRTC in memory."""
    real = os.environ.get("MLX_MAMBA_MLX_DEVICE_HEADERS")
    if real:
        return {f"mlx/backend/cuda/device/{p.name}": p.read_text() for p in Path(real).iterdir()
                if p.suffix in (".h", ".cuh")}
    return {"mlx/backend/cuda/device/utils.cuh": (Path(__file__).parent / "nvrtc_mlx_utils.cuh").read_text()}


HEADERS = _device_headers()
CASES = {f"{kind}-{dname}-{sizes}-{arch}": (kind, dtype, template, arch)
         for kind in ("fwd", "bwd") for dname, dtype in kernel_texts.DTYPES.items()
         for sizes, template in kernel_texts.checkpoint_templates(kind, dtype).items()
         for arch in nvrtc_compiler.ARCHITECTURES}


@pytest.fixture(scope="module")
def compiler():
    return nvrtc_compiler.Nvrtc(*FOUND)


@pytest.fixture(scope="module")
def compiled(compiler):
    """Every case compiled once, two at a time (NVRTC releases the GIL): case -> result or error."""
    def build(case):
        kind, dtype, template, arch = CASES[case]
        try:
            return compiler.compile(*kernel_texts.wrapped("cuda", kind, dtype, template), arch, HEADERS)
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


@pytest.mark.parametrize("planted, message", [
    ("  undeclared_thing += 1;\n", 'identifier "undeclared_thing" is undefined'),
    ("  float broken = ;\n", "expected an expression"),
])
def test_a_broken_kernel_fails_with_the_compiler_log(compiler, planted, message):
    template = kernel_texts.template("bwd", mx.float16, 128, 64, 1024)
    body = ks.render("cuda", "bwd")[1] + planted
    name, text = kernel_texts.wrapped("cuda", "bwd", mx.float16, template, source=body)
    with pytest.raises(nvrtc_compiler.NvrtcError) as e:
        compiler.compile(name, text, "sm_90", HEADERS)
    assert message in str(e.value) and "NVRTC rejected" in str(e.value)
