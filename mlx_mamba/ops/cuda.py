"""CUDA kernels (NVIDIA GPU, through mx.fast.cuda_kernel) of the scan ops; the shared bodies are in kernel_source.py, the glue in kernel_ops.py."""
from functools import partial

from . import kernel_ops

selective_scan = partial(kernel_ops.selective_scan, "cuda")
ssd = partial(kernel_ops.ssd, "cuda")
selective_scan_step = partial(kernel_ops.selective_scan_step, "cuda")
ssd_step = partial(kernel_ops.ssd_step, "cuda")
