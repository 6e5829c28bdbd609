from .mamba1 import Mamba1
from .mamba2 import Mamba2
from .model import Model
