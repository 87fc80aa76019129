"""Adapter banks on disk: orbax checkpoints of stacked factors plus a JSON index.

Layout of a bank directory::

    index.json         format, model id, LoRA config, training metadata, document ids (row
                       order), chunk plan and which chunks are finished
    chunks/00000/      orbax checkpoint of one chunk's rows {target: {"a", "b"}} (unpadded);
                       a chunk entry's `dir` names its directory
    chunks/00001/ ...

Chunks are written whole and atomically (orbax commits a directory, the index is replaced with
`os.replace`), so a killed run loses at most the chunk it was training. Arrays are saved from
host memory and restored as numpy, so a bank can be loaded onto any mesh (`shard_bank`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping

import jax
import numpy as np

from jprag.io import write_json_atomic
from jprag.lora.adapters import Bank, LoraConfig

FORMAT = "jprag-adapter-bank/1"
INDEX = "index.json"


class BankError(ValueError):
    """A bank directory is missing, incomplete or incompatible with the request."""


def write_index(root: pathlib.Path, index: Mapping[str, Any]) -> None:
    """Atomically (re)write `index.json`."""
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / INDEX, index, indent=1, sort_keys=True)


def read_index(root: str | os.PathLike) -> dict[str, Any]:
    path = pathlib.Path(root) / INDEX
    if not path.is_file():
        raise BankError(f"{path}: no adapter bank index here (expected a directory written by `jprag encode`)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BankError(f"{path}: not valid JSON ({e})") from None
    if index.get("format") != FORMAT:
        raise BankError(f"{path}: field 'format' is {index.get('format')!r}, expected {FORMAT!r}")
    for field in ("doc_ids", "lora", "chunks"):
        if field not in index:
            raise BankError(f"{path}: field {field!r} is missing")
    return index


def lora_from_index(index: Mapping[str, Any]) -> LoraConfig:
    return LoraConfig(**{**index["lora"], "targets": tuple(index["lora"]["targets"])})


def lora_to_json(lora: LoraConfig) -> dict[str, Any]:
    return dataclasses.asdict(lora) | {"targets": list(lora.targets)}


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def chunk_dir(root: pathlib.Path, chunk: int) -> pathlib.Path:
    return root / "chunks" / f"{chunk:05d}"


def chunk_number(position: int, chunk: Mapping[str, Any]) -> int:
    """The checkpoint directory number of the index's `position`-th chunk entry (its `dir`;
    indices written before re-planned resumes existed number chunks by position)."""
    return int(chunk.get("dir", position))


def save_chunk(root: pathlib.Path, chunk: int, rows_bank: Bank) -> None:
    """Write one chunk's rows (host copies) as an orbax checkpoint, replacing a partial one."""
    path = chunk_dir(root, chunk)
    if path.exists():  # a chunk left behind by a killed run before its index entry: redo it
        import shutil

        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = _checkpointer()
    ckpt.save(path.absolute(), jax.tree.map(np.asarray, rows_bank))
    ckpt.wait_until_finished()


def load_chunk(root: pathlib.Path, chunk: int, template: Bank) -> Bank:
    """Restore a chunk as numpy arrays shaped like `template` (numpy or ShapeDtypeStructs)."""
    target = jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), template)
    return _checkpointer().restore(chunk_dir(root, chunk).absolute(), target)


def load_bank(root: str | os.PathLike, require_complete: bool = True) -> tuple[Bank, dict[str, Any]]:
    """The whole bank as numpy arrays `[docs, ...]` in `index['doc_ids']` row order, and the index."""
    root = pathlib.Path(root)
    index = read_index(root)
    lora = lora_from_index(index)
    shapes = index["shapes"]  # {target: {"a": [L, in, r], "b": [L, r, out]}}
    n = len(index["doc_ids"])
    dtype = np.dtype(index.get("dtype", "float32"))
    bank = {t: {k: np.zeros((n, *shapes[t][k]), dtype) for k in ("a", "b")} for t in lora.targets}
    missing = [c for c in index["chunks"] if not c.get("done")]
    if missing and require_complete:
        raise BankError(f"{root}: {len(missing)} of {len(index['chunks'])} chunks are not finished; "
                        "re-run `jprag encode` with the same arguments to resume")
    for c, chunk in enumerate(index["chunks"]):
        if not chunk.get("done"):
            continue
        rows = np.asarray(chunk["rows"], np.int64)
        template = {t: {k: np.zeros((len(rows), *shapes[t][k]), dtype) for k in ("a", "b")} for t in lora.targets}
        part = load_chunk(root, chunk_number(c, chunk), template)
        for t in lora.targets:
            for k in ("a", "b"):
                bank[t][k][rows] = part[t][k]
    return bank, index


def shard_bank(bank: Bank, mesh) -> Bank:
    """Pad the document axis to a multiple of the mesh's `data` size and shard it over `data`."""
    from jprag.mesh import doc_shardings, pad_to_data

    n = jax.tree.leaves(bank)[0].shape[0]
    n_pad = pad_to_data(n, mesh)
    padded = jax.tree.map(lambda x: np.pad(np.asarray(x), [(0, n_pad - n)] + [(0, 0)] * (x.ndim - 1)), bank)
    return jax.device_put(padded, doc_shardings(padded, mesh))


def bytes_per_document(lora: LoraConfig, shapes_cfg, itemsize: int = 4) -> int:
    """Storage of one document's adapter in bytes (`itemsize` 4 = fp32, 2 = bf16)."""
    return lora.num_params(shapes_cfg) * itemsize
