"""The one artifact store behind every trained directory (adapter banks, Poly-PRAG, translators).

A directory is a JSON index plus orbax checkpoints:

* `read_index` checks the file exists, parses, has an accepted `format` and the required fields,
  raising the caller's error class with the path and the field (one line, no traceback);
  `write_index` replaces it atomically, on process 0 only, then waits for every process.
* `save_tree` writes a pytree of (possibly sharded, multi-host) `jax.Array`s collectively: each
  process writes its own shards, no array is gathered to one host. A directory a killed run
  left behind (not yet named by the index) is removed first.
* `load_tree` restores onto any mesh (`shardings`), or as numpy (small trees).
* `read_rows` reads chosen leading-axis rows of one saved array straight from the checkpoint
  (tensorstore over orbax's OCDBT/zarr layout), so serving touches only the rows it needs.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

from jprag import distributed
from jprag.io import write_json_atomic

INDEX = "index.json"


class StoreError(ValueError):
    """A stored directory is missing, unfinished, corrupt or incompatible with the request."""


def read_index(root: str | os.PathLike, formats: str | Sequence[str], required: Iterable[str] = (),
               error: type[ValueError] = StoreError, what: str = "index", name: str = INDEX) -> dict[str, Any]:
    """`root/name` parsed, with its `format` one of `formats` and every `required` field present."""
    path = pathlib.Path(root) / name
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    if not path.is_file():
        raise error(f"{path}: no {what} here")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(index, dict):
        raise error(f"{path}: expected a JSON object")
    if index.get("format") not in formats:
        expected = " or ".join(map(repr, formats))
        raise error(f"{path}: field 'format' is {index.get('format')!r}, expected {expected}")
    for field in required:
        if field not in index:
            raise error(f"{path}: field {field!r} is missing")
    return index


def write_index(root: str | os.PathLike, index: Mapping[str, Any], name: str = INDEX) -> None:
    """Atomically (re)write `root/name` on process 0, then synchronise every process."""
    root = pathlib.Path(root)

    def write():
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / name, index, indent=1, sort_keys=True)

    distributed.primary_only(write, f"write {root / name}")


def check_fields(old: Mapping[str, Any], new: Mapping[str, Any], fields: Iterable[str], where: str,
                 error: type[ValueError] = StoreError, hint: str = "use a new output directory") -> None:
    """Refuse to resume `old` with a run described by `new` when a field differs (naming it)."""
    for field in fields:
        if old.get(field) != new.get(field):
            raise error(f"{where}: field {field!r} differs from this run's; the directory holds another run ({hint})")


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def remove(path: pathlib.Path) -> None:
    """Delete a directory (process 0), then synchronise."""
    distributed.primary_only(lambda: shutil.rmtree(path, ignore_errors=True), f"remove {path}")


def save_tree(path: str | os.PathLike, tree: Any) -> None:
    """Write a pytree of arrays as an orbax checkpoint at `path`, collectively across processes,
    replacing any partial directory a killed run left there. `jax.Array`s are written shard by
    shard by the processes that hold them; numpy leaves (single process) as they are."""
    path = pathlib.Path(path).absolute()

    def prepare():
        # decided on process 0 alone: another process may already see orbax's directory appear,
        # and every process must pass the same barriers
        if path.exists():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)

    distributed.primary_only(prepare, f"prepare {path}")
    ckpt = _checkpointer()
    ckpt.save(path, tree)
    ckpt.wait_until_finished()
    distributed.barrier(f"saved {path}")


def load_tree(path: str | os.PathLike, template: Any, shardings: Any = None) -> Any:
    """Restore the checkpoint at `path` shaped like `template` (arrays or ShapeDtypeStructs):
    as numpy arrays, or as `jax.Array`s laid out by `shardings` (any mesh, any process count)."""
    path = pathlib.Path(path).absolute()
    if not path.is_dir():
        raise StoreError(f"{path}: checkpoint directory is missing")
    if shardings is None:
        target = jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), template)
    else:
        target = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), template, shardings)
    return _checkpointer().restore(path, target)


def _ts_spec(path: pathlib.Path, key: str) -> dict[str, Any]:
    return {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{path.absolute()}", "path": key}}


def open_array(path: str | os.PathLike, key: str):
    """A tensorstore handle on the saved array `key` ("gate.a") of the checkpoint at `path`."""
    import tensorstore as ts

    path = pathlib.Path(path)
    try:
        return ts.open(_ts_spec(path, key), open=True, read=True).result()
    except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError subclasses with long specs
        raise StoreError(f"{path}: cannot read array {key!r} ({str(e).splitlines()[0][:160]})") from None


def read_rows(handle, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """Leading-axis `rows` of an `open_array` handle, reading only the chunks that hold them."""
    rows = np.asarray(rows, np.int64)
    if rows.size == 0:
        return np.zeros((0, *handle.shape[1:]), handle.dtype.numpy_dtype)
    return np.asarray(handle[rows].read().result())


def tree_keys(tree: Any) -> list[tuple[str, Any]]:
    """`("a.b", leaf)` per leaf of a nested dict: the names orbax gives saved arrays."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out.append((".".join(str(getattr(p, "key", p)) for p in path), leaf))
    return out
