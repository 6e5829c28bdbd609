from .attention import Attention
from .mamba1 import Mamba1
from .mamba2 import Mamba2
from .mlp import MLP
from .model import Model
from .moe import MoE
