"""The translator's training objective.

Per document d, with one of its PRAG training samples:

    loss_d = λ_lm · LM(student) + λ_kl · KL(teacher ‖ student) + λ_mse · MSE(student, teacher)

* student = base model + the translated LoRA of d; teacher = base model + d's trained PRAG LoRA;
* LM: mean next-token cross-entropy of the student over the sample's target positions (the
  PRAG loss, `jprag.train.stacked.chunked_lm_loss`'s definition);
* KL: Σ_v p_teacher (log p_teacher − log p_student) per target position, averaged over the same
  positions as LM (the published code sums over a 3000-token padded sequence instead);
* MSE, "factors" (default, published): Σ over (target, layer) of mean((Â − A)²) + mean((B̂ − B)²)
  on the raw factors. Meaningful because the training adapters all start from one initial A
  (`jprag.translator.pairs`): the trained factors differ only by what the documents taught.
  "delta": ‖ΔŴ − ΔW‖² / ‖ΔW‖² pooled over targets and layers, ΔW = s·A·B, computed from r×r
  Gram matrices (‖A₁B₁ − A₂B₂‖² = Σ (A₁ᵀA₁∘B₁B₁ᵀ) − 2 Σ (A₁ᵀA₂∘B₁B₂ᵀ) + Σ (A₂ᵀA₂∘B₂B₂ᵀ)),
  so ΔW is never formed: unitless (1 = translating nothing) and invariant to how a LoRA factors
  (A M, M⁻¹ B), i.e. it compares what the adapters do, not how they are written.

The step loss is the mean of loss_d over the step's active documents.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from jprag.lora.adapters import Bank, LoraConfig, applied
from jprag.model.config import ModelConfig
from jprag.model.transformer import forward, lm_head, positions_from_mask
from jprag.translator.config import TranslatorConfig
from jprag.translator.hypernet import Translator, TranslatorSpec, translate

Array = jax.Array


def chunked_lm_kl(cfg: ModelConfig, params, student_bsd: Array, teacher_bsd: Array | None, tokens_bs: Array,
                  loss_mask_bs: Array, chunk: int = 512) -> tuple[Array, Array]:
    """Per-row `(LM [B], KL [B])` from final hidden states, never holding all `[tokens, vocab]` logits.

    As `chunked_lm_loss`, tokens are processed in chunks under `jax.checkpoint`; each chunk's
    student and teacher logits are formed once for both terms. `teacher_bsd` None → KL = 0.
    """
    B, S, d = student_bsd.shape
    n = B * (S - 1)
    hs = student_bsd[:, :-1].reshape(n, d)
    ht = None if teacher_bsd is None else jax.lax.stop_gradient(teacher_bsd[:, :-1].reshape(n, d))
    target = tokens_bs[:, 1:].reshape(n)
    chunk = min(chunk, n)
    pad = (-n) % chunk
    hs = jnp.pad(hs, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    target = jnp.pad(target, (0, pad)).reshape(-1, chunk)
    if ht is not None:
        ht = jnp.pad(ht, ((0, pad), (0, 0))).reshape(-1, chunk, d)

    @jax.checkpoint
    def per_token(args):
        h_cd, t_c, ht_cd = args
        logp_s = jax.nn.log_softmax(lm_head(cfg, params, h_cd), axis=-1)
        nll = -jnp.take_along_axis(logp_s, t_c[:, None], axis=-1)[:, 0]
        if ht_cd is None:
            return nll, jnp.zeros_like(nll)
        logp_t = jax.nn.log_softmax(lm_head(cfg, params, ht_cd), axis=-1)
        kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
        return nll, kl

    nll, kl = jax.lax.map(per_token, (hs, target, ht))
    w_bs = loss_mask_bs[:, 1:].astype(jnp.float32)
    denom_b = jnp.maximum(jnp.sum(w_bs, axis=-1), 1.0)
    nll_bs, kl_bs = (x.reshape(-1)[:n].reshape(B, S - 1) for x in (nll, kl))
    return jnp.sum(nll_bs * w_bs, -1) / denom_b, jnp.sum(kl_bs * w_bs, -1) / denom_b


def delta_sq_error(a1: Array, b1: Array, a2: Array, b2: Array) -> tuple[Array, Array]:
    """`(‖A₁B₁ − A₂B₂‖², ‖A₂B₂‖²)` summed over all leading axes but the first: a `[N, ..., in, r]`,
    b `[N, ..., r, out]` → two `[N]` arrays. Gram matrices only; ΔW is never formed."""
    def inner(a_x, b_x, a_y, b_y):  # Σ ⟨A_x B_x, A_y B_y⟩ over the non-leading axes, per row
        g_a = jnp.einsum("n...ir,n...is->n...rs", a_x, a_y)
        g_b = jnp.einsum("n...ro,n...so->n...rs", b_x, b_y)
        return jnp.sum((g_a * g_b).reshape(g_a.shape[0], -1), axis=-1)

    teacher = inner(a2, b2, a2, b2)
    err = inner(a1, b1, a1, b1) - 2.0 * inner(a1, b1, a2, b2) + teacher
    return jnp.maximum(err, 0.0), teacher


def mse_term(kind: str, student: Bank, teacher: Bank) -> Array:
    """Per-document MSE `[N]` between translated and trained factors (see the module docstring)."""
    if kind == "delta":
        errs, refs = zip(*(delta_sq_error(student[t]["a"], student[t]["b"], teacher[t]["a"], teacher[t]["b"])
                           for t in sorted(teacher)))
        err, ref = sum(errs), sum(refs)
        # a teacher with ΔW = 0 (a padding row) has no relative error: 0, and no 0/0 in the gradient
        return jnp.where(ref > 0, err / jnp.where(ref > 0, ref, 1.0), 0.0)
    if kind == "factors":
        total = 0.0
        for t in sorted(teacher):
            for k in ("a", "b"):
                sq = (student[t][k] - teacher[t][k]) ** 2  # [N, L, x, y]
                total = total + jnp.sum(jnp.mean(sq, axis=(-2, -1)), axis=-1)  # mean per matrix, Σ over layers
        return total
    raise ValueError(f"[translator] mse must be 'delta' or 'factors', got {kind!r}")


def translator_loss(cfg: ModelConfig, lora: LoraConfig, tcfg: TranslatorConfig, spec: TranslatorSpec, params,
                    translator: Translator, batch: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
    """`(loss, metrics)` of one step. batch: `tokens`, `attn_mask`, `loss_mask` [D, S] (one PRAG
    sample per document, right padded), `active` [D] (0 = padding row), `emb` [D, E], `teacher`
    `{target: {"a": [D, L, in, r], "b": [D, L, r, out]}}` (the documents' trained factors)."""
    student = translate(spec, translator, batch["emb"])
    teacher = batch["teacher"]
    tokens, attn = batch["tokens"], batch["attn_mask"]
    positions = positions_from_mask(attn)
    mask = batch["loss_mask"] * attn
    zero = jnp.zeros(tokens.shape[:1], jnp.float32)
    lm, kl = zero, zero
    if tcfg.lambda_lm or tcfg.lambda_kl:
        # one adapter per row: the translated LoRA of each document
        h_s, _ = forward(cfg, params, tokens, positions, adapters=applied(student, lora.scale), output="hidden")
        h_t = None
        if tcfg.lambda_kl:
            h_t, _ = forward(cfg, params, tokens, positions, adapters=applied(teacher, lora.scale), output="hidden")
        lm, kl = chunked_lm_kl(cfg, params, h_s, h_t, tokens, mask)
    mse = mse_term(tcfg.mse, student, teacher) if tcfg.lambda_mse else zero
    per_doc = tcfg.lambda_lm * lm + tcfg.lambda_kl * kl + tcfg.lambda_mse * mse
    active = batch["active"].astype(jnp.float32)
    n = jnp.maximum(jnp.sum(active), 1.0)
    mean = lambda x: jnp.sum(x * active) / n  # noqa: E731
    loss = mean(per_doc)
    return loss, {"loss": loss, "lm": mean(lm), "kl": mean(kl), "mse": mean(mse)}
