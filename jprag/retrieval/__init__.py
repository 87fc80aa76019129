"""Passage retrieval for PRAG: BM25 (`bm25s`) and dense (faiss) indexes over document passages.

`build_index(kind, docs, out_dir)` builds and saves a `Retriever`; `load_index(out_dir)` loads
it; `Retriever.search(queries, k)` returns doc ids, best first. Dense indexes take any
`Embedder` (`ModelEmbedder` over the base model by default, `HashingEmbedder` without one).
Importing this package does not import JAX; `ModelEmbedder` does so when first called.
"""

from jprag.retrieval.bm25 import BM25Index
from jprag.retrieval.dense import DenseIndex, Embedder, HashingEmbedder, ModelEmbedder
from jprag.retrieval.index import Retriever, build_index, load_index, save_index

__all__ = [
    "BM25Index",
    "DenseIndex",
    "Embedder",
    "HashingEmbedder",
    "ModelEmbedder",
    "Retriever",
    "build_index",
    "load_index",
    "save_index",
]
