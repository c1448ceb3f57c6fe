"""JSON Lines data files read with errors that name the file and line, not a library's internals."""

from __future__ import annotations

import json
from typing import Callable, Optional


def read_jsonl(path: str, check: Optional[Callable[[dict], Optional[str]]] = None) -> list[dict]:
    """The objects of ``path``, one per non-blank line. ``check(row)`` returns a problem or ``None``.

    Raises ``ValueError("path:line: problem")`` for a line that is not UTF-8 text, not a JSON object or fails
    ``check``.
    """
    rows = []
    with open(path, "rb") as f:  # decoded line by line: a bad byte is reported with its line, not its file offset
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM may open the file
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{number}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                 "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            problem = "not a JSON object" if not isinstance(row, dict) else (check(row) if check else None)
            if problem:
                raise ValueError(f"{path}:{number}: {problem}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows
