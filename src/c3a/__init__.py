"""C³A: Circular Convolution Adaptation for parameter-efficient fine-tuning, as PEFT's C3A tuner.

Importing ``c3a`` registers its tuner for ``peft_type="C3A"``: from then on PEFT (and everything built on it)
uses c3a's exact, fast layers. :func:`c3a.tuner.peft_reference` gives PEFT's own implementation back for a block.
"""

import logging

# PEFT imports bitsandbytes, whose CPU backend warns at import that an optional kernel package is absent (it falls
# back to its own kernels): nothing a user can act on. Quieted unless the user has set that logger's level.
if logging.getLogger("bitsandbytes.backends.cpu.ops").level == logging.NOTSET:
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from peft import PeftModel, get_peft_model  # noqa: E402

from .config import C3AConfig
from .functional import block_circular_conv, circulant_matrix
from .hotswap import hotswap_adapter
from .layer import C3AConv1D, C3ALayer, C3ALinear
from .tuner import C3AModel, peft_reference, register, unregister

register()


def get_c3a_model(model, config: C3AConfig, adapter_name: str = "default", **kwargs) -> PeftModel:
    """``peft.get_peft_model(model, config, adapter_name, **kwargs)``: a convenience, nothing more."""
    return get_peft_model(model, config, adapter_name=adapter_name, **kwargs)


__all__ = [
    "C3AConfig", "C3AConv1D", "C3ALayer", "C3ALinear", "C3AModel", "block_circular_conv", "circulant_matrix", "get_c3a_model",
    "hotswap_adapter", "peft_reference", "register", "unregister",
]
__version__ = "0.1.0"
