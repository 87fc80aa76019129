"""The bundled offline sample: fictional encyclopedia documents and evaluation questions.

``jprag/data/sample/`` (see its README.md) holds ``documents.jsonl`` -- short encyclopedia-style
passages about invented entities of a fictional province, each with a hand-written rewrite and
three QA pairs, in the jprag document format -- and ``questions.jsonl``: single-hop, bridge
(two-hop) and comparison questions whose answers are only in those documents, so a small
model can answer them only if the knowledge was injected (in its context or its weights).

Question lines are ``{"id", "question", "answers": [aliases], "type", "supporting": [doc
ids]}``; `load_sample` returns them as `Question` objects with ``doc_ids`` = the supporting
document ids (the gold retrieval).
"""

from __future__ import annotations

import importlib.resources
import os
import pathlib

from jprag.data.documents import DataError, Document, Question, _iter_records, read_documents_jsonl

__all__ = ["sample_dir", "read_questions_jsonl", "load_sample"]

QUESTION_TYPES = ("single", "bridge", "comparison")


def sample_dir() -> pathlib.Path:
    """Directory of the bundled sample files (inside the installed `jprag` package)."""
    try:
        path = pathlib.Path(os.fspath(importlib.resources.files("jprag.data").joinpath("sample")))
    except (TypeError, ModuleNotFoundError):  # not a plain file system location
        path = pathlib.Path(__file__).resolve().parent / "sample"
    if not path.is_dir():
        path = pathlib.Path(__file__).resolve().parent / "sample"
    return path


def _strings(value, where: str, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field '{field}' must be a string or a list of strings")
    return tuple(v.strip() for v in value if v.strip())


def read_questions_jsonl(path: str | os.PathLike) -> list[Question]:
    """Read sample-format questions (one JSON object a line); ids must be unique."""
    path = pathlib.Path(path)
    out: list[Question] = []
    seen: set[str] = set()
    for where, rec in _iter_records(path):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: the record must be an object")
        for key in ("id", "question", "answers", "type", "supporting"):
            if key not in rec:
                raise DataError(f"{where}: missing field '{key}'")
        qid, text, qtype = rec["id"], rec["question"], rec["type"]
        for key, val in (("id", qid), ("question", text), ("type", qtype)):
            if not isinstance(val, str) or not val:
                raise DataError(f"{where}: field '{key}' must be a non-empty string")
        if qid in seen:
            raise DataError(f"{where}: field 'id' {qid!r} is a duplicate")
        seen.add(qid)
        answers = _strings(rec["answers"], where, "answers")
        if not answers:
            raise DataError(f"{where}: field 'answers' must hold at least one non-empty answer")
        supporting = _strings(rec["supporting"], where, "supporting")
        out.append(Question(qid, text, answers, qtype, supporting))
    return out


def load_sample() -> tuple[list[Question], list[Document]]:
    """The bundled sample: its questions (``doc_ids`` = supporting documents) and documents."""
    root = sample_dir()
    docs = read_documents_jsonl(root / "documents.jsonl")
    questions = read_questions_jsonl(root / "questions.jsonl")
    known = {d.id for d in docs}
    for q in questions:
        missing = [d for d in q.doc_ids if d not in known]
        if missing:
            raise DataError(f"{root / 'questions.jsonl'}: question {q.id} cites unknown document(s) {missing}")
    return questions, docs
