"""C³A: Circular Convolution Adaptation for parameter-efficient fine-tuning."""

from .config import C3AConfig
from .functional import block_circular_conv, circulant_matrix
from .layer import C3ALinear
from .model import C3AModel, get_c3a_model

__all__ = ["C3AConfig", "C3ALinear", "C3AModel", "block_circular_conv", "circulant_matrix", "get_c3a_model"]
__version__ = "0.1.0"
