"""Dense retrieval: cosine similarity over embeddings with faiss, and pluggable embedders.

`DenseIndex` stores L2-normalised float32 embeddings in a `faiss.IndexFlatIP` (exact inner
product = cosine similarity). An `Embedder` is any callable mapping texts to an embedding
matrix ``[n, d]``; two are provided:

* `ModelEmbedder`: pooled final-norm hidden states of a base model (`jprag.model.chat.load`),
  computed by one jitted forward per (batch, length) bucket;
* `HashingEmbedder`: a deterministic signed bag-of-words hashing embedder (no model; for tests
  and as a fallback).

An embedder may define ``describe() -> dict`` (JSON-serialisable) so a saved index can rebuild
it at load time (see `jprag.retrieval.index`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import re
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from jprag.io import write_json_atomic
from jprag.retrieval.bm25 import check_ids, clip_k

DENSE_FORMAT_VERSION = 1
FAISS_FILE = "dense.faiss"
IDS_FILE = "dense_ids.json"
POOLINGS = ("mean", "last")
LENGTH_MULTIPLE = 32


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to a float32 embedding matrix ``[len(texts), dim]``."""

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), as C-contiguous float32."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), np.float32)


def _as_matrix(x: Any, what: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [n, dim], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contain NaN or infinite values")
    return x


class DenseIndex:
    """Exact cosine-similarity search over document embeddings (`faiss.IndexFlatIP`)."""

    def __init__(self, index, ids: Sequence[str]):
        """Wrap a faiss index whose vector i belongs to `ids[i]` (use `build` / `load`)."""
        self._index = index
        self.ids: list[str] = list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self._index.d)

    @classmethod
    def build(cls, embeddings: np.ndarray, ids: Sequence[str]) -> "DenseIndex":
        """Index `embeddings [n, d]` (row i has id `ids[i]`, unique); ValueError if n == 0."""
        import faiss

        emb = _as_matrix(embeddings, "embeddings")
        ids = check_ids(emb.shape[0], ids)
        if emb.shape[0] == 0:
            raise ValueError("cannot build a dense index over an empty corpus")
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(l2_normalize(emb))
        return cls(index, ids)

    def search(self, query_embeddings: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """Top-`k` ids per query row (best first) and cosine scores `[n_queries, k]`; `k` is
        clipped to the corpus size."""
        q = _as_matrix(query_embeddings, "query embeddings")
        if q.shape[1] != self.dim:
            raise ValueError(f"query embeddings have dim {q.shape[1]} but the index has dim {self.dim}")
        k = clip_k(k, len(self.ids))
        if q.shape[0] == 0:
            return [], np.zeros((0, k), np.float32)
        scores, idx = self._index.search(l2_normalize(q), k)
        return [[self.ids[int(j)] for j in row] for row in idx], np.asarray(scores, np.float32)

    def save(self, directory: str | os.PathLike) -> None:
        """Write `dense.faiss` and `dense_ids.json` into `directory` (created if needed)."""
        import faiss

        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._index, str(directory / FAISS_FILE))
        meta = {"format_version": DENSE_FORMAT_VERSION, "dim": self.dim, "ids": self.ids}
        write_json_atomic(directory / IDS_FILE, meta, ensure_ascii=False)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "DenseIndex":
        """Read an index written by `save`; errors name the directory."""
        import faiss

        directory = pathlib.Path(directory)
        meta_path = directory / IDS_FILE
        if not meta_path.is_file() or not (directory / FAISS_FILE).is_file():
            raise FileNotFoundError(f"{directory}: not a saved dense index (needs {FAISS_FILE} and {IDS_FILE})")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format_version") != DENSE_FORMAT_VERSION:
            raise ValueError(
                f"{directory}: dense index format version {meta.get('format_version')!r} is not "
                f"supported (expected {DENSE_FORMAT_VERSION}); rebuild the index"
            )
        index = faiss.read_index(str(directory / FAISS_FILE))
        if index.ntotal != len(meta["ids"]) or index.d != meta["dim"]:
            raise ValueError(f"{directory}: {FAISS_FILE} ({index.ntotal} x {index.d}) does not match {IDS_FILE}")
        return cls(index, meta["ids"])


@functools.lru_cache(maxsize=1 << 16)
def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


class HashingEmbedder:
    """Signed feature hashing of lower-cased word counts into `dim` buckets, L2-normalised.

    Deterministic across processes (blake2b, not Python's salted `hash`); texts with no word
    characters embed to the zero vector.
    """

    def __init__(self, dim: int = 512):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)

    def describe(self) -> dict:
        """JSON description from which `jprag.retrieval.index` rebuilds this embedder."""
        return {"type": "hashing", "dim": self.dim}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", str(text).lower()):
                h = _word_hash(word)
                out[i, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        return l2_normalize(out)


@functools.lru_cache(maxsize=None)
def _pooled_forward():
    """The jitted `(cfg, params, tokens, mask, pooling) -> [b, d]` float32 (built lazily)."""
    import jax
    import jax.numpy as jnp

    from jprag.model.transformer import forward, positions_from_mask

    @functools.partial(jax.jit, static_argnames=("cfg", "pooling"))
    def pooled(cfg, params, tokens_bt, mask_bt, pooling):
        h_btd, _ = forward(cfg, params, tokens_bt, positions_from_mask(mask_bt), output="hidden")
        h_btd = h_btd.astype(jnp.float32)
        real = mask_bt > 0
        if pooling == "mean":
            total = jnp.where(real[..., None], h_btd, 0.0).sum(axis=1)
            return total / jnp.maximum(real.sum(axis=1, keepdims=True), 1).astype(jnp.float32)
        last = jnp.maximum(real.sum(axis=1) - 1, 0)  # rows are right-padded
        return jnp.take_along_axis(h_btd, last[:, None, None], axis=1)[:, 0]

    return pooled


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


class ModelEmbedder:
    """Embeddings from a base model's final-norm hidden states, pooled over real tokens.

    `lm` is a `jprag.model.chat.LoadedModel`. Texts are tokenised (truncated to `max_len`
    tokens), sorted by length and embedded `batch_size` at a time; rows are right-padded to a
    multiple of 32 tokens and batches padded to a power of two (at most `batch_size`) rows, so a
    workload compiles few programs. Padding slots have position -1 and never reach a real
    token, so a text's embedding does not depend on its batch. `pooling`: "mean" over real
    tokens or "last" real token. Returns float32 ``[n, d_model]`` (not normalised).
    """

    def __init__(self, lm, batch_size: int = 16, max_len: int = 256, pooling: str = "mean"):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
        self.lm = lm
        self.batch_size = int(batch_size)
        self.max_len = int(max_len)
        self.pooling = pooling

    @property
    def dim(self) -> int:
        """Embedding dimension (the model's d_model)."""
        return int(self.lm.cfg.d_model)

    def describe(self) -> dict:
        """JSON description from which `jprag.retrieval.index` reloads the model and embedder."""
        return {
            "type": "model",
            "model": self.lm.path,
            "dtype": str(self.lm.cfg.dtype),
            "pooling": self.pooling,
            "max_len": self.max_len,
            "batch_size": self.batch_size,
            "dim": self.dim,
        }

    def _token_ids(self, text: str) -> list[int]:
        tok = self.lm.tokenizer
        ids = tok(str(text), add_special_tokens=True, truncation=True, max_length=self.max_len)["input_ids"]
        if not ids:  # empty text: embed a lone end-of-text token rather than nothing
            fallback = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
            ids = [int(fallback or 0)]
        return [int(i) for i in ids]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string")
        out = np.zeros((len(texts), self.dim), np.float32)
        if not len(texts):
            return out
        pooled = _pooled_forward()
        pad_id = int(self.lm.tokenizer.pad_token_id or 0)
        seqs = [self._token_ids(t) for t in texts]
        order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            rows = min(self.batch_size, 1 << (len(chunk) - 1).bit_length())
            length = _round_up(max(len(seqs[i]) for i in chunk), LENGTH_MULTIPLE)
            tokens = np.full((rows, length), pad_id, np.int32)
            mask = np.zeros((rows, length), np.int32)
            for r, i in enumerate(chunk):
                tokens[r, : len(seqs[i])] = seqs[i]
                mask[r, : len(seqs[i])] = 1
            emb = pooled(self.lm.cfg, self.lm.params, tokens, mask, self.pooling)
            out[chunk] = np.asarray(emb, np.float32)[: len(chunk)]
        return out


__all__ = [
    "DENSE_FORMAT_VERSION",
    "DenseIndex",
    "Embedder",
    "HashingEmbedder",
    "ModelEmbedder",
    "l2_normalize",
]
