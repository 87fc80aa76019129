"""PRAG encoding of thousands of documents: one adapter per document, trained stacked in chunks.

The schedule is `jprag.train.loop.train_rows` (documents sorted by length, chunks of D rows, D a
multiple of the mesh's `data` size, `epochs` passes over each document's PRAG samples with one
sample per document per step, checkpointed per chunk, resumable on another mesh, chunk size or
process count). This module supplies PRAG's part: the bank and its per-row AdamW state as the
rows' state, the stacked step (`jprag.train.stacked`), and the bank index.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from jprag.lora.adapters import LoraConfig, init_bank
from jprag.lora.store import FORMAT, BankError, chunk_dir, lora_to_json, read_index, save_chunk
from jprag.mesh import make_mesh, param_shardings
from jprag.model.config import ModelConfig
from jprag.train.loop import RowTask, bucket_length, check_documents, docs_per_step, plan_chunks, resume_chunks, train_rows
from jprag.train.recipe import Example
from jprag.train.stacked import TrainConfig, init_opt_state, make_train_step

__all__ = ["encode_documents", "bucket_length", "chunk_dir", "plan_chunks", "resume_chunks", "RESUME_FIELDS"]

# What must match for a directory to be resumed by this run.
RESUME_FIELDS = ("model", "lora", "train", "seed", "doc_ids", "shapes")


@functools.lru_cache(maxsize=8)
def _row_functions(cfg: ModelConfig, lora: LoraConfig, train: TrainConfig, seed: int, shared_init: bool):
    """`(init, step)` of PRAG rows, one pair per configuration: the same function objects let
    JAX re-use their compiled programs when `encode_documents` runs again in the process."""
    optimizer = train.optimizer()
    stacked = make_train_step(cfg, lora, optimizer)

    def init(doc_d):
        # shared_init: every real row draws document 0's A (padding rows keep index -1)
        idx = jnp.where(doc_d >= 0, 0, -1) if shared_init else doc_d
        bank = init_bank(cfg, lora, jax.random.key(seed), idx)
        return bank, init_opt_state(optimizer, bank)

    def step(params, state, batch):
        bank, opt_state, loss = stacked(params, *state, batch)
        return (bank, opt_state), loss

    return init, step


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
    every document starts from the same initial A (document index 0's draw), as the PRAG and
    DyPRAG references do, so trained factors differ only by what the documents taught; by
    default each document draws its own (`init_bank`). Multi-host: every process calls this
    with the same arguments; each builds and trains only the rows its devices hold.
    """
    check_documents(per_doc_examples, doc_ids, "PRAG encoding")
    mesh = mesh or make_mesh()
    D = docs_per_step(per_doc_examples, chunk_size, train.max_tokens_per_step, length_multiple)
    shapes = {t: {k: list(v) for k, v in ab.items()} for t, ab in lora.shapes(cfg).items()}
    index = {
        "format": FORMAT, "model": model_id, "lora": lora_to_json(lora), "train": dataclasses.asdict(train),
        "seed": seed, "doc_ids": list(doc_ids), "shapes": shapes, "dtype": "float32",
        **dict(extra_index or {}), **({"shared_init": True} if shared_init else {}),
    }
    init, step = _row_functions(cfg, lora, train, seed, shared_init)
    task = RowTask(init=init, step=step, consts=params, const_shardings=param_shardings(params, mesh),
                   saved=lambda state: state[0], epochs=train.epochs)
    index, _ = train_rows(
        task, per_doc_examples, out_dir, index, resume_fields=RESUME_FIELDS, read_index=read_index,
        chunk_docs=D, mesh=mesh, pad_id=pad_id, length_multiple=length_multiple, progress=progress,
        desc="encode", save_chunk=lambda root, c, tree: save_chunk(root, c, tree),  # late-bound: tests patch it
        error=BankError,
    )
    return index

