"""Unstacked layers (`unstack_layers`): the unrolled layer loop computes exactly what the scan
does — full forward, per-row adapters, and KV-cache prefill + decode with a per-layer cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import tiny_hf_config
from jprag.model.config import ModelConfig
from jprag.model.transformer import KVCache, forward, init_params, positions_from_mask, unstack_layers


@pytest.mark.parametrize("family,fuse", [("llama", False), ("qwen2", True), ("gemma3", True)])
def test_unrolled_equals_scanned(family, fuse):
    cfg = ModelConfig.from_hf(tiny_hf_config(family))
    params = init_params(cfg, jax.random.key(1))
    flat = unstack_layers(params, fuse=fuse)
    assert isinstance(flat["layers"], tuple) and len(flat["layers"]) == cfg.n_layers
    assert ("gate_up" in flat["layers"][0]) == fuse and ("gate" in flat["layers"][0]) != fuse
    rng = np.random.default_rng(0)
    B, T = 3, 24
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, :5] = 0  # a left-padded row
    positions = positions_from_mask(jnp.asarray(mask))
    proj = cfg.projection_shapes()
    adapters = {  # per-row adapters on two targets
        t: (jnp.asarray(rng.normal(size=(B, cfg.n_layers, proj[t][0], 2)), jnp.float32) * 0.1,
            jnp.asarray(rng.normal(size=(B, cfg.n_layers, 2, proj[t][1])), jnp.float32) * 0.1)
        for t in ("q", "v", "up", "down")
    }
    ref, _ = forward(cfg, params, tokens, positions, adapters=adapters)
    got, _ = forward(cfg, flat, tokens, positions, adapters=adapters)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)

    # prefill 20 tokens then decode 4 one at a time: stacked cache (scan) vs per-layer (unrolled)
    outs = []
    for p, per_layer in ((params, False), (flat, True)):
        cache = KVCache.init(cfg, B, T, per_layer=per_layer)
        logits, cache = forward(cfg, p, tokens[:, :20], positions[:, :20], cache, adapters, output="last")
        steps = [logits]
        for t in range(20, T):
            logits, cache = forward(cfg, p, tokens[:, t : t + 1], positions[:, t : t + 1], cache, adapters,
                                    output="last")
            steps.append(logits)
        assert isinstance(cache.k, tuple) == per_layer
        outs.append(np.concatenate([np.asarray(s) for s in steps], axis=1))
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(outs[0][:, 1:], np.asarray(ref)[:, 20:], atol=1e-4, rtol=1e-4)


def test_unstacked_layer_count_checked():
    cfg = ModelConfig.from_hf(tiny_hf_config("llama"))
    flat = unstack_layers(init_params(cfg, jax.random.key(0)))
    flat["layers"] = flat["layers"][:-1]
    with pytest.raises(ValueError, match="layers"):
        forward(cfg, flat, jnp.zeros((1, 4), jnp.int32), jnp.arange(4)[None])
