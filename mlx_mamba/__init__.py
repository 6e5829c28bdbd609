"""Mamba (selective SSM) and Mamba2 (SSD) for Apple's MLX."""

import warnings

from . import ops
from .cache import MambaCache
from .config import ModelConfig
from .generate import batch_generate, generate, stream_generate
from .loader import load
from .models import Mamba1, Mamba2, Model
from .token_ids import check_token_ids

__version__ = "0.1.0"

# `python -m mlx_mamba.generate` runs a module that this package has already imported (for the
# `generate` function, as in mlx-lm); that is intended, so runpy's warning about it is silenced.
warnings.filterwarnings(
    "ignore", message="'mlx_mamba.generate' found in sys.modules", category=RuntimeWarning)
