"""Training the translator on (document, PRAG adapter) pairs: jitted data-parallel steps,
checkpointed and resumable.

Each epoch shuffles the training documents (a permutation keyed by `(seed, epoch)`) into groups
of D documents; a group yields one step per PRAG sample index (step t holds each document's
t-th sample, as in the encoder; each process builds only its own rows). The translator is
shared by all documents, so a step's gradient is the mean over its documents: the document axis of the batch is sharded
over the mesh's `data` axis, the translator and its optimizer state are replicated, and XLA
reduces the gradient across devices. The schedule is a pure function of the inputs, so a run
resumed from a checkpoint replays exactly the steps an uninterrupted run would take.
"""

from __future__ import annotations

import functools
import pathlib
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from jprag import distributed
from jprag.lora.adapters import Bank, LoraConfig
from jprag.lora.store import lora_to_json
from jprag.mesh import doc_shardings, make_mesh, pad_to_data, param_shardings, replicated
from jprag.model.config import ModelConfig
from jprag.train.loop import docs_per_step, make_batch, seq_rows, step_length
from jprag.train.recipe import Example
from jprag.translator import store
from jprag.translator.config import TranslatorConfig
from jprag.translator.hypernet import Translator, TranslatorSpec, fit_stats, init_translator
from jprag.translator.objective import translator_loss

LENGTH_MULTIPLE = 64  # step lengths are rounded up to this (the encoder's default), so few shapes compile


def optimizer(tcfg: TranslatorConfig) -> optax.GradientTransformation:
    return optax.adamw(tcfg.learning_rate, weight_decay=tcfg.weight_decay)


def make_translator_step(cfg: ModelConfig, lora: LoraConfig, tcfg: TranslatorConfig, spec: TranslatorSpec,
                         opt: optax.GradientTransformation):
    """`step(params, translator, opt_state, batch) -> (translator, opt_state, metrics)` (not jitted).

    Only the MLPs are trained; the fixed statistics (`translator["stats"]`) pass through."""

    def step(params, translator, opt_state, batch):
        def loss_fn(mlp):
            return translator_loss(cfg, lora, tcfg, spec, params, {"stats": translator["stats"], "mlp": mlp}, batch)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(translator["mlp"])
        updates, opt_state = opt.update(grads, opt_state, translator["mlp"])
        new = {"stats": translator["stats"], "mlp": optax.apply_updates(translator["mlp"], updates)}
        return new, opt_state, metrics

    return step


def jit_translator_step(step, mesh, params, translator, opt_state, batch):
    """Jit `step` on `mesh`: documents of the batch over `data`, base params as `param_shardings`,
    translator and optimizer state replicated and donated."""
    rep = lambda tree: jax.tree.map(lambda _: replicated(mesh), tree)  # noqa: E731
    t_sh, o_sh = rep(translator), rep(opt_state)
    return jax.jit(
        step,
        in_shardings=(param_shardings(params, mesh), t_sh, o_sh, doc_shardings(batch, mesh)),
        out_shardings=(t_sh, o_sh, replicated(mesh)),
        donate_argnums=(1, 2),
    )


@functools.lru_cache(maxsize=4)
def _step(cfg, lora, tcfg, spec):
    """One (optimizer, step) per configuration, so repeated runs in a process re-use compiled programs."""
    opt = optimizer(tcfg)
    return opt, make_translator_step(cfg, lora, tcfg, spec, opt)


def plan_groups(n_docs: int, docs_per_step: int, epochs: int, seed: int) -> list[tuple[int, list[int]]]:
    """`(epoch, document rows)` per group, each epoch a fresh permutation keyed by `(seed, epoch)`."""
    groups = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n_docs).tolist()
        groups += [(epoch, order[i : i + docs_per_step]) for i in range(0, n_docs, docs_per_step)]
    return groups


def _meta(cfg, lora, tcfg, spec, doc_ids, model_id, D, groups, per_doc, extra) -> dict[str, Any]:
    return {
        "format": store.FORMAT, "model": model_id, "lora": lora_to_json(lora), "translator": tcfg.training_dict(),
        "spec": spec.to_json(), "doc_ids": list(doc_ids), "docs_per_step": D,
        "total_steps": sum(max(len(per_doc[r]) for r in rows) for _, rows in groups),
        "step": 0, "done": False, "history": [], **extra,
    }


def _check_resumable(old: Mapping[str, Any], new: Mapping[str, Any], root) -> None:
    for field in ("model", "lora", "translator", "spec", "doc_ids", "docs_per_step", "total_steps"):
        if old.get(field) != new.get(field):
            raise store.TranslatorError(
                f"{root}/{store.META}: field {field!r} differs from this run's; the directory holds another "
                "translator (use a new output directory, or delete this one)")


def train_translator(
    cfg: ModelConfig,
    params: Mapping[str, Any],
    lora: LoraConfig,
    tcfg: TranslatorConfig,
    per_doc_examples: Sequence[Sequence[Example]],
    emb: np.ndarray,
    teacher: Bank,
    doc_ids: Sequence[str],
    out_dir: str | pathlib.Path,
    *,
    mesh=None,
    pad_id: int = 0,
    model_id: str = "",
    extra_meta: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> tuple[TranslatorSpec, Translator, dict[str, Any]]:
    """Train (or resume, or load when finished) the translator at `out_dir` on documents with
    their PRAG samples, embeddings `[N, E]` and trained adapters (`teacher`, a bank `[N, ...]`
    in `doc_ids` order). Returns `(spec, translator (numpy), meta)`."""
    n = len(doc_ids)
    if not (len(per_doc_examples) == n == emb.shape[0] == jax.tree.leaves(teacher)[0].shape[0]):
        raise ValueError(f"{len(per_doc_examples)} example lists, {emb.shape[0]} embeddings and "
                         f"{jax.tree.leaves(teacher)[0].shape[0]} adapters for {n} documents")
    if n == 0:
        raise ValueError("the translator needs at least one training document")
    if sorted(teacher) != sorted(lora.targets):
        raise ValueError(f"training adapters cover {sorted(teacher)}, the LoRA config {sorted(lora.targets)}")
    empty = [doc_ids[i] for i, ex in enumerate(per_doc_examples) if not ex]
    if empty:
        raise ValueError(f"{len(empty)} training documents have no PRAG samples (first: {empty[0]!r})")
    k = tcfg.samples_per_doc
    per_doc = [list(ex)[:k] if k else list(ex) for ex in per_doc_examples]
    mesh = mesh or make_mesh()
    D = pad_to_data(docs_per_step(per_doc, tcfg.batch_docs, tcfg.max_tokens_per_step, LENGTH_MULTIPLE), mesh)
    spec = TranslatorSpec.create(cfg, lora, emb.shape[1], tcfg.hidden)
    groups = plan_groups(n, D, tcfg.epochs, tcfg.seed)
    root = pathlib.Path(out_dir)
    meta = _meta(cfg, lora, tcfg, spec, doc_ids, model_id, D, groups, per_doc, dict(extra_meta or {}))
    resuming = (root / store.META).exists()
    distributed.barrier(f"looked for {root / store.META}")  # every process decides before any writes
    if resuming:
        old = store.read_meta(root)
        _check_resumable(old, meta, root)
        if old["done"]:
            return store.load_translator(root)
        meta = old

    opt, step_fn = _step(cfg, lora, tcfg, spec)
    translator = init_translator(spec, jax.random.key(tcfg.seed), fit_stats(emb, teacher), tcfg.out_init_std)
    opt_state = opt.init(translator["mlp"])
    start = meta["step"]
    if start:
        state = store.load_checkpoint(root, start, {"translator": translator, "opt": opt_state})
        translator, opt_state = state["translator"], state["opt"]
    else:
        store.write_meta(root, meta)
    rep = replicated(mesh)
    params = jax.device_put(params, param_shardings(params, mesh))
    translator, opt_state = jax.device_put((translator, opt_state), rep)

    emb = np.asarray(emb, np.float32)
    teacher = jax.tree.map(np.asarray, teacher)
    jitted = None
    bar = tqdm(total=meta["total_steps"], initial=start, unit="step", desc="translator",
               disable=not (progress and distributed.is_primary()))
    t0, i, since, seconds_before = time.perf_counter(), 0, [], meta.get("seconds", 0.0)
    for epoch, rows in groups:
        n_steps = max(len(per_doc[r]) for r in rows)
        if i + n_steps <= start:  # finished before the checkpoint
            i += n_steps
            continue
        pad = D - len(rows)
        group = [per_doc[r] for r in rows] + [[] for _ in range(pad)]
        take = lambda x: np.concatenate([x[rows], np.zeros((pad,) + x.shape[1:], x.dtype)])  # noqa: E731
        side = {"emb": take(emb), "teacher": jax.tree.map(take, teacher)}  # padding rows: zeros
        for t in range(n_steps):  # step t: each document's t-th sample, as the encoder
            i += 1
            if i <= start:
                continue
            examples = [ex[t] if t < len(ex) else None for ex in group]
            seq = step_length(examples, LENGTH_MULTIPLE)

            def build(mine, examples=examples, seq=seq):  # this process's rows only
                part = seq_rows([examples[r] for r in mine], seq, pad_id)
                return {"tokens": part["tokens"][:, 0], "attn_mask": part["attn_mask"][:, 0],
                        "loss_mask": part["loss_mask"][:, 0], "active": part["active"],
                        **jax.tree.map(lambda x: x[mine], side)}

            batch = make_batch(mesh, D, build)
            if jitted is None:
                jitted = jit_translator_step(step_fn, mesh, params, translator, opt_state, batch)
            translator, opt_state, metrics = jitted(params, translator, opt_state, batch)
            since.append(metrics)
            bar.update(1)
            if i % tcfg.checkpoint_every == 0 or i == meta["total_steps"]:
                mean = {k: float(np.mean([float(m[k]) for m in since])) for k in since[0]}
                meta["history"].append({"step": i, "epoch": epoch, **mean})
                bar.set_postfix({k: f"{v:.3g}" for k, v in mean.items()})
                since = []
                meta["seconds"] = seconds_before + time.perf_counter() - t0  # training time over all runs
                if i < meta["total_steps"]:
                    store.save_checkpoint(root, i, {"translator": translator, "opt": opt_state}, meta)
    bar.close()
    meta["seconds"] = seconds_before + time.perf_counter() - t0
    meta["step"] = meta["total_steps"]
    translator = jax.tree.map(np.asarray, translator)
    store.save_final(root, translator, meta)
    return spec, translator, meta
