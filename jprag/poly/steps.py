"""The two compiled training steps of Poly-PRAG, as pure functions plus explicit-sharding jits.

Batches are document-major, one sample per document per step (as the PRAG encoder):
`tokens`, `attn_mask`, `loss_mask` [D, 1, S] int32, `active` [D] float32 (0 = padding entry),
`doc` [D] int32 (joint: the document's row in the routing table, its global index; Poly-z: the
document's global index in its table), `doc_step` [D] int32 (how many samples this document has
trained on before) and `progress` [D] float32 (`doc_step` / the document's total steps, for τ).

* Joint step (Poly-PRAG): the inventory (replicated on the mesh) and the whole routing table
  `[N, Lr, M]` (documents sharded over `data`) are inputs. Loss = mean over the active
  documents of their PRAG loss; the inventory's gradient is that mean's (GSPMD reduces the
  per-shard partial sums across `data`), AdamW with one shared state. A routing row's gradient
  is its own document's loss gradient alone (not divided by the batch size), and the row
  optimizer (Adam) is per row with its own step count, masked so that rows not in the batch —
  and their optimizer state — stay bit-identical.
* Routing step (Poly-z-PRAG): the inventory is a constant input (not differentiated, not
  donated, not returned); only a chunk's rows `[D, Lr, M]` are trained, each independently
  (stacked like `jprag.train.stacked`: D documents together ≡ D separate runs).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jprag.mesh import doc_sharding, doc_shardings, param_shardings, replicated
from jprag.model.config import ModelConfig
from jprag.poly.config import PolyConfig
from jprag.poly.routing import Inventory, logistic_noise, mix, temperature, weights
from jprag.train.stacked import doc_losses

Array = jax.Array
SEQ_KEYS = ("tokens", "attn_mask", "loss_mask")


def inventory_optimizer(poly: PolyConfig) -> optax.GradientTransformation:
    return optax.adamw(poly.learning_rate, weight_decay=poly.weight_decay)


def routing_optimizer(poly: PolyConfig) -> optax.GradientTransformation:
    """Plain Adam (no decay: it would pull every document towards uniform routing)."""
    return optax.adam(poly.routing_learning_rate)


def init_routing_state(poly: PolyConfig, z: Array):
    """Per-row optimizer state for a routing table `[N, Lr, M]` (Adam's count gets the row axis)."""
    return jax.vmap(routing_optimizer(poly).init)(z)


def batch_weights(poly: PolyConfig, z_dlm: Array, batch: Mapping[str, Array]) -> Array:
    """Training routing weights `[D, Lr, M]` of a batch's documents (noise keyed by doc, doc_step)."""
    noise = logistic_noise(poly, batch["doc"], batch["doc_step"], z_dlm.shape[1:])
    return weights(poly, z_dlm, noise, temperature(poly, batch["progress"]))


def poly_losses(cfg: ModelConfig, poly: PolyConfig, params, inventory: Inventory, w_dlm: Array,
                batch: Mapping[str, Array]) -> Array:
    """Per-document PRAG losses `[D]` (masked by `active`) of the mixed adapters `mix(inventory, w)`:
    the encoder's own loss (`doc_losses`: the model vmapped over documents, one loss head over
    all their positions), so a Poly document and a PRAG document are scored identically."""
    bank = mix(inventory, w_dlm)  # {t: {"a": [D, L, in, r], "b": [D, L, r, out]}}
    seqs = {k: batch[k] for k in SEQ_KEYS}
    return doc_losses(cfg, poly.scale, params, bank, seqs) * batch["active"]


def _keep(mask_n: Array, new: Array, old: Array) -> Array:
    return jnp.where(mask_n.reshape(mask_n.shape + (1,) * (new.ndim - 1)), new, old)


def make_joint_step(cfg: ModelConfig, poly: PolyConfig) -> Callable[..., tuple]:
    """`step(params, inventory, inv_state, z, z_state, batch) -> (inventory, inv_state, z, z_state,
    loss [D])` (not yet jitted); `z [N, Lr, M]` is the whole routing table."""
    inv_opt, z_opt = inventory_optimizer(poly), routing_optimizer(poly)
    learned = poly.routing == "learned"

    def step(params, inventory, inv_state, z, z_state, batch):
        def total(inventory, z):
            z_dlm = jnp.take(z, batch["doc"], axis=0)
            per_doc = poly_losses(cfg, poly, params, inventory, batch_weights(poly, z_dlm, batch), batch)
            return jnp.sum(per_doc), per_doc

        (_, per_doc), (g_inv, g_z) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(inventory, z)
        n_active = jnp.maximum(jnp.sum(batch["active"]), 1.0)
        g_inv = jax.tree.map(lambda g: g / n_active, g_inv)  # gradient of the mean loss
        updates, inv_state = inv_opt.update(g_inv, inv_state, inventory)
        inventory = optax.apply_updates(inventory, updates)
        if learned:
            in_batch = jnp.zeros(z.shape[0], batch["active"].dtype).at[batch["doc"]].max(batch["active"]) > 0
            z_updates, new_state = jax.vmap(z_opt.update)(g_z, z_state, z)
            z_state = jax.tree.map(functools.partial(_keep, in_batch), new_state, z_state)
            z = _keep(in_batch, optax.apply_updates(z, z_updates), z)
        return inventory, inv_state, z, z_state, per_doc

    return step


def make_routing_step(cfg: ModelConfig, poly: PolyConfig) -> Callable[..., tuple]:
    """`step(params, inventory, z, z_state, batch) -> (z, z_state, loss [D])` for a chunk's rows
    `z [D, Lr, M]` (not yet jitted). The inventory is only read."""
    z_opt = routing_optimizer(poly)

    def step(params, inventory, z, z_state, batch):
        inventory = jax.lax.stop_gradient(inventory)

        def total(z):
            per_doc = poly_losses(cfg, poly, params, inventory, batch_weights(poly, z, batch), batch)
            return jnp.sum(per_doc), per_doc  # row d's gradient is ∇ loss_d alone

        g_z, per_doc = jax.grad(total, has_aux=True)(z)
        z_updates, new_state = jax.vmap(z_opt.update)(g_z, z_state, z)
        active = batch["active"] > 0
        z_state = jax.tree.map(functools.partial(_keep, active), new_state, z_state)
        z = _keep(active, optax.apply_updates(z, z_updates), z)
        return z, z_state, per_doc

    return step


def _replicated_tree(tree: Any, mesh) -> Any:
    return jax.tree.map(lambda _: replicated(mesh), tree)


def jit_joint_step(step, mesh, params, inventory, inv_state, z, z_state, batch):
    """Jit the joint step on `mesh`: documents (routing table, its state, the batch) over `data`,
    inventory and its optimizer state replicated, base params as `param_shardings`; everything
    trained is donated."""
    inv_sh, inv_state_sh = _replicated_tree(inventory, mesh), _replicated_tree(inv_state, mesh)
    z_sh, z_state_sh = doc_shardings(z, mesh), doc_shardings(z_state, mesh)
    return jax.jit(
        step,
        in_shardings=(param_shardings(params, mesh), inv_sh, inv_state_sh, z_sh, z_state_sh,
                      doc_shardings(batch, mesh)),
        out_shardings=(inv_sh, inv_state_sh, z_sh, z_state_sh, doc_sharding(mesh, 1)),
        donate_argnums=(1, 2, 3, 4),
    )


def jit_routing_step(step, mesh, params, inventory, z, z_state, batch):
    """Jit the Poly-z step on `mesh`: rows and batch over `data`, the (read-only, not donated)
    inventory replicated; rows and their optimizer state donated."""
    z_sh, z_state_sh = doc_shardings(z, mesh), doc_shardings(z_state, mesh)
    return jax.jit(
        step,
        in_shardings=(param_shardings(params, mesh), _replicated_tree(inventory, mesh), z_sh, z_state_sh,
                      doc_shardings(batch, mesh)),
        out_shardings=(z_sh, z_state_sh, doc_sharding(mesh, 1)),
        donate_argnums=(2, 3),
    )


__all__ = [
    "inventory_optimizer", "routing_optimizer", "init_routing_state", "batch_weights", "poly_losses",
    "make_joint_step", "make_routing_step", "jit_joint_step", "jit_routing_step",
]
