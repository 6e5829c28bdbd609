"""Metal kernels (Apple GPU) of the scan ops; the shared bodies are in kernel_source.py, the glue in kernel_ops.py."""
from functools import partial

from . import kernel_ops

selective_scan = partial(kernel_ops.selective_scan, "metal")
ssd = partial(kernel_ops.ssd, "metal")
selective_scan_step = partial(kernel_ops.selective_scan_step, "metal")
ssd_step = partial(kernel_ops.ssd_step, "metal")
