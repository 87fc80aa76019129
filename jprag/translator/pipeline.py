"""DyPRAG in the evaluation pipeline: the "dyprag" adapter source.

`build_dyprag_source(SourceRequest)` gets a translator and translates every evaluation document:

* `[translator] path` set: the translator trained by `jprag translator train` there (refused if
  it was trained on any of the documents to translate);
* held-out documents in the request (prag: documents of questions `limit_per_file …
  limit_per_file + heldout_per_file` of each file, never evaluated): their PRAG adapters
  (`out/pairs`, shared initialisation, see `jprag.translator.pairs`) train one translator
  (`out/translator`), which translates every evaluation document;
* no held-out documents (the bundled sample): k-fold cross-fitting over the evaluation
  documents (`[translator] folds`, default 2). Their PRAG adapters (`out/pairs`) are split by a
  seeded permutation of the ids; translator f (`out/translator_fold<f>`) is trained on every
  fold but f and translates fold f, so no document is translated by a translator that saw it
  or its adapter.

Everything is cached under `out` and resumes. `out/summary.json` records the split, which
translator translated which documents, and the time spent embedding and translating.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jprag.io import write_json_atomic
from jprag.lora.adapters import Bank, LoraConfig
from jprag.translator.embed import embed_passages
from jprag.translator.hypernet import Translator, TranslatorSpec, combine_topk, translate
from jprag.translator.pairs import encode_pairs
from jprag.translator.store import TranslatorError, find_translator, load_translator, lora_from_meta


@dataclasses.dataclass
class TranslatedSource:
    """DyPRAG: translated adapters of documents; a question's adapter combines its top-k."""

    bank: Bank  # {target: {"a": [docs, L, in, r], "b": [docs, L, r, out]}}, raw factors
    doc_rows: Mapping[str, int]
    lora: LoraConfig
    combine: str = "mean"
    translator_bytes: int = 0  # fp32 size of one translator (MLPs and statistics)

    def storage(self) -> dict[str, int]:
        """What DyPRAG keeps: one shared translator and nothing per document (a document's
        adapter is translated when it is needed; this run holds them in memory only)."""
        return {"row_bytes": 0, "shared_bytes": self.translator_bytes, "n_docs": len(self.doc_rows)}

    def adapters(self, doc_ids_qk):
        missing = sorted({d for ids in doc_ids_qk for d in ids if d not in self.doc_rows})
        if missing:
            raise ValueError(f"{len(missing)} retrieved documents were not translated (first: {missing[0]!r})")
        rows = jnp.asarray([[self.doc_rows[d] for d in ids] for ids in doc_ids_qk], jnp.int32)
        return combine_topk(self.bank, rows, self.lora.scale, self.combine)


_translate = jax.jit(translate, static_argnums=0)


def translate_embeddings(spec: TranslatorSpec, translator: Translator, emb: np.ndarray, batch: int = 32) -> Bank:
    """Translated factors (numpy bank `[N, ...]`) of embeddings `[N, E]`, up to `batch` rows per
    call (rounded up to a power of two and zero padded, so few programs compile)."""
    n = emb.shape[0]
    batch = min(batch, 1 << max(n - 1, 0).bit_length())
    translator = jax.device_put(translator)
    parts = []
    for start in range(0, n, batch):
        chunk = np.zeros((batch, emb.shape[1]), np.float32)
        chunk[: min(batch, n - start)] = emb[start : start + batch]
        out = _translate(spec, translator, jnp.asarray(chunk))
        parts.append(jax.tree.map(lambda x, k=min(batch, n - start): np.asarray(x)[:k], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def translate_documents(lm, spec: TranslatorSpec, translator: Translator, meta: Mapping[str, Any], docs
                        ) -> tuple[Bank, dict[str, float]]:
    """Embed and translate documents with a trained translator; returns the bank and timings (s)."""
    t0 = time.perf_counter()
    emb = embed_passages(lm, [d.passage for d in docs], meta["translator"]["embedding"],
                         meta["translator"]["embed_max_len"])
    t1 = time.perf_counter()
    bank = translate_embeddings(spec, translator, emb)
    return bank, {"embed_s": t1 - t0, "translate_s": time.perf_counter() - t1}


def fit_translator(cfg, lm, docs: Sequence, teacher: Bank, out: pathlib.Path, progress: bool = True,
                   extra_meta: Mapping[str, Any] | None = None):
    """Train (or resume) a translator at `out` on documents and their PRAG adapters (`teacher`,
    rows in `docs` order), with the run's LoRA, recipe, mesh and `[translator]` settings."""
    from jprag.mesh import make_mesh
    from jprag.train.recipe import corpus_examples
    from jprag.translator.train import train_translator

    tcfg = cfg.translator
    examples = corpus_examples(lm.tokenizer, docs, cfg.recipe)
    emb = embed_passages(lm, [d.passage for d in docs], tcfg.embedding, tcfg.embed_max_len)
    return train_translator(
        lm.cfg, lm.params, cfg.lora, tcfg, examples, emb, teacher, [d.id for d in docs], out,
        mesh=make_mesh(cfg.mesh_data, cfg.mesh_model), pad_id=int(lm.tokenizer.pad_token_id or 0),
        model_id=lm.path, extra_meta={"recipe": dataclasses.asdict(cfg.recipe), **(extra_meta or {})},
        progress=progress,
    )


def cross_fit_folds(doc_ids: Sequence[str], k: int, seed: int) -> list[list[str]]:
    """k disjoint folds of the documents (sizes differ by at most one), a function of the id set."""
    ids = sorted(set(doc_ids))
    if len(ids) < k:
        raise ValueError(f"[translator] folds={k}: cross-fitting needs at least {k} documents, "
                         f"the run has {len(ids)}")
    perm = np.random.default_rng([seed, 7]).permutation(len(ids))
    return [sorted(ids[j] for j in perm[f::k]) for f in range(k)]


def _collect(parts: Sequence[tuple[Sequence[str], Bank]]) -> tuple[Bank, dict[str, int]]:
    ids = [d for part_ids, _ in parts for d in part_ids]
    bank = jax.tree.map(lambda *xs: jnp.asarray(np.concatenate(xs)), *[b for _, b in parts])
    return bank, {d: i for i, d in enumerate(ids)}


def build_dyprag_source(req) -> TranslatedSource:
    """The "dyprag" adapter source of a pipeline run (see the module docstring)."""
    tcfg, lm = req.cfg.translator, req.lm
    docs = list(req.docs)
    out = pathlib.Path(req.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"n_docs": len(docs), "combine": tcfg.combine}
    times = {"embed_s": 0.0, "translate_s": 0.0}

    size = {}

    def translated(fitted, targets) -> Bank:  # fitted: (spec, translator, meta)
        size["bytes"] = sum(int(np.size(x)) * 4 for x in jax.tree.leaves(fitted[1]))
        bank, t = translate_documents(lm, *fitted, targets)
        for key in times:
            times[key] += t[key]
        return bank

    if tcfg.path is not None:
        root = find_translator(tcfg.path)
        spec, translator, meta = load_translator(root)
        if meta["model"] != lm.path:
            raise TranslatorError(f"{root}/meta.json: field 'model' is {meta['model']!r}, but this run's model is "
                                  f"{lm.path!r}")
        seen = sorted(set(meta["doc_ids"]) & {d.id for d in docs})
        if seen:
            raise TranslatorError(f"{root}: the translator was trained on {len(seen)} of the documents to translate "
                                  f"(first: {seen[0]!r}); evaluate on questions disjoint from its training data")
        lora = lora_from_meta(meta)
        bank, rows = _collect([([d.id for d in docs], translated((spec, translator, meta), docs))])
        summary.update(mode="pretrained", translator=str(root))
    elif req.heldout:
        heldout = [d for d in req.heldout if d.qa]
        if not heldout:
            raise ValueError("no held-out document has QA pairs: nothing to train the translator on")
        teacher = encode_pairs(req.cfg, lm, heldout, out / "pairs", req.progress)
        fitted = fit_translator(req.cfg, lm, heldout, teacher, out / "translator", req.progress,
                                {"split": "heldout"})
        lora = req.cfg.lora
        bank, rows = _collect([([d.id for d in docs], translated(fitted, docs))])
        summary.update(mode="heldout", n_train_docs=len(heldout), translator=str(out / "translator"))
    else:
        by_id = {d.id: d for d in docs}
        folds = cross_fit_folds(list(by_id), tcfg.folds, tcfg.seed)
        train_docs = [d for d in docs if d.qa]
        teacher_all = encode_pairs(req.cfg, lm, train_docs, out / "pairs", req.progress)
        row = {d.id: i for i, d in enumerate(train_docs)}
        parts, summary["folds"] = [], []
        for f, fold in enumerate(folds):
            train = [d for d in train_docs if d.id not in set(fold)]
            teacher = jax.tree.map(lambda x, train=train: x[[row[d.id] for d in train]], teacher_all)
            where = out / f"translator_fold{f}"
            fitted = fit_translator(req.cfg, lm, train, teacher, where, req.progress,
                                    {"split": f"cross-fit fold {f} of {len(folds)}"})
            parts.append((fold, translated(fitted, [by_id[d] for d in fold])))
            summary["folds"].append({"translator": str(where), "translated": fold, "trained_on": [d.id for d in train]})
        lora = req.cfg.lora
        bank, rows = _collect(parts)
        summary.update(mode=f"{len(folds)}-fold cross-fitting")
    summary.update(times, ms_per_doc=1e3 * sum(times.values()) / max(len(docs), 1),
                   timing="wall time of this run's embedding and translation calls, compilation included "
                          "(steady state: benchmarks/translator.py)")
    write_json_atomic(out / "summary.json", summary, indent=1)
    return TranslatedSource(bank, rows, lora, tcfg.combine, size.get("bytes", 0))
