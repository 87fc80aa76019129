"""The end-to-end job: questions + corpus → augment → retrieve → encode → answer → score.

`run(RunConfig)` writes into `out_dir`:

    augment/      LLM augmentation cache (documents that came without rewrite/QA)
    index/        the retrieval index (questions that came without retrieved passages)
    bank/         the PRAG adapter bank (resumable, see `jprag.train.encoder`)
    answers/      generated answers per method, appended batch by batch (`jprag.eval.cache`)
    predictions.jsonl   one line per (method, question): output, prediction, scores
    results.json  {"model", "dataset", "methods": {name: {em, f1, has_answer, n, by_type, seconds}},
                   "significance": each method's F1 against vanilla's, paired bootstrap CI}
    results.md    the Markdown tables printed at the end;  results.png  a bar chart

Every step is cached in `out_dir`, so re-running the same command resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
import tomllib
from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from jprag.data.documents import Document, Question
from jprag.eval.cache import AnswerCache, fingerprint
from jprag.eval.methods import METHODS, BankSource, EvalContext, GenConfig, Method, answer
from jprag.eval.metrics import exact_match, f1, has_answer, score
from jprag.lora.adapters import LoraConfig
from jprag.poly.config import PolyConfig
from jprag.translator.config import TranslatorConfig
from jprag.train.recipe import RecipeConfig
from jprag.train.stacked import TrainConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One evaluation run. Nested sections mirror the library's own config dataclasses."""

    dataset: str = "sample"  # "sample" | "prag" (the published PRAG files under data_dir)
    data_dir: str | None = None
    limit_per_file: int | None = None  # prag: first N questions of each file
    limit: int | None = None  # first N questions overall (after limit_per_file)
    methods: tuple[str, ...] = ("vanilla", "rag", "prag", "prag-combine")
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    out_dir: str = "runs/demo"
    retriever: str = "bm25"
    chunk_size: int = 32
    mesh_data: int = -1
    mesh_model: int = 1
    seed: int = 0
    # prag: questions limit_per_file … +heldout_per_file of each file supply held-out documents
    # (never evaluated) for methods that learn something shared first (DyPRAG, Poly-z).
    heldout_per_file: int = 10
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    recipe: RecipeConfig = RecipeConfig()
    gen: GenConfig = GenConfig()
    poly: PolyConfig = PolyConfig()
    translator: TranslatorConfig = TranslatorConfig()

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; available: {sorted(METHODS)}")
        if self.dataset not in ("sample", "prag"):
            raise ValueError(f"dataset must be 'sample' or 'prag', got {self.dataset!r}")
        if self.dataset == "prag" and not self.data_dir:
            raise ValueError("dataset 'prag' needs data_dir (the directory of the published PRAG files)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> "RunConfig":
        sections = {"lora": LoraConfig, "train": TrainConfig, "recipe": RecipeConfig, "gen": GenConfig,
                    "poly": PolyConfig, "translator": TranslatorConfig}
        fields = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        for key, value in d.items():
            if key not in fields:
                raise ValueError(f"{where}: unknown field {key!r} (known: {sorted(fields)})")
            if key in sections:
                sub = sections[key]
                sub_fields = {f.name for f in dataclasses.fields(sub)}
                bad = sorted(set(value) - sub_fields)
                if bad:
                    raise ValueError(f"{where}: unknown field(s) {bad} in [{key}] (known: {sorted(sub_fields)})")
                value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
                kw[key] = sub(**value)
            else:
                kw[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> "RunConfig":
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{path}: cannot parse ({e})") from None
        return cls.from_dict(data, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_data(cfg: RunConfig) -> tuple[list[Question], list[Document], bool]:
    """Questions, documents, and whether the questions come with their retrieved documents."""
    if cfg.dataset == "sample":
        from jprag.data.sample import load_sample

        questions, docs = load_sample()
        return questions, docs, False  # doc_ids are the gold supporting docs: retrieve instead
    from jprag.data.documents import read_prag_dir

    questions, docs = read_prag_dir(cfg.data_dir, limit_per_file=cfg.limit_per_file)
    return questions, docs, True


def augment_missing(lm, docs: list[Document], out: pathlib.Path) -> list[Document]:
    """Augment (rewrite + QA with the model itself) the documents that came without it."""
    todo = [d for d in docs if not d.rewrite or not d.qa]
    if not todo:
        return docs
    from jprag.augment import augment_documents

    done = {d.id: d for d in augment_documents(lm, [(d.id, d.passage) for d in todo], out / "augment")}
    return [done.get(d.id, d) for d in docs]


def retrieve(cfg: RunConfig, questions, docs, given: bool, out: pathlib.Path) -> dict[str, list[str]]:
    if given:
        return {q.id: list(q.doc_ids) for q in questions}
    from jprag.retrieval import build_index, load_index

    index_dir = out / "index"
    try:
        retriever = load_index(index_dir)
        if len(retriever) != len(docs):
            raise ValueError("stale index")
    except (ValueError, FileNotFoundError):
        retriever = build_index(cfg.retriever, docs, index_dir)
    hits = retriever.search([q.question for q in questions], cfg.gen.top_k)
    return {q.id: h for q, h in zip(questions, hits)}


@dataclasses.dataclass(frozen=True)
class SourceRequest:
    """What an adapter-source builder gets: the run, the model, and the documents to cover.

    `docs` are the documents the evaluation questions retrieved (every one needs an adapter);
    `heldout` are documents of *other* questions (never evaluated), for methods that learn
    something shared first (the DyPRAG translator, the Poly-z inventory). `out` is the source's
    own cache directory under `out_dir`; `sources` are the sources built so far in this run.
    """

    cfg: RunConfig
    lm: Any  # jprag.model.chat.LoadedModel
    docs: Sequence[Document]
    heldout: Sequence[Document]
    out: pathlib.Path
    sources: Mapping[str, Any]
    progress: bool = True


def heldout_documents(cfg: RunConfig, eval_docs: Sequence[Document], n_per_file: int) -> list[Document]:
    """Documents of questions that are not evaluated in this run, disjoint from `eval_docs`.

    prag: the retrieved documents of questions ``limit_per_file … limit_per_file + n_per_file``
    of each file. sample: the sample has no spare questions, so nothing (builders fall back to
    their own split and say so).
    """
    if cfg.dataset != "prag" or n_per_file <= 0:
        return []
    from jprag.data.documents import read_prag_dir

    start = cfg.limit_per_file or 0
    questions, docs = read_prag_dir(cfg.data_dir, limit_per_file=start + n_per_file)
    taken = {d.id for d in eval_docs}
    by_id = {d.id: d for d in docs}
    per_file: dict[str, int] = {}
    wanted: dict[str, None] = {}
    for q in questions:  # questions come file by file, in file order
        f = q.id.rsplit("/", 1)[0]
        per_file[f] = per_file.get(f, 0) + 1
        if per_file[f] > start:
            wanted.update(dict.fromkeys(q.doc_ids))
    return [by_id[d] for d in wanted if d in by_id and d not in taken and by_id[d].qa]


def build_prag_source(req: SourceRequest) -> BankSource:
    """PRAG: train (or resume) one LoRA per document (`out/bank`)."""
    return encode_bank(req.cfg, req.lm, req.docs, req.out.parent)


# Adapter source name (a `Method.source`) → its builder, as "module:function" so that a run
# imports only what it uses. Builders take a `SourceRequest` and return an `AdapterSource`.
SOURCE_BUILDERS: dict[str, str] = {
    "prag": "jprag.pipeline:build_prag_source",
    "poly": "jprag.poly.pipeline:build_poly_source",
    "poly-z": "jprag.poly.pipeline:build_poly_z_source",
    "dyprag": "jprag.translator.pipeline:build_dyprag_source",
}


def _builder(name: str):
    import importlib

    if name not in SOURCE_BUILDERS:
        raise ValueError(f"no builder for adapter source {name!r} (known: {sorted(SOURCE_BUILDERS)})")
    module, attr = SOURCE_BUILDERS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def encode_bank(cfg: RunConfig, lm, docs: Sequence[Document], out: pathlib.Path) -> BankSource:
    """Train (or resume) the PRAG bank for `docs` and wrap it as the "prag" adapter source."""
    from jprag.mesh import make_mesh
    from jprag.train.encoder import encode_documents
    from jprag.train.recipe import corpus_examples

    docs = [d for d in docs if d.qa]
    examples = corpus_examples(lm.tokenizer, docs, cfg.recipe)
    encode_documents(
        lm.cfg, lm.params, examples, [d.id for d in docs], out / "bank",
        lora=cfg.lora, train=cfg.train, chunk_size=cfg.chunk_size,
        mesh=make_mesh(cfg.mesh_data, cfg.mesh_model), seed=cfg.seed,
        pad_id=int(lm.tokenizer.pad_token_id or 0), model_id=lm.path,
        extra_index={"recipe": dataclasses.asdict(cfg.recipe)},
    )
    return BankSource.from_dir(out / "bank", cfg.lora)


def run(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Run every configured method and write the results; returns the results dict."""
    from jprag.model.chat import load

    from jprag import distributed

    out = pathlib.Path(cfg.out_dir)
    primary = distributed.is_primary()  # multi-host: process 0 writes the run's files
    if primary:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=list))
    t_start = time.perf_counter()
    lm = load(cfg.model)
    questions, docs, given = load_data(cfg)
    questions = questions[: cfg.limit] if cfg.limit else questions
    docs = augment_missing(lm, docs, out)
    retrieved = retrieve(cfg, questions, docs, given, out)
    by_id = {d.id: d for d in docs}
    ctx = EvalContext(lm, by_id, retrieved, cfg.gen)

    timings: dict[str, float] = {}
    needed = [by_id[d] for d in sorted({d for q in questions for d in retrieved[q.id][: cfg.gen.top_k]})]
    needed = [d for d in needed if d.qa]
    heldout: list[Document] | None = None
    for name in dict.fromkeys(METHODS[m].source for m in cfg.methods if METHODS[m].source):
        if heldout is None:
            heldout = heldout_documents(cfg, needed, cfg.heldout_per_file)
        t0 = time.perf_counter()
        req = SourceRequest(cfg, lm, needed, heldout, out / name, dict(ctx.sources), progress)
        ctx.sources[name] = _builder(name)(req)
        timings["encode" if name == "prag" else f"build {name}"] = time.perf_counter() - t0

    results = {"model": lm.path, "dataset": cfg.dataset if cfg.dataset == "sample" else str(cfg.data_dir),
               "n_questions": len(questions), "n_documents": len(docs), "methods": {}, "timings": timings}
    storage = {name: source_storage(src) for name, src in ctx.sources.items()}
    types = [q.type for q in questions]
    answers = [q.answers for q in questions]
    f1_per_question: dict[str, list[float]] = {}  # method → [questions], for the paired comparison
    with open(out / "predictions.jsonl" if primary else os.devnull, "w") as pred_file:
        for name in cfg.methods:
            t0 = time.perf_counter()
            bar = tqdm(total=len(questions), desc=f"answer [{name}]", unit="q", disable=not progress)
            cache = AnswerCache(out / "answers" / f"{name}.jsonl", answer_fingerprint(cfg, lm.path, METHODS[name]))
            got = answer(METHODS[name], ctx, questions, progress=bar.update, cache=cache)
            bar.close()
            res = score(got.predictions, got.outputs, answers, types)
            res["seconds"] = time.perf_counter() - t0
            if storage.get(METHODS[name].source):
                res["storage"] = storage[METHODS[name].source]
            results["methods"][name] = res
            f1_per_question[name] = [f1(p, q.answers) for q, p in zip(questions, got.predictions)]
            for q, o, p, f in zip(questions, got.outputs, got.predictions, f1_per_question[name]):
                pred_file.write(json.dumps({
                    "method": name, "id": q.id, "type": q.type, "question": q.question,
                    "answers": list(q.answers), "output": o, "prediction": p,
                    "em": exact_match(p, q.answers), "f1": f, "has_answer": has_answer(o, q.answers),
                }) + "\n")
    results["seconds"] = time.perf_counter() - t_start
    if len(f1_per_question) > 1 and questions:
        results["significance"] = significance(f1_per_question, baseline_method(cfg.methods))
    if primary:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(results_table(results) + "\n")
        plot_results(results, out / "results.png")
    distributed.barrier("results written")
    return results


def baseline_method(methods: Sequence[str]) -> str:
    """What the other methods are compared against: the plain model when it ran, else the first."""
    return "vanilla" if "vanilla" in methods else methods[0]


def significance(scores: Mapping[str, Sequence[float]], baseline: str, resamples: int = 10_000) -> dict[str, Any]:
    """The `results.json` entry of the paired bootstrap of every method's per-question F1 against
    `baseline` (`jprag.eval.significance`)."""
    from jprag.eval.significance import compare_to_baseline

    diffs = compare_to_baseline(scores, baseline, resamples=resamples)
    return {"baseline": baseline, "metric": "f1", "resamples": resamples,
            "methods": {m: d.to_json() for m, d in diffs.items()}}


def answer_fingerprint(cfg: RunConfig, model: str, method: Method) -> str:
    """What a cached answer of `method` depends on besides its question: the model and every
    setting of the run (the method list and output directory aside), so that answers cached
    under other settings, or with adapters trained under other settings, are never reused."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("methods", "out_dir")}
    return fingerprint({"model": model, "settings": settings, "method": dataclasses.asdict(method)})


def source_storage(source) -> dict[str, int] | None:
    """fp32 bytes an adapter source keeps: each document's own (`row_bytes`), shared by all
    (`shared_bytes`, e.g. a Poly-PRAG inventory) and the number of documents (`n_docs`)."""
    if hasattr(source, "storage"):
        return source.storage()
    return None


def results_table(results: Mapping[str, Any]) -> str:
    """Markdown table: one row per method, overall and per-type F1 (and adapter storage, when a
    method has adapters: KiB per document and MiB shared by all documents)."""
    methods = results["methods"]
    types = list(dict.fromkeys(t for r in methods.values() for t in r["by_type"]))
    stored = any("storage" in r for r in methods.values())
    head = "| method | EM | F1 | has-answer | " + " | ".join(f"F1 {t}" for t in types) + " | n | seconds |"
    head += " KiB/doc | shared MiB |" if stored else ""
    sep = "|---|" + "---:|" * (3 + len(types) + 2 + 2 * stored)
    rows = [head, sep]
    for name, r in methods.items():
        per = " | ".join(f"{r['by_type'][t]['f1']:.3f}" if t in r["by_type"] else "-" for t in types)
        row = (f"| {name} | {r['em']:.3f} | {r['f1']:.3f} | {r['has_answer']:.3f} | {per} | {r['n']} "
               f"| {r['seconds']:.0f} |")
        if stored:
            s = r.get("storage")
            row += f" {s['row_bytes'] / 1024:.1f} | {s['shared_bytes'] / 2**20:.1f} |" if s else " - | - |"
        rows.append(row)
    sig = results.get("significance")
    if sig and sig["methods"]:
        from jprag.eval.significance import PairedDifference, comparison_table

        diffs = {m: PairedDifference(**d) for m, d in sig["methods"].items()}
        rows += ["", f"Paired bootstrap over questions ({sig['resamples']} resamples; * = the interval excludes 0):",
                 "", comparison_table(diffs, sig["baseline"], sig["metric"])]
    return "\n".join(rows)


def plot_results(results: Mapping[str, Any], path: pathlib.Path) -> None:
    """Grouped bar chart of EM / F1 / has-answer per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["methods"])
    metrics = ("em", "f1", "has_answer")
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.6))
    width = 0.8 / len(metrics)
    for i, m in enumerate(metrics):
        xs = [j + (i - 1) * width for j in range(len(names))]
        ax.bar(xs, [results["methods"][n][m] for n in names], width, label=m)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(f"{pathlib.Path(str(results['model'])).name} on {pathlib.Path(str(results['dataset'])).name}")
    ax.legend(frameon=False, ncols=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
