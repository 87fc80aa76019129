"""Text in, text out: a loaded model bundle, chat templates and batched chat generation."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jprag.model.config import ModelConfig
from jprag.model.generate import SamplingConfig, generate


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A frozen base model: config, device-resident params and its tokenizer."""

    cfg: ModelConfig
    params: Mapping[str, Any]
    tokenizer: Any
    path: str

    @property
    def stop_ids(self) -> list[int]:
        """EOS ids from the config plus the tokenizer's EOS / end-of-turn tokens."""
        ids = set(self.cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        for tok in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid >= 0 and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return sorted(ids)

    def chat_tokens(self, user: str, system: str | None = None, assistant_prefix: str = "") -> list[int]:
        """Token ids of a one-turn chat prompt, ending where the assistant's answer starts.

        `assistant_prefix` is pre-filled in the assistant turn (e.g. "The answer is").
        """
        prefix = self.tokenizer.encode(assistant_prefix, add_special_tokens=False) if assistant_prefix else []
        return self._turn_tokens(user, system) + list(prefix)

    def _turn_tokens(self, user: str, system: str | None) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        # Base models without a template: plain text, BOS first when the tokenizer adds one.
        return list(self.tokenizer(((system + "\n\n") if system else "") + user)["input_ids"])


def load(path: str | None = None, dtype: str = "float32", weight_dtype: str | None = None) -> LoadedModel:
    """Load weights (HF directory or GGUF; None = the embedded default) and the tokenizer.

    `dtype` is the compute dtype; `weight_dtype` (e.g. "bfloat16") stores the weight matrices
    in that dtype and runs their matmuls on it with float32 accumulation (`ModelConfig`).
    Cached per (resolved path, dtype, weight_dtype): repeated calls return the same
    device-resident model.
    """
    from jprag.model.weights import default_model_path

    resolved = str(pathlib.Path(path).resolve()) if path is not None else str(default_model_path())
    return _load(resolved, dtype, weight_dtype)


@functools.lru_cache(maxsize=2)
def _load(path: str, dtype: str, weight_dtype: str | None) -> LoadedModel:
    from jprag.model.params import cast_weights
    from jprag.model.weights import load_model, load_tokenizer

    cfg, params = load_model(path)
    cfg = cfg.replace(dtype=dtype, weight_dtype=weight_dtype)
    params = jax.device_put(cast_weights(cfg, params))
    tokenizer = load_tokenizer(path)
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"{path}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {cfg.vocab_size}")
    return LoadedModel(cfg, params, tokenizer, path)


def chat_generate(
    prompts: Sequence[str],
    *,
    model: str | LoadedModel | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    system: str | None = None,
    adapters=None,
) -> list[str]:
    """Answer each user prompt with the chat template applied; one batched generate call."""
    lm = model if isinstance(model, LoadedModel) else load(model)
    token_prompts = [lm.chat_tokens(p, system) for p in prompts]
    outs = generate(
        lm.cfg,
        lm.params,
        token_prompts,
        max_new_tokens=max_new_tokens,
        sampling=SamplingConfig(temperature, top_k, top_p),
        stop_ids=lm.stop_ids,
        seed=seed,
        adapters=adapters,
        pad_id=int(lm.tokenizer.pad_token_id or 0),
    )
    return [lm.tokenizer.decode(np.asarray(o, np.int64), skip_special_tokens=True).strip() for o in outs]
