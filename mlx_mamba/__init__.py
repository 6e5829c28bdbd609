"""Mamba (selective SSM) and Mamba2 (SSD) for Apple's MLX."""

import logging
import warnings

from . import ops
from .cache import Mamba3Cache, MambaCache
from .config import ModelConfig
from .generate import batch_generate, generate, stream_generate
from .loader import load
from .models import Mamba1, Mamba2, Mamba3, Model
from .sharded import sharded_load
from .token_ids import check_token_ids

__version__ = "0.1.0"

# `python -m mlx_mamba.generate` runs a module that this package has already imported (for the
# `generate` function, as in mlx-lm); that is intended, so runpy's warning about it is silenced.
warnings.filterwarnings(
    "ignore", message="'mlx_mamba.generate' found in sys.modules", category=RuntimeWarning)

# transformers (imported for tokenizers only) logs on import that it found no PyTorch, which this
# package never needs: that one message is dropped, every other one of transformers' is kept.
logging.getLogger("transformers").addFilter(
    lambda record: not str(record.msg).startswith("PyTorch was not found"))
