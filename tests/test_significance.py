"""Paired bootstrap over questions (`jprag.eval.significance`), its results.md table and `jprag compare`."""

import json

import numpy as np
import pytest

from jprag.eval import significance as sig
from jprag.eval.significance import compare_to_baseline, comparison_table, paired_bootstrap, read_predictions
from jprag.pipeline import results_table, significance


def test_identical_scores_give_a_zero_interval():
    a = [0.0, 0.5, 1.0, 0.25]
    d = paired_bootstrap(a, a, resamples=500)
    assert (d.mean, d.low, d.high, d.wins, d.losses, d.n) == (0.0, 0.0, 0.0, 0, 0, 4)
    assert not d.significant


def test_a_constant_shift_is_recovered_exactly_and_is_significant():
    b = np.linspace(0.0, 0.8, 37)
    d = paired_bootstrap(b + 0.125, b, resamples=300)
    assert d.mean == pytest.approx(0.125) and d.low == pytest.approx(0.125) and d.high == pytest.approx(0.125)
    assert d.wins == 37 and d.losses == 0 and d.significant


def test_two_questions_by_hand():
    # d = [0, 1]: a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% percentiles are 0 and 1 and the interval contains 0 (not significant)
    d = paired_bootstrap([1.0, 1.0], [1.0, 0.0], resamples=4000)
    assert (d.mean, d.low, d.high, d.wins, d.losses) == (0.5, 0.0, 1.0, 1, 0)
    assert not d.significant


def test_interval_width_matches_the_normal_approximation():
    # for a mean of n i.i.d. differences the bootstrap CI is ≈ mean ± 1.96·sd/√n
    rng = np.random.default_rng(1)
    a, b = rng.random(400), rng.random(400)
    d = paired_bootstrap(a, b, resamples=20_000)
    se = np.std(a - b) / np.sqrt(400)
    assert d.high - d.low == pytest.approx(2 * 1.959964 * se, rel=0.06)
    assert d.low < d.mean < d.high


def test_pairing_removes_between_question_variance():
    # every question's difficulty is shared by both methods: the paired interval is far narrower
    # than the spread of either method's scores, and a small consistent gain is significant
    rng = np.random.default_rng(2)
    difficulty = rng.random(200)
    a = difficulty + 0.02 + 0.01 * rng.standard_normal(200)
    d = paired_bootstrap(a, difficulty, resamples=4000)
    assert d.significant and d.low > 0.015 and d.high < 0.025


def test_deterministic_in_the_seed_and_independent_of_the_block_size(monkeypatch):
    rng = np.random.default_rng(3)
    a, b = rng.random(50), rng.random(50)
    one = paired_bootstrap(a, b, resamples=1000, seed=7)
    assert paired_bootstrap(a, b, resamples=1000, seed=7) == one
    assert paired_bootstrap(a, b, resamples=1000, seed=8) != one
    monkeypatch.setattr(sig, "_BLOCK", 50 * 3)  # 3 resamples per block: 334 blocks
    assert paired_bootstrap(a, b, resamples=1000, seed=7) == one


@pytest.mark.parametrize("a, b, kw, match", [
    ([0.0, 1.0], [0.0], {}, "equal length"),
    ([], [], {}, "at least one"),
    ([float("nan")], [0.0], {}, "finite"),
    ([0.0], [0.0], {"level": 1.0}, "level"),
    ([0.0], [0.0], {"resamples": 0}, "resamples"),
])
def test_bad_input_is_a_clear_error(a, b, kw, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(a, b, **kw)


def test_compare_to_baseline_and_table():
    scores = {"vanilla": [0.0, 0.0, 1.0, 0.0], "prag": [1.0, 1.0, 1.0, 1.0], "rag": [0.0, 0.0, 1.0, 0.0]}
    diffs = compare_to_baseline(scores, "vanilla", resamples=200)
    assert list(diffs) == ["prag", "rag"]
    assert diffs["prag"].mean == 0.75 and diffs["prag"].significant and diffs["rag"].mean == 0.0
    table = comparison_table(diffs, "vanilla")
    assert "| prag | +0.750 * |" in table and "| rag | +0.000 |" in table
    with pytest.raises(ValueError, match="baseline method 'dyprag'"):
        compare_to_baseline(scores, "dyprag")


def _write_predictions(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_read_predictions_aligns_methods_by_question_id(tmp_path):
    p = tmp_path / "predictions.jsonl"
    _write_predictions(p, [
        {"method": "vanilla", "id": "q1", "f1": 0.0, "em": 0.0}, {"method": "vanilla", "id": "q2", "f1": 0.5, "em": 0.0},
        {"method": "prag", "id": "q2", "f1": 1.0, "em": 1.0}, {"method": "prag", "id": "q1", "f1": 0.25, "em": 0.0},
    ])
    assert read_predictions(p) == {"vanilla": [0.0, 0.5], "prag": [0.25, 1.0]}
    assert read_predictions(p, "em") == {"vanilla": [0.0, 0.0], "prag": [0.0, 1.0]}


@pytest.mark.parametrize("rows, match", [
    ([{"method": "vanilla", "id": "q1"}], r"predictions.jsonl:1: expected .*'f1'"),
    ([{"method": "a", "id": "q1", "f1": 1}, {"method": "a", "id": "q1", "f1": 0}], r":2: question 'q1' appears twice"),
    ([{"method": "a", "id": "q1", "f1": 1}, {"method": "b", "id": "q2", "f1": 0}], "different questions"),
])
def test_read_predictions_names_the_file_and_line(tmp_path, rows, match):
    p = tmp_path / "predictions.jsonl"
    _write_predictions(p, rows)
    with pytest.raises(ValueError, match=match):
        read_predictions(p)


def test_results_table_carries_the_comparison():
    by_type = {"bridge": {"em": 0.0, "f1": 0.5, "has_answer": 0.0, "n": 2}}
    methods = {m: {"em": 0.0, "f1": 0.5, "has_answer": 0.0, "n": 2, "by_type": by_type, "seconds": 1.0}
               for m in ("vanilla", "prag")}
    results = {"methods": methods, "significance": significance({"vanilla": [0.0, 1.0], "prag": [1.0, 1.0]},
                                                                "vanilla", resamples=100)}
    json.dumps(results)  # what results.json holds must serialise
    table = results_table(results)
    assert "| method | Δf1 vs vanilla | 95% CI |" in table and "| prag | +0.500 |" in table


def test_cli_compare(tmp_path):
    from jprag.cli.main import main

    _write_predictions(tmp_path / "predictions.jsonl", [
        {"method": m, "id": f"q{i}", "f1": float(m == "prag" or i % 2)} for m in ("vanilla", "prag") for i in range(6)
    ])
    assert main(["compare", str(tmp_path), "--resamples", "100"]) == 0
    assert main(["compare", str(tmp_path / "missing")]) == 2
