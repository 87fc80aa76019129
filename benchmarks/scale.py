"""Scaling the document trainer: docs/s over devices and processes, and a long resumable run.

Tiny random llama (d_model 64, 2 layers; so it runs in CI time), synthetic documents of 2-4
samples of 8-60 tokens, PRAG LoRA rank 2 on gate/up/down, one epoch. Each configuration runs in
its own subprocess(es) (this script re-invoked with `--part`), trains twice into fresh
directories and times the second run (the first compiles):

* `encoder`: `encode_documents` with chunks of 32 documents, at 1, 2, 4, 8 virtual CPU devices
  in one process (`--xla_force_host_platform_device_count`) and at 2 processes x 4 devices
  (gloo collectives, `jax.distributed`), mesh data = every device;
* `poly`: `train_joint` (inventory of 4 rank-2 LoRAs + routing rows), 32 documents per step,
  the same device counts;
* `long`: one run of `--long-docs` documents (default 10,000) on 8 devices, killed (SIGKILL)
  once after `--kill-after` chunks and resumed; wall time and peak RSS sampled after every
  chunk, reported per 1,000 documents.
* `serve`: answering 32 questions (2 batches of 16, top-3 documents drawn uniformly from the
  whole bank, 24 prompt tokens, 16 new tokens, greedy) through `BankSource.from_dir` from banks
  of `--serve-docs` documents (default 1,000 and 100,000). The banks are written in the
  encoder's format (`jprag-adapter-bank/2`, chunks of 256 rows) with random factors instead of
  trained ones: serving reads rows, not values, and training 100,000 documents would take the
  benchmark's whole budget. Writing and answering run in separate processes, so the peak RSS
  is the answering process's alone.

JSON to `--out` (default benchmarks/scale.json) and a Markdown table on stdout. Virtual devices
share the machine's cores, so on a 2-core CPU more devices cannot be faster: the figures show
that the multi-host path costs little over one process, not a speed-up.

    python benchmarks/scale.py [--docs 256] [--long-docs 10000] [--parts encoder poly long serve]

Parts not run keep their earlier results in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def part(args) -> None:
    """One process of one configuration (run in a subprocess)."""
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(REPO))
    from jprag.distributed import DistConfig, initialize, is_primary

    if args.nproc > 1:
        initialize(DistConfig(f"127.0.0.1:{args.port}", args.nproc, args.pid, timeout_s=120))
    import jax
    import numpy as np

    import jprag.train.encoder as encoder
    from jprag.lora.adapters import LoraConfig
    from jprag.mesh import make_mesh
    from jprag.model.config import ModelConfig
    from jprag.model.transformer import init_params
    from jprag.poly.config import PolyConfig
    from jprag.poly.joint import train_joint
    from jprag.train.recipe import Example
    from jprag.train.stacked import TrainConfig

    cfg = ModelConfig(family="llama", vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      d_ff=96)
    if args.kind in ("write-bank", "serve"):  # no training documents
        return serve_part(args, cfg, init_params(cfg, jax.random.key(0)), pathlib.Path(args.dir))
    rng = np.random.RandomState(0)
    docs = []
    for _ in range(args.n):
        docs.append([Example(rng.randint(3, 128, k).astype(np.int32), np.r_[0, np.ones(k - 1, np.int32)])
                     for k in rng.randint(8, 61, rng.randint(2, 5))])
    ids = [f"d{i}" for i in range(args.n)]
    params = init_params(cfg, jax.random.key(0))
    mesh = make_mesh()
    out = pathlib.Path(args.dir)
    rss = []

    if args.kind == "long":
        real_save = encoder.save_chunk

        def sampled(root, c, tree):
            real_save(root, c, tree)
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)

        encoder.save_chunk = sampled
        t0 = time.perf_counter()
        index = encoder.encode_documents(cfg, params, docs, ids, out / "bank", lora=LoraConfig(rank=2),
                                         chunk_size=32, mesh=mesh, progress=False)
        done = sum(len(c["rows"]) for c in index["chunks"] if c["done"])
        if is_primary():
            print(json.dumps({"seconds": time.perf_counter() - t0, "docs": done, "rss_gib_per_chunk": rss}))
        return

    seconds = []
    for rep in range(2):
        t0 = time.perf_counter()
        if args.kind == "encoder":
            encoder.encode_documents(cfg, params, docs, ids, out / f"bank{rep}", lora=LoraConfig(rank=2),
                                     train=TrainConfig(learning_rate=1e-3), chunk_size=32, mesh=mesh, progress=False)
        else:
            train_joint(cfg, params, docs, ids, out / f"joint{rep}", mesh=mesh, progress=False,
                        poly=PolyConfig(n_skills=4, rank=2, batch_docs=32, epochs=1, checkpoint_every=10**6))
        seconds.append(time.perf_counter() - t0)
    if is_primary():
        print(json.dumps({"seconds": seconds[-1], "first_seconds": seconds[0],
                          "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


SERVE_CHUNK = 256


def serve_part(args, cfg, params, out) -> None:
    """`write-bank`: a bank of `args.n` random adapters in the encoder's format; `serve`: answer
    32 questions from it and report the peak RSS (each in its own process)."""
    import jax
    import numpy as np

    from jprag import store
    from jprag.eval.methods import BankSource
    from jprag.lora.adapters import LoraConfig
    from jprag.lora.store import FORMAT, lora_to_json, save_chunk
    from jprag.model.generate import generate

    lora = LoraConfig(rank=2)
    bank = out / "bank"
    ids = [f"d{i}" for i in range(args.n)]
    if args.kind == "write-bank":
        shapes = lora.shapes(cfg)
        rng = np.random.default_rng(0)
        chunks = []
        for c, lo in enumerate(range(0, args.n, SERVE_CHUNK)):
            rows = list(range(lo, min(lo + SERVE_CHUNK, args.n)))
            save_chunk(bank, c, {t: {k: (0.01 * rng.standard_normal((SERVE_CHUNK, *v))).astype(np.float32)
                                     for k, v in ab.items()} for t, ab in shapes.items()})
            chunks.append({"rows": rows, "done": True, "dir": c, "slots": SERVE_CHUNK, "processes": 1})
        store.write_index(bank, {"format": FORMAT, "model": "tiny-random", "lora": lora_to_json(lora), "seed": 0,
                                 "doc_ids": ids, "dtype": "float32", "chunks": chunks,
                                 "shapes": {t: {k: list(v) for k, v in ab.items()} for t, ab in shapes.items()}})
        print(json.dumps({"docs": args.n}))
        return
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    source = BankSource.from_dir(bank)
    rng = np.random.default_rng(1)
    answered = 0
    for _ in range(2):  # 2 batches of 16 questions
        top = [[ids[i] for i in rng.choice(args.n, 3, replace=False)] for _ in range(16)]
        adapters = source.adapters(top)
        prompts = [rng.integers(3, cfg.vocab_size, 24).tolist() for _ in range(16)]
        outs = generate(cfg, params, prompts, max_new_tokens=16, adapters=adapters)
        answered += len(outs)
    jax.block_until_ready(adapters)
    print(json.dumps({"docs": args.n, "questions": answered, "seconds": time.perf_counter() - t0,
                      "rss_before_gib": before,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "bank_bytes": sum(f.stat().st_size for f in bank.rglob("*") if f.is_file())}))


def _launch(kind, n, devices, nproc, tmp, extra=()):
    port = _free_port()
    cmd = lambda i: [sys.executable, __file__, "--part", kind, "--n", str(n), "--devices", str(devices),  # noqa: E731
                     "--nproc", str(nproc), "--pid", str(i), "--port", str(port), "--dir", str(tmp), *extra]
    return [subprocess.Popen(cmd(i), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            for i in range(nproc)]


def _result(procs) -> dict:
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a benchmark part failed (exit codes {[p.returncode for p in procs]})")
    return json.loads(outs[0].strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=256)
    ap.add_argument("--long-docs", type=int, default=10_000)
    ap.add_argument("--kill-after", type=float, default=0.5, help="kill the long run after this share of it")
    ap.add_argument("--serve-docs", type=int, nargs="+", default=[1_000, 100_000])
    ap.add_argument("--parts", nargs="+", default=["encoder", "poly", "long", "serve"])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "scale.json"))
    ap.add_argument("--part", help=argparse.SUPPRESS)
    for flag in ("--n", "--devices", "--nproc", "--pid", "--port"):
        ap.add_argument(flag, type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        return part(argparse.Namespace(kind=args.part, n=args.n, devices=args.devices, nproc=args.nproc,
                                       pid=args.pid, port=args.port, dir=args.dir))
    old = json.loads(pathlib.Path(args.out).read_text()) if pathlib.Path(args.out).is_file() else {}
    results = {"machine": {"cpus": os.cpu_count(), "platform": sys.platform}, "docs": args.docs,
               **{k: v for k, v in old.items() if k in ("rows", "long", "serve")}}
    if {"encoder", "poly"} & set(args.parts):
        results["rows"] = [r for r in results.get("rows", []) if r["trainer"] not in args.parts]
    lines = ["| trainer | processes x devices | docs/s | first run s (compile) | peak RSS GiB |", "|---|---|---:|---:|---:|"]
    for kind in (k for k in ("encoder", "poly") if k in args.parts):
        for nproc, devices in ((1, 1), (1, 2), (1, 4), (1, 8), (2, 4)):
            with tempfile.TemporaryDirectory() as tmp:
                r = _result(_launch(kind, args.docs, devices, nproc, tmp))
            row = {"trainer": kind, "processes": nproc, "devices": devices, "docs_per_s": args.docs / r["seconds"], **r}
            results.setdefault("rows", []).append(row)
            lines.append(f"| {kind} | {nproc} x {devices} | {row['docs_per_s']:.1f} | {r['first_seconds']:.1f} | "
                         f"{r['peak_rss_gib']:.2f} |")
            print(lines[-1], flush=True)
    if "long" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            procs = _launch("long", args.long_docs, 8, 1, tmp)
            index = pathlib.Path(tmp) / "bank" / "index.json"
            while procs[0].poll() is None:  # kill once, mid-run
                time.sleep(1.0)
                if index.is_file():
                    chunks = json.loads(index.read_text())["chunks"]
                    if sum(c["done"] for c in chunks) >= args.kill_after * len(chunks):
                        procs[0].send_signal(signal.SIGKILL)
                        procs[0].wait()
                        break
            killed_at = sum(c["done"] for c in json.loads(index.read_text())["chunks"])
            r = _result(_launch("long", args.long_docs, 8, 1, tmp))
            wall = time.perf_counter() - t0
        per_k = r["rss_gib_per_chunk"][:: max(1, 1000 // 32)]
        results["long"] = {"docs": args.long_docs, "killed_after_chunks": killed_at, "wall_seconds": wall,
                           "resumed_docs": r["docs"], "resumed_seconds": r["seconds"],
                           "rss_gib_every_1000_docs_of_resumed_run": per_k}
        lines += ["", f"long run: {args.long_docs} documents, killed after {killed_at} chunks of 32 and resumed; "
                      f"{wall:.0f} s wall in all; peak RSS every ~1,000 documents of the resumed run (GiB): "
                      + ", ".join(f"{x:.2f}" for x in per_k)]
    if "serve" in args.parts:
        serve = []
        for n in args.serve_docs:
            with tempfile.TemporaryDirectory() as tmp:
                _result(_launch("write-bank", n, 1, 1, tmp))
                serve.append(_result(_launch("serve", n, 1, 1, tmp)))
        results["serve"] = serve
        lines += ["", "| bank documents | bank on disk MiB | answering 32 questions s | RSS before MiB | peak RSS MiB |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['docs']:,} | {r['bank_bytes'] / 2**20:.0f} | {r['seconds']:.1f} | {r['rss_before_gib'] * 1024:.0f} | "
                  f"{r['peak_rss_gib'] * 1024:.0f} |" for r in serve]
        lines.append(f"peak RSS ratio, largest / smallest bank: {serve[-1]['peak_rss_gib'] / serve[0]['peak_rss_gib']:.2f}")
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
