"""PEFT (Hugging Face) interop: export adapters as PEFT LoRA directories and import them back.

A PEFT LoRA directory holds `adapter_config.json` and `adapter_model.safetensors` with one
pair of tensors per adapted module and layer (PEFT 0.21 saves without the adapter name):

    base_model.model.model.layers.{i}.mlp.gate_proj.lora_A.weight        [r, in]
    base_model.model.model.layers.{i}.mlp.gate_proj.lora_B.weight        [out, r]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight     ...

Our factors are the per-layer transposes: `a [L, in, r]` = `lora_A.weight.T` stacked over
layers and `b [L, r, out]` = `lora_B.weight.T`; PEFT computes `y += s · (x Aᵀ) Bᵀ` with
`s = lora_alpha / r`, exactly `s · (x a) b`.

- `export_peft` writes one document's raw factors with its `LoraConfig` (r, alpha).
- `export_applied` writes an applied/merged adapter (scale already folded into b, e.g. one
  row of `merge_topk`) with `lora_alpha = r`, so PEFT's own scale is 1.
- `import_peft` reads a directory (safetensors only: pickled `adapter_model.bin` files are
  refused) and validates every tensor name and shape against the model configuration.

Safetensors files are written and read here directly (the format is a JSON header plus raw
little-endian bytes), so bfloat16 factors round-trip bit-exactly without torch.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import struct
from typing import Any, Mapping

import numpy as np

from jprag.lora.adapters import ALL_TARGETS, PEFT_MODULES, LoraConfig
from jprag.model.config import SUPPORTED_FAMILIES, ModelConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

# All supported families are `*ForCausalLM` with decoder layers at `model.layers`; PEFT
# prefixes `base_model.model.` (the LoraModel wrapping the causal LM).
KEY_PREFIX = "base_model.model.model.layers"
_KEY_RE = re.compile(
    r"^base_model\.model\.model\.(?:language_model\.)?layers\.(\d+)\.(.+)\.lora_(A|B)\.weight$"
)

# target -> module short name ("gate" -> "gate_proj") and the reverse, also accepting the
# dotted suffix form ("mlp.gate_proj") that PEFT's target matching allows.
SHORT_NAMES = {t: m.rsplit(".", 1)[-1] for t, m in PEFT_MODULES.items()}
_TARGET_OF = {**{v: t for t, v in SHORT_NAMES.items()}, **{v: t for t, v in PEFT_MODULES.items()}}

# Fields of a PEFT LoraConfig that change the forward pass (or the tensors saved) in ways
# this implementation does not model: each must be absent or falsy (None, False, {}, []).
_MUST_BE_FALSY = (
    "use_rslora",
    "use_dora",
    "use_qalora",
    "fan_in_fan_out",
    "lora_bias",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "megatron_config",
    "loftq_config",
)
# Initialisations that rewrite the *base* weights, so the adapter only fits a modified model.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


class PeftError(ValueError):
    """A PEFT adapter directory is malformed, or uses a feature jprag does not support."""


# ----------------------------------------------------------------------------- safetensors


def _bf16():
    import ml_dtypes  # a JAX dependency, always present

    return np.dtype(ml_dtypes.bfloat16)


def _dtype_code(dtype: np.dtype) -> str:
    if dtype == _bf16():
        return "BF16"
    for code, np_dtype in _DTYPES.items():
        if dtype == np.dtype(np_dtype):
            return code
    raise PeftError(f"cannot export dtype {dtype} (supported: float64, float32, float16, bfloat16)")


def _save_safetensors(tensors: Mapping[str, np.ndarray], path: pathlib.Path, metadata: Mapping[str, str]) -> None:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    blobs = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        blob = arr.tobytes()
        header[name] = {"dtype": _dtype_code(arr.dtype), "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer pads the header to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    if len(data) < 8:
        raise PeftError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise PeftError(f"{path}: not a safetensors file (header length {n} exceeds the file size)")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as e:
        raise PeftError(f"{path}: corrupt safetensors header ({e})") from e
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        code = info.get("dtype")
        if code == "BF16":
            dtype = _bf16()
        elif code in _DTYPES:
            dtype = np.dtype(_DTYPES[code]).newbyteorder("<")
        else:
            raise PeftError(f"{path}: tensor {name} has unsupported dtype {code}")
        shape = tuple(int(s) for s in info["shape"])
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= len(body) or end - start != int(np.prod(shape)) * dtype.itemsize:
            raise PeftError(f"{path}: tensor {name} has inconsistent data_offsets {info['data_offsets']} for shape {shape}")
        arr = np.frombuffer(body[start:end], dtype=dtype).reshape(shape)
        out[name] = arr.astype(arr.dtype.newbyteorder("="), copy=True)
    return out


# ----------------------------------------------------------------------------- export


def peft_key(target: str, layer: int, factor: str) -> str:
    """PEFT tensor name of `factor` ('A' or 'B') of `target` in `layer`."""
    return f"{KEY_PREFIX}.{layer}.{PEFT_MODULES[target]}.lora_{factor}.weight"


def _alpha_json(alpha: float) -> int | float:
    return int(alpha) if float(alpha).is_integer() else float(alpha)


def _write(
    factors: Mapping[str, tuple[Any, Any]],
    rank: int,
    alpha: float,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None,
    model_family: str,
    what: str,
) -> pathlib.Path:
    if model_family not in SUPPORTED_FAMILIES:
        raise PeftError(f"model_family {model_family!r} is not supported (supported: {SUPPORTED_FAMILIES})")
    if not factors:
        raise PeftError(f"{what}: no targets to export")
    tensors: dict[str, np.ndarray] = {}
    n_layers = None
    for target, (a, b) in factors.items():
        if target not in ALL_TARGETS:
            raise PeftError(f"{what}: unknown target {target!r} (known: {ALL_TARGETS})")
        a, b = np.asarray(a), np.asarray(b)
        if a.ndim != 3 or b.ndim != 3:
            raise PeftError(
                f"{what}[{target!r}]: expected a [layers, in, r] and b [layers, r, out] (one adapter, no batch "
                f"or document axis), got a{list(a.shape)} b{list(b.shape)}"
            )
        if a.shape[0] != b.shape[0] or a.shape[2] != rank or b.shape[1] != rank:
            raise PeftError(f"{what}[{target!r}]: a{list(a.shape)} and b{list(b.shape)} do not match rank {rank}")
        if n_layers is None:
            n_layers = a.shape[0]
        elif a.shape[0] != n_layers:
            raise PeftError(f"{what}[{target!r}]: {a.shape[0]} layers, but other targets have {n_layers}")
        for layer in range(a.shape[0]):
            tensors[peft_key(target, layer, "A")] = np.ascontiguousarray(a[layer].T)  # [r, in]
            tensors[peft_key(target, layer, "B")] = np.ascontiguousarray(b[layer].T)  # [out, r]

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": int(rank),
        "lora_alpha": _alpha_json(alpha),
        "target_modules": [SHORT_NAMES[t] for t in factors],
        "exclude_modules": None,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_bias": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layer_replication": None,
        "target_parameters": None,
    }
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_safetensors(tensors, out / WEIGHTS_NAME, {"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def export_peft(
    adapter: Mapping[str, Mapping[str, Any]],
    lora: LoraConfig,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    model_family: str = "llama",
) -> pathlib.Path:
    """Write ONE document's raw factors `{target: {"a": [L, in, r], "b": [L, r, out]}}` as a PEFT
    LoRA directory (r = lora.rank, lora_alpha = lora.alpha). Returns `out_dir` as a Path.

    The targets written are exactly `lora.targets` (in that order), which must match the
    adapter's keys. Arrays may be numpy or JAX; their dtype is kept.
    """
    if set(adapter) != set(lora.targets):
        raise PeftError(f"adapter targets {sorted(adapter)} do not match LoraConfig.targets {list(lora.targets)}")
    factors = {}
    for t in lora.targets:
        if set(adapter[t]) != {"a", "b"}:
            raise PeftError(f"adapter[{t!r}] must hold exactly 'a' and 'b', got {sorted(adapter[t])}")
        factors[t] = (adapter[t]["a"], adapter[t]["b"])
    return _write(factors, lora.rank, lora.alpha, out_dir, base_model_name_or_path, model_family, "adapter")


def export_applied(
    applied_adapter: Mapping[str, tuple[Any, Any]],
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    model_family: str = "llama",
) -> pathlib.Path:
    """Write an applied adapter `{target: (a [L, in, R], b_scaled [L, R, out])}` (scale folded
    into b, e.g. one question's row of `merge_topk`) as a PEFT LoRA directory with
    r = lora_alpha = R, so PEFT's scale is 1 and the model computes the same `(x a) b_scaled`.
    """
    ranks = {t: int(np.shape(ab[0])[-1]) for t, ab in applied_adapter.items()}
    if len(set(ranks.values())) > 1:
        raise PeftError(f"applied adapter has different ranks per target {ranks}; PEFT export needs one rank")
    if not ranks:
        raise PeftError("applied adapter: no targets to export")
    rank = next(iter(ranks.values()))
    return _write(applied_adapter, rank, float(rank), out_dir, base_model_name_or_path, model_family, "applied adapter")


# ----------------------------------------------------------------------------- import


def _read_config(path: pathlib.Path, cfg: ModelConfig) -> LoraConfig:
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (not a PEFT adapter directory)")
    try:
        c = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise PeftError(f"{cfg_file}: invalid JSON ({e})") from e
    if not isinstance(c, dict):
        raise PeftError(f"{cfg_file}: expected a JSON object")

    def bad(field: str, why: str) -> PeftError:
        return PeftError(f"{cfg_file}: {field}={c.get(field)!r}: {why}")

    if c.get("peft_type") != "LORA":
        raise bad("peft_type", "only LORA adapters are supported")
    for field in _MUST_BE_FALSY:
        if c.get(field):
            raise bad(field, "not supported by jprag (must be absent, false or empty)")
    if c.get("bias", "none") != "none":
        raise bad("bias", "LoRA bias terms are not supported (must be 'none')")
    init = c.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise bad("init_lora_weights", "this initialisation modifies the base weights; such adapters are not supported")
    layers = c.get("layers_to_transform")
    if layers is not None:
        layers = [layers] if isinstance(layers, int) else list(layers)
        if sorted(layers) != list(range(cfg.n_layers)):
            raise bad("layers_to_transform", f"adapters on a subset of the {cfg.n_layers} layers are not supported")

    modules = c.get("target_modules")
    if isinstance(modules, str):
        raise bad("target_modules", "a regular expression is not supported; list module names such as 'gate_proj'")
    if not modules:
        raise bad("target_modules", "missing or empty")
    targets = []
    for m in modules:
        if m not in _TARGET_OF:
            raise bad("target_modules", f"module {m!r} is not a jprag target (supported: {sorted(SHORT_NAMES.values())})")
        if _TARGET_OF[m] not in targets:
            targets.append(_TARGET_OF[m])

    r, alpha = c.get("r"), c.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise bad("r", "must be a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise bad("lora_alpha", "must be a number")
    return LoraConfig(rank=r, alpha=float(alpha), targets=tuple(targets))


def import_peft(
    in_dir: str | os.PathLike, cfg: ModelConfig, dtype: Any = None
) -> tuple[LoraConfig, dict[str, dict[str, np.ndarray]]]:
    """Read a PEFT LoRA directory into `(LoraConfig, {target: {"a": [L, in, r], "b": [L, r, out]}})`.

    Arrays are host numpy, in the stored dtype unless `dtype` is given. Every tensor must be
    present with the shape `cfg.projection_shapes()` implies, for every layer of `cfg`; extra
    tensors, unsupported PEFT features and pickled weights raise `PeftError` naming the
    offending key or config field.
    """
    path = pathlib.Path(in_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"PEFT adapter directory {path} does not exist")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        if (path / PICKLE_WEIGHTS_NAME).is_file():
            raise PeftError(
                f"{path}: only {PICKLE_WEIGHTS_NAME} (a pickle file) is present; pickled weights are never loaded. "
                f"Convert it to {WEIGHTS_NAME} (e.g. PeftModel.save_pretrained(..., safe_serialization=True))"
            )
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}")
    lora = _read_config(path, cfg)
    tensors = _load_safetensors(weights)

    proj = cfg.projection_shapes()
    found: dict[tuple[str, int, str], np.ndarray] = {}
    for key, arr in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise PeftError(f"{weights.name}: unexpected tensor {key} (not a LoRA factor of a decoder layer)")
        layer, module, factor = int(m.group(1)), m.group(2), m.group(3)
        target = _TARGET_OF.get(module)
        if target is None or module != PEFT_MODULES[target]:
            raise PeftError(f"{weights.name}: tensor {key} adapts module {module!r}, which is not a jprag target")
        if target not in lora.targets:
            raise PeftError(f"{weights.name}: tensor {key} adapts {module!r}, which is not in target_modules")
        if layer >= cfg.n_layers:
            raise PeftError(f"{weights.name}: tensor {key} is for layer {layer}, but the model has {cfg.n_layers} layers")
        d_in, d_out = proj[target]
        want = (lora.rank, d_in) if factor == "A" else (d_out, lora.rank)
        if tuple(arr.shape) != want:
            raise PeftError(
                f"{weights.name}: tensor {key} has shape {list(arr.shape)}, expected {list(want)} "
                f"(r={lora.rank}, {target} projection in={d_in} out={d_out})"
            )
        if (target, layer, factor) in found:
            raise PeftError(f"{weights.name}: tensor {key} appears twice (with and without 'language_model')")
        found[(target, layer, factor)] = arr

    adapter: dict[str, dict[str, np.ndarray]] = {}
    for target in lora.targets:
        for factor in ("A", "B"):
            for layer in range(cfg.n_layers):
                if (target, layer, factor) not in found:
                    raise PeftError(f"{weights.name}: tensor {peft_key(target, layer, factor)} is missing")
        a = np.ascontiguousarray(np.stack([found[(target, i, "A")].T for i in range(cfg.n_layers)]))
        b = np.ascontiguousarray(np.stack([found[(target, i, "B")].T for i in range(cfg.n_layers)]))
        if dtype is not None:
            a, b = a.astype(dtype), b.astype(dtype)
        adapter[target] = {"a": a, "b": b}
    return lora, adapter


__all__ = [
    "PeftError",
    "export_peft",
    "export_applied",
    "import_peft",
    "peft_key",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]
