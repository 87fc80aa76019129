"""A pure-functional decoder-only transformer (Llama, Qwen2/2.5, Qwen3, Gemma-3) in Flax linen.

The module holds no state: `Transformer(cfg).apply({"params": params}, tokens, positions,
cache=..., adapters=...)` is a pure function of its arguments. Layers are one `Block` scanned
with `nn.scan` over the stacked `[layers, ...]` parameters, so compile time does not grow with
depth.

`forward` also accepts *unstacked* layers (`unstack_layers(params)`: `params["layers"]` a tuple
of per-layer dicts, one buffer per weight); the layer loop is then unrolled in Python. Decode
wants this: inside a scan XLA:CPU copies every layer's weight matrices out of the stacked
arrays on every iteration (a `dynamic-slice` per weight and step), which for one token per row
costs as much as the matmuls themselves, and a stacked KV cache carried through the scan is
rewritten every step. With separate buffers the weights are read in place and each layer's
cache (`KVCache.init(..., per_layer=True)`) is updated in place in the decode loop's carry.

Conventions
- `positions [batch, seq]` are the RoPE positions; a position < 0 marks a padding slot. Masks
  are built from positions, not indices, so left- and right-padded rows, prefill and cached
  decode all share one code path.
- LoRA adapters are a separate pytree `{target: (a, b)}` for targets in
  `cfg.projection_shapes()`; `a [layers, in, r]` + `b [layers, r, out]` is one adapter for
  every row, `a [batch, layers, in, r]` + `b [batch, layers, r, out]` one adapter per row. The
  LoRA scale is folded into `b` by the caller, so merging k adapters is rank concatenation.
  `W + ab` is never formed: `y = x @ W + (x @ a) @ b`.
- `cfg.weight_dtype` (e.g. bfloat16, weights cast by `params.cast_weights`): `x @ W` takes
  both operands in that dtype and accumulates in the compute dtype (`weight_matmul`); the
  residual stream, norms, attention, LoRA path and logits stay in the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jprag.model.config import ModelConfig
from jprag.model.params import param_shapes

Array = jax.Array
Adapters = Mapping[str, tuple[Array, Array]]


class KVCache(NamedTuple):
    """Keys/values of every layer plus the RoPE position held in each slot (-1 = empty).

    k     [layers, batch, kv_heads, head_dim, slots] (slots minor: a decode query's scores
          are then a reduction over a major axis, vectorised along the slots)
    v     [layers, batch, kv_heads, slots, head_dim] (slots second-minor: `probs @ v` reduces
          over them). Both are the layouts the attention products read without a transpose;
          decode would otherwise re-layout the whole cache of every layer at every step.
          With `per_layer`, k and v are tuples of `layers` arrays without the layer axis.
    pos   [batch, slots] int32
    index []  int32: the next slot to write (all rows write the same slot; rows are
          left-padded so their prompts end together).
    """

    k: Array
    v: Array
    pos: Array
    index: Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, slots: int, dtype=None, per_layer: bool = False) -> "KVCache":
        dtype = dtype or cfg.dtype
        k_shape = (batch, cfg.n_kv_heads, cfg.head_dim, slots)
        v_shape = (batch, cfg.n_kv_heads, slots, cfg.head_dim)
        if per_layer:
            k = tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.n_layers))
            v = tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.n_layers))
        else:
            k = jnp.zeros((cfg.n_layers, *k_shape), dtype)
            v = jnp.zeros((cfg.n_layers, *v_shape), dtype)
        return cls(
            k=k,
            v=v,
            pos=jnp.full((batch, slots), -1, jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )


def rms_norm(x: Array, w: Array, eps: float, plus_one: bool) -> Array:
    """RMSNorm in float32 (as the reference implementations), cast back to x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    scale = (1.0 + w.astype(jnp.float32)) if plus_one else w.astype(jnp.float32)
    if plus_one:  # Gemma multiplies in float32 then casts
        return (y * scale).astype(x.dtype)
    return y.astype(x.dtype) * scale.astype(x.dtype)


def rope_tables(inv_freq: np.ndarray, positions_bt: Array) -> tuple[Array, Array]:
    """cos/sin tables [batch, seq, head_dim // 2] in float32."""
    angles = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_bthd: Array, cos_btf: Array, sin_btf: Array) -> Array:
    """Rotate-half RoPE (the Hugging Face convention; GGUF's interleaving is undone at load)."""
    half = x_bthd.shape[-1] // 2
    x1, x2 = x_bthd[..., :half].astype(jnp.float32), x_bthd[..., half:].astype(jnp.float32)
    cos, sin = cos_btf[:, :, None, :], sin_btf[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bthd.dtype)


def weight_matmul(spec: str, x: Array, w: Array, matmul_dtype: str | None = None) -> Array:
    """`einsum(spec, x, w)` with a frozen weight `w`, returned in x's dtype.

    `matmul_dtype` (`ModelConfig.matmul_dtype`): both operands in that dtype, products
    accumulated in x's dtype (`preferred_element_type`), as MXU/tensor-core matmuls do — not a
    low-precision output rounded back up. None: operands in x's dtype.
    """
    if matmul_dtype is None:
        return jnp.einsum(spec, x, w.astype(x.dtype))
    md = jnp.dtype(matmul_dtype)
    return jnp.einsum(spec, x.astype(md), w.astype(md), preferred_element_type=x.dtype)


def project(
    x_bsi: Array,
    w_io: Array,
    lora: tuple[Array, Array] | None,
    bias_o: Array | None = None,
    matmul_dtype: str | None = None,
) -> Array:
    """`x @ W (+ bias) (+ (x @ a) @ b)` for one layer; `a`, `b` shared or per row.

    The LoRA path stays in x's dtype whatever `matmul_dtype` (see `weight_matmul`) says: the
    adapters are small, trained and summed over documents, so they keep full precision.
    """
    y_bso = weight_matmul("bsi,io->bso", x_bsi, w_io, matmul_dtype)
    if bias_o is not None:
        y_bso = y_bso + bias_o.astype(y_bso.dtype)
    if lora is not None:
        a, b = lora
        y_bso = y_bso + lora_delta(x_bsi, a.astype(x_bsi.dtype), b.astype(x_bsi.dtype))
    return y_bso


def _lora_h(x_bsi: Array, a: Array) -> Array:
    if a.ndim == 2:  # [in, r]: one adapter for every row
        return jnp.einsum("bsi,ir->bsr", x_bsi, a)
    return jnp.einsum("bsi,bir->bsr", x_bsi, a)  # [batch, in, r]: per-row adapters


def _lora_out(h_bsr: Array, b: Array) -> Array:
    if b.ndim == 2:
        return jnp.einsum("bsr,ro->bso", h_bsr, b)
    return jnp.einsum("bsr,bro->bso", h_bsr, b)


@jax.custom_vjp
def lora_delta(x_bsi: Array, a: Array, b: Array) -> Array:
    """`(x @ a) @ b` with `a [in, r]`, `b [r, out]` shared or `[batch, ...]` per row.

    The custom backward pass computes the factor gradients `Σ_s h_sr dy_so` and `Σ_s x_si dh_sr`
    as r multiply-reduce passes instead of dots that contract the sequence axis: for the small
    ranks LoRA uses, XLA:CPU otherwise transposes whole `[batch, seq, d_ff]` activations (fused
    with the activation's backward) into a sequence-minor layout for those dots, which cost more
    than the rest of the adapter's backward pass together.
    """
    return _lora_out(_lora_h(x_bsi, a), b)


def _lora_delta_fwd(x_bsi, a, b):
    h_bsr = _lora_h(x_bsi, a)
    return _lora_out(h_bsr, b), (x_bsi, h_bsr, a, b)


def _lora_delta_bwd(res, dy_bso):
    x_bsi, h_bsr, a, b = res
    shared = a.ndim == 2
    dh_bsr = jnp.einsum("bso,ro->bsr", dy_bso, b) if shared else jnp.einsum("bso,bro->bsr", dy_bso, b)
    dx_bsi = jnp.einsum("bsr,ir->bsi", dh_bsr, a) if shared else jnp.einsum("bsr,bir->bsi", dh_bsr, a)
    axes = (0, 1) if shared else (1,)
    r = h_bsr.shape[-1]
    db = jnp.stack([jnp.sum(h_bsr[..., k, None] * dy_bso, axis=axes) for k in range(r)], axis=-2)
    da = jnp.stack([jnp.sum(dh_bsr[..., k, None] * x_bsi, axis=axes) for k in range(r)], axis=-1)
    return dx_bsi, da.astype(a.dtype), db.astype(b.dtype)


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def attention_mask(q_pos_bt: Array, k_pos_bs: Array, window: int | None) -> Array:
    """[batch, 1, 1, q, k] bool: key valid, causal by position, and inside the window."""
    q = q_pos_bt[:, :, None]
    k = k_pos_bs[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask = mask & (q - k < window)
    return mask[:, None, None, :, :]


# Weights that unstacked decode layers hold concatenated along the output axis (`fuse_layer`):
# one matmul instead of several. At decode's few rows per step a matmul streams its weight
# once whatever its width, so fewer, wider matmuls mean fewer passes and less dispatch.
FUSED = {"qkv": ("q", "k", "v"), "qkv_bias": ("q_bias", "k_bias", "v_bias"), "gate_up": ("gate", "up")}


def fuse_layer(layer: Mapping[str, Array]) -> dict[str, Array]:
    """One unstacked layer's params with q/k/v (and biases) and gate/up concatenated."""
    out = {k: v for k, v in layer.items() if not any(k in parts for parts in FUSED.values())}
    for name, parts in FUSED.items():
        if all(part in layer for part in parts):
            out[name] = jnp.concatenate([layer[part] for part in parts], axis=-1)
    return out


def _fused_shapes(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    out = {k: v for k, v in shapes.items() if not any(k in parts for parts in FUSED.values())}
    qkv = cfg.q_dim + 2 * cfg.kv_dim
    out["qkv"] = (cfg.d_model, qkv)
    out["gate_up"] = (cfg.d_model, 2 * cfg.d_ff)
    if cfg.qkv_bias:
        out["qkv_bias"] = (qkv,)
    return out


def _plus_lora(y_bso: Array, x_bsi: Array, lora: tuple[Array, Array] | None) -> Array:
    if lora is None:
        return y_bso
    a, b = lora
    return y_bso + lora_delta(x_bsi, a.astype(x_bsi.dtype), b.astype(x_bsi.dtype))


class Block(nn.Module):
    """One decoder layer; `nn.scan` stacks its parameters on a leading layer axis.

    `fused`: the layer's params come from `fuse_layer` (q/k/v and gate/up concatenated).
    """

    cfg: ModelConfig
    fused: bool = False

    def _param(self, name: str, shape: tuple[int, ...]) -> Array:
        if name.endswith("norm"):
            init = nn.initializers.zeros if self.cfg.norm_plus_one else nn.initializers.ones
        elif name.endswith("bias"):
            init = nn.initializers.zeros
        else:
            init = nn.initializers.normal(0.02)
        return self.param(name, init, shape, jnp.float32)

    @nn.compact
    def __call__(self, x_btd: Array, layer: dict[str, Any], ctx: dict[str, Any]):
        cfg = self.cfg
        shapes = {k: v[1:] for k, v in param_shapes(cfg)["layers"].items()}
        if self.fused:
            shapes = _fused_shapes(cfg, shapes)
        p = {name: self._param(name, shape) for name, shape in shapes.items()}
        lora = layer["adapters"] or {}
        norm = lambda h, w: rms_norm(h, w, cfg.norm_eps, cfg.norm_plus_one)  # noqa: E731
        proj = functools.partial(project, matmul_dtype=cfg.matmul_dtype)
        B, T, _ = x_btd.shape

        # --- attention -------------------------------------------------------------
        h = norm(x_btd, p["attn_norm"])
        if self.fused:
            qkv = proj(h, p["qkv"], None, p.get("qkv_bias"))
            q, k, v = jnp.split(qkv, [cfg.q_dim, cfg.q_dim + cfg.kv_dim], axis=-1)
            q, k, v = (_plus_lora(y, h, lora.get(n)) for y, n in ((q, "q"), (k, "k"), (v, "v")))
        else:
            q = proj(h, p["q"], lora.get("q"), p.get("q_bias"))
            k = proj(h, p["k"], lora.get("k"), p.get("k_bias"))
            v = proj(h, p["v"], lora.get("v"), p.get("v_bias"))
        q = q.reshape(B, T, cfg.n_heads, cfg.head_dim)
        k = k.reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        v = v.reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = norm(q, p["q_norm"]), norm(k, p["k_norm"])
        sliding = layer["is_sliding"]
        if isinstance(sliding, bool):  # unrolled layers: a static choice
            local = "_local" if sliding else ""
            cos, sin, mask = ctx["cos" + local], ctx["sin" + local], ctx["mask" + local]
        elif "sliding" in cfg.layer_types:  # scanned: a per-layer choice between local and global
            cos = jnp.where(sliding, ctx["cos_local"], ctx["cos"])
            sin = jnp.where(sliding, ctx["sin_local"], ctx["sin"])
            mask = jnp.where(sliding, ctx["mask_local"], ctx["mask"])  # [b, 1, 1, t, s]
        else:  # static: no per-layer select, so nothing loop-invariant is stacked per layer
            cos, sin, mask = ctx["cos"], ctx["sin"], ctx["mask"]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # k [b, kv, h, t], v [b, kv, t, h]
        cache = layer["cache"]
        if cache is not None:  # write this chunk into the layer's slots, attend to all slots
            idx = ctx["cache_index"]
            k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, 0, 0, idx))
            v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, 0, idx, 0))
            new_cache = {"k": k_all, "v": v_all}
        else:
            k_all, v_all, new_cache = k, v, None

        G = cfg.n_heads // cfg.n_kv_heads
        q = q.reshape(B, T, cfg.n_kv_heads, G, cfg.head_dim)  # GQA: group queries, never repeat K/V
        decode = T == 1  # one query per row: matrix-vector products, as multiply-reduce (below)
        if decode:  # XLA:CPU runs tiny batched dots one batch at a time; a reduce fusion is one pass
            scores = jnp.sum(q[:, 0, :, :, :, None] * k_all[:, :, None].astype(q.dtype), axis=-2)[:, :, :, None]
            scores = scores.astype(jnp.float32) * cfg.scale
        else:
            scores = jnp.einsum("btkgh,bkhs->bkgts", q, k_all.astype(q.dtype)).astype(jnp.float32) * cfg.scale
        if cfg.attn_logit_softcap:
            scores = jnp.tanh(scores / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x_btd.dtype)
        if decode:
            attn = jnp.sum(probs[:, :, :, 0, :, None] * v_all[:, :, None].astype(x_btd.dtype), axis=-2)
            attn = attn.reshape(B, T, cfg.q_dim)  # [b, k, g, h] → [b, 1, k·g·h]
        else:
            attn = jnp.einsum("bkgts,bksh->btkgh", probs, v_all.astype(x_btd.dtype)).reshape(B, T, cfg.q_dim)
        out = proj(attn, p["o"], lora.get("o"))
        if cfg.sandwich_norms:
            out = norm(out, p["post_attn_norm"])
        x_btd = x_btd + out

        # --- feed-forward ------------------------------------------------------------
        h = norm(x_btd, p["ffn_norm"])
        if self.fused:
            gate, up = jnp.split(proj(h, p["gate_up"], None), 2, axis=-1)
            gate, up = _plus_lora(gate, h, lora.get("gate")), _plus_lora(up, h, lora.get("up"))
        else:
            gate, up = proj(h, p["gate"], lora.get("gate")), proj(h, p["up"], lora.get("up"))
        act = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        out = proj(act * up, p["down"], lora.get("down"))
        if cfg.sandwich_norms:
            out = norm(out, p["post_ffn_norm"])
        return x_btd + out, new_cache


class Transformer(nn.Module):
    """Decoder-only LM. `__call__(tokens, positions, cache=None, adapters=None, output='logits')`.

    `output`: 'logits' → logits [b, t, vocab] (float32); 'last' → logits [b, 1, vocab] of the
    last position only; 'hidden' → final-norm hidden states [b, t, d].
    Returns `(output, new_cache | None)`.
    """

    cfg: ModelConfig
    unrolled: bool = False  # params "layers_0" … "layers_{L-1}" instead of stacked "layers"
    fused: bool = False  # unrolled layers hold `fuse_layer` params

    @nn.compact
    def __call__(
        self,
        tokens_bt: Array,
        positions_bt: Array,
        cache: KVCache | None = None,
        adapters: Adapters | None = None,
        output: str = "logits",
    ):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        embed = self.param("embed", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.d_model), jnp.float32)
        x = jnp.take(embed, tokens_bt, axis=0).astype(dtype)
        if cfg.embed_scale != 1.0:
            x = x * jnp.asarray(cfg.embed_scale, dtype)

        head_params = {
            "embed": embed,
            "final_norm": self.param(
                "final_norm", nn.initializers.zeros if cfg.norm_plus_one else nn.initializers.ones, (cfg.d_model,)
            ),
            "lm_head": None
            if cfg.tie_embeddings
            else self.param("lm_head", nn.initializers.normal(0.02), (cfg.d_model, cfg.vocab_size), jnp.float32),
        }

        positions_bt = positions_bt.astype(jnp.int32)
        if cache is not None:
            k_pos = jax.lax.dynamic_update_slice(cache.pos, positions_bt, (0, cache.index))
        else:
            k_pos = positions_bt
        cos, sin = rope_tables(cfg.rope.inv_freq(cfg.head_dim), positions_bt)
        ctx = {
            "cos": cos,
            "sin": sin,
            "mask": attention_mask(positions_bt, k_pos, None),
            "cache_index": None if cache is None else cache.index,
        }
        if "sliding" in cfg.layer_types:
            local_rope = cfg.rope_local or cfg.rope
            ctx["cos_local"], ctx["sin_local"] = rope_tables(local_rope.inv_freq(cfg.head_dim), positions_bt)
            ctx["mask_local"] = attention_mask(positions_bt, k_pos, cfg.sliding_window)
        if self.unrolled:
            x, new_k, new_v = x, [], []
            for i in range(cfg.n_layers):
                inputs = {
                    "is_sliding": bool(cfg.is_sliding[i]),
                    "adapters": None
                    if not adapters
                    else {name: tuple(t[i] if t.ndim == 3 else t[:, i] for t in ab) for name, ab in adapters.items()},
                    "cache": None if cache is None else {"k": cache.k[i], "v": cache.v[i]},
                }
                x, c = Block(cfg, fused=self.fused, name=f"layers_{i}")(x, inputs, ctx)
                if cache is not None:
                    new_k.append(c["k"])
                    new_v.append(c["v"])
            layer_cache = None if cache is None else {"k": tuple(new_k), "v": tuple(new_v)}
            return self._head(x, cache, layer_cache, k_pos, tokens_bt, output, head_params)
        layer_inputs = {
            "is_sliding": jnp.asarray(cfg.is_sliding),
            # per-layer slices: move the layer axis to the front for the scan
            "adapters": None
            if not adapters
            else {
                name: tuple(t if t.ndim == 3 else jnp.moveaxis(t, 1, 0) for t in ab) for name, ab in adapters.items()
            },
            "cache": None if cache is None else {"k": cache.k, "v": cache.v},
        }
        block = Block
        if cfg.remat:
            block = nn.remat(Block, prevent_cse=False)
        scanned = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            out_axes=0,
            length=cfg.n_layers,
        )
        x, layer_cache = scanned(cfg, name="layers")(x, layer_inputs, ctx)
        return self._head(x, cache, layer_cache, k_pos, tokens_bt, output, head_params)

    def _head(self, x, cache, layer_cache, k_pos, tokens_bt, output, head_params):
        cfg = self.cfg
        new_cache = None
        if cache is not None:
            new_cache = KVCache(layer_cache["k"], layer_cache["v"], k_pos, cache.index + tokens_bt.shape[1])
        if output == "last":  # only the last position's logits (prefill/decode: skip [b, t, vocab])
            x = x[:, -1:, :]
        x = rms_norm(x, head_params["final_norm"], cfg.norm_eps, cfg.norm_plus_one)
        if output == "hidden":
            return x, new_cache
        return lm_head(cfg, head_params, x), new_cache


def lm_head(cfg: ModelConfig, params: Mapping[str, Any], x_btd: Array) -> Array:
    """float32 logits [..., vocab] from final-norm hidden states (tied or untied head, softcap)."""
    if cfg.tie_embeddings:
        logits = weight_matmul("...d,vd->...v", x_btd, params["embed"], cfg.matmul_dtype)
    else:
        logits = weight_matmul("...d,dv->...v", x_btd, params["lm_head"], cfg.matmul_dtype)
    logits = logits.astype(jnp.float32)
    if cfg.final_logit_softcap:
        logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return logits


def forward(
    cfg: ModelConfig,
    params: Mapping[str, Any],
    tokens_bt: Array,
    positions_bt: Array,
    cache: KVCache | None = None,
    adapters: Adapters | None = None,
    output: str = "logits",
):
    """Pure function form: `(logits | hidden, new_cache)`; jit it with `cfg` static.

    `params["layers"]` is either the stacked dict (layers scanned) or, from `unstack_layers`,
    a tuple of per-layer dicts (layers unrolled; pair it with a per-layer `KVCache`).
    """
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        if len(layers) != cfg.n_layers:
            raise ValueError(f"unstacked params have {len(layers)} layers, the config {cfg.n_layers}")
        flat = {k: v for k, v in params.items() if k != "layers"}
        flat.update({f"layers_{i}": p for i, p in enumerate(layers)})
        fused = any(name in layers[0] for name in FUSED)
        return Transformer(cfg, unrolled=True, fused=fused).apply(
            {"params": flat}, tokens_bt, positions_bt, cache, adapters, output
        )
    return Transformer(cfg).apply({"params": params}, tokens_bt, positions_bt, cache, adapters, output)


def unstack_layers(params: Mapping[str, Any], fuse: bool = False) -> dict[str, Any]:
    """`params` with `layers` as a tuple of per-layer dicts, each weight its own buffer.

    Costs one copy of the layer weights; `forward` then unrolls the layer loop (see the module
    docstring for why decode wants this). `fuse`: also concatenate q/k/v and gate/up
    (`fuse_layer`); LoRA adapters still address q, k, v, gate, up by name.
    """
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        return dict(params)
    n = len(jax.tree.leaves(layers)[0])
    out = dict(params)
    out["layers"] = tuple(jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n))
    if fuse:
        out["layers"] = tuple(fuse_layer(layer) for layer in out["layers"])
    return out


def init_params(cfg: ModelConfig, key: Array) -> dict[str, Any]:
    """Random parameters with the loaded-checkpoint layout (for tests and from-scratch use)."""
    tokens = jnp.zeros((1, 4), jnp.int32)
    return Transformer(cfg).init(key, tokens, jnp.arange(4)[None])["params"]


def positions_from_mask(mask_bt: Array) -> Array:
    """RoPE positions from a padding mask (1 = real token): 0, 1, ... over real tokens, -1 on padding."""
    mask_bt = jnp.asarray(mask_bt).astype(jnp.int32)
    return jnp.where(mask_bt > 0, jnp.cumsum(mask_bt, axis=-1) - 1, -1)


def num_flops_per_token(cfg: ModelConfig) -> float:
    """Forward matmul FLOPs per token (2 * matmul params, excluding attention over the context)."""
    n = sum(i * o for i, o in cfg.projection_shapes().values()) * cfg.n_layers + cfg.d_model * cfg.vocab_size
    return 2.0 * n


__all__ = [
    "KVCache",
    "Transformer",
    "forward",
    "init_params",
    "unstack_layers",
    "positions_from_mask",
    "num_flops_per_token",
    "lm_head",
    "rms_norm",
    "apply_rope",
    "project",
    "weight_matmul",
    "lora_delta",
    "attention_mask",
]
