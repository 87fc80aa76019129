"""Handlers of `jprag encode` (documents -> adapter bank) and `jprag export-peft` (bank rows ->
PEFT LoRA directory). `jprag.cli.main` defines their arguments and calls in here lazily.

Nothing heavy is imported at module level: documents are read and arguments checked before
JAX and the model are loaded, so bad input fails in well under a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import time
from typing import Any, Mapping, Sequence

# --------------------------------------------------------------------------- encode


def _read_documents(args: argparse.Namespace) -> tuple[list, dict[str, Any]]:
    """`(documents, source)`: the documents to encode and a JSON description of where from."""
    from jprag.data.documents import DEFAULT_PRAG_FILES, read_documents_jsonl, read_prag_dir

    if args.documents is not None:
        if args.files is not None or args.limit_per_file is not None:
            raise ValueError("--files and --limit-per-file apply to --prag-dir only")
        path = pathlib.Path(args.documents)
        if not path.is_file():
            raise FileNotFoundError(f"--documents {path}: no such file")
        docs = read_documents_jsonl(path)
        source = {"kind": "documents", "path": str(path.resolve())}
        where = str(path)
    else:
        data_dir = pathlib.Path(args.prag_dir)
        if not data_dir.is_dir():
            raise FileNotFoundError(f"--prag-dir {data_dir}: no such directory")
        files = list(args.files) if args.files is not None else list(DEFAULT_PRAG_FILES)
        questions, docs = read_prag_dir(data_dir, files, args.limit_per_file)
        source = {"kind": "prag", "dir": str(data_dir.resolve()), "files": files,
                  "limit_per_file": args.limit_per_file, "questions": len(questions)}
        where = str(data_dir)
    if not docs:
        raise ValueError(f"{where}: no documents to encode")
    no_qa = [d.id for d in docs if not d.qa]
    if no_qa:
        raise ValueError(f"{where}: {len(no_qa)} document(s) have no QA pairs, hence no training samples "
                         f"(first: {no_qa[0]!r})")
    return docs, source


def _prepare_out_dir(out: pathlib.Path, overwrite: bool) -> None:
    """`--overwrite` removes an existing bank; refuse to touch anything that is not a bank."""
    from jprag.lora.store import INDEX

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    if not out.is_dir() or (out / INDEX).is_file():
        if overwrite and out.is_dir():
            shutil.rmtree(out)
        return
    if any(out.iterdir()):
        raise ValueError(f"--out {out}: directory is not empty and holds no adapter bank ({INDEX}); "
                         "refusing to write (or delete) there")


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _check_resume(out: pathlib.Path, expected: Mapping[str, Any]) -> dict[str, Any] | None:
    """Before loading the model: an existing bank must come from the same documents, model and
    settings. Returns its index (None when there is no bank yet).

    (`encode_documents` checks the shapes and the chunk plan again once they are known.)
    """
    from jprag.lora.store import INDEX, BankError, read_index

    if not (out / INDEX).is_file():
        return None
    old = read_index(out)
    for field, value in expected.items():
        if old.get(field) != _json_roundtrip(value):
            raise BankError(
                f"{out}/{INDEX}: field {field!r} differs from this run's; the directory holds another "
                "encoding run (use a new --out directory, or --overwrite to replace it)"
            )
    return old


def _model_id(model: str | None) -> str:
    """The model's id in the index: its resolved path (as `jprag.model.chat.load` resolves it)."""
    from jprag.model.weights import default_model_path

    return str(pathlib.Path(model).resolve()) if model is not None else str(default_model_path())


def _tokenize(tokenizer, docs: Sequence, recipe, progress: bool) -> list:
    from tqdm.auto import tqdm

    from jprag.train.recipe import document_examples

    return [document_examples(tokenizer, d, recipe)
            for d in tqdm(docs, desc="tokenize", unit="doc", disable=not progress)]


def _size(n_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError


def _print_summary(index: Mapping[str, Any], out: pathlib.Path, n_new: int, seconds_this_run: float,
                   wall: float) -> None:
    chunks, n = index["chunks"], len(index["doc_ids"])
    print(f"encoded {n} documents in {len(chunks)} chunk(s) of up to {len(chunks[0]['rows'])} into {out}")
    if n_new:
        resumed = f"; {n - n_new} were already encoded (resumed)" if n_new < n else ""
        print(f"this run: {n_new} documents trained in {seconds_this_run:.1f} s including compilation "
              f"({n_new / max(seconds_this_run, 1e-9):.2f} docs/s){resumed}")
    else:
        print("this run: nothing to train, every document was already encoded")
    seconds = sum(c.get("seconds", 0.0) for c in chunks)
    tokens = sum(c.get("tokens", 0) for c in chunks)
    if seconds > 0:
        print(f"all chunks: {seconds:.1f} s of training, {n / seconds:.2f} docs/s, {tokens / seconds:.0f} tokens/s; "
              f"wall time of this run {wall:.1f} s")
    n_params = sum(math.prod(shape) for ab in index["shapes"].values() for shape in ab.values())
    print(f"adapter per document: {n_params:,} parameters = {_size(4 * n_params)} fp32 / {_size(2 * n_params)} bf16")


def run_encode(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    docs, source = _read_documents(args)
    from jprag.lora.adapters import ALL_TARGETS, LoraConfig
    from jprag.lora.store import lora_to_json
    from jprag.train.recipe import RecipeConfig
    from jprag.train.stacked import TrainConfig

    bad = [t for t in args.targets if t not in ALL_TARGETS]
    if bad or not args.targets:
        raise ValueError(f"--targets: unknown target(s) {', '.join(bad) or '(none given)'}; "
                         f"choose from {','.join(ALL_TARGETS)}")
    lora = LoraConfig(rank=args.rank, alpha=args.alpha, targets=tuple(dict.fromkeys(args.targets)))
    train = TrainConfig(learning_rate=args.lr, epochs=args.epochs)
    recipe = RecipeConfig(cot=args.cot, answer_only_loss=args.answer_only_loss, max_len=args.max_len)
    doc_ids = [d.id for d in docs]
    model_id = _model_id(args.model)
    out = pathlib.Path(args.out)
    from jprag.cli.main import dist_config, start_devices

    dist = dist_config(args)
    if dist.multi:  # join first, so that only process 0 replaces an --overwrite'd bank
        start_devices(args)
        from jprag import distributed

        if distributed.is_primary():
            _prepare_out_dir(out, args.overwrite)
        distributed.barrier("prepared --out")
    else:
        _prepare_out_dir(out, args.overwrite)
    old = _check_resume(out, {
        "doc_ids": doc_ids, "model": model_id, "lora": lora_to_json(lora), "train": dataclasses.asdict(train),
        "seed": args.seed, "recipe": dataclasses.asdict(recipe),
    })
    if old is not None and all(c.get("done") for c in old["chunks"]):
        _print_summary(old, out, 0, 0.0, time.perf_counter() - t_start)  # complete: no model needed
        return 0
    n_before = 0 if old is None else sum(len(c["rows"]) for c in old["chunks"] if c.get("done"))

    if not dist.multi:
        start_devices(args)
    from jprag import distributed
    from jprag.mesh import make_mesh
    from jprag.model.chat import load
    from jprag.train.encoder import encode_documents

    mesh = make_mesh(args.mesh_data, args.mesh_model)
    distributed.check_mesh(mesh)
    lm = load(args.model)
    per_doc = _tokenize(lm.tokenizer, docs, recipe, progress=distributed.is_primary())
    n_samples = sum(len(e) for e in per_doc)
    n_truncated = sum(1 for ex in per_doc for e in ex if e.truncated)
    if distributed.is_primary():
        print(f"{len(docs)} documents, {n_samples} training samples ({n_truncated} with shortened knowledge "
              f"text, max_len {recipe.max_len}); mesh data={mesh.shape['data']} x model={mesh.shape['model']}",
              flush=True)
    t_train = time.perf_counter()
    index = encode_documents(
        lm.cfg, lm.params, per_doc, doc_ids, out,
        lora=lora, train=train, chunk_size=args.chunk_size, mesh=mesh, seed=args.seed,
        pad_id=int(lm.tokenizer.pad_token_id or 0), model_id=model_id,
        extra_index={"recipe": dataclasses.asdict(recipe), "source": source, "model_family": lm.cfg.family},
        progress=True,
    )
    t_end = time.perf_counter()
    if distributed.is_primary():
        _print_summary(index, out, len(doc_ids) - n_before, t_end - t_train, t_end - t_start)
    return 0


# --------------------------------------------------------------------------- export-peft


def load_rows(root: str | os.PathLike, doc_ids: Sequence[str]) -> tuple[dict, dict[str, Any]]:
    """Rows `{target: {"a": [k, ...], "b": [k, ...]}}` of the given documents (in that order) and
    the index, reading only those rows. Unknown ids and unfinished chunks raise `BankError`."""
    from jprag.lora.store import BankReader

    reader = BankReader(root, require_complete=False)
    return reader.rows(reader.rows_of(doc_ids)), reader.index


def run_export_peft(args: argparse.Namespace) -> int:
    from jprag.lora.store import read_index

    root = pathlib.Path(args.bank)
    if not root.is_dir():
        raise FileNotFoundError(f"--bank {root}: no such directory")
    seen = set()
    for d in args.doc:
        if d in seen:
            raise ValueError(f"--doc {d!r} is given twice")
        seen.add(d)
    read_index(root)  # a clean BankError before anything else is loaded

    from jprag.cli.main import enable_compilation_cache

    enable_compilation_cache()
    import jax
    import numpy as np

    from jprag.lora.adapters import merge_topk
    from jprag.lora.peft import export_applied, export_peft
    from jprag.lora.store import lora_from_index

    rows, index = load_rows(root, args.doc)
    lora = lora_from_index(index)
    base = index.get("model") or None
    family = index.get("model_family", "llama")
    out = pathlib.Path(args.out)
    if len(args.doc) == 1:
        adapter = {t: {k: v[0] for k, v in ab.items()} for t, ab in rows.items()}
        export_peft(adapter, lora, out, base_model_name_or_path=base, model_family=family)
        print(f"wrote the adapter of document {args.doc[0]} (r={lora.rank}, alpha={lora.alpha:g}) to {out}")
    else:
        k = len(args.doc)
        merge = jax.jit(merge_topk, static_argnums=(2, 3))  # one compile instead of one per op
        merged = merge(rows, np.arange(k)[None, :], lora.scale, args.mode)
        export_applied({t: (np.asarray(a[0]), np.asarray(b[0])) for t, (a, b) in merged.items()}, out,
                       base_model_name_or_path=base, model_family=family)
        print(f"wrote the {args.mode} of {k} documents' adapters (r={k * lora.rank}, scale folded in) to {out}")
    return 0
