"""The translator's training pairs: (document, PRAG adapter), every adapter from one shared init.

jprag's encoder draws each document's initial A from its row in the bank (`init_bank` folds the
row index into the key), so no two documents of a bank start from the same A. A trained A is
then mostly its own random draw (training moves it by ~1e-3, its init is ~1e-2), and ΔW = s·A·B
lies in that random subspace: a target the translator cannot predict from the document, which
would teach it to emit the average of noise. DyPRAG, like the PRAG reference, starts every
document's adapter from one saved initialisation, so the trained factors differ only by what
the documents taught.

Here the training documents are encoded together by jprag's own `encode_documents` (same
recipe, optimizer, LoRA config and seed as the run's PRAG encoding, stacked on the document
axis) with `shared_init=True`, so every document starts from the same A. Resumable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from jprag.lora.adapters import Bank


def encode_pairs(cfg, lm, docs: Sequence, out: pathlib.Path, progress: bool = True) -> Bank:
    """PRAG adapters of `docs` (numpy bank `[N, ...]` in `docs` order), every one trained from the
    same initial A, with the run's `lora`, `train`, `recipe` and `seed` (resumable)."""
    from jprag.lora.store import BankError, load_bank
    from jprag.mesh import make_mesh
    from jprag.train.encoder import encode_documents
    from jprag.train.recipe import corpus_examples

    if not docs:
        raise ValueError("no training documents for the translator")
    for doc in docs:
        if not doc.qa:
            raise ValueError(f"document {doc.id!r} has no QA pairs: no PRAG adapter to learn from")
    root = pathlib.Path(out) / "bank"
    ids = [d.id for d in docs]
    encode_documents(
        lm.cfg, lm.params, corpus_examples(lm.tokenizer, docs, cfg.recipe), ids, root,
        lora=cfg.lora, train=cfg.train, chunk_size=cfg.chunk_size, mesh=make_mesh(cfg.mesh_data, cfg.mesh_model),
        seed=cfg.seed, pad_id=int(lm.tokenizer.pad_token_id or 0), model_id=lm.path,
        extra_index={"recipe": dataclasses.asdict(cfg.recipe)}, progress=progress, shared_init=True,
    )
    bank, index = load_bank(root)
    if index["doc_ids"] != ids:
        raise BankError(f"{root}/index.json: holds other documents than the translator's training set")
    return {t: {k: np.asarray(v) for k, v in ab.items()} for t, ab in bank.items()}
