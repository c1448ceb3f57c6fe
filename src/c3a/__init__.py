"""C³A: Circular Convolution Adaptation for parameter-efficient fine-tuning, as PEFT's C3A tuner.

Importing ``c3a`` registers its tuner for ``peft_type="C3A"``: from then on PEFT (and everything built on it)
uses c3a's exact, fast layers. :func:`c3a.tuner.peft_reference` gives PEFT's own implementation back for a block.

``import c3a`` itself is cheap (no torch, no PEFT): the ``c3a`` command answers ``--help`` at once, and its
commands import the heavy libraries only when they run. The names below are imported on first use, and the
registration happens the moment PEFT is imported — at once if it already is, else right after ``import peft``
completes, whoever imports it — so that every PEFT entry point sees c3a's tuner, as before.
"""

import importlib.abc
import logging
import sys
import threading

# PEFT imports bitsandbytes, whose CPU backend warns at import that an optional kernel package is absent (it falls
# back to its own kernels): nothing a user can act on. Quieted unless the user has set that logger's level.
if logging.getLogger("bitsandbytes.backends.cpu.ops").level == logging.NOTSET:
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = [
    "C3AConfig", "C3AConv1D", "C3ALayer", "C3ALinear", "C3AModel", "block_circular_conv", "circulant_matrix", "get_c3a_model",
    "hotswap_adapter", "peft_reference", "register", "unregister",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """The public names, each imported from its module when first asked for (PEP 562)."""
    if name == "C3AConfig":
        from .config import C3AConfig as value
    elif name in ("block_circular_conv", "circulant_matrix"):
        from . import functional as module

        value = getattr(module, name)
    elif name == "hotswap_adapter":
        from .hotswap import hotswap_adapter as value
    elif name in ("C3AConv1D", "C3ALayer", "C3ALinear"):
        from . import layer as module

        value = getattr(module, name)
    elif name in ("C3AModel", "peft_reference", "register", "unregister"):
        from . import tuner as module

        value = getattr(module, name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def get_c3a_model(model, config, adapter_name: str = "default", **kwargs):
    """``peft.get_peft_model(model, config, adapter_name, **kwargs)``: a convenience, nothing more."""
    from peft import get_peft_model

    return get_peft_model(model, config, adapter_name=adapter_name, **kwargs)


_pending = threading.Event()  # PEFT is imported, c3a's tuner not yet registered
_depth = threading.local()  # per thread: how many c3a modules are being imported, one inside the other


def _register() -> None:
    _pending.clear()
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != _RegisterWithPeft.__name__]  # done watching
    from .tuner import register

    register()


class _Watched:
    """The module's own loader, with c3a's registration after it: once PEFT has been imported and no c3a module is
    half-imported in this thread (a c3a module that imports PEFT cannot be imported again by the registration)."""

    def __init__(self, loader, name: str):
        self.loader, self.name = loader, name

    def __getattr__(self, name):  # everything else the loader offers (runpy's get_code, resource readers, ...)
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader  # the module keeps no trace of this wrapper
        _depth.value = getattr(_depth, "value", 0) + 1
        try:
            self.loader.exec_module(module)
        finally:
            _depth.value -= 1
        if self.name == "peft":
            _pending.set()
        if _depth.value == 0 and _pending.is_set():
            _register()


class _RegisterWithPeft(importlib.abc.MetaPathFinder):
    """Finds nothing itself: the spec the other finders give for ``peft`` and for c3a's modules, their loaders
    wrapped (:class:`_Watched`) so that c3a registers right after PEFT is imported. A mere
    ``importlib.util.find_spec("peft")`` (transformers' availability checks) loads and registers nothing."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft" and not fullname.startswith(__name__ + "."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Watched(spec.loader, fullname)
        return spec


if "peft" in sys.modules:
    _register()
elif not any(type(finder).__name__ == _RegisterWithPeft.__name__ for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithPeft())
