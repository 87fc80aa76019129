"""The Poly-PRAG and Poly-z-PRAG adapter sources of the evaluation pipeline.

* `build_poly_source` ("poly"): joint training of the inventory and the routing rows over the
  documents the evaluation retrieved (`out/joint`), the transductive setting of PRAG itself.
* `build_poly_z_source` ("poly-z"): an inventory trained (jointly, with their own rows) on
  documents *other* than the evaluated ones, frozen, then only the evaluated documents' rows
  trained against it. With held-out documents (`SourceRequest.heldout`, the PRAG files'
  non-evaluated questions) that is one fold: inventory on the held-out documents
  (`out/fold0/inventory`), rows for the evaluated ones (`out/fold0/rows`). Without them (the
  bundled sample has no spare questions) the documents are cross-fitted: sorted by id and
  split alternately into halves A and B; the inventory of A routes B's documents and the
  inventory of B routes A's (`out/fold0`, `out/fold1`), so no document's row is ever trained
  against an inventory that saw that document.

Both return a `PolySource`: a question's adapter is the PRAG document-level sum of its top-k
documents' mixed adapters (each an ordinary rank-r LoRA from the evaluation routing weights),
rank-concatenated by `merge_topk` into the same per-row batched generation path as PRAG.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jprag.lora.adapters import merge_topk
from jprag.poly.config import PolyConfig
from jprag.poly.routing import Inventory, mix, weights
from jprag.poly.store import load_joint, load_rows


@dataclasses.dataclass
class PolySource:
    """Poly-PRAG adapters: document id → (inventory, routing row) → mixed LoRA → top-k merge.

    `inventories[i]` are jnp inventories, `z[i] [n_i, Lr, M]` the routing rows that use
    inventory i, `doc_rows[doc id] = (i, row)`.
    """

    poly: PolyConfig
    inventories: list[Inventory]
    z: list[jax.Array]
    doc_rows: Mapping[str, tuple[int, int]]

    def _check(self, doc_ids: Sequence[str]) -> None:
        missing = sorted({d for d in doc_ids if d not in self.doc_rows})
        if missing:
            raise ValueError(f"{len(missing)} retrieved documents have no Poly-PRAG routing row "
                             f"(first: {missing[0]!r})")

    def routing_weights(self, doc_ids: Sequence[str]) -> np.ndarray:
        """Evaluation routing weights `[len(doc_ids), Lr, M]` (deterministic, rows sum to 1)."""
        self._check(doc_ids)
        z = jnp.stack([self.z[i][r] for i, r in (self.doc_rows[d] for d in doc_ids)])
        return np.asarray(weights(self.poly, z))

    def document_bank(self, doc_ids: Sequence[str]) -> dict[str, dict[str, jax.Array]]:
        """The documents' mixed adapters as a bank `{target: {"a": [n, L, in, r], "b": ...}}`
        (raw factors; scale `poly.scale`)."""
        self._check(doc_ids)
        parts, order = [], []
        for i, inventory in enumerate(self.inventories):
            mine = [(k, self.doc_rows[d][1]) for k, d in enumerate(doc_ids) if self.doc_rows[d][0] == i]
            if not mine:
                continue
            rows = jnp.asarray([r for _, r in mine], jnp.int32)
            parts.append(mix(inventory, weights(self.poly, jnp.take(self.z[i], rows, axis=0))))
            order += [k for k, _ in mine]
        bank = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
        inverse = jnp.asarray(np.argsort(np.asarray(order)), jnp.int32)  # back to doc_ids order
        return jax.tree.map(lambda x: jnp.take(x, inverse, axis=0), bank)

    def adapters(self, doc_ids_qk):
        unique = list(dict.fromkeys(d for ids in doc_ids_qk for d in ids))
        bank = self.document_bank(unique)
        pos = {d: k for k, d in enumerate(unique)}
        rows = jnp.asarray([[pos[d] for d in ids] for ids in doc_ids_qk], jnp.int32)
        return merge_topk(bank, rows, self.poly.scale, self.poly.merge)

    def storage(self) -> dict[str, int]:
        """fp32 bytes: one document's routing row (none under uniform routing, which ignores the
        rows), the inventories (shared) and the documents."""
        row = int(np.prod(self.z[0].shape[1:])) * 4 if self.poly.has_rows else 0
        shared = sum(int(x.size) * 4 for inv in self.inventories for x in jax.tree.leaves(inv))
        return {"row_bytes": row, "shared_bytes": shared, "n_docs": len(self.doc_rows)}


def _say(req, text: str) -> None:
    if req.progress:
        print(f"[poly] {text}", file=sys.stderr, flush=True)


def _common(req) -> dict:
    from jprag.mesh import make_mesh

    cfg = req.cfg
    return dict(poly=cfg.poly, mesh=make_mesh(cfg.mesh_data, cfg.mesh_model),
                pad_id=int(req.lm.tokenizer.pad_token_id or 0), model_id=req.lm.path, progress=req.progress,
                extra_index={"recipe": dataclasses.asdict(cfg.recipe)})


def _examples(req, docs):
    from jprag.train.recipe import corpus_examples

    return corpus_examples(req.lm.tokenizer, docs, req.cfg.recipe)


def _joint(req, docs, out, desc):
    from jprag.poly.joint import train_joint

    train_joint(req.lm.cfg, req.lm.params, _examples(req, docs), [d.id for d in docs], out, desc=desc,
                **_common(req))
    return load_joint(out)


def build_poly_source(req) -> PolySource:
    """Poly-PRAG: joint inventory + routing over the evaluated documents (`out/joint`)."""
    docs = [d for d in req.docs if d.qa]
    inventory, z, index = _joint(req, docs, req.out / "joint", "poly joint")
    as_jnp = lambda tree: jax.tree.map(jnp.asarray, tree)  # noqa: E731
    return PolySource(req.cfg.poly, [as_jnp(inventory)], [jnp.asarray(z)],
                      {d: (0, r) for r, d in enumerate(index["doc_ids"])})


def cross_fit_halves(docs: Sequence) -> tuple[list, list]:
    """Documents sorted by id, alternately into halves A and B (deterministic, balanced)."""
    ordered = sorted(docs, key=lambda d: d.id)
    return ordered[0::2], ordered[1::2]


def build_poly_z_source(req) -> PolySource:
    """Poly-z-PRAG: frozen inventory from other documents, only the evaluated documents' rows
    trained (held-out fold, or cross-fitted halves when the run has no held-out documents)."""
    from jprag.poly.polyz import train_routing_rows

    docs = [d for d in req.docs if d.qa]
    taken = {d.id for d in docs}
    heldout = [d for d in req.heldout if d.qa and d.id not in taken]
    if heldout:
        folds = [(heldout, docs)]
        _say(req, f"poly-z: inventory from {len(heldout)} held-out documents, routing rows for {len(docs)}")
    else:
        if len(docs) < 2:
            raise ValueError("poly-z needs held-out documents (heldout_per_file, dataset prag) or at least two "
                             f"evaluated documents to cross-fit; got {len(docs)}")
        a, b = cross_fit_halves(docs)
        folds = [(a, b), (b, a)]
        _say(req, f"poly-z: no held-out documents; cross-fitting two halves of {len(a)} and {len(b)} documents "
                  "(each half routed against the inventory of the other)")
    inventories, zs, doc_rows = [], [], {}
    common = _common(req)
    for f, (train_docs, new_docs) in enumerate(folds):
        fold = req.out / f"fold{f}"
        inventory, _, _ = _joint(req, train_docs, fold / "inventory", f"poly-z inventory {f}")
        common["extra_index"] = {**common["extra_index"], "inventory_dir": str(fold / "inventory"),
                                 "split": "heldout" if heldout else f"cross-fit fold {f} of 2"}
        train_routing_rows(req.lm.cfg, req.lm.params, inventory, _examples(req, new_docs), [d.id for d in new_docs],
                           fold / "rows", desc=f"poly-z rows {f}", **common)
        z, index = load_rows(fold / "rows")
        inventories.append(jax.tree.map(jnp.asarray, inventory))
        zs.append(jnp.asarray(z))
        doc_rows.update({d: (f, r) for r, d in enumerate(index["doc_ids"])})
    return PolySource(req.cfg.poly, inventories, zs, doc_rows)
