"""What a name given for a model, a dataset or an adapter refers to — a local path or a Hugging Face hub id — checked
before any long work starts, with errors that say what was found and what is expected.

A name that can only come from the hub is checked against the hub once, with a short timeout and no retries:
offline, the libraries would retry for about a minute before failing (``huggingface_hub``'s back-off), and then
with a traceback. With ``HF_HUB_OFFLINE=1`` nothing is probed; the libraries read their caches.
"""

from __future__ import annotations

import functools
import json
import os
from contextlib import contextmanager
from typing import Iterator, Optional

HUB_TIMEOUT = 10  # seconds to connect to the hub before calling it unreachable
MODEL_FOLDER = "a model folder (config.json and weights, as save_pretrained writes it) or a hub id"
SOURCES = {  # what to pass instead when the hub is out of reach
    "model": "a local model folder",
    "dataset": "a local data file or folder",
    "adapter": "a local adapter folder",
}


def looks_like_path(source: str) -> bool:
    """A name meant as a local path rather than a hub id (``org/name`` or ``name``): never looked up on the hub."""
    if os.path.isabs(source) or source.startswith(("./", "../", "~", "." + os.sep, ".." + os.sep)) or source in (".", ".."):
        return True
    if source.endswith(("/", os.sep)) or "\\" in source or source.count("/") > 1 or (os.sep != "/" and os.sep in source):
        return True
    parent = os.path.dirname(source)
    return bool(parent) and os.path.isdir(parent)


@functools.lru_cache(maxsize=1)
def hub_problem() -> Optional[str]:
    """Why the hub cannot be reached (one connection attempt, :data:`HUB_TIMEOUT`), or ``None`` when it can, or
    when ``HF_HUB_OFFLINE`` is set (the libraries then read their caches without asking)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_TIMEOUT)
    except Exception as e:  # requests' or httpx's connection errors, whichever huggingface_hub uses
        return " ".join(str(e).split()) or type(e).__name__
    return None


def _cached(repo_id: str, kind: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    name = {"model": "config.json", "adapter": "adapter_config.json"}.get(kind)
    try:
        return name is not None and isinstance(try_to_load_from_cache(repo_id, name), str)
    except ValueError:  # not a valid repository id
        return False


def check_hub(name: str, option: str, kind: str = "model", instead: Optional[str] = None) -> None:
    """``ConnectionError`` naming ``option name`` when ``name`` (a hub id of ``kind``: model, dataset, adapter)
    is not in the local cache and the hub cannot be reached; ``instead``: what to pass (default: by ``kind``)."""
    from huggingface_hub import constants

    if _cached(name, kind):
        return
    problem = hub_problem()
    if problem is not None:
        raise ConnectionError(
            f"{f'{option} {name}'.strip()} is not a local path, and the Hugging Face hub ({constants.ENDPOINT}) cannot be reached "
            f"({problem}); pass {instead or SOURCES[kind]}, or set HF_HUB_OFFLINE=1 to use your hub cache"
        )


def check_model_source(name: str, option: str = "--model") -> None:
    """Refuse, before anything is loaded, a ``name`` that cannot be a pretrained model: a missing path, a file, an
    empty folder, a folder holding a PEFT adapter or anything else without ``config.json``; or a hub id while the
    hub is out of reach (:func:`check_hub`). ``option`` names where ``name`` was given (may be empty)."""
    what = f"{option} {name}".strip()
    if os.path.isdir(name):
        if os.path.isfile(os.path.join(name, "config.json")):
            return
        entries = sorted(os.listdir(name))
        if "adapter_config.json" in entries:
            try:
                with open(os.path.join(name, "adapter_config.json"), encoding="utf-8") as f:
                    base = json.load(f).get("base_model_name_or_path")
            except (OSError, ValueError, AttributeError):
                base = None
            raise ValueError(
                f"{what} holds a PEFT adapter (adapter_config.json), not a model; pass its base model"
                + (f" ({base})" if base else "") + ", onto which PeftModel.from_pretrained loads the adapter"
            )
        if not entries:
            raise ValueError(f"{what} is an empty folder; expected {MODEL_FOLDER}")
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ValueError(f"{what} has no config.json (it holds {shown}); expected {MODEL_FOLDER}")
    if os.path.exists(name):
        raise NotADirectoryError(f"{what} is a file; expected {MODEL_FOLDER}")
    if looks_like_path(name):
        raise FileNotFoundError(f"{what} does not exist; expected {MODEL_FOLDER}")
    check_hub(name, option, "model")


def check_data_source(name: str, option: str) -> None:
    """A data name (a file, a folder or a hub dataset id): a missing path is refused, a hub id checked with
    :func:`check_hub`."""
    if os.path.exists(name):
        return
    if looks_like_path(name) or os.path.splitext(name)[1].lower() in (".json", ".jsonl", ".csv", ".parquet"):
        raise FileNotFoundError(f"{option} {name} does not exist")
    check_hub(name, option, "dataset")


@contextmanager
def loading(option: str, name: str) -> Iterator[None]:
    """transformers' and datasets' errors while loading ``name`` (an ``OSError``: no such model on the hub, a
    folder without tokenizer files, a download cut off) as one ``ValueError`` naming ``option name``."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
        raise
    except OSError as e:
        raise ValueError(f"{option} {name} cannot be loaded: {' '.join(str(e).split())}") from e
