"""TFDS builders of the QA datasets: tiny fixtures in each source's real format, built as
ArrayRecord and read back with `as_data_source` (no TensorFlow), `load_questions` sampling, and
`DataError`s naming file, record and field."""

import copy
import csv
import json
import sys

import pytest
import tensorflow_datasets as tfds

from jprag.data.builders import (
    SPLIT,
    get_builder,
    load_examples,
    load_questions,
    passages_as_documents,
    prepare,
    select,
)
from jprag.data.documents import DataError, Question, passage_id, read_prag_file

# ----------------------------------------------------------------------------- fixtures (real formats)


def _ctx(title, *sentences):
    return [title, list(sentences)]


TWOWIKI = [
    {"_id": "a1", "type": "comparison", "question": "Who was born first, Ann or Bob?", "answer": "Ann",
     "answer_id": "Q1",
     "context": [_ctx("Ann", "Ann was born in 1900.", "She sang."), _ctx("Bob", "Bob was born in 1910.")],
     "supporting_facts": [["Ann", 0], ["Bob", 0], ["Ann", 1]],
     "evidences": [["Ann", "date of birth", "1900"], ["Bob", "date of birth", "1910"]],
     "entity_ids": "Q1_Q2"},
    {"_id": "a2", "type": "compositional", "question": "Who is the mother of the director of Film X?",
     "answer": "Carla", "answer_id": "",
     "context": [_ctx("Film X", "Film X is directed by Dan."), _ctx("Dan", "Dan's mother is Carla.")],
     "supporting_facts": [["Film X", 0], ["Dan", 0]],
     "evidences": [["Film X", "director", "Dan"], ["Dan", "mother", "Carla"]], "entity_ids": "Q3_Q4"},
    {"_id": "a3", "type": "comparison", "question": "Are Ann and Bob both singers?", "answer": "no",
     "context": [_ctx("Ann", "Ann was born in 1900.", "She sang."), _ctx("Bob", "Bob painted.")],
     "supporting_facts": [["Ann", 1], ["Bob", 0]], "evidences": [], "entity_ids": "Q1_Q2"},
    {"_id": "a4", "type": "inference", "question": "Who is the paternal grandfather of Eve?", "answer": "Gus",
     "context": [_ctx("Eve", "Eve's father is Fred."), _ctx("Fred", "Fred's father is Gus.")],
     "supporting_facts": [["Eve", 0], ["Fred", 0]], "evidences": [["Eve", "father", "Fred"]]},
    {"_id": "a5", "type": "bridge_comparison", "question": "Which film has the director born later?",
     "answer": "Film Y",
     "context": [_ctx("Film Y", "Film Y is by Hal."), _ctx("Hal", "Hal was born in 1950.")],
     "supporting_facts": [["Film Y", 0], ["Hal", 0]], "evidences": []},
]
TWOWIKI_ALIASES = [{"Q_id": "Q1", "aliases": ["Ann", "Ann Smith"], "demonyms": []}]

HOTPOT = [
    {"_id": "h1", "type": "bridge", "level": "medium", "question": "Where was the director of Z born?",
     "answer": "Paris",
     "context": [_ctx("Z", "Z is a film.", " It was directed by Kim."), _ctx("Kim", "Kim was born in Paris.")],
     "supporting_facts": [["Z", 1], ["Kim", 0]]},
    {"_id": "h2", "type": "comparison", "level": "hard", "question": "Is Z older than W?", "answer": "yes",
     "context": [_ctx("Z", "Z is a film.", " It was directed by Kim."), _ctx("W", "W is newer.")],
     "supporting_facts": [["Z", 0], ["W", 0]]},
    {"_id": "h3", "type": "bridge", "level": "easy", "question": "What band did Lee join?", "answer": "Quux",
     "context": [_ctx("Lee", "Lee joined Quux.")], "supporting_facts": [["Lee", 0]]},
    {"_id": "h4", "type": "bridge", "level": "hard", "question": "Who founded Quux?", "answer": " Mo ",
     "context": [_ctx("Quux", "Quux was founded by Mo.", " It is a band.")],
     "supporting_facts": [["Quux", 0], ["Quux", 1]]},
]

POPQA_COLUMNS = ["id", "subj", "prop", "obj", "subj_id", "prop_id", "obj_id", "s_aliases", "o_aliases",
                 "s_uri", "o_uri", "s_wiki_title", "o_wiki_title", "s_pop", "o_pop", "question",
                 "possible_answers"]
POPQA = [
    (4222362, "George Rankin", "occupation", "politician", ["politician", "political leader"], 142),
    (954184, "John Mayne", "occupation", "journalist", ["journalist", "journo"], 241),
    (1185310, "Henry Feilden", "place of birth", "Bristol", ["Bristol", "City of Bristol"], 498),
    (3218302, "Quiet Riot", "genre", "heavy metal", ["heavy metal", "\"metal\""], 5005),
]

CWQ = [
    {"ID": "WebQTrn-1_aa", "webqsp_ID": "WebQTrn-1", "webqsp_question": "what is x", "machine_question": "m",
     "question": "What is the country with the capital Brasilia?", "sparql": "SELECT ...",
     "compositionality_type": "composition", "created": "2018-01-01",
     "answers": [{"answer": "Brazil", "answer_id": "m.015fr", "aliases": ["Brasil", "Federative Republic of Brazil"]}]},
    {"ID": "WebQTrn-2_bb", "question": "Which team won in 1990 and is in Ohio?", "compositionality_type": "conjunction",
     "answers": [{"answer": "Reds", "answer_id": "m.1", "aliases": []},
                 {"answer": "Cincinnati Reds", "answer_id": "m.2", "aliases": ["Reds"]}]},
    {"ID": "WebQTrn-3_cc", "question": "Who is the leader of the country where Lima is?",
     "compositionality_type": "composition", "answers": [{"answer": "Dina Boluarte", "aliases": []}]},
    {"ID": "WebQTrn-4_dd", "question": "What is the largest city in Texas?", "compositionality_type": "superlative",
     "answers": [{"answer": "Houston", "answer_id": "m.3", "aliases": ["Houston, Texas", "H-Town"]}]},
]


def _write_json(path, data):
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")


def _write_popqa(path, rows=POPQA, columns=POPQA_COLUMNS):
    with open(path, "w", encoding="utf-8", newline="") as f:  # as pandas' to_csv(sep="\t") writes it
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(columns)
        for qid, subj, prop, obj, answers, s_pop in rows:
            full = {"id": qid, "subj": subj, "prop": prop, "obj": obj, "subj_id": 1, "prop_id": 22, "obj_id": 3,
                    "s_aliases": "[]", "o_aliases": repr(answers[1:]), "s_uri": "http://www.wikidata.org/entity/Q1",
                    "o_uri": "http://www.wikidata.org/entity/Q2", "s_wiki_title": subj, "o_wiki_title": obj,
                    "s_pop": s_pop, "o_pop": 10, "question": f"What is {subj}'s {prop}?",
                    "possible_answers": json.dumps(answers)}
            w.writerow([full[c] for c in columns])


WRITERS = {
    "2wikimultihopqa": lambda d, data=TWOWIKI: (_write_json(d / "dev.json", data), (d / "id_aliases.json").write_text(
        "".join(json.dumps(r) + "\n" for r in TWOWIKI_ALIASES))),
    "hotpotqa": lambda d, data=HOTPOT: _write_json(d / "hotpot_dev_distractor_v1.json", data),
    "popqa": lambda d, data=POPQA: _write_popqa(d / "popQA.tsv", data),
    "complexwebquestions": lambda d, data=CWQ: _write_json(d / "ComplexWebQuestions_dev.json", data),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every raw builder prepared once, in one shared data dir: name -> (data_dir, manual_dir)."""
    tfds.disable_progress_bar()
    data_dir = tmp_path_factory.mktemp("tfds")
    out = {}
    for name, write in WRITERS.items():
        manual = tmp_path_factory.mktemp(f"manual_{name}")
        write(manual)
        prepare(name, data_dir, manual)
        out[name] = (data_dir, manual)
    return out


# ----------------------------------------------------------------------------- expected examples

EXPECTED = {
    "2wikimultihopqa": [
        {"index": 0, "id": "a1", "type": "comparison", "answers": ["Ann", "Ann Smith"],
         "passages": ["Ann: Ann was born in 1900. She sang.", "Bob: Bob was born in 1910."],
         "supporting_titles": ["Ann", "Bob"],
         "evidences": [{"subject": "Ann", "relation": "date of birth", "object": "1900"},
                       {"subject": "Bob", "relation": "date of birth", "object": "1910"}]},
        {"index": 1, "id": "a2", "type": "compositional", "answers": ["Carla"]},
        {"index": 2, "id": "a3", "type": "comparison", "answers": ["no"], "evidences": []},
        {"index": 3, "id": "a4", "type": "inference", "answers": ["Gus"]},
        {"index": 4, "id": "a5", "type": "bridge_comparison", "answers": ["Film Y"]},
    ],
    "hotpotqa": [
        {"index": 0, "id": "h1", "type": "bridge", "level": "medium", "answers": ["Paris"],
         "passages": ["Z: Z is a film. It was directed by Kim.", "Kim: Kim was born in Paris."],
         "supporting_titles": ["Z", "Kim"]},
        {"index": 1, "id": "h2", "type": "comparison", "answers": ["yes"]},
        {"index": 2, "id": "h3", "type": "bridge", "answers": ["Quux"]},
        {"index": 3, "id": "h4", "type": "bridge", "answers": ["Mo"], "supporting_titles": ["Quux"]},
    ],
    "popqa": [
        {"index": 0, "id": "4222362", "type": "occupation", "answers": ["politician", "political leader"],
         "subj": "George Rankin", "obj": "politician", "s_pop": 142,
         "question": "What is George Rankin's occupation?"},
        {"index": 1, "id": "954184", "type": "occupation"},
        {"index": 2, "id": "1185310", "type": "place of birth", "answers": ["Bristol", "City of Bristol"]},
        {"index": 3, "id": "3218302", "type": "genre", "answers": ["heavy metal", '"metal"'], "s_pop": 5005},
    ],
    "complexwebquestions": [
        {"index": 0, "id": "WebQTrn-1_aa", "type": "composition",
         "answers": ["Brazil", "Brasil", "Federative Republic of Brazil"],
         "question": "What is the country with the capital Brasilia?"},
        {"index": 1, "id": "WebQTrn-2_bb", "type": "conjunction", "answers": ["Reds", "Cincinnati Reds"]},
        {"index": 2, "id": "WebQTrn-3_cc", "type": "composition"},
        {"index": 3, "id": "WebQTrn-4_dd", "type": "superlative", "answers": ["Houston", "Houston, Texas", "H-Town"]},
    ],
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_build_and_read_back(built, name):
    data_dir, _ = built[name]
    builder = get_builder(name, data_dir)
    assert builder.is_prepared()
    source = builder.as_data_source(split=SPLIT)  # random access, no TensorFlow
    expected = EXPECTED[name]
    assert len(source) == len(expected)
    last = source[len(expected) - 1]
    assert last["id"] == expected[-1]["id"].encode()  # strings come back as bytes
    assert int(last["index"]) == len(expected) - 1
    examples = load_examples(name, data_dir)  # prepared: no manual dir needed
    assert [e["id"] for e in examples] == [e["id"] for e in expected]  # file order kept
    for got, want in zip(examples, expected):
        assert {k: got[k] for k in want} == want
    questions = load_questions(name, data_dir)
    assert questions[0] == Question(expected[0]["id"], examples[0]["question"], tuple(examples[0]["answers"]),
                                    expected[0]["type"], ())


def test_registered_tfds_name(built):
    data_dir, _ = built["hotpotqa"]
    builder = tfds.builder("jprag_hotpotqa", data_dir=str(data_dir))
    assert len(builder.as_data_source(split=SPLIT)) == len(HOTPOT)


def test_first_n_per_type_and_types(built):
    data_dir, _ = built["2wikimultihopqa"]
    ids = lambda **kw: [q.id for q in load_questions("2wikimultihopqa", data_dir, **kw)]  # noqa: E731
    assert ids() == ["a1", "a2", "a3", "a4", "a5"]
    assert ids(first_n_per_type=1) == ["a1", "a2", "a4", "a5"]
    assert ids(first_n_per_type=2) == ["a1", "a2", "a3", "a4", "a5"]
    assert ids(first_n_per_type=0) == []
    assert ids(types=["comparison"]) == ["a1", "a3"]
    assert ids(types=["comparison", "inference"], first_n_per_type=1) == ["a1", "a4"]
    data_dir, _ = built["popqa"]
    assert [q.id for q in load_questions("popqa", data_dir, first_n_per_type=1)] == ["4222362", "1185310", "3218302"]
    with pytest.raises(ValueError, match="'bridge' not in the dataset"):
        load_questions("2wikimultihopqa", built["2wikimultihopqa"][0], types=["bridge"])
    with pytest.raises(ValueError, match="first_n_per_type"):
        select([], first_n_per_type=-1)


def test_passages_as_documents(built):
    data_dir, _ = built["hotpotqa"]
    docs = passages_as_documents("hotpotqa", data_dir)
    texts = [d.passage for d in docs]
    assert texts == ["Z: Z is a film. It was directed by Kim.", "Kim: Kim was born in Paris.", "W: W is newer.",
                     "Lee: Lee joined Quux.", "Quux: Quux was founded by Mo. It is a band."]  # h2's "Z" deduplicated
    assert all(d.id == passage_id(d.passage) and d.rewrite == "" and d.qa == () for d in docs)
    assert len(passages_as_documents("hotpotqa", data_dir, types=["comparison"])) == 2
    with pytest.raises(ValueError, match="no passages"):
        passages_as_documents("popqa", built["popqa"][0])


def test_prepare_reuses_and_force_rebuilds(built, tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    WRITERS["complexwebquestions"](manual)
    data_dir = tmp_path / "data"
    assert len(load_questions("cwq", data_dir, manual)) == len(CWQ)
    WRITERS["complexwebquestions"](manual, CWQ[:2])
    assert len(load_questions("jprag_complexwebquestions", data_dir, manual)) == len(CWQ)  # reused as built
    assert len(load_questions("cwq", data_dir, manual, force=True)) == 2


def test_missing_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared.*manual_dir"):
        load_questions("hotpotqa", tmp_path / "data")
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "other.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="hotpot_dev_distractor_v1.json"):
        load_questions("hotpotqa", tmp_path / "data", tmp_path / "manual")
    with pytest.raises(ValueError, match="unknown dataset 'nq'"):
        load_questions("nq", tmp_path / "data")
    with pytest.raises(ValueError, match="prag_augmented/hotpotqa_bridge"):
        load_questions("prag_augmented", tmp_path / "data")


# ----------------------------------------------------------------------------- malformed sources


def _drop(i, key):
    def f(data):
        del data[i][key]
    return f


def _set(i, key, value):
    def f(data):
        data[i][key] = value
    return f


MALFORMED = [
    ("2wikimultihopqa", _drop(1, "answer"), r"dev\.json record 2: missing field 'answer'"),
    ("2wikimultihopqa", _set(0, "supporting_facts", [["Nobody", 0]]),
     r"dev\.json record 1: field 'supporting_facts\[0\]\[0\]' names 'Nobody'"),
    ("2wikimultihopqa", _set(4, "type", "bridge"), r"dev\.json record 5: field 'type' must be one of"),
    ("2wikimultihopqa", _set(2, "_id", "a1"), r"dev\.json record 3: field '_id' 'a1' duplicates"),
    ("hotpotqa", _set(2, "context", [["Lee"]]), r"distractor_v1\.json record 3: field 'context\[0\]' must be a"),
    ("hotpotqa", _set(3, "answer", "  "), r"distractor_v1\.json record 4: field 'answer' must hold"),
    ("hotpotqa", _set(0, "question", 7), r"distractor_v1\.json record 1: field 'question' must be a string"),
    ("complexwebquestions", lambda d: d[1]["answers"][1].pop("answer"),
     r"dev\.json record 2: missing field 'answers\[1\]\.answer'"),
    ("complexwebquestions", _drop(3, "compositionality_type"),
     r"dev\.json record 4: missing field 'compositionality_type'"),
]


@pytest.mark.parametrize("name, mutate, message", MALFORMED)
def test_malformed_json_source(tmp_path, name, mutate, message):
    data = copy.deepcopy({"2wikimultihopqa": TWOWIKI, "hotpotqa": HOTPOT, "complexwebquestions": CWQ}[name])
    mutate(data)
    WRITERS[name](tmp_path, data)
    with pytest.raises(DataError, match=message):
        prepare(name, tmp_path / "data", tmp_path)
    assert not get_builder(name, tmp_path / "data").is_prepared()


def test_malformed_popqa(tmp_path):
    _write_popqa(tmp_path / "popQA.tsv")
    text = (tmp_path / "popQA.tsv").read_text()
    assert '"[""Bristol"", ""City of Bristol""]"' in text  # quoted as pandas quotes it
    (tmp_path / "popQA.tsv").write_text(text.replace('"[""Bristol"", ""City of Bristol""]"', "[Bristol"))
    with pytest.raises(DataError, match=r"popQA\.tsv record 3: field 'possible_answers' must be a JSON list"):
        prepare("popqa", tmp_path / "data", tmp_path)
    _write_popqa(tmp_path / "popQA.tsv", POPQA, [c for c in POPQA_COLUMNS if c != "s_pop"])
    with pytest.raises(DataError, match=r"popQA\.tsv: header row: missing column\(s\) 's_pop'"):
        prepare("popqa", tmp_path / "data", tmp_path)


# ----------------------------------------------------------------------------- PRAG augmented data


def test_prag_augmented_real_data(shared_data_dir, tmp_path):
    name = "prag_augmented/hotpotqa_bridge"
    questions = load_questions(name, tmp_path, shared_data_dir)
    ref_questions, ref_docs = read_prag_file(shared_data_dir / "hotpotqa" / "bridge.jsonl", on_conflict="split")
    assert questions == ref_questions
    assert passages_as_documents(name, tmp_path) == ref_docs
    assert load_questions(name, tmp_path, first_n_per_type=10) == ref_questions[:10]
    first = load_examples("jprag_prag_augmented/hotpotqa_bridge", tmp_path)[0]
    assert len(first["passages"]) == len(first["rewrites"]) == len(first["doc_ids"]) == 3
    assert first["test_id"] == "1" and first["id"] == "hotpotqa/bridge/1"
    assert {x["passage_index"] for x in first["qa"]} == {0, 1, 2}


def test_prag_augmented_malformed(tmp_path):
    manual = tmp_path / "prag"
    (manual / "complexwebquestions").mkdir(parents=True)
    aug = {"pid": 0, "passage": "p", "m_rewrite": "r", "m_qa": [{"question": "q", "answer": "a", "full_answer": "f"}]}
    good = {"test_id": 0, "question": "q?", "answer": ["a"], "passages": ["p"], "augment": [aug]}
    bad = dict(good, test_id=1, augment=[])
    (manual / "complexwebquestions" / "total.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"total\.jsonl record 2: field 'augment' must be a list with one entry"):
        prepare("prag/cwq_total", tmp_path / "data", manual)


def test_no_tensorflow_imported(built):
    assert "tensorflow" not in sys.modules
