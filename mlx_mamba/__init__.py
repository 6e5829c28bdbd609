"""Mamba (selective SSM) and Mamba2 (SSD) for Apple's MLX."""

from . import ops
from .cache import MambaCache
from .config import ModelConfig
from .loader import load
from .models import Mamba1, Mamba2, Model

__version__ = "0.1.0"
