"""Batched generation (`jprag.model.generate`) on a tiny random model: batching, stop tokens,
sampling, compile-cache bucketing and input validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import tiny_hf_config
from jprag.model.config import ModelConfig
from jprag.model.generate import SamplingConfig, bucket, bucket_length, generate, generate_tokens, sample_logits
from jprag.model.transformer import init_params

PROMPT_LENGTHS = (3, 11, 20)  # two prompt-length buckets (16, 32)
NEW = 16  # one max_new bucket for every call in this module


@pytest.fixture(scope="module")
def model():
    """A tiny untied Qwen2-style model (qkv bias) with weights scaled up so that greedy and
    sampled continuations are varied rather than one repeated token."""
    cfg = ModelConfig.from_hf(tiny_hf_config("qwen2"))
    params = init_params(cfg, jax.random.key(0))

    def scale(path, x):
        return x if "norm" in jax.tree_util.keystr(path) else x * 5.0

    return cfg, jax.tree_util.tree_map_with_path(scale, params)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 128, size=n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def greedy_batched(model, prompts):
    cfg, params = model
    return generate(cfg, params, prompts, max_new_tokens=NEW, stop_ids=[])


# ------------------------------------------------------------------------------ batching


def test_batched_greedy_equals_each_row_alone(model, prompts, greedy_batched):
    cfg, params = model
    assert [len(o) for o in greedy_batched] == [NEW] * len(prompts)
    assert len({tuple(o) for o in greedy_batched}) == len(prompts)
    for prompt, batched in zip(prompts, greedy_batched):
        alone = generate(cfg, params, [prompt], max_new_tokens=NEW, stop_ids=[])[0]
        assert alone == batched, f"{len(prompt)}-token prompt: batched generation differs from running it alone"
    # A shorter request is a prefix of a longer one (max_new_tokens only truncates).
    short = generate(cfg, params, prompts, max_new_tokens=7, stop_ids=[])
    assert short == [o[:7] for o in greedy_batched]


def test_per_row_adapters_in_generate(model, prompts, greedy_batched):
    """Each row decodes with its own adapter, as if generated alone with it."""
    cfg, params = model
    rng = np.random.default_rng(5)
    adapters = {}
    for name in ("q", "v", "down"):
        i, o = cfg.projection_shapes()[name]
        a = rng.normal(0, 0.5, size=(len(prompts), cfg.n_layers, i, 2)).astype(np.float32)
        b = rng.normal(0, 0.5, size=(len(prompts), cfg.n_layers, 2, o)).astype(np.float32)
        adapters[name] = (jnp.asarray(a), jnp.asarray(b))
    batched = generate(cfg, params, prompts, max_new_tokens=NEW, stop_ids=[], adapters=adapters)
    for i, prompt in enumerate(prompts):
        assert batched[i] != greedy_batched[i], "the adapter has no effect on generation"
        own = {k: (a[i : i + 1], b[i : i + 1]) for k, (a, b) in adapters.items()}
        assert generate(cfg, params, [prompt], max_new_tokens=NEW, stop_ids=[], adapters=own)[0] == batched[i]


# ------------------------------------------------------------------------------ stop tokens


def _pick_stop(outs: list[list[int]]) -> tuple[int, int, int]:
    """(row, index, token): a token that row `row` first emits at `index` >= 1, while some
    other row never emits it."""
    for r, out in enumerate(outs):
        for j in range(1, len(out) // 2):
            tok = out[j]
            if tok in out[:j]:
                continue
            if any(tok not in other for k, other in enumerate(outs) if k != r):
                return r, j, tok
    raise AssertionError(f"no usable stop token in {outs}")


def test_stop_tokens_cut_each_row_independently(model, prompts, greedy_batched):
    cfg, params = model
    row, index, stop = _pick_stop(greedy_batched)
    got = generate(cfg, params, prompts, max_new_tokens=NEW, stop_ids=[stop])
    expected = [o[: o.index(stop)] if stop in o else o for o in greedy_batched]
    assert got == expected
    assert got[row] == greedy_batched[row][:index]  # cut at the stop, stop token excluded
    assert stop not in got[row]
    assert any(len(o) == NEW for o in got), "every row stopped: the other rows should continue"
    # Several stop ids: the earliest one per row wins.
    other = greedy_batched[row][index + 1]
    got2 = generate(cfg, params, prompts, max_new_tokens=NEW, stop_ids=[other, stop])
    assert got2[row] == greedy_batched[row][: min(index, greedy_batched[row].index(other))]


def test_padding_rows_are_done_from_the_start(model, prompts):
    """generate_tokens: an all-zero mask row (batch padding) yields nothing, and the real rows
    are unaffected by it."""
    cfg, params = model
    P = 16
    tokens = np.zeros((2, P), np.int32)
    mask = np.zeros((2, P), np.int32)
    tokens[0, P - 3 :] = prompts[0]
    mask[0, P - 3 :] = 1
    stops = jnp.full((4,), -1, jnp.int32)
    out, n = generate_tokens(
        cfg, params, jnp.asarray(tokens), jnp.asarray(mask), stops, jax.random.key(0), max_new=16
    )
    out, n = np.asarray(out), np.asarray(n)
    assert (out[1] == -1).all() and n[1] == 0
    assert n[0] == 16
    assert out[0].tolist() == generate(cfg, params, [prompts[0]], max_new_tokens=16, stop_ids=[])[0]


# ------------------------------------------------------------------------------ sampling


def test_sampling_seeds(model, prompts, greedy_batched):
    cfg, params = model
    hot = SamplingConfig(temperature=1.0)
    a = generate(cfg, params, prompts, max_new_tokens=NEW, sampling=hot, seed=0, stop_ids=[])
    b = generate(cfg, params, prompts, max_new_tokens=NEW, sampling=hot, seed=0, stop_ids=[])
    c = generate(cfg, params, prompts, max_new_tokens=NEW, sampling=hot, seed=1, stop_ids=[])
    assert a == b, "same seed, different samples"
    assert a != c, "different seeds, identical samples"
    assert a != greedy_batched
    top1 = generate(
        cfg, params, prompts, max_new_tokens=NEW, sampling=SamplingConfig(1.0, top_k=1), seed=3, stop_ids=[]
    )
    assert top1 == greedy_batched, "top_k=1 sampling must be greedy"


def _draw(logits, mode, temperature=1.0, top_p=1.0, n=20_000):
    keys = jax.random.split(jax.random.key(42), n)
    logits = jnp.asarray(logits, jnp.float32)[None]
    fn = jax.jit(jax.vmap(lambda k: sample_logits(logits, k, mode, jnp.float32(temperature), jnp.float32(top_p))[0]))
    draws = np.asarray(fn(keys))
    return np.bincount(draws, minlength=logits.shape[-1]) / n


def _softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


LOGITS = np.array([1.0, 0.2, -0.5, 0.6], np.float32)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sample_logits_matches_softmax(temperature):
    freq = _draw(LOGITS, (False, 0, False), temperature)
    np.testing.assert_allclose(freq, _softmax(LOGITS / temperature), atol=0.02)


def test_sample_logits_top_k():
    freq = _draw(LOGITS, (False, 2, False), 1.0)
    assert freq[1] == 0 and freq[2] == 0  # only the two largest logits (ids 0 and 3)
    np.testing.assert_allclose(freq[[0, 3]], _softmax(LOGITS[[0, 3]]), atol=0.02)


def test_sample_logits_top_p():
    probs = np.array([0.15, 0.5, 0.05, 0.3], np.float32)  # sorted: 0.5 (1), 0.3 (3), 0.15 (0), 0.05 (2)
    logits = np.log(probs)
    # 0.75: the smallest prefix reaching 0.75 is {1, 3} (mass 0.8)
    freq = _draw(logits, (False, 0, True), 1.0, top_p=0.75)
    assert freq[0] == 0 and freq[2] == 0
    np.testing.assert_allclose(freq[[1, 3]], probs[[1, 3]] / 0.8, atol=0.02)
    # 0.9: {1, 3, 0} (mass 0.95); the 0.05 tail is excluded
    freq = _draw(logits, (False, 0, True), 1.0, top_p=0.9)
    assert freq[2] == 0
    np.testing.assert_allclose(freq[[1, 3, 0]], probs[[1, 3, 0]] / 0.95, atol=0.02)
    # below the top token's mass: always the top token
    freq = _draw(logits, (False, 0, True), 1.0, top_p=0.2)
    assert freq[1] == 1.0
    # greedy mode ignores the keys
    assert _draw(logits, (True, 0, False), n=100)[1] == 1.0


# ------------------------------------------------------------------------------ bucketing


def test_bucketing_limits_compilations(model):
    cfg, params = model
    cfg = cfg.replace(max_position=4099)  # a config no other test uses: a clean compile-cache slate
    if not hasattr(generate_tokens, "_cache_size"):  # private jit API (present in jax 0.10.x)
        pytest.skip("this jax version's jitted functions have no _cache_size() to count compilations")
    rng = np.random.default_rng(1)
    before = generate_tokens._cache_size()
    keys = set()
    for batch in (1, 2, 3):
        for length in (5, 9, 13):
            prompts = [rng.integers(3, 128, size=length).tolist() for _ in range(batch)]
            out = generate(cfg, params, prompts, max_new_tokens=6, stop_ids=[])
            assert [len(o) for o in out] == [6] * batch
            keys.add((bucket(batch, minimum=1), bucket(length, minimum=16), bucket(6, minimum=16)))
    compiled = generate_tokens._cache_size() - before
    # Prompt lengths 5/9/13 share one bucket; batch sizes 1, 2, 3 round to 1, 2, 4.
    assert len(keys) == 3
    assert compiled == len(keys), f"{compiled} compilations for {len(keys)} shape buckets"

    # Changing max_new_tokens within its bucket, the batch within its bucket, or the
    # (traced) temperature / top_p does not compile again.
    generate(cfg, params, [[5, 6, 7]] * 4, max_new_tokens=16, stop_ids=[])
    generate(cfg, params, [[5, 6, 7]], max_new_tokens=1, stop_ids=[2])
    generate(cfg, params, [[5, 6, 7]], max_new_tokens=6, sampling=SamplingConfig(0.7, top_p=0.9))
    generate(cfg, params, [[5, 6, 7]], max_new_tokens=6, sampling=SamplingConfig(1.3, top_p=0.5))
    assert generate_tokens._cache_size() - before == len(keys) + 1  # + the one sampling mode


def test_bucket():
    assert [bucket(n, minimum=1) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    assert [bucket(n, minimum=16) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
    assert [bucket_length(n) for n in (5, 100, 256, 257, 520, 640)] == [16, 128, 256, 384, 640, 640]


# ------------------------------------------------------------------------------ bad input


def test_bad_input(model):
    cfg, params = model
    assert generate(cfg, params, []) == []
    with pytest.raises(ValueError, match="at least one token"):
        generate(cfg, params, [[]])
    with pytest.raises(ValueError, match="at least one token"):
        generate(cfg, params, [[5, 6], []])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(cfg, params, [[5, 6]], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"max_position \(256\)"):
        generate(cfg, params, [[5] * 200], max_new_tokens=57)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(temperature=1.0, top_k=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(temperature=1.0, top_p=0.0)


def test_long_prompt_within_max_position(model):
    """The limit is on real positions, not on the bucketed prompt length: 200 + 56 = 256 fits
    although the prompt bucket is 256."""
    cfg, params = model
    assert cfg.max_position == 256
    out = generate(cfg, params, [[5] * 200], max_new_tokens=56, stop_ids=[])
    assert len(out[0]) == 56
