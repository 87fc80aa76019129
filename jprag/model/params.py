"""The frozen base-parameter pytree: its layout, expected shapes and validation.

Layout (a nested dict of arrays; layers stacked on axis 0 for `lax.scan`)::

    embed       [vocab, d]
    final_norm  [d]
    lm_head     [d, vocab]          only when the head is not tied to `embed`
    layers/
      attn_norm      [L, d]
      q, k, v        [L, d, q_dim | kv_dim]      flat heads, (in, out) like x @ W
      q_bias, k_bias, v_bias  [L, q_dim | kv_dim]   qkv_bias families (Qwen2)
      q_norm, k_norm [L, head_dim]               qk_norm families (Qwen3, Gemma-3)
      o              [L, q_dim, d]
      post_attn_norm [L, d]                      sandwich-norm families (Gemma-3)
      ffn_norm       [L, d]
      gate, up       [L, d, d_ff]
      down           [L, d_ff, d]
      post_ffn_norm  [L, d]                      sandwich-norm families (Gemma-3)

Norm weights are stored as in the checkpoint; Gemma's `(1 + w)` is applied by the model.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jprag.model.config import ModelConfig

Params = dict[str, Any]


class WeightsError(ValueError):
    """Checkpoint tensors do not match what the configuration says the model needs."""


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
    """The exact pytree of shapes `params` must have for `cfg`."""
    L, d = cfg.n_layers, cfg.d_model
    layers: dict[str, tuple[int, ...]] = {"attn_norm": (L, d), "ffn_norm": (L, d)}
    for name, (i, o) in cfg.projection_shapes().items():
        layers[name] = (L, i, o)
    if cfg.qkv_bias:
        layers.update(q_bias=(L, cfg.q_dim), k_bias=(L, cfg.kv_dim), v_bias=(L, cfg.kv_dim))
    if cfg.qk_norm:
        layers.update(q_norm=(L, cfg.head_dim), k_norm=(L, cfg.head_dim))
    if cfg.sandwich_norms:
        layers.update(post_attn_norm=(L, d), post_ffn_norm=(L, d))
    shapes: dict[str, Any] = {"embed": (cfg.vocab_size, d), "final_norm": (d,), "layers": layers}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (d, cfg.vocab_size)
    return shapes


def weight_matrix_names(cfg: ModelConfig) -> tuple[set[str], set[str]]:
    """(top-level, per-layer) names of the weight matrices `ModelConfig.weight_dtype` applies to;
    norms and biases are not among them (they stay in float32)."""
    top = {"embed"} if cfg.tie_embeddings else {"embed", "lm_head"}
    return top, set(cfg.projection_shapes())


def cast_weights(cfg: ModelConfig, params: Mapping[str, Any]) -> Params:
    """`params` with the weight matrices stored in `cfg.weight_dtype` (unchanged when None).

    Works on numpy and JAX arrays alike; casting before `device_put` means the full-precision
    copy never reaches the device.
    """
    if cfg.weight_dtype is None:
        return dict(params)
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    dtype = np.dtype(cfg.weight_dtype)
    top, per_layer = weight_matrix_names(cfg)
    cast = lambda x: x.astype(dtype)  # noqa: E731
    out = {k: cast(v) if k in top else v for k, v in params.items()}
    out["layers"] = {k: cast(v) if k in per_layer else v for k, v in params["layers"].items()}
    return out


def validate_params(cfg: ModelConfig, params: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Raise `WeightsError` naming every missing, unexpected or mis-shaped tensor."""
    problems: list[str] = []

    def walk(expected: Mapping, got: Mapping, prefix: str):
        for key in sorted(set(expected) | set(got)):
            name = f"{prefix}{key}"
            if key not in got:
                problems.append(f"missing tensor {name} (expected shape {expected[key]})")
            elif key not in expected:
                problems.append(f"unexpected tensor {name}")
            elif isinstance(expected[key], Mapping):
                if not isinstance(got[key], Mapping):
                    problems.append(f"{name} should be a group of tensors")
                else:
                    walk(expected[key], got[key], name + "/")
            elif tuple(np.shape(got[key])) != tuple(expected[key]):
                problems.append(f"tensor {name} has shape {tuple(np.shape(got[key]))}, expected {tuple(expected[key])}")

    walk(param_shapes(cfg), params, "")
    if problems:
        raise WeightsError(f"{source}: " + "; ".join(problems))
