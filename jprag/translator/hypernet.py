"""The parameter translator: for every (target module, layer) a small MLP from the document
embedding (plus the layer index) to that layer's LoRA factors A and B.

As published (DyPRAG), each (module, layer) has its own two-layer ReLU MLPs without biases,
one generating A and one generating B: `A = reshape(W2ᴬ · relu(W1ᴬ · [x; λ_l]))`, likewise B,
where x is the document embedding and λ_l the layer's index feature. Here the MLPs of every
layer, and of every target module whose projection has the same shape (gate and up of the FFN),
are *stacked* on leading `[modules, layers]` axes and applied with `vmap`, so a whole adapter is
a handful of batched matmuls per distinct projection shape, never a Python loop over modules
or layers.

jprag's choices (see the README):

* Input. The embedding is centred on the training documents' mean embedding and divided by
  their RMS distance from it. Final hidden states of different passages share a large common
  component (most passages end in a full stop); centring leaves the part that tells documents
  apart, and the scale makes the first layer's initialisation independent of the base model's
  hidden-state magnitude.
* Output. Each generator predicts its factor in units of the training adapters: per (target,
  layer), `A = mean_A + std_A · MLP_A(x)` with the training documents' mean factor and the RMS
  of their deviation from it (likewise B). A's and B's deviations then have the same O(1)
  scale, so one Adam learning rate suits both (raw B's are ~20x smaller than A's), and with the
  tiny output initialisation (`out_init_std`) a fresh translator emits the mean training
  adapter: A ≠ 0, so gradients reach B from the first step (with both factors ≈ 0 every loss
  term would start at the bilinear saddle ΔW = 0, where its gradient vanishes).
* Layer index feature λ_l = (l + 1) / L: in (0, 1], so every layer's bias-free first layer gets
  a constant input (the published raw index is 0 for layer 0 and up to L - 1 elsewhere).
* The statistics (`fit_stats`) are stored with the translator and never trained.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jprag.lora.adapters import Bank, LoraConfig, merge_topk
from jprag.model.config import ModelConfig

Array = jax.Array
# {"stats": {"emb": {"mean": [E], "scale": []},
#            "out": {target: {"a_mean": [L, in, r], "a_std": [L], "b_mean": [L, r, out], "b_std": [L]}}},
#  "mlp": {group: {"a1": [M, L, E+1, p], "a2": [M, L, p, in·r], "b1": [M, L, E+1, p], "b2": [M, L, p, r·out]}}}
Translator = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TranslatorSpec:
    """Static shape of a translator: embedding width, layers, LoRA rank, MLP width, and the
    target groups `((targets, in, out), ...)` — targets sharing a projection shape are stacked."""

    emb_dim: int
    n_layers: int
    rank: int
    hidden: int
    groups: tuple[tuple[tuple[str, ...], int, int], ...]

    @classmethod
    def create(cls, cfg: ModelConfig, lora: LoraConfig, emb_dim: int, hidden: int) -> "TranslatorSpec":
        proj = cfg.projection_shapes()
        by_shape: dict[tuple[int, int], list[str]] = {}
        for t in sorted(lora.targets):
            by_shape.setdefault(tuple(proj[t]), []).append(t)
        groups = tuple((tuple(ts), i, o) for (i, o), ts in sorted(by_shape.items(), key=lambda kv: kv[1]))
        return cls(int(emb_dim), cfg.n_layers, lora.rank, int(hidden), groups)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(sorted(t for ts, _, _ in self.groups for t in ts))

    @staticmethod
    def group_name(targets: tuple[str, ...]) -> str:
        return "+".join(targets)

    def to_json(self) -> dict[str, Any]:
        return {"emb_dim": self.emb_dim, "n_layers": self.n_layers, "rank": self.rank, "hidden": self.hidden,
                "groups": [[list(ts), i, o] for ts, i, o in self.groups]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TranslatorSpec":
        return cls(int(d["emb_dim"]), int(d["n_layers"]), int(d["rank"]), int(d["hidden"]),
                   tuple((tuple(ts), int(i), int(o)) for ts, i, o in d["groups"]))

    def shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """Parameter shapes `{group: {"a1": [M, L, E+1, p], "a2": [M, L, p, in·r], "b1", "b2"}}`."""
        F, L, p, r = self.emb_dim + 1, self.n_layers, self.hidden, self.rank
        return {
            self.group_name(ts): {"a1": (len(ts), L, F, p), "a2": (len(ts), L, p, i * r),
                                  "b1": (len(ts), L, F, p), "b2": (len(ts), L, p, r * o)}
            for ts, i, o in self.groups
        }

    def num_params(self) -> int:
        """Trained parameters (the MLPs; the fixed statistics not counted)."""
        return sum(int(np.prod(s)) for g in self.shapes().values() for s in g.values())

    def template(self) -> "Translator":
        """Zeros shaped like a translator of this spec (restoring checkpoints)."""
        L, r, z = self.n_layers, self.rank, lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
        out = {t: {"a_mean": z(L, i, r), "a_std": z(L), "b_mean": z(L, r, o), "b_std": z(L)}
               for ts, i, o in self.groups for t in ts}
        return {"stats": {"emb": {"mean": z(self.emb_dim), "scale": z()}, "out": out},
                "mlp": {g: {k: z(*s) for k, s in ab.items()} for g, ab in self.shapes().items()}}


def fit_stats(emb_ne: np.ndarray, teacher: Bank) -> dict[str, Any]:
    """The translator's fixed statistics from its training documents: the embeddings' mean and
    RMS distance from it (1 when all documents embed alike), and per (target, layer) the mean
    trained factor and the RMS of the factors' deviation from it (1 when they all agree)."""
    emb = np.asarray(emb_ne, np.float64)
    mean = emb.mean(axis=0)
    rms = float(np.sqrt(np.mean((emb - mean) ** 2))) if len(emb) > 1 else 0.0
    out = {}
    for t, ab in teacher.items():
        out[t] = {}
        for k in ("a", "b"):
            x = np.asarray(ab[k], np.float64)  # [N, L, x, y]
            mu = x.mean(axis=0)
            std = np.sqrt(np.mean((x - mu) ** 2, axis=(0, 2, 3)))  # [L]
            out[t][f"{k}_mean"] = mu.astype(np.float32)
            out[t][f"{k}_std"] = np.where(std > 1e-12, std, 1.0).astype(np.float32)
    return {"emb": {"mean": mean.astype(np.float32), "scale": np.float32(rms if rms > 1e-6 else 1.0)}, "out": out}


def init_translator(spec: TranslatorSpec, key: Array, stats: Mapping[str, Any], out_init_std: float = 1e-7
                    ) -> Translator:
    """Fresh translator: first layers ~ N(0, 1/fan_in), output layers ~ N(0, out_init_std²)
    (tiny: it emits the mean training adapter)."""
    F = spec.emb_dim + 1
    mlp = {}
    for g, (ts, _, _) in enumerate(spec.groups):
        shapes = spec.shapes()[spec.group_name(ts)]
        k = jax.random.split(jax.random.fold_in(key, g), 4)
        mlp[spec.group_name(ts)] = {
            "a1": jax.random.normal(k[0], shapes["a1"], jnp.float32) / np.sqrt(F),
            "a2": jax.random.normal(k[1], shapes["a2"], jnp.float32) * out_init_std,
            "b1": jax.random.normal(k[2], shapes["b1"], jnp.float32) / np.sqrt(F),
            "b2": jax.random.normal(k[3], shapes["b2"], jnp.float32) * out_init_std,
        }
    return {"stats": jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dict(stats)), "mlp": mlp}


def layer_features(n_layers: int) -> Array:
    """λ_l = (l + 1) / L for l = 0 … L-1."""
    return (jnp.arange(n_layers, dtype=jnp.float32) + 1.0) / n_layers


def _mlp(w1_fp: Array, w2_pk: Array, x_f: Array) -> Array:
    """One (module, layer) generator for one document: `W2ᵀ relu(W1ᵀ x)`."""
    return jnp.einsum("pk,p->k", w2_pk, jax.nn.relu(jnp.einsum("fp,f->p", w1_fp, x_f)))


# over layers (weights and the layer's input), then modules (weights), then documents (input)
_stacked = jax.vmap(jax.vmap(jax.vmap(_mlp), in_axes=(0, 0, None)), in_axes=(None, None, 0))


def translate(spec: TranslatorSpec, translator: Translator, emb_ne: Array) -> Bank:
    """LoRA factors of N documents from their embeddings `[N, E]`: a bank
    `{target: {"a": [N, L, in, r], "b": [N, L, r, out]}}` of raw (unscaled) factors, like PRAG's."""
    N, L, r = emb_ne.shape[0], spec.n_layers, spec.rank
    stats = translator["stats"]
    x_ne = (emb_ne.astype(jnp.float32) - stats["emb"]["mean"]) / stats["emb"]["scale"]
    lam_l = layer_features(L)
    x_nlf = jnp.concatenate(  # [N, L, E+1]: the document's input to each layer's generator
        [jnp.broadcast_to(x_ne[:, None, :], (N, L, spec.emb_dim)), jnp.broadcast_to(lam_l[None, :, None], (N, L, 1))],
        axis=-1)
    bank: Bank = {}
    for ts, i, o in spec.groups:  # one iteration per distinct projection shape
        w = translator["mlp"][spec.group_name(ts)]
        a_nmlk = _stacked(w["a1"], w["a2"], x_nlf)  # [N, M, L, in·r]
        b_nmlk = _stacked(w["b1"], w["b2"], x_nlf)  # [N, M, L, r·out]
        for m, t in enumerate(ts):  # in units of the training adapters (module docstring)
            st = stats["out"][t]
            bank[t] = {"a": st["a_mean"] + st["a_std"][:, None, None] * a_nmlk[:, m].reshape(N, L, i, r),
                       "b": st["b_mean"] + st["b_std"][:, None, None] * b_nmlk[:, m].reshape(N, L, r, o)}
    return bank


def combine_topk(bank: Bank, rows_qk: Array, scale: float, mode: str = "mean") -> dict[str, tuple[Array, Array]]:
    """Per-question adapters `{target: (a [q, L, in, R], scale·b [q, L, R, out])}` from the
    translated adapters of each question's top-k documents (rows of `bank`).

    "mean" (published DyPRAG): the mean of the k A's and the mean of the k B's, rank r — the
    adapter is s·Ā·B̄, which is not the mean of the k deltas. "sum": Σ_i s·A_i B_i by rank
    concatenation (rank k·r), PRAG's combination.
    """
    if mode == "sum":
        return merge_topk(bank, rows_qk, scale, "sum")
    if mode != "mean":
        raise ValueError(f"[translator] combine must be 'mean' or 'sum', got {mode!r}")
    out = {}
    for t, ab in bank.items():
        a_qLir = jnp.mean(jnp.take(ab["a"], rows_qk, axis=0), axis=1)
        b_qLro = jnp.mean(jnp.take(ab["b"], rows_qk, axis=0), axis=1)
        out[t] = (a_qLir, b_qLro * jnp.asarray(scale, b_qLro.dtype))
    return out
