"""Poly-z-PRAG: routing rows for new documents against a frozen inventory, chunked and resumable.

Only the new rows are trained; the inventory is a read-only input of the compiled step (not
differentiated, not donated, not returned), so it is bit-identical afterwards. Each row is
trained independently (per-row Adam, no coupling), so the chunking — like the PRAG encoder's:
documents sorted by length, D per chunk, D a multiple of the mesh's `data` size — changes
nothing but speed, and a resumed run may re-plan its unfinished rows for another mesh. A row's initial logits and its Gumbel noise are keyed by the document's
index in this table and its own step, as in joint training.

On disk (`jprag.poly.store`): `index.json` (format `jprag-poly-z/1`, the fingerprint of the
inventory, the chunk plan and which chunks are done) and `chunks/NNNNN/` = {"z": rows}.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jprag.lora.store import save_chunk
from jprag.mesh import doc_shardings, make_mesh, pad_to_data, param_shardings, replicated
from jprag.model.config import ModelConfig
from jprag.poly.config import Z_FIELDS, PolyConfig
from jprag.poly.routing import Inventory, init_routing
from jprag.poly.steps import init_routing_state, jit_routing_step, make_routing_step
from jprag.poly.store import Z_FORMAT, PolyStoreError, check_resumable, fingerprint, read_index, write_index
from jprag.train.encoder import bucket_length, plan_chunks, resume_chunks
from jprag.train.recipe import Example, pack_step_batches

_JITTED: dict[Any, Any] = {}  # (cfg, poly.step_key(), mesh) → jitted step


def train_routing_rows(
    cfg: ModelConfig,
    params: Mapping[str, Any],
    inventory: Inventory,
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
    desc: str = "poly-z",
) -> dict[str, Any]:
    """Train one routing row per new document against the frozen `inventory` into `out_dir`;
    returns the index (load the rows with `jprag.poly.store.load_rows`). Resumable by chunk."""
    if len(per_doc_examples) != len(doc_ids):
        raise ValueError(f"{len(per_doc_examples)} example lists for {len(doc_ids)} document ids")
    if not doc_ids:
        raise ValueError("Poly-z needs at least one document")
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError("document ids must be unique")
    empty = [doc_ids[i] for i, ex in enumerate(per_doc_examples) if not ex]
    if empty:
        raise ValueError(f"{len(empty)} documents have no training samples (first: {empty[0]!r})")
    mesh = mesh or make_mesh()
    root = pathlib.Path(out_dir)
    N, L = len(doc_ids), cfg.n_layers
    longest = max(bucket_length(len(e.tokens), length_multiple) for ex in per_doc_examples for e in ex)
    D = pad_to_data(min(poly.chunk_size, N, max(1, poly.max_tokens_per_step // longest)), mesh)
    index = {
        "format": Z_FORMAT, "model": model_id, "poly": poly.to_json(), "doc_ids": list(doc_ids),
        "inventory": fingerprint(inventory), "length_multiple": length_multiple,
        "routing_shape": [N, poly.routing_layers(L), poly.n_skills],
        "chunks": [{"rows": rows, "done": False, "dir": c} for c, rows in enumerate(plan_chunks(per_doc_examples, D))],
        **dict(extra_index or {}),
    }
    if (root / "index.json").exists():
        old = read_index(root, Z_FORMAT)
        check_resumable(old, index, root, ("model", "doc_ids", "inventory", "length_multiple", "routing_shape"),
                        Z_FIELDS)
        index = dict(old, chunks=resume_chunks(old["chunks"], per_doc_examples, D))
    write_index(root, index)

    todo = [c for c, chunk in enumerate(index["chunks"]) if not chunk["done"]]
    if todo:
        params = jax.device_put(params, param_shardings(params, mesh))
        inventory = jax.device_put(inventory, jax.tree.map(lambda _: replicated(mesh), inventory))
    n_done = N - sum(len(index["chunks"][c]["rows"]) for c in todo)
    bar = tqdm(total=N, initial=n_done, unit="doc", desc=desc, disable=not progress)
    jitted = _JITTED.get((cfg, poly.step_key(), mesh))
    for c in todo:
        t0 = time.perf_counter()
        rows = index["chunks"][c]["rows"]
        examples = [list(per_doc_examples[r]) for r in rows] + [[] for _ in range(D - len(rows))]
        n_ex = np.asarray([len(ex) for ex in examples], np.int32)
        doc = np.asarray(list(rows) + [-1] * (D - len(rows)), np.int32)  # padding rows: index -1, never active
        z = init_routing(poly, L, jnp.asarray(doc))
        z_state = init_routing_state(poly, z)
        z, z_state = jax.device_put((z, z_state), (doc_shardings(z, mesh), doc_shardings(z_state, mesh)))
        n_tokens, loss = 0, None
        for epoch in range(poly.z_epochs):
            for t, seq in enumerate(pack_step_batches(examples, pad_id, multiple=length_multiple)):
                doc_step = (epoch * n_ex + t).astype(np.int32)
                batch = {
                    "tokens": seq["tokens"][:, None], "attn_mask": seq["attn_mask"][:, None],
                    "loss_mask": seq["loss_mask"][:, None], "active": seq["active"].astype(np.float32),
                    "doc": doc, "doc_step": doc_step,
                    "progress": doc_step / np.maximum(poly.z_epochs * n_ex, 1).astype(np.float32),
                }
                if jitted is None:
                    jitted = _JITTED[(cfg, poly.step_key(), mesh)] = jit_routing_step(
                        make_routing_step(cfg, poly), mesh, params, inventory, z, z_state, batch)
                z, z_state, loss = jitted(params, inventory, z, z_state, batch)
                n_tokens += int(batch["attn_mask"].sum())
        save_chunk(root, index["chunks"][c]["dir"], {"z": np.asarray(z)[: len(rows)]})
        seconds = time.perf_counter() - t0
        final = float(np.asarray(loss)[: len(rows)].mean()) if loss is not None else 0.0
        index["chunks"][c].update(done=True, seconds=seconds, tokens=n_tokens, final_loss=final)
        write_index(root, index)
        bar.update(len(rows))
        bar.set_postfix(docs_per_s=f"{len(rows) / seconds:.2f}", loss=f"{final:.3f}")
    bar.close()
    return index
