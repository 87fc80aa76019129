"""Handlers of the pipeline commands: `jprag demo`, `jprag run --config`, `jprag eval`,
`jprag compare`, `jprag index` and `jprag augment`. `jprag.cli.main` defines their arguments.

All of them go through `jprag.pipeline` (or its steps), so the demo, a config file and the flag
form of `eval` run exactly the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

PIPELINE_HELP = ("methods, comma separated: vanilla, rag, prag, prag-combine, poly-prag, poly-prag-combine, "
                 "poly-z-prag, poly-z-prag-combine, dyprag, dyprag-combine")


def add_pipeline_arguments(parser: argparse.ArgumentParser, *, demo: bool = False) -> None:
    """Flags shared by `demo` and `eval` (each overrides the matching RunConfig field)."""
    parser.add_argument("--out", default="runs/demo" if demo else None, metavar="DIR",
                        help="output directory (results.json, results.md, results.png, caches)")
    parser.add_argument("--methods", default=None, help=PIPELINE_HELP)
    parser.add_argument("--epochs", type=int, default=None, help="PRAG encoder epochs")
    parser.add_argument("--lr", type=float, default=None, help="PRAG encoder learning rate")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="documents retrieved per question")
    parser.add_argument("--chunk-size", type=int, default=None, metavar="D", help="documents per stacked chunk")
    if not demo:
        parser.add_argument("--dataset", choices=("sample", "prag"), default="sample")
        parser.add_argument("--data-dir", default=None, metavar="DIR", help="published PRAG files (dataset prag)")
        parser.add_argument("--limit-per-file", type=int, default=None, metavar="N",
                            help="first N questions of each PRAG file")
        parser.add_argument("--retriever", choices=("bm25", "dense"), default=None)
        parser.add_argument("--cot", action="store_true", help="chain-of-thought prompts")


def config_from_args(args: argparse.Namespace, base=None):
    """A RunConfig from `base` (or defaults) with every flag the user gave applied on top."""
    from jprag.pipeline import RunConfig

    cfg = base or RunConfig()
    top: dict = {}
    if getattr(args, "out", None):
        top["out_dir"] = args.out
    if getattr(args, "model", None):
        top["model"] = args.model
    if getattr(args, "methods", None):
        top["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    for flag, field in (("dataset", "dataset"), ("data_dir", "data_dir"), ("limit_per_file", "limit_per_file"),
                        ("retriever", "retriever"), ("chunk_size", "chunk_size")):
        if getattr(args, flag, None) is not None:
            top[field] = getattr(args, flag)
    train = {k: v for k, v in (("epochs", getattr(args, "epochs", None)),
                               ("learning_rate", getattr(args, "lr", None))) if v is not None}
    gen = {k: v for k, v in (("max_new_tokens", getattr(args, "max_new_tokens", None)),
                             ("top_k", getattr(args, "top_k", None))) if v is not None}
    if getattr(args, "cot", False):
        gen["cot"] = True
    return dataclasses.replace(
        cfg, **top, train=dataclasses.replace(cfg.train, **train), gen=dataclasses.replace(cfg.gen, **gen)
    )


def _report(results, out_dir) -> None:
    from jprag.pipeline import results_table

    print()
    print(results_table(results))
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in results.get("timings", {}).items())
    print(f"\n{results['n_questions']} questions, {results['n_documents']} documents; "
          f"total {results['seconds']:.0f}s" + (f" ({timings})" if timings else ""))
    out = pathlib.Path(out_dir)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}, {out / 'predictions.jsonl'}")


def run_pipeline(cfg, args: argparse.Namespace | None = None) -> int:
    from jprag import distributed
    from jprag.cli.main import start_devices
    from jprag.pipeline import run

    start_devices(args or argparse.Namespace())
    results = run(cfg, progress=distributed.is_primary())
    if distributed.is_primary():
        _report(results, cfg.out_dir)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """The bundled invented-entity sample, all four methods, on the embedded default model."""
    print("jprag demo: vanilla vs standard RAG vs PRAG vs PRAG-Combine on the bundled sample of "
          "invented-entity documents (knowledge the base model cannot have)", flush=True)
    return run_pipeline(config_from_args(args), args)


def run_eval(args: argparse.Namespace) -> int:
    if args.dataset == "prag" and not args.data_dir:
        raise ValueError("--dataset prag needs --data-dir (the directory of the published PRAG files)")
    if args.out is None:
        args.out = f"runs/{args.dataset}"
    return run_pipeline(config_from_args(args), args)


def run_config(args: argparse.Namespace) -> int:
    from jprag.pipeline import RunConfig

    cfg = RunConfig.from_file(args.config)
    return run_pipeline(config_from_args(args, base=cfg), args)


def run_index(args: argparse.Namespace) -> int:
    """Build and save a retrieval index over a document set."""
    from jprag.data.documents import read_documents_jsonl, read_prag_dir
    from jprag.retrieval import build_index

    if args.documents:
        docs = read_documents_jsonl(args.documents)
    elif args.prag_dir:
        docs = read_prag_dir(args.prag_dir)[1]
    else:
        from jprag.data.sample import load_sample

        docs = load_sample()[1]
    retriever = build_index(args.kind, docs, args.out)
    print(f"indexed {len(retriever)} documents ({args.kind}) into {args.out}")
    return 0


def run_augment(args: argparse.Namespace) -> int:
    """Rewrite + QA generation with the model itself, cached and resumable."""
    from jprag.augment import AugmentConfig, augment_documents
    from jprag.cli.main import enable_compilation_cache
    from jprag.data.documents import write_documents_jsonl
    from jprag.model.chat import load

    path = pathlib.Path(args.passages)
    if not path.is_file():
        raise FileNotFoundError(f"--passages {path}: no such file")
    passages = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str) or not isinstance(rec.get("passage"), str):
            raise ValueError(f"{path} line {i}: expected an object with string fields 'id' and 'passage'")
        passages.append((rec["id"], rec["passage"]))
    enable_compilation_cache()
    docs = augment_documents(load(args.model), passages, pathlib.Path(args.out) / "cache",
                             AugmentConfig(batch_size=args.batch_size))
    out = pathlib.Path(args.out) / "documents.jsonl"
    write_documents_jsonl(docs, out)
    print(f"augmented {len(docs)} passages ({sum(1 for d in docs if d.qa)} with QA pairs) → {out}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """`jprag compare DIR`: every method's per-question score against the baseline's."""
    from jprag.eval.significance import compare_to_baseline, comparison_table, read_predictions
    from jprag.pipeline import baseline_method

    scores = read_predictions(pathlib.Path(args.run_dir) / "predictions.jsonl", args.metric)
    if len(scores) < 2:
        raise ValueError(f"{args.run_dir}: only one method ({next(iter(scores))!r}); nothing to compare")
    baseline = args.baseline or baseline_method(list(scores))
    diffs = compare_to_baseline(scores, baseline, resamples=args.resamples, level=args.level, seed=args.seed)
    if args.json:
        print(json.dumps({"baseline": baseline, "metric": args.metric, "methods": {m: d.to_json() for m, d in diffs.items()}},
                         indent=1))
    else:
        print(comparison_table(diffs, baseline, args.metric))
    return 0
