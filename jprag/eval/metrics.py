"""Answer scoring: exact match, token F1 and has-answer, per question and aggregated.

The definitions are those of the SQuAD v1.1 evaluation script, with the yes/no rule of the
official HotpotQA evaluation, as used by PRAG (``src/utils.py`` of github.com/oneal2000/PRAG):

* `normalize_answer`: lower-case, drop ASCII punctuation (``string.punctuation``), drop the
  articles ``a``/``an``/``the`` (whole words), collapse whitespace.
  ``"The  Halden-Viaduct!"`` -> ``"haldenviaduct"``; ``"1,146 metres"`` -> ``"1146 metres"``.
* `exact_match`: 1.0 if the normalised prediction equals any normalised alias, else 0.0.
* `f1`: token F1 between the normalised prediction and an alias (bag of tokens, multiset
  overlap), maximised over aliases: with ``common`` shared tokens, ``P = common / len(pred)``,
  ``R = common / len(gold)``, ``F1 = 2PR / (P + R)``, 0 when nothing is shared. If either side
  normalises to ``yes``, ``no`` or ``noanswer``, only an exact match counts (F1 1.0 or 0.0), so
  "no" never earns partial credit against "yes, no doubt".
* `has_answer`: 1.0 if some normalised alias occurs as a contiguous token sub-sequence of the
  normalised *full* model output (not the extracted answer): a lenient "did the model say it
  at all" measure. ``"It is in Kelvaston, I think."`` has the answer ``"Kelvaston"``; the
  token rule means ``"no"`` is not found inside ``"nothing"``.

Aliases may be one string or a sequence of strings; an empty alias list raises `ValueError`
(a question without a gold answer is a data error, not a zero). Aliases that normalise to the
empty string (e.g. ``"The"``) never match in `has_answer` and match only an equally empty
prediction in `exact_match`.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

__all__ = ["normalize_answer", "exact_match", "f1", "has_answer", "score"]

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_YES_NO = ("yes", "no", "noanswer")


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _aliases(aliases: str | Sequence[str]) -> list[str]:
    if isinstance(aliases, str):
        return [aliases]
    out = list(aliases)
    if not out:
        raise ValueError("no gold answer aliases given")
    for a in out:
        if not isinstance(a, str):
            raise TypeError(f"answer aliases must be strings, got {type(a).__name__}")
    return out


def exact_match(prediction: str, aliases: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised alias, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _aliases(aliases)))


def _f1_one(pred: str, gold: str) -> float:
    if (pred in _YES_NO or gold in _YES_NO) and pred != gold:
        return 0.0
    pred_toks, gold_toks = pred.split(), gold.split()
    common = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_toks)
    recall = common / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, aliases: str | Sequence[str]) -> float:
    """Token F1 of the prediction, maximised over aliases (HotpotQA yes/no rule included)."""
    pred = normalize_answer(prediction)
    return max(_f1_one(pred, normalize_answer(a)) for a in _aliases(aliases))


def _contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return n > 0 and any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def has_answer(output_text: str, aliases: str | Sequence[str]) -> float:
    """1.0 if a normalised alias is a contiguous token sub-sequence of the normalised output."""
    out = normalize_answer(output_text).split()
    return float(any(_contains(out, normalize_answer(a).split()) for a in _aliases(aliases)))


def _means(em: list[float], f: list[float], ha: list[float]) -> dict:
    n = len(em)
    mean = (lambda xs: sum(xs) / n) if n else (lambda xs: 0.0)
    return {"em": mean(em), "f1": mean(f), "has_answer": mean(ha), "n": n}


def score(
    predictions: Sequence[str],
    outputs: Sequence[str],
    answers: Sequence[str | Sequence[str]],
    types: Sequence[str],
) -> dict:
    """Mean EM / F1 (of the extracted `predictions`) and has-answer (of the full `outputs`).

    Returns ``{"em", "f1", "has_answer", "n", "by_type": {type: {"em", "f1", "has_answer",
    "n"}}}`` with means in [0, 1] (0.0 when there are no questions); ``by_type`` keeps the
    order in which types first appear. All four sequences must have the same length.
    """
    lengths = {len(predictions), len(outputs), len(answers), len(types)}
    if len(lengths) != 1:
        raise ValueError(
            f"predictions, outputs, answers and types must have the same length, got "
            f"{len(predictions)}, {len(outputs)}, {len(answers)}, {len(types)}"
        )
    per_type: dict[str, tuple[list[float], list[float], list[float]]] = {}
    all_em: list[float] = []
    all_f1: list[float] = []
    all_ha: list[float] = []
    for pred, out, gold, qtype in zip(predictions, outputs, answers, types):
        e, f, h = exact_match(pred, gold), f1(pred, gold), has_answer(out, gold)
        all_em.append(e)
        all_f1.append(f)
        all_ha.append(h)
        te, tf, th = per_type.setdefault(qtype, ([], [], []))
        te.append(e)
        tf.append(f)
        th.append(h)
    result = _means(all_em, all_f1, all_ha)
    result["by_type"] = {t: _means(*lists) for t, lists in per_type.items()}
    return result
