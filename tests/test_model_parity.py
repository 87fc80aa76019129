"""Numerical parity of the JAX decoder with the Hugging Face torch implementation.

Every family in `TINY_FAMILIES` is saved as a tiny random HF checkpoint, loaded with
`load_hf_dir`, and compared with the torch model built from the same files (float32, eval
mode, eager attention): full-sequence logits with left and right padding, KV-cache decode,
greedy generation, the bfloat16 compute path and the LoRA `adapters` argument.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_fixtures import TINY_FAMILIES, save_tiny_hf
from jprag.model.config import ModelConfig
from jprag.model.generate import generate
from jprag.model.params import cast_weights, weight_matrix_names
from jprag.model.transformer import KVCache, forward, positions_from_mask, weight_matmul
from jprag.model.weights import load_hf_dir

# One jitted forward for the whole module: identical (cfg, shapes) reuse one compilation.
_forward = jax.jit(forward, static_argnums=(0,), static_argnames=("output",))

BATCH_LEN = 144  # >= 128 positions, and far beyond gemma3's sliding window of 8
LEFT_PAD, RIGHT_PAD = 29, 23


@dataclasses.dataclass
class Pair:
    family: str
    cfg: ModelConfig
    params: dict
    hf: transformers.PreTrainedModel


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def pair(request, tmp_path_factory) -> Pair:
    family = request.param
    path = save_tiny_hf(family, tmp_path_factory.mktemp(f"tiny_{family}"))
    cfg, params = load_hf_dir(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return Pair(family, cfg, jax.device_put(params), hf)


@pytest.fixture(scope="module")
def batch():
    """3 rows x BATCH_LEN: row 0 left-padded, row 1 right-padded, row 2 unpadded.

    Returns (tokens [B, T] int32, mask [B, T] int32, positions [B, T] int32 with -1 on padding).
    """
    rng = np.random.default_rng(1234)
    tokens = rng.integers(3, 128, size=(3, BATCH_LEN)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[0, :LEFT_PAD] = 0
    mask[1, BATCH_LEN - RIGHT_PAD :] = 0
    tokens[mask == 0] = 0  # pad id
    positions = np.asarray(positions_from_mask(mask))
    return tokens, mask, positions


def hf_logits(hf, tokens, mask, positions) -> np.ndarray:
    """HF logits with an explicit attention_mask and position_ids (padding slots get id 0)."""
    with torch.no_grad():
        out = hf(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            position_ids=torch.from_numpy(np.maximum(positions, 0).astype(np.int64)),
        )
    return out.logits.float().numpy()


def jx_logits(cfg, params, tokens, positions, adapters=None) -> np.ndarray:
    logits, _ = _forward(cfg, params, jnp.asarray(tokens), jnp.asarray(positions), None, adapters)
    return np.asarray(logits)


# ------------------------------------------------------------------------------ logits


def test_logits_match_hf_with_padding(pair, batch):
    tokens, mask, positions = batch
    real = mask.astype(bool)
    ref = hf_logits(pair.hf, tokens, mask, positions)
    ours = jx_logits(pair.cfg, pair.params, tokens, positions)
    assert ours.shape == ref.shape == (3, BATCH_LEN, pair.cfg.vocab_size)
    assert np.isfinite(ours[real]).all()
    for row, what in enumerate(["left-padded", "right-padded", "unpadded"]):
        err = np.abs(ours[row][real[row]] - ref[row][real[row]]).max()
        assert err < 1e-4, f"{pair.family}: {what} row differs from HF by {err:.3g}"


@pytest.mark.parametrize("pair", ["gemma3"], indirect=True)
def test_gemma3_sliding_window_is_exercised(pair, batch):
    """The batch is longer than the window, so a (wrongly) global local layer changes logits."""
    tokens, mask, positions = batch
    assert pair.cfg.is_sliding.any() and not pair.cfg.is_sliding.all()
    assert BATCH_LEN - LEFT_PAD > 4 * pair.cfg.sliding_window
    real = mask.astype(bool)
    windowed = jx_logits(pair.cfg, pair.params, tokens, positions)
    wide = jx_logits(pair.cfg.replace(sliding_window=100_000), pair.params, tokens, positions)
    within = real & (positions < pair.cfg.sliding_window)  # the window has not started to slide yet
    beyond = real & (positions >= pair.cfg.sliding_window)
    np.testing.assert_allclose(wide[within], windowed[within], atol=1e-5, rtol=0)
    assert np.abs(wide[beyond] - windowed[beyond]).max(axis=-1).min() > 0, "some position ignores the window"
    assert np.abs(wide[beyond] - windowed[beyond]).max() > 1e-2


# ------------------------------------------------------------------------------ KV cache


def test_kv_cache_decode_equals_full_forward(pair, batch):
    tokens, mask, positions = batch
    real = mask.astype(bool)
    cfg, params = pair.cfg, pair.params
    full = jx_logits(cfg, params, tokens, positions)

    prefix = 112
    cache = KVCache.init(cfg, tokens.shape[0], BATCH_LEN + 8)  # spare slots stay empty (pos -1)
    logits, cache = _forward(cfg, params, jnp.asarray(tokens[:, :prefix]), jnp.asarray(positions[:, :prefix]), cache)
    logits = np.asarray(logits)
    sl = real[:, :prefix]
    err = np.abs(logits[sl] - full[:, :prefix][sl]).max()
    assert err < 1e-5, f"{pair.family}: prefill into the cache differs from the full forward by {err:.3g}"
    assert int(cache.index) == prefix

    for t in range(prefix, BATCH_LEN):
        step, cache = _forward(cfg, params, jnp.asarray(tokens[:, t : t + 1]), jnp.asarray(positions[:, t : t + 1]), cache)
        step = np.asarray(step)[:, 0]
        rows = real[:, t]
        err = np.abs(step[rows] - full[rows, t]).max()
        assert err < 1e-5, f"{pair.family}: decode step at index {t} differs from the full forward by {err:.3g}"
    assert int(cache.index) == BATCH_LEN
    np.testing.assert_array_equal(np.asarray(cache.pos)[:, BATCH_LEN:], -1)


# ------------------------------------------------------------------------------ generation


def test_greedy_generation_matches_hf(pair):
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 19, 12)]
    new = 24
    ours = generate(pair.cfg, pair.params, prompts, max_new_tokens=new, stop_ids=[])
    for prompt, got in zip(prompts, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = pair.hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        ref = ref[0, len(prompt) :].tolist()
        assert len(ref) == new, "HF stopped early: eos was not disabled"
        assert got == ref, f"{pair.family}: greedy tokens differ for a {len(prompt)}-token prompt"


# ------------------------------------------------------------------------------ bfloat16


def test_bfloat16_path(pair, batch):
    tokens, mask, positions = batch
    real = mask.astype(bool)
    ref = hf_logits(pair.hf, tokens, mask, positions)[real]
    cfg16 = pair.cfg.replace(dtype="bfloat16")
    logits, _ = _forward(cfg16, pair.params, jnp.asarray(tokens), jnp.asarray(positions))
    assert logits.dtype == jnp.float32  # logits are always returned in float32 ...
    f32 = jx_logits(pair.cfg, pair.params, tokens, positions)[real]
    ours = np.asarray(logits)[real]
    assert np.abs(ours - f32).max() > 1e-3  # ... but were computed in bfloat16
    assert np.isfinite(ours).all()
    agree = np.mean(ours.argmax(-1) == ref.argmax(-1))
    assert agree >= 0.9, f"{pair.family}: bfloat16 top-1 agrees with float32 HF on only {agree:.1%} of positions"
    assert np.abs(ours - ref).max() < 0.1 * np.abs(ref).max()


def test_bfloat16_weights_path(pair, batch):
    """`weight_dtype="bfloat16"`: bf16 weight storage and matmul operands, float32 accumulation
    and activations — between the float32 and the all-bfloat16 paths in accuracy."""
    tokens, mask, positions = batch
    real = mask.astype(bool)
    cfg = pair.cfg.replace(weight_dtype="bfloat16")
    params = cast_weights(cfg, pair.params)
    top, per_layer = weight_matrix_names(cfg)
    for name, x in [(k, params[k]) for k in params if k != "layers"] + list(params["layers"].items()):
        want = jnp.bfloat16 if name in top | per_layer else jnp.float32
        assert x.dtype == want, f"{name} is stored as {x.dtype}"
    ref = hf_logits(pair.hf, tokens, mask, positions)[real]
    f32 = jx_logits(pair.cfg, pair.params, tokens, positions)[real]
    ours = jx_logits(cfg, params, tokens, positions)[real]
    all16 = jx_logits(pair.cfg.replace(dtype="bfloat16"), pair.params, tokens, positions)[real]
    err, err16 = np.abs(ours - f32).max(), np.abs(all16 - f32).max()
    assert 1e-4 < err < err16, f"{pair.family}: bf16-weight error {err:.3g} vs all-bf16 {err16:.3g}"
    agree = np.mean(ours.argmax(-1) == ref.argmax(-1))
    assert agree >= 0.95, f"{pair.family}: bf16-weight top-1 agrees with float32 HF on only {agree:.1%}"


def test_bfloat16_weights_decode_and_generate(pair, batch):
    """With bf16 weights, cached decode still equals the full forward, and `generate` (its
    unrolled, fused layout) emits the full forward's greedy tokens."""
    tokens, mask, positions = batch
    real = mask.astype(bool)
    cfg = pair.cfg.replace(weight_dtype="bfloat16")
    params = cast_weights(cfg, pair.params)
    full = jx_logits(cfg, params, tokens, positions)
    precision_err = np.abs(full - jx_logits(pair.cfg, pair.params, tokens, positions))[real].max()
    prefix = 136
    cache = KVCache.init(cfg, tokens.shape[0], BATCH_LEN)
    _, cache = _forward(cfg, params, jnp.asarray(tokens[:, :prefix]), jnp.asarray(positions[:, :prefix]), cache)
    for t in range(prefix, BATCH_LEN):
        step, cache = _forward(cfg, params, jnp.asarray(tokens[:, t : t + 1]), jnp.asarray(positions[:, t : t + 1]), cache)
        rows = real[:, t]
        err = np.abs(np.asarray(step)[rows, 0] - full[rows, t]).max()
        # bf16 rounding of slightly different f32 activations may flip; bound it by half the
        # difference bf16 weights make at all (exactly 0 for every family but gemma3)
        assert err <= 0.5 * precision_err, f"{pair.family}: bf16-weight decode step {t} differs by {err:.3g}"

    prompt = np.random.default_rng(3).integers(3, 128, size=9).tolist()
    new = 16
    got = generate(cfg, params, [prompt], max_new_tokens=new, stop_ids=[])[0]
    seq = list(prompt)
    for _ in range(new):  # greedy by re-running the full forward on the growing sequence
        toks = np.asarray([seq], np.int32)
        seq.append(int(jx_logits(cfg, params, toks, np.arange(len(seq))[None])[0, -1].argmax()))
    assert got == seq[len(prompt):], f"{pair.family}: bf16-weight greedy tokens differ from the full forward"


def test_weight_matmul_accumulates_in_float32():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(64, 48)), jnp.float32)
    y = weight_matmul("bsi,io->bso", x, w, "bfloat16")
    assert y.dtype == jnp.float32
    r = lambda a: np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32), np.float64)  # noqa: E731
    np.testing.assert_allclose(np.asarray(y), np.einsum("bsi,io->bso", r(x), r(w)), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(y) - np.einsum("bsi,io->bso", np.asarray(x), np.asarray(w))).max() > 1e-3
    np.testing.assert_array_equal(weight_matmul("bsi,io->bso", x, w, None), jnp.einsum("bsi,io->bso", x, w))


def test_weight_dtype_is_validated(pair):
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        pair.cfg.replace(weight_dtype="int8")
    assert pair.cfg.replace(weight_dtype="float32").matmul_dtype is None  # same as dtype: plain path
    assert cast_weights(pair.cfg, pair.params)["embed"] is pair.params["embed"]  # None: nothing cast


# ------------------------------------------------------------------------------ adapters

ADAPTER_TARGETS = ("q", "v", "gate", "up", "down")
RANK = 4


def random_adapters(cfg: ModelConfig, batch: int | None, seed: int, zero_b: bool = False):
    """`{target: (a, b)}` with a [B, L, in, r], b [B, L, r, out] (no B axis when batch is None)."""
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    out = {}
    for name in ADAPTER_TARGETS:
        i, o = cfg.projection_shapes()[name]
        a = rng.normal(0, 0.3, size=lead + (cfg.n_layers, i, RANK)).astype(np.float32)
        b = np.zeros(lead + (cfg.n_layers, RANK, o), np.float32) if zero_b else rng.normal(
            0, 0.3, size=lead + (cfg.n_layers, RANK, o)
        ).astype(np.float32)
        out[name] = (jnp.asarray(a), jnp.asarray(b))
    return out


def test_adapters(pair, batch):
    tokens, mask, positions = batch
    real = mask.astype(bool)
    cfg, params = pair.cfg, pair.params
    B = tokens.shape[0]
    base = jx_logits(cfg, params, tokens, positions)

    # b = 0: the adapter path runs but contributes exactly nothing.
    zero = jx_logits(cfg, params, tokens, positions, random_adapters(cfg, B, seed=1, zero_b=True))
    np.testing.assert_array_equal(zero, base)

    # Random per-row adapters: each row as if run alone with its own adapter.
    per_row = random_adapters(cfg, B, seed=2)
    batched = jx_logits(cfg, params, tokens, positions, per_row)
    assert np.abs(batched[real] - base[real]).max() > 1e-2, "the adapter has no visible effect"
    for row in range(B):
        own = {k: (a[row : row + 1], b[row : row + 1]) for k, (a, b) in per_row.items()}
        alone = jx_logits(cfg, params, tokens[row : row + 1], positions[row : row + 1], own)
        np.testing.assert_allclose(alone[0][real[row]], batched[row][real[row]], atol=1e-5, rtol=0)

    # A shared adapter (no batch axis) equals the same adapter broadcast to every row.
    shared = random_adapters(cfg, None, seed=3)
    broadcast = {k: tuple(jnp.broadcast_to(t, (B,) + t.shape) for t in ab) for k, ab in shared.items()}
    got_shared = jx_logits(cfg, params, tokens, positions, shared)
    got_broadcast = jx_logits(cfg, params, tokens, positions, broadcast)
    np.testing.assert_allclose(got_shared[real], got_broadcast[real], atol=1e-5, rtol=0)
    assert np.abs(got_shared[real] - base[real]).max() > 1e-2
