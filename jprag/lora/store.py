"""Adapter banks on disk: a JSON index plus one orbax checkpoint per chunk of rows.

Layout of a bank directory::

    index.json         format, model id, LoRA config, training metadata, document ids (row
                       order), chunk plan and which chunks are finished
    chunks/00000/      orbax checkpoint of one chunk {target: {"a": [slots, ...], "b": ...}};
                       position j < len(rows) holds document rows[j]; a chunk entry's `dir`
                       names its directory
    chunks/00001/ ...

Format `jprag-adapter-bank/2` (written now) saves each chunk as the sharded array the training
step produced, padding slots included (`slots`), collectively by every process, never gathered
to one host; `/1` (single-process runs before multi-host training) saved only the real rows.
Both read the same way: positions `0 … len(rows)-1` of each chunk. A chunk is written whole
before the index names it done (orbax commits a directory, the index is replaced atomically),
so a killed run loses at most the chunk it was training.

Reading never needs the whole bank in memory: `BankReader` reads the rows a batch of questions
retrieved straight from the chunk checkpoints (tensorstore; only the zarr chunks holding them),
so a bank larger than a host's memory serves as well as a small one.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import os
import pathlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jprag import store
from jprag.lora.adapters import Bank, LoraConfig
from jprag.train.loop import chunk_number, chunk_path

FORMAT = "jprag-adapter-bank/2"
FORMATS = (FORMAT, "jprag-adapter-bank/1")
INDEX = store.INDEX
FACTORS = ("a", "b")


class BankError(store.StoreError):
    """A bank directory is missing, incomplete or incompatible with the request."""


def write_index(root: pathlib.Path, index: Mapping[str, Any]) -> None:
    """Atomically (re)write `index.json` (process 0)."""
    store.write_index(root, index)


def read_index(root: str | os.PathLike) -> dict[str, Any]:
    return store.read_index(root, FORMATS, ("doc_ids", "lora", "chunks", "shapes"), BankError,
                            "adapter bank index (expected a directory written by `jprag encode`)")


def lora_from_index(index: Mapping[str, Any]) -> LoraConfig:
    return LoraConfig(**{**index["lora"], "targets": tuple(index["lora"]["targets"])})


def lora_to_json(lora: LoraConfig) -> dict[str, Any]:
    return dataclasses.asdict(lora) | {"targets": list(lora.targets)}


def chunk_dir(root: pathlib.Path, chunk: int) -> pathlib.Path:
    return chunk_path(root, chunk)


def save_chunk(root: pathlib.Path, chunk: int, rows_bank: Bank) -> None:
    """Write one chunk's rows (sharded `jax.Array`s or numpy) as an orbax checkpoint, collectively,
    replacing a partial one."""
    store.save_tree(chunk_dir(root, chunk), rows_bank)


def load_chunk(root: pathlib.Path, chunk: int, template: Bank) -> Bank:
    """Restore a whole chunk checkpoint as numpy arrays shaped like `template`."""
    return store.load_tree(chunk_dir(root, chunk), template)


class BankReader:
    """Rows of a finished bank, read on demand from its chunk checkpoints.

    `rows(indices)` returns `{target: {"a": [n, ...], "b": ...}}` for bank rows (positions in
    `doc_ids`), touching only the chunks that hold them; open chunk handles are kept in a small
    LRU (`max_open`). Memory is that of the rows asked for, whatever the bank's size.
    """

    def __init__(self, root: str | os.PathLike, index: Mapping[str, Any] | None = None, max_open: int = 64,
                 require_complete: bool = True):
        self.root = pathlib.Path(root)
        self.index = dict(index) if index is not None else read_index(self.root)
        self.lora = lora_from_index(self.index)
        self.shapes = self.index["shapes"]
        self.dtype = np.dtype(self.index.get("dtype", "float32"))
        missing = [c for c in self.index["chunks"] if not c.get("done")]
        if missing and require_complete:
            raise BankError(f"{self.root}: {len(missing)} of {len(self.index['chunks'])} chunks are not finished; "
                            "re-run `jprag encode` with the same arguments to resume")
        self.doc_rows = {d: i for i, d in enumerate(self.index["doc_ids"])}
        # bank row → (chunk directory number, position in the chunk), finished chunks only
        self._where: dict[int, tuple[int, int]] = {}
        for c, chunk in enumerate(self.index["chunks"]):
            if chunk.get("done"):
                for j, r in enumerate(chunk["rows"]):
                    self._where[int(r)] = (chunk_number(c, chunk), j)
        self._open: collections.OrderedDict[int, dict] = collections.OrderedDict()
        self.max_open = max_open

    def __len__(self) -> int:
        return len(self.doc_rows)

    @property
    def targets(self) -> tuple[str, ...]:
        return self.lora.targets

    def row_bytes(self) -> int:
        return sum(int(np.prod(self.shapes[t][k])) for t in self.targets for k in FACTORS) * self.dtype.itemsize

    def _handles(self, number: int) -> dict:
        if number in self._open:
            self._open.move_to_end(number)
            return self._open[number]
        path = chunk_dir(self.root, number)
        handles = {(t, k): store.open_array(path, f"{t}.{k}") for t in self.targets for k in FACTORS}
        self._open[number] = handles
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return handles

    def rows_of(self, doc_ids: Sequence[str]) -> list[int]:
        """Bank rows of document ids (BankError naming an unknown id, with close matches)."""
        out = []
        for d in doc_ids:
            if d not in self.doc_rows:
                close = difflib.get_close_matches(d, list(self.doc_rows), n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise BankError(f"{self.root}: no document {d!r} in this bank ({len(self.doc_rows)} documents){hint}")
            out.append(self.doc_rows[d])
        return out

    def rows(self, rows: Sequence[int]) -> Bank:
        """The adapters of bank `rows` (in that order) as numpy `{target: {"a": [n, ...], ...}}`."""
        rows = [int(r) for r in rows]
        out = {t: {k: np.zeros((len(rows), *self.shapes[t][k]), self.dtype) for k in FACTORS} for t in self.targets}
        by_chunk: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
        for i, r in enumerate(rows):
            if r not in self._where:
                doc = self.index["doc_ids"][r] if 0 <= r < len(self.index["doc_ids"]) else r
                raise BankError(f"{self.root}: document {doc!r} is in no finished chunk; re-run `jprag encode` "
                                "with the same arguments to resume")
            number, j = self._where[r]
            by_chunk[number].append((i, j))
        for number, pairs in by_chunk.items():
            handles = self._handles(number)
            dest = [i for i, _ in pairs]
            pos = [j for _, j in pairs]
            for (t, k), h in handles.items():
                out[t][k][dest] = store.read_rows(h, pos)
        return out


def load_bank(root: str | os.PathLike, require_complete: bool = True) -> tuple[Bank, dict[str, Any]]:
    """The whole bank as numpy arrays `[docs, ...]` in `index['doc_ids']` row order, and the index
    (rows of unfinished chunks are zero with `require_complete=False`). For serving a large bank
    use `BankReader`, which reads only the rows asked for."""
    reader = BankReader(root, require_complete=require_complete)
    n = len(reader)
    done = sorted(reader._where)
    bank = {t: {k: np.zeros((n, *reader.shapes[t][k]), reader.dtype) for k in FACTORS} for t in reader.targets}
    part = reader.rows(done)
    for t in reader.targets:
        for k in FACTORS:
            bank[t][k][done] = part[t][k]
    return bank, reader.index


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
