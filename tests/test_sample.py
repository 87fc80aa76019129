"""The bundled sample data set: counts, types, references and answer grounding."""

import collections
import json

import pytest

from jprag.data.documents import Document, Question
from jprag.data.sample import load_sample, read_questions_jsonl, sample_dir
from jprag.eval.metrics import has_answer, normalize_answer

YES_NO = {"yes", "no"}


@pytest.fixture(scope="module")
def sample():
    return load_sample()


@pytest.fixture(scope="module")
def raw_questions():
    lines = (sample_dir() / "questions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_files_present():
    root = sample_dir()
    for name in ("documents.jsonl", "questions.jsonl", "README.md"):
        assert (root / name).is_file(), name


def test_load_sample_types(sample):
    questions, docs = sample
    assert all(isinstance(q, Question) for q in questions)
    assert all(isinstance(d, Document) for d in docs)
    assert all(isinstance(q.answers, tuple) and isinstance(q.doc_ids, tuple) for q in questions)


def test_counts(sample):
    questions, docs = sample
    assert len(docs) >= 32
    counts = collections.Counter(q.type for q in questions)
    assert set(counts) == {"single", "bridge", "comparison"}
    assert len(questions) >= 64
    assert counts["single"] >= 28
    assert counts["bridge"] >= 18
    assert counts["comparison"] >= 18


def test_documents_shape(sample):
    _, docs = sample
    for d in docs:
        assert d.id.startswith("doc-")
        assert 70 <= len(d.passage.split()) <= 110, (d.id, len(d.passage.split()))
        assert d.rewrite and d.rewrite != d.passage, d.id
        assert len(d.qa) == 3, d.id
        for qa in d.qa:
            assert qa.question.endswith("?") and qa.answer and qa.full_answer, (d.id, qa)


def test_ids_unique(sample):
    questions, docs = sample
    assert len({d.id for d in docs}) == len(docs)
    assert len({q.id for q in questions}) == len(questions)


def test_supporting_ids_exist_and_arity(sample, raw_questions):
    questions, docs = sample
    known = {d.id for d in docs}
    for q, raw in zip(questions, raw_questions):
        assert q.doc_ids == tuple(raw["supporting"])  # doc_ids are the supporting documents
        assert q.doc_ids and set(q.doc_ids) <= known, q.id
        assert len(set(q.doc_ids)) == len(q.doc_ids), q.id
        if q.type == "single":
            assert len(q.doc_ids) == 1, q.id
        else:
            assert len(q.doc_ids) == 2, q.id


def test_answers_grounded_in_supporting_passages(sample):
    questions, docs = sample
    passages = {d.id: d.passage for d in docs}
    for q in questions:
        assert 1 <= len(q.answers) <= 3, q.id
        for alias in q.answers:
            if alias.lower() in YES_NO:
                assert q.type == "comparison", q.id
                continue
            support = [passages[d] for d in q.doc_ids]
            assert any(alias.lower() in p.lower() for p in support), (q.id, alias)
            # also as whole tokens after SQuAD normalisation (no "no" inside "nothing"); the
            # en dash of "(1741–1809)" is not ASCII punctuation, so split there first
            assert any(has_answer(p.replace("–", " "), alias) for p in support), (q.id, alias)


def test_comparison_answers_name_an_entity_or_yes_no(sample):
    questions, _ = sample
    for q in questions:
        if q.type != "comparison":
            continue
        first = q.answers[0]
        assert first.lower() in YES_NO or first.lower() in q.question.lower(), q.id


def test_eval_questions_differ_from_training_questions(sample):
    questions, docs = sample
    training = {normalize_answer(qa.question) for d in docs for qa in d.qa}
    for q in questions:
        assert normalize_answer(q.question) not in training, q.id


def test_answers_not_given_away(sample):
    """No single/bridge question contains its answer; a bridge answer is only in the second hop."""
    questions, docs = sample
    passages = {d.id: d.passage.lower() for d in docs}
    for q in questions:
        if q.type == "comparison":
            continue
        assert not any(a.lower() in q.question.lower() for a in q.answers), q.id
        if q.type == "bridge":
            first, second = q.doc_ids
            assert any(a.lower() in passages[second] for a in q.answers), q.id
            assert not any(a.lower() in passages[first] for a in q.answers), q.id


def test_bridge_links_both_documents(sample):
    """Each bridge question needs both documents: they share at least one capitalised name."""
    questions, docs = sample
    passages = {d.id: d.passage for d in docs}
    for q in questions:
        if q.type != "bridge":
            continue
        a, b = (passages[d] for d in q.doc_ids)
        names = lambda t: {w.strip(".,;:'\"()") for w in t.split() if w[:1].isupper()}
        assert (names(a) & names(b)) - {"The", "It", "In", "Its", "A", "He", "She"}, q.id


def test_read_questions_jsonl_rejects_duplicates(tmp_path):
    line = json.dumps({"id": "x", "question": "q?", "answers": ["a"], "type": "single", "supporting": ["d"]})
    path = tmp_path / "q.jsonl"
    path.write_text(line + "\n" + line + "\n")
    with pytest.raises(ValueError, match="duplicate"):
        read_questions_jsonl(path)
