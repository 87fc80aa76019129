"""PEFT interop: adapters exported by jprag load in PEFT and give the same logits, adapters
saved by PEFT import into jprag unchanged, and malformed directories fail clearly."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import peft
import pytest
import torch
import transformers

from hf_fixtures import save_tiny_hf
from jprag.lora.adapters import LoraConfig, applied, merge_topk, stack
from jprag.lora.peft import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    PeftError,
    _load_safetensors,
    _save_safetensors,
    export_applied,
    export_peft,
    import_peft,
    peft_key,
)
from jprag.model.config import ModelConfig
from jprag.model.transformer import forward
from jprag.model.weights import load_hf_dir

_forward = jax.jit(forward, static_argnums=(0,))

FAMILIES = ("llama", "qwen2", "gemma3")
TARGETS = ("gate", "up", "down", "q", "v")
LORA = LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
ATOL = 1e-4
# The llama tiny config (as hf_fixtures builds it), for tests that need no torch model.
TINY_CFG = ModelConfig(family="llama", vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)


@dataclasses.dataclass
class Tiny:
    family: str
    path: pathlib.Path
    cfg: ModelConfig
    params: dict

    def hf(self) -> transformers.PreTrainedModel:
        """A fresh torch model (PEFT injects layers into the model it wraps)."""
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(self.path), dtype=torch.float32, attn_implementation="eager"
        ).eval()


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory) -> Tiny:
    path = save_tiny_hf(request.param, tmp_path_factory.mktemp(f"tiny_{request.param}"))
    cfg, params = load_hf_dir(path)
    return Tiny(request.param, path, cfg, jax.device_put(params))


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(7)
    toks = rng.integers(3, 128, size=(2, 20)).astype(np.int32)
    return toks, np.broadcast_to(np.arange(20, dtype=np.int32), toks.shape).copy()


def random_adapter(cfg: ModelConfig, lora: LoraConfig, seed: int, dtype=np.float32) -> dict:
    """Random raw factors with a non-zero B (PEFT's init has B = 0, which would hide bugs)."""
    rng = np.random.default_rng(seed)
    out = {}
    for t, ab in lora.shapes(cfg).items():
        fan_in = ab["a"][1]
        out[t] = {
            "a": rng.uniform(-1, 1, ab["a"]).astype(np.float32) / np.sqrt(fan_in),
            "b": (0.05 * rng.standard_normal(ab["b"])).astype(dtype),
        }
        out[t]["a"] = out[t]["a"].astype(dtype)
    return out


def jx_logits(tiny: Tiny, tokens, adapters=None) -> np.ndarray:
    toks, pos = tokens
    logits, _ = _forward(tiny.cfg, tiny.params, jnp.asarray(toks), jnp.asarray(pos), None, adapters)
    return np.asarray(logits)


def torch_logits(model, tokens) -> np.ndarray:
    toks, pos = tokens
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(toks.astype(np.int64)), position_ids=torch.from_numpy(pos.astype(np.int64)))
    return out.logits.float().numpy()


def peft_logits(tiny: Tiny, adapter_dir, tokens) -> np.ndarray:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(tiny.hf(), str(adapter_dir)).eval()
    # PEFT only warns about adapter tensors it could not place or did not find
    complaints = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not complaints, complaints
    return torch_logits(model, tokens)


# ----------------------------------------------------------------------------- parity


def test_export_matches_peft_logits(tiny, tokens, tmp_path):
    adapter = random_adapter(tiny.cfg, LORA, seed=1)
    out = export_peft(adapter, LORA, tmp_path / "a", base_model_name_or_path=str(tiny.path), model_family=tiny.family)

    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["gate_proj", "up_proj", "down_proj", "q_proj", "v_proj"]

    got = peft_logits(tiny, out, tokens)
    want = jx_logits(tiny, tokens, applied(adapter, LORA.scale))
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    # guard against a no-op (base-model parity itself is test_model_parity's job)
    base = torch_logits(tiny.hf(), tokens)
    assert np.abs(got - base).max() > 100 * ATOL, "the adapter does not change the logits"


def test_export_applied_merged_topk(tiny, tokens, tmp_path):
    bank = stack([random_adapter(tiny.cfg, LORA, seed=10 + d) for d in range(5)])
    merged = merge_topk(bank, jnp.array([[3, 0, 4]]), LORA.scale)  # {t: (a [1, L, in, 12], b [1, L, 12, out])}
    row = {t: (a[0], b[0]) for t, (a, b) in merged.items()}
    out = export_applied(row, tmp_path / "m", model_family=tiny.family)
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["r"] == 3 * LORA.rank and config["lora_alpha"] == 3 * LORA.rank

    got = peft_logits(tiny, out, tokens)
    want = jx_logits(tiny, tokens, row)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    # the merged adapter is the sum of the three documents' deltas, not just one of them
    one = jx_logits(tiny, tokens, applied(jax.tree.map(lambda x: x[3], bank), LORA.scale))
    assert np.abs(want - one).max() > 100 * ATOL


# ----------------------------------------------------------------------------- import


def _round_trip(cfg, tmp_path, dtype):
    lora = LoraConfig(rank=3, alpha=5.5, targets=("v", "down", "q", "k", "o", "up", "gate"))
    adapter = random_adapter(cfg, lora, seed=2, dtype=dtype)
    out = export_peft(jax.tree.map(jnp.asarray, adapter), lora, tmp_path / "rt")
    lora2, adapter2 = import_peft(out, cfg)
    assert lora2 == lora and lora2.targets == lora.targets
    assert list(adapter2) == list(lora.targets)
    for t in lora.targets:
        for f in ("a", "b"):
            assert adapter2[t][f].dtype == np.dtype(dtype)
            np.testing.assert_array_equal(adapter2[t][f].view(np.uint8), adapter[t][f].view(np.uint8))


def test_round_trip_bit_identical(tiny, tmp_path):
    _round_trip(tiny.cfg, tmp_path, np.float32)


def test_round_trip_bfloat16(tmp_path):
    _round_trip(TINY_CFG, tmp_path, ml_dtypes.bfloat16)


def test_import_adapter_saved_by_peft(tiny, tokens, tmp_path):
    torch.manual_seed(3)
    # Same rank and targets as LORA (other alpha), so the jitted forward is reused.
    config = peft.LoraConfig(
        r=4, lora_alpha=12, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj", "gate_proj", "up_proj"]
    )
    model = peft.get_peft_model(tiny.hf(), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "p"))
    state = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if "lora_" in n}

    lora, adapter = import_peft(tmp_path / "p", tiny.cfg)
    assert (lora.rank, lora.alpha, set(lora.targets)) == (4, 12.0, set(TARGETS))
    for t in lora.targets:
        for layer in range(tiny.cfg.n_layers):
            for f, factor in (("a", "A"), ("b", "B")):
                name = peft_key(t, layer, factor).replace(f"lora_{factor}.weight", f"lora_{factor}.default.weight")
                np.testing.assert_array_equal(adapter[t][f][layer], state[name].T)
    model.eval()
    np.testing.assert_allclose(
        jx_logits(tiny, tokens, applied(adapter, lora.scale)), torch_logits(model, tokens), rtol=0, atol=ATOL
    )


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def exported(tmp_path):
    """(cfg, dir) of a valid llama export, for the error tests (no torch model needed)."""
    out = export_peft(random_adapter(TINY_CFG, LORA, seed=4), LORA, tmp_path / "e")
    return TINY_CFG, out


def _edit_tensors(path, fn):
    tensors = _load_safetensors(path / WEIGHTS_NAME)
    fn(tensors)
    _save_safetensors(tensors, path / WEIGHTS_NAME, {"format": "pt"})


def _edit_config(path, **kw):
    c = json.loads((path / CONFIG_NAME).read_text())
    c.update(kw)
    (path / CONFIG_NAME).write_text(json.dumps(c))


def test_error_missing_tensor(exported):
    cfg, out = exported
    key = peft_key("down", 1, "B")
    _edit_tensors(out, lambda t: t.pop(key))
    with pytest.raises(PeftError, match=rf"{key}.*missing"):
        import_peft(out, cfg)


def test_error_wrong_shape(exported):
    cfg, out = exported
    key = peft_key("q", 0, "A")
    _edit_tensors(out, lambda t: t.__setitem__(key, np.zeros((4, 32), np.float32)))
    with pytest.raises(PeftError, match=rf"{key} has shape \[4, 32\], expected \[4, 64\]"):
        import_peft(out, cfg)


def test_error_layer_count(exported):
    cfg, out = exported
    with pytest.raises(PeftError, match=r"layers\.1\..*model has 1 layers"):
        import_peft(out, cfg.replace(n_layers=1))
    with pytest.raises(PeftError, match=rf"{peft_key('gate', 2, 'A')} is missing"):
        import_peft(out, cfg.replace(n_layers=3))


def test_error_unexpected_tensor(exported):
    cfg, out = exported
    key = peft_key("k", 0, "A")
    _edit_tensors(out, lambda t: t.__setitem__(key, np.zeros((4, 64), np.float32)))
    with pytest.raises(PeftError, match=rf"{key}.*not in target_modules"):
        import_peft(out, cfg)
    _edit_tensors(out, lambda t: (t.pop(key), t.__setitem__("base_model.model.lm_head.lora_A.weight", np.zeros((4, 64)))))
    with pytest.raises(PeftError, match=r"unexpected tensor base_model\.model\.lm_head"):
        import_peft(out, cfg)


def test_error_bin_only(exported):
    cfg, out = exported
    (out / WEIGHTS_NAME).unlink()
    (out / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(PeftError, match=r"adapter_model\.bin.*pickle"):
        import_peft(out, cfg)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("use_rslora", True, "use_rslora"),
        ("use_dora", True, "use_dora"),
        ("rank_pattern", {"q_proj": 8}, "rank_pattern"),
        ("alpha_pattern", {"q_proj": 8}, "alpha_pattern"),
        ("target_modules", ["q_proj", "c_attn"], "target_modules.*'c_attn'"),
        ("target_modules", ".*proj", "target_modules.*regular expression"),
        ("bias", "all", "bias"),
        ("peft_type", "IA3", "peft_type"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("layers_to_transform", [0], "layers_to_transform"),
        ("init_lora_weights", "pissa", "init_lora_weights"),
    ],
)
def test_error_unsupported_config(exported, field, value, match):
    cfg, out = exported
    _edit_config(out, **{field: value})
    with pytest.raises(PeftError, match=match):
        import_peft(out, cfg)


def test_error_export_shapes(tmp_path):
    adapter = random_adapter(TINY_CFG, LORA, seed=5)
    with pytest.raises(PeftError, match="do not match rank"):
        export_peft(adapter, dataclasses.replace(LORA, rank=2), tmp_path / "x")
    with pytest.raises(PeftError, match="do not match LoraConfig.targets"):
        export_peft(adapter, LoraConfig(rank=4, alpha=8.0), tmp_path / "x")
    batched = {t: (ab["a"][None], ab["b"][None]) for t, ab in adapter.items()}  # merge_topk's [q, L, ...]
    with pytest.raises(PeftError, match="no batch"):
        export_applied(batched, tmp_path / "x")
