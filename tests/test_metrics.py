"""EM / F1 / has-answer on hand-computed cases."""

import pytest

from jprag.eval.metrics import exact_match, f1, has_answer, normalize_answer, score


def test_normalize_answer():
    assert normalize_answer("The  Halden-Viaduct!") == "haldenviaduct"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("  St Hallam's\tCathedral. ") == "st hallams cathedral"
    assert normalize_answer("1,146 metres") == "1146 metres"
    assert normalize_answer("Theodore") == "theodore"  # articles only as whole words
    assert normalize_answer("") == ""


def test_exact_match_articles_punctuation_case():
    assert exact_match("the Kelvaston.", ["Kelvaston"]) == 1.0
    assert exact_match("KELVASTON", "kelvaston") == 1.0  # a plain string alias is accepted
    assert exact_match("1146 metres", ["1,146 metres"]) == 1.0
    assert exact_match("Kelvaston town", ["Kelvaston"]) == 0.0
    assert exact_match("", ["Kelvaston"]) == 0.0


def test_exact_match_multiple_aliases():
    assert exact_match("Vask", ["Teodor Vask", "Vask"]) == 1.0
    assert exact_match("Teodor", ["Teodor Vask", "Vask"]) == 0.0


def test_f1_exact_and_disjoint():
    assert f1("The Sillet.", ["Sillet"]) == 1.0
    assert f1("Ostrelby", ["Kelvaston"]) == 0.0
    assert f1("", ["Kelvaston"]) == 0.0


def test_f1_partial_overlap():
    # pred "teodor vask painter" (3 tokens), gold "teodor vask" (2): common = 2
    # P = 2/3, R = 2/2 = 1, F1 = 2PR/(P+R) = (4/3)/(5/3) = 0.8
    assert f1("Teodor Vask the painter", ["Teodor Vask"]) == pytest.approx(0.8)
    # pred "lake morvaine island" (3), gold "skerrow isle in lake morvaine" (5): common = 2
    # P = 2/3, R = 2/5, F1 = 2 * (4/15) / (16/15) = 0.5
    assert f1("Lake Morvaine island", "Skerrow Isle in Lake Morvaine") == pytest.approx(0.5)


def test_f1_max_over_aliases():
    # "orsolya" vs "lady orsolya drennick": P = 1, R = 1/3 -> F1 = (2/3)/(4/3) = 0.5
    # "orsolya" vs "orsolya drennick":      P = 1, R = 1/2 -> F1 = 1/1.5 = 2/3  (the max)
    assert f1("Orsolya", ["Lady Orsolya Drennick", "Orsolya Drennick"]) == pytest.approx(2 / 3)


def test_f1_repeated_tokens_use_multiset_overlap():
    # "sillet sillet" vs "sillet": common = min(2, 1) = 1; P = 1/2, R = 1 -> F1 = 1/1.5 = 2/3
    assert f1("the Sillet Sillet", ["Sillet"]) == pytest.approx(2 / 3)


def test_f1_yes_no_requires_exact_match():
    assert f1("Yes.", ["yes"]) == 1.0
    assert f1("no", ["no"]) == 1.0
    # without the HotpotQA rule these would be 2/3 (P = 1/2, R = 1)
    assert f1("no way", ["no"]) == 0.0
    assert f1("yes", ["yes sir"]) == 0.0
    assert f1("no", ["yes"]) == 0.0
    # a yes/no alias does not block partial credit from another alias
    assert f1("no Kelvaston", ["yes", "Kelvaston"]) == pytest.approx(2 / 3)
    assert exact_match("No", ["no"]) == 1.0


def test_has_answer():
    assert has_answer("The river Quellmar rises at Brannock Spring.", ["brannock spring"]) == 1.0
    assert has_answer("I think the answer is no.", "no") == 1.0
    assert has_answer("nothing to say", ["no"]) == 0.0  # whole tokens only
    assert has_answer("Brannock, then Spring", ["Brannock Spring"]) == 0.0  # contiguous only
    assert has_answer("Kelvaston", ["Ostrelby", "Castrevane"]) == 0.0
    assert has_answer("It is 1146 metres high", ["1,146 metres"]) == 1.0
    assert has_answer("the", ["The"]) == 0.0  # an alias that normalises to nothing never matches
    assert has_answer("", ["Kelvaston"]) == 0.0


def test_empty_alias_list_is_an_error():
    with pytest.raises(ValueError):
        exact_match("x", [])
    with pytest.raises(ValueError):
        f1("x", ())
    with pytest.raises(ValueError):
        has_answer("x", [])


def test_score_aggregates_overall_and_by_type():
    predictions = ["Kelvaston", "Teodor Vask the painter", "yes", "Ostrelby"]
    outputs = ["Kelvaston.", "Teodor Vask the painter.", "Yes, both do.", "It was founded by Perrin Haldwick."]
    answers = [["Kelvaston"], "Teodor Vask", ["yes"], ["Perrin Haldwick", "Haldwick"]]
    types = ["bridge", "single", "comparison", "bridge"]
    r = score(predictions, outputs, answers, types)
    # EM 1, 0, 1, 0; F1 1, 0.8, 1, 0; has_answer 1, 1, 1, 1
    assert r["n"] == 4
    assert r["em"] == pytest.approx(0.5)
    assert r["f1"] == pytest.approx(2.8 / 4)
    assert r["has_answer"] == pytest.approx(1.0)
    assert list(r["by_type"]) == ["bridge", "single", "comparison"]  # first-seen order
    assert r["by_type"]["bridge"] == pytest.approx({"em": 0.5, "f1": 0.5, "has_answer": 1.0, "n": 2})
    assert r["by_type"]["single"] == pytest.approx({"em": 0.0, "f1": 0.8, "has_answer": 1.0, "n": 1})
    assert r["by_type"]["comparison"] == pytest.approx({"em": 1.0, "f1": 1.0, "has_answer": 1.0, "n": 1})
    for block in [r, *r["by_type"].values()]:
        for key in ("em", "f1", "has_answer"):
            assert 0.0 <= block[key] <= 1.0


def test_score_empty_and_mismatched_lengths():
    assert score([], [], [], []) == {"em": 0.0, "f1": 0.0, "has_answer": 0.0, "n": 0, "by_type": {}}
    with pytest.raises(ValueError, match="same length"):
        score(["a"], ["a"], [["a"]], [])
