"""LoRA adapters as pytrees: configuration, PEFT-style initialisation, banks, merging.

An adapter for one document is `{target: {"a": [layers, in, r], "b": [layers, r, out]}}`; a
*bank* is the same with a leading document axis, `a [docs, layers, in, r]`. Banks hold the
raw (unscaled) factors exactly as PEFT stores `lora_A` / `lora_B` (transposed to `x @ W`).

The model consumes *applied* adapters `{target: (a, b_scaled)}` with the LoRA scale folded
into `b`. Merging a question's top-k documents is rank concatenation of their applied
factors: `Σ_i s·(x a_i) b_i = (x [a_1 … a_k]) [s b_1; …; s b_k]`, so the sum of deltas
costs k·r ranks and never forms a dense `ΔW`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from jprag.model.config import ModelConfig

Array = jax.Array
Bank = dict[str, dict[str, Array]]

FFN_TARGETS = ("gate", "up", "down")
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# PEFT / transformers module names of each target, for export and import.
PEFT_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (scale = alpha / r) and target projections (default: the FFN)."""

    rank: int = 2
    alpha: float = 32.0
    targets: tuple[str, ...] = FFN_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        bad = [t for t in self.targets if t not in ALL_TARGETS]
        if bad or not self.targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of {ALL_TARGETS}, got {self.targets}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def shapes(self, cfg: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
        """Per-document factor shapes `{target: {"a": (L, in, r), "b": (L, r, out)}}`."""
        proj = cfg.projection_shapes()
        return {
            t: {"a": (cfg.n_layers, proj[t][0], self.rank), "b": (cfg.n_layers, self.rank, proj[t][1])}
            for t in self.targets
        }

    def num_params(self, cfg: ModelConfig) -> int:
        return sum(math.prod(s) for ab in self.shapes(cfg).values() for s in ab.values())


def init_bank(cfg: ModelConfig, lora: LoraConfig, key: Array, docs: int | Array, dtype=jnp.float32) -> Bank:
    """Fresh adapters, initialised as PEFT does: A ~ kaiming-uniform(a=√5) = U(±1/√in), B = 0.

    `docs` is a count or an array of global document indices. Each (target, document index)
    draws from its own folded key, so a document's initial adapter does not depend on which
    chunk or bank it is trained in.
    """
    doc_idx = jnp.arange(docs) if isinstance(docs, int) else jnp.asarray(docs)
    n_docs = doc_idx.shape[0]
    bank: Bank = {}
    for t_idx, (target, ab) in enumerate(sorted(lora.shapes(cfg).items())):
        L, fan_in, r = ab["a"]

        def one(doc_key, fan_in=fan_in, shape=ab["a"]):
            bound = 1.0 / jnp.sqrt(jnp.float32(fan_in))
            return jax.random.uniform(doc_key, shape, jnp.float32, -bound, bound).astype(dtype)

        doc_keys = jax.vmap(lambda d: jax.random.fold_in(jax.random.fold_in(key, t_idx), d))(doc_idx)
        bank[target] = {"a": jax.vmap(one)(doc_keys), "b": jnp.zeros((n_docs,) + ab["b"], dtype)}
    return bank


def bank_size(bank: Bank) -> int:
    return int(jax.tree.leaves(bank)[0].shape[0])


def take_rows(bank: Bank, rows: Array) -> Bank:
    """Gather rows (any index shape) of a bank: leaves become `[*rows.shape, layers, ...]`."""
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), bank)


def applied(adapter: Mapping[str, Mapping[str, Array]], scale: float | Array) -> dict[str, tuple[Array, Array]]:
    """Model-ready `{target: (a, scale·b)}` from raw factors (any leading axes)."""
    return {t: (ab["a"], ab["b"] * jnp.asarray(scale, ab["b"].dtype)) for t, ab in adapter.items()}

MERGE_MODES = ("sum", "mean")  # how merge_topk combines a question's top-k adapters


def merge_topk(bank: Bank, rows_qk: Array, scale: float, mode: str = "sum") -> dict[str, tuple[Array, Array]]:
    """Per-question adapters from their top-k documents, by rank concatenation.

    rows_qk [questions, k] int; returns `{target: (a [q, L, in, k·r], b [q, L, k·r, out])}` with
    the scale folded into b. mode 'sum' is PRAG's ΔW = Σ_i s·B_i A_i; 'mean' divides by k.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"merge mode must be 'sum' or 'mean', got {mode!r}")
    k = rows_qk.shape[-1]
    s = scale / k if mode == "mean" else scale
    out = {}
    for t, ab in bank.items():
        a_qkLir = jnp.take(ab["a"], rows_qk, axis=0)
        b_qkLro = jnp.take(ab["b"], rows_qk, axis=0)
        Q, _, L, i, r = a_qkLir.shape
        o = b_qkLro.shape[-1]
        a = jnp.moveaxis(a_qkLir, 1, 3).reshape(Q, L, i, k * r)  # [q, L, in, k, r] → ranks concatenated
        b = jnp.moveaxis(b_qkLro, 1, 2).reshape(Q, L, k * r, o)  # [q, L, k, r, out]
        out[t] = (a, b * jnp.asarray(s, b.dtype))
    return out


def dense_delta(adapter: Mapping[str, tuple[Array, Array]]) -> dict[str, Array]:
    """ΔW = a @ b per target (tests and export only: never in a hot path)."""
    return {t: jnp.einsum("...ir,...ro->...io", a, b) for t, (a, b) in adapter.items()}


def stack(adapters: Sequence[Mapping[str, Any]]) -> Bank:
    """Stack single-document adapters into a bank."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *adapters)
