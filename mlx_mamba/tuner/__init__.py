"""Fine-tuning: LoRA, DoRA and QLoRA adapters, full fine-tuning, data and the training loop."""

from .adapters import (AdapterError, apply_adapters, load_adapter_weights, load_adapters,
                       save_adapters)
from .datasets import Batch, DataError, iterate_batches, load_split
from .lora import DoRALinear, LoRALinear, fuse_linear
from .schedules import make_schedule
from .trainer import TrainingError, checkpoint_layers, evaluate, loss_terms, train
