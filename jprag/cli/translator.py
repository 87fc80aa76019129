"""`jprag translator train|eval`: the DyPRAG parameter translator from the command line.

* `train` learns a translator from documents and their PRAG adapters: the adapters are encoded
  into `OUT/pairs` (every document from one shared initialisation, `jprag.translator.pairs`),
  the translator goes to `OUT/translator`. Both steps resume when re-run with the same arguments.
* `eval` answers a question set with a trained translator (methods dyprag and dyprag-combine by
  default; prag, rag, ... can be added) through the same pipeline as `jprag eval`. It refuses a
  translator trained on any document it would translate.

`jprag.cli.main` registers the command; nothing heavy is imported here, so documents and
arguments are checked before JAX and the model load.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time


def _debug_flag(parser: argparse.ArgumentParser) -> None:
    # `jprag translator train ... --debug`: the nested parsers need the flag too (global default kept)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jprag.cli.main import (_add_model_argument, _mesh_axis, _non_negative_float, _non_negative_int,
                                _positive_float, _positive_int, add_distributed_arguments)
    from jprag.cli.run import add_pipeline_arguments

    sub = parser.add_subparsers(dest="translator_command", metavar="{train,eval}", required=True)

    train = sub.add_parser("train", help="train a translator on documents and their PRAG adapters (resumable)",
                           description="Train a DyPRAG translator on documents and their PRAG adapters.")
    _debug_flag(train)
    docs = train.add_argument_group("training documents (one of)")
    which = docs.add_mutually_exclusive_group(required=True)
    which.add_argument("--documents", metavar="FILE.jsonl", help="documents in the jprag format (with QA pairs)")
    which.add_argument("--prag-dir", metavar="DIR", help="the published PRAG files")
    docs.add_argument("--skip-per-file", type=_non_negative_int, default=0, metavar="N",
                      help="with --prag-dir: leave out the first N questions of each file and their documents "
                           "(the ones `jprag eval --limit-per-file N` evaluates; default 0)")
    docs.add_argument("--per-file", type=_positive_int, default=10, metavar="M",
                      help="with --prag-dir: train on the documents of the next M questions of each file (default 10)")
    train.add_argument("--out", required=True, metavar="OUT", help="output directory (OUT/translator, OUT/pairs)")
    train.add_argument("--config", metavar="FILE", default=None,
                       help="a run config (TOML/JSON) whose [lora], [train], [recipe], [translator], seed, chunk_size "
                            "and mesh settings apply; the flags below override [translator]")
    _add_model_argument(train)
    t = train.add_argument_group("translator (overrides [translator])")
    t.add_argument("--hidden", type=_positive_int, help="MLP width p (default 32)")
    t.add_argument("--lr", type=_positive_float, help="AdamW learning rate")
    t.add_argument("--epochs", type=_positive_int, help="passes over the training documents")
    t.add_argument("--batch-docs", type=_positive_int, metavar="D", help="documents per step")
    t.add_argument("--samples-per-doc", type=_non_negative_int, metavar="K", help="PRAG samples per document (0 = all)")
    t.add_argument("--lambda-lm", type=_non_negative_float, help="weight of the LM loss (default 1)")
    t.add_argument("--lambda-kl", type=_non_negative_float, help="weight of KL(teacher || student) (default 0.01)")
    t.add_argument("--lambda-mse", type=_non_negative_float, help="weight of the adapter MSE (default 100)")
    t.add_argument("--mse", choices=("delta", "factors"),
                   help="MSE of the raw factors A, B (default, published) or relative MSE of the deltas s·A·B")
    t.add_argument("--embedding", help="registered document embedder (default: last)")
    t.add_argument("--seed", type=int, help="initialisation and shuffling seed")
    t.add_argument("--mesh-data", type=_mesh_axis, default=None, metavar="N", help="devices on the document axis")
    t.add_argument("--mesh-model", type=_positive_int, default=None, metavar="N", help="devices the base model spans")
    add_distributed_arguments(train)

    ev = sub.add_parser("eval", help="answer a question set with a trained translator (dyprag, dyprag-combine)",
                        description="Answer and score a question set with a trained translator.")
    _debug_flag(ev)
    ev.add_argument("--translator", required=True, metavar="DIR",
                    help="a translator (OUT/translator of `jprag translator train`, or OUT itself)")
    ev.add_argument("--config", metavar="FILE", default=None, help="a run config (TOML/JSON); flags override it")
    ev.add_argument("--combine", choices=("mean", "sum"), default=None,
                    help="top-k combination: mean of A's and B's (published) or sum of deltas")
    ev.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="first N questions only")
    _add_model_argument(ev)
    add_pipeline_arguments(ev)
    add_distributed_arguments(ev)
    ev.set_defaults(dataset=None)  # so that a --config's dataset is not overridden by the flag's default


def run(args: argparse.Namespace) -> int:
    return {"train": run_train, "eval": run_eval}[args.translator_command](args)


# --------------------------------------------------------------------------- train


def _base_config(args):
    from jprag.pipeline import RunConfig

    cfg = RunConfig.from_file(args.config) if args.config else RunConfig()
    flags = {"hidden": args.hidden, "learning_rate": args.lr, "epochs": args.epochs, "batch_docs": args.batch_docs,
             "samples_per_doc": args.samples_per_doc, "lambda_lm": args.lambda_lm, "lambda_kl": args.lambda_kl,
             "lambda_mse": args.lambda_mse, "mse": args.mse, "embedding": args.embedding, "seed": args.seed}
    top = {k: v for k, v in (("mesh_data", args.mesh_data), ("mesh_model", args.mesh_model)) if v is not None}
    if args.model:
        top["model"] = args.model
    translator = dataclasses.replace(cfg.translator, **{k: v for k, v in flags.items() if v is not None})
    return dataclasses.replace(cfg, translator=translator, **top)


def _training_documents(args, cfg):
    from jprag.data.documents import read_documents_jsonl, read_prag_dir
    from jprag.pipeline import heldout_documents

    if args.documents is not None:
        path = pathlib.Path(args.documents)
        if not path.is_file():
            raise FileNotFoundError(f"--documents {path}: no such file")
        docs, where = read_documents_jsonl(path), str(path)
    else:
        data_dir = pathlib.Path(args.prag_dir)
        if not data_dir.is_dir():
            raise FileNotFoundError(f"--prag-dir {data_dir}: no such directory")
        skip = args.skip_per_file
        evaluated = read_prag_dir(data_dir, limit_per_file=skip)[1] if skip else []
        run_cfg = dataclasses.replace(cfg, dataset="prag", data_dir=str(data_dir), limit_per_file=skip or None)
        docs, where = heldout_documents(run_cfg, evaluated, args.per_file), str(data_dir)
    docs = [d for d in docs if d.qa]
    if not docs:
        raise ValueError(f"{where}: no documents with QA pairs to train the translator on")
    return docs


def run_train(args: argparse.Namespace) -> int:
    from jprag.cli.main import _check_model_path, start_devices

    t_start = time.perf_counter()
    _check_model_path(args.model)
    cfg = _base_config(args)
    docs = _training_documents(args, cfg)
    out = pathlib.Path(args.out)
    start_devices(args)
    from jprag import distributed

    say = print if distributed.is_primary() else (lambda *a, **k: None)  # logs on process 0
    say(f"{len(docs)} training documents; translator settings: {cfg.translator.training_dict()}", flush=True)
    from jprag.model.chat import load
    from jprag.translator.pairs import encode_pairs
    from jprag.translator.pipeline import fit_translator

    lm = load(cfg.model)
    teacher = encode_pairs(cfg, lm, docs, out / "pairs")
    spec, _, meta = fit_translator(cfg, lm, docs, teacher, out / "translator", progress=True,
                                   extra_meta={"split": "jprag translator train"})
    last = meta["history"][-1] if meta["history"] else {}
    losses = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k not in ("step", "epoch"))
    say(f"translator: {spec.num_params():,} parameters, {meta['total_steps']} steps over {len(docs)} documents "
          f"({meta.get('seconds', 0.0):.0f} s of training); last losses: {losses or '-'}")
    say(f"wrote {out / 'translator'} (wall time {time.perf_counter() - t_start:.0f} s)")
    return 0


# --------------------------------------------------------------------------- eval


def run_eval(args: argparse.Namespace) -> int:
    from jprag.cli.main import _check_model_path
    from jprag.cli.run import config_from_args, run_pipeline
    from jprag.pipeline import RunConfig
    from jprag.translator.store import find_translator, read_meta

    _check_model_path(args.model)
    root = find_translator(args.translator)
    meta = read_meta(root)  # a clean error before anything heavy loads
    if not meta["done"]:
        raise ValueError(f"{root}: training is not finished; re-run `jprag translator train` to resume it")
    base = RunConfig.from_file(args.config) if args.config else RunConfig(
        methods=("dyprag", "dyprag-combine"), out_dir="runs/translator_eval")
    if args.dataset is None and args.config is None:
        args.dataset = "sample"
    if (args.dataset or base.dataset) == "prag" and not (args.data_dir or base.data_dir):
        raise ValueError("--dataset prag needs --data-dir (the directory of the published PRAG files)")
    cfg = config_from_args(args, base=base)
    translator = dataclasses.replace(cfg.translator, path=str(root),
                                     **({"combine": args.combine} if args.combine else {}))
    cfg = dataclasses.replace(cfg, translator=translator, **({"limit": args.limit} if args.limit else {}))
    if not any(m.startswith("dyprag") for m in cfg.methods):
        raise ValueError(f"--methods {','.join(cfg.methods)}: none of them uses the translator "
                         "(dyprag, dyprag-combine)")
    return run_pipeline(cfg, args)
