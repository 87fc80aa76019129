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

import functools
import pathlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jprag.lora.store import save_chunk
from jprag.mesh import make_mesh, param_shardings, replicated
from jprag.model.config import ModelConfig
from jprag.poly.config import Z_FIELDS, PolyConfig
from jprag.poly.routing import Inventory, init_routing
from jprag.poly.steps import init_routing_state, make_routing_step
from jprag.poly.store import Z_FORMAT, PolyStoreError, check_resumable, fingerprint, read_index
from jprag.train.loop import RowTask, check_documents, docs_per_step, train_rows
from jprag.train.recipe import Example


@functools.lru_cache(maxsize=8)
def _row_functions(cfg: ModelConfig, poly: PolyConfig):
    """`(init, step)` of Poly-z rows per configuration (stable objects: compiled programs are
    re-used by later runs in the process)."""
    routing_step = make_routing_step(cfg, poly)

    def init(doc_d):
        z = init_routing(poly, cfg.n_layers, doc_d)
        return z, init_routing_state(poly, z)

    def step(consts, state, batch):
        params, inventory = consts
        z, z_state, loss = routing_step(params, inventory, *state, batch)
        return (z, z_state), loss

    return init, step


def _extra(poly: PolyConfig):
    def extra(epoch: int, t: int, doc: np.ndarray, n_ex: np.ndarray) -> dict[str, np.ndarray]:
        doc_step = (epoch * n_ex + t).astype(np.int32)
        progress = (doc_step / np.maximum(poly.z_epochs * n_ex, 1)).astype(np.float32)
        return {"doc": doc.astype(np.int32), "doc_step": doc_step, "progress": progress}

    return extra


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
    check_documents(per_doc_examples, doc_ids, "Poly-z")
    mesh = mesh or make_mesh()
    N, L = len(doc_ids), cfg.n_layers
    D = docs_per_step(per_doc_examples, poly.chunk_size, poly.max_tokens_per_step, length_multiple)
    index = {
        "format": Z_FORMAT, "model": model_id, "poly": poly.to_json(), "doc_ids": list(doc_ids),
        "inventory": fingerprint(inventory), "length_multiple": length_multiple,
        "routing_shape": [N, poly.routing_layers(L), poly.n_skills], **dict(extra_index or {}),
    }
    init, step = _row_functions(cfg, poly)
    rep = jax.tree.map(lambda _: replicated(mesh), inventory)
    task = RowTask(init=init, step=step, consts=(params, inventory),
                   const_shardings=(param_shardings(params, mesh), rep), saved=lambda state: {"z": state[0]},
                   epochs=poly.z_epochs, extra=_extra(poly))
    fields = ("model", "doc_ids", "inventory", "length_multiple", "routing_shape")
    index, _ = train_rows(
        task, per_doc_examples, out_dir, index, resume_fields=(),
        check_resumable=lambda old, new: check_resumable(old, new, out_dir, fields, Z_FIELDS),
        read_index=lambda root: read_index(root, Z_FORMAT), chunk_docs=D, mesh=mesh, pad_id=pad_id,
        length_multiple=length_multiple, progress=progress, desc=desc,
        save_chunk=lambda root, c, tree: save_chunk(root, c, tree), error=PolyStoreError,
    )
    return index
