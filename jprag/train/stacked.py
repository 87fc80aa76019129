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
from jprag.model.transformer import forward, lm_head, positions_from_mask, weight_matmul

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
    # model dominate memory: the process peaks at about 3.5 MB per token for SmolLM2-135M in
    # fp32 without remat (7.3 GB at 2048 tokens), and larger steps are not faster on a CPU.
    max_tokens_per_step: int = 2048

    def optimizer(self) -> optax.GradientTransformation:
        return optax.adamw(self.learning_rate, self.b1, self.b2, self.eps, weight_decay=self.weight_decay)


def lm_loss(logits_bsv: Array, tokens_bs: Array, loss_mask_bs: Array) -> Array:
    """Mean next-token cross-entropy over target positions (`loss_mask[t] = 1`: token t is a target)."""
    logp = jax.nn.log_softmax(logits_bsv[:, :-1].astype(jnp.float32), axis=-1)
    target = tokens_bs[:, 1:]
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    w = loss_mask_bs[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def _head_matrix(cfg: ModelConfig, params) -> tuple[Array, str]:
    """The output projection and the einsum that applies it to `[rows, d]` hidden states."""
    if cfg.tie_embeddings:
        return params["embed"], "cd,vd->cv"
    return params["lm_head"], "cd,dv->cv"


def _nll_fwd(cfg: ModelConfig, w, h_cd: Array, t_c: Array):
    """Next-token NLL of one chunk of rows, and the residuals its backward pass needs."""
    w_mat, spec = _head_matrix(cfg, {"embed": w, "lm_head": w})
    z_cv = weight_matmul(spec, h_cd, w_mat, cfg.matmul_dtype).astype(jnp.float32)
    cap = cfg.final_logit_softcap
    th_cv = jnp.tanh(z_cv / cap) if cap else None
    logits_cv = th_cv * cap if cap else z_cv
    m_c1 = jnp.max(logits_cv, axis=-1, keepdims=True)
    e_cv = jnp.exp(logits_cv - m_c1)
    s_c1 = jnp.sum(e_cv, axis=-1, keepdims=True)
    target_c = jnp.take_along_axis(logits_cv, t_c[:, None], axis=-1)[:, 0]
    nll_c = (m_c1[:, 0] + jnp.log(s_c1[:, 0])) - target_c
    return nll_c, (e_cv / s_c1, th_cv, h_cd, w, t_c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def chunk_nll(cfg: ModelConfig, w, h_cd: Array, t_c: Array) -> Array:
    """`-log softmax(lm_head(h))[t]` per row; `w` is the head matrix (`embed` when tied).

    The backward pass reuses the softmax saved by the forward (`(p - onehot) @ W`), so the
    `[rows, vocab]` logits cost one matmul and one `exp` pass forward and one matmul backward;
    recomputing them under `jax.checkpoint` costs a second matmul and `exp` over the whole
    vocabulary, the largest single item of a small model's training step. The head matrix is
    frozen: its cotangent is zero.
    """
    return _nll_fwd(cfg, w, h_cd, t_c)[0]


def _nll_bwd(cfg: ModelConfig, res, g_c: Array):
    p_cv, th_cv, h_cd, w, t_c = res
    onehot_cv = jax.lax.broadcasted_iota(jnp.int32, p_cv.shape, 1) == t_c[:, None]
    dz_cv = (p_cv - onehot_cv.astype(p_cv.dtype)) * g_c[:, None]
    if th_cv is not None:
        dz_cv = dz_cv * (1.0 - th_cv * th_cv)
    spec = "cv,vd->cd" if cfg.tie_embeddings else "cv,dv->cd"
    dh_cd = weight_matmul(spec, dz_cv.astype(h_cd.dtype), w, cfg.matmul_dtype)
    return jnp.zeros_like(w), dh_cd, None


chunk_nll.defvjp(lambda cfg, w, h, t: _nll_fwd(cfg, w, h, t), _nll_bwd)


def token_nll(cfg: ModelConfig, params, hidden_ntd: Array, targets_nt: Array, rows_per_chunk: int = 256) -> Array:
    """Per-token NLL `[n, t]` of `targets` under `lm_head(hidden)`, without all logits at once.

    Positions are processed in chunks of `rows_per_chunk // n` positions across the leading
    axis (`lax.map`), so one chunk's `[rows, vocab]` logits and softmax are live at a time and
    the leading axis (documents, sharded over the mesh) is never mixed with positions.
    """
    n, t, d = hidden_ntd.shape
    c = max(1, min(t, rows_per_chunk // max(n, 1)))
    pad = (-t) % c
    h = jnp.pad(hidden_ntd, ((0, 0), (0, pad), (0, 0))).reshape(n, -1, c, d).swapaxes(0, 1)
    tg = jnp.pad(targets_nt, ((0, 0), (0, pad))).reshape(n, -1, c).swapaxes(0, 1)
    w = params["embed"] if cfg.tie_embeddings else params["lm_head"]

    def one(args):
        h_ncd, t_nc = args
        return chunk_nll(cfg, w, h_ncd.reshape(-1, d), t_nc.reshape(-1)).reshape(n, c)

    nll = jax.lax.map(one, (h, tg))  # [chunks, n, c]
    return nll.swapaxes(0, 1).reshape(n, -1)[:, :t]


def chunked_lm_loss(cfg: ModelConfig, params, hidden_bsd: Array, tokens_bs: Array, loss_mask_bs: Array,
                    chunk: int = 256) -> Array:
    """`lm_loss` from final hidden states without materialising all `[tokens, vocab]` logits
    (`token_nll` with `chunk` rows per chunk)."""
    nll = token_nll(cfg, params, hidden_bsd[:, :-1], tokens_bs[:, 1:], chunk)
    w = loss_mask_bs[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def doc_hidden(cfg: ModelConfig, scale: float, params, adapter: Mapping, batch: Mapping[str, Array]) -> Array:
    """Final hidden states `[n, S, d]` of ONE document's sequences under its adapter."""
    positions = positions_from_mask(batch["attn_mask"])
    hidden, _ = forward(cfg, params, batch["tokens"], positions, adapters=applied(adapter, scale), output="hidden")
    return hidden


def doc_loss(cfg: ModelConfig, scale: float, params, adapter: Mapping, batch: Mapping[str, Array]) -> Array:
    """Loss of ONE document's adapter on its sequences `tokens [n, S]` (right padded)."""
    hidden = doc_hidden(cfg, scale, params, adapter, batch)
    return chunked_lm_loss(cfg, params, hidden, batch["tokens"], batch["loss_mask"] * batch["attn_mask"])


def doc_losses(cfg: ModelConfig, scale: float, params, bank: Bank, batch: Mapping[str, Array],
               rows_per_chunk: int = 512) -> Array:
    """`[D]` losses, `doc_loss` of each row of `bank` on its row of `batch` (`tokens [D, n, S]`).

    The transformer is `vmap`ped over documents; the loss head runs once over all documents'
    positions (`token_nll`), so its chunks are `rows_per_chunk` rows however many documents
    there are, instead of one chunk per document under `vmap`.
    """
    hidden = jax.vmap(functools.partial(doc_hidden, cfg, scale), in_axes=(None, 0, 0))(params, bank, batch)
    D, n, S, d = hidden.shape
    tokens = batch["tokens"]
    nll = token_nll(cfg, params, hidden[:, :, :-1].reshape(D, n * (S - 1), d),
                    tokens[:, :, 1:].reshape(D, n * (S - 1)), rows_per_chunk)
    w = (batch["loss_mask"] * batch["attn_mask"])[:, :, 1:].reshape(D, -1).astype(jnp.float32)
    return jnp.sum(nll * w, axis=-1) / jnp.maximum(jnp.sum(w, axis=-1), 1.0)


def stacked_loss(cfg: ModelConfig, scale: float, params, bank: Bank, batch: Mapping[str, Array]):
    """`(Σ_d loss_d, loss [D])` for a bank `[D, ...]` and a batch `tokens [D, n, S]`."""
    per_doc = doc_losses(cfg, scale, params, bank, batch) * batch["active"]
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
    "chunk_nll",
    "token_nll",
    "chunked_lm_loss",
    "doc_hidden",
    "doc_loss",
    "doc_losses",
    "stacked_loss",
    "init_opt_state",
    "make_train_step",
    "jit_train_step",
]
