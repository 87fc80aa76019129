"""Plain-Python access to the TFDS builders: prepare once, read with `as_data_source`, get
`Question`s and `Document`s. Callers need no TFDS knowledge."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jprag.data.builders.tfds_builders import BUILDERS, SPLIT, PragAugmented
from jprag.data.documents import QA, DataError, Document, Question, passage_id

_ALIASES = {"2wiki": "2wikimultihopqa", "2wikimqa": "2wikimultihopqa", "cwq": "complexwebquestions",
            "prag": "prag_augmented"}
_READ_CHUNK = 512


def dataset_names() -> list[str]:
    """Every accepted `name`: the builders, and ``prag_augmented/<config>`` for each PRAG file."""
    names = [n for n in BUILDERS if n != "prag_augmented"]
    return names + [f"prag_augmented/{c.name}" for c in PragAugmented.BUILDER_CONFIGS]


def _resolve(name: str) -> tuple[type, str | None]:
    base, _, config = name.partition("/")
    base = base.removeprefix("jprag_")
    base = _ALIASES.get(base, base)
    cls = BUILDERS.get(base)
    configs = [c.name for c in getattr(cls, "BUILDER_CONFIGS", [])]
    if cls is None or bool(config) != bool(configs) or (config and config not in configs):
        raise ValueError(f"unknown dataset {name!r}; expected one of: {', '.join(dataset_names())}")
    return cls, config or None


def get_builder(name: str, data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
    """The TFDS builder for `name` (e.g. ``"hotpotqa"``, ``"jprag_popqa"``,
    ``"prag_augmented/hotpotqa_bridge"``) writing ArrayRecord files under `data_dir`."""
    cls, config = _resolve(name)
    data_dir = pathlib.Path(data_dir).expanduser().absolute()
    return cls(data_dir=os.fspath(data_dir), config=config, file_format="array_record")


def prepare(
    name: str,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
) -> tfds.core.DatasetBuilder:
    """Build the dataset from the source files in `manual_dir` unless it is already prepared
    under `data_dir` (`force` rebuilds it, e.g. after the source changed). Nothing is downloaded.
    Returns the builder."""
    builder = get_builder(name, data_dir)
    if builder.is_prepared() and not force:
        return builder
    if manual_dir is None:
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared under {data_dir}; pass manual_dir=, the directory "
            f"holding its source files. {builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    manual_dir = pathlib.Path(manual_dir).expanduser().absolute()
    if not manual_dir.is_dir():
        raise FileNotFoundError(f"{manual_dir}: manual dir not found. {builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    modes = tfds.download.GenerateMode
    mode = modes.REUSE_CACHE_IF_EXISTS if force else modes.REUSE_DATASET_IF_EXISTS
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir), download_mode=mode, try_download_gcs=False))
    return builder


def _py(value: Any) -> Any:
    """A decoded TFDS value as plain Python: bytes → str, numpy → int/float/list."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: _py(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _py(value.item()) if value.ndim == 0 else [_py(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_py(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _sequence_of_dicts(builder: tfds.core.DatasetBuilder) -> list[str]:
    return [k for k, f in builder.info.features.items()
            if isinstance(f, tfds.features.Sequence) and isinstance(f.feature, tfds.features.FeaturesDict)]


def _records(builder: tfds.core.DatasetBuilder, split: str) -> list[dict]:
    source = builder.as_data_source(split=split)
    n = len(source)
    raw: list = []
    for start in range(0, n, _READ_CHUNK):
        raw += source.__getitems__(range(start, min(n, start + _READ_CHUNK)))
    unzip = _sequence_of_dicts(builder)
    out = []
    for rec in raw:
        rec = _py(rec)
        for key in unzip:  # TFDS gives a Sequence of dicts as a dict of lists: back to a list of dicts
            cols = rec[key]
            rec[key] = [dict(zip(cols, row)) for row in zip(*cols.values())]
        out.append(rec)
    return out


def select(
    examples: Sequence[dict],
    first_n_per_type: int | None = None,
    types: Iterable[str] | None = None,
) -> list[dict]:
    """Keep the examples of `types` (all if None), then the first `first_n_per_type` of each type;
    file order is kept. A type in `types` that no example has raises ValueError."""
    if first_n_per_type is not None and (
            isinstance(first_n_per_type, bool) or not isinstance(first_n_per_type, int) or first_n_per_type < 0):
        raise ValueError(f"first_n_per_type must be None or a non-negative int, got {first_n_per_type!r}")
    if types is not None:
        types = [types] if isinstance(types, str) else list(types)
        present = {e["type"] for e in examples}
        unknown = [t for t in types if t not in present]
        if unknown:
            raise ValueError(f"type(s) {', '.join(map(repr, unknown))} not in the dataset; it has: "
                             f"{', '.join(sorted(present))}")
        wanted = set(types)
        examples = [e for e in examples if e["type"] in wanted]
    if first_n_per_type is None:
        return list(examples)
    counts: dict[str, int] = {}
    out = []
    for e in examples:
        if counts.get(e["type"], 0) < first_n_per_type:
            counts[e["type"]] = counts.get(e["type"], 0) + 1
            out.append(e)
    return out


def load_examples(
    name: str,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    split: str = SPLIT,
    first_n_per_type: int | None = None,
    types: Iterable[str] | None = None,
    *,
    force: bool = False,
) -> list[dict]:
    """All features of the selected examples as plain Python dicts (see `select`), in file order;
    prepares the dataset first if needed (see `prepare`)."""
    builder = prepare(name, data_dir, manual_dir, force=force)
    return select(_records(builder, split), first_n_per_type, types)


def load_questions(
    name: str,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    split: str = SPLIT,
    first_n_per_type: int | None = None,
    types: Iterable[str] | None = None,
    *,
    force: bool = False,
) -> list[Question]:
    """The selected questions, in file order. `first_n_per_type=300` takes the first 300 questions
    of each type, as the PRAG/DyPRAG papers sample. ``doc_ids`` are the ids of the PRAG data's
    retrieved documents (matching `passages_as_documents`) and empty for the raw datasets, whose
    questions still need retrieving for."""
    return [
        Question(e["id"], e["question"], tuple(e["answers"]), e["type"], tuple(e.get("doc_ids", ())))
        for e in load_examples(name, data_dir, manual_dir, split, first_n_per_type, types, force=force)
    ]


def passages_as_documents(
    name: str,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    split: str = SPLIT,
    first_n_per_type: int | None = None,
    types: Iterable[str] | None = None,
    *,
    force: bool = False,
) -> list[Document]:
    """The passages of the selected examples as `Document`s, deduplicated, in first-seen order —
    a retrieval corpus or material to augment. For 2WikiMultihopQA and HotpotQA (context
    paragraphs) only ``passage`` is set and the id is `passage_id`; for the PRAG data the
    documents carry their published rewrite and QA pairs, with the ``doc_ids`` of
    `load_questions`. Datasets without passages raise ValueError."""
    examples = load_examples(name, data_dir, manual_dir, split, first_n_per_type, types, force=force)
    if examples and "passages" not in examples[0]:
        raise ValueError(f"dataset {name!r} carries no passages")
    docs: dict[str, Document] = {}
    for e in examples:
        for k, passage in enumerate(e["passages"]):
            if "doc_ids" in e:
                doc = Document(e["doc_ids"][k], passage, e["rewrites"][k], tuple(
                    QA(x["question"], x["answer"], x["full_answer"]) for x in e["qa"] if x["passage_index"] == k))
            else:
                doc = Document(passage_id(passage), passage, "", ())
            seen = docs.setdefault(doc.id, doc)
            if seen.passage != doc.passage:
                raise DataError(f"{name} example {e['id']!r}: document id {doc.id} collides with a different passage")
    return list(docs.values())
