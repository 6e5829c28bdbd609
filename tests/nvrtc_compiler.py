"""NVIDIA's runtime compiler (NVRTC) from its PyPI wheels, through ctypes, used as MLX's CUDA
backend uses it (mlx/backend/cuda/jit_module.cpp, MLX 0.32): one program per kernel, MLX's device
headers passed in memory under their include names, the CUDA headers on the include path,
`--device-as-default-execution-space`, and for a GPU of compute capability X.Y the SASS target
`sm_XY`, with the suffix `a` from capability 9 on (NVRTC >= 11.8 compiles SASS for every GPU).
One addition, `-pch`: NVRTC's automatic precompiled header parses MLX's includes (mostly
cooperative_groups.h, 3 of the 4 seconds a kernel takes) once per process and architecture; it
changes the time, not the result.

The wheels (the `test` extra on Linux x86-64) put everything under site-packages/nvidia/cu13:
lib/libnvrtc.so.13 (nvidia-cuda-nvrtc), include/cuda_fp16.h etc. (nvidia-cuda-runtime) and
include/cccl (nvidia-cuda-cccl, the cuda::std headers MLX's utils.cuh includes).
"""
import ctypes
import importlib.util
from pathlib import Path

# MLX's jit_module.cpp adds "a" (architecture-specific features) from compute capability 9.
ARCHITECTURES = {"sm_80": "sm_80", "sm_90": "sm_90a"}


class NvrtcError(RuntimeError):
    pass


def _nvidia_dirs():
    spec = importlib.util.find_spec("nvidia")
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def _first(pattern):
    return next((p for d in _nvidia_dirs() for p in sorted(d.glob(pattern))), None)


def locate():
    """(libnvrtc path, include dirs) from the installed wheels, or None when one is absent."""
    lib = _first("*/lib/libnvrtc.so.*[0-9]")
    fp16 = _first("*/include/cuda_fp16.h")
    cccl = _first("*/include/cccl/cuda/std/array")
    if lib is None or fp16 is None or cccl is None:
        return None
    return lib, [fp16.parent, cccl.parents[2]]


class Nvrtc:
    """The few NVRTC calls MLX makes, on the library at `path`."""

    def __init__(self, path, include_dirs):
        self.lib = ctypes.CDLL(str(path))
        self.include_dirs = list(include_dirs)
        p = ctypes.c_void_p
        for name, args in {
            "nvrtcCreateProgram": [ctypes.POINTER(p), ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
                                   ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_char_p)],
            "nvrtcAddNameExpression": [p, ctypes.c_char_p],
            "nvrtcCompileProgram": [p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
            "nvrtcGetProgramLogSize": [p, ctypes.POINTER(ctypes.c_size_t)],
            "nvrtcGetProgramLog": [p, ctypes.c_char_p],
            "nvrtcGetLoweredName": [p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p)],
            "nvrtcGetCUBINSize": [p, ctypes.POINTER(ctypes.c_size_t)],
            "nvrtcDestroyProgram": [ctypes.POINTER(p)],
            "nvrtcSetPCHHeapSize": [ctypes.c_size_t],
        }.items():
            getattr(self.lib, name).argtypes = args
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        # MLX's includes need about 310 MiB of precompiled header; the default heap is 256 MiB.
        self._check("nvrtcSetPCHHeapSize", self.lib.nvrtcSetPCHHeapSize(512 << 20))

    def _check(self, what, result):
        if result != 0:
            raise NvrtcError(f"{what} failed: {self.lib.nvrtcGetErrorString(result).decode()}")

    def compile(self, kernel_name, source, arch, headers):
        """Compiles `source`, which defines the kernel `kernel_name`, for `arch` (a key of
        ARCHITECTURES) with the in-memory `headers` {include name: text}; returns (the mangled name
        of `kernel_name`, the size of the cubin, NVRTC's log). A rejected program raises
        NvrtcError carrying NVRTC's log."""
        prog = ctypes.c_void_p()
        strings = lambda xs: (ctypes.c_char_p * len(xs))(*[x.encode() for x in xs])  # noqa: E731
        self._check("nvrtcCreateProgram", self.lib.nvrtcCreateProgram(
            ctypes.byref(prog), source.encode(), f"{kernel_name.split('::')[-1]}.cu".encode(), len(headers),
            strings(list(headers.values())), strings(list(headers))))
        try:
            self._check("nvrtcAddNameExpression", self.lib.nvrtcAddNameExpression(prog, kernel_name.encode()))
            options = ["--device-as-default-execution-space", "-pch", f"--gpu-architecture={ARCHITECTURES[arch]}",
                       *(f"--include-path={d}" for d in self.include_dirs)]
            result = self.lib.nvrtcCompileProgram(prog, len(options), strings(options))
            size = ctypes.c_size_t()
            self._check("nvrtcGetProgramLogSize", self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)))
            log = ctypes.create_string_buffer(size.value + 1)
            self._check("nvrtcGetProgramLog", self.lib.nvrtcGetProgramLog(prog, log))
            log = log.value.decode(errors="replace")
            if result != 0:
                raise NvrtcError(f"NVRTC rejected {kernel_name} for {arch}:\n{log}")
            mangled = ctypes.c_char_p()
            self._check("nvrtcGetLoweredName",
                        self.lib.nvrtcGetLoweredName(prog, kernel_name.encode(), ctypes.byref(mangled)))
            cubin = ctypes.c_size_t()
            self._check("nvrtcGetCUBINSize", self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(cubin)))
            return mangled.value.decode(), cubin.value, log
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))
