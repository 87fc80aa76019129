"""Configuration of Poly-PRAG (a shared inventory of latent LoRAs mixed per document).

The `[poly]` section of a run config. One frozen dataclass covers both phases:

* joint training (Poly-PRAG): the inventory of `n_skills` LoRAs and one routing row per document
  are trained together over every document's PRAG samples (`epochs`, `batch_docs` documents a
  step, AdamW `learning_rate` on the inventory, Adam `routing_learning_rate` on the rows);
* Poly-z-PRAG: a trained inventory is frozen and only the new documents' rows are trained
  (`z_epochs`, `chunk_size` documents stacked per step, the same routing optimizer).

Routing. A document's routing logits are `Z [layers, M]` (`per_layer=True`: each layer mixes the
inventory with its own weights, as Polytropon's per-module allocation) or `Z [1, M]`
(`per_layer=False`: one mixture shared by every layer), always shared by the targets of a layer.
Training weights are the Gumbel-sigmoid relaxation `sigmoid((z + logistic noise) / τ)`, with τ
annealed geometrically from `tau_start` to `tau_end` over each document's own training
progress; evaluation weights are the deterministic `sigmoid(z)`. Both are normalised over the M
skills (they sum to 1). `routing="uniform"` replaces them by 1/M and trains only the inventory
(the ablation "uniform routing instead of learned").

Mixing is merge-before: `A_d = Σ_m w_m A_m`, `B_d = Σ_m w_m B_m` per layer and target, and the
document's delta is `(alpha / rank) · A_d B_d` — the ordinary LoRA scale, applied once to the
mixed pair (a one-hot routing is exactly plain LoRA with that skill's factors).

Answering. A question's adapter combines its top-k documents' mixed adapters like PRAG's
(`merge = "sum"`, ΔW = Σ_i s·B_i A_i) or averages them (`merge = "mean"`, Σ/k). Every Poly-PRAG
document is a mixture of one inventory, so the sum tends to k times one adapter; "mean" is the
ablation. It changes answering only, never training.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jprag.lora.adapters import ALL_TARGETS, FFN_TARGETS, MERGE_MODES, LoraConfig

ROUTING_MODES = ("learned", "uniform")


@dataclasses.dataclass(frozen=True)
class PolyConfig:
    """Poly-PRAG / Poly-z-PRAG settings (the `[poly]` section of a run config)."""

    n_skills: int = 20  # M latent LoRAs in the inventory
    rank: int = 4  # rank of every inventory LoRA (and so of each document's mixed adapter)
    alpha: float = 32.0  # LoRA scale = alpha / rank, applied to the mixed pair
    targets: tuple[str, ...] = FFN_TARGETS
    per_layer: bool = True  # routing logits [layers, M] per document (False: [1, M], shared by layers)
    routing: str = "learned"  # "learned" | "uniform" (weights fixed at 1/M, routing not trained)
    init_logit: float = 1e-3  # routing logits start ~ U(-init_logit, init_logit): near-uniform weights
    tau_start: float = 1.0  # Gumbel-sigmoid temperature at the start of a document's training ...
    tau_end: float = 0.5  # ... and at its end (geometric interpolation)
    learning_rate: float = 1e-3  # inventory (AdamW)
    weight_decay: float = 0.01  # inventory only: decay would bias the routing logits towards uniform
    routing_learning_rate: float = 0.1  # routing rows (Adam, per row): logits move ~lr per step
    epochs: int = 2  # joint training passes over every document's samples
    z_epochs: int = 2  # Poly-z passes over a new document's samples (routing only)
    batch_docs: int = 8  # joint training: documents per step (one sample each)
    chunk_size: int = 32  # Poly-z: documents stacked per step (independent rows)
    # Memory budget of one step, as `TrainConfig.max_tokens_per_step` (same default): documents
    # per step are capped so that documents × (longest bucketed sample) stays under this many
    # tokens (about 3.5 MB of activations per token for SmolLM2-135M in fp32).
    max_tokens_per_step: int = 2048
    checkpoint_every: int = 50  # joint training steps between resumable checkpoints
    merge: str = "sum"  # answering: top-k documents' adapters summed (PRAG) or averaged ("mean")
    seed: int = 0

    def __post_init__(self):
        def fail(field: str, expected: str):
            raise ValueError(f"[poly] {field} must be {expected}, got {getattr(self, field)!r}")

        ints = {"n_skills": 1, "rank": 1, "epochs": 1, "z_epochs": 1, "batch_docs": 1, "chunk_size": 1,
                "max_tokens_per_step": 1, "checkpoint_every": 1, "seed": 0}
        for field, low in ints.items():
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                fail(field, f"an integer >= {low}")
        positive = ("alpha", "tau_start", "tau_end", "learning_rate", "routing_learning_rate")
        for field in positive:
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                fail(field, "a number > 0")
        for field in ("weight_decay", "init_logit"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                fail(field, "a number >= 0")
        if not isinstance(self.per_layer, bool):
            fail("per_layer", "true or false")
        if self.routing not in ROUTING_MODES:
            fail("routing", f"one of {ROUTING_MODES}")
        if self.merge not in MERGE_MODES:
            fail("merge", f"one of {MERGE_MODES}")
        targets = self.targets
        if isinstance(targets, str) or not targets or any(t not in ALL_TARGETS for t in targets):
            fail("targets", f"a non-empty list of projections from {ALL_TARGETS}")
        object.__setattr__(self, "targets", tuple(targets))

    @property
    def lora(self) -> LoraConfig:
        """The LoRA shape of one inventory skill (and of a document's mixed adapter)."""
        return LoraConfig(rank=self.rank, alpha=float(self.alpha), targets=self.targets)

    @property
    def scale(self) -> float:
        return self.lora.scale

    @property
    def has_rows(self) -> bool:
        """Whether a document's routing row is a parameter (uniform routing ignores the rows,
        so a document then stores nothing of its own)."""
        return self.routing != "uniform"

    def routing_layers(self, n_layers: int) -> int:
        """Rows of a document's routing logits: `n_layers` (per layer) or 1 (shared)."""
        return n_layers if self.per_layer else 1

    def step_key(self) -> tuple:
        """The fields the compiled training steps depend on (a cache key: epochs, chunking and
        checkpointing change the schedule, not the step)."""
        return tuple(getattr(self, f) for f in STEP_FIELDS)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"targets": list(self.targets)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "PolyConfig":
        return cls(**{**d, "targets": tuple(d["targets"])})


# Fields that change what the joint phase (inventory + rows) or the Poly-z phase (new rows
# against a frozen inventory) computes: a resume must agree on them; the others are free. Poly-z
# rows train independently, so its chunking (chunk_size, max_tokens_per_step, the mesh) is free:
# a resume re-plans the unfinished rows (`jprag.train.encoder.resume_chunks`).
JOINT_FIELDS = ("n_skills", "rank", "alpha", "targets", "per_layer", "routing", "init_logit", "tau_start",
                "tau_end", "learning_rate", "weight_decay", "routing_learning_rate", "epochs", "batch_docs",
                "max_tokens_per_step", "seed")
Z_FIELDS = ("n_skills", "rank", "alpha", "targets", "per_layer", "routing", "init_logit", "tau_start", "tau_end",
            "routing_learning_rate", "z_epochs", "seed")
STEP_FIELDS = ("n_skills", "rank", "alpha", "targets", "per_layer", "routing", "tau_start", "tau_end",
               "learning_rate", "weight_decay", "routing_learning_rate", "seed")
