"""Training the translator: the same result on a 1-, 2- and 4-way data mesh; a killed run resumes
from its checkpoint and ends where an uninterrupted run ends; a finished translator restores and
is not retrained; incompatible or unfinished directories fail clearly.

Tiny random llama, synthetic token examples, embeddings and PRAG adapters (no tokenizer).
"""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

import jprag.translator.store as store
import jprag.translator.train as train_mod
from jprag.lora import LoraConfig, init_bank
from jprag.mesh import make_mesh
from jprag.model.config import ModelConfig
from jprag.model.transformer import init_params
from jprag.train.recipe import Example
from jprag.translator.config import TranslatorConfig
from jprag.translator.pipeline import translate_embeddings
from jprag.translator.store import TranslatorError, load_translator, read_meta
from jprag.translator.train import train_translator

CFG = ModelConfig(family="llama", vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  d_ff=96)
LORA = LoraConfig(rank=2, alpha=32, targets=("gate", "up", "down"))
N_DOCS, E = 6, 16
# 6 documents, 4 per step, 2 epochs: groups of 4 + 2 (padded) per epoch, one step per sample index
TCFG = TranslatorConfig(hidden=8, batch_docs=4, epochs=2, learning_rate=1e-3, checkpoint_every=2)


class Killed(Exception):
    """Stands in for the process being killed."""


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def data():
    """`(examples, embeddings, adapters, doc ids)`: 1-3 examples of ≤ 60 tokens per document (one
    step length), random embeddings, PEFT-initialised adapters with random non-zero B."""
    rng = np.random.RandomState(0)
    examples = []
    for _ in range(N_DOCS):
        exs = []
        for _ in range(rng.randint(1, 4)):
            n = int(rng.randint(8, 61))
            mask = np.ones(n, np.int32)
            mask[0] = 0
            exs.append(Example(rng.randint(3, CFG.vocab_size, n).astype(np.int32), mask))
        examples.append(exs)
    teacher = jax.tree.map(np.asarray, init_bank(CFG, LORA, jax.random.key(1), N_DOCS))
    for t in teacher:
        teacher[t]["b"] = (0.01 * rng.randn(*teacher[t]["b"].shape)).astype(np.float32)
    emb = rng.randn(N_DOCS, E).astype(np.float32)
    return examples, emb, teacher, [f"doc-{i}" for i in range(N_DOCS)]


def total_steps(examples):
    return sum(max(len(examples[r]) for r in rows) for _, rows in train_mod.plan_groups(N_DOCS, 4, 2, 0))


def _train(params, data, out, mesh=None, **kw):
    examples, emb, teacher, ids = data
    mesh = mesh or make_mesh(1, 1, devices=jax.devices()[:1])
    kw.setdefault("model_id", "tiny-llama")
    return train_translator(CFG, params, LORA, kw.pop("tcfg", TCFG), examples, emb, teacher, ids, out, mesh=mesh,
                            progress=False, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, params, data):
    """An uninterrupted run on one device: `(directory, translator)`."""
    out = tmp_path_factory.mktemp("translator") / "ref"
    _, translator, meta = _train(params, data, out)
    return out, translator, meta


def _assert_close(got, want, atol):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_reference_run_trains_and_restores(reference, params, data):
    out, translator, meta = reference
    total = total_steps(data[0])
    assert total >= 8, "the resume test kills the run at step 6"
    assert meta["done"] and meta["total_steps"] == total and meta["step"] == total and meta["docs_per_step"] == 4
    assert [h["step"] for h in meta["history"]] == list(range(2, total, 2)) + [total]
    init = train_mod.init_translator(train_mod.TranslatorSpec.create(CFG, LORA, E, 8), jax.random.key(0),
                                     train_mod.fit_stats(data[1], data[2]))
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(translator["mlp"]), jax.tree.leaves(init["mlp"])))
    assert moved > 1e-4, "training did not move the translator: the equality tests would be vacuous"
    assert not (out / "ckpt").exists() and (out / "final").is_dir()
    spec, restored, meta2 = load_translator(out)
    assert meta2 == read_meta(out) and spec.emb_dim == E
    _assert_close(restored, translator, atol=0)
    for t in LORA.targets:  # restored translator translates identically
        a = translate_embeddings(spec, restored, data[1])
        b = translate_embeddings(spec, translator, data[1])
        assert np.array_equal(a[t]["b"], b[t]["b"])


def test_data_mesh_equals_one_device(reference, params, data, tmp_path):
    """2-way data parallelism: each device holds 2 of the step's 4 documents; same translator."""
    _, want, _ = reference
    mesh = make_mesh(2, 1, devices=jax.devices()[:2])
    _, got, meta = _train(params, data, tmp_path / "t", mesh=mesh)
    assert meta["docs_per_step"] == 4
    _assert_close(got, want, atol=2e-6)


def test_resume_after_kill(reference, params, data, tmp_path, monkeypatch):
    """Killed while writing the checkpoint of step 6 (after orbax wrote it, before meta.json named
    it): the run resumes from step 4, replaces the leftover, and ends where the reference ends."""
    out = tmp_path / "t"
    real_save = store.save_checkpoint

    def dies_writing_step6(root, step, state, meta):
        if step == 6:
            garbage = jax.tree.map(lambda x: np.full_like(np.asarray(x), 7), state)
            store._save(store.checkpoint_dir(root, step), garbage)
            raise Killed("killed before meta.json named the new checkpoint")
        real_save(root, step, state, meta)

    monkeypatch.setattr(store, "save_checkpoint", dies_writing_step6)
    with pytest.raises(Killed):
        _train(params, data, out)
    meta = read_meta(out)
    assert meta["step"] == 4 and not meta["done"] and [h["step"] for h in meta["history"]] == [2, 4]
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["00000004", "00000006"]
    with pytest.raises(TranslatorError, match="not finished"):
        load_translator(out)

    monkeypatch.setattr(store, "save_checkpoint", real_save)
    calls = []
    real_jit = train_mod.jit_translator_step

    def counting_jit(*args):
        fn = real_jit(*args)
        return lambda *a: (calls.append(1), fn(*a))[1]

    monkeypatch.setattr(train_mod, "jit_translator_step", counting_jit)
    _, got, meta = _train(params, data, out)
    total = total_steps(data[0])
    assert len(calls) == total - 4, "steps before the checkpoint were retrained"
    assert [h["step"] for h in meta["history"]] == list(range(2, total, 2)) + [total]
    _assert_close(got, reference[1], atol=1e-6)

    calls.clear()  # finished: a re-run loads it and trains nothing
    _, again, _ = _train(params, data, out)
    assert not calls
    _assert_close(again, got, atol=0)


@pytest.mark.parametrize("change, field", [
    (dict(tcfg=TranslatorConfig(hidden=4, batch_docs=4, epochs=2, learning_rate=1e-3)), "'translator'"),
    (dict(model_id="another-model"), "'model'"),
    (dict(ids=[f"doc-{i}" for i in range(N_DOCS - 1)] + ["other"]), "'doc_ids'"),
], ids=["hidden", "model", "doc_ids"])
def test_changed_arguments_are_refused(reference, params, data, tmp_path, change, field):
    out = tmp_path / "t"
    out.mkdir()
    shutil.copy(reference[0] / "meta.json", out / "meta.json")
    before = (out / "meta.json").read_text()
    change = dict(change)
    examples, emb, teacher, ids = data
    ids = change.pop("ids", ids)
    with pytest.raises(TranslatorError, match=field) as err:
        _train(params, (examples, emb, teacher, ids), out, **change)
    assert str(out) in str(err.value)
    assert (out / "meta.json").read_text() == before


def test_bad_directories_fail_clearly(tmp_path):
    with pytest.raises(TranslatorError, match="no translator here"):
        load_translator(tmp_path)
    (tmp_path / "meta.json").write_text('{"format": "something-else"}')
    with pytest.raises(TranslatorError, match="'format'"):
        load_translator(tmp_path)
