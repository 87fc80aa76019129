"""Document embeddings: the translator's input, one vector per document.

An *embedder* is `fn(lm, passages, max_len) -> float32 [docs, dim]`, registered by name in
`EMBEDDERS` (`register_embedder` adds one, e.g. a dense retriever's encoder). The built-in ones
read the frozen base model's final-norm hidden states over the passage alone (no chat template,
the tokenizer's own special tokens, the first `max_len` tokens):

* "last" (the default, as published): the hidden state at the passage's last token;
* "mean": the mean over the passage's tokens.

Passages are batched by length (right padding, which causal attention never sees from a real
token), so embedding many documents is a few compiled forward passes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jprag.model.config import ModelConfig
from jprag.model.transformer import forward, positions_from_mask

Array = jax.Array
Embedder = Callable[[Any, Sequence[str], int], np.ndarray]


def pool_last(hidden_bsd: Array, mask_bs: Array) -> Array:
    """Hidden state at each row's last real token (rows are right padded)."""
    last_b = jnp.maximum(jnp.sum(mask_bs, axis=-1) - 1, 0)
    return jnp.take_along_axis(hidden_bsd, last_b[:, None, None], axis=1)[:, 0]


def pool_mean(hidden_bsd: Array, mask_bs: Array) -> Array:
    """Mean hidden state over each row's real tokens."""
    w_bs = mask_bs.astype(hidden_bsd.dtype)
    return jnp.einsum("bsd,bs->bd", hidden_bsd, w_bs) / jnp.maximum(jnp.sum(w_bs, -1, keepdims=True), 1.0)


POOLS: dict[str, Callable[[Array, Array], Array]] = {"last": pool_last, "mean": pool_mean}


@functools.partial(jax.jit, static_argnames=("cfg", "pool"))
def _pooled_hidden(cfg: ModelConfig, params, tokens_bs: Array, mask_bs: Array, *, pool: str) -> Array:
    hidden, _ = forward(cfg, params, tokens_bs, positions_from_mask(mask_bs), output="hidden")
    return POOLS[pool](hidden, mask_bs).astype(jnp.float32)


def embed_tokens(cfg: ModelConfig, params, token_lists: Sequence[Sequence[int]], pool: str = "last",
                 batch_size: int = 8, multiple: int = 64, pad_id: int = 0) -> np.ndarray:
    """Pooled final hidden states `[docs, d_model]` of token sequences, in input order.

    Sequences are sorted by length and batched (up to `batch_size` rows, rounded up to a power of
    two; lengths rounded up to `multiple`), so few programs compile and one document costs one
    row."""
    if pool not in POOLS:
        raise ValueError(f"unknown pooling {pool!r} (known: {sorted(POOLS)})")
    if any(len(t) == 0 for t in token_lists):
        raise ValueError("every document needs at least one token to be embedded")
    out = np.zeros((len(token_lists), cfg.d_model), np.float32)
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        seq = -(-max(len(token_lists[i]) for i in rows) // multiple) * multiple
        n_rows = min(batch_size, 1 << (len(rows) - 1).bit_length())  # power-of-two rows: few shapes
        tokens = np.full((n_rows, seq), pad_id, np.int32)
        mask = np.zeros((n_rows, seq), np.int32)
        for j, i in enumerate(rows):
            tokens[j, : len(token_lists[i])] = token_lists[i]
            mask[j, : len(token_lists[i])] = 1
        pooled = _pooled_hidden(cfg, params, jnp.asarray(tokens), jnp.asarray(mask), pool=pool)
        out[rows] = np.asarray(pooled)[: len(rows)]
    return out


def passage_tokens(tokenizer, passages: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids of each passage as the embedder reads it: plain text, the first `max_len` tokens."""
    out = []
    for p in passages:
        ids = tokenizer(p)["input_ids"]
        out.append([int(i) for i in ids[:max_len]] or [int(tokenizer.eos_token_id or 0)])
    return out


def _base_model_embedder(pool: str) -> Embedder:
    def embed(lm, passages: Sequence[str], max_len: int) -> np.ndarray:
        tokens = passage_tokens(lm.tokenizer, passages, max_len)
        return embed_tokens(lm.cfg, lm.params, tokens, pool, pad_id=int(lm.tokenizer.pad_token_id or 0))

    embed.__doc__ = f"Base-model final hidden states pooled by {pool!r}."
    return embed


EMBEDDERS: dict[str, Embedder] = {"last": _base_model_embedder("last"), "mean": _base_model_embedder("mean")}


def register_embedder(name: str, fn: Embedder) -> None:
    """Make `fn(lm, passages, max_len) -> [docs, dim]` available as `[translator] embedding = name`."""
    EMBEDDERS[name] = fn


def embed_passages(lm, passages: Sequence[str], kind: str = "last", max_len: int = 512) -> np.ndarray:
    """Embeddings `[docs, dim]` (float32) of passages with the registered embedder `kind`."""
    if kind not in EMBEDDERS:
        raise ValueError(f"[translator] embedding {kind!r} is not a registered embedder (known: {sorted(EMBEDDERS)})")
    emb = np.asarray(EMBEDDERS[kind](lm, list(passages), max_len), np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(passages):
        raise ValueError(f"embedder {kind!r} returned shape {emb.shape}, expected [{len(passages)}, dim]")
    if not np.isfinite(emb).all():
        raise ValueError(f"embedder {kind!r} returned non-finite values")
    return emb
