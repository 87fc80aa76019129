"""Small file helpers shared by the modules that write indexes and caches."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any


def write_json_atomic(path: str | os.PathLike, obj: Any, end: str = "", **dumps_kwargs: Any) -> None:
    """Write `obj` as JSON to `path` so that readers see the old file or the new one, never a
    partial one (write a sibling `.tmp`, fsync, `os.replace`). `end` is appended to the text;
    `dumps_kwargs` go to `json.dumps`. A file that already holds exactly this text is left
    alone, mtime included, so re-running a finished job writes nothing."""
    path = pathlib.Path(path)
    text = json.dumps(obj, **dumps_kwargs) + end
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
