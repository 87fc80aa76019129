"""Configuration of the DyPRAG parameter translator (document embedding → LoRA).

Defaults follow the published DyPRAG recipe where it has one (hidden width p = 32, λ_kl = 0.01,
λ_mse = 100, mean-combination of the top-k translated adapters); the rest are jprag's choices,
explained in `jprag.translator` and the README.
"""

from __future__ import annotations

import dataclasses

MSE_KINDS = ("delta", "factors")
COMBINE_MODES = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class TranslatorConfig:
    """DyPRAG settings (the `[translator]` section of a run config).

    Architecture: `hidden` (p, the MLP width), `embedding` (a key of
    `jprag.translator.embed.EMBEDDERS`: "last" = the base model's final-norm hidden state at the
    passage's last token, as published; "mean" = mean over the passage's tokens), `embed_max_len`
    (passage tokens the embedder reads), `out_init_std` (init std of the generators' output
    layers, in units of the training adapters: tiny, so a fresh translator emits the mean
    training adapter, see `jprag.translator.hypernet`).

    Objective: `lambda_lm`·LM + `lambda_kl`·KL(teacher‖student) + `lambda_mse`·MSE, with `mse`
    "factors" (published: Σ over (target, layer) of the mean squared error of raw A and of raw
    B; the training adapters share one initial A, `jprag.translator.pairs`) or "delta" (relative
    squared error of ΔW = s·A·B, from r×r Gram matrices: unitless and invariant to how a LoRA
    factors).

    Training: AdamW (`learning_rate`, `weight_decay`) for `epochs` passes over the training
    documents, `batch_docs` documents per step (one PRAG sample each; a step's documents are
    capped so that documents × longest sample ≤ `max_tokens_per_step`), `samples_per_doc` PRAG
    samples per document and epoch (0 = all), a checkpoint every `checkpoint_every` steps, `seed`
    for the initialisation and the document order.

    Inference: `combine` "mean" (the published mean of the top-k documents' A's and of their
    B's) or "sum" (sum of the translated deltas, rank-concatenated like PRAG). `folds`: k-fold
    cross-fitting when a run has no held-out documents (the bundled sample). `path`: a translator
    trained by `jprag translator train` to use instead of training one in the run.
    """

    hidden: int = 32
    embedding: str = "last"
    embed_max_len: int = 512
    out_init_std: float = 1e-7
    lambda_lm: float = 1.0
    lambda_kl: float = 0.01
    lambda_mse: float = 100.0
    mse: str = "factors"
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    epochs: int = 2
    batch_docs: int = 4
    samples_per_doc: int = 0
    max_tokens_per_step: int = 4096
    checkpoint_every: int = 50
    combine: str = "mean"
    folds: int = 2
    seed: int = 0
    path: str | None = None

    def __post_init__(self):
        def bad(field: str, expected: str):
            raise ValueError(f"[translator] {field} must be {expected}, got {getattr(self, field)!r}")

        for field in ("hidden", "embed_max_len", "epochs", "batch_docs", "max_tokens_per_step", "checkpoint_every"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(field, "a positive integer")
        spd = self.samples_per_doc
        if isinstance(spd, bool) or not isinstance(spd, int) or spd < 0:
            bad("samples_per_doc", "an integer >= 0 (0 = all of a document's PRAG samples)")
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            bad("folds", "an integer >= 2")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            bad("seed", "an integer")
        for field in ("lambda_lm", "lambda_kl", "lambda_mse", "weight_decay", "out_init_std"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:  # rejects nan
                bad(field, "a number >= 0")
        if isinstance(self.learning_rate, bool) or not isinstance(self.learning_rate, (int, float)) \
                or not self.learning_rate > 0:
            bad("learning_rate", "a number > 0")
        if self.lambda_lm == 0 and self.lambda_kl == 0 and self.lambda_mse == 0:
            raise ValueError("[translator] lambda_lm, lambda_kl and lambda_mse are all 0: nothing to train")
        if self.mse not in MSE_KINDS:
            bad("mse", f"one of {MSE_KINDS}")
        if self.combine not in COMBINE_MODES:
            bad("combine", f"one of {COMBINE_MODES}")
        if not isinstance(self.embedding, str) or not self.embedding:
            bad("embedding", "the name of a registered embedder (jprag.translator.embed.EMBEDDERS)")
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            bad("path", "a directory written by `jprag translator train`, or absent")

    # Fields that change what a trained translator is; the rest (combine, folds, path) only
    # change how one is used. A checkpoint resumes only when these match.
    TRAINING_FIELDS = ("hidden", "embedding", "embed_max_len", "out_init_std", "lambda_lm", "lambda_kl",
                       "lambda_mse", "mse", "learning_rate", "weight_decay", "epochs", "batch_docs",
                       "samples_per_doc", "max_tokens_per_step", "seed")

    def training_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.TRAINING_FIELDS}
