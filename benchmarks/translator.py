"""Parameterising a document: DyPRAG's translator (embed + translate) vs PRAG's encoder, same run.

The same documents (the first `--docs` of the published PRAG data in `--data-dir`, default
../shared/data beside the checkout, or the bundled sample with `--sample`), the default SmolLM2-135M-Instruct
GGUF and the PRAG recipe (LoRA rank 2, alpha 32 on gate/up/down, AdamW lr 3e-4, 1 epoch,
5 samples per document):

* prag: `encode_documents` over the documents into a temporary bank (`--chunk-size` stacked per
  step, orbax writes included). A first call compiles every step shape (reported as
  `first_run_s`); the timed second call re-uses the compiled step.
* dyprag: the document's embedding (one forward pass of the base model over the passage,
  `jprag.translator.embed`) and its translation into a LoRA (`translate`), after a warm-up call
  that compiles both. Reported batched (all documents, embedding 8 passages per call) and for
  one document alone (latency of parameterising a new document), best of `--repeats`. The
  translator is freshly initialised unless `--translator DIR` is given: its cost does not
  depend on its weights.

    python benchmarks/translator.py [--docs 8] [--chunk-size 8] [--repeats 3] [--sample]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def load_documents(args):
    if args.sample or not args.data_dir.is_dir():
        from jprag.data.sample import load_sample

        docs, source = load_sample()[1], "bundled sample"
    else:
        from jprag.data.documents import read_prag_dir

        docs, source = read_prag_dir(args.data_dir)[1], str(args.data_dir)
    docs = [d for d in docs if d.qa][: args.docs]
    if len(docs) < args.docs:
        sys.exit(f"{source}: only {len(docs)} documents with QA pairs, --docs {args.docs} requested")
    return docs, source


def best_of(fn, repeats: int) -> float:
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def bench_prag(args, lm, docs) -> dict:
    from jprag.lora.adapters import LoraConfig
    from jprag.mesh import make_mesh
    from jprag.train.encoder import encode_documents
    from jprag.train.recipe import RecipeConfig, corpus_examples
    from jprag.train.stacked import TrainConfig

    examples = corpus_examples(lm.tokenizer, docs, RecipeConfig())
    ids = [d.id for d in docs]
    kw = dict(lora=LoraConfig(), train=TrainConfig(), chunk_size=args.chunk_size, mesh=make_mesh(),
              pad_id=int(lm.tokenizer.pad_token_id or 0), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        encode_documents(lm.cfg, lm.params, examples, ids, pathlib.Path(tmp) / "warmup", **kw)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        encode_documents(lm.cfg, lm.params, examples, ids, pathlib.Path(tmp) / "timed", **kw)
        seconds = time.perf_counter() - t0
    return {"docs": len(ids), "chunk_size": args.chunk_size, "seconds": seconds, "s_per_doc": seconds / len(ids),
            "first_run_s": first,
            "samples": sum(len(e) for e in examples), "tokens": sum(len(x.tokens) for e in examples for x in e)}


def bench_dyprag(args, lm, docs) -> dict:
    import jax

    from jprag.lora.adapters import LoraConfig, init_bank
    from jprag.translator.config import TranslatorConfig
    from jprag.translator.embed import embed_passages
    from jprag.translator.hypernet import TranslatorSpec, fit_stats, init_translator
    from jprag.translator.pipeline import translate_embeddings
    from jprag.translator.store import load_translator

    passages = [d.passage for d in docs]
    tcfg = TranslatorConfig()
    if args.translator:
        spec, translator, meta = load_translator(args.translator)
        kind, max_len = meta["translator"]["embedding"], meta["translator"]["embed_max_len"]
    else:
        kind, max_len = tcfg.embedding, tcfg.embed_max_len
        emb = embed_passages(lm, passages, kind, max_len)
        spec = TranslatorSpec.create(lm.cfg, LoraConfig(), emb.shape[1], tcfg.hidden)
        adapters = jax.tree.map(np.asarray, init_bank(lm.cfg, LoraConfig(), jax.random.key(0), 2))
        translator = init_translator(spec, jax.random.key(0), fit_stats(emb, adapters))
    translator = jax.device_put(translator)

    def embed(ps):
        return embed_passages(lm, ps, kind, max_len)

    def translate(e):  # numpy out: includes the device-to-host copy of the factors
        return translate_embeddings(spec, translator, e)

    emb = embed(passages)  # warm-up: compiles every shape used below
    translate(emb)
    one = [embed([p]) for p in passages]
    translate(one[0])
    batched_embed = best_of(lambda: embed(passages), args.repeats)
    batched_translate = best_of(lambda: translate(emb), args.repeats)
    single_embed = float(np.mean([best_of(lambda p=p: embed([p]), args.repeats) for p in passages]))
    single_translate = float(np.mean([best_of(lambda e=e: translate(e), args.repeats) for e in one]))
    n = len(docs)
    return {
        "docs": n, "embedding": kind, "translator_params": spec.num_params(),
        "passage_tokens_mean": float(np.mean([len(lm.tokenizer(p)["input_ids"][:max_len]) for p in passages])),
        "batched": {"embed_ms_per_doc": 1e3 * batched_embed / n, "translate_ms_per_doc": 1e3 * batched_translate / n,
                    "ms_per_doc": 1e3 * (batched_embed + batched_translate) / n},
        "single": {"embed_ms": 1e3 * single_embed, "translate_ms": 1e3 * single_translate,
                   "ms_per_doc": 1e3 * (single_embed + single_translate)},
    }


def print_table(res) -> None:
    p, d = res["prag"], res["dyprag"]
    print("\n| parameterise one document | time per document | vs PRAG |")
    print("|---|---:|---:|")
    print(f"| PRAG: encode (5 samples, AdamW, chunks of {p['chunk_size']}) | {p['s_per_doc']:.2f} s | 1x |")
    for name, row in (("batched", d["batched"]), ("single", d["single"])):
        ms = row["ms_per_doc"]
        parts = (f"embed {row.get('embed_ms_per_doc', row.get('embed_ms')):.1f} + translate "
                 f"{row.get('translate_ms_per_doc', row.get('translate_ms')):.1f}")
        label = f"DyPRAG {name} ({parts} ms)"
        print(f"| {label} | {ms:.1f} ms | {1e3 * p['s_per_doc'] / ms:.0f}x faster |")
    print(f"\n{res['source']}, {p['docs']} documents; PRAG first run (with compilation) {p['first_run_s']:.1f} s.")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file or HF directory (default: embedded SmolLM2-135M)")
    ap.add_argument("--data-dir", type=pathlib.Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--sample", action="store_true", help="use the bundled sample documents")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--chunk-size", type=int, default=8, help="documents PRAG trains together")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--translator", default=None, help="a trained translator (default: a fresh one)")
    args = ap.parse_args(argv)

    from jprag.model.chat import load

    lm = load(args.model)
    docs, source = load_documents(args)
    print(f"[translator] {len(docs)} documents from {source}: PRAG encoding ...", file=sys.stderr, flush=True)
    prag = bench_prag(args, lm, docs)
    print("[translator] DyPRAG embed + translate ...", file=sys.stderr, flush=True)
    dyprag = bench_dyprag(args, lm, docs)
    res = {"model": lm.path, "source": source, "cpu_count": os.cpu_count(), "prag": prag, "dyprag": dyprag,
           "speedup_batched": prag["s_per_doc"] * 1e3 / dyprag["batched"]["ms_per_doc"],
           "speedup_single": prag["s_per_doc"] * 1e3 / dyprag["single"]["ms_per_doc"]}
    print(json.dumps(res, indent=2))
    print_table(res)
    return res


if __name__ == "__main__":
    main()
