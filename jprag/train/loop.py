"""The one training loop over the document axis, for every method, on one host or many.

Two schedules share everything but their plan:

* `train_rows` — rows that train independently (PRAG adapters, Poly-z routing rows; the
  DyPRAG translator's teacher pairs are PRAG rows). Documents are sorted by length and cut into
  chunks of D (a multiple of the mesh's `data` size); a chunk's state lives sharded on the mesh,
  trains for `epochs` passes over its samples (one sample per document per step, as the PRAG
  reference's batch size 1), is written collectively and marked done in the index. Re-running
  skips finished chunks; a run resumed on another mesh, chunk size or process count re-plans
  only the unfinished rows (`resume_chunks`).
* `train_steps` — one shared state trained over a fixed plan of steps (Poly-PRAG's inventory
  with its routing table): the state is checkpointed every `checkpoint_every` steps and a
  killed run resumes from the latest checkpoint, on any mesh or process count.

The method supplies a task: how to initialise its state, its (unjitted) step, the per-row
inputs its step reads beyond the token batch, and what is saved. The loop does the rest:
argument checks, documents-per-step sizing, planning, state on the mesh, process-local batches
(`jprag.distributed.global_array`: each process builds only its rows), checkpoints (orbax,
collective), the index (process 0), progress (process 0).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Any, Callable, Hashable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jprag import distributed, store
from jprag.mesh import doc_sharding, doc_shardings, pad_to_data, replicated
from jprag.train.recipe import Example

SEQ_KEYS = ("tokens", "attn_mask", "loss_mask")


# --------------------------------------------------------------------------- planning


def check_documents(per_doc_examples: Sequence[Sequence[Example]], doc_ids: Sequence[str], what: str) -> None:
    """The checks every trainer makes of its input (ValueError naming the first bad document)."""
    if len(per_doc_examples) != len(doc_ids):
        raise ValueError(f"{len(per_doc_examples)} example lists for {len(doc_ids)} document ids")
    if not doc_ids:
        raise ValueError(f"{what} needs at least one document")
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError("document ids must be unique")
    empty = [doc_ids[i] for i, ex in enumerate(per_doc_examples) if not ex]
    if empty:
        raise ValueError(f"{len(empty)} documents have no training samples (first: {empty[0]!r})")


def bucket_length(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def docs_per_step(per_doc_examples: Sequence[Sequence[Example]], cap: int, max_tokens_per_step: int,
                  length_multiple: int) -> int:
    """Documents per step: at most `cap`, and D × (longest bucketed sample) ≤ `max_tokens_per_step`
    (activations of the frozen model dominate a step's memory)."""
    longest = max(bucket_length(len(e.tokens), length_multiple) for ex in per_doc_examples for e in ex)
    return max(1, min(cap, len(per_doc_examples), max_tokens_per_step // longest))


def plan_chunks(per_doc_examples: Sequence[Sequence[Example]], chunk_size: int,
                rows: Sequence[int] | None = None) -> list[list[int]]:
    """Row indices per chunk (of `rows`, default all), longest documents first, so each chunk
    pads to similar lengths."""
    total = [sum(len(e.tokens) for e in ex) for ex in per_doc_examples]
    order = sorted(range(len(total)) if rows is None else rows, key=lambda i: (-total[i], i))
    return [order[i : i + chunk_size] for i in range(0, len(order), chunk_size)]


def chunk_number(position: int, chunk: Mapping[str, Any]) -> int:
    """The checkpoint directory number of the index's `position`-th chunk entry (its `dir`;
    indices written before re-planned resumes existed number chunks by position)."""
    return int(chunk.get("dir", position))


def resume_chunks(old_chunks: Sequence[Mapping[str, Any]], per_doc_examples: Sequence[Sequence[Example]],
                  chunk_size: int) -> list[dict[str, Any]]:
    """The chunk list a resumed run works from: finished chunks as they were, the rows of the
    unfinished ones planned again with this run's chunk size.

    Re-planning is sound because a row's result does not depend on its chunk: rows train
    independently (per-row optimizer state, no cross-row reduction) from an initialisation
    keyed by the row's global index. So a run may resume on a mesh with another `data` size,
    another chunk size or another number of processes, and lose no finished chunk. New chunks
    take the directory numbers no finished chunk holds, so an unchanged plan keeps its numbering.
    """
    done = [dict(c, dir=chunk_number(i, c)) for i, c in enumerate(old_chunks) if c.get("done")]
    done_rows = {r for c in done for r in c["rows"]}
    todo = [r for r in range(len(per_doc_examples)) if r not in done_rows]
    taken = {c["dir"] for c in done}
    free = (n for n in range(len(old_chunks) + len(todo) + 1) if n not in taken)
    new = [{"rows": rows, "done": False, "dir": next(free)} for rows in plan_chunks(per_doc_examples, chunk_size, todo)]
    return sorted(done + new, key=lambda c: c["dir"])


# --------------------------------------------------------------------------- batches


def seq_rows(examples: Sequence[Example | None], seq: int, pad_id: int) -> dict[str, np.ndarray]:
    """`tokens`, `attn_mask`, `loss_mask` `[n, 1, seq]` and `active` `[n]` for some rows of a
    step (None: an inactive row, all padding), right padded."""
    n = len(examples)
    out = {"tokens": np.full((n, 1, seq), pad_id, np.int32), "attn_mask": np.zeros((n, 1, seq), np.int32),
           "loss_mask": np.zeros((n, 1, seq), np.int32), "active": np.zeros(n, np.float32)}
    for i, e in enumerate(examples):
        if e is None:
            continue
        k = len(e.tokens)
        out["tokens"][i, 0, :k] = e.tokens
        out["attn_mask"][i, 0, :k] = 1
        out["loss_mask"][i, 0, :k] = e.loss_mask
        out["active"][i] = 1.0
    return out


def step_length(examples: Sequence[Example | None], multiple: int) -> int:
    """A step's sequence length: its longest sample rounded up to `multiple` (every process
    computes it from the same host metadata, so all agree on the shape)."""
    longest = max((len(e.tokens) for e in examples if e is not None), default=1)
    return bucket_length(max(longest, 1), multiple)


def make_batch(mesh, n: int, build: Callable[[list[int]], Any]) -> Any:
    """A global batch (a pytree of `[n, ...]` arrays sharded over `data`), built process-locally:
    `build(rows)` returns the pytree of those rows only, `[len(rows), ...]` per leaf, and is
    called once per process, for the rows its devices hold (every process holds some: the mesh
    spans them all and `n` is a multiple of the `data` size)."""
    mine = distributed.local_rows(doc_sharding(mesh, 1), n)
    block = build(mine)

    def leaf(x):
        x = np.asarray(x)

        def rows(asked):  # `global_array` asks for exactly this process's rows
            assert asked == mine, (asked, mine)
            return x

        return distributed.global_array(doc_sharding(mesh, x.ndim), (n, *x.shape[1:]), x.dtype, rows)

    return jax.tree.map(leaf, block)


def token_batch(mesh, examples: Sequence[Example | None], multiple: int, pad_id: int,
                extra: Mapping[str, np.ndarray] | None = None) -> tuple[dict[str, jax.Array], int]:
    """One step's global token batch (and any per-row `extra` arrays `[D]`) from the samples of
    its rows (None = inactive), and its number of real tokens (host metadata)."""
    seq = step_length(examples, multiple)
    extra = dict(extra or {})

    def build(rows):
        part = seq_rows([examples[r] for r in rows], seq, pad_id)
        part.update({k: v[rows] for k, v in extra.items()})
        return part

    n_tokens = sum(len(e.tokens) for e in examples if e is not None)
    return make_batch(mesh, len(examples), build), n_tokens


def _masked_mean(loss_d, active_d):
    return jnp.sum(loss_d * active_d) / jnp.maximum(jnp.sum(active_d), 1.0), jnp.sum(active_d)


def mean_loss(mesh, loss_d: jax.Array, active_d: jax.Array) -> tuple[float, float]:
    """(mean loss over active rows, active rows) of a step, reduced on the mesh and replicated,
    so every process reads it without gathering the rows."""
    rep = replicated(mesh)
    mean, n = jax.jit(_masked_mean, out_shardings=(rep, rep))(loss_d, active_d)
    return float(mean), float(n)


# --------------------------------------------------------------------------- per-row training


@dataclasses.dataclass(frozen=True)
class RowTask:
    """What a per-row method gives `train_rows`.

    `init(doc_idx [D]) -> state` (jittable; index -1 marks a padding row), every leaf with the
    document axis first; `step(consts, state, batch) -> (state, loss [D])`, not jitted, rows
    independent; `consts` (e.g. the base params) with their `const_shardings`; `extra(epoch, t,
    doc_idx [D], n_samples [D]) -> {name: [D]}` the per-row inputs the step reads beside the
    tokens; `saved(state)` the part written per chunk (rows, document axis first); `key`
    identifies the step (for re-using its compiled program across runs in a process).
    """

    init: Callable[[jax.Array], Any]
    step: Callable[..., tuple[Any, jax.Array]]
    consts: Any
    const_shardings: Any
    saved: Callable[[Any], Any]
    epochs: int = 1
    extra: Callable[[int, int, np.ndarray, np.ndarray], Mapping[str, np.ndarray]] | None = None
    key: Hashable = None


def _jitted_row_step(task: RowTask, mesh, state, batch):
    c_sh = task.const_shardings
    s_sh = doc_shardings(state, mesh)
    b_sh = doc_shardings(batch, mesh)
    return jax.jit(task.step, in_shardings=(c_sh, s_sh, b_sh), out_shardings=(s_sh, doc_sharding(mesh, 1)),
                   donate_argnums=(1,))


def _bar(total: int, initial: int, unit: str, desc: str, progress: bool):
    return tqdm(total=total, initial=initial, unit=unit, desc=desc, disable=not (progress and distributed.is_primary()))


def train_rows(
    task: RowTask,
    per_doc_examples: Sequence[Sequence[Example]],
    root: str | pathlib.Path,
    index: dict[str, Any],
    *,
    resume_fields: Sequence[str],
    check_resumable: Callable[[Mapping[str, Any], Mapping[str, Any]], None] | None = None,
    read_index: Callable[[pathlib.Path], dict[str, Any]],
    chunk_docs: int,
    mesh,
    pad_id: int = 0,
    length_multiple: int = 32,
    progress: bool = True,
    desc: str = "encode",
    save_chunk: Callable[[pathlib.Path, int, Any], None] | None = None,
    jitted: Callable | None = None,
    error: type[ValueError] = store.StoreError,
) -> tuple[dict[str, Any], Callable | None]:
    """Train every row of `per_doc_examples` in chunks into `root`; returns `(index, jitted step)`.

    `index` is this run's fresh index (without `chunks`); an existing `root/index.json` must
    agree on `resume_fields` (and pass `check_resumable`), and its finished chunks are kept.
    `chunk_docs` is the chunk size before padding to the mesh's `data` axis.
    """
    distributed.check_mesh(mesh)
    root = pathlib.Path(root)
    save_chunk = save_chunk or (lambda r, c, tree: store.save_tree(chunk_path(r, c), tree))
    D = pad_to_data(chunk_docs, mesh)
    index = dict(index, chunks=[{"rows": rows, "done": False, "dir": c}
                                for c, rows in enumerate(plan_chunks(per_doc_examples, D))])
    resuming = (root / store.INDEX).exists()
    distributed.barrier(f"looked for {root / store.INDEX}")  # every process decides before any writes
    if resuming:
        old = read_index(root)
        if check_resumable is not None:
            check_resumable(old, index)
        store.check_fields(old, index, resume_fields, f"{root}/{store.INDEX}", error,
                           hint="use a new output directory, or --overwrite")
        index = dict(old, format=index["format"], chunks=resume_chunks(old["chunks"], per_doc_examples, D))
    store.write_index(root, index)

    todo = [c for c, chunk in enumerate(index["chunks"]) if not chunk["done"]]
    n_docs = len(per_doc_examples)
    n_done = n_docs - sum(len(index["chunks"][c]["rows"]) for c in todo)
    bar = _bar(n_docs, n_done, "doc", desc, progress)
    consts = jax.device_put(task.consts, task.const_shardings) if todo else None
    init = None
    for c in todo:
        t0 = time.perf_counter()
        chunk = index["chunks"][c]
        rows = list(chunk["rows"])
        examples = [list(per_doc_examples[r]) for r in rows] + [[] for _ in range(D - len(rows))]
        n_ex = np.asarray([len(ex) for ex in examples], np.int32)
        doc = np.asarray(rows + [-1] * (D - len(rows)), np.int32)  # padding rows: index -1, never active
        if init is None:
            state_shape = jax.eval_shape(task.init, jax.ShapeDtypeStruct((D,), jnp.int32))
            init = jax.jit(task.init, in_shardings=replicated(mesh), out_shardings=doc_shardings(state_shape, mesh))
        state = init(jax.device_put(doc, replicated(mesh)))
        n_tokens, last = 0, None
        for epoch in range(task.epochs):
            for t in range(int(n_ex.max(initial=0))):
                extra = task.extra(epoch, t, doc, n_ex) if task.extra else None
                batch, k = token_batch(mesh, [ex[t] if t < len(ex) else None for ex in examples],
                                       length_multiple, pad_id, extra)
                if jitted is None:
                    jitted = _jitted_row_step(task, mesh, state, batch)
                state, loss = jitted(consts, state, batch)
                n_tokens += k
                last = (loss, batch["active"])
        save_chunk(root, chunk["dir"], task.saved(state))
        final = mean_loss(mesh, *last)[0] if last is not None else 0.0
        seconds = time.perf_counter() - t0
        chunk.update(done=True, seconds=seconds, tokens=n_tokens, final_loss=final, slots=D,
                     processes=distributed.process_count())
        store.write_index(root, index)
        bar.update(len(rows))
        bar.set_postfix(docs_per_s=f"{len(rows) / seconds:.2f}", tok_per_s=f"{n_tokens / seconds:.0f}",
                        loss=f"{final:.3f}")
    bar.close()
    return index, jitted


def chunk_path(root: pathlib.Path, chunk: int) -> pathlib.Path:
    return pathlib.Path(root) / "chunks" / f"{chunk:05d}"


# --------------------------------------------------------------------------- shared-state training


@dataclasses.dataclass(frozen=True)
class StepTask:
    """What a shared-state method gives `train_steps`.

    `state` (host or device arrays) with its `shardings`; `step(consts, state, batch) -> (state,
    loss [B])`, not jitted; `batch(s) -> (global batch, real tokens)` the s-th step's inputs
    (build them with `token_batch`); `flat(state)` / `unflat(tree, fresh)` turn the state into
    the checkpointed pytree and back (`unflat` may fit a checkpoint of another padding);
    `finish(state)` writes the final artifacts.
    """

    state: Any
    shardings: Any
    step: Callable[..., tuple[Any, jax.Array]]
    consts: Any
    const_shardings: Any
    batch: Callable[[int], tuple[dict[str, jax.Array], int]]
    flat: Callable[[Any], Any]
    unflat: Callable[[Any, Any], Any]
    finish: Callable[[Any], None]


def train_steps(task: StepTask, root: str | pathlib.Path, index: dict[str, Any], n_steps: int, *, mesh,
                checkpoint_every: int, progress: bool = True, desc: str = "train", jitted: Callable | None = None,
                save_tree: Callable[[pathlib.Path, Any], None] | None = None, flat_shardings: Any = None,
                ) -> tuple[dict[str, Any], Callable | None]:
    """Run steps `index["step"] … n_steps` of a fixed plan, checkpointing every `checkpoint_every`
    steps (`root/ckpt/step_NNNNNN`, named by the index once written) and calling `task.finish`
    at the end. `index` holds `step`, `checkpoint`, `seconds`, `tokens`, `losses`.
    `flat_shardings`: the shardings of `task.flat(state)`, onto which a checkpoint is restored
    (None: as numpy, then placed by `task.shardings`)."""
    distributed.check_mesh(mesh)
    root = pathlib.Path(root)
    save_tree = save_tree or store.save_tree
    state = task.state
    if index.get("checkpoint"):  # restored straight onto this run's mesh (`flat_shardings`)
        saved = store.load_tree(root / index["checkpoint"], task.flat(state), flat_shardings)
        state = task.unflat(saved, state)
    state = jax.device_put(state, task.shardings)
    consts = jax.device_put(task.consts, task.const_shardings)
    bar = _bar(n_steps, index["step"], "step", desc, progress)
    t0, tokens, losses = time.perf_counter(), 0, []

    def record(step: int, final: bool) -> None:
        nonlocal t0, tokens, losses
        if losses:
            means = [mean_loss(mesh, loss, active) for loss, active in losses]  # waits for the steps
            total = sum(m * n for m, n in means) / max(sum(n for _, n in means), 1.0)
            index["losses"].append([step, total])  # mean since the last record
        index["seconds"] += time.perf_counter() - t0
        index["tokens"] += tokens
        old = index.get("checkpoint")
        if final:
            task.finish(state)
            index.update(step=step, checkpoint=None, done=True)
        else:
            path = f"ckpt/step_{step:06d}"
            save_tree(root / path, task.flat(state))
            index.update(step=step, checkpoint=path)
        store.write_index(root, index)
        if old:
            store.remove(root / old)
        if final:  # no checkpoint is needed any more (also drops leftovers of killed writes)
            store.remove(root / "ckpt")
        if index["losses"]:
            bar.set_postfix(loss=f"{index['losses'][-1][1]:.3f}",
                            steps_per_s=f"{step / max(index['seconds'], 1e-9):.2f}")
        t0, tokens, losses = time.perf_counter(), 0, []

    for s in range(index["step"], n_steps):
        batch, k = task.batch(s)
        if jitted is None:
            jitted = jax.jit(task.step, in_shardings=(task.const_shardings, task.shardings, doc_shardings(batch, mesh)),
                             out_shardings=(task.shardings, doc_sharding(mesh, 1)), donate_argnums=(1,))
        state, loss = jitted(consts, state, batch)
        tokens += k
        losses.append((loss, batch["active"]))
        bar.update(1)
        if (s + 1) % checkpoint_every == 0 and s + 1 < n_steps:
            record(s + 1, final=False)
    record(n_steps, final=True)
    bar.close()
    return index, jitted


def padded_rows(n: int, mesh, multiple: int = 64) -> int:
    """Rows of a table padded to a multiple of `multiple` and of the `data` axis: runs over
    slightly different document counts share compiled steps, and for power-of-two `data`
    sizes up to `multiple` the padding does not depend on the mesh."""
    return pad_to_data(math.ceil(n / multiple) * multiple, mesh)
