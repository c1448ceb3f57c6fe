"""Safe files: atomic writes with the process umask's mode, and adapter checkpoints that are one save or an error.

Atomic writes: a crash mid-save leaves the previous file, never a half-written one; the temporary file of a
killed writer is removed by the next write of the same file.

Checkpoints: PEFT writes an adapter as two files, the weights first and ``adapter_config.json`` last, neither
atomically together. c3a's config records a digest of exactly the tensors its process saved
(:data:`CHECKPOINT_KEY`); loading compares it with the weights beside it, so a folder mixed from two saves (a
crash between the files, two writers at once) or holding a truncated file fails with
:class:`IncompleteCheckpointError` instead of loading a model nobody saved.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Mapping, Optional

if TYPE_CHECKING:
    import torch

CHECKPOINT_KEY = "c3a_checkpoint"  # in adapter_config.json: {"weights": file name, "sha256": ..., "tensors": count}
STALE_TMP_SECONDS = 24 * 3600  # a temporary file whose writer we cannot identify is removed after this long


class IncompleteCheckpointError(ValueError):
    """The adapter folder holds a mixed or partial save (or a damaged file): no model is loaded from it."""


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask (``0o644`` under ``022``)."""
    try:
        with open("/proc/self/status") as f:  # reading the umask without changing it (thread-safe), on Linux
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"


def _writer_alive(host: str, pid: int) -> bool:
    if host != _HOST:
        return True  # another machine's writer (shared file system): only its age can tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    return True


def remove_stale_temporaries(path: str) -> list[str]:
    """Remove the temporary files earlier, killed writers of ``path`` left beside it; returns what was removed.

    Our temporaries are named ``.<name>.<host>.<pid>.<random>.tmp``: one whose process is gone is removed; one
    of another machine, or in an older naming, only once it is older than :data:`STALE_TMP_SECONDS`.
    """
    directory, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}."
    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    for entry in entries:
        if not (entry.startswith(prefix) and entry.endswith(".tmp")):
            continue
        full = os.path.join(directory, entry)
        parts = entry[len(prefix):-len(".tmp")].split(".")
        try:
            if len(parts) == 3 and parts[1].isdigit():
                stale = not _writer_alive(parts[0], int(parts[1])) or (
                    time.time() - os.path.getmtime(full) > STALE_TMP_SECONDS)
            else:
                stale = time.time() - os.path.getmtime(full) > STALE_TMP_SECONDS
            if stale:
                os.remove(full)
                removed.append(full)
        except OSError:
            continue  # removed meanwhile by another writer
    return removed


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    The file gets the mode a plain ``open(path, "w")`` would (``0o666`` less the umask), also on re-saves; on
    an error the temporary file is removed, and those of killed earlier writers are removed on the next write.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.{_HOST}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


# -- checkpoint digests -----------------------------------------------------------------------------------


def tensor_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every ``(name, dtype, shape, bytes)`` of ``state``, in name order: what a weights file holds,
    independent of its format (safetensors or ``torch.save``) and of tensor layout."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            h.update(f"{name}\0{type(t).__name__}\0{t!r}\n".encode())
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def checkpoint_record(state: Mapping[str, torch.Tensor], weights_name: str) -> dict:
    """The :data:`CHECKPOINT_KEY` entry of a config saved beside ``weights_name`` holding ``state``."""
    return {"weights": weights_name, "sha256": tensor_digest(state), "tensors": len(state)}


@contextmanager
def _readable(path: str) -> Iterator[None]:
    """Errors of a cut or overwritten weights file (safetensors/pickle internals) as
    :class:`IncompleteCheckpointError` naming it; a missing or forbidden file stays what it is."""
    try:
        yield
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as e:
        raise IncompleteCheckpointError(
            f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): a partial or "
            "damaged save; save the adapter again"
        ) from None


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors or ``torch.save`` weights file; a truncated or damaged file raises
    :class:`IncompleteCheckpointError` naming it."""
    import torch

    with _readable(path):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)


def weight_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a weights file without reading its tensors (safetensors: the header only)."""
    import torch

    with _readable(path):
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        return {k: tuple(v.shape) for k, v in torch.load(path, map_location="meta", weights_only=True).items()}


def weight_dtypes(path: str) -> dict[str, torch.dtype]:
    """``{key: dtype}`` of a weights file without reading its tensors' data (safetensors: an empty slice of each,
    or the tensor itself when it has no dimension to slice: one number)."""
    import torch

    with _readable(path):
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            dtypes = {}
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    part = f.get_slice(k)
                    dtypes[k] = (part[:0] if part.get_shape() else f.get_tensor(k)).dtype
            return dtypes
        return {k: v.dtype for k, v in torch.load(path, map_location="meta", weights_only=True).items()}


KERNEL_SUFFIX = ".c3a_kernel"  # a C³A kernel's key in a state dict ends so (PEFT's name for the parameter)


def check_kernel_dtypes(dtypes: Mapping[str, torch.dtype], where: str, outcome: str = "nothing was loaded") -> None:
    """Refuse C³A kernels that are not real floating point, naming each tensor and its dtype: read as they are, an
    integer or boolean kernel would be another adapter and a complex one would lose its imaginary part."""
    bad = [f"{key} is {str(dtype).removeprefix('torch.')}" for key, dtype in dtypes.items()
           if KERNEL_SUFFIX in key and not dtype.is_floating_point]
    if bad:
        raise ValueError(
            f"{where}: C3A kernels must be real floating point (float16, bfloat16, float32, float64), but "
            + "; ".join(bad) + f"; {outcome}"
        )


def weights_files(folder: str) -> list[str]:
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    return [n for n in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME) if os.path.isfile(os.path.join(folder, n))]


def verify_checkpoint(folder: str, record: Optional[dict], config_name: str = "adapter_config.json") -> Optional[str]:
    """Check that the weights in ``folder`` are the ones saved with the config whose digest is ``record``.

    Returns the weights file checked (``None`` without a record: configs PEFT's reference implementation or an
    older c3a wrote carry none and are not checked). Raises :class:`IncompleteCheckpointError` when the file the
    config names is missing, unreadable or holds other tensors.
    """
    if not record:
        return None
    name = record.get("weights") if isinstance(record, dict) else None
    if not name or "sha256" not in record:
        raise IncompleteCheckpointError(f"{folder}: {config_name} has a malformed {CHECKPOINT_KEY} entry")
    path = os.path.join(folder, os.path.basename(name))
    if not os.path.isfile(path):
        others = [n for n in weights_files(folder) if n != name]
        found = f"; it holds {', '.join(others)} from another save" if others else ""
        raise IncompleteCheckpointError(
            f"{folder} holds a mixed or partial save: {config_name} was saved with {name}, which is missing{found}; "
            "save the adapter again"
        )
    first = weights_files(folder)[0]
    if first != os.path.basename(name):  # PEFT loads the safetensors file when there is one
        raise IncompleteCheckpointError(
            f"{folder} holds a mixed or partial save: {config_name} was saved with {name}, but {first} from another "
            "save is there too (and would be loaded); save the adapter again"
        )
    state = read_weights(path)
    if tensor_digest(state) != record["sha256"]:
        raise IncompleteCheckpointError(
            f"{folder} holds a mixed or partial save: {name} is not the file saved with {config_name} (another "
            "save, or two writers at once, replaced one of them); save the adapter again"
        )
    return path


# -- outputs apart from inputs ----------------------------------------------------------------------------
def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_outputs_apart(outputs: Mapping[str, Optional[str]], inputs: Mapping[str, Optional[str]]) -> None:
    """Refuse, before any work, an output that would write over an input: ``{option: path}`` each, ``None``
    skipped, symlinks resolved. An output may be neither an input file nor inside an input folder (an adapter, a
    data or model folder). ValueError naming both options."""
    for out_name, out in outputs.items():
        if not out:
            continue
        o = os.path.realpath(out)
        for in_name, source in inputs.items():
            if not source or not os.path.exists(source):  # a hub id, or nothing local to protect
                continue
            i = os.path.realpath(source)
            if _within(o, i):
                raise ValueError(f"{out_name} {out} would write over the input {in_name} {source}: choose another path")


def check_writable(option: str, path: Optional[str], folder: bool = True) -> None:
    """Refuse, before any work, an output that cannot be written: a file where a folder is expected (``folder``)
    or a folder where a file is, a path through a file, or a place without write permission. Creates nothing."""
    if not path:
        return
    expected = "a folder" if folder else "a file name"
    if os.path.exists(path):
        if folder != os.path.isdir(path):
            error = NotADirectoryError if folder else IsADirectoryError
            raise error(f"{option} {path} is {'a file' if folder else 'a folder'}; expected {expected}")
        place = path if folder else os.path.dirname(os.path.abspath(path))
    else:
        place = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(place):
            place = os.path.dirname(place)
        if not os.path.isdir(place):
            raise NotADirectoryError(f"{option} {path} cannot be created: {place} is a file")
    if not os.access(place, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {path} cannot be written: no write permission in {place}")
