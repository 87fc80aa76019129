"""The chunked, resumable encoder: a killed run resumes without redoing finished chunks and ends
with the same bank as an uninterrupted run; chunking does not change any document's adapter;
banks restore onto any mesh; incompatible or unfinished banks fail clearly.

Everything runs on a tiny random llama with synthetic token examples (no tokenizer).
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jprag.train.encoder as encoder
from jprag.lora.adapters import LoraConfig
from jprag.lora.store import BankError, chunk_dir, load_bank, read_index, shard_bank
from jprag.mesh import make_mesh, pad_to_data
from jprag.model.config import ModelConfig
from jprag.model.transformer import init_params
from jprag.train.encoder import encode_documents, plan_chunks
from jprag.train.recipe import Example
from jprag.train.stacked import TrainConfig

CFG = ModelConfig(family="llama", vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=16, d_ff=96)
LORA = LoraConfig(rank=2, alpha=32, targets=("gate", "up", "down", "q"))
# A larger learning rate than PRAG's 3e-4 so that a few steps clearly move the adapters.
TRAIN = TrainConfig(learning_rate=1e-3)
N_DOCS, CHUNK = 10, 4  # on a 2-device mesh: chunks of 4, 4 and 2 (+2 padding rows)


class Killed(Exception):
    """Stands in for the process being killed at a given point."""


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def corpus():
    """`(per_doc_examples, doc_ids)`: 2-5 random examples per document, 8-100 tokens each (so
    steps pad to 64 or 128), some with an answer-only loss mask."""
    rng = np.random.RandomState(0)
    per_doc = []
    for _ in range(N_DOCS):
        examples = []
        for _ in range(rng.randint(2, 6)):
            n = int(rng.randint(8, 101))
            mask = np.ones(n, np.int32)
            mask[0] = 0
            prompt_len = int(rng.randint(1, n)) if rng.rand() < 0.5 else 0
            mask[1:prompt_len] = 0
            examples.append(Example(rng.randint(3, CFG.vocab_size, n).astype(np.int32), mask, prompt_len))
        per_doc.append(examples)
    return per_doc, [f"doc-{i}" for i in range(N_DOCS)]


@pytest.fixture(scope="module")
def mesh2():
    return make_mesh(2, 1, devices=jax.devices()[:2])


def _encode(params, corpus, mesh, out, **kw):
    per_doc, doc_ids = corpus
    args = dict(lora=LORA, train=TRAIN, chunk_size=CHUNK, mesh=mesh, seed=0, model_id="tiny-llama",
                progress=False)
    args.update(kw)
    return encode_documents(CFG, params, per_doc, doc_ids, out, **args)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, params, corpus, mesh2):
    """An uninterrupted run: the bank every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "bank"
    _encode(params, corpus, mesh2, out)
    return out


def _assert_banks_close(got, want, atol):
    assert sorted(got) == sorted(want) == sorted(LORA.targets)
    for t in LORA.targets:
        for k in ("a", "b"):
            np.testing.assert_allclose(got[t][k], want[t][k], atol=atol, rtol=0, err_msg=f"{t}.{k}")


def test_reference_bank_is_trained(reference, corpus):
    bank, index = load_bank(reference)
    assert index["doc_ids"] == corpus[1]
    assert [len(c["rows"]) for c in index["chunks"]] == [4, 4, 2]
    assert all(c["done"] for c in index["chunks"])
    for t in LORA.targets:
        assert bank[t]["a"].shape == (N_DOCS, *LORA.shapes(CFG)[t]["a"])
        # b starts at zero: every document's adapter moved (the equality tests are not vacuous)
        assert (np.abs(bank[t]["b"]).reshape(N_DOCS, -1).max(axis=1) > 1e-4).all()


def test_resume_after_kill(tmp_path, monkeypatch, params, corpus, mesh2, reference):
    out = tmp_path / "bank"
    real_save = encoder.save_chunk
    saved = []

    def dies_on_second_save(root, c, rows):
        saved.append(c)
        if len(saved) == 2:
            raise Killed(f"killed while saving chunk {c}")
        real_save(root, c, rows)

    monkeypatch.setattr(encoder, "save_chunk", dies_on_second_save)
    with pytest.raises(Killed):
        _encode(params, corpus, mesh2, out)
    index = read_index(out)
    assert [c["done"] for c in index["chunks"]] == [True, False, False]
    assert chunk_dir(out, 0).is_dir() and not chunk_dir(out, 1).exists()
    seconds0 = index["chunks"][0]["seconds"]

    saved.clear()

    def counting_save(root, c, rows):
        saved.append(c)
        real_save(root, c, rows)

    monkeypatch.setattr(encoder, "save_chunk", counting_save)
    final = _encode(params, corpus, mesh2, out)
    assert saved == [1, 2], "chunk 0 was retrained on resume"
    assert final["chunks"][0]["seconds"] == seconds0
    assert read_index(out) == final
    _assert_banks_close(load_bank(out)[0], load_bank(reference)[0], atol=1e-6)


def test_leftover_chunk_without_index_entry_is_redone(tmp_path, monkeypatch, params, corpus, mesh2, reference):
    """Killed between the orbax save of chunk 1 and the index update: the directory exists (here
    with wrong values) but the index does not list the chunk as done, so it is trained again."""
    out = tmp_path / "bank"
    real_save = encoder.save_chunk

    def saves_garbage_then_dies(root, c, rows):
        if c == 1:
            real_save(root, c, jax.tree.map(lambda x: np.full_like(x, 7.0), rows))
            raise Killed("killed before the index update")
        real_save(root, c, rows)

    monkeypatch.setattr(encoder, "save_chunk", saves_garbage_then_dies)
    with pytest.raises(Killed):
        _encode(params, corpus, mesh2, out)
    assert chunk_dir(out, 1).is_dir()
    assert [c["done"] for c in read_index(out)["chunks"]] == [True, False, False]
    partial, _ = load_bank(out, require_complete=False)  # unfinished chunks read as zeros
    rows1 = read_index(out)["chunks"][1]["rows"]
    assert not any(partial[t][k][rows1].any() for t in LORA.targets for k in ("a", "b"))

    monkeypatch.setattr(encoder, "save_chunk", real_save)
    _encode(params, corpus, mesh2, out)
    bank, _ = load_bank(out)
    _assert_banks_close(bank, load_bank(reference)[0], atol=1e-6)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(lora=LoraConfig(rank=4, alpha=32, targets=LORA.targets)), "'lora'"),
        (dict(doc_ids=[f"doc-{i}" for i in range(N_DOCS - 1)] + ["another-doc"]), "'doc_ids'"),
        (dict(seed=1), "'seed'"),
        (dict(train=TrainConfig(learning_rate=3e-4)), "'train'"),
        (dict(model_id="another-model"), "'model'"),
    ],
    ids=["rank", "doc_ids", "seed", "lr", "model"],
)
def test_changed_arguments_on_resume(tmp_path, params, corpus, mesh2, reference, change, field):
    out = tmp_path / "bank"
    out.mkdir()
    shutil.copy(reference / "index.json", out / "index.json")
    before = (out / "index.json").read_text()
    change = dict(change)
    per_doc, doc_ids = corpus
    doc_ids = change.pop("doc_ids", doc_ids)
    with pytest.raises(BankError, match=field) as err:
        _encode(params, (per_doc, doc_ids), mesh2, out, **change)
    assert str(out) in str(err.value)
    assert (out / "index.json").read_text() == before, "a refused resume must not touch the index"


def test_resume_on_another_mesh_and_chunk_size(tmp_path, monkeypatch, params, corpus, mesh2, reference):
    """Killed after chunk 0 on a 2-device mesh with chunks of 4, resumed on one device with chunks
    of 3: chunk 0 is kept, the 6 unfinished rows are re-planned as 2 chunks of 3, and the bank
    equals the uninterrupted run's (rows are independent of their chunk)."""
    out = tmp_path / "bank"
    real_save = encoder.save_chunk

    def dies_on_second_save(root, c, rows):
        if c == 1:
            raise Killed("killed while saving chunk 1")
        real_save(root, c, rows)

    monkeypatch.setattr(encoder, "save_chunk", dies_on_second_save)
    with pytest.raises(Killed):
        _encode(params, corpus, mesh2, out)
    first = read_index(out)["chunks"][0]
    saved = []

    def counting_save(root, c, rows):
        saved.append(c)
        real_save(root, c, rows)

    monkeypatch.setattr(encoder, "save_chunk", counting_save)
    final = _encode(params, corpus, make_mesh(1, 1, devices=jax.devices()[:1]), out, chunk_size=3)
    assert final["chunks"][0] == first, "the finished chunk was touched"
    assert [len(c["rows"]) for c in final["chunks"]] == [4, 3, 3]
    assert saved == [1, 2] and [c["dir"] for c in final["chunks"]] == [0, 1, 2]
    assert sorted(r for c in final["chunks"] for r in c["rows"]) == list(range(N_DOCS))
    _assert_banks_close(load_bank(out)[0], load_bank(reference)[0], atol=1e-5)

    # Finished: a re-run (even on another chunk size) trains nothing and rewrites nothing.
    stamp = (out / "index.json").stat().st_mtime_ns
    assert _encode(params, corpus, mesh2, out, chunk_size=2) == final and saved == [1, 2]
    assert (out / "index.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("mesh_shape", [(4, 2), (2, 1)])
def test_restore_onto_another_mesh(reference, mesh_shape):
    bank, _ = load_bank(reference)
    mesh = make_mesh(*mesh_shape, devices=jax.devices()[: mesh_shape[0] * mesh_shape[1]])
    sharded = shard_bank(bank, mesh)
    n_pad = pad_to_data(N_DOCS, mesh)
    assert n_pad == {(4, 2): 12, (2, 1): 10}[mesh_shape]
    for t in LORA.targets:
        for k in ("a", "b"):
            arr = sharded[t][k]
            assert arr.shape == (n_pad, *bank[t][k].shape[1:])
            assert arr.sharding.spec[0] == "data"
            host = np.asarray(arr)
            np.testing.assert_array_equal(host[:N_DOCS], bank[t][k])
            assert not host[N_DOCS:].any(), "padding rows must be zero"


def test_length_sorted_chunks_equal_one_chunk(tmp_path, params, corpus, mesh2, reference):
    per_doc, _ = corpus
    plan = plan_chunks(per_doc, CHUNK)
    flat = [r for rows in plan for r in rows]
    assert sorted(flat) == list(range(N_DOCS)), "every document exactly once"
    totals = [sum(len(e.tokens) for e in per_doc[r]) for r in flat]
    assert totals == sorted(totals, reverse=True), "longest documents first"
    assert [c["rows"] for c in read_index(reference)["chunks"]] == plan

    one = _encode(params, corpus, mesh2, tmp_path / "one", chunk_size=N_DOCS)
    assert len(one["chunks"]) == 1
    # Same adapters however the documents are grouped: independent rows, init keyed by global index.
    _assert_banks_close(load_bank(tmp_path / "one")[0], load_bank(reference)[0], atol=1e-5)


def test_load_unfinished_bank_mentions_resuming(tmp_path, reference):
    out = tmp_path / "bank"
    out.mkdir()
    index = json.loads((reference / "index.json").read_text())
    index["chunks"][-1]["done"] = False
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(BankError, match="resum") as err:
        load_bank(out)
    assert str(out) in str(err.value)


def test_shared_init_starts_every_document_from_one_a(tmp_path, params, corpus, mesh2):
    """`shared_init`: every row starts from document index 0's A (DyPRAG's training pairs); the
    default draws one A per document. With lr = 0 the bank is exactly its initialisation."""
    from jprag.lora import init_bank

    frozen = TrainConfig(learning_rate=0.0, weight_decay=0.0)
    shared = _encode(params, corpus, mesh2, tmp_path / "shared", train=frozen, shared_init=True)
    assert shared["shared_init"] is True
    own = _encode(params, corpus, mesh2, tmp_path / "own", train=frozen)
    a0 = np.asarray(init_bank(CFG, LORA, jax.random.key(0), jnp.asarray([0]))["up"]["a"][0])
    a_shared = load_bank(tmp_path / "shared")[0]["up"]["a"]
    a_own = load_bank(tmp_path / "own")[0]["up"]["a"]
    for r in range(N_DOCS):
        np.testing.assert_array_equal(a_shared[r], a0)
    assert not np.allclose(a_own[1], a_own[0])


def test_bank_reader_reads_only_the_rows_asked_for(reference):
    """Serving from disk: `BankReader.rows` equals the loaded bank's rows in any order, and
    `BankSource.from_dir` gives the same per-question adapters as the in-memory bank."""
    from jprag.eval.methods import BankSource
    from jprag.lora.store import BankReader

    bank, index = load_bank(reference)
    reader = BankReader(reference)
    rows = [7, 0, 7, 3]
    got = reader.rows(rows)
    for t in LORA.targets:
        for k in ("a", "b"):
            assert np.array_equal(got[t][k], bank[t][k][rows])
    with pytest.raises(BankError, match="no document 'doc-99'"):
        reader.rows_of(["doc-99"])
    questions = [["doc-1", "doc-4", "doc-9"], ["doc-9", "doc-0", "doc-2"]]
    on_disk = BankSource.from_dir(reference).adapters(questions)
    in_memory = BankSource(jax.tree.map(jnp.asarray, bank), {d: i for i, d in enumerate(index["doc_ids"])},
                           LORA).adapters(questions)
    for t in LORA.targets:
        for x, y in zip(on_disk[t], in_memory[t]):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert BankSource.from_dir(reference).storage()["row_bytes"] == 4 * LORA.num_params(CFG)
