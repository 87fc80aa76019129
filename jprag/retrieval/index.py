"""Build, save and load a document retriever (BM25 or dense) over document passages.

A saved retriever is a directory holding ``retriever.json`` (``kind``, ``format_version``,
``num_docs`` and, for dense, the ``embedder`` description) and the index files in a
sub-directory named after the kind (``bm25/`` or ``dense/``). ``retriever.json`` is written
last, so an interrupted build never looks like a valid index. Build once with
``build_index(kind, docs, out_dir)``, then ``load_index(out_dir)`` wherever it is needed.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Sequence

import numpy as np

from jprag.data.documents import Document
from jprag.retrieval.bm25 import BM25Index
from jprag.retrieval.dense import DenseIndex, Embedder, HashingEmbedder, ModelEmbedder

RETRIEVER_FILE = "retriever.json"
RETRIEVER_FORMAT_VERSION = 1
KINDS = ("bm25", "dense")


class Retriever:
    """Maps queries to the ids of the best-matching documents, best first."""

    def __init__(self, kind: str, index: BM25Index | DenseIndex, embedder: Embedder | None = None):
        """`index` of the given kind; dense retrievers need the `embedder` that built them."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "dense" and embedder is None:
            raise ValueError("a dense retriever needs an embedder for its queries")
        self.kind = kind
        self.index = index
        self.embedder = embedder

    def __len__(self) -> int:
        return len(self.index)

    def search_with_scores(self, queries: Sequence[str], k: int) -> tuple[list[list[str]], np.ndarray]:
        """Top-`k` doc ids per query (best first) and their scores `[n_queries, k]`; `k` is
        clipped to the number of documents (BM25 scores, or cosine similarities for dense)."""
        if isinstance(queries, str):
            raise TypeError("queries must be a sequence of strings, not a single string")
        if self.kind == "bm25":
            return self.index.search(queries, k)
        return self.index.search(self.embedder(list(queries)), k)

    def search(self, queries: Sequence[str], k: int) -> list[list[str]]:
        """Top-`k` doc ids per query, best first (`k` clipped to the number of documents)."""
        return self.search_with_scores(queries, k)[0]


def describe_embedder(embedder: Embedder) -> dict:
    """The embedder's JSON description (`describe()`), or a ``custom`` placeholder."""
    describe = getattr(embedder, "describe", None)
    if callable(describe):
        return dict(describe())
    return {"type": "custom", "repr": repr(embedder)}


def embedder_from_description(desc: dict, where: str = "embedder") -> Embedder:
    """Rebuild a `HashingEmbedder` or `ModelEmbedder` from `describe_embedder`'s output.

    A ``model`` description reloads its model with `jprag.model.chat.load` (the default model
    when the recorded path is the default one). Other types raise ValueError: pass the
    embedder to `load_index` instead.
    """
    kind = desc.get("type")
    if kind == "hashing":
        return HashingEmbedder(int(desc["dim"]))
    if kind == "model":
        from jprag.model.chat import load
        from jprag.model.weights import default_model_path

        path = desc.get("model")
        try:
            if path is not None and pathlib.Path(path) == default_model_path():
                path = None  # the embedded default: found again wherever it is installed
        except FileNotFoundError:
            pass
        lm = load(path, desc.get("dtype", "float32"))
        return ModelEmbedder(lm, int(desc.get("batch_size", 16)), int(desc["max_len"]), desc["pooling"])
    raise ValueError(f"{where}: cannot rebuild embedder of type {kind!r}; pass embedder= to load_index")


def build_index(
    kind: str,
    docs: Sequence[Document],
    out_dir: str | os.PathLike | None = None,
    embedder: Embedder | None = None,
) -> Retriever:
    """Index the passages of `docs` (ids = `Document.id`) and, given `out_dir`, save it there.

    `kind` is "bm25" or "dense"; dense uses `embedder` (default: `ModelEmbedder` over the
    default model from `jprag.model.chat.load()`). Raises ValueError for an unknown kind, an
    empty corpus or duplicate ids. An existing retriever in `out_dir` is replaced.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "bm25" and embedder is not None:
        raise ValueError("embedder= only applies to dense indexes")
    docs = list(docs)
    if not docs:
        raise ValueError(f"cannot build a {kind} index over an empty corpus")
    texts = [d.passage for d in docs]
    ids = [d.id for d in docs]
    if kind == "bm25":
        retriever = Retriever(kind, BM25Index.build(texts, ids))
    else:
        if embedder is None:
            from jprag.model.chat import load

            embedder = ModelEmbedder(load())
        retriever = Retriever(kind, DenseIndex.build(embedder(texts), ids), embedder)
    if out_dir is not None:
        save_index(retriever, out_dir)
    return retriever


def save_index(retriever: Retriever, out_dir: str | os.PathLike) -> None:
    """Write `retriever` into `out_dir` (index files first, `retriever.json` last)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RETRIEVER_FILE).unlink(missing_ok=True)
    retriever.index.save(out_dir / retriever.kind)
    meta = {"kind": retriever.kind, "format_version": RETRIEVER_FORMAT_VERSION, "num_docs": len(retriever)}
    if retriever.kind == "dense":
        meta["embedder"] = describe_embedder(retriever.embedder)
    tmp = out_dir / (RETRIEVER_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / RETRIEVER_FILE)


def load_index(directory: str | os.PathLike, embedder: Embedder | None = None) -> Retriever:
    """Load a retriever saved by `build_index` / `save_index`.

    Dense retrievers rebuild their embedder from ``retriever.json`` unless `embedder` is
    given (needed for custom embedders). FileNotFoundError / ValueError name the directory.
    """
    directory = pathlib.Path(directory)
    meta_path = directory / RETRIEVER_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory}: no {RETRIEVER_FILE}; not a saved retriever (build it with build_index)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if meta.get("format_version") != RETRIEVER_FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: format version {meta.get('format_version')!r} is not supported "
            f"(expected {RETRIEVER_FORMAT_VERSION}); rebuild the index"
        )
    kind = meta.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{meta_path}: kind must be one of {KINDS}, got {kind!r}")
    if kind == "bm25":
        retriever = Retriever(kind, BM25Index.load(directory / kind))
    else:
        index = DenseIndex.load(directory / kind)
        if embedder is None:
            embedder = embedder_from_description(meta.get("embedder", {}), str(meta_path))
        retriever = Retriever(kind, index, embedder)
    if len(retriever) != meta.get("num_docs"):
        raise ValueError(f"{meta_path}: num_docs is {meta.get('num_docs')} but the index holds {len(retriever)}")
    return retriever


__all__ = [
    "KINDS",
    "RETRIEVER_FORMAT_VERSION",
    "Retriever",
    "build_index",
    "describe_embedder",
    "embedder_from_description",
    "load_index",
    "save_index",
]
