"""Stacked training of D documents ≡ D independent single-document runs, on any mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jprag.lora import LoraConfig, init_bank, merge_topk
from jprag.mesh import make_mesh
from jprag.model.config import ModelConfig
from jprag.model.transformer import forward, init_params
from jprag.train.stacked import TrainConfig, init_opt_state, jit_train_step, make_train_step

CFG = ModelConfig(family="llama", vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96)
LORA = LoraConfig(rank=2, alpha=32, targets=("gate", "up", "down", "q"))
D, T = 8, 3
# A larger learning rate than PRAG's 3e-4 so that T steps clearly move the adapters.
OPT = TrainConfig(learning_rate=1e-3).optimizer()


@pytest.fixture(scope="module")
def setup():
    params = init_params(CFG, jax.random.key(0))
    rng = np.random.RandomState(0)
    batches = []
    for t in range(T):
        S = 32
        lengths = rng.randint(S // 2, S + 1, size=D)
        attn = (np.arange(S)[None, None, :] < lengths[:, None, None]).astype(np.int32)  # [D, 1, S]
        active = np.ones(D, np.float32)
        if t == 1:
            active[[3, 6]] = 0  # these documents have no sample at step 1
        batches.append(dict(tokens=rng.randint(0, 128, (D, 1, S)).astype(np.int32), attn_mask=attn,
                            loss_mask=attn.copy(), active=active))
    return params, batches


STEP = make_train_step(CFG, LORA, OPT)
_JITTED = {}  # one jitted step per mesh: recompiles only for new shapes


def train(params, bank, batches, mesh):
    opt_state = init_opt_state(OPT, bank)
    key = (mesh.devices.shape, tuple(d.id for d in mesh.devices.flat))
    if key not in _JITTED:
        _JITTED[key] = jit_train_step(STEP, mesh, params, bank, opt_state, batches[0])
    losses = []
    for b in batches:
        bank, opt_state, loss = _JITTED[key](params, bank, opt_state, b)
        losses.append(np.asarray(loss))
    return jax.tree.map(np.asarray, bank), jax.tree.map(np.asarray, opt_state), np.stack(losses)


def rows(batches, d):
    return [{k: v[d : d + 1] for k, v in b.items()} for b in batches]


@pytest.mark.parametrize("mesh_shape", [(1, 1), (8, 1), (2, 4)])
def test_stacked_equals_independent(setup, mesh_shape):
    params, batches = setup
    devices = jax.devices()[: mesh_shape[0] * mesh_shape[1]]
    bank0 = jax.tree.map(np.asarray, init_bank(CFG, LORA, jax.random.key(1), D))  # host copy: steps donate
    stacked, _, losses = train(params, bank0, batches, make_mesh(*mesh_shape, devices=devices))
    moved = max(np.abs(stacked[t]["b"]).max() for t in LORA.targets)
    assert moved > 1e-3, "training did not move the adapters: the test would be vacuous"
    one_device = make_mesh(1, 1, devices=jax.devices()[:1])
    for d in range(D):
        single, _, single_losses = train(params, jax.tree.map(lambda x: x[d : d + 1], bank0), rows(batches, d), one_device)
        for t in LORA.targets:
            for k in ("a", "b"):
                np.testing.assert_allclose(stacked[t][k][d], single[t][k][0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(losses[:, d], single_losses[:, 0], atol=1e-5)


def test_inactive_rows_bit_identical(setup):
    params, batches = setup
    only_step1 = [batches[1]]  # rows 3 and 6 are inactive in this batch
    bank0 = jax.tree.map(np.asarray, init_bank(CFG, LORA, jax.random.key(1), D))
    bank0 = jax.tree.map(lambda x: x + np.float32(0.01), bank0)  # non-trivial values everywhere
    bank1, opt1, _ = train(params, bank0, only_step1, make_mesh(8, 1))
    opt0 = jax.tree.map(np.asarray, init_opt_state(OPT, bank0))
    for t in LORA.targets:
        for k in ("a", "b"):
            for d in (3, 6):
                assert np.array_equal(bank1[t][k][d], bank0[t][k][d])
            assert not np.array_equal(bank1[t][k][0], bank0[t][k][0])
    for new, old in zip(jax.tree.leaves(opt1), jax.tree.leaves(opt0)):
        for d in (3, 6):
            assert np.array_equal(new[d], old[d])


def test_zero_b_is_base_model_and_merge_is_sum_of_deltas():
    params = init_params(CFG, jax.random.key(0))
    fwd = jax.jit(forward, static_argnums=0)
    tokens = jax.random.randint(jax.random.key(2), (3, 16), 0, 128)
    pos = jnp.broadcast_to(jnp.arange(16), (3, 16))
    bank = init_bank(CFG, LORA, jax.random.key(1), 5)  # B = 0 at init
    base, _ = fwd(CFG, params, tokens, pos)
    rows_qk = jnp.array([[0, 1, 2], [3, 4, 0], [2, 2, 1]])
    with_zero, _ = fwd(CFG, params, tokens, pos, adapters=merge_topk(bank, rows_qk, LORA.scale))
    assert np.array_equal(np.asarray(base), np.asarray(with_zero))

    bank = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape) * 0.05, bank)
    merged = merge_topk(bank, rows_qk, LORA.scale)
    for t in LORA.targets:  # rank concatenation == Σ_i scale · A_i B_i
        a, b = merged[t]
        dense = np.einsum("qlir,qlro->qlio", a, b)
        expect = LORA.scale * np.einsum("qklir,qklro->qlio", bank[t]["a"][rows_qk], bank[t]["b"][rows_qk])
        np.testing.assert_allclose(dense, expect, atol=1e-5)
    mean = merge_topk(bank, rows_qk, LORA.scale, mode="mean")
    np.testing.assert_allclose(np.asarray(mean["up"][1]) * 3, np.asarray(merged["up"][1]), rtol=1e-6)
    out, _ = fwd(CFG, params, tokens, pos, adapters=merged)
    assert not np.allclose(np.asarray(out), np.asarray(base), atol=1e-3)


@pytest.mark.parametrize("head", ["tied", "untied_softcap", "tied_bf16_weights"])
def test_chunked_loss_equals_full_loss_and_gradient(head):
    """The custom-VJP loss head (saved softmax, no recompute) against autodiff of the plain
    loss, for a tied head, for an untied head with a final-logit softcap (Gemma), and with
    bf16 weights (`weight_dtype`: both directions multiply in bf16, accumulate in float32)."""
    from jprag.model.params import cast_weights
    from jprag.model.transformer import lm_head
    from jprag.train.stacked import chunked_lm_loss, lm_loss

    cfg = CFG.replace(tie_embeddings=True) if head.startswith("tied") else CFG.replace(tie_embeddings=False, final_logit_softcap=3.0)
    if head == "tied_bf16_weights":
        cfg = cfg.replace(weight_dtype="bfloat16")
    params = cast_weights(cfg, init_params(cfg, jax.random.key(0)))
    assert ("lm_head" in params) == (not cfg.tie_embeddings)
    tokens = jax.random.randint(jax.random.key(1), (3, 37), 0, 128)
    mask = (jax.random.uniform(jax.random.key(2), (3, 37)) > 0.3).astype(jnp.int32)
    hidden = jax.random.normal(jax.random.key(3), (3, 37, CFG.d_model))
    full = lambda h: lm_loss(lm_head(cfg, params, h), tokens, mask)  # noqa: E731
    chunked = lambda h: chunked_lm_loss(cfg, params, h, tokens, mask, chunk=16)  # 108 targets: ragged last chunk  # noqa: E731
    np.testing.assert_allclose(chunked(hidden), full(hidden), rtol=1e-6)
    g_chunked, g_full = jax.grad(chunked)(hidden), jax.grad(full)(hidden)
    if cfg.matmul_dtype is None:
        np.testing.assert_allclose(g_chunked, g_full, atol=1e-8)
    else:  # autodiff rounds its dh to bf16 (the cast operand's dtype); the custom VJP keeps float32
        scale = float(jnp.abs(g_full).max())
        np.testing.assert_allclose(g_chunked, g_full, atol=2 ** -7 * scale)
        assert float(jnp.abs(g_chunked - g_full).max()) > 0  # the bf16 path was taken


def test_doc_losses_equal_per_document_loss():
    """`doc_losses` (one loss head over all documents' positions) equals `doc_loss` per row,
    values and gradients w.r.t. the bank."""
    from jprag.train.stacked import doc_loss, doc_losses

    params = init_params(CFG, jax.random.key(0))
    bank = init_bank(CFG, LORA, jax.random.key(1), 3)
    bank = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), bank)
    tokens = jax.random.randint(jax.random.key(3), (3, 2, 19), 0, 128)
    attn = (jnp.arange(19)[None, None] < jnp.asarray([[19, 12], [7, 19], [19, 3]])[..., None]).astype(jnp.int32)
    loss_mask = (jax.random.uniform(jax.random.key(4), (3, 2, 19)) > 0.2).astype(jnp.int32)
    batch = {"tokens": tokens, "attn_mask": attn, "loss_mask": loss_mask}
    one = lambda b, r: doc_loss(CFG, LORA.scale, params, jax.tree.map(lambda x: x[r], b),  # noqa: E731
                                jax.tree.map(lambda x: x[r], batch))
    ref = jnp.stack([one(bank, r) for r in range(3)])
    got = doc_losses(CFG, LORA.scale, params, bank, batch, rows_per_chunk=8)  # ragged chunks across rows
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    g_ref = jax.grad(lambda b: sum(one(b, r) for r in range(3)))(bank)
    g_got = jax.grad(lambda b: jnp.sum(doc_losses(CFG, LORA.scale, params, b, batch, rows_per_chunk=8)))(bank)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), g_got, g_ref)


@pytest.mark.parametrize("shared", [True, False])
def test_lora_delta_custom_gradient_matches_autodiff(shared):
    from jprag.model.transformer import _lora_h, _lora_out, lora_delta

    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (3, 7, 5))
    a = jax.random.normal(k[1], (5, 2) if shared else (3, 5, 2))
    b = jax.random.normal(k[2], (2, 4) if shared else (3, 2, 4))
    dy = jax.random.normal(k[3], (3, 7, 4))
    plain = lambda x, a, b: _lora_out(_lora_h(x, a), b)  # noqa: E731
    np.testing.assert_allclose(lora_delta(x, a, b), plain(x, a, b), rtol=1e-6)
    for got, want in zip(jax.vjp(lora_delta, x, a, b)[1](dy), jax.vjp(plain, x, a, b)[1](dy)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
