"""Documents, questions and their file formats.

A `Document` is one retrieved passage together with its augmentation (a rewrite and generated
QA pairs); PRAG trains one LoRA adapter per document. A `Question` is an evaluation question
with its gold answer aliases and the ids of its retrieved documents, in rank order.

Two input formats:

* the jprag document format (`read_documents_jsonl` / `write_documents_jsonl`), one JSON object
  per line: ``{"id", "passage", "rewrite", "qa": [{"question", "answer", "full_answer"}]}``
  (``full_answer`` optional, defaulting to ``answer``);
* the published PRAG augmented data (`read_prag_file`, `read_prag_dir`): one record per
  question with ``test_id``, ``question``, ``answer`` (list of aliases or a plain string),
  optional ``qid`` / ``type``, ``passages`` (retrieved passages, rank order) and ``augment``
  (one entry per passage: ``pid``, ``passage``, ``<model>_rewrite``, ``<model>_qa``). The
  reference writes these files with ``src/augment.py`` of github.com/oneal2000/PRAG (commit
  77c6ed8f), which builds ``passages`` and ``augment`` from the same list, so entry i of
  ``augment`` must carry passage i. Both JSON Lines (one record a line) and the release's
  JSON arrays are read.

Document ids are content hashes of the passage text (`passage_id`: ``"p" + sha1(passage)[:12]``),
so they are stable across runs and files, and a passage retrieved for several questions becomes
one document. The published data sometimes holds the same passage with *different*
augmentations (sampled generation, one per question); ``on_conflict`` chooses what happens:
``"first"`` (default) keeps the first augmentation seen and logs how many were dropped,
``"split"`` keeps each distinct augmentation as its own document (id
``p<hash>-<augmentation hash>`` for every variant after the first — what the reference does in
effect, since it trains one adapter per question and passage), ``"error"`` raises.

Malformed input raises `DataError` naming the file, the 1-based record number (and line, for
JSON Lines, when they differ) and the offending field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

log = logging.getLogger(__name__)

DEFAULT_PRAG_FILES: tuple[str, ...] = (
    "hotpotqa/bridge.jsonl",
    "2wikimultihopqa/comparison.jsonl",
    "2wikimultihopqa/compositional.jsonl",
    "complexwebquestions/total.jsonl",
)
CONFLICT_POLICIES = ("first", "split", "error")


class DataError(ValueError):
    """Malformed data file: the message names the file, the record and the field."""


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    full_answer: str


@dataclass(frozen=True)
class Document:
    id: str
    passage: str
    rewrite: str
    qa: tuple[QA, ...]


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answers: tuple[str, ...]
    type: str
    doc_ids: tuple[str, ...]  # retrieved documents, rank order


def passage_id(passage: str) -> str:
    """Stable document id of a passage: ``"p"`` + the first 12 hex digits of its SHA-1."""
    return "p" + hashlib.sha1(passage.encode("utf-8")).hexdigest()[:12]


# ----------------------------------------------------------------------------- validation

_JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "a boolean",
               list: "a list", dict: "an object", type(None): "null"}


def _kind(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _field(obj: dict, key: str, where: str, path: str) -> Any:
    if key not in obj:
        raise DataError(f"{where}: missing field '{path}{key}'")
    return obj[key]


def _string(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {_kind(value)}")
    return value


def _list(value: Any, where: str, field: str) -> list:
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{field}' must be a list, got {_kind(value)}")
    return value


def _object(value: Any, where: str, field: str) -> dict:
    if not isinstance(value, dict):
        what = f"field '{field}'" if field else "the record"
        raise DataError(f"{where}: {what} must be an object, got {_kind(value)}")
    return value


def _parse_qa_list(value: Any, where: str, field: str) -> tuple[QA, ...]:
    items = _list(value, where, field)
    out = []
    for i, item in enumerate(items):
        f = f"{field}[{i}]"
        item = _object(item, where, f)
        question = _string(_field(item, "question", where, f + "."), where, f + ".question")
        answer = _string(_field(item, "answer", where, f + "."), where, f + ".answer")
        full = item.get("full_answer", answer)
        full = answer if full is None else _string(full, where, f + ".full_answer")
        out.append(QA(question, answer, full))
    return tuple(out)


def _iter_records(path: pathlib.Path) -> Iterator[tuple[str, Any]]:
    """`(location, parsed record)` for each record of a JSON Lines file or a JSON array file."""
    name = os.fspath(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not valid UTF-8 ({e})") from None
    if text.lstrip().startswith("["):  # the release's JSON array files
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        for i, rec in enumerate(records, 1):
            yield f"{name} record {i}", rec
        return
    rec_no = 0
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rec_no += 1
        where = f"{name} record {rec_no}" + (f" (line {line_no})" if line_no != rec_no else "")
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON at column {e.colno}: {e.msg}") from None
        yield where, rec


# ----------------------------------------------------------------------------- jprag format


def read_documents_jsonl(path: str | os.PathLike) -> list[Document]:
    """Read the jprag document format (one JSON object a line); ids must be unique."""
    path = pathlib.Path(path)
    docs: list[Document] = []
    seen: dict[str, str] = {}
    for where, rec in _iter_records(path):
        rec = _object(rec, where, "")
        doc_id = _string(_field(rec, "id", where, ""), where, "id")
        if not doc_id:
            raise DataError(f"{where}: field 'id' must be a non-empty string")
        if doc_id in seen:
            raise DataError(f"{where}: field 'id' {doc_id!r} duplicates the id of {seen[doc_id]}")
        seen[doc_id] = where
        passage = _string(_field(rec, "passage", where, ""), where, "passage")
        rewrite = _string(_field(rec, "rewrite", where, ""), where, "rewrite")
        qa = _parse_qa_list(_field(rec, "qa", where, ""), where, "qa")
        docs.append(Document(doc_id, passage, rewrite, qa))
    return docs


def _doc_json(doc: Document) -> dict:
    return {
        "id": doc.id,
        "passage": doc.passage,
        "rewrite": doc.rewrite,
        "qa": [dataclasses.asdict(q) for q in doc.qa],
    }


def write_documents_jsonl(docs: Iterable[Document], path: str | os.PathLike) -> None:
    """Write documents in the jprag format (UTF-8, one object a line; round-trips exactly)."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(_doc_json(doc), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- PRAG format


class _DocTable:
    """Documents keyed by passage hash, deduplicated under a conflict policy."""

    def __init__(self, on_conflict: str):
        if on_conflict not in CONFLICT_POLICIES:
            raise ValueError(f"on_conflict must be one of {CONFLICT_POLICIES}, got {on_conflict!r}")
        self.on_conflict = on_conflict
        self.docs: dict[str, Document] = {}
        self.where: dict[str, str] = {}
        self.dropped = 0

    def add(self, passage: str, rewrite: str, qa: tuple[QA, ...], where: str) -> str:
        pid = passage_id(passage)
        first = self.docs.get(pid)
        if first is None:
            self.docs[pid] = Document(pid, passage, rewrite, qa)
            self.where[pid] = where
            return pid
        if first.passage != passage:  # a 48-bit hash collision: never silently merge
            raise DataError(f"{where}: passage id {pid} collides with a different passage in {self.where[pid]}")
        if (first.rewrite, first.qa) == (rewrite, qa):
            return pid
        if self.on_conflict == "first":
            self.dropped += 1
            return pid
        if self.on_conflict == "error":
            raise DataError(
                f"{where}: passage {pid} was already read with a different rewrite/QA augmentation "
                f"in {self.where[pid]} (on_conflict='error')"
            )
        aug = json.dumps([rewrite, [dataclasses.asdict(q) for q in qa]], ensure_ascii=False)
        vid = f"{pid}-{hashlib.sha1(aug.encode('utf-8')).hexdigest()[:8]}"
        if vid not in self.docs:
            self.docs[vid] = Document(vid, passage, rewrite, qa)
            self.where[vid] = where
        return vid


def _detect_augment_model(entry: dict, where: str) -> str:
    models = sorted(k[: -len("_rewrite")] for k in entry if isinstance(k, str) and k.endswith("_rewrite"))
    if len(models) != 1:
        found = ", ".join(repr(m) for m in models) or "none"
        raise DataError(
            f"{where}: field 'augment[0]' must have exactly one '<model>_rewrite' key to detect "
            f"the augmentation model (found {found}); pass augment_model="
        )
    return models[0]


def _parse_answers(value: Any, where: str) -> tuple[str, ...]:
    aliases = [value] if isinstance(value, str) else value
    if not isinstance(aliases, list):
        raise DataError(f"{where}: field 'answer' must be a string or a list of strings, got {_kind(value)}")
    out: list[str] = []
    for i, a in enumerate(aliases):
        a = _string(a, where, f"answer[{i}]").strip()
        if a and a not in out:
            out.append(a)
    if not out:
        raise DataError(f"{where}: field 'answer' must hold at least one non-empty answer")
    return tuple(out)


def _read_prag(
    path: pathlib.Path,
    table: _DocTable,
    augment_model: str | None,
    question_prefix: str,
    limit: int | None,
) -> list[Question]:
    questions: list[Question] = []
    seen_ids: dict[str, str] = {}
    model = augment_model
    for n, (where, rec) in enumerate(_iter_records(path)):
        if limit is not None and n >= limit:
            break
        rec = _object(rec, where, "")
        test_id = _field(rec, "test_id", where, "")
        if isinstance(test_id, bool) or not isinstance(test_id, (int, str)):
            raise DataError(f"{where}: field 'test_id' must be a number or a string, got {_kind(test_id)}")
        question = _string(_field(rec, "question", where, ""), where, "question")
        answers = _parse_answers(_field(rec, "answer", where, ""), where)
        qtype = _string(rec["type"], where, "type") if "type" in rec else path.stem
        passages = _list(_field(rec, "passages", where, ""), where, "passages")
        augment = _list(_field(rec, "augment", where, ""), where, "augment")
        if len(augment) != len(passages):
            raise DataError(
                f"{where}: field 'augment' must be a list with one entry per passage "
                f"({len(passages)} passages, {len(augment)} entries)"
            )
        doc_ids = []
        for i, (psg, entry) in enumerate(zip(passages, augment)):
            psg = _string(psg, where, f"passages[{i}]")
            f = f"augment[{i}]"
            entry = _object(entry, where, f)
            if model is None:
                model = _detect_augment_model(entry, where)
            text = _string(_field(entry, "passage", where, f + "."), where, f + ".passage")
            if text != psg:
                raise DataError(f"{where}: field '{f}.passage' must equal 'passages[{i}]' (augment entry for another passage)")
            rewrite = _string(_field(entry, f"{model}_rewrite", where, f + "."), where, f"{f}.{model}_rewrite")
            qa = _parse_qa_list(_field(entry, f"{model}_qa", where, f + "."), where, f"{f}.{model}_qa")
            doc_ids.append(table.add(psg, rewrite, qa, where))
        qid = f"{question_prefix}/{test_id}"
        if qid in seen_ids:
            raise DataError(f"{where}: field 'test_id' {test_id!r} duplicates the test_id of {seen_ids[qid]}")
        seen_ids[qid] = where
        questions.append(Question(qid, question, answers, qtype, tuple(doc_ids)))
    return questions


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")


def _log_dropped(table: _DocTable, source: str) -> None:
    if table.dropped:
        log.warning(
            "%s: %d passage occurrence(s) repeat a passage with a different augmentation; kept the "
            "first one seen (on_conflict='first')", source, table.dropped,
        )


def read_prag_file(
    path: str | os.PathLike,
    augment_model: str | None = None,
    *,
    limit: int | None = None,
    question_prefix: str | None = None,
    on_conflict: str = "first",
) -> tuple[list[Question], list[Document]]:
    """Read one published PRAG augmented file: its questions and their (deduplicated) documents.

    `augment_model` is the prefix of the ``<model>_rewrite`` / ``<model>_qa`` keys (e.g.
    ``"llama3.2-1b-instruct"``); None detects it from the first augment entry. Question ids are
    ``f"{question_prefix}/{test_id}"`` with the prefix defaulting to ``"<parent dir>/<file stem>"``
    (e.g. ``"hotpotqa/bridge/1"``); a question's `type` is the record's ``type`` or else the file
    stem. `limit` reads only the first records. Documents come in first-seen order.
    """
    path = pathlib.Path(path)
    _check_limit(limit)
    table = _DocTable(on_conflict)
    prefix = question_prefix if question_prefix is not None else f"{path.parent.name}/{path.stem}"
    questions = _read_prag(path, table, augment_model, prefix, limit)
    _log_dropped(table, os.fspath(path))
    return questions, list(table.docs.values())


def read_prag_dir(
    data_dir: str | os.PathLike,
    files: Sequence[str] | None = None,
    limit_per_file: int | None = None,
    *,
    augment_model: str | None = None,
    on_conflict: str = "first",
) -> tuple[list[Question], list[Document]]:
    """Read several PRAG files under `data_dir` (default: `DEFAULT_PRAG_FILES`), deduplicating
    documents across files. Question ids are ``"<relative path without suffix>/<test_id>"``,
    e.g. ``"2wikimultihopqa/comparison/7"``. Missing files raise FileNotFoundError."""
    data_dir = pathlib.Path(data_dir)
    _check_limit(limit_per_file)
    rel_paths = list(DEFAULT_PRAG_FILES if files is None else files)
    missing = [r for r in rel_paths if not (data_dir / r).is_file()]
    if missing:
        raise FileNotFoundError(f"{data_dir}: missing PRAG data file(s): {', '.join(missing)}")
    table = _DocTable(on_conflict)
    questions: list[Question] = []
    for rel in rel_paths:
        prefix = pathlib.PurePosixPath(pathlib.Path(rel).as_posix()).with_suffix("").as_posix()
        questions += _read_prag(data_dir / rel, table, augment_model, prefix, limit_per_file)
    _log_dropped(table, os.fspath(data_dir))
    return questions, list(table.docs.values())
