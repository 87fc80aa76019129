"""Is method A better than method B on these questions? Paired bootstrap over questions.

Methods are compared on the *same* questions, so the right unit is the per-question difference
``d_i = score_A(q_i) - score_B(q_i)``: resampling the questions with replacement and re-taking
the mean of ``d`` gives the sampling distribution of the mean difference, whose percentiles are
the confidence interval (Efron & Tibshirani's percentile bootstrap; Koehn 2004 for NLP). The
pairing removes the between-question variance that an unpaired comparison of two means would
carry (on multi-hop QA most of it: a question is hard for every method or for none).

Randomness comes only from `seed`; the same inputs always give the same interval.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Mapping, Sequence

import numpy as np

METRICS = ("em", "f1", "has_answer")
_BLOCK = 1 << 22  # resampled indices held at once (~32 MiB of int64), whatever the question count


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """mean(a - b) over paired questions, its bootstrap CI, and how often a beats / trails b."""

    mean: float
    low: float
    high: float
    level: float
    wins: int  # questions where a scores higher than b
    losses: int  # ... lower
    n: int
    resamples: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (at `level`)."""
        return self.low > 0.0 or self.high < 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    *,
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Percentile bootstrap CI of mean(a - b), `a[i]` and `b[i]` being two methods' scores on
    question i. Memory is bounded (resamples are drawn in blocks), so it scales to any n."""
    a_n = np.asarray(a, np.float64)
    b_n = np.asarray(b, np.float64)
    if a_n.ndim != 1 or a_n.shape != b_n.shape:
        raise ValueError(f"paired scores need two 1-D sequences of equal length, got shapes {a_n.shape} and {b_n.shape}")
    if a_n.size == 0:
        raise ValueError("paired bootstrap needs at least one question")
    if not np.all(np.isfinite(a_n)) or not np.all(np.isfinite(b_n)):
        raise ValueError("paired scores must be finite")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d_n = a_n - b_n  # [questions]
    n = d_n.size
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)  # [resamples]
    per_block = max(1, _BLOCK // n)
    for start in range(0, resamples, per_block):
        stop = min(resamples, start + per_block)
        idx_rn = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = d_n[idx_rn].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return PairedDifference(
        mean=float(d_n.mean()), low=float(low), high=float(high), level=level,
        wins=int(np.sum(d_n > 0)), losses=int(np.sum(d_n < 0)), n=n, resamples=resamples,
    )


def compare_to_baseline(
    scores: Mapping[str, Sequence[float]],
    baseline: str,
    *,
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, PairedDifference]:
    """`paired_bootstrap(scores[m], scores[baseline])` for every other method m (same question
    order in every list). Each comparison uses the same `seed`, hence the same resampled
    question sets, so the intervals of different methods are directly comparable."""
    if baseline not in scores:
        raise ValueError(f"baseline method {baseline!r} is not among the scored methods {sorted(scores)}")
    ref = scores[baseline]
    return {
        m: paired_bootstrap(s, ref, resamples=resamples, level=level, seed=seed)
        for m, s in scores.items() if m != baseline
    }


def comparison_table(diffs: Mapping[str, PairedDifference], baseline: str, metric: str = "f1") -> str:
    """Markdown table of `compare_to_baseline`'s result."""
    if not diffs:
        return ""
    level = next(iter(diffs.values())).level
    rows = [
        f"| method | Δ{metric} vs {baseline} | {level:.0%} CI | better | worse | n |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m, d in diffs.items():
        mark = " *" if d.significant else ""
        rows.append(f"| {m} | {d.mean:+.3f}{mark} | {d.low:+.3f} … {d.high:+.3f} | {d.wins} | {d.losses} | {d.n} |")
    return "\n".join(rows)


def read_predictions(path: str | pathlib.Path, metric: str = "f1") -> dict[str, list[float]]:
    """Per-method scores from a run's `predictions.jsonl` (one line per method and question), in
    one question order for every method. Raises ValueError naming the file and line when a line
    is malformed, and when the methods were not scored on the same questions."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictions file (a `jprag run` / `jprag eval` output directory has one)")
    by_method: dict[str, dict[str, float]] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                method, qid, value = rec["method"], str(rec["id"]), float(rec[metric])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with 'method', 'id' and a numeric "
                                 f"{metric!r} ({type(e).__name__}: {e})") from None
            scores = by_method.setdefault(method, {})
            if qid in scores:
                raise ValueError(f"{path}:{n}: question {qid!r} appears twice for method {method!r}")
            scores[qid] = value
    if not by_method:
        raise ValueError(f"{path}: no predictions")
    first, *rest = by_method
    ids = list(by_method[first])
    for m in rest:
        if set(by_method[m]) != set(ids):
            missing = sorted(set(ids) ^ set(by_method[m]))
            raise ValueError(f"{path}: methods {first!r} and {m!r} were scored on different questions "
                             f"({len(missing)} differ, e.g. {missing[0]!r}); a paired comparison needs the same ones")
    return {m: [s[q] for q in ids] for m, s in by_method.items()}
