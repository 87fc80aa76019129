"""The stacked training step: many per-document LoRAs, one compiled program.

`vmap` of the per-document loss over the document axis (base params broadcast), summed, then
differentiated: the gradient of `Σ_d loss_d` w.r.t. row d of the bank is ∇ loss_d alone.
The optimizer is `vmap`ped too, so its state — including Adam's step count — is per document,
and a document whose row is inactive this step keeps its adapter *and* optimizer state
bit-identical. There is no cross-document coupling anywhere (no global-norm clipping): training
D documents together is mathematically D independent runs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jprag.lora.adapters import Bank, LoraConfig, applied
from jprag.mesh import doc_sharding, doc_shardings, param_shardings
from jprag.model.config import ModelConfig
from jprag.model.transformer import forward, lm_head, positions_from_mask

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer and schedule of the per-document encoder (PRAG defaults)."""

    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    epochs: int = 1
    # Memory budget of one stacked step: documents per chunk are capped so that
    # D × (longest bucketed sample) stays under this many tokens. Activations of the frozen
    # model dominate memory (about 1.5 MB per token for SmolLM2-135M in fp32 without remat).
    max_tokens_per_step: int = 4096

    def optimizer(self) -> optax.GradientTransformation:
        return optax.adamw(self.learning_rate, self.b1, self.b2, self.eps, weight_decay=self.weight_decay)


def lm_loss(logits_bsv: Array, tokens_bs: Array, loss_mask_bs: Array) -> Array:
    """Mean next-token cross-entropy over target positions (`loss_mask[t] = 1`: token t is a target)."""
    logp = jax.nn.log_softmax(logits_bsv[:, :-1].astype(jnp.float32), axis=-1)
    target = tokens_bs[:, 1:]
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    w = loss_mask_bs[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def chunked_lm_loss(cfg: ModelConfig, params, hidden_bsd: Array, tokens_bs: Array, loss_mask_bs: Array,
                    chunk: int = 1024) -> Array:
    """`lm_loss` from final hidden states without materialising all `[tokens, vocab]` logits.

    Tokens are processed in chunks under `jax.checkpoint`, so the forward and the backward each
    hold one chunk's logits (`chunk × vocab` floats) instead of the whole sequence's; the price
    is recomputing each chunk's head matmul in the backward pass.
    """
    d = hidden_bsd.shape[-1]
    h = hidden_bsd[:, :-1].reshape(-1, d)
    target = tokens_bs[:, 1:].reshape(-1)
    w = loss_mask_bs[:, 1:].reshape(-1).astype(jnp.float32)
    n = h.shape[0]
    chunk = min(chunk, n)
    pad = (-n) % chunk
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    target = jnp.pad(target, (0, pad)).reshape(-1, chunk)

    @jax.checkpoint
    def nll(args):
        h_cd, t_c = args
        logits = lm_head(cfg, params, h_cd)
        return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]

    nll_n = jax.lax.map(nll, (h, target)).reshape(-1)[:n]
    return jnp.sum(nll_n * w) / jnp.maximum(jnp.sum(w), 1.0)


def doc_loss(cfg: ModelConfig, scale: float, params, adapter: Mapping, batch: Mapping[str, Array]) -> Array:
    """Loss of ONE document's adapter on its sequences `tokens [n, S]` (right padded)."""
    positions = positions_from_mask(batch["attn_mask"])
    hidden, _ = forward(cfg, params, batch["tokens"], positions, adapters=applied(adapter, scale), output="hidden")
    return chunked_lm_loss(cfg, params, hidden, batch["tokens"], batch["loss_mask"] * batch["attn_mask"])


def stacked_loss(cfg: ModelConfig, scale: float, params, bank: Bank, batch: Mapping[str, Array]):
    """`(Σ_d loss_d, loss [D])` for a bank `[D, ...]` and a batch `tokens [D, n, S]`."""
    per_doc = jax.vmap(functools.partial(doc_loss, cfg, scale), in_axes=(None, 0, 0))(params, bank, batch)
    per_doc = per_doc * batch["active"]
    return jnp.sum(per_doc), per_doc


def init_opt_state(optimizer: optax.GradientTransformation, bank: Bank):
    """Per-document optimizer state: every leaf (and Adam's count) gets the document axis."""
    return jax.vmap(optimizer.init)(bank)


def make_train_step(
    cfg: ModelConfig, lora: LoraConfig, optimizer: optax.GradientTransformation
) -> Callable[..., tuple[Bank, Any, Array]]:
    """`step(params, bank, opt_state, batch) -> (bank, opt_state, loss [D])` (not yet jitted).

    batch: `tokens`, `attn_mask`, `loss_mask` [D, n, S] and `active` [D] (0 = leave the row alone).
    """

    def step(params, bank, opt_state, batch):
        grads, per_doc = jax.grad(
            lambda b: stacked_loss(cfg, lora.scale, params, b, batch), has_aux=True
        )(bank)
        updates, new_opt = jax.vmap(optimizer.update)(grads, opt_state, bank)
        new_bank = optax.apply_updates(bank, updates)
        active = batch["active"].astype(bool)

        def keep_inactive(new, old):
            mask = active.reshape(active.shape + (1,) * (new.ndim - 1))
            return jnp.where(mask, new, old)

        new_bank = jax.tree.map(keep_inactive, new_bank, bank)
        new_opt = jax.tree.map(keep_inactive, new_opt, opt_state)
        return new_bank, new_opt, per_doc

    return step


def jit_train_step(step, mesh, params, bank, opt_state, batch):
    """Jit `step` with explicit shardings on `mesh`: documents over `data`, base params as
    `param_shardings`; the bank and optimizer state are donated (updated in place)."""
    p_sh = param_shardings(params, mesh)
    b_sh, o_sh, x_sh = doc_shardings(bank, mesh), doc_shardings(opt_state, mesh), doc_shardings(batch, mesh)
    return jax.jit(
        step,
        in_shardings=(p_sh, b_sh, o_sh, x_sh),
        out_shardings=(b_sh, o_sh, doc_sharding(mesh, 1)),
        donate_argnums=(1, 2),
    )


__all__ = [
    "TrainConfig",
    "lm_loss",
    "chunked_lm_loss",
    "doc_loss",
    "stacked_loss",
    "init_opt_state",
    "make_train_step",
    "jit_train_step",
]
