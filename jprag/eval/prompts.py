"""Inference prompts in the published PRAG style, and answer extraction from generations.

The prompt text is the training recipe's (`jprag.train.recipe.user_prompt`), so that a
document's adapter is queried with exactly the instruction it was trained on:

* direct: the user turn is ``USER_PROMPT`` (instruction, ``Passage i: ...`` lines when
  passages are given, ``Question: ...``) and the assistant turn is pre-filled with
  `ASSISTANT_PREFIX` ("The answer is"); the model continues with the answer.
* chain of thought (CoT): ``USER_PROMPT_WITH_COT`` with a few-shot block of
  ``Question: ...\\nAnswer: <reasoning>. So the answer is X.`` examples, the assistant turn
  pre-filled with `COT_ASSISTANT_PREFIX` ("Answer:").

Assistant prefixes: the reference (``get_prompt`` in ``src/prompt_template.py`` of
github.com/oneal2000/PRAG) appends ``tokenizer.encode("The answer is ")`` -- *with* a trailing
space -- after the chat template. With BPE tokenizers that space becomes a lone token (SmolLM2:
``['The', 'Ġanswer', 'Ġis', 'Ġ']``) that never occurs in the training sequences, where the
answer's first token carries its own space (``'ĠKel'``). `ASSISTANT_PREFIX` /
`COT_ASSISTANT_PREFIX` are therefore the prefixes *without* the trailing space; the exact
reference strings are `REFERENCE_ASSISTANT_PREFIX` / `REFERENCE_COT_ASSISTANT_PREFIX`, and
``assistant_prefix(cot, reference=True)`` returns them.

Few-shot: CoT prompts take a few-shot block (the reference reads it from
``src/fewshot/<dataset>.json``; `COT_FEWSHOT` is a small generic set written for jprag about
real-world facts, so it cannot leak answers of the bundled sample). The reference's direct
prompt has no few-shot slot; as a jprag extension, `build_user_prompt` with ``cot=False`` and
examples prepends ``"Here are some examples ...\\n"`` and ``Question: q\\nThe answer is a.``
blocks to the unchanged reference prompt. With ``fewshot=()`` (the default) both prompts are
byte-identical to the reference / training prompts.

Answer extraction (`extract_answer`) is documented rule by rule in its docstring;
`reference_extract_answer` reproduces the reference's own post-processing (``evaluate`` in
``src/utils.py``) for numbers comparable with published tables.
"""

from __future__ import annotations

import re
from typing import Sequence

from jprag.train.recipe import assistant_text, format_fewshot, normalize_question, user_prompt

__all__ = [
    "ASSISTANT_PREFIX", "COT_ASSISTANT_PREFIX", "REFERENCE_ASSISTANT_PREFIX",
    "REFERENCE_COT_ASSISTANT_PREFIX", "DIRECT_FEWSHOT", "COT_FEWSHOT", "assistant_prefix",
    "format_direct_fewshot", "build_user_prompt", "extract_answer", "reference_extract_answer",
]

REFERENCE_ASSISTANT_PREFIX = assistant_text()  # "The answer is " (the reference, trailing space)
REFERENCE_COT_ASSISTANT_PREFIX = assistant_text(cot=True)  # "Answer: "
ASSISTANT_PREFIX = REFERENCE_ASSISTANT_PREFIX.rstrip()  # "The answer is"
COT_ASSISTANT_PREFIX = REFERENCE_COT_ASSISTANT_PREFIX.rstrip()  # "Answer:"

# (question, short answer): examples of the direct answer format.
DIRECT_FEWSHOT: tuple[tuple[str, str], ...] = (
    ("Which city is the capital of France?", "Paris"),
    ("Who wrote the play Hamlet?", "William Shakespeare"),
    ("Which was founded first, Harvard University or Yale University?", "Harvard University"),
)

# (question, reasoning ending in "So the answer is X."): bridge, comparison and yes/no examples.
COT_FEWSHOT: tuple[tuple[str, str], ...] = (
    ("In which country is the city where Ludwig van Beethoven was born?",
     "Ludwig van Beethoven was born in Bonn. Bonn is a city in Germany. So the answer is Germany."),
    ("Who was born first, Marie Curie or Albert Einstein?",
     "Marie Curie was born in 1867. Albert Einstein was born in 1879. So the answer is Marie Curie."),
    ("Do the Danube and the Rhine both flow through Germany?",
     "The Danube flows through Germany. The Rhine flows through Germany. So the answer is yes."),
)

_DIRECT_FEWSHOT_HEADER = "Here are some examples about how to answer the questions.\n"


def assistant_prefix(cot: bool = False, *, reference: bool = False) -> str:
    """The text pre-filled in the assistant turn (see the module docstring on the space)."""
    if reference:
        return REFERENCE_COT_ASSISTANT_PREFIX if cot else REFERENCE_ASSISTANT_PREFIX
    return COT_ASSISTANT_PREFIX if cot else ASSISTANT_PREFIX


def format_direct_fewshot(examples: Sequence[tuple[str, str]]) -> str:
    """Direct-answer examples: ``"Question: q?\\nThe answer is a.\\n\\n"`` each."""
    return "".join(f"Question: {normalize_question(q)}\n{assistant_text(a)}\n\n" for q, a in examples)


def build_user_prompt(
    question: str,
    passages: Sequence[str] | None = None,
    cot: bool = False,
    fewshot: str | Sequence[tuple[str, str]] = (),
) -> str:
    """The user turn of an inference prompt.

    `passages` are pasted as ``Passage i: ...`` lines (standard RAG); PRAG proper passes none
    (the knowledge is in the adapters). `fewshot` is either a preformatted block (a string, as
    `jprag.train.recipe.RecipeConfig.fewshot`) or ``(question, answer)`` pairs, e.g.
    `COT_FEWSHOT` / `DIRECT_FEWSHOT`; empty by default.
    """
    if cot:
        block = fewshot if isinstance(fewshot, str) else format_fewshot(fewshot)
        return user_prompt(question, passages, cot=True, fewshot=block)
    block = fewshot if isinstance(fewshot, str) else format_direct_fewshot(fewshot)
    prompt = user_prompt(question, passages)
    return f"{_DIRECT_FEWSHOT_HEADER}{block}{prompt}" if block else prompt


# ----------------------------------------------------------------------------- extraction

_NEXT_QUESTION = re.compile(r"\n\s*Question\s*:")
_ANSWER_IS = re.compile(r"answer(?:\s+to\s+(?:this|the)\s+question)?\s+is\b", re.IGNORECASE)
_LEADING_LABEL = re.compile(r"^(?:the\s+(?:final\s+)?answer\s+is\b|(?:final\s+)?answer\s*:)\s*:?\s*",
                            re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?](?=[\"'”’)]*(?:\s|$))")
_ABBREVIATIONS = frozenset(
    "st mt mr mrs ms dr jr sr no co ltd inc vs etc ft gen col capt prof rev fr".split())
_COMMA_CUT = re.compile(r",\s")
_QUOTES = "\"'“”‘’`*"
_TRAILING = ".,;:!"


def _first_sentence(text: str) -> str:
    for m in _SENTENCE_END.finditer(text):
        words = text[: m.start()].split()
        last = words[-1] if words else ""
        if m.group() == "." and (len(last) == 1 and last.isalpha() or last.lower() in _ABBREVIATIONS):
            continue  # an initial ("J. Smith") or abbreviation ("St. Hallam's"), not a sentence end
        return text[: m.start()]
    return text


def _cut_comma(text: str) -> str:
    for m in _COMMA_CUT.finditer(text):
        before, after = text[: m.start()], text[m.end():]
        if before[-1:].isdigit() and after[:1].isdigit():
            continue  # "June 19, 2013"
        return before
    return text


def _strip_wrapping(text: str) -> str:
    prev = None
    while text != prev:
        prev = text
        text = _LEADING_LABEL.sub("", text.strip())
        text = text.strip().lstrip(":-–— ").rstrip(_TRAILING).strip().strip(_QUOTES).strip()
    return text


def extract_answer(generated: str, cot: bool, *, max_words: int | None = 16) -> str:
    """The short answer in a generation (the text after the assistant prefix).

    Rules, in order:

    0. Drop everything from a line starting with ``Question:`` on (the model starting a new
       few-shot example): ``"... So the answer is Kelvaston.\n\nQuestion: Who ...?\nAnswer:
       ... So the answer is Bob."`` -> ``"Kelvaston"``.
    1. CoT: keep the text after the *last* "answer is" (case-insensitive; also "answer to
       this/the question is"), so the reasoning
       before "So the answer is" is dropped; without that phrase keep the whole text.
       ``"Ilse Marrow was born in Kelvaston. So the answer is Kelvaston."`` -> ``"Kelvaston"``.
       Direct: keep the first non-empty line, and if *that line* says "answer is", the text
       after its last occurrence (later lines are usually a hallucinated next question).
       ``"Kelvaston.\\nQuestion: Who ...? The answer is X."`` -> ``"Kelvaston"``.
    2. Cut at the first newline: ``"Castrevane\\n\\nExplanation: ..."`` -> ``"Castrevane"``.
    3. Drop a leading label "The answer is" / "Answer:" (repeated, with a colon):
       ``"The answer is: Ostrelby"`` -> ``"Ostrelby"``.
    4. Keep the first sentence: cut at the first ``.``, ``!`` or ``?`` followed by a space or
       the end, except after an initial or a common abbreviation (St, Mt, Dr, Mr, ...):
       ``"St. Hallam's Cathedral. It was built in 1220."`` -> ``"St. Hallam's Cathedral"``; no
       cut inside numbers (``"3.5 km"``).
    5. Cut at the first comma followed by a space, except between digits:
       ``"Kelvaston, a town on the Quellmar"`` -> ``"Kelvaston"``,
       ``"June 19, 2013"`` stays, ``"1,146 metres"`` stays.
    6. Strip surrounding quotes, backticks and ``*`` and trailing ``. , ; : !``:
       ``'"Millrace Hymn".'`` -> ``"Millrace Hymn"``.
    7. Keep at most `max_words` words (None: no limit) so a runaway generation cannot earn
       inflated F1 recall.

    Empty or whitespace-only output gives ``""``.

    Differences from the reference's post-processing (`reference_extract_answer`): it cuts at
    the first ``.``, ``,`` or newline anywhere (so ``"1,146 metres"`` -> ``"1"``,
    ``"St. Hallam's"`` -> ``"St"``), looks for the *first* lowercase "the answer is" in CoT
    output, and keeps a leading "The answer is" in direct output.
    """
    text = _NEXT_QUESTION.split((generated or "").strip(), maxsplit=1)[0].strip()
    if cot:
        matches = list(_ANSWER_IS.finditer(text))
        if matches:
            text = text[matches[-1].end():]
        text = text.strip().split("\n", 1)[0]
    else:
        text = text.split("\n", 1)[0]
        matches = list(_ANSWER_IS.finditer(text))
        if matches:
            text = text[matches[-1].end():]
    text = _strip_wrapping(text)
    text = _first_sentence(text)
    text = _cut_comma(text)
    text = _strip_wrapping(text)
    if max_words is not None:
        text = " ".join(text.split()[:max_words])
    return text


def reference_extract_answer(generated: str, cot: bool) -> str:
    """The reference's post-processing (``evaluate`` in PRAG ``src/utils.py``), verbatim:
    CoT keeps the text after the first lowercase "the answer is"; both modes then cut at the
    first ``.``, then newline, then ``,``."""
    pred = generated
    if cot and "the answer is" in pred:
        pred = pred[pred.find("the answer is") + len("the answer is"):]
    pred = pred.strip()
    for stop in (".", "\n", ","):
        end = pred.find(stop)
        if end != -1:
            pred = pred[:end].strip()
    return pred
