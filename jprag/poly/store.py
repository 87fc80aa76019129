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
import math
import pathlib
from typing import Any, Mapping

import numpy as np

from jprag import store
from jprag.model.config import ModelConfig
from jprag.poly.config import PolyConfig
from jprag.poly.routing import inventory_shapes
from jprag.store import write_index  # noqa: F401  (re-exported: one index writer for every store)

JOINT_FORMAT = "jprag-poly/2"
Z_FORMAT = "jprag-poly-z/2"
# Older formats stay readable: /1 saved routing rows and chunks without padding slots, which
# reads the same (positions 0 … n-1); only an unfinished /1 joint checkpoint cannot resume.
READABLE = {JOINT_FORMAT: (JOINT_FORMAT, "jprag-poly/1"), Z_FORMAT: (Z_FORMAT, "jprag-poly-z/1")}
INDEX = store.INDEX


class PolyStoreError(store.StoreError):
    """A Poly-PRAG directory is missing, unfinished or incompatible with the request."""


def read_index(root: str | pathlib.Path, fmt: str) -> dict[str, Any]:
    return store.read_index(root, READABLE.get(fmt, (fmt,)), ("doc_ids", "poly"), PolyStoreError, "Poly-PRAG index")


def check_resumable(old: Mapping[str, Any], new: Mapping[str, Any], root, fields, poly_fields) -> None:
    """Refuse to resume a directory written by a different run (naming the differing field)."""
    for field in poly_fields:  # first: the most specific message
        if old["poly"].get(field) != new["poly"].get(field):
            raise PolyStoreError(f"{root}/index.json: [poly] {field} differs from this run's "
                                 f"({old['poly'].get(field)!r} there, {new['poly'].get(field)!r} now); use a "
                                 "new output directory")
    store.check_fields(old, new, fields, f"{root}/index.json", PolyStoreError)


def save_tree(path: pathlib.Path, tree: Any) -> None:
    """`jprag.store.save_tree`: collective orbax write, replacing a partial directory."""
    store.save_tree(path, tree)


def load_tree(path: pathlib.Path, template: Any, shardings: Any = None) -> Any:
    """`jprag.store.load_tree`: numpy, or onto `shardings`."""
    return store.load_tree(path, template, shardings)


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
    n = index["routing_shape"][0]  # the routing table may hold padding rows after the documents'
    z = store.read_rows(store.open_array(root / "routing", "z"), np.arange(n))
    return inventory, z, index


def load_rows(root: str | pathlib.Path) -> tuple[np.ndarray, dict[str, Any]]:
    """`(z [docs, Lr, M], index)` of a finished Poly-z directory (numpy, `doc_ids` row order);
    reads positions `0 … len(rows)-1` of each chunk (chunks may hold padding slots after them)."""
    from jprag.lora.store import chunk_dir
    from jprag.train.loop import chunk_number

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
        handle = store.open_array(chunk_dir(root, chunk_number(c, chunk)), "z")
        z[rows] = store.read_rows(handle, np.arange(len(rows)))
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
