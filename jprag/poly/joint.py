"""Joint training of the inventory and every document's routing row (Poly-PRAG), resumable.

The plan. Each epoch goes over the documents' PRAG samples round by round: round t holds the
t-th sample of every document that has one (QA1+passage, QA1+rewrite, ... as the encoder), in a
permutation seeded by (seed, epoch, t), cut into steps of B documents. A step never holds a
document twice, so a routing row gets at most one update per step. B = min(`batch_docs`,
documents, `max_tokens_per_step` // longest bucketed sample) depends only on the data and the
config, never on the mesh: each step is padded with inactive entries to a multiple of the
`data` axis size, so every mesh shape trains on exactly the same steps.

Checkpoints. The loop is `jprag.train.loop.train_steps`: every `checkpoint_every` steps the
whole state (inventory, routing table and both optimizer states) is written collectively to
`ckpt/step_NNNNNN/` and the index points at it; a killed run re-started with the same
arguments restores it onto its own mesh and process count and continues with the same steps
(the plan and every random key are functions of the seed and global indices), ending with the
same result as an uninterrupted run. See `jprag.poly.store` for the layout.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jprag import distributed
from jprag.mesh import doc_shardings, make_mesh, pad_to_data, param_shardings, replicated
from jprag.model.config import ModelConfig
from jprag.poly.config import JOINT_FIELDS, PolyConfig
from jprag.poly.routing import init_inventory, init_routing, inventory_shapes
from jprag.poly.steps import init_routing_state, inventory_optimizer, make_joint_step
from jprag.poly.store import JOINT_FORMAT, PolyStoreError, check_resumable, read_index, save_tree, write_index
from jprag.train.loop import StepTask, check_documents, docs_per_step as _docs_per_step, padded_rows, token_batch
from jprag.train.loop import train_steps
from jprag.train.recipe import Example

ROW_MULTIPLE = 64
Entry = tuple[int, int, int]  # (document row, sample index, the document's step)


def docs_per_step(per_doc_examples: Sequence[Sequence[Example]], poly: PolyConfig, length_multiple: int) -> int:
    """B: documents per joint step under the `batch_docs` and `max_tokens_per_step` caps."""
    return _docs_per_step(per_doc_examples, poly.batch_docs, poly.max_tokens_per_step, length_multiple)


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


def step_batch(mesh, entries: Sequence[Entry], per_doc_examples, n_total: Sequence[int], width: int, pad_id: int,
               multiple: int) -> tuple[dict[str, jax.Array], int]:
    """One step's global batch (see `jprag.poly.steps`), padded to `width` entries (inactive,
    row 0), each process building only its own entries; and its real tokens."""
    pad = width - len(entries)
    examples = [per_doc_examples[r][t] for r, t, _ in entries] + [None] * pad
    doc = np.asarray([r for r, _, _ in entries] + [0] * pad, np.int32)
    doc_step = np.asarray([s for _, _, s in entries] + [0] * pad, np.int32)
    total = np.asarray([n_total[r] for r, _, _ in entries] + [1] * pad, np.float32)
    extra = {"doc": doc, "doc_step": doc_step, "progress": (doc_step / total).astype(np.float32)}
    return token_batch(mesh, examples, multiple, pad_id, extra)


_JITTED: dict[Any, Any] = {}  # (cfg, poly.step_key(), mesh) → jitted step: re-used by later runs in the process


@functools.lru_cache(maxsize=8)
def _functions(cfg: ModelConfig, poly: PolyConfig, n_rows: int):
    """`(init, step)` of joint training per configuration (stable objects for JAX's caches)."""
    joint = make_joint_step(cfg, poly)

    def init():
        inventory = init_inventory(cfg, poly)
        z = init_routing(poly, cfg.n_layers, jnp.arange(n_rows))  # padding rows: indices >= N, never in a batch
        return inventory, inventory_optimizer(poly).init(inventory), z, init_routing_state(poly, z)

    def step(params, state, batch):
        *state, loss = joint(params, *state, batch)
        return tuple(state), loss

    return init, step


def _flat(state) -> dict[str, Any]:
    """The training state as a pytree of named arrays (orbax-friendly, optimizer tuples
    flattened). The routing table keeps its padding rows (sharded like the table: no gather)."""
    inventory, inv_state, z, z_state = state
    leaves = lambda tree: {f"{i:04d}": x for i, x in enumerate(jax.tree.leaves(tree))}  # noqa: E731
    return {"inventory": inventory, "inv_state": leaves(inv_state), "z": z, "z_state": leaves(z_state)}


def _unflat(flat, fresh) -> tuple:
    """Inverse of `_flat`, with `fresh` giving the tree structure."""
    _, inv_state, _, z_state = fresh
    unleaves = lambda d, tree: jax.tree.unflatten(jax.tree.structure(tree), [d[k] for k in sorted(d)])  # noqa: E731
    return flat["inventory"], unleaves(flat["inv_state"], inv_state), flat["z"], unleaves(flat["z_state"], z_state)


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
    latest checkpoint (on any mesh or process count). Load the result with
    `jprag.poly.store.load_joint`.
    """
    check_documents(per_doc_examples, doc_ids, "joint Poly-PRAG training")
    mesh = mesh or make_mesh()
    root = pathlib.Path(out_dir)
    n_ex = [len(ex) for ex in per_doc_examples]
    n_total = [poly.epochs * n for n in n_ex]  # a document's steps over the whole run (for τ)
    B = docs_per_step(per_doc_examples, poly, length_multiple)
    plan = plan_steps(n_ex, poly.epochs, B, poly.seed)
    N, L = len(doc_ids), cfg.n_layers
    # The routing table's rows are padded to a multiple of 64 (and of the data axis): runs over
    # slightly different document counts (e.g. the two Poly-z folds) then share compiled steps.
    n_rows = padded_rows(N, mesh, ROW_MULTIPLE)
    index = {
        "format": JOINT_FORMAT, "model": model_id, "poly": poly.to_json(), "doc_ids": list(doc_ids),
        "batch_docs": B, "n_steps": len(plan), "length_multiple": length_multiple,
        "shapes": {t: {k: list(s) for k, s in ab.items()} for t, ab in inventory_shapes(cfg, poly).items()},
        "routing_shape": [N, poly.routing_layers(L), poly.n_skills], "routing_slots": n_rows,
        "step": 0, "checkpoint": None, "done": False, "seconds": 0.0, "tokens": 0, "losses": [],
        **dict(extra_index or {}),
    }
    resuming = (root / "index.json").exists()
    distributed.barrier(f"looked for {root / 'index.json'}")  # every process decides before any writes
    if resuming:
        old = read_index(root, JOINT_FORMAT)
        check_resumable(old, index, root, ("model", "doc_ids", "batch_docs", "n_steps", "length_multiple",
                                           "shapes", "routing_shape"), JOINT_FIELDS)
        if old["done"]:
            return old
        if old.get("checkpoint") and old.get("format") != JOINT_FORMAT:
            raise PolyStoreError(f"{root}/index.json: an unfinished run of format {old['format']!r}, whose "
                                 f"checkpoints {JOINT_FORMAT!r} cannot resume; train in a new directory")
        if old.get("checkpoint") and old.get("routing_slots") != n_rows:
            raise PolyStoreError(f"{root}/index.json: its checkpoint pads the routing table to "
                                 f"{old.get('routing_slots')} rows, this mesh to {n_rows}; resume on a mesh whose "
                                 "data axis is a power of two up to 64 (or the one it was written on)")
        index = dict(old, format=JOINT_FORMAT)
    else:
        write_index(root, index)

    width = pad_to_data(B, mesh)
    init, step = _functions(cfg, poly, n_rows)
    shapes = jax.eval_shape(init)
    shardings = _shardings(shapes, mesh)
    state = jax.jit(init, out_shardings=shardings)()

    def finish(state):
        inventory, _, z, _ = state
        save_tree(root / "inventory", inventory)
        save_tree(root / "routing", {"z": z})

    task = StepTask(
        state=state, shardings=shardings, step=step, consts=params, const_shardings=param_shardings(params, mesh),
        batch=lambda s: step_batch(mesh, plan[s], per_doc_examples, n_total, width, pad_id, length_multiple),
        flat=_flat, unflat=_unflat, finish=finish,
    )
    key = (cfg, poly.step_key(), mesh)
    index, _JITTED[key] = train_steps(
        task, root, index, len(plan), mesh=mesh, checkpoint_every=poly.checkpoint_every, progress=progress,
        desc=desc, jitted=_JITTED.get(key), save_tree=lambda path, tree: save_tree(path, tree),
        flat_shardings=_flat(shardings),
    )
    return index
