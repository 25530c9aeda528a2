"""Reading a score from the model's distribution: the expected score and how sure the model is.

One home for both, used by the trainer's validation, the grading engine, the CLI, the CSV and the
Grade tab.
"""
from __future__ import annotations

import math
from typing import Sequence

# Questions whose confidence is below this are flagged "needs review" (CLI, CSV, Grade tab), unless
# the adapter carries a threshold chosen on its validation data (scoring.selective).
REVIEW_THRESHOLD = 0.5


def expected_score(probs: Sequence[float]) -> float:
    """Mean of the distribution over the scores 0, 1, ..., len(probs) - 1."""
    total = sum(probs)
    return sum(v * p for v, p in enumerate(probs)) / total if total > 0 else 0.0


def confidence(probs: Sequence[float]) -> float:
    """1 - (standard deviation of the score distribution / its largest possible value, max/2).

    1 when all the probability sits on one score; 0 when it is split between 0 and max; about
    0.7 for an even split between two neighbouring scores out of 5. Unlike the top probability it
    does not punish hesitation between neighbours, which is how human graders disagree too.
    """
    n = len(probs) - 1
    if n <= 0:
        return 1.0
    mean = expected_score(probs)
    total = sum(probs) or 1.0
    var = sum(p * (v - mean) ** 2 for v, p in enumerate(probs)) / total
    return round(max(0.0, 1.0 - math.sqrt(var) / (n / 2)), 4)


def item_confidence(probs: Sequence[float], neighbour: float | None = None, similarity: float | None = None,
                    grade: float | None = None) -> float:
    """How sure an item grade is. Without teacher anchors: :func:`confidence` of its distribution.
    Where anchors of the question were compared (``neighbour``: the score the nearest suggest,
    ``data.anchors.neighbour_score``; ``similarity``: the nearest anchor's, 0..1): how close the
    grade (``grade``, default the expected score) lies to that score, 1 - |g - n| / max, squared,
    times the similarity. A grade the teacher's similar answers contradict is not sure, nor one
    for an answer unlike any the teacher graded, however peaked the distribution: on new
    questions this ranks wrong grades below right ones better than the distribution's spread
    (BENCHMARKS.md, "Which grades to check")."""
    n = len(probs) - 1
    if neighbour is None or n <= 0:
        return confidence(probs)
    g = expected_score(probs) if grade is None else grade
    agree = max(0.0, 1.0 - abs(g - neighbour) / n)
    return round(agree * agree * (1.0 if similarity is None else max(0.0, min(1.0, similarity))), 4)


def needs_review(conf: float | None, threshold: float = REVIEW_THRESHOLD) -> bool:
    """True when a question's grade should be checked by a person."""
    return conf is not None and conf < threshold
