"""Poly-PRAG training throughput and memory vs the per-document PRAG encoder, same documents, same run.

Documents: the published PRAG data (`--data-dir`, default ../shared/data beside the checkout)
or, with `--sample` (or when that directory is missing), the bundled sample. Model: the default
SmolLM2-135M-Instruct GGUF. Every side trains on the same `Example` token ids
(`corpus_examples`, the PRAG recipe: 5 samples per document), one epoch:

* encoder: `jprag.train.encoder.encode_documents`, PRAG LoRA rank 2 / alpha 32 on gate/up/down,
  `--chunk-size` documents stacked per step (capped by `max_tokens_per_step`);
* poly: `jprag.poly.joint.train_joint`, the inventory (`--n-skills` LoRAs of rank `--rank` on
  the same targets) and one routing row per document trained jointly, `--batch-docs`
  documents per step (same token cap);
* poly-z: `jprag.poly.polyz.train_routing_rows`, only new routing rows against a frozen
  inventory, `--chunk-size` rows stacked per step.

Each side runs in its own subprocess (this script re-invoked with `--part`), so its peak RSS
(`ru_maxrss`, model load included) is attributable. Each side trains twice into fresh
directories and the second run is timed: the first compiles every step shape, the second
re-uses the compiled programs (`compiles_during_timed_run` should be 0). docs/s = documents
trained (one epoch each) per second of the timed run, checkpoint/orbax writes included.

    python benchmarks/poly.py [--docs 32] [--chunk-size 16] [--batch-docs 16] [--sample] [--parts ...]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MARK = "@@RESULT "
PARTS = ("encoder", "poly", "poly-z")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load_examples(args, tokenizer):
    from jprag.train.recipe import RecipeConfig, corpus_examples

    if args.sample:
        from jprag.data.sample import load_sample

        docs = load_sample()[1]
    else:
        from jprag.data.documents import read_prag_dir

        docs = read_prag_dir(args.data_dir)[1]
    docs = [d for d in docs if d.qa]
    if len(docs) < args.docs:
        sys.exit(f"only {len(docs)} documents available, --docs {args.docs} requested")
    docs = docs[: args.docs]
    return [d.id for d in docs], corpus_examples(tokenizer, docs, RecipeConfig())


def _timed_twice(run) -> dict:
    """`run(out_dir)` into a warm-up dir, then timed into a fresh one."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run(pathlib.Path(tmp) / "warmup")
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = run(pathlib.Path(tmp) / "timed")
        return {"seconds": time.perf_counter() - t0, "first_run_s": first, "index": index}


def _cache_size(jitted_dict) -> int:
    return sum(fn._cache_size() for fn in jitted_dict.values())


def part(args) -> dict:
    from jprag.lora.adapters import FFN_TARGETS, LoraConfig
    from jprag.lora.store import bytes_per_document
    from jprag.mesh import make_mesh
    from jprag.model import chat
    from jprag.poly import joint, polyz
    from jprag.poly.config import PolyConfig
    from jprag.poly.routing import init_inventory
    from jprag.poly.store import storage_bytes
    from jprag.train import encoder
    from jprag.train.stacked import TrainConfig

    lm = chat.load(args.model)
    ids, examples = load_examples(args, lm.tokenizer)
    mesh = make_mesh()
    pad_id = int(lm.tokenizer.pad_token_id or 0)
    poly = PolyConfig(n_skills=args.n_skills, rank=args.rank, epochs=1, z_epochs=1, batch_docs=args.batch_docs,
                      chunk_size=args.chunk_size, checkpoint_every=args.checkpoint_every)
    common = dict(mesh=mesh, pad_id=pad_id, progress=False)
    out = {"docs": len(ids), "samples": sum(len(ex) for ex in examples),
           "real_tokens": sum(len(e.tokens) for ex in examples for e in ex)}
    if args.part == "encoder":
        lora = LoraConfig(rank=2, alpha=32.0, targets=FFN_TARGETS)
        shared = {}  # encode_documents jits per call: share the first wrapper so the timed run re-uses it
        original = encoder.jit_train_step

        def shared_jit(step, mesh_, *shapes):
            if "fn" not in shared:
                shared["fn"] = original(step, mesh_, *shapes)
            return shared["fn"]

        encoder.jit_train_step = shared_jit
        compiled = {}

        def run(path):
            index = encoder.encode_documents(lm.cfg, lm.params, examples, ids, path, lora=lora,
                                             train=TrainConfig(epochs=1), chunk_size=args.chunk_size, **common)
            compiled.setdefault("after_first", shared["fn"]._cache_size())
            return index

        res = _timed_twice(run)
        out.update(docs_per_step=len(res["index"]["chunks"][0]["rows"]),
                   compiles_during_timed_run=shared["fn"]._cache_size() - compiled["after_first"],
                   bytes_per_doc=bytes_per_document(lora, lm.cfg, 4), shared_bytes=0)
    elif args.part == "poly":
        compiled = {}

        def run(path):
            index = joint.train_joint(lm.cfg, lm.params, examples, ids, path, poly=poly, **common)
            compiled.setdefault("after_first", _cache_size(joint._JITTED))
            return index

        res = _timed_twice(run)
        s = storage_bytes(lm.cfg, poly)
        out.update(docs_per_step=res["index"]["batch_docs"], steps=res["index"]["n_steps"],
                   compiles_during_timed_run=_cache_size(joint._JITTED) - compiled["after_first"],
                   bytes_per_doc=s["row_bytes"], shared_bytes=s["shared_bytes"])
    else:
        inventory = init_inventory(lm.cfg, poly)  # any inventory: the step's cost does not depend on it
        compiled = {}

        def run(path):
            index = polyz.train_routing_rows(lm.cfg, lm.params, inventory, examples, ids, path, poly=poly, **common)
            compiled.setdefault("after_first", _cache_size(polyz._JITTED))
            return index

        res = _timed_twice(run)
        s = storage_bytes(lm.cfg, poly)
        out.update(docs_per_step=len(res["index"]["chunks"][0]["rows"]),
                   compiles_during_timed_run=_cache_size(polyz._JITTED) - compiled["after_first"],
                   bytes_per_doc=s["row_bytes"], shared_bytes=s["shared_bytes"])
    out.update(seconds=res["seconds"], first_run_s=res["first_run_s"], peak_rss_mib=peak_rss_mib())
    return out


def run_part(args, name: str) -> dict:
    cmd = [sys.executable, __file__, "--part", name, "--docs", str(args.docs), "--chunk-size", str(args.chunk_size),
           "--batch-docs", str(args.batch_docs), "--n-skills", str(args.n_skills), "--rank", str(args.rank),
           "--checkpoint-every", str(args.checkpoint_every), "--data-dir", str(args.data_dir)]
    cmd += ["--sample"] if args.sample else []
    cmd += ["--model", args.model] if args.model else []
    print(f"[poly bench] running part {name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode or not lines:
        hint = " (killed: probably out of memory; try smaller --chunk-size / --batch-docs)" \
            if proc.returncode == -9 else ""
        sys.exit(f"part {name} failed (exit {proc.returncode}){hint}:\n{proc.stdout}")
    return json.loads(lines[-1][len(MARK):])


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="a .gguf file or checkpoint (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--data-dir", type=pathlib.Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--sample", action="store_true", help="use the bundled sample's documents")
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=16, help="encoder / Poly-z documents per stacked step")
    ap.add_argument("--batch-docs", type=int, default=16, help="Poly joint training: documents per step")
    ap.add_argument("--n-skills", type=int, default=20)
    ap.add_argument("--rank", type=int, default=4, help="rank of the Poly inventory LoRAs")
    ap.add_argument("--checkpoint-every", type=int, default=50, help="Poly joint steps between checkpoints")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma separated subset of {PARTS}")
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.sample and not args.data_dir.is_dir():
        print(f"{args.data_dir} not found: using the bundled sample", file=sys.stderr)
        args.sample = True
    if args.part:
        print(MARK + json.dumps(part(args)), flush=True)
        return None
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        sys.exit(f"--parts: expected a comma separated subset of {PARTS}, got {args.parts!r}")
    res = {"model": args.model or "SmolLM2-135M-Instruct (default GGUF)", "cpu_count": os.cpu_count(),
           "documents": "bundled sample" if args.sample else str(args.data_dir), "epochs": 1,
           "settings": {k: vars(args)[k] for k in ("docs", "chunk_size", "batch_docs", "n_skills", "rank")},
           "parts": {}}
    for name in parts:
        r = run_part(args, name)
        r["docs_per_s"] = r["docs"] / r["seconds"]
        r["real_tokens_per_s"] = r["real_tokens"] / r["seconds"]
        r["bytes_per_doc_amortised"] = r["bytes_per_doc"] + r["shared_bytes"] / r["docs"]
        res["parts"][name] = r
    if "encoder" in res["parts"]:
        base = res["parts"]["encoder"]
        for r in res["parts"].values():
            r["speed_vs_encoder"] = r["docs_per_s"] / base["docs_per_s"]
            r["rss_vs_encoder"] = r["peak_rss_mib"] / base["peak_rss_mib"]
    print(json.dumps(res, indent=2))
    print("\n| side | docs/step | docs/s | real tok/s | vs encoder | peak RSS MiB | KiB/doc own | shared MiB "
          "| compiles in timed run |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in res["parts"].items():
        vs = f"{r['speed_vs_encoder']:.2f}x" if "speed_vs_encoder" in r else "—"
        print(f"| {name} | {r['docs_per_step']} | {r['docs_per_s']:.3f} | {r['real_tokens_per_s']:.0f} | {vs} "
              f"| {r['peak_rss_mib']:.0f} | {r['bytes_per_doc'] / 1024:.2f} | {r['shared_bytes'] / 2**20:.1f} "
              f"| {r['compiles_during_timed_run']} |")
    return res


if __name__ == "__main__":
    main()
