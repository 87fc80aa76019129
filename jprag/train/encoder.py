"""Scheduling thousands of documents: chunks of D adapters trained stacked, checkpointed, resumable.

Documents are ordered by length before chunking so that a chunk's rows pad to similar
lengths, then each chunk of D documents (D a multiple of the mesh's `data` size) is trained
with the stacked step for `epochs` passes over its PRAG samples (one sample per document per
step, as the reference's batch size 1). After each chunk its rows are written to the bank
directory and the index is updated; re-running with the same arguments skips finished chunks,
and a run resumed on another mesh (or chunk size) re-plans only the unfinished rows.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jprag.lora.adapters import LoraConfig, init_bank
from jprag.lora.store import FORMAT, BankError, chunk_number, lora_to_json, read_index, save_chunk, write_index
from jprag.mesh import doc_shardings, make_mesh, pad_to_data, param_shardings
from jprag.model.config import ModelConfig
from jprag.train.recipe import Example, pack_step_batches
from jprag.train.stacked import TrainConfig, init_opt_state, jit_train_step, make_train_step


def bucket_length(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def plan_chunks(
    per_doc_examples: Sequence[Sequence[Example]], chunk_size: int, rows: Sequence[int] | None = None
) -> list[list[int]]:
    """Row indices per chunk (of `rows`, default all), longest documents first, so each chunk
    pads to similar lengths."""
    total = [sum(len(e.tokens) for e in ex) for ex in per_doc_examples]
    order = sorted(range(len(total)) if rows is None else rows, key=lambda i: (-total[i], i))
    return [order[i : i + chunk_size] for i in range(0, len(order), chunk_size)]


def resume_chunks(
    old_chunks: Sequence[Mapping[str, Any]], per_doc_examples: Sequence[Sequence[Example]], chunk_size: int
) -> list[dict[str, Any]]:
    """The chunk list a resumed run works from: finished chunks as they were, the rows of the
    unfinished ones planned again with this run's chunk size.

    Re-planning is sound because a row's result does not depend on its chunk: rows train
    independently (per-row optimizer state, no cross-row reduction) from an initialisation
    keyed by the row's global index. So a run may resume on a mesh with another `data` size, or
    with another chunk size, and lose no finished chunk. Each entry names its checkpoint
    directory (`dir`); new chunks take the numbers no finished chunk holds, so an unchanged
    plan keeps its numbering.
    """
    done = [dict(c, dir=chunk_number(i, c)) for i, c in enumerate(old_chunks) if c.get("done")]
    done_rows = {r for c in done for r in c["rows"]}
    todo = [r for r in range(len(per_doc_examples)) if r not in done_rows]
    taken = {c["dir"] for c in done}
    free = (n for n in range(len(old_chunks) + len(todo) + 1) if n not in taken)
    new = [{"rows": rows, "done": False, "dir": next(free)} for rows in plan_chunks(per_doc_examples, chunk_size, todo)]
    return sorted(done + new, key=lambda c: c["dir"])


@functools.lru_cache(maxsize=4)
def _train_step(cfg: ModelConfig, lora: LoraConfig, train: TrainConfig):
    """`(optimizer, step)`, one per configuration: re-using the same step function lets JAX re-use
    its compiled programs when `encode_documents` runs again in the same process."""
    optimizer = train.optimizer()
    return optimizer, make_train_step(cfg, lora, optimizer)


def _new_index(doc_ids, lora, train, model_id, chunks, seed, shapes, extra) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": model_id,
        "lora": lora_to_json(lora),
        "train": dataclasses.asdict(train),
        "seed": seed,
        "doc_ids": list(doc_ids),
        "shapes": shapes,
        "dtype": "float32",
        "chunks": [{"rows": rows, "done": False, "dir": c} for c, rows in enumerate(chunks)],
        **extra,
    }


def _check_resumable(old: Mapping[str, Any], new: Mapping[str, Any], root) -> None:
    for field in ("model", "lora", "train", "seed", "doc_ids", "shapes"):
        if old.get(field) != new.get(field):
            raise BankError(
                f"{root}/index.json: field {field!r} differs from this run's; the directory holds "
                "another encoding run (use a new output directory, or --overwrite)"
            )


def encode_documents(
    cfg: ModelConfig,
    params: Mapping[str, Any],
    per_doc_examples: Sequence[Sequence[Example]],
    doc_ids: Sequence[str],
    out_dir: str | pathlib.Path,
    *,
    lora: LoraConfig = LoraConfig(),
    train: TrainConfig = TrainConfig(),
    chunk_size: int = 32,
    mesh=None,
    seed: int = 0,
    pad_id: int = 0,
    model_id: str = "",
    length_multiple: int = 32,
    extra_index: Mapping[str, Any] | None = None,
    progress: bool = True,
    shared_init: bool = False,
) -> dict[str, Any]:
    """Train one adapter per document into the bank at `out_dir`; returns the final index.

    Resumable: finished chunks recorded in `out_dir/index.json` are skipped. `shared_init`:
    every document starts from the same initial A (document index 0's draw), as the DyPRAG
    reference does, so trained factors differ only by what the documents taught; by default
    each document draws its own (`init_bank`).
    """
    if len(per_doc_examples) != len(doc_ids):
        raise ValueError(f"{len(per_doc_examples)} example lists for {len(doc_ids)} document ids")
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError("document ids must be unique")
    empty = [doc_ids[i] for i, ex in enumerate(per_doc_examples) if not ex]
    if empty:
        raise ValueError(f"{len(empty)} documents have no training samples (first: {empty[0]!r})")
    mesh = mesh or make_mesh()
    longest = max(bucket_length(len(e.tokens), length_multiple) for ex in per_doc_examples for e in ex)
    D = pad_to_data(min(chunk_size, len(doc_ids), max(1, train.max_tokens_per_step // longest)), mesh)
    root = pathlib.Path(out_dir)
    shapes = {t: {k: list(v) for k, v in ab.items()} for t, ab in lora.shapes(cfg).items()}
    extra = dict(extra_index or {})
    if shared_init:
        extra["shared_init"] = True
    index = _new_index(doc_ids, lora, train, model_id, plan_chunks(per_doc_examples, D), seed, shapes, extra)
    if (root / "index.json").exists():
        old = read_index(root)
        _check_resumable(old, index, root)
        index = dict(old, chunks=resume_chunks(old["chunks"], per_doc_examples, D))
    write_index(root, index)

    optimizer, step = _train_step(cfg, lora, train)
    key = jax.random.key(seed)
    jitted = None
    # Everything the step takes lives on the mesh from the first step on: an unsharded first
    # argument would be a different input type (one more compile per shape) and the base
    # params would be resharded on every step.
    todo = [c for c, chunk in enumerate(index["chunks"]) if not chunk["done"]]
    if todo:
        params = jax.device_put(params, param_shardings(params, mesh))
    n_done = len(doc_ids) - sum(len(index["chunks"][c]["rows"]) for c in todo)
    bar = tqdm(total=len(doc_ids), initial=n_done, unit="doc", desc="encode", disable=not progress)
    for c in todo:
        t0 = time.perf_counter()
        rows = index["chunks"][c]["rows"]
        examples = [list(per_doc_examples[r]) for r in rows] + [[] for _ in range(D - len(rows))]
        # padding rows draw init from index -1 and are never active
        init_rows = [0] * len(rows) if shared_init else list(rows)
        bank = init_bank(cfg, lora, key, jnp.asarray(init_rows + [-1] * (D - len(rows))))
        bank = jax.device_put(bank, doc_shardings(bank, mesh))
        opt_state = init_opt_state(optimizer, bank)
        opt_state = jax.device_put(opt_state, doc_shardings(opt_state, mesh))
        steps = pack_step_batches(examples, pad_id, multiple=length_multiple) * train.epochs
        n_tokens, losses = 0, []
        for batch in steps:
            batch = {
                "tokens": batch["tokens"][:, None],  # [D, n=1, S]: one sample per document per step
                "attn_mask": batch["attn_mask"][:, None],
                "loss_mask": batch["loss_mask"][:, None],
                "active": batch["active"].astype(np.float32),
            }
            if jitted is None:
                jitted = jit_train_step(step, mesh, params, bank, opt_state, batch)
            bank, opt_state, loss = jitted(params, bank, opt_state, batch)
            n_tokens += int(batch["attn_mask"].sum())
            losses.append(loss)
        real = {t: {k: np.asarray(v)[: len(rows)] for k, v in ab.items()} for t, ab in bank.items()}
        save_chunk(root, index["chunks"][c]["dir"], real)
        final = np.asarray(losses[-1])[: len(rows)] if losses else np.zeros(0)
        seconds = time.perf_counter() - t0
        index["chunks"][c].update(done=True, seconds=seconds, tokens=n_tokens, final_loss=float(final.mean()))
        write_index(root, index)
        bar.update(len(rows))
        bar.set_postfix(docs_per_s=f"{len(rows) / seconds:.2f}", tok_per_s=f"{n_tokens / seconds:.0f}",
                        loss=f"{float(final.mean()):.3f}")
    bar.close()
    return index
