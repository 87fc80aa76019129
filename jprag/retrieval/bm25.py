"""Sparse retrieval: a BM25 index over passages, backed by `bm25s`.

Text is lower-cased, split on word characters (bm25s' default pattern: tokens of two or more
word characters) and English stopwords are removed (bm25s' own list). Stemming is off by
default; ``stem=True`` uses PyStemmer's English stemmer (an extra dependency, imported only
then). Saved indexes are plain bm25s files (numpy arrays + JSON, never pickle) plus
``bm25_ids.json`` holding the document ids, the tokenisation settings and a format version.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Sequence

import numpy as np

from jprag.io import write_json_atomic

BM25_FORMAT_VERSION = 1
IDS_FILE = "bm25_ids.json"
_STOPWORDS = "en"


def check_ids(n_texts: int, ids: Sequence[str]) -> list[str]:
    """`ids` as a list of str; ValueError unless there is one unique id per text."""
    ids = [str(i) for i in ids]
    if len(ids) != n_texts:
        raise ValueError(f"got {n_texts} texts but {len(ids)} ids")
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"document ids must be unique; {i!r} occurs more than once")
        seen.add(i)
    return ids


def clip_k(k: int, n_docs: int) -> int:
    """`min(k, n_docs)`; ValueError for a non-positive k or an empty corpus."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if n_docs == 0:
        raise ValueError("cannot search an empty corpus")
    return min(int(k), n_docs)


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` largest `scores`, best first; ties go to the lower index."""
    if k < len(scores):
        cand = np.argpartition(-scores, k - 1)[:k]
    else:
        cand = np.arange(len(scores))
    order = np.lexsort((cand, -scores[cand]))
    return cand[order][:k]


def _stemmer(stem: bool):
    if not stem:
        return None
    try:
        import Stemmer  # PyStemmer
    except ImportError as e:
        raise ImportError("BM25Index(stem=True) needs PyStemmer: pip install PyStemmer") from e
    return Stemmer.Stemmer("english").stemWord


class BM25Index:
    """A BM25 index mapping queries to the ids of the best-scoring texts.

    Build with `BM25Index.build(texts, ids)`, query with `search`, persist with `save` /
    `BM25Index.load`. Instances are read-only once built.
    """

    def __init__(self, model, ids: Sequence[str], stem: bool = False):
        """Wrap an indexed `bm25s.BM25` whose document i has id `ids[i]` (use `build`/`load`)."""
        self._model = model
        self.ids: list[str] = list(ids)
        self.stem = bool(stem)

    def __len__(self) -> int:
        return len(self.ids)

    def _tokenize(self, texts: Sequence[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(
            list(texts), lower=True, stopwords=_STOPWORDS, stemmer=_stemmer(self.stem),
            return_ids=False, show_progress=False,
        )

    @classmethod
    def build(cls, texts: Sequence[str], ids: Sequence[str], *, stem: bool = False) -> "BM25Index":
        """Index `texts` (document i gets id `ids[i]`; ids must be unique).

        Raises ValueError for an empty corpus or mismatched lengths.
        """
        import bm25s

        texts = [str(t) for t in texts]
        ids = check_ids(len(texts), ids)
        if not texts:
            raise ValueError("cannot build a BM25 index over an empty corpus")
        index = cls(None, ids, stem)
        model = bm25s.BM25()
        model.index(index._tokenize(texts), create_empty_token=False, show_progress=False)
        index._model = model
        return index

    def search(self, queries: Sequence[str], k: int) -> tuple[list[list[str]], np.ndarray]:
        """Top-`k` document ids per query (best first) and their scores `[n_queries, k]`.

        `k` is clipped to the corpus size. Query words absent from the corpus are ignored; a
        query with no known word scores every document 0 (ties keep corpus order).
        """
        if isinstance(queries, str):
            raise TypeError("queries must be a sequence of strings, not a single string")
        k = clip_k(k, len(self.ids))
        if not len(queries):
            return [], np.zeros((0, k), np.float32)
        vocab = self._model.vocab_dict
        n_docs = len(self.ids)
        ranked: list[list[str]] = []
        scores = np.zeros((len(queries), k), np.float32)
        for q, toks in enumerate(self._tokenize(queries)):
            tids = [vocab[t] for t in toks if t and t in vocab]
            if tids:
                s = np.asarray(self._model.get_scores_from_ids(tids), np.float32)
            else:
                s = np.zeros(n_docs, np.float32)
            top = top_k_indices(s, k)
            ranked.append([self.ids[int(j)] for j in top])
            scores[q] = s[top]
        return ranked, scores

    def save(self, directory: str | os.PathLike) -> None:
        """Write the bm25s index files and `bm25_ids.json` into `directory` (created if needed)."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._model.save(str(directory), allow_pickle=False, show_progress=False)
        meta = {
            "format_version": BM25_FORMAT_VERSION,
            "lower": True,
            "stopwords": _STOPWORDS,
            "stem": self.stem,
            "ids": self.ids,
        }
        write_json_atomic(directory / IDS_FILE, meta, ensure_ascii=False)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "BM25Index":
        """Read an index written by `save`; FileNotFoundError / ValueError name the directory."""
        import bm25s

        directory = pathlib.Path(directory)
        meta_path = directory / IDS_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory}: not a saved BM25 index (no {IDS_FILE})")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        version = meta.get("format_version")
        if version != BM25_FORMAT_VERSION:
            raise ValueError(
                f"{directory}: BM25 index format version {version!r} is not supported "
                f"(expected {BM25_FORMAT_VERSION}); rebuild the index"
            )
        model = bm25s.BM25.load(str(directory), load_vocab=True, allow_pickle=False,
                                show_progress=False, verbosity=0)
        n_docs = int(model.scores["num_docs"])
        if n_docs != len(meta["ids"]):
            raise ValueError(f"{directory}: index holds {n_docs} documents but {IDS_FILE} lists {len(meta['ids'])} ids")
        return cls(model, meta["ids"], bool(meta.get("stem", False)))


__all__ = ["BM25Index", "BM25_FORMAT_VERSION", "check_ids", "clip_k", "top_k_indices"]
