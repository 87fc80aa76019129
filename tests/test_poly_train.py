"""Poly-PRAG training: joint inventory + routing is the same on every mesh shape and resumes after
a kill to the same result; Poly-z trains only new rows (the inventory stays bit-identical), each
row independently of chunking and mesh; uniform routing never moves the routing table.

Everything runs on a tiny random llama with synthetic token examples (no tokenizer)."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jprag.poly.joint as joint
import jprag.poly.polyz as polyz
from jprag.mesh import make_mesh
from jprag.model.config import ModelConfig
from jprag.model.transformer import init_params
from jprag.poly.config import PolyConfig
from jprag.poly.joint import plan_steps, train_joint
from jprag.poly.polyz import train_routing_rows
from jprag.poly.routing import init_inventory, init_routing
from jprag.poly.store import JOINT_FORMAT, Z_FORMAT, PolyStoreError, fingerprint, load_joint, load_rows, read_index
from jprag.train.recipe import Example

CFG = ModelConfig(family="llama", vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  d_ff=96)
# Larger learning rates than the defaults so that a few steps clearly move everything; not so
# large that Adam turns float32 rounding (different reduction orders on different meshes) into
# visible differences where a gradient component sits at its noise floor.
POLY = PolyConfig(n_skills=4, rank=2, batch_docs=4, epochs=2, learning_rate=5e-3, routing_learning_rate=0.05,
                  checkpoint_every=3, chunk_size=2)
N_DOCS, N_NEW = 10, 5


class Killed(Exception):
    """Stands in for the process being killed at a given point."""


def _mesh(data, model):
    return make_mesh(data, model, devices=jax.devices()[: data * model])


def _docs(rng, n):
    """2-4 random examples per document, 8-60 tokens each (one 64-token step shape)."""
    out = []
    for _ in range(n):
        examples = []
        for _ in range(rng.randint(2, 5)):
            length = int(rng.randint(8, 61))
            mask = np.ones(length, np.int32)
            mask[0] = 0
            examples.append(Example(rng.randint(3, CFG.vocab_size, length).astype(np.int32), mask))
        out.append(examples)
    return out


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.RandomState(0)
    old, new = _docs(rng, N_DOCS), _docs(rng, N_NEW)
    return old, [f"doc-{i}" for i in range(N_DOCS)], new, [f"new-{i}" for i in range(N_NEW)]


def _joint(params, corpus, out, mesh, poly=POLY):
    per_doc, ids = corpus[:2]
    return train_joint(CFG, params, per_doc, ids, out, poly=poly, mesh=mesh, model_id="tiny", progress=False,
                       length_multiple=64)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, params, corpus):
    """An uninterrupted joint run on a 2-device mesh: what every other run must reproduce."""
    out = tmp_path_factory.mktemp("poly") / "joint"
    _joint(params, corpus, out, _mesh(2, 1))
    return out


def _assert_close(got, want, atol_inv, atol_z):
    (inv_g, z_g), (inv_w, z_w) = got, want
    for t in POLY.targets:
        for k in ("a", "b"):
            np.testing.assert_allclose(inv_g[t][k], inv_w[t][k], atol=atol_inv, rtol=0, err_msg=f"{t}.{k}")
    np.testing.assert_allclose(z_g, z_w, atol=atol_z, rtol=0, err_msg="routing")


def test_plan_steps_cover_every_sample_once_per_epoch():
    n_ex = [3, 1, 2, 3, 2]
    plan = plan_steps(n_ex, epochs=2, batch_docs=2, seed=0)
    seen = [(r, t, s) for step in plan for r, t, s in step]
    assert sorted(seen) == sorted((r, t, e * n + t) for e in range(2) for r, n in enumerate(n_ex) for t in range(n))
    assert all(len(step) <= 2 and len({r for r, _, _ in step}) == len(step) for step in plan)
    assert plan == plan_steps(n_ex, 2, 2, 0) and plan != plan_steps(n_ex, 2, 2, 1)


def test_joint_training_moves_inventory_and_routing(reference, params, corpus):
    inventory, z, index = load_joint(reference)
    stamp = (reference / "index.json").stat().st_mtime_ns
    assert _joint(params, corpus, reference, _mesh(2, 1)) == index, "a finished run is returned as is"
    assert (reference / "index.json").stat().st_mtime_ns == stamp
    assert index["done"] and index["checkpoint"] is None and not (reference / "ckpt").exists()
    assert index["doc_ids"] == corpus[1] and z.shape == (N_DOCS, CFG.n_layers, POLY.n_skills)
    assert inventory["up"]["a"].shape == (CFG.n_layers, POLY.n_skills, CFG.d_model, POLY.rank)
    for t in POLY.targets:  # B starts at 0 for every skill; every skill was trained
        assert (np.abs(inventory[t]["b"]).max(axis=(0, 2, 3)) > 1e-3).all()
    z0 = np.asarray(init_routing(POLY, CFG.n_layers, jnp.arange(N_DOCS)))
    assert (np.abs(z - z0).reshape(N_DOCS, -1).max(axis=1) > 1e-2).all(), "every document's row moved"
    assert len(index["losses"]) == -(-index["n_steps"] // POLY.checkpoint_every)


# Mesh shapes covered: (2, 1) the reference, (2, 4) here (documents over 2, base weights over 4),
# (8, 1) by the resumed run below, (2, 1) and (4, 2) by Poly-z.
@pytest.mark.parametrize("mesh_shape", [(2, 4)])
def test_joint_training_same_on_every_mesh(tmp_path, params, corpus, reference, mesh_shape):
    _joint(params, corpus, tmp_path / "joint", _mesh(*mesh_shape))
    got, want = load_joint(tmp_path / "joint"), load_joint(reference)
    assert got[2]["n_steps"] == want[2]["n_steps"], "the step plan must not depend on the mesh"
    _assert_close(got[:2], want[:2], atol_inv=2e-5, atol_z=5e-5)


def test_joint_resume_after_kill(tmp_path, monkeypatch, params, corpus, reference):
    out = tmp_path / "joint"
    real_save = joint.save_tree
    saves = []

    def dies_on_second_checkpoint(path, tree):
        saves.append(path.name)
        if len(saves) == 2:
            real_save(path, jax.tree.map(lambda x: np.full_like(np.asarray(x), 7), tree))  # half-written
            raise Killed(f"killed while writing {path}")
        real_save(path, tree)

    monkeypatch.setattr(joint, "save_tree", dies_on_second_checkpoint)
    with pytest.raises(Killed):
        _joint(params, corpus, out, _mesh(2, 1))
    index = read_index(out, JOINT_FORMAT)
    assert index["step"] == 3 and index["checkpoint"] == "ckpt/step_000003" and not index["done"]
    with pytest.raises(PolyStoreError, match="not finished"):
        load_joint(out)

    monkeypatch.setattr(joint, "save_tree", real_save)
    final = _joint(params, corpus, out, _mesh(2, 1))  # resumes from step 3, redoes 3..6 over the garbage
    assert final["done"] and final["losses"][0] == read_index(reference, JOINT_FORMAT)["losses"][0]
    assert not (out / "ckpt").exists(), "checkpoints (and the half-written one) are removed when done"
    _assert_close(load_joint(out)[:2], load_joint(reference)[:2], atol_inv=0, atol_z=0)
    # A resumed run on another mesh restores the same checkpoint and ends (numerically) the same.
    shutil.rmtree(out)
    monkeypatch.setattr(joint, "save_tree", dies_on_second_checkpoint)
    saves.clear()
    with pytest.raises(Killed):
        _joint(params, corpus, out, _mesh(2, 1))
    monkeypatch.setattr(joint, "save_tree", real_save)
    _joint(params, corpus, out, _mesh(8, 1))
    _assert_close(load_joint(out)[:2], load_joint(reference)[:2], atol_inv=2e-5, atol_z=5e-5)


@pytest.mark.parametrize("change, field", [
    (dict(n_skills=3), "n_skills"), (dict(seed=1), "seed"), (dict(routing_learning_rate=0.1), "routing_learning_rate"),
])
def test_resume_refuses_another_run(tmp_path, params, corpus, reference, change, field):
    out = tmp_path / "joint"
    out.mkdir()
    index = json.loads((reference / "index.json").read_text())
    index.update(done=False, step=0)
    (out / "index.json").write_text(json.dumps(index))
    before = (out / "index.json").read_text()
    with pytest.raises(PolyStoreError, match=field) as err:
        _joint(params, corpus, out, _mesh(2, 1), poly=PolyConfig(**{**POLY.to_json(), **change,
                                                                   "targets": POLY.targets}))
    assert str(out) in str(err.value) and (out / "index.json").read_text() == before


def _rows(params, corpus, inventory, out, mesh, chunk_size, subset=slice(None)):
    per_doc, ids = corpus[2][subset], corpus[3][subset]
    poly = PolyConfig(**{**POLY.to_json(), "chunk_size": chunk_size, "targets": POLY.targets})
    train_routing_rows(CFG, params, inventory, per_doc, ids, out, poly=poly, mesh=mesh, model_id="tiny",
                       progress=False, length_multiple=64)
    return load_rows(out)


def test_poly_z_trains_only_new_rows(tmp_path, monkeypatch, params, corpus, reference):
    inventory_np, _, _ = load_joint(reference)
    before = jax.tree.map(np.copy, inventory_np)
    inventory = jax.tree.map(jnp.asarray, inventory_np)
    z, index = _rows(params, corpus, inventory, tmp_path / "a", _mesh(2, 1), chunk_size=2)

    # The inventory is bit-identical: the arrays we passed, and the joint run's files.
    for t in POLY.targets:
        for k in ("a", "b"):
            assert np.array_equal(np.asarray(inventory[t][k]), before[t][k])
            assert np.array_equal(load_joint(reference)[0][t][k], before[t][k])
    assert index["inventory"] == fingerprint(before) == fingerprint(inventory)
    z0 = np.asarray(init_routing(POLY, CFG.n_layers, jnp.arange(N_NEW)))
    assert z.shape == (N_NEW, CFG.n_layers, POLY.n_skills)
    assert (np.abs(z - z0).reshape(N_NEW, -1).max(axis=1) > 1e-2).all(), "every new row was trained"

    # Rows are independent: another chunking on another mesh, or a document trained alone
    # (same global index), gives the same row.
    z_other, _ = _rows(params, corpus, inventory, tmp_path / "b", _mesh(4, 2), chunk_size=8)
    np.testing.assert_allclose(z_other, z, atol=1e-5, rtol=0)
    z_first, _ = _rows(params, corpus, inventory, tmp_path / "c", _mesh(2, 1), chunk_size=1, subset=slice(0, 1))
    np.testing.assert_allclose(z_first[0], z[0], atol=1e-5, rtol=0)

    # Resumable by chunk: a kill after the first chunk, then a resume, gives the same rows.
    real_save = polyz.save_chunk
    def dies_on_second_chunk(root, c, rows):
        if c == 1:
            raise Killed("killed before saving chunk 1")
        real_save(root, c, rows)

    monkeypatch.setattr(polyz, "save_chunk", dies_on_second_chunk)
    with pytest.raises(Killed):
        _rows(params, corpus, inventory, tmp_path / "d", _mesh(2, 1), chunk_size=2)
    assert [c["done"] for c in read_index(tmp_path / "d", Z_FORMAT)["chunks"]] == [True, False, False]
    monkeypatch.setattr(polyz, "save_chunk", real_save)
    np.testing.assert_array_equal(_rows(params, corpus, inventory, tmp_path / "d", _mesh(2, 1), chunk_size=2)[0], z)

    # Killed again, resumed on a mesh with another `data` size: the unfinished rows are re-planned
    # (chunks of 4, not 2), the finished chunk is kept, and the rows are the same.
    monkeypatch.setattr(polyz, "save_chunk", dies_on_second_chunk)
    with pytest.raises(Killed):
        _rows(params, corpus, inventory, tmp_path / "e", _mesh(2, 1), chunk_size=2)
    monkeypatch.setattr(polyz, "save_chunk", real_save)
    z_moved, moved = _rows(params, corpus, inventory, tmp_path / "e", _mesh(4, 1), chunk_size=2)
    assert [len(c["rows"]) for c in moved["chunks"]] == [2, 3]
    np.testing.assert_allclose(z_moved, z, atol=1e-5, rtol=0)

    other = jax.tree.map(lambda x: x + 1.0, inventory)  # rows of another inventory are another run
    with pytest.raises(PolyStoreError, match="'inventory'"):
        _rows(params, corpus, other, tmp_path / "d", _mesh(2, 1), chunk_size=2)


def test_uniform_routing_trains_only_the_inventory(tmp_path, params, corpus):
    poly = PolyConfig(**{**POLY.to_json(), "routing": "uniform", "epochs": 1, "targets": POLY.targets})
    _joint(params, corpus, tmp_path / "u", _mesh(2, 1), poly=poly)
    inventory, z, _ = load_joint(tmp_path / "u")
    np.testing.assert_array_equal(z, np.asarray(init_routing(poly, CFG.n_layers, jnp.arange(N_DOCS))))
    assert np.abs(inventory["down"]["b"]).max() > 1e-3
    fresh = init_inventory(CFG, poly)
    assert not np.array_equal(inventory["down"]["a"], np.asarray(fresh["down"]["a"]))
