"""The frozen base model: config from the checkpoint, weights, the pure Flax decoder, generation.

- `config`: `ModelConfig` read from config.json / GGUF metadata (Llama, Qwen2/2.5, Qwen3, Gemma-3).
- `params`: the base-parameter pytree layout and its validation.
- `weights`: loading HF safetensors directories and GGUF files (dequantised), tokenizers.
- `transformer`: `forward(cfg, params, tokens, positions, cache, adapters)` and the KV cache.
- `generate`: one jitted prefill + decode loop, per-row adapters, bucketed shapes.
- `chat`: `load()` a model bundle and `chat_generate()` text in, text out.

Importing this package imports nothing heavy; import the submodules.
"""
