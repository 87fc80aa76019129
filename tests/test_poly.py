"""Poly-PRAG routing math: one-hot routing is plain LoRA, Gumbel-sigmoid statistics, deterministic
evaluation weights that sum to 1, merge-before mixing, the adapter source's top-k merge, config
validation. Tiny random llama, no tokenizer."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jprag.lora.adapters import applied, merge_topk
from jprag.model.config import ModelConfig
from jprag.model.transformer import forward, init_params
from jprag.poly.config import PolyConfig
from jprag.poly.pipeline import PolySource, cross_fit_halves
from jprag.poly.routing import (eval_weights, gumbel_sigmoid, init_inventory, init_routing, logistic_noise, mix,
                                skill_adapter, temperature, train_weights, weights)

CFG = ModelConfig(family="llama", vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  d_ff=96)
POLY = PolyConfig(n_skills=5, rank=2, alpha=16.0, targets=("gate", "up", "down", "q"))
fwd = jax.jit(forward, static_argnums=0)


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def inventory():
    """A trained-looking inventory: A as initialised, B random (B = 0 would make every mix equal)."""
    inv = init_inventory(CFG, POLY)
    keys = iter(jax.random.split(jax.random.key(7), 16))
    return {t: {"a": ab["a"], "b": 0.05 * jax.random.normal(next(keys), ab["b"].shape)} for t, ab in inv.items()}


def _tokens():
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, CFG.vocab_size)
    return tokens, jnp.broadcast_to(jnp.arange(12), (2, 12))


def _one_hot_logits(skills_l):
    """Logits whose evaluation weights are exactly one-hot on skill `skills_l[l]` in layer l."""
    z = np.full((1, len(skills_l), POLY.n_skills), -1e4, np.float32)  # log σ(-1e4) = -1e4: exp underflows to 0
    z[0, np.arange(len(skills_l)), skills_l] = 30.0
    return jnp.asarray(z)


@pytest.mark.parametrize("k", [0, 3])
def test_one_hot_routing_is_plain_lora_of_that_skill(params, inventory, k):
    w = eval_weights(_one_hot_logits([k, k]))
    assert np.array_equal(np.asarray(w[0, :, k]), [1.0, 1.0])
    mixed = jax.tree.map(lambda x: x[0], mix(inventory, w))
    skill = skill_adapter(inventory, k)
    for t in POLY.targets:  # merge-before with a one-hot weight selects the skill's factors exactly
        assert np.array_equal(np.asarray(mixed[t]["a"]), np.asarray(skill[t]["a"]))
        assert np.array_equal(np.asarray(mixed[t]["b"]), np.asarray(skill[t]["b"]))
    tokens, pos = _tokens()
    got, _ = fwd(CFG, params, tokens, pos, adapters=applied(mixed, POLY.scale))
    want, _ = fwd(CFG, params, tokens, pos, adapters=applied(skill, POLY.scale))
    base, _ = fwd(CFG, params, tokens, pos)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert not np.allclose(np.asarray(got), np.asarray(base), atol=1e-3), "the skill must change the output"


def test_per_layer_one_hot_picks_each_layers_skill(inventory):
    mixed = mix(inventory, eval_weights(_one_hot_logits([1, 4])))
    for t in POLY.targets:
        for layer, k in enumerate([1, 4]):
            np.testing.assert_array_equal(mixed[t]["a"][0, layer], inventory[t]["a"][layer, k])
            np.testing.assert_array_equal(mixed[t]["b"][0, layer], inventory[t]["b"][layer, k])


def test_merge_before_scaling(inventory):
    """ΔW_d = (alpha / rank) · (Σ_m w_m A_m)(Σ_m w_m B_m), shared routing broadcast over layers."""
    z = jax.random.normal(jax.random.key(3), (3, 1, POLY.n_skills))
    w = eval_weights(z)
    mixed = mix(inventory, w)
    for t in POLY.targets:
        a = np.einsum("dm,lmir->dlir", np.asarray(w[:, 0]), np.asarray(inventory[t]["a"]))
        b = np.einsum("dm,lmro->dlro", np.asarray(w[:, 0]), np.asarray(inventory[t]["b"]))
        np.testing.assert_allclose(mixed[t]["a"], a, rtol=1e-5, atol=1e-7)
        delta = np.einsum("dlir,dlro->dlio", *applied(mixed, POLY.scale)[t])
        np.testing.assert_allclose(delta, POLY.alpha / POLY.rank * np.einsum("dlir,dlro->dlio", a, b), rtol=1e-4,
                                   atol=1e-7)


def test_fresh_inventory_is_the_base_model(params):
    inv = init_inventory(CFG, POLY)
    assert all(not np.asarray(ab["b"]).any() for ab in inv.values())
    assert len({float(inv["up"]["a"][0, m, 0, 0]) for m in range(POLY.n_skills)}) == POLY.n_skills, "distinct skills"
    z = init_routing(POLY, CFG.n_layers, jnp.arange(4))
    assert z.shape == (4, CFG.n_layers, POLY.n_skills) and float(jnp.abs(z).max()) <= POLY.init_logit
    tokens, pos = _tokens()
    mixed = jax.tree.map(lambda x: x[0], mix(inv, eval_weights(z[:1])))
    got, _ = fwd(CFG, params, tokens, pos, adapters=applied(mixed, POLY.scale))
    base, _ = fwd(CFG, params, tokens, pos)
    assert np.array_equal(np.asarray(got), np.asarray(base))


def test_random_streams_keyed_by_global_index():
    z = init_routing(POLY, 2, jnp.arange(10))
    np.testing.assert_array_equal(init_routing(POLY, 2, jnp.asarray([7, 2])), z[jnp.asarray([7, 2])])
    noise = logistic_noise(POLY, jnp.asarray([3, 5, 3]), jnp.asarray([0, 0, 1]), (2, 5))
    again = logistic_noise(POLY, jnp.asarray([5, 9, 3]), jnp.asarray([0, 4, 0]), (2, 5))
    np.testing.assert_array_equal(noise[1], again[0])  # (doc 5, step 0), whatever the batch
    np.testing.assert_array_equal(noise[0], again[2])
    assert not np.array_equal(noise[0], noise[2]), "a document's steps draw fresh noise"


def test_gumbel_sigmoid_statistics():
    n = 40_000
    noise = np.asarray(logistic_noise(POLY, jnp.arange(n), jnp.zeros(n, jnp.int32), (2, 5))).reshape(-1)
    assert abs(noise.mean()) < 0.02
    assert abs(noise.var() / (math.pi**2 / 3) - 1) < 0.02  # logistic(0, 1): variance π²/3
    for x in (-2.0, 0.0, 1.5):  # CDF of the standard logistic is σ(x)
        assert abs((noise < x).mean() - 1 / (1 + math.exp(-x))) < 0.01
    # Relaxed Bernoulli: P(σ((z + L)/τ) > 1/2) = σ(z), for any τ; small τ pushes samples to {0, 1}.
    noise = jnp.asarray(noise[:n].reshape(n, 1))
    z = jnp.asarray([[-1.0, 0.0, 2.0]])
    for tau in (1.0, 0.25):
        s = np.asarray(gumbel_sigmoid(z, noise, tau))
        np.testing.assert_allclose((s > 0.5).mean(axis=0), 1 / (1 + np.exp(-np.asarray(z[0]))), atol=0.01)
    soft = np.asarray(gumbel_sigmoid(z, noise, 1.0))
    hard = np.asarray(gumbel_sigmoid(z, noise, 0.1))
    mid = lambda s: ((s > 0.05) & (s < 0.95)).mean()  # noqa: E731
    assert mid(hard) < 0.25 < mid(soft)


def test_weights_sum_to_one_and_eval_is_deterministic():
    z = jax.random.normal(jax.random.key(4), (6, 2, POLY.n_skills)) * 3
    z = z.at[0].set(-1e4).at[1, 0].set(200.0)  # every σ underflows / saturates: still a distribution
    noise = logistic_noise(POLY, jnp.arange(6), jnp.zeros(6, jnp.int32), (2, POLY.n_skills))
    tau = temperature(POLY, jnp.linspace(0.0, 1.0, 6))
    for w in (train_weights(z, noise, tau), eval_weights(z), weights(PolyConfig(routing="uniform"), z)):
        w = np.asarray(w)
        assert np.isfinite(w).all() and (w >= 0).all()
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(eval_weights(z), eval_weights(z))
    np.testing.assert_array_equal(weights(POLY, z), eval_weights(z))  # no noise given: evaluation mode
    assert not np.allclose(train_weights(z, noise, tau)[2:], eval_weights(z)[2:], atol=1e-3)
    s = 1 / (1 + np.exp(-np.asarray(z[2])))
    np.testing.assert_allclose(eval_weights(z)[2], s / s.sum(-1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(temperature(POLY, jnp.asarray([0.0, 1.0])), [POLY.tau_start, POLY.tau_end], rtol=1e-6)


def _source(inventories, zs, doc_rows):
    return PolySource(POLY, inventories, zs, doc_rows)


def test_source_merges_topk_document_adapters(inventory):
    other = jax.tree.map(lambda x: x * -0.5 + 0.01, inventory)
    z0 = jax.random.normal(jax.random.key(5), (3, 2, POLY.n_skills))
    z1 = jax.random.normal(jax.random.key(6), (2, 2, POLY.n_skills))
    doc_rows = {"a": (0, 0), "b": (1, 1), "c": (0, 2), "d": (1, 0), "e": (0, 1)}
    src = _source([inventory, other], [z0, z1], doc_rows)
    ids_qk = [["b", "a", "c"], ["e", "e", "d"]]
    merged = src.adapters(ids_qk)
    for q, ids in enumerate(ids_qk):
        for t in POLY.targets:  # Σ over the top-k documents of scale · A_d B_d, each from its own inventory
            want = 0
            for d in ids:
                i, r = doc_rows[d]
                inv = [inventory, other][i]
                m = jax.tree.map(lambda x: x[0], mix(inv, eval_weights([z0, z1][i][r : r + 1])))
                want = want + POLY.scale * np.einsum("lir,lro->lio", m[t]["a"], m[t]["b"])
            got = np.einsum("lir,lro->lio", merged[t][0][q], merged[t][1][q])
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    mean = PolySource(dataclasses.replace(POLY, merge="mean"), [inventory, other], [z0, z1], doc_rows).adapters(ids_qk)
    for t in POLY.targets:  # merge = "mean": the same documents' delta divided by k
        got = np.einsum("qlir,qlro->qlio", *mean[t])
        np.testing.assert_allclose(got, np.einsum("qlir,qlro->qlio", *merged[t]) / 3, rtol=1e-5, atol=1e-7)
    bank = src.document_bank(["c", "d"])
    again = merge_topk(bank, jnp.asarray([[1, 0]]), POLY.scale)
    direct = src.adapters([["d", "c"]])
    for t in POLY.targets:
        np.testing.assert_array_equal(again[t][0], direct[t][0])
    with pytest.raises(ValueError, match="'zz'"):
        src.adapters([["a", "zz"]])
    storage = src.storage()
    assert storage["row_bytes"] == 2 * POLY.n_skills * 4 and storage["n_docs"] == 5
    assert storage["shared_bytes"] == 2 * 4 * sum(x.size for x in jax.tree.leaves(inventory))
    # uniform routing ignores the rows: a document adds nothing, the inventories are the same
    uniform = PolySource(dataclasses.replace(POLY, routing="uniform"), [inventory, other], [z0, z1], doc_rows)
    assert uniform.storage() == {**storage, "row_bytes": 0}


def test_cross_fit_halves_are_disjoint_and_cover():
    class D:
        def __init__(self, i):
            self.id = i

    docs = [D(f"doc-{c}") for c in "qwertyu"]
    a, b = cross_fit_halves(docs)
    assert {d.id for d in a} | {d.id for d in b} == {d.id for d in docs}
    assert not {d.id for d in a} & {d.id for d in b} and abs(len(a) - len(b)) <= 1


@pytest.mark.parametrize("field, value, expected", [
    ("n_skills", 0, "integer >= 1"), ("rank", 1.5, "integer >= 1"), ("tau_end", 0.0, "> 0"),
    ("routing", "softmax", "one of"), ("targets", ("gate", "mlp"), "projections"), ("per_layer", "yes", "true or"),
    ("weight_decay", -1.0, ">= 0"), ("batch_docs", True, "integer"), ("merge", "max", "one of"),
])
def test_config_errors_name_the_field(field, value, expected):
    with pytest.raises(ValueError, match=rf"\[poly\] {field} must be .*{expected}"):
        PolyConfig(**{field: value})


def test_run_config_poly_section(tmp_path):
    from jprag.pipeline import RunConfig

    path = tmp_path / "run.toml"
    path.write_text('methods = ["poly-prag", "poly-z-prag"]\n[poly]\nn_skills = 8\nrank = 2\ntargets = ["up", "down"]\n'
                    'per_layer = false\n')
    cfg = RunConfig.from_file(path)
    assert cfg.poly == PolyConfig(n_skills=8, rank=2, targets=("up", "down"), per_layer=False)
    assert cfg.poly.routing_layers(30) == 1 and cfg.poly.scale == 16.0
    path.write_text("[poly]\nn_skill = 8\n")
    with pytest.raises(ValueError, match="n_skill"):
        RunConfig.from_file(path)


def test_results_table_storage_columns():
    from jprag.eval.methods import BankSource
    from jprag.lora.adapters import LoraConfig, init_bank
    from jprag.pipeline import results_table, source_storage

    lora = LoraConfig(rank=2)
    prag = source_storage(BankSource(init_bank(CFG, lora, jax.random.key(0), 3), {"a": 0, "b": 1, "c": 2}, lora))
    assert prag == {"row_bytes": lora.num_params(CFG) * 4, "shared_bytes": 0, "n_docs": 3}
    score = {"em": 0.0, "f1": 0.0, "has_answer": 0.0, "n": 1, "by_type": {}, "seconds": 1.0}
    table = results_table({"methods": {"vanilla": score, "prag": {**score, "storage": prag},
                                       "poly-prag": {**score, "storage": {"row_bytes": 2048, "shared_bytes": 2**21,
                                                                          "n_docs": 3}}}})
    lines = table.splitlines()
    assert lines[0].endswith("KiB/doc | shared MiB |") and lines[2].endswith("- | - |")
    assert lines[3].endswith(f"{prag['row_bytes'] / 1024:.1f} | 0.0 |") and lines[4].endswith("2.0 | 2.0 |")
