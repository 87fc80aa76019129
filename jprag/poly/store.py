"""Poly-PRAG on disk: the inventory, routing tables, training checkpoints and their JSON index.

A joint-training directory (`train_joint`, format `jprag-poly/1`)::

    index.json      format, model id, poly config, document ids (routing row order), docs per
                    step, step count, the latest checkpoint, done flag and timings
    ckpt/step_NNNNNN/   orbax checkpoint of the whole training state (while training)
    inventory/      orbax: {target: {"a": [L, M, in, r], "b": [L, M, r, out]}}   (when done)
    routing/        orbax: {"z": [docs, Lr, M]}                                 (when done)

A Poly-z directory (`train_routing_rows`, format `jprag-poly-z/1`) holds only new routing rows,
in chunks written like a PRAG bank (`chunks/NNNNN/` = {"z": [rows, Lr, M]}), plus the
fingerprint of the inventory they were trained against.

Writes are atomic: orbax commits a directory, `index.json` is replaced with `os.replace` after
the arrays it points to exist, and a directory left behind by a killed run (not yet in the
index) is removed and rewritten. Arrays are saved from host memory and restored as numpy, so a
run can resume (or be loaded) on any mesh.
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import shutil
from typing import Any, Mapping

import jax
import numpy as np

from jprag.lora.store import write_index  # noqa: F401  (re-exported: one index writer for every store)
from jprag.model.config import ModelConfig
from jprag.poly.config import PolyConfig
from jprag.poly.routing import inventory_shapes

JOINT_FORMAT = "jprag-poly/1"
Z_FORMAT = "jprag-poly-z/1"
INDEX = "index.json"


class PolyStoreError(ValueError):
    """A Poly-PRAG directory is missing, unfinished or incompatible with the request."""


def read_index(root: str | pathlib.Path, fmt: str) -> dict[str, Any]:
    path = pathlib.Path(root) / INDEX
    if not path.is_file():
        raise PolyStoreError(f"{path}: no Poly-PRAG index here")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PolyStoreError(f"{path}: not valid JSON ({e})") from None
    if index.get("format") != fmt:
        raise PolyStoreError(f"{path}: field 'format' is {index.get('format')!r}, expected {fmt!r}")
    for field in ("doc_ids", "poly"):
        if field not in index:
            raise PolyStoreError(f"{path}: field {field!r} is missing")
    return index


def check_resumable(old: Mapping[str, Any], new: Mapping[str, Any], root, fields, poly_fields) -> None:
    """Refuse to resume a directory written by a different run (naming the differing field)."""
    for field in poly_fields:  # first: the most specific message
        if old["poly"].get(field) != new["poly"].get(field):
            raise PolyStoreError(f"{root}/index.json: [poly] {field} differs from this run's "
                                 f"({old['poly'].get(field)!r} there, {new['poly'].get(field)!r} now); use a "
                                 "new output directory")
    for field in fields:
        if old.get(field) != new.get(field):
            raise PolyStoreError(f"{root}/index.json: field {field!r} differs from this run's; the directory "
                                 "holds another Poly-PRAG run (use a new output directory)")


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_tree(path: pathlib.Path, tree: Any) -> None:
    """Write a pytree of arrays (host copies) as an orbax checkpoint at `path`, replacing any
    partial directory a killed run left there."""
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = _checkpointer()
    ckpt.save(path.absolute(), jax.tree.map(np.asarray, tree))
    ckpt.wait_until_finished()


def load_tree(path: pathlib.Path, template: Any) -> Any:
    """Restore as numpy arrays shaped like `template` (arrays or ShapeDtypeStructs)."""
    target = jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), template)
    return _checkpointer().restore(path.absolute(), target)


def inventory_template(shapes: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    return {t: {k: np.zeros(tuple(s), np.float32) for k, s in ab.items()} for t, ab in shapes.items()}


def load_joint(root: str | pathlib.Path) -> tuple[dict, np.ndarray, dict[str, Any]]:
    """`(inventory, z [docs, Lr, M], index)` of a finished joint-training directory (numpy)."""
    root = pathlib.Path(root)
    index = read_index(root, JOINT_FORMAT)
    if not index.get("done"):
        raise PolyStoreError(f"{root}: joint training is not finished (step {index.get('step', 0)} of "
                             f"{index.get('n_steps')}); re-run with the same arguments to resume")
    inventory = load_tree(root / "inventory", inventory_template(index["shapes"]))
    z = load_tree(root / "routing", {"z": np.zeros(tuple(index["routing_shape"]), np.float32)})["z"]
    return inventory, z, index


def load_rows(root: str | pathlib.Path) -> tuple[np.ndarray, dict[str, Any]]:
    """`(z [docs, Lr, M], index)` of a finished Poly-z directory (numpy, `doc_ids` row order)."""
    from jprag.lora.store import chunk_number, load_chunk

    root = pathlib.Path(root)
    index = read_index(root, Z_FORMAT)
    missing = [c for c in index["chunks"] if not c.get("done")]
    if missing:
        raise PolyStoreError(f"{root}: {len(missing)} of {len(index['chunks'])} chunks are not finished; "
                             "re-run with the same arguments to resume")
    row_shape = tuple(index["routing_shape"][1:])
    z = np.zeros((len(index["doc_ids"]), *row_shape), np.float32)
    for c, chunk in enumerate(index["chunks"]):
        rows = np.asarray(chunk["rows"], np.int64)
        z[rows] = load_chunk(root, chunk_number(c, chunk), {"z": np.zeros((len(rows), *row_shape), np.float32)})["z"]
    return z, index


def fingerprint(inventory: Mapping[str, Mapping[str, Any]]) -> str:
    """sha1 over the inventory's bytes (targets and factors in sorted order): identifies the
    exact inventory a set of Poly-z rows was trained against."""
    h = hashlib.sha1()
    for t in sorted(inventory):
        for k in sorted(inventory[t]):
            a = np.ascontiguousarray(np.asarray(inventory[t][k], np.float32))
            h.update(f"{t}.{k}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def storage_bytes(cfg: ModelConfig, poly: PolyConfig, itemsize: int = 4) -> dict[str, int]:
    """Bytes of one document's routing row and of the shared inventory (`itemsize` 4 = fp32).
    Uniform routing (1/M for every document) has no per-document parameters: 0 bytes a row."""
    row = poly.routing_layers(cfg.n_layers) * poly.n_skills * itemsize if poly.has_rows else 0
    shared = sum(math.prod(s) for ab in inventory_shapes(cfg, poly).values() for s in ab.values()) * itemsize
    return {"row_bytes": row, "shared_bytes": shared}
