"""Document / question readers: jprag format round trip, PRAG format parsing, clear errors, real data."""

import json
import logging

import pytest

from jprag.data.documents import (
    QA,
    DataError,
    Document,
    passage_id,
    read_documents_jsonl,
    read_prag_dir,
    read_prag_file,
    write_documents_jsonl,
)

MODEL = "llama3.2-1b-instruct"


def _doc(i: int, n_qa: int = 3) -> Document:
    qa = tuple(QA(f"Question {i}.{j} — é?", f"answer {j}", f"The full answer {j}.") for j in range(n_qa))
    return Document(f"doc{i}", f"Passage {i} with \"quotes\"\nand a newline ✓", f"Rewrite {i}", qa)


def _aug(passage: str, tag: str = "") -> dict:
    return {
        "pid": 0,
        "passage": passage,
        f"{MODEL}_rewrite": f"rewrite of {passage}{tag}",
        f"{MODEL}_qa": [
            {"question": f"q{j} {passage}?", "answer": f"a{j}{tag}", "full_answer": f"The answer is a{j}."}
            for j in range(3)
        ],
    }


def _record(test_id, passages, **extra) -> dict:
    rec = {
        "test_id": test_id,
        "question": f"question {test_id}?",
        "answer": ["gold ", "alias"],
        "passages": list(passages),
        "augment": [_aug(p) for p in passages],
    }
    rec.update(extra)
    return rec


def _write_jsonl(path, records) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


# ----------------------------------------------------------------------------- jprag format


def test_round_trip(tmp_path):
    docs = [_doc(0), _doc(1, n_qa=1), _doc(2, n_qa=0)]
    path = tmp_path / "docs.jsonl"
    write_documents_jsonl(docs, path)
    assert read_documents_jsonl(path) == docs
    write_documents_jsonl(read_documents_jsonl(path), tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_bytes() == path.read_bytes()


def test_full_answer_defaults_to_answer(tmp_path):
    path = tmp_path / "docs.jsonl"
    _write_jsonl(path, [{"id": "d", "passage": "p", "rewrite": "r", "qa": [{"question": "q?", "answer": "a"}]}])
    (doc,) = read_documents_jsonl(path)
    assert doc.qa == (QA("q?", "a", "a"),)


@pytest.mark.parametrize(
    "line, field",
    [
        ('{"id": "d", "passage": "p", "rewrite": "r", "qa": [', "invalid JSON"),
        ({"id": "d", "passage": "p", "qa": []}, "'rewrite'"),
        ({"id": "d", "passage": 3, "rewrite": "r", "qa": []}, "'passage' must be a string"),
        ({"id": "d", "passage": "p", "rewrite": "r", "qa": {"question": "q"}}, "'qa' must be a list"),
        ({"id": "d", "passage": "p", "rewrite": "r", "qa": [{"question": "q"}]}, "'qa[0].answer'"),
        ({"id": "d", "passage": "p", "rewrite": "r", "qa": [{"question": "q", "answer": 1}]}, "'qa[0].answer' must be a string"),
        ({"id": "d0", "passage": "p", "rewrite": "r", "qa": []}, "duplicates"),
        (["not", "an", "object"], "must be an object"),
    ],
)
def test_documents_malformed(tmp_path, line, field):
    path = tmp_path / "docs.jsonl"
    _write_jsonl(path, [{"id": "d0", "passage": "p", "rewrite": "r", "qa": []}, line])
    with pytest.raises(DataError) as err:
        read_documents_jsonl(path)
    msg = str(err.value)
    assert "docs.jsonl record 2" in msg and field in msg, msg


# ----------------------------------------------------------------------------- PRAG format


def test_prag_file_parsing(tmp_path):
    path = tmp_path / "bridge.jsonl"
    shared = "shared passage"
    _write_jsonl(path, [
        _record(1, ["alpha", shared, "beta"], type="bridge", qid="x1"),
        "",  # blank lines are skipped
        _record(2, [shared, "gamma", "delta"], answer="plain answer  "),
    ])
    questions, docs = read_prag_file(path)
    assert [q.id for q in questions] == [f"{tmp_path.name}/bridge/1", f"{tmp_path.name}/bridge/2"]
    assert questions[0].answers == ("gold", "alias")  # trailing whitespace stripped
    assert questions[1].answers == ("plain answer",)  # plain string -> 1-tuple
    assert questions[0].type == questions[1].type == "bridge"  # record type, else file stem
    assert questions[0].doc_ids == tuple(passage_id(p) for p in ["alpha", shared, "beta"])
    assert questions[1].doc_ids[0] == questions[0].doc_ids[1]
    assert len(docs) == 5 and len({d.id for d in docs}) == 5
    alpha = docs[0]
    assert alpha.id == passage_id("alpha") and alpha.id.startswith("p") and len(alpha.id) == 13
    assert alpha.rewrite == "rewrite of alpha"
    assert alpha.qa[1] == QA("q1 alpha?", "a1", "The answer is a1.")
    # explicit augmentation model, and one that is absent
    assert read_prag_file(path, augment_model=MODEL)[1] == docs
    with pytest.raises(DataError, match=r"bridge.jsonl record 1: missing field 'augment\[0\].other_rewrite'"):
        read_prag_file(path, augment_model="other")
    # limit, custom question ids
    qs, ds = read_prag_file(path, limit=1, question_prefix="hp")
    assert [q.id for q in qs] == ["hp/1"] and len(ds) == 3


def test_prag_json_array_file(tmp_path):
    path = tmp_path / "total.json"
    path.write_text(json.dumps([_record(0, ["a", "b"]), _record(1, ["c"])], indent=4))
    questions, docs = read_prag_file(path)
    assert [q.type for q in questions] == ["total", "total"] and len(docs) == 3
    path.write_text(json.dumps([_record(0, ["a"]), {"test_id": 1}], indent=4))
    with pytest.raises(DataError, match="total.json record 2: missing field 'question'"):
        read_prag_file(path)


def test_conflicting_augmentations(tmp_path, caplog):
    path = tmp_path / "comp.jsonl"
    other = _record(2, ["same"])
    other["augment"] = [_aug("same", tag=" (variant)")]
    _write_jsonl(path, [_record(1, ["same"]), other])
    with caplog.at_level(logging.WARNING):
        qs, docs = read_prag_file(path)
    assert len(docs) == 1 and docs[0].rewrite == "rewrite of same"
    assert qs[0].doc_ids == qs[1].doc_ids
    assert "different augmentation" in caplog.text
    qs, docs = read_prag_file(path, on_conflict="split")
    assert len(docs) == 2 and docs[0].id == passage_id("same") and docs[1].id.startswith(passage_id("same") + "-")
    assert qs[1].doc_ids == (docs[1].id,) and docs[1].rewrite.endswith("(variant)")
    with pytest.raises(DataError, match="comp.jsonl record 2: passage p[0-9a-f]{12} was already read"):
        read_prag_file(path, on_conflict="error")


def _mutate(fn):
    rec = _record(7, ["a", "b", "c"])
    fn(rec)
    return rec


MALFORMED = {
    "bad_json": ('{"test_id": 7, "question": ', "record 2", "invalid JSON"),
    "not_object": ('"just a string"', "record 2", "must be an object"),
    "missing_question": (_mutate(lambda r: r.pop("question")), "record 2", "missing field 'question'"),
    "missing_augment": (_mutate(lambda r: r.pop("augment")), "record 2", "missing field 'augment'"),
    "answer_type": (_mutate(lambda r: r.update(answer=5)), "record 2", "field 'answer' must be a string or a list"),
    "alias_type": (_mutate(lambda r: r.update(answer=["x", None])), "record 2", "field 'answer[1]' must be a string, got null"),
    "empty_answer": (_mutate(lambda r: r.update(answer=[" "])), "record 2", "field 'answer'"),
    "test_id_type": (_mutate(lambda r: r.update(test_id=[7])), "record 2", "field 'test_id' must be"),
    "passages_type": (_mutate(lambda r: r.update(passages="a")), "record 2", "field 'passages' must be a list"),
    "count_mismatch": (
        _mutate(lambda r: r["augment"].pop()), "record 2",
        "field 'augment' must be a list with one entry per passage (3 passages, 2 entries)",
    ),
    "passage_mismatch": (
        _mutate(lambda r: r["augment"].reverse()), "record 2", "field 'augment[0].passage' must equal 'passages[0]'",
    ),
    "passage_type": (_mutate(lambda r: r["passages"].__setitem__(1, 3)), "record 2", "field 'passages[1]' must be a string"),
    "entry_type": (_mutate(lambda r: r["augment"].__setitem__(2, "x")), "record 2", "field 'augment[2]' must be an object"),
    "missing_rewrite": (
        _mutate(lambda r: r["augment"][1].pop(f"{MODEL}_rewrite")), "record 2", f"missing field 'augment[1].{MODEL}_rewrite'",
    ),
    "qa_type": (
        _mutate(lambda r: r["augment"][1].update({f"{MODEL}_qa": "qa"})), "record 2", f"field 'augment[1].{MODEL}_qa' must be a list",
    ),
    "qa_answer_type": (
        _mutate(lambda r: r["augment"][0][f"{MODEL}_qa"][2].update(answer=3)), "record 2",
        f"field 'augment[0].{MODEL}_qa[2].answer' must be a string, got a number",
    ),
    "qa_missing_question": (
        _mutate(lambda r: r["augment"][0][f"{MODEL}_qa"][0].pop("question")), "record 2",
        f"missing field 'augment[0].{MODEL}_qa[0].question'",
    ),
    "duplicate_test_id": (_record(1, ["z"]), "record 2", "duplicates the test_id of"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_prag_malformed(tmp_path, name):
    bad, record, field = MALFORMED[name]
    path = tmp_path / "bridge.jsonl"
    _write_jsonl(path, [_record(1, ["ok1", "ok2", "ok3"]), bad])
    with pytest.raises(DataError) as err:
        read_prag_file(path)
    msg = str(err.value)
    assert f"bridge.jsonl {record}" in msg and field in msg, msg


def test_error_names_line_when_blank_lines_shift_it(tmp_path):
    path = tmp_path / "bridge.jsonl"
    _write_jsonl(path, [_record(1, ["a"]), "", "{oops"])
    with pytest.raises(DataError, match=r"bridge.jsonl record 2 \(line 3\): invalid JSON"):
        read_prag_file(path)


def test_augment_model_detection_is_unambiguous(tmp_path):
    rec = _record(1, ["a"])
    rec["augment"][0]["other_rewrite"] = "x"
    path = tmp_path / "bridge.jsonl"
    _write_jsonl(path, [rec])
    with pytest.raises(DataError, match="exactly one '<model>_rewrite' key"):
        read_prag_file(path)
    assert len(read_prag_file(path, augment_model="llama3.2-1b-instruct")[1]) == 1


def test_read_prag_dir_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="hotpotqa/bridge.jsonl"):
        read_prag_dir(tmp_path)


# ----------------------------------------------------------------------------- real data


def test_real_data(shared_data_dir):
    questions, docs = read_prag_dir(shared_data_dir)
    assert len(questions) == 300
    assert len({q.id for q in questions}) == 300
    assert sum(len(q.doc_ids) for q in questions) == 900  # before dedup
    by_file = {}
    for q in questions:
        by_file.setdefault(q.id.rsplit("/", 1)[0], []).append(q)
    assert {k: len(v) for k, v in by_file.items()} == {
        "hotpotqa/bridge": 100, "2wikimultihopqa/comparison": 40,
        "2wikimultihopqa/compositional": 60, "complexwebquestions/total": 100,
    }
    assert {q.type for q in by_file["complexwebquestions/total"]} == {"total"}
    assert {q.type for q in by_file["hotpotqa/bridge"]} == {"bridge"}
    # documents: one per distinct passage, every referenced id present
    raw_passages = set()
    for rel in ("hotpotqa/bridge.jsonl", "2wikimultihopqa/comparison.jsonl",
                "2wikimultihopqa/compositional.jsonl", "complexwebquestions/total.jsonl"):
        for line in (shared_data_dir / rel).read_text().splitlines():
            raw_passages.update(json.loads(line)["passages"])
    assert len(docs) == len(raw_passages) < 900
    ids = {d.id for d in docs}
    assert len(ids) == len(docs)
    assert all(i in ids for q in questions for i in q.doc_ids)
    assert all(len(d.qa) == 3 and d.rewrite for d in docs)
    # 2WQA compositional test_ids 57 and 117 share their passages
    q57 = next(q for q in questions if q.id == "2wikimultihopqa/compositional/57")
    q117 = next(q for q in questions if q.id == "2wikimultihopqa/compositional/117")
    assert set(q57.doc_ids) & set(q117.doc_ids)
    assert q57.doc_ids == q117.doc_ids
    # answers: plain strings become 1-tuples; trailing spaces are stripped
    assert next(q for q in questions if q.id == "hotpotqa/bridge/1").answers == ("Chief of Protocol",)
    assert all(a == a.strip() for q in questions for a in q.answers)


def test_real_data_single_file_and_limit(shared_data_dir):
    qs, docs = read_prag_file(shared_data_dir / "2wikimultihopqa" / "compositional.jsonl")
    assert len(qs) == 60 and qs[0].id.startswith("2wikimultihopqa/compositional/")
    qs, docs = read_prag_dir(shared_data_dir, files=["hotpotqa/bridge.jsonl"], limit_per_file=2)
    assert len(qs) == 2 and len(docs) <= 6
    _, split_docs = read_prag_dir(shared_data_dir, on_conflict="split")
    _, first_docs = read_prag_dir(shared_data_dir)
    assert len(split_docs) >= len(first_docs)
