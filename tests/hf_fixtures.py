"""Tiny random Hugging Face checkpoints for every supported family, built offline.

Shared by the weight-loading tests and the model parity tests. Everything is float32 and
tiny (hidden 64, 2-3 layers, vocab 128) so building and saving one takes well under a second.

Families (`TINY_FAMILIES`):
    llama          tied head, default rope
    llama_untied   untied head
    llama3         untied head + llama3 rope scaling
    qwen2          qkv bias, untied head
    qwen3          q/k norm, tied head
    gemma3         Gemma3TextConfig: sandwich norms, q/k norm, sliding + full layers
"""

from __future__ import annotations

import pathlib

import torch
import transformers

TINY_FAMILIES = ("llama", "llama_untied", "llama3", "qwen2", "qwen3", "gemma3")

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_hf_config(family: str, **overrides) -> transformers.PretrainedConfig:
    """A tiny float32 config of `family` (one of `TINY_FAMILIES`); `overrides` win."""
    kw = dict(_COMMON)
    if family == "llama":
        cls = transformers.LlamaConfig
        kw.update(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    elif family == "llama_untied":
        cls = transformers.LlamaConfig
        kw.update(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    elif family == "llama3":
        cls = transformers.LlamaConfig
        kw.update(
            tie_word_embeddings=False,
            # Small original context so all three llama3 frequency bands occur at head_dim 16.
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    elif family == "qwen2":
        cls = transformers.Qwen2Config
        kw.update(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    elif family == "qwen3":
        cls = transformers.Qwen3Config
        kw.update(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    elif family == "gemma3":
        cls = transformers.Gemma3TextConfig
        kw.update(
            num_hidden_layers=3,
            tie_word_embeddings=True,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,  # != head_dim, so a wrong query scale shows up
            rope_parameters={
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            hidden_activation="gelu_pytorch_tanh",
        )
    else:
        raise ValueError(f"unknown tiny family {family!r} (known: {TINY_FAMILIES})")
    kw.update(overrides)
    return cls(**kw)


def tiny_hf_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny random float32 `*ForCausalLM` of `family` in eval mode.

    Biases and norm weights are randomised too (HF initialises them to 0 / 1), so a loader
    that swaps two norms or drops a bias cannot pass a parity or equality test by accident.
    """
    cfg = tiny_hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                base = 0.0 if family == "gemma3" else 1.0  # Gemma scales by (1 + w)
                p.copy_(base + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


def save_tiny_hf(family: str, path, seed: int = 0, max_shard_size: str | int | None = None, **overrides) -> pathlib.Path:
    """Build `tiny_hf_model(family, seed, **overrides)` and `save_pretrained` it (safetensors)
    into `path`; `max_shard_size` (e.g. "20KB") forces an index + shards. Returns `path`."""
    path = pathlib.Path(path)
    model = tiny_hf_model(family, seed, **overrides)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **kw)
    return path
