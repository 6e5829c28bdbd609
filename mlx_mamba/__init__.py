"""Mamba (selective SSM) and Mamba2 (SSD) for Apple's MLX."""

from . import ops
from .cache import MambaCache
from .config import ModelConfig
from .loader import load
from .models import Mamba1, Mamba2, Model

__version__ = "0.1.0"
from .generate import batch_generate, generate, stream_generate

# `python -m mlx_mamba.generate` runs a module that the line above has already imported, as in
# mlx-lm; that is intended, so runpy's warning about it is silenced.
__import__("warnings").filterwarnings(
    "ignore", message="'mlx_mamba.generate' found in sys.modules", category=RuntimeWarning)
