"""Model configuration, read from a checkpoint's own config (never duplicated in YAML).

One frozen dataclass describes every supported decoder family; the family only selects
defaults in `from_hf`. The model code branches on *features* (qkv bias, q/k norm, sandwich
norms, ...) rather than on family names, so a new Llama-like family is a new mapping here,
not new model code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A checkpoint's configuration is missing a field or describes something unsupported."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention type. `kind` is 'default', 'linear' or 'llama3'."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies [head_dim // 2] in float32, computed as transformers does."""
        exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
        inv = (1.0 / (self.theta**exponent)).astype(np.float32)
        if self.kind == "default":
            return inv
        if self.kind == "linear":
            return (inv / self.factor).astype(np.float32)
        if self.kind == "llama3":
            low_wavelen = self.original_max_position / self.low_freq_factor
            high_wavelen = self.original_max_position / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        raise ConfigError(f"rope type {self.kind!r} is not supported (supported: default, linear, llama3)")

    @classmethod
    def from_hf(cls, params: Mapping[str, Any] | None, default_theta: float) -> "RopeConfig":
        params = dict(params or {})
        kind = params.get("rope_type", params.get("type", "default")) or "default"
        if kind not in ("default", "linear", "llama3"):
            raise ConfigError(f"rope_parameters.rope_type={kind!r} is not supported (default, linear, llama3)")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError("rope_parameters.partial_rotary_factor != 1 is not supported")
        return cls(
            theta=float(params.get("rope_theta", default_theta)),
            kind=kind,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position=int(params.get("original_max_position_embeddings", 8192)),
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the pure model functions need to know about a decoder-only checkpoint.

    Projection weights are stored flat, `[layers, in, out]`, so that LoRA factors and PEFT
    exports line up with them one-to-one; heads are split inside the attention function.
    """

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    rope_local: RopeConfig | None = None  # sliding-window layers' rope (Gemma-3); None = same as `rope`
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3, Gemma-3: RMSNorm over head_dim of q and k
    sandwich_norms: bool = False  # Gemma-3: extra norms after attention and after the FFN
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w)
    embed_scale: float = 1.0  # Gemma: embeddings times sqrt(d_model)
    activation: str = "silu"  # 'silu' | 'gelu_tanh'
    query_scale: float | None = None  # None = head_dim ** -0.5
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer: 'full' | 'sliding'
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    max_position: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute dtype; parameters stay as loaded
    # Storage dtype of the frozen weight matrices (projections, embedding, head) and the dtype
    # their matmuls take operands in; products accumulate in, and return, the compute `dtype`
    # (`transformer.weight_matmul`). None = `dtype`. "bfloat16" with float32 compute halves
    # weight memory and the bytes each decode step streams.
    weight_dtype: str | None = None
    remat: bool = False  # rematerialise each layer in the backward pass

    def __post_init__(self):
        if self.family not in SUPPORTED_FAMILIES:
            raise ConfigError(f"model family {self.family!r} is not supported (supported: {SUPPORTED_FAMILIES})")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.layer_types and len(self.layer_types) != self.n_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        if any(t not in ("full", "sliding") for t in self.layer_types):
            raise ConfigError(f"layer_types must be 'full' or 'sliding', got {self.layer_types}")
        if "sliding" in self.layer_types and not self.sliding_window:
            raise ConfigError("sliding layers need a sliding_window size")
        for field in ("dtype", "weight_dtype"):
            value = getattr(self, field)
            if value is not None and value not in FLOAT_DTYPES:
                raise ConfigError(f"{field} must be one of {FLOAT_DTYPES}, got {value!r}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ConfigError(f"activation {self.activation!r} is not supported (silu, gelu_tanh)")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

    @property
    def is_sliding(self) -> np.ndarray:
        """[layers] bool: which layers use the sliding window (and the local rope)."""
        if not self.layer_types:
            return np.zeros((self.n_layers,), bool)
        return np.array([t == "sliding" for t in self.layer_types])

    @property
    def matmul_dtype(self) -> str | None:
        """Operand dtype of the weight matmuls when it differs from the compute dtype, else None."""
        return self.weight_dtype if self.weight_dtype not in (None, self.dtype) else None

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # Projection shapes (in, out) per LoRA-able target; the single source of truth for
    # weight loading, adapter initialisation and PEFT export.
    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        d, f = self.d_model, self.d_ff
        return {
            "q": (d, self.q_dim),
            "k": (d, self.kv_dim),
            "v": (d, self.kv_dim),
            "o": (self.q_dim, d),
            "gate": (d, f),
            "up": (d, f),
            "down": (f, d),
        }

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        """Build from a `transformers.PretrainedConfig` (or its `to_dict()`)."""
        c = hf if isinstance(hf, Mapping) else hf.to_dict()
        model_type = c.get("model_type")
        family = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3", "gemma3": "gemma3"}.get(
            model_type
        )
        if family is None:
            raise ConfigError(f"config.json model_type={model_type!r} is not supported (llama, qwen2, qwen3, gemma3_text)")
        if model_type == "gemma3" and "text_config" in c:  # multimodal wrapper: use its text tower config
            c = dict(c["text_config"], model_type="gemma3_text")

        def need(key):
            if c.get(key) is None:
                raise ConfigError(f"config field {key!r} is missing (model_type={model_type})")
            return c[key]

        n_heads = int(need("num_attention_heads"))
        d_model = int(need("hidden_size"))
        n_layers = int(need("num_hidden_layers"))
        head_dim = int(c.get("head_dim") or d_model // n_heads)
        rope_params = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if "rope_theta" in c and "rope_theta" not in rope_params and "full_attention" not in rope_params:
            rope_params = dict(rope_params, rope_theta=c["rope_theta"])
        eos = c.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))

        layer_types = tuple(
            {"full_attention": "full", "sliding_attention": "sliding"}.get(t, t) for t in (c.get("layer_types") or ())
        )
        sliding_window = c.get("sliding_window")
        if family in ("qwen2", "qwen3") and not c.get("use_sliding_window", False):
            sliding_window, layer_types = None, ()

        common = dict(
            family=family,
            vocab_size=int(need("vocab_size")),
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            d_ff=int(need("intermediate_size")),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            max_position=int(c.get("max_position_embeddings") or 8192),
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=c.get("pad_token_id"),
            sliding_window=int(sliding_window) if sliding_window and "sliding" in layer_types else None,
            layer_types=layer_types if "sliding" in layer_types else (),
        )
        if c.get("attention_bias") and family != "qwen2":
            raise ConfigError(f"attention_bias=True is not supported for {family}")
        if family == "gemma3":
            act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
            if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
                raise ConfigError(f"gemma3 hidden_activation={act!r} is not supported")
            rope_full = RopeConfig.from_hf(rope_params.get("full_attention", rope_params), 1_000_000.0)
            rope_local = RopeConfig.from_hf(
                rope_params.get("sliding_attention", {"rope_theta": c.get("rope_local_base_freq", 10000.0)}), 10000.0
            )
            return cls(
                **common,
                rope=rope_full,
                rope_local=rope_local,
                qk_norm=True,
                sandwich_norms=True,
                norm_plus_one=True,
                embed_scale=float(d_model) ** 0.5,
                activation="gelu_tanh",
                query_scale=float(c.get("query_pre_attn_scalar", head_dim)) ** -0.5,
                final_logit_softcap=c.get("final_logit_softcapping"),
                attn_logit_softcap=c.get("attn_logit_softcapping"),
            )
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported for {family} (expected 'silu')")
        return cls(
            **common,
            rope=RopeConfig.from_hf(rope_params, 10000.0),
            qkv_bias=family == "qwen2",
            qk_norm=family == "qwen3",
        )
