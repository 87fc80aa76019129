"""The inventory, the routing logits, the Gumbel-sigmoid relaxation and merge-before mixing.

Shapes (L layers, M skills, r rank, Lr = L per-layer routing or 1 shared):

    inventory  {target: {"a": [L, M, in, r], "b": [L, M, r, out]}}   raw factors, B = 0 at init
    routing    z [docs, Lr, M]                                        logits, one row per document
    weights    w [docs, Lr, M]                                        Σ_m w = 1

A document's adapter is an ordinary rank-r LoRA (raw factors, scale not folded):
`A_d = Σ_m w_m A_m`, `B_d = Σ_m w_m B_m`, so everything downstream (`applied`, `doc_loss`,
`merge_topk`, batched generation) treats it like a PRAG bank row.

Randomness only enters through explicit keys folded with *global* indices: the inventory per
(target, skill), a routing row per document index, the Gumbel noise per (document index, the
document's own step). Results therefore do not depend on chunking, batching or the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jprag.model.config import ModelConfig
from jprag.poly.config import PolyConfig

Array = jax.Array
Inventory = dict[str, dict[str, Array]]

# Tags folded into the seed key so the three random streams never share keys.
_INVENTORY, _ROUTING, _NOISE = 1, 2, 3


def base_key(poly: PolyConfig) -> Array:
    return jax.random.key(poly.seed)


def inventory_shapes(cfg: ModelConfig, poly: PolyConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """`{target: {"a": (L, M, in, r), "b": (L, M, r, out)}}`."""
    M, out = poly.n_skills, {}
    for t, ab in poly.lora.shapes(cfg).items():
        (L, i, r), o = ab["a"], ab["b"][-1]
        out[t] = {"a": (L, M, i, r), "b": (L, M, r, o)}
    return out


def init_inventory(cfg: ModelConfig, poly: PolyConfig) -> Inventory:
    """M fresh LoRAs per target, as PEFT initialises one: A ~ U(±1/√in), B = 0 (so the mixed
    adapter of any routing is zero at init and the model starts as the base model)."""
    key = jax.random.fold_in(base_key(poly), _INVENTORY)
    inv: Inventory = {}
    for t_idx, (target, ab) in enumerate(sorted(inventory_shapes(cfg, poly).items())):
        L, M, fan_in, r = ab["a"]
        bound = 1.0 / jnp.sqrt(jnp.float32(fan_in))

        def skill(m, t_idx=t_idx, shape=(L, fan_in, r)):
            k = jax.random.fold_in(jax.random.fold_in(key, t_idx), m)
            return jax.random.uniform(k, shape, jnp.float32, -bound, bound)

        a_mLir = jax.vmap(skill)(jnp.arange(M))
        inv[target] = {"a": jnp.moveaxis(a_mLir, 0, 1), "b": jnp.zeros(ab["b"], jnp.float32)}
    return inv


def init_routing(poly: PolyConfig, n_layers: int, doc_idx: Array) -> Array:
    """Routing logits `[len(doc_idx), Lr, M]` ~ U(±init_logit), one key per global document index
    (negative indices: padding rows)."""
    key = jax.random.fold_in(base_key(poly), _ROUTING)
    shape = (poly.routing_layers(n_layers), poly.n_skills)

    def row(d):
        return jax.random.uniform(jax.random.fold_in(key, d), shape, jnp.float32, -poly.init_logit, poly.init_logit)

    return jax.vmap(row)(jnp.asarray(doc_idx, jnp.int32))


def logistic_noise(poly: PolyConfig, doc_idx: Array, doc_step: Array, shape: tuple[int, ...]) -> Array:
    """Standard logistic noise `[n, *shape]` (mean 0, variance π²/3), one key per (document index,
    the document's own training step): the noise a document sees does not depend on which other
    documents share its batch. (Logistic = difference of two Gumbels, so
    `sigmoid((z + noise) / τ)` is the binary Concrete / Gumbel-sigmoid relaxation of Bernoulli(σ(z)).)"""
    key = jax.random.fold_in(base_key(poly), _NOISE)

    def one(d, s):
        return jax.random.logistic(jax.random.fold_in(jax.random.fold_in(key, d), s), shape, jnp.float32)

    return jax.vmap(one)(jnp.asarray(doc_idx, jnp.int32), jnp.asarray(doc_step, jnp.int32))


def temperature(poly: PolyConfig, progress: Array) -> Array:
    """τ at a document's training progress ∈ [0, 1): geometric from tau_start to tau_end."""
    p = jnp.asarray(progress, jnp.float32)
    return poly.tau_start * (poly.tau_end / poly.tau_start) ** p


def normalise(log_s: Array) -> Array:
    """`s / Σ_m s` over the last (skill) axis, computed from `log s` as a softmax: exact in the
    limits where every sigmoid underflows (no epsilon, weights always sum to 1)."""
    return jax.nn.softmax(log_s, axis=-1)


def gumbel_sigmoid(z: Array, noise: Array, tau: Array) -> Array:
    """Unnormalised relaxed Bernoulli sample `sigmoid((z + noise) / τ)` (τ broadcast over z)."""
    return jax.nn.sigmoid((z + noise) / tau)


def train_weights(z_nlm: Array, noise_nlm: Array, tau_n: Array) -> Array:
    """Training weights `[n, Lr, M]`: Gumbel-sigmoid samples normalised over M."""
    tau = jnp.asarray(tau_n, jnp.float32).reshape((-1,) + (1,) * (z_nlm.ndim - 1))
    return normalise(jax.nn.log_sigmoid((z_nlm + noise_nlm) / tau))


def eval_weights(z_nlm: Array) -> Array:
    """Evaluation weights `[n, Lr, M]`: the deterministic `sigmoid(z)`, normalised over M."""
    return normalise(jax.nn.log_sigmoid(z_nlm))


def uniform_weights(z_nlm: Array) -> Array:
    return jnp.full(z_nlm.shape, 1.0 / z_nlm.shape[-1], jnp.float32)


def weights(poly: PolyConfig, z_nlm: Array, noise_nlm: Array | None = None, tau_n: Array | None = None) -> Array:
    """The routing weights a `poly` config uses: uniform, training (noise and τ given) or eval."""
    if poly.routing == "uniform":
        return uniform_weights(z_nlm)
    if noise_nlm is None:
        return eval_weights(z_nlm)
    return train_weights(z_nlm, noise_nlm, tau_n)


def mix(inventory: Inventory, w_dlm: Array) -> dict[str, dict[str, Array]]:
    """Merge-before: per document, `A_d = Σ_m w_m A_m`, `B_d = Σ_m w_m B_m` per layer.

    `w [docs, Lr, M]` with Lr = L or 1 (shared by layers). Returns raw factors
    `{target: {"a": [docs, L, in, r], "b": [docs, L, r, out]}}` — a bank; its LoRA scale is
    `poly.scale`, applied by the caller (`applied`, `merge_topk`)."""
    out = {}
    for t, ab in inventory.items():
        L = ab["a"].shape[0]
        w = jnp.broadcast_to(w_dlm, (w_dlm.shape[0], L, w_dlm.shape[-1])).astype(ab["a"].dtype)  # [d, L, M]
        out[t] = {"a": jnp.einsum("dlm,lmir->dlir", w, ab["a"]),
                  "b": jnp.einsum("dlm,lmro->dlro", w, ab["b"])}
    return out


def skill_adapter(inventory: Inventory, m: int) -> dict[str, dict[str, Array]]:
    """Skill m's own LoRA `{target: {"a": [L, in, r], "b": [L, r, out]}}` (tests, inspection)."""
    return {t: {"a": ab["a"][:, m], "b": ab["b"][:, m]} for t, ab in inventory.items()}


__all__ = [
    "Inventory", "inventory_shapes", "init_inventory", "init_routing", "logistic_noise", "temperature",
    "normalise", "gumbel_sigmoid", "train_weights", "eval_weights", "uniform_weights", "weights", "mix",
    "skill_adapter",
]
