from .attention import Attention
from .mamba1 import Mamba1
from .mamba2 import Mamba2
from .mamba3 import Mamba3
from .mlp import MLP
from .model import Model
from .moe import MoE
