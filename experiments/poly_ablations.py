"""Poly-PRAG ablations: uniform vs learned routing, inventory size M, inventory rank; a PCA plot of
the learned routing vectors; a storage table (bytes per document: PRAG vs Poly-PRAG vs Poly-z).

Every variant is one `jprag.pipeline.run` of the base config (`--config`, default
experiments/poly_ablations.toml) with its `[poly]` section changed, in its own directory under
`--out`; the base variant also runs PRAG and Poly-z-PRAG for reference. Runs are cached like any
pipeline run, so re-running the script only redoes what is missing.

    python experiments/poly_ablations.py [--config F.toml] [--out runs/poly_ablations]
                                         [--variants base,uniform,M1,M8,r1,r2,r8] [--epochs N]
                                         [--merges sum,mean]

Each variant is answered with every `--merges` mode (how a question's top-k documents' mixed
adapters combine: PRAG's sum, or their mean). The merge mode is an answering setting only, so
the modes share one trained inventory per variant; only the answers differ.

Outputs in `--out`: ablations.json / ablations.md (one row per variant, a column pair per
merge), routing_pca.png, storage.md, and each variant's own results per merge
(results.<merge>.json, results.<merge>.md, predictions.<merge>.jsonl).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import pathlib
import shutil
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jprag.lora.adapters import MERGE_MODES  # noqa: E402
from jprag.pipeline import RunConfig, run  # noqa: E402

# name → [poly] overrides; the defaults (M = 20, rank 4, learned routing) are "base".
VARIANTS: dict[str, dict] = {
    "base": {},
    "uniform": {"routing": "uniform"},
    "M1": {"n_skills": 1},
    "M8": {"n_skills": 8},
    "r1": {"rank": 1},
    "r2": {"rank": 2},
    "r8": {"rank": 8},
}
BASE_METHODS = ("prag", "poly-prag", "poly-z-prag")


def variant_config(base: RunConfig, name: str, out: pathlib.Path, epochs: int | None, merge: str,
                   first: bool = True) -> RunConfig:
    """The run of variant `name` answered with `merge`. PRAG does not depend on the Poly merge, so
    it is answered once, in the first merge's run (`first`)."""
    poly = dataclasses.replace(base.poly, **VARIANTS[name], **({"epochs": epochs} if epochs else {}), merge=merge)
    methods = ("poly-prag",) if name != "base" else BASE_METHODS if first else BASE_METHODS[1:]
    return dataclasses.replace(base, poly=poly, methods=methods, out_dir=str(out / name))


def ablation_table(rows: list[dict], merges: list[str]) -> str:
    """One line per variant (and reference method), an EM/F1 pair per merge mode."""
    cols = " | ".join(f"EM {m} | F1 {m}" for m in merges)
    lines = [f"| variant | M | rank | routing | {cols} | KiB/doc own | shared MiB | train s |",
             "|---|---:|---:|---|" + "---:|" * (2 * len(merges)) + "---:|---:|---:|"]
    by_variant: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], {})[r["merge"]] = r
    for variant, per_merge in by_variant.items():
        r = next(iter(per_merge.values()))
        scores = " | ".join(f"{per_merge[m]['em']:.3f} | {per_merge[m]['f1']:.3f}" if m in per_merge else "– | –"
                            for m in merges)
        lines.append(f"| {variant} | {r['n_skills']} | {r['rank']} | {r['routing']} | {scores} "
                     f"| {r['row_bytes'] / 1024:.2f} | {r['shared_bytes'] / 2**20:.1f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def keep_results(out_dir: pathlib.Path, merge: str) -> None:
    """Copy a finished run's results under merge-specific names (the next merge's run of the same
    directory overwrites results.json / results.md / predictions.jsonl)."""
    for name, suffix in (("results", ".json"), ("results", ".md"), ("predictions", ".jsonl")):
        src = out_dir / f"{name}{suffix}"
        if src.exists():
            shutil.copyfile(src, out_dir / f"{name}.{merge}{suffix}")


def routing_pca(cfg: RunConfig, path: pathlib.Path) -> None:
    """PCA of the base variant's evaluation routing weights (one vector [Lr·M] per document); a
    question's vector is the mean of its top-k documents' (its adapter sums their mixtures)."""
    import matplotlib

    matplotlib.use("Agg")
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np

    from jprag.pipeline import load_data, retrieve
    from jprag.poly.routing import weights
    from jprag.poly.store import load_joint

    out = pathlib.Path(cfg.out_dir)
    _, z, index = load_joint(out / "poly" / "joint")
    w = np.asarray(weights(cfg.poly, jnp.asarray(z))).reshape(len(z), -1)  # [docs, Lr·M]
    row = {d: i for i, d in enumerate(index["doc_ids"])}
    questions, docs, given = load_data(cfg)
    questions = questions[: cfg.limit] if cfg.limit else questions
    hits = retrieve(cfg, questions, docs, given, out)  # the run's cached index
    qs = [(q, [row[d] for d in hits[q.id][: cfg.gen.top_k] if d in row]) for q in questions]
    qs = [(q, r) for q, r in qs if r]
    q_vec = np.stack([w[r].mean(0) for _, r in qs])
    mean = w.mean(0)
    _, _, vt = np.linalg.svd(w - mean, full_matrices=False)  # principal axes of the documents
    d2, q2 = (w - mean) @ vt[:2].T, (q_vec - mean) @ vt[:2].T
    var = (np.linalg.svd(w - mean, compute_uv=False) ** 2)
    share = var[:2] / max(var.sum(), 1e-30)

    cmap = plt.get_cmap("tab20")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5.2))
    ax1.scatter(d2[:, 0], d2[:, 1], c=[cmap(i % 20) for i in range(len(w))], s=60, edgecolors="k", linewidths=0.4,
                label="document")
    ax1.scatter(q2[:, 0], q2[:, 1], c=[cmap(r[0] % 20) for _, r in qs], marker="x", s=30,
                label="question (colour: its top-1 document)")
    if len(w) <= 60:
        for i, d in enumerate(index["doc_ids"]):
            ax1.annotate(d.removeprefix("doc-")[:18], d2[i], fontsize=6, alpha=0.7)
    ax1.set_title("routing vectors, coloured by document")
    ax1.legend(fontsize=7, frameon=False)
    types = sorted({q.type for q, _ in qs})
    for k, t in enumerate(types):
        sel = [i for i, (q, _) in enumerate(qs) if q.type == t]
        ax2.scatter(q2[sel, 0], q2[sel, 1], color=plt.get_cmap("Set1")(k), s=25, label=t)
    ax2.scatter(d2[:, 0], d2[:, 1], c="lightgrey", s=20, zorder=0, label="documents")
    ax2.set_title("questions (mean of their top-k documents), coloured by type")
    ax2.legend(fontsize=7, frameon=False)
    for ax in (ax1, ax2):
        ax.set_xlabel(f"PC1 ({share[0]:.0%})")
        ax.set_ylabel(f"PC2 ({share[1]:.0%})")
    fig.suptitle(f"Poly-PRAG routing (M={cfg.poly.n_skills}, rank {cfg.poly.rank}, "
                 f"{'per-layer' if cfg.poly.per_layer else 'shared'} routing), evaluation weights σ(z)/Σσ(z)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def storage_table(cfg: RunConfig, variants: dict[str, RunConfig], n_run: int) -> str:
    """Bytes per document (fp32): a document's own bytes, the shared inventory, and the
    amortised total (own + shared / N) at this run's N and at larger corpora."""
    from jprag.lora.store import bytes_per_document
    from jprag.model.chat import load
    from jprag.poly.store import storage_bytes

    mcfg = load(cfg.model).cfg
    sizes = [n_run, 1_000, 10_000, 100_000]
    head = ("| method | KiB/doc own | shared MiB | " + " | ".join(f"KiB/doc at N={n:,}" for n in sizes) + " |")
    lines = [head, "|---|" + "---:|" * (2 + len(sizes))]

    def row(name, own, shared):
        amort = " | ".join(f"{(own + shared / n) / 1024:.1f}" for n in sizes)
        lines.append(f"| {name} | {own / 1024:.2f} | {shared / 2**20:.1f} | {amort} |")

    row(f"PRAG (rank {cfg.lora.rank})", bytes_per_document(cfg.lora, mcfg, 4), 0)
    for name, vcfg in variants.items():
        s = storage_bytes(mcfg, vcfg.poly)
        p = vcfg.poly
        label = f"Poly-PRAG {name} (M={p.n_skills}, rank {p.rank}{', uniform' if p.routing == 'uniform' else ''})"
        row(label, s["row_bytes"], s["shared_bytes"])
        if name == "base":
            # Poly-z stores the same routing row per new document against one frozen inventory
            # (two on the sample, where the documents are cross-fitted).
            row("Poly-z-PRAG (same inventory, rows only)", s["row_bytes"], s["shared_bytes"])
    return "\n".join(lines) + ("\n\nfp32. A document's own bytes are what a new document adds; the inventory is "
                               "stored once. Poly-z on the bundled sample cross-fits two inventories "
                               "(2 × shared).")


def question_scores(path: pathlib.Path, method: str) -> dict[str, float]:
    """Question id → F1 of `method` in a run's predictions file."""
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {str(r["id"]): float(r["f1"]) for r in rows if r["method"] == method}


def difference_table(out: pathlib.Path, names: list[str], merges: list[str]) -> str:
    """Paired bootstrap over questions: each variant's Poly-PRAG F1 minus the base variant's at
    the same merge, and (first merge's run) PRAG's minus base Poly-PRAG's at every merge."""
    from jprag.eval.significance import paired_bootstrap

    lines = ["| comparison | merge | ΔF1 | 95% CI | wins / losses |", "|---|---|---:|---|---:|"]

    def add(label, merge, a, b):
        ids = sorted(set(a) & set(b))
        d = paired_bootstrap([a[q] for q in ids], [b[q] for q in ids])
        mark = " *" if d.significant else ""
        lines.append(f"| {label} | {merge} | {d.mean:+.3f}{mark} | {d.low:+.3f} … {d.high:+.3f} | {d.wins} / {d.losses} |")

    for merge in merges:
        base = question_scores(out / "base" / f"predictions.{merge}.jsonl", "poly-prag")
        for name in names:
            if name != "base":
                add(f"{name} − base", merge, question_scores(out / name / f"predictions.{merge}.jsonl", "poly-prag"),
                    base)
        prag = question_scores(out / "base" / f"predictions.{merges[0]}.jsonl", "prag")
        add("base − PRAG", merge, base, prag)
    return "\n".join(lines) + "\n\n`*`: the 95% interval excludes 0."


def stage_seconds(out_dir: pathlib.Path, timings: dict[str, float]) -> dict[str, float]:
    """The seconds each adapter source took to build, kept across re-runs in `stage_seconds.json`:
    a re-run loads the trained adapters in seconds, so the longest time seen is the training."""
    path = out_dir / "stage_seconds.json"
    kept = json.loads(path.read_text()) if path.exists() else {}
    for key, value in timings.items():
        kept[key] = max(float(value), kept.get(key, 0.0))
    path.write_text(json.dumps(kept, indent=1))
    return collections.defaultdict(float, kept)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "experiments" / "poly_ablations.toml"))
    ap.add_argument("--out", default="runs/poly_ablations")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated subset of {list(VARIANTS)}")
    ap.add_argument("--epochs", type=int, default=None, help="override [poly] epochs for every variant")
    ap.add_argument("--merges", default="sum,mean", help="comma separated answering merge modes (sum, mean)")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        sys.exit(f"--variants: unknown {bad}; known: {list(VARIANTS)}")
    merges = [m.strip() for m in args.merges.split(",") if m.strip()]
    if not merges or any(m not in MERGE_MODES for m in merges):
        sys.exit(f"--merges: expected a comma separated subset of {','.join(MERGE_MODES)}, got {args.merges!r}")
    base = RunConfig.from_file(args.config)
    out = pathlib.Path(args.out)
    configs = {name: variant_config(base, name, out, args.epochs, merges[0]) for name in names}

    rows, n_docs = [], 0
    for name in names:
        for k, merge in enumerate(merges):
            cfg = variant_config(base, name, out, args.epochs, merge, first=k == 0)
            print(f"[ablation] {name}: {VARIANTS[name] or 'defaults'}, merge {merge} → {cfg.out_dir}",
                  file=sys.stderr, flush=True)
            res = run(cfg)
            keep_results(pathlib.Path(cfg.out_dir), merge)
            seconds = stage_seconds(pathlib.Path(cfg.out_dir), res["timings"])
            r = res["methods"]["poly-prag"]
            n_docs = r["storage"]["n_docs"]
            rows.append({"variant": name, "merge": merge, "n_skills": cfg.poly.n_skills, "rank": cfg.poly.rank,
                         "routing": cfg.poly.routing, "em": r["em"], "f1": r["f1"], "has_answer": r["has_answer"],
                         "row_bytes": r["storage"]["row_bytes"], "shared_bytes": r["storage"]["shared_bytes"],
                         "train_seconds": seconds["build poly"], "by_type": r["by_type"]})
            if name != "base":
                continue
            for m in ("prag", "poly-z-prag") if k == 0 else ("poly-z-prag",):
                b = res["methods"][m]
                rows.append({"variant": f"base: {m} (reference)", "merge": merge if m != "prag" else "sum",
                             "n_skills": cfg.poly.n_skills if m != "prag" else "-",
                             "rank": cfg.poly.rank if m != "prag" else cfg.lora.rank,
                             "routing": "learned, frozen inventory" if m != "prag" else "-",
                             "em": b["em"], "f1": b["f1"], "has_answer": b["has_answer"],
                             "row_bytes": b["storage"]["row_bytes"], "shared_bytes": b["storage"]["shared_bytes"],
                             "train_seconds": seconds["encode" if m == "prag" else "build poly-z"],
                             "by_type": b["by_type"]})
    out.mkdir(parents=True, exist_ok=True)
    table = ablation_table(rows, merges)
    (out / "ablations.json").write_text(json.dumps(rows, indent=1))
    if "base" in names:
        table += "\n\n" + difference_table(out, names, merges)
    (out / "ablations.md").write_text(table + "\n")
    print("\n" + table)
    if "base" in configs and configs["base"].poly.routing == "learned":
        routing_pca(configs["base"], out / "routing_pca.png")
        print(f"\nwrote {out / 'routing_pca.png'}")
    storage = storage_table(base, configs, n_docs)
    (out / "storage.md").write_text(storage + "\n")
    print("\n" + storage)


if __name__ == "__main__":
    main()
