"""Batched generation: one jitted program does prefill and the whole KV-cache decode loop.

Shapes are bucketed (batch, prompt length, new tokens) so a workload compiles a handful of
programs, not one per request. Rows are left-padded so every row writes the same cache slot
each step; each row carries its own RoPE positions, its own stop state and, optionally, its
own LoRA adapter (`adapters` leaves with a leading batch axis, see `jprag.model.transformer`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jprag.model.config import ModelConfig
from jprag.model.transformer import KVCache, forward, positions_from_mask, unstack_layers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def mode(self) -> tuple[bool, int, bool]:
        """The static part of sampling: (greedy, top_k, use_top_p)."""
        return (self.greedy, 0 if self.greedy else self.top_k, (not self.greedy) and self.top_p < 1.0)


def bucket_length(n: int) -> int:
    """Prompt-length bucket: powers of two up to 256, then multiples of 128 (so a 520-token
    RAG prompt pads to 640, not 1024: prefill cost grows with the padded length)."""
    return bucket(n, minimum=16) if n <= 256 else -(-n // 128) * 128


def bucket(n: int, minimum: int = 8) -> int:
    """Round up to a power of two (>= minimum): the compile-cache key for a dimension."""
    return max(minimum, 1 << max(0, int(n - 1).bit_length()))


def program_shape(n_prompts: int, longest: int, max_new_tokens: int) -> tuple[int, int, int]:
    """The bucketed `(batch, prompt length, new tokens)` that `generate` compiles for a request;
    its KV cache holds `prompt length + new tokens` slots per row."""
    return bucket(n_prompts, minimum=1), bucket_length(longest), bucket(max_new_tokens, minimum=16)


def argmax_first(logits_bv: Array) -> Array:
    """`argmax` over the last axis (first index among ties) as two plain reductions.

    Same result as `jnp.argmax` for finite logits; XLA:CPU runs argmax's variadic (value,
    index) reduce element by element, which over a 49k vocabulary costs more per decode step
    than a layer's matmuls.
    """
    vocab = logits_bv.shape[-1]
    top_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
    idx_bv = jax.lax.broadcasted_iota(jnp.int32, logits_bv.shape, logits_bv.ndim - 1)
    return jnp.min(jnp.where(logits_bv == top_b1, idx_bv, vocab), axis=-1).astype(jnp.int32)


def sample_logits(logits_bv: Array, key: Array, mode: tuple[bool, int, bool], temperature: Array, top_p: Array) -> Array:
    """Next token per row [b] from float32 logits [b, vocab].

    `mode = (greedy, top_k, use_top_p)` is static (it changes the program); temperature and
    top_p are traced scalars so changing them does not recompile.
    """
    greedy, top_k, use_top_p = mode
    if greedy:
        return argmax_first(logits_bv)
    logits_bv = logits_bv / temperature
    neg = jnp.finfo(logits_bv.dtype).min
    if top_k:
        kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth, neg, logits_bv)
    if use_top_p:
        sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_bv, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        n_keep = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_bv, jnp.maximum(n_keep - 1, 0), axis=-1)
        logits_bv = jnp.where(logits_bv < cutoff, neg, logits_bv)
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new", "mode"))
def generate_tokens(
    cfg: ModelConfig,
    params: Mapping[str, Any],
    tokens_bp: Array,
    mask_bp: Array,
    stop_ids: Array,
    key: Array,
    adapters: Mapping[str, tuple[Array, Array]] | None = None,
    temperature: Array | float = 1.0,
    top_p: Array | float = 1.0,
    limit: Array | int | None = None,
    *,
    max_new: int,
    mode: tuple[bool, int, bool] = (True, 0, False),
) -> tuple[Array, Array]:
    """Prefill left-padded prompts, then decode up to `max_new` tokens in a `while_loop`.

    tokens_bp, mask_bp [batch, prompt] (mask 1 = real token, left padding); stop_ids [n] int32
    (pad with -1); `mode` as in `sample_logits`. A row whose mask is all zero is batch padding:
    it is done from the start and yields only -1. `limit` (traced, <= max_new) stops the loop
    early without recompiling: `max_new` sizes the buffers, `limit` the work. Returns `(out [batch, max_new] int32,
    n_generated [batch])`; entries from a row's stop token on are -1.
    """
    B, P = tokens_bp.shape
    positions_bp = positions_from_mask(mask_bp)
    lengths_b = jnp.sum(mask_bp, axis=-1).astype(jnp.int32)
    # unstacked layers (see `decode_params`) get a per-layer cache, updated in place
    cache = KVCache.init(cfg, B, P + max_new, per_layer=isinstance(params["layers"], (tuple, list)))
    logits, cache = forward(cfg, params, tokens_bp, positions_bp, cache, adapters, output="last")
    key, sub = jax.random.split(key)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)
    first = sample_logits(logits[:, 0], sub, mode, temperature, top_p)

    out = jnp.full((B, max_new), -1, jnp.int32)
    # rows without a single real token (batch padding) are done from the start, so they
    # cannot keep the loop running after every real row has stopped
    state = (jnp.int32(0), first, lengths_b == 0, out, cache, key)
    n_steps = jnp.minimum(jnp.asarray(max_new if limit is None else limit, jnp.int32), max_new)

    def cond(state):
        step, _, done, *_ = state
        return (step < n_steps) & ~jnp.all(done)

    def body(state):
        step, tok_b, done, out, cache, key = state
        done = done | jnp.any(tok_b[:, None] == stop_ids[None, :], axis=-1)
        out = out.at[:, step].set(jnp.where(done, -1, tok_b))
        pos_b1 = (lengths_b + step)[:, None]
        logits, cache = forward(cfg, params, tok_b[:, None], pos_b1, cache, adapters, output="last")
        key, sub = jax.random.split(key)
        nxt = sample_logits(logits[:, 0], sub, mode, temperature, top_p)
        return step + 1, nxt, done, out, cache, key

    _, _, _, out, _, _ = jax.lax.while_loop(cond, body, state)
    return out, jnp.sum(out >= 0, axis=-1)


_DECODE_PARAMS: list[tuple[Any, dict]] = []  # [(stacked params, their unstacked copy)], newest last


def decode_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """The layout decode runs fastest with: layers unstacked and q/k/v, gate/up fused
    (`unstack_layers(params, fuse=True)`).

    The unstacked copy of the most recently used parameter trees is kept (keyed by identity,
    two entries), so repeated `generate` calls with the same params pay the copy once.
    """
    if isinstance(params["layers"], (tuple, list)):
        return params
    for src, flat in _DECODE_PARAMS:
        if src is params:
            return flat
    flat = unstack_layers(params, fuse=True)
    _DECODE_PARAMS.append((params, flat))
    del _DECODE_PARAMS[:-2]
    return flat


def _pad_adapters(adapters, batch: int):
    if adapters is None:
        return None

    def pad(t):
        if t.ndim == 3:  # shared adapter: no batch axis
            return t
        return jnp.pad(t, [(0, batch - t.shape[0])] + [(0, 0)] * (t.ndim - 1))

    return jax.tree.map(pad, adapters)


def generate(
    cfg: ModelConfig,
    params: Mapping[str, Any],
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    sampling: SamplingConfig = SamplingConfig(),
    stop_ids: Sequence[int] | None = None,
    seed: int = 0,
    adapters: Mapping[str, tuple[Array, Array]] | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """Generate for a batch of token-id prompts; returns new token ids per row (stop excluded).

    `adapters` may be per row (leading axis = len(prompts)) or shared. Batch, prompt length and
    `max_new_tokens` are rounded up to buckets; padding rows are dropped from the result.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    n = len(prompts)
    longest = max(len(p) for p in prompts)
    B, P, max_new = program_shape(n, longest, max_new_tokens)
    if longest + max_new_tokens > cfg.max_position:  # positions are per row: bucket padding does not count
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position ({cfg.max_position})"
        )
    tokens = np.full((B, P), pad_id, np.int32)
    mask = np.zeros((B, P), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p) :] = p
        mask[i, P - len(p) :] = 1
    # padding rows n: keep an all-zero mask: generate_tokens treats them as already done
    # (their fully masked attention is uniform, not NaN)
    stops = list(cfg.eos_token_ids if stop_ids is None else stop_ids)
    stop_arr = np.full((bucket(len(stops) + 1, minimum=4),), -1, np.int32)
    stop_arr[: len(stops)] = stops
    out, _ = generate_tokens(
        cfg,
        decode_params(params),
        jnp.asarray(tokens),
        jnp.asarray(mask),
        jnp.asarray(stop_arr),
        jax.random.key(seed),
        _pad_adapters(adapters, B),
        max(sampling.temperature, 1e-6),
        sampling.top_p,
        max_new_tokens,
        max_new=max_new,
        mode=sampling.mode,
    )
    out = np.asarray(out)[:n, :max_new_tokens]
    return [[int(t) for t in row if t >= 0] for row in out]
