"""DyPRAG's parameter translator: shapes, the stacked/vmapped MLPs against a plain loop, the loss
terms against direct computations, gradient flow, overfitting a handful of (document, adapter)
pairs, determinism and top-k combination. Tiny random llama, synthetic embeddings and adapters."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jprag.lora import LoraConfig, applied, init_bank
from jprag.model.config import ModelConfig
from jprag.model.transformer import forward, init_params, lm_head, positions_from_mask
from jprag.train.stacked import chunked_lm_loss
from jprag.translator.config import TranslatorConfig
from jprag.translator.hypernet import TranslatorSpec, combine_topk, fit_stats, layer_features
from jprag.translator.hypernet import init_translator as init_translator_eager
from jprag.translator.hypernet import translate as translate_eager
from jprag.translator.objective import chunked_lm_kl, delta_sq_error, translator_loss
from jprag.translator.objective import mse_term as mse_term_eager
from jprag.translator.pipeline import TranslatedSource, cross_fit_folds, translate_embeddings
from jprag.translator.train import make_translator_step, optimizer

CFG = ModelConfig(family="llama", vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  d_ff=96)
LORA = LoraConfig(rank=2, alpha=32, targets=("gate", "up", "down", "q"))  # three projection shapes
E, N, S = 16, 4, 32
# compiled once per shape: op-by-op dispatch of these costs seconds per call
translate = jax.jit(translate_eager, static_argnums=0)
mse_term = jax.jit(mse_term_eager, static_argnums=0)
init_translator = jax.jit(init_translator_eager, static_argnums=(0, 3))
_init_bank = jax.jit(init_bank, static_argnums=(0, 1, 3))


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def spec():
    return TranslatorSpec.create(CFG, LORA, E, hidden=8)


def dense(a, b):
    """ΔW = a @ b (tests only), in numpy."""
    return np.einsum("...ir,...ro->...io", np.asarray(a, np.float64), np.asarray(b, np.float64))


def random_teacher(n, key=1):
    """Trained-looking adapters of n ≤ 8 documents: PEFT-initialised A, random non-zero B."""
    if key not in _TEACHERS:
        bank = jax.tree.map(np.asarray, _init_bank(CFG, LORA, jax.random.key(key), 8))
        rng = np.random.RandomState(100 + key)
        for t in sorted(bank):
            bank[t]["b"] = (0.02 * rng.randn(*bank[t]["b"].shape)).astype(np.float32)
        _TEACHERS[key] = bank
    return jax.tree.map(lambda x: x[:n], _TEACHERS[key])


_TEACHERS: dict = {}


def batch_of(n, emb, teacher, seed=0):
    rng = np.random.RandomState(seed)
    lengths = rng.randint(S // 2, S + 1, n)
    attn = (np.arange(S)[None] < lengths[:, None]).astype(np.int32)
    loss = attn.copy()
    loss[:, 0] = 0
    return {"tokens": rng.randint(0, CFG.vocab_size, (n, S)).astype(np.int32), "attn_mask": attn,
            "loss_mask": loss, "active": np.ones(n, np.float32), "emb": emb, "teacher": teacher}


def test_spec_groups_targets_by_projection_shape(spec):
    assert spec.groups == ((("down",), 96, 64), (("gate", "up"), 64, 96), (("q",), 64, 64))
    assert spec.targets == tuple(sorted(LORA.targets))
    assert TranslatorSpec.from_json(spec.to_json()) == spec
    assert spec.shapes()["gate+up"]["a2"] == (2, CFG.n_layers, 8, 64 * 2)


def test_translate_shapes_and_matches_a_plain_loop(spec):
    emb = np.random.RandomState(0).randn(N, E).astype(np.float32) * 3 + 1
    tr = init_translator(spec, jax.random.key(0), fit_stats(emb, random_teacher(3)), out_init_std=0.1)
    bank = jax.tree.map(np.asarray, translate(spec, tr, jnp.asarray(emb)))
    shapes = LORA.shapes(CFG)
    assert sorted(bank) == sorted(LORA.targets)
    for t in LORA.targets:
        assert bank[t]["a"].shape == (N, *shapes[t]["a"]) and bank[t]["b"].shape == (N, *shapes[t]["b"])
    assert jax.tree.structure(tr) == jax.tree.structure(spec.template())
    assert all(np.shape(x) == np.shape(y) for x, y in zip(jax.tree.leaves(tr), jax.tree.leaves(spec.template())))
    # reference: one small MLP per (target, layer), applied document by document
    st = jax.tree.map(np.asarray, tr["stats"])
    x = (emb - st["emb"]["mean"]) / st["emb"]["scale"]
    lam = np.asarray(layer_features(CFG.n_layers))
    assert np.allclose(lam, [0.5, 1.0])
    for ts, i, o in spec.groups:
        w = jax.tree.map(np.asarray, tr["mlp"][spec.group_name(ts)])
        for m, t in enumerate(ts):
            o_st = st["out"][t]
            for layer in range(CFG.n_layers):
                for n in range(N):
                    feat = np.concatenate([x[n], [lam[layer]]])
                    a = np.maximum(feat @ w["a1"][m, layer], 0) @ w["a2"][m, layer]
                    b = np.maximum(feat @ w["b1"][m, layer], 0) @ w["b2"][m, layer]
                    a = o_st["a_mean"][layer] + o_st["a_std"][layer] * a.reshape(i, 2)
                    b = o_st["b_mean"][layer] + o_st["b_std"][layer] * b.reshape(2, o)
                    np.testing.assert_allclose(bank[t]["a"][n, layer], a, rtol=1e-4, atol=1e-6)
                    np.testing.assert_allclose(bank[t]["b"][n, layer], b, rtol=1e-4, atol=1e-6)


def test_fresh_translator_emits_the_mean_training_adapter(spec):
    emb = np.random.RandomState(1).randn(8, E).astype(np.float32)
    teacher = jax.tree.map(np.asarray, random_teacher(8))
    tr = init_translator(spec, jax.random.key(0), fit_stats(emb, teacher))  # tiny output layers
    bank = translate(spec, tr, jnp.asarray(emb))
    for t in LORA.targets:
        for k in ("a", "b"):
            mean = teacher[t][k].mean(0)
            np.testing.assert_allclose(bank[t][k], np.broadcast_to(mean, bank[t][k].shape), atol=1e-6)
    st = tr["stats"]["out"]["up"]  # deviations in units of the training adapters' spread
    dev = (teacher["up"]["b"] - teacher["up"]["b"].mean(0)) / np.asarray(st["b_std"])[None, :, None, None]
    np.testing.assert_allclose(np.sqrt(np.mean(dev ** 2, axis=(0, 2, 3))), 1.0, rtol=1e-5)


def test_fit_stats():
    emb = np.random.RandomState(0).randn(10, E) * 5 + 7
    st = fit_stats(emb, {})
    x = (emb - st["emb"]["mean"]) / st["emb"]["scale"]
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(np.sqrt(np.mean(x ** 2)), 1.0, rtol=1e-5)
    one = fit_stats(emb[:1], jax.tree.map(lambda v: np.asarray(v)[:1], random_teacher(2)))
    assert one["emb"]["scale"] == 1.0 and (one["out"]["up"]["b_std"] == 1.0).all()  # nothing to scale by


def test_chunked_lm_kl_matches_direct_computation(params):
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(0, 128, (3, 37)))
    mask = jnp.asarray((rng.rand(3, 37) > 0.3).astype(np.int32))
    hs = jax.random.normal(jax.random.key(1), (3, 37, CFG.d_model))
    ht = jax.random.normal(jax.random.key(2), (3, 37, CFG.d_model))
    lm, kl = chunked_lm_kl(CFG, params, hs, ht, tokens, mask, chunk=16)  # 108 targets: ragged last chunk
    lm_loss = jax.jit(chunked_lm_loss, static_argnums=0)
    for r in range(3):
        np.testing.assert_allclose(lm[r], lm_loss(CFG, params, hs[r:r + 1], tokens[r:r + 1], mask[r:r + 1]), rtol=1e-5)
    ls = jax.nn.log_softmax(lm_head(CFG, params, hs), -1)[:, :-1]
    lt = jax.nn.log_softmax(lm_head(CFG, params, ht), -1)[:, :-1]
    per_tok = np.sum(np.exp(lt) * (lt - ls), -1)
    w = np.asarray(mask)[:, 1:]
    np.testing.assert_allclose(kl, (per_tok * w).sum(-1) / w.sum(-1), rtol=1e-4)
    _, kl_same = chunked_lm_kl(CFG, params, hs, hs, tokens, mask)
    np.testing.assert_allclose(kl_same, 0.0, atol=1e-5)
    _, kl_none = chunked_lm_kl(CFG, params, hs, None, tokens, mask)
    assert not np.asarray(kl_none).any()


def test_delta_error_equals_dense_computation():
    s, t = random_teacher(3, key=1), random_teacher(3, key=2)
    mse = mse_term
    err, ref = jax.jit(delta_sq_error)(s["up"]["a"], s["up"]["b"], t["up"]["a"], t["up"]["b"])
    ds, dt = (dense(x["up"]["a"], x["up"]["b"]) for x in (s, t))
    np.testing.assert_allclose(err, np.sum((ds - dt) ** 2, axis=(1, 2, 3)), rtol=1e-4)
    np.testing.assert_allclose(ref, np.sum(dt ** 2, axis=(1, 2, 3)), rtol=1e-4)
    # relative, pooled over targets and layers; zero iff the deltas agree, whatever the factors
    total = sum(np.sum((dense(s[k]["a"], s[k]["b"]) - dense(t[k]["a"], t[k]["b"])) ** 2, axis=(1, 2, 3)) for k in t)
    norm = sum(np.sum(dense(t[k]["a"], t[k]["b"]) ** 2, axis=(1, 2, 3)) for k in t)
    np.testing.assert_allclose(mse("delta", s, t), total / norm, rtol=1e-4)
    regauged = {k: {"a": t[k]["a"] * 2.0, "b": t[k]["b"] / 2.0} for k in t}  # same ΔW, other factors
    np.testing.assert_allclose(mse("delta", regauged, t), 0.0, atol=1e-5)
    assert float(mse("factors", regauged, t).min()) > 1e-3
    factors = sum(np.mean((s[k][x] - t[k][x]) ** 2, axis=(-2, -1)).sum(-1) for k in t for x in ("a", "b"))
    np.testing.assert_allclose(mse("factors", s, t), factors, rtol=1e-5)


def test_objective_terms_and_every_parameter_gets_gradient(params, spec):
    emb = np.random.RandomState(0).randn(N, E).astype(np.float32)
    teacher = random_teacher(N)
    tr = init_translator(spec, jax.random.key(0), fit_stats(emb, teacher), out_init_std=0.1)
    batch = batch_of(N, emb, teacher)
    tcfg = TranslatorConfig(mse="delta")

    @jax.jit
    def loss_and_grads(mlp, batch):
        def fn(m):
            return translator_loss(CFG, LORA, tcfg, spec, params, {"stats": tr["stats"], "mlp": m}, batch)

        return jax.value_and_grad(fn, has_aux=True)(mlp)

    @jax.jit
    def direct(batch):  # the LM and KL terms, spelled out with the full logits
        pos = positions_from_mask(batch["attn_mask"])
        student = translate_eager(spec, tr, batch["emb"])
        ls = jax.nn.log_softmax(forward(CFG, params, batch["tokens"], pos, adapters=applied(student, LORA.scale))[0])
        lt = jax.nn.log_softmax(forward(CFG, params, batch["tokens"], pos, adapters=applied(teacher, LORA.scale))[0])
        w = (batch["loss_mask"] * batch["attn_mask"])[:, 1:]
        nll = -jnp.take_along_axis(ls[:, :-1], batch["tokens"][:, 1:, None], -1)[..., 0]
        kl = jnp.sum(jnp.exp(lt) * (lt - ls), -1)[:, :-1]
        return jnp.mean(jnp.sum(nll * w, 1) / w.sum(1)), jnp.mean(jnp.sum(kl * w, 1) / w.sum(1))

    (loss, metrics), grads = loss_and_grads(tr["mlp"], batch)
    lm, kl = direct(batch)
    np.testing.assert_allclose(metrics["lm"], lm, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-4)
    assert float(kl) > 1e-4 and 0 < float(metrics["mse"])
    np.testing.assert_allclose(metrics["mse"], np.mean(mse_term("delta", translate(spec, tr, batch["emb"]), teacher)),
                               rtol=1e-5)
    np.testing.assert_allclose(loss, metrics["lm"] + 0.01 * metrics["kl"] + 100 * metrics["mse"], rtol=1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        assert np.isfinite(g).all() and np.abs(g).max() > 0, jax.tree_util.keystr(path)

    # inactive rows contribute nothing
    masked = dict(batch, active=np.array([1, 1, 0, 0], np.float32))
    swapped = jax.tree.map(lambda x: np.asarray(x)[[0, 1, 1, 0]], batch)  # same shapes: rows 2, 3 now duplicates
    swapped["active"] = np.array([1, 1, 0, 0], np.float32)
    np.testing.assert_allclose(loss_and_grads(tr["mlp"], masked)[0][0], loss_and_grads(tr["mlp"], swapped)[0][0],
                               rtol=1e-5)


@pytest.mark.parametrize("kind", ["delta", "factors"])
def test_overfits_a_handful_of_pairs(params, kind):
    """Four (document, adapter) pairs: the translator (p = 32, the default) learns to reproduce
    their adapters, judged by the delta error whichever MSE it was trained on. (Every loss term's
    gradient is checked in `test_objective_terms_and_every_parameter_gets_gradient`.)"""
    spec = TranslatorSpec.create(CFG, LORA, E, hidden=32)
    emb = np.random.RandomState(3).randn(N, E).astype(np.float32)
    teacher = random_teacher(N)
    # the MSE alone: no forward pass of the model, so 200 steps take a second
    tcfg = TranslatorConfig(lambda_lm=0.0, lambda_kl=0.0, lambda_mse=100.0, mse=kind, learning_rate=1e-2,
                            weight_decay=0.0)
    tr = init_translator(spec, jax.random.key(0), fit_stats(emb, teacher))
    opt = optimizer(tcfg)
    step = jax.jit(make_translator_step(CFG, LORA, tcfg, spec, opt))
    opt_state = opt.init(tr["mlp"])
    batch = jax.tree.map(jnp.asarray, batch_of(N, emb, teacher))
    first = None
    for _ in range(200):
        tr, opt_state, metrics = step(params, tr, opt_state, batch)
        first = first if first is not None else {k: float(v) for k, v in metrics.items()}
    final = {k: float(v) for k, v in metrics.items()}
    rel = np.asarray(mse_term("delta", translate(spec, tr, batch["emb"]), teacher))
    assert first["mse"] > 0.01 and rel.max() < 1e-3, (first, final, rel)  # each document's ΔW ≈ its trained ΔW
    assert final["mse"] < 1e-3 * first["mse"], (first, final)


def test_translation_is_deterministic_and_independent_of_the_batch(spec):
    emb = np.random.RandomState(0).randn(5, E).astype(np.float32)
    tr = init_translator(spec, jax.random.key(0), fit_stats(emb, random_teacher(2)), out_init_std=0.1)
    once = translate_embeddings(spec, tr, emb, batch=4)  # 5 documents: two calls, the last padded
    twice = translate_embeddings(spec, tr, emb, batch=4)
    alone = translate_embeddings(spec, tr, emb[3:4], batch=4)
    for t in LORA.targets:
        for k in ("a", "b"):
            assert np.array_equal(once[t][k], twice[t][k])
            np.testing.assert_allclose(alone[t][k][0], once[t][k][3], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(once[t][k], translate(spec, tr, jnp.asarray(emb))[t][k], rtol=1e-6, atol=1e-7)


def test_combine_mean_and_sum():
    bank = random_teacher(5)
    rows = jnp.array([[0, 1, 2], [4, 4, 3]])
    scale = LORA.scale
    combine = jax.jit(combine_topk, static_argnums=(2, 3))
    mean, summed = combine(bank, rows, scale, "mean"), combine(bank, rows, scale, "sum")
    for t in LORA.targets:
        A, B = np.asarray(bank[t]["a"])[np.asarray(rows)], np.asarray(bank[t]["b"])[np.asarray(rows)]
        assert mean[t][0].shape[-1] == 2 and summed[t][0].shape[-1] == 6
        want_mean = scale * np.einsum("qlir,qlro->qlio", A.mean(1), B.mean(1))
        want_sum = scale * np.einsum("qklir,qklro->qlio", A, B)
        np.testing.assert_allclose(dense(*mean[t]), want_mean, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(dense(*summed[t]), want_sum, rtol=1e-4, atol=1e-7)
    src = TranslatedSource(bank, {f"d{i}": i for i in range(5)}, LORA, "mean", translator_bytes=123)
    assert src.storage() == {"row_bytes": 0, "shared_bytes": 123, "n_docs": 5}
    got = src.adapters([["d0", "d1", "d2"], ["d4", "d4", "d3"]])
    np.testing.assert_allclose(got["up"][1], mean["up"][1])
    with pytest.raises(ValueError, match="not translated"):
        src.adapters([["d0", "nope"]])


def test_cross_fit_folds_are_a_partition():
    ids = [f"doc{i}" for i in range(7)]
    folds = cross_fit_folds(ids[::-1], 2, seed=0)
    assert sorted(d for f in folds for d in f) == ids and sorted(len(f) for f in folds) == [3, 4]
    assert folds == cross_fit_folds(ids, 2, seed=0)  # a function of the id set, not its order
    with pytest.raises(ValueError, match="at least 3 documents"):
        cross_fit_folds(ids[:2], 3, seed=0)


@pytest.mark.parametrize("field, value, match", [
    ("hidden", 0, "hidden must be a positive integer"),
    ("mse", "l2", "mse must be one of"),
    ("combine", "max", "combine must be one of"),
    ("lambda_kl", -1.0, "lambda_kl must be a number >= 0"),
    ("learning_rate", 0.0, "learning_rate must be a number > 0"),
    ("folds", 1, "folds must be an integer >= 2"),
    ("samples_per_doc", -1, "samples_per_doc"),
])
def test_config_errors_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=r"\[translator\] " + match):
        TranslatorConfig(**{field: value})
    assert dataclasses.replace(TranslatorConfig(), hidden=4).hidden == 4


def test_run_config_reads_the_translator_section(tmp_path):
    from jprag.pipeline import RunConfig

    path = tmp_path / "run.toml"
    path.write_text('methods = ["dyprag"]\n[translator]\nhidden = 16\ncombine = "sum"\n')
    cfg = RunConfig.from_file(path)
    assert cfg.translator.hidden == 16 and cfg.translator.combine == "sum"
    path.write_text('[translator]\nhiden = 16\n')
    with pytest.raises(ValueError, match="hiden"):
        RunConfig.from_file(path)
