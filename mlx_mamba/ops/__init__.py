"""Scan operations of Mamba1 (selective scan) and Mamba2 (SSD), dispatched to a backend.

Backends: "metal" (Apple GPU kernels), "cuda" (NVIDIA kernels) and "reference" (pure MLX, runs
everywhere). "auto" picks the kernels of the default device when they exist. Force one with the
`backend=` argument or the MLX_MAMBA_BACKEND environment variable.
"""

import importlib
import os

import mlx.core as mx

from . import reference
from .arguments import OpArgumentError, check

BACKENDS = ("auto", "metal", "cuda", "reference")


def _auto_backend():
    if mx.default_device() == mx.gpu:
        if mx.metal.is_available():
            return "metal"
        if mx.cuda.is_available():
            return "cuda"
    return "reference"


def resolve_backend(backend=None):
    """The name of the backend that an op called with `backend` runs on."""
    name = backend or os.environ.get("MLX_MAMBA_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return _auto_backend() if name == "auto" else name


def _module(backend):
    name = resolve_backend(backend)
    if name == "reference":
        return reference
    # Imported on demand: a machine without that backend never builds its kernels.
    return importlib.import_module(f"{__name__}.{name}")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   state=None, return_last_state=False, *, backend=None):
    """Mamba1 scan. u, delta, z (B, L, D); A (D, N); B, C (B, L, N); state (B, D, N).

    Returns y (B, L, D), and the last state (B, D, N) in float32 with `return_last_state`.
    """
    check("selective_scan", locals())  # every argument, before any backend sees it
    return _module(backend).selective_scan(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, state, return_last_state)


def ssd(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
        dt_limit=(0.0, float("inf")), initial_states=None, return_final_states=False, *,
        backend=None):
    """Mamba2 state-space duality. x, z (B, L, H, P); dt (B, L, H); A, dt_bias (H,); D (H,) or
    (H, P); B, C (B, L, G, N), G dividing H; states (B, H, P, N); chunk_size a positive int;
    dt_limit a pair of numbers.

    Returns y (B, L, H, P), and the final states in float32 with `return_final_states`.
    """
    check("ssd", locals())  # every argument, before any backend sees it
    return _module(backend).ssd(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states,
        return_final_states)


def selective_scan_step(state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                        delta_softplus=False, *, backend=None):
    """One Mamba1 token. state (B, D, N) float32; u, delta, z (B, D); A (D, N); B, C (B, N).

    Returns (y (B, D), new state).
    """
    check("selective_scan_step", locals())  # every argument, before any backend sees it
    return _module(backend).selective_scan_step(
        state, u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def ssd_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, float("inf")), *, backend=None):
    """One Mamba2 token. state (B, H, P, N) float32; x, z (B, H, P); dt (B, H); A, dt_bias (H,);
    D (H,) or (H, P); B, C (B, G, N).

    Returns (y (B, H, P), new state).
    """
    check("ssd_step", locals())  # every argument, before any backend sees it
    return _module(backend).ssd_step(
        state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)
