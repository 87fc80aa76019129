"""Joint training of the inventory and every document's routing row (Poly-PRAG), resumable.

The plan. Each epoch goes over the documents' PRAG samples round by round: round t holds the
t-th sample of every document that has one (QA1+passage, QA1+rewrite, ... as the encoder), in a
permutation seeded by (seed, epoch, t), cut into steps of B documents. A step never holds a
document twice, so a routing row gets at most one update per step. B = min(`batch_docs`,
documents, `max_tokens_per_step` // longest bucketed sample) depends only on the data and the
config, never on the mesh: each step is padded with inactive entries to a multiple of the
`data` axis size, so every mesh shape trains on exactly the same steps.

Checkpoints. Every `checkpoint_every` steps the whole state (inventory, routing table and both
optimizer states) is written to `ckpt/step_NNNNNN/` and the index points at it; a killed run
re-started with the same arguments restores it and continues with the same steps (the plan
and every random key are functions of the seed and global indices), ending with the same
result as an uninterrupted run. See `jprag.poly.store` for the layout.
"""

from __future__ import annotations

import pathlib
import shutil
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jprag.mesh import doc_shardings, make_mesh, pad_to_data, param_shardings, replicated
from jprag.model.config import ModelConfig
from jprag.poly.config import JOINT_FIELDS, PolyConfig
from jprag.poly.routing import init_inventory, init_routing, inventory_shapes
from jprag.poly.steps import init_routing_state, inventory_optimizer, jit_joint_step, make_joint_step
from jprag.poly.store import JOINT_FORMAT, check_resumable, load_tree, read_index, save_tree, write_index
from jprag.train.encoder import bucket_length
from jprag.train.recipe import Example, pack_step_batches

ROW_MULTIPLE = 64
Entry = tuple[int, int, int]  # (document row, sample index, the document's step)


def docs_per_step(per_doc_examples: Sequence[Sequence[Example]], poly: PolyConfig, length_multiple: int) -> int:
    """B: documents per joint step under the `batch_docs` and `max_tokens_per_step` caps."""
    longest = max(bucket_length(len(e.tokens), length_multiple) for ex in per_doc_examples for e in ex)
    return max(1, min(poly.batch_docs, len(per_doc_examples), poly.max_tokens_per_step // longest))


def plan_steps(n_examples: Sequence[int], epochs: int, batch_docs: int, seed: int) -> list[list[Entry]]:
    """The joint training steps: per step, `(row, sample index, doc_step)` of its documents."""
    steps: list[list[Entry]] = []
    n_examples = np.asarray(n_examples)
    for epoch in range(epochs):
        for t in range(int(n_examples.max(initial=0))):
            rows = np.flatnonzero(n_examples > t)
            rows = rows[np.random.default_rng([seed, epoch, t]).permutation(len(rows))]
            for i in range(0, len(rows), batch_docs):
                steps.append([(int(r), t, epoch * int(n_examples[r]) + t) for r in rows[i : i + batch_docs]])
    return steps


def step_batch(entries: Sequence[Entry], per_doc_examples, n_total: Sequence[int], width: int, pad_id: int,
               multiple: int) -> dict[str, np.ndarray]:
    """One step's arrays (see `jprag.poly.steps`), padded to `width` entries (inactive, row 0)."""
    rows = [[per_doc_examples[r][t]] for r, t, _ in entries] + [[] for _ in range(width - len(entries))]
    seq = pack_step_batches(rows, pad_id, multiple=multiple)[0]
    pad = width - len(entries)
    doc = np.asarray([r for r, _, _ in entries] + [0] * pad, np.int32)
    doc_step = np.asarray([s for _, _, s in entries] + [0] * pad, np.int32)
    total = np.asarray([n_total[r] for r, _, _ in entries] + [1] * pad, np.float32)
    return {
        "tokens": seq["tokens"][:, None], "attn_mask": seq["attn_mask"][:, None],
        "loss_mask": seq["loss_mask"][:, None], "active": seq["active"].astype(np.float32),
        "doc": doc, "doc_step": doc_step, "progress": doc_step / total,
    }


_JITTED: dict[Any, Any] = {}  # (cfg, poly.step_key(), mesh) → jitted step: re-used by later runs in the process


def _jitted(cfg, poly, mesh, params, state, batch):
    key = (cfg, poly.step_key(), mesh)
    if key not in _JITTED:
        _JITTED[key] = jit_joint_step(make_joint_step(cfg, poly), mesh, params, *state, batch)
    return _JITTED[key]


def _flat(state, n_docs: int) -> dict[str, Any]:
    """The training state as a pytree of named arrays (orbax-friendly, optimizer tuples
    flattened), routing rows cut to the `n_docs` real documents so that a checkpoint does not
    depend on the mesh's padding."""
    inventory, inv_state, z, z_state = state
    leaves = lambda tree: {f"{i:04d}": x for i, x in enumerate(jax.tree.leaves(tree))}  # noqa: E731
    return {"inventory": inventory, "inv_state": leaves(inv_state), "z": np.asarray(z)[:n_docs],
            "z_state": {k: np.asarray(x)[:n_docs] for k, x in leaves(z_state).items()}}


def _unflat(flat, fresh) -> tuple:
    """Inverse of `_flat`; padding rows (beyond the checkpoint's) are taken from `fresh`."""
    _, inv_state, z_fresh, z_state = fresh
    unleaves = lambda d, tree: jax.tree.unflatten(jax.tree.structure(tree), [d[k] for k in sorted(d)])  # noqa: E731
    pad = lambda saved, new: np.concatenate([saved, np.asarray(new)[len(saved):]])  # noqa: E731
    z_leaves = {k: pad(flat["z_state"][k], x) for k, x in zip(sorted(flat["z_state"]), jax.tree.leaves(z_state))}
    return (flat["inventory"], unleaves(flat["inv_state"], inv_state), pad(flat["z"], z_fresh),
            unleaves(z_leaves, z_state))


def _shardings(state, mesh):
    inventory, inv_state, z, z_state = state
    rep = lambda tree: jax.tree.map(lambda _: replicated(mesh), tree)  # noqa: E731
    return rep(inventory), rep(inv_state), doc_shardings(z, mesh), doc_shardings(z_state, mesh)


def train_joint(
    cfg: ModelConfig,
    params: Mapping[str, Any],
    per_doc_examples: Sequence[Sequence[Example]],
    doc_ids: Sequence[str],
    out_dir: str | pathlib.Path,
    *,
    poly: PolyConfig = PolyConfig(),
    mesh=None,
    pad_id: int = 0,
    model_id: str = "",
    length_multiple: int = 32,
    extra_index: Mapping[str, Any] | None = None,
    progress: bool = True,
    desc: str = "poly",
) -> dict[str, Any]:
    """Train the inventory and one routing row per document into `out_dir`; returns the index.

    Resumable: a finished directory is returned as is, an unfinished one continues from its
    latest checkpoint. Load the result with `jprag.poly.store.load_joint`.
    """
    if len(per_doc_examples) != len(doc_ids):
        raise ValueError(f"{len(per_doc_examples)} example lists for {len(doc_ids)} document ids")
    if not doc_ids:
        raise ValueError("joint Poly-PRAG training needs at least one document")
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError("document ids must be unique")
    empty = [doc_ids[i] for i, ex in enumerate(per_doc_examples) if not ex]
    if empty:
        raise ValueError(f"{len(empty)} documents have no training samples (first: {empty[0]!r})")
    mesh = mesh or make_mesh()
    root = pathlib.Path(out_dir)
    n_ex = [len(ex) for ex in per_doc_examples]
    n_total = [poly.epochs * n for n in n_ex]  # a document's steps over the whole run (for τ)
    B = docs_per_step(per_doc_examples, poly, length_multiple)
    plan = plan_steps(n_ex, poly.epochs, B, poly.seed)
    N, L = len(doc_ids), cfg.n_layers
    index = {
        "format": JOINT_FORMAT, "model": model_id, "poly": poly.to_json(), "doc_ids": list(doc_ids),
        "batch_docs": B, "n_steps": len(plan), "length_multiple": length_multiple,
        "shapes": {t: {k: list(s) for k, s in ab.items()} for t, ab in inventory_shapes(cfg, poly).items()},
        "routing_shape": [N, poly.routing_layers(L), poly.n_skills],
        "step": 0, "checkpoint": None, "done": False, "seconds": 0.0, "tokens": 0, "losses": [],
        **dict(extra_index or {}),
    }
    if (root / "index.json").exists():
        old = read_index(root, JOINT_FORMAT)
        check_resumable(old, index, root, ("model", "doc_ids", "batch_docs", "n_steps", "length_multiple",
                                           "shapes", "routing_shape"), JOINT_FIELDS)
        index = old
        if index["done"]:
            return index
    else:
        write_index(root, index)

    # The routing table's rows are padded to a multiple of 64 (and of the data axis): runs over
    # slightly different document counts (e.g. the two Poly-z folds) then share compiled steps.
    n_pad = pad_to_data(-(-N // ROW_MULTIPLE) * ROW_MULTIPLE, mesh)
    width = pad_to_data(B, mesh)
    inventory = init_inventory(cfg, poly)
    z = init_routing(poly, L, jnp.arange(n_pad))  # padding rows: indices >= N, never in a batch
    state = (inventory, inventory_optimizer(poly).init(inventory), z, init_routing_state(poly, z))
    if index["checkpoint"]:
        state = _unflat(load_tree(root / index["checkpoint"], _flat(state, N)), state)
    state = jax.device_put(state, _shardings(state, mesh))
    params = jax.device_put(params, param_shardings(params, mesh))

    bar = tqdm(total=len(plan), initial=index["step"], unit="step", desc=desc, disable=not progress)
    t0, tokens, losses, jitted = time.perf_counter(), 0, [], None

    def record(step: int, final: bool) -> None:
        nonlocal t0, tokens, losses
        if losses:
            per_doc = np.concatenate([np.asarray(loss) for loss, _ in losses])  # waits for the steps
            active = np.concatenate([a for _, a in losses])
            index["losses"].append([step, float(per_doc.sum() / max(active.sum(), 1.0))])  # mean since last record
        index["seconds"] += time.perf_counter() - t0
        index["tokens"] += tokens
        old = index["checkpoint"]
        if final:
            inv, _, z_all, _ = state
            save_tree(root / "inventory", inv)
            save_tree(root / "routing", {"z": np.asarray(z_all)[:N]})
            index.update(step=step, checkpoint=None, done=True)
        else:
            path = f"ckpt/step_{step:06d}"
            save_tree(root / path, _flat(state, N))
            index.update(step=step, checkpoint=path)
        write_index(root, index)
        if old:
            shutil.rmtree(root / old, ignore_errors=True)
        if final:  # no checkpoint is needed any more (also drops leftovers of killed writes)
            shutil.rmtree(root / "ckpt", ignore_errors=True)
        if index["losses"]:
            samples = sum(len(entries) for entries in plan[:step])
            bar.set_postfix(loss=f"{index['losses'][-1][1]:.3f}",
                            samples_per_s=f"{samples / max(index['seconds'], 1e-9):.2f}")
        t0, tokens, losses = time.perf_counter(), 0, []

    for s in range(index["step"], len(plan)):
        batch = step_batch(plan[s], per_doc_examples, n_total, width, pad_id, length_multiple)
        if jitted is None:
            jitted = _jitted(cfg, poly, mesh, params, state, batch)
        *state, loss = jitted(params, *state, batch)
        state = tuple(state)
        tokens += int(batch["attn_mask"].sum())
        losses.append((loss, batch["active"]))
        bar.update(1)
        if (s + 1) % poly.checkpoint_every == 0 and s + 1 < len(plan):
            record(s + 1, final=False)
    record(len(plan), final=True)
    bar.close()
    return index
