"""Pure-Python readers of the raw QA dataset files, one example dict per record (no TFDS here).

Each ``parse_*`` function reads a whole source file, validates every record and returns the
examples in file order, in the layout of the matching TFDS builder's features (strings, lists of
strings, ints). Malformed input raises `DataError` naming the file, the 1-based record number
(plus the line, for TSV and JSON Lines, when it differs) and the offending field, in the same style
as `jprag.data.documents`. ``index`` is the record's 0-based position in the source file — the
``test_id`` the PRAG reference gives it — so raw and PRAG examples can be matched.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
from typing import Any, Iterable

from jprag.data.documents import (
    DataError,
    _field,
    _iter_records,
    _kind,
    _list,
    _object,
    _string,
    read_prag_file,
)

TWOWIKI_TYPES = ("comparison", "bridge_comparison", "inference", "compositional")
HOTPOTQA_TYPES = ("bridge", "comparison")
CWQ_TYPES = ("composition", "conjunction", "comparative", "superlative")
POPQA_COLUMNS = ("id", "subj", "prop", "obj", "question", "possible_answers", "s_pop")


def _int(value: Any, where: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: field '{field}' must be an integer, got {_kind(value)}")
    return value


def _nonempty(value: Any, where: str, field: str) -> str:
    value = _string(value, where, field)
    if not value.strip():
        raise DataError(f"{where}: field '{field}' must be a non-empty string")
    return value


def _one_of(value: Any, choices: Iterable[str], where: str, field: str) -> str:
    value = _string(value, where, field)
    choices = tuple(choices)
    if value not in choices:
        raise DataError(f"{where}: field '{field}' must be one of {', '.join(choices)}; got {value!r}")
    return value


def _answers(candidates: Iterable[str], where: str, field: str) -> list[str]:
    """Strip and deduplicate answer aliases (first occurrence wins); at least one must remain."""
    out: list[str] = []
    for a in candidates:
        a = a.strip()
        if a and a not in out:
            out.append(a)
    if not out:
        raise DataError(f"{where}: field '{field}' must hold at least one non-empty answer")
    return out


def _unique_id(seen: dict[str, str], value: str, where: str, field: str) -> str:
    if value in seen:
        raise DataError(f"{where}: field '{field}' {value!r} duplicates the id of {seen[value]}")
    seen[value] = where
    return value


def _records(path: pathlib.Path) -> Iterable[tuple[int, str, dict]]:
    """`(0-based index, location, record object)` for each record of a JSON array / JSON Lines file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: source file not found")
    for index, (where, rec) in enumerate(_iter_records(path)):
        yield index, where, _object(rec, where, "")


def _context(rec: dict, where: str, joiner: str) -> tuple[list[str], list[str]]:
    """Titles and ``"title: sentences joined"`` passages of a ``context`` [[title, [sentences]]]."""
    titles, passages = [], []
    for i, item in enumerate(_list(_field(rec, "context", where, ""), where, "context")):
        f = f"context[{i}]"
        if not isinstance(item, list) or len(item) != 2:
            raise DataError(f"{where}: field '{f}' must be a [title, sentences] pair, got {_kind(item)}"
                            + (f" of length {len(item)}" if isinstance(item, list) else ""))
        title = _string(item[0], where, f + "[0]")
        sentences = _list(item[1], where, f + "[1]")
        for j, s in enumerate(sentences):
            _string(s, where, f"{f}[1][{j}]")
        titles.append(title)
        passages.append(f"{title}: {joiner.join(sentences).strip()}")
    return titles, passages


def _supporting_titles(rec: dict, where: str, titles: list[str]) -> list[str]:
    """Distinct titles of ``supporting_facts`` [[title, sentence id]], in order; each must be a context title."""
    known, out = set(titles), []
    for i, fact in enumerate(_list(_field(rec, "supporting_facts", where, ""), where, "supporting_facts")):
        f = f"supporting_facts[{i}]"
        if not isinstance(fact, list) or len(fact) != 2:
            raise DataError(f"{where}: field '{f}' must be a [title, sentence id] pair, got {_kind(fact)}")
        title = _string(fact[0], where, f + "[0]")
        _int(fact[1], where, f + "[1]")
        if title not in known:
            raise DataError(f"{where}: field '{f}[0]' names {title!r}, which is not a title in 'context'")
        if title not in out:
            out.append(title)
    return out


# ----------------------------------------------------------------------------- 2WikiMultihopQA


def read_2wiki_aliases(path: str | os.PathLike) -> dict[str, list[str]]:
    """2WikiMultihopQA's ``id_aliases.json`` (JSON Lines of ``{"Q_id", "aliases", ...}``)."""
    out: dict[str, list[str]] = {}
    for _, where, rec in _records(pathlib.Path(path)):
        qid = _string(_field(rec, "Q_id", where, ""), where, "Q_id")
        aliases = _list(_field(rec, "aliases", where, ""), where, "aliases")
        out[qid] = [_string(a, where, f"aliases[{i}]") for i, a in enumerate(aliases)]
    return out


def parse_2wikimultihopqa(path: str | os.PathLike, aliases: dict[str, list[str]] | None = None) -> list[dict]:
    """2WikiMultihopQA ``dev.json``: a JSON array of ``{_id, type, question, answer, context,
    supporting_facts, evidences?, answer_id?}``. `aliases` (from ``id_aliases.json``) adds the
    Wikidata aliases of ``answer_id`` after ``answer``, as the PRAG reference scores against them.
    Sentences are joined with a space."""
    examples, seen = [], {}
    for index, where, rec in _records(pathlib.Path(path)):
        qid = _unique_id(seen, _nonempty(_field(rec, "_id", where, ""), where, "_id"), where, "_id")
        qtype = _one_of(_field(rec, "type", where, ""), TWOWIKI_TYPES, where, "type")
        question = _nonempty(_field(rec, "question", where, ""), where, "question")
        answer = _string(_field(rec, "answer", where, ""), where, "answer")
        candidates = [answer]
        answer_id = rec.get("answer_id")
        if aliases and isinstance(answer_id, str) and answer_id:
            candidates += aliases.get(answer_id, [])
        titles, passages = _context(rec, where, " ")
        evidences = []
        for i, ev in enumerate(_list(rec.get("evidences", []), where, "evidences")):
            f = f"evidences[{i}]"
            if not isinstance(ev, list) or len(ev) != 3:
                raise DataError(f"{where}: field '{f}' must be a [subject, relation, object] triple, got {_kind(ev)}")
            s, r, o = (_string(x, where, f"{f}[{k}]") for k, x in enumerate(ev))
            evidences.append({"subject": s, "relation": r, "object": o})
        examples.append({
            "index": index, "id": qid, "question": question, "type": qtype,
            "answers": _answers(candidates, where, "answer"),
            "passages": passages, "supporting_titles": _supporting_titles(rec, where, titles),
            "evidences": evidences,
        })
    return examples


# ----------------------------------------------------------------------------- HotpotQA


def parse_hotpotqa(path: str | os.PathLike) -> list[dict]:
    """HotpotQA ``hotpot_dev_distractor_v1.json``: a JSON array of ``{_id, type, level, question,
    answer, context, supporting_facts}``. Sentences are concatenated as published (each after the
    first carries its leading space), as the PRAG reference does."""
    examples, seen = [], {}
    for index, where, rec in _records(pathlib.Path(path)):
        qid = _unique_id(seen, _nonempty(_field(rec, "_id", where, ""), where, "_id"), where, "_id")
        qtype = _one_of(_field(rec, "type", where, ""), HOTPOTQA_TYPES, where, "type")
        level = _string(_field(rec, "level", where, ""), where, "level")
        question = _nonempty(_field(rec, "question", where, ""), where, "question")
        answer = _string(_field(rec, "answer", where, ""), where, "answer")
        titles, passages = _context(rec, where, "")
        examples.append({
            "index": index, "id": qid, "question": question, "type": qtype,
            "answers": _answers([answer], where, "answer"), "level": level,
            "passages": passages, "supporting_titles": _supporting_titles(rec, where, titles),
        })
    return examples


# ----------------------------------------------------------------------------- PopQA


def parse_popqa(path: str | os.PathLike) -> list[dict]:
    """PopQA ``popQA.tsv``: tab-separated with a header row (``id, subj, prop, obj, question,
    possible_answers`` — a JSON list — ``s_pop``, and more, ignored). The type is ``prop``."""
    path = pathlib.Path(path)
    name = os.fspath(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: source file not found")
    examples, seen = [], {}
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            header = reader.fieldnames or []
            missing = [c for c in POPQA_COLUMNS if c not in header]
            if missing:
                raise DataError(f"{name}: header row: missing column(s) {', '.join(repr(c) for c in missing)}")
            for index, row in enumerate(reader):
                where = f"{name} record {index + 1}" + (
                    f" (line {reader.line_num})" if reader.line_num != index + 2 else "")
                if None in row:
                    raise DataError(f"{where}: has {len(header) + len(row[None])} fields, the header {len(header)}")
                for c in POPQA_COLUMNS:
                    if row[c] is None:
                        raise DataError(f"{where}: missing field '{c}' (the row has fewer fields than the header)")
                qid = _unique_id(seen, _nonempty(row["id"], where, "id"), where, "id")
                try:
                    possible = json.loads(row["possible_answers"])
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: field 'possible_answers' must be a JSON list: {e.msg}") from None
                possible = _list(possible, where, "possible_answers")
                possible = [_string(a, where, f"possible_answers[{i}]") for i, a in enumerate(possible)]
                try:
                    s_pop = int(row["s_pop"])
                except ValueError:
                    raise DataError(f"{where}: field 's_pop' must be an integer, got {row['s_pop']!r}") from None
                examples.append({
                    "index": index, "id": qid,
                    "question": _nonempty(row["question"], where, "question"),
                    "type": _nonempty(row["prop"], where, "prop"),
                    "answers": _answers(possible, where, "possible_answers"),
                    "subj": row["subj"], "obj": row["obj"], "s_pop": s_pop,
                })
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not valid UTF-8 ({e})") from None
    except csv.Error as e:
        raise DataError(f"{name}: malformed TSV: {e}") from None
    return examples


# ----------------------------------------------------------------------------- ComplexWebQuestions


def parse_complexwebquestions(path: str | os.PathLike) -> list[dict]:
    """ComplexWebQuestions ``ComplexWebQuestions_dev.json``: a JSON array of ``{ID, question,
    answers: [{answer, aliases, ...}], compositionality_type, ...}``. The answers are every
    ``answer`` and its ``aliases``, as the PRAG reference takes them; the type is
    ``compositionality_type``."""
    examples, seen = [], {}
    for index, where, rec in _records(pathlib.Path(path)):
        qid = _unique_id(seen, _nonempty(_field(rec, "ID", where, ""), where, "ID"), where, "ID")
        question = _nonempty(_field(rec, "question", where, ""), where, "question")
        qtype = _one_of(_field(rec, "compositionality_type", where, ""), CWQ_TYPES, where, "compositionality_type")
        candidates = []
        for i, ans in enumerate(_list(_field(rec, "answers", where, ""), where, "answers")):
            f = f"answers[{i}]"
            ans = _object(ans, where, f)
            candidates.append(_string(_field(ans, "answer", where, f + "."), where, f + ".answer"))
            aliases = _list(ans.get("aliases", []), where, f + ".aliases")
            candidates += [_string(a, where, f"{f}.aliases[{j}]") for j, a in enumerate(aliases)]
        examples.append({
            "index": index, "id": qid, "question": question, "type": qtype,
            "answers": _answers(candidates, where, "answers"),
        })
    return examples


# ----------------------------------------------------------------------------- PRAG augmented


def parse_prag(path: str | os.PathLike) -> list[dict]:
    """One published PRAG augmented file, read with `read_prag_file` (``on_conflict="split"``, so
    each example keeps its own rewrite and QA pairs even where a passage recurs with another
    augmentation). ``qa`` is flat: one entry per QA pair with the index of its passage."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: PRAG data file not found")
    questions, docs = read_prag_file(path, on_conflict="split")
    by_id = {d.id: d for d in docs}
    examples = []
    for q in questions:
        qdocs = [by_id[i] for i in q.doc_ids]
        examples.append({
            "id": q.id, "test_id": q.id.rsplit("/", 1)[-1], "question": q.question,
            "answers": list(q.answers), "type": q.type, "doc_ids": list(q.doc_ids),
            "passages": [d.passage for d in qdocs], "rewrites": [d.rewrite for d in qdocs],
            "qa": [{"passage_index": k, "question": x.question, "answer": x.answer, "full_answer": x.full_answer}
                   for k, d in enumerate(qdocs) for x in d.qa],
        })
    return examples
