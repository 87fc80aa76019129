"""Inference prompts (shared with the training recipe) and answer extraction."""

import pytest

from jprag.eval.prompts import (
    ASSISTANT_PREFIX,
    COT_ASSISTANT_PREFIX,
    COT_FEWSHOT,
    DIRECT_FEWSHOT,
    REFERENCE_ASSISTANT_PREFIX,
    REFERENCE_COT_ASSISTANT_PREFIX,
    assistant_prefix,
    build_user_prompt,
    extract_answer,
    reference_extract_answer,
)
from jprag.train.recipe import format_fewshot, user_prompt

Q = "Which town was founded earlier, Ostrelby or Kelvaston"


# ----------------------------------------------------------------------------- prompts


def test_prefixes():
    assert REFERENCE_ASSISTANT_PREFIX == "The answer is "  # the reference encodes the space
    assert REFERENCE_COT_ASSISTANT_PREFIX == "Answer: "
    assert ASSISTANT_PREFIX == "The answer is"
    assert COT_ASSISTANT_PREFIX == "Answer:"
    assert assistant_prefix() == ASSISTANT_PREFIX
    assert assistant_prefix(cot=True) == COT_ASSISTANT_PREFIX
    assert assistant_prefix(reference=True) == REFERENCE_ASSISTANT_PREFIX
    assert assistant_prefix(True, reference=True) == REFERENCE_COT_ASSISTANT_PREFIX


def test_direct_prompt_is_the_training_prompt():
    assert build_user_prompt(Q) == user_prompt(Q)
    passages = ["Ostrelby was founded in 1312.", "Kelvaston was founded in 1268."]
    text = build_user_prompt(Q, passages)
    assert text == user_prompt(Q, passages)
    assert "Passage 1: Ostrelby was founded in 1312.\nPassage 2: Kelvaston" in text
    assert text.endswith("Question: " + Q + "?")


def test_cot_prompt_is_the_training_prompt():
    block = format_fewshot(COT_FEWSHOT)
    assert build_user_prompt(Q, cot=True, fewshot=COT_FEWSHOT) == user_prompt(Q, cot=True, fewshot=block)
    assert build_user_prompt(Q, cot=True, fewshot=block) == user_prompt(Q, cot=True, fewshot=block)
    assert build_user_prompt(Q, cot=True) == user_prompt(Q, cot=True)
    text = build_user_prompt(Q, ["P."], cot=True, fewshot=COT_FEWSHOT)
    assert "Question: Who was born first, Marie Curie or Albert Einstein?\nAnswer: " in text
    assert "Passage 1: P.\n" in text and "Let's think step by step" in text


def test_direct_fewshot_prepends_examples():
    text = build_user_prompt(Q, fewshot=DIRECT_FEWSHOT)
    assert text.startswith("Here are some examples about how to answer the questions.\n"
                           "Question: Which city is the capital of France?\nThe answer is Paris.\n\n")
    assert text.endswith(user_prompt(Q))


def test_fewshot_examples_extract_to_their_answers():
    assert [extract_answer(a, cot=True) for _, a in COT_FEWSHOT] == ["Germany", "Marie Curie", "yes"]
    for _, a in DIRECT_FEWSHOT:
        assert extract_answer(f" {a}.", cot=False) == a


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("generated, cot, expected", [
    # CoT: reasoning, then "So the answer is X."
    ("Teodor Vask was born in 1848. Ilse Marrow was born in 1851. So the answer is Teodor Vask.",
     True, "Teodor Vask"),
    # CoT: the *last* "answer is" wins, case-insensitive, with a colon
    ("The answer is not obvious. The Quellmar rises in the Tamsin Hills. So The Answer Is: Tamsin Hills.",
     True, "Tamsin Hills"),
    # CoT: a hallucinated next few-shot example is ignored
    ("Kelvaston was founded in 1268. Ostrelby was founded in 1312. So the answer is Kelvaston.\n\n"
     "Question: Who founded Quaystone Studios?\nAnswer: ... So the answer is Harriet Olberg.",
     True, "Kelvaston"),
    # CoT without the phrase: first sentence
    ("Ostrelby is the birthplace of Caspar Linnveld. He founded Brightholm.\nMore text",
     True, "Ostrelby is the birthplace of Caspar Linnveld"),
    # CoT yes/no
    ("Both rise in the Tamsin Hills. So the answer is yes.", True, "yes"),
    # direct: continuation after the "The answer is" prefix
    (" Kelvaston.", False, "Kelvaston"),
    # direct: the model repeats the prefix
    ("The answer is Kelvaston.", False, "Kelvaston"),
    ("I think the answer is Tessary.", False, "Tessary"),
    ('The answer to this question is: "Kelvaston"', False, "Kelvaston"),
    # direct, multi-line: the first line only (later "answer is" lines are ignored)
    ("Castrevane\n\nExplanation: Maren Dalby was born in Castrevane. The answer is Castrevane.", False, "Castrevane"),
    ("\n\nLake Morvaine.\nQuestion: Who designed the bridge?\nThe answer is Ansgar Tibbelund.", False, "Lake Morvaine"),
    # quotes, markdown and trailing punctuation
    ('"Millrace Hymn".', False, "Millrace Hymn"),
    ("'The Bride of Kessack'", False, "The Bride of Kessack"),
    ("**Lake Morvaine**", False, "Lake Morvaine"),
    ("“Patience makes the hand.”", False, "Patience makes the hand"),
    # first sentence / first clause
    ("Kelvaston, a town on the river Quellmar.", False, "Kelvaston"),
    ("Yes, both rivers rise there.", False, "Yes"),
    ("Skerrow Isle. It is about two kilometres long.", False, "Skerrow Isle"),
    # commas inside numbers and dates, abbreviations and decimals are kept
    ("1,146 metres above sea level.", False, "1,146 metres above sea level"),
    ("June 19, 2013.", False, "June 19, 2013"),
    ("St. Hallam's Cathedral. It was consecrated in 1220.", False, "St. Hallam's Cathedral"),
    ("3.5 kilometres", False, "3.5 kilometres"),
    # empty output
    ("", False, ""),
    ("   \n  ", True, ""),
    (None, False, ""),
])
def test_extract_answer(generated, cot, expected):
    assert extract_answer(generated, cot) == expected


def test_extract_answer_max_words():
    long = " ".join(f"w{i}" for i in range(40))
    assert extract_answer(long, False).split() == [f"w{i}" for i in range(16)]
    assert extract_answer(long, False, max_words=3) == "w0 w1 w2"
    assert extract_answer(long, False, max_words=None) == long


def test_reference_extract_answer():
    assert reference_extract_answer(" Kelvaston.\nMore", False) == "Kelvaston"
    assert reference_extract_answer("1,146 metres", False) == "1"  # the reference cuts at ","
    assert reference_extract_answer("A. So the answer is Ostrelby. Done", True) == "Ostrelby"
    # first, lowercase occurrence only
    assert reference_extract_answer("x the answer is A, and the answer is B.", True) == "A"
    assert reference_extract_answer("So The Answer Is B.", True) == "So The Answer Is B"
