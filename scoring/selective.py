"""Selective grading: accept the grades the grader is sure of, send the rest to a person.

The confidence of an item grade ranks grades from surest to least sure; accepting the surest share
of them (the *coverage*) should keep the accepted part in close agreement with the teacher. The
coverage curve shows that trade; the review threshold is the confidence below which a grade
"needs review", chosen on validation data for the agreement (QWK) the user asks for and stored
with the adapter (``review.json``). Without one, a fixed threshold applies
(``scoring.distribution.REVIEW_THRESHOLD``). Grades compared with teacher anchors have a confidence
of their own kind (``scoring.distribution.item_confidence``), so they get a threshold of their own,
chosen on the validation items whose prompts showed anchors (``review.json``'s ``anchored``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from scoring.metrics import on_one_scale, point_metrics

REVIEW_FILE = "review.json"
# The agreement of the accepted grades that "needs review" is set for, unless the user says.
DEFAULT_TARGET_QWK = 0.8
COVERAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# A threshold is not chosen from fewer validation items than this: the accepted QWK would be noise.
MIN_ITEMS = 30


def _accepted_metrics(h: np.ndarray, p: np.ndarray, max_score: float, step: float) -> dict:
    m = point_metrics(h, p, max_score, step)
    return {"mae": round(m["mae"], 4), "pearson_r": None if m["pearson_r"] is None else round(m["pearson_r"], 4),
            "qwk": None if m["qwk"] is None else round(m["qwk"], 4)}


def coverage_curve(human: Sequence[float], pred: Sequence[float], conf: Sequence[float | None],
                   maxes: Sequence[float], coverages: Sequence[float] = COVERAGES) -> list[dict]:
    """For each coverage c: the agreement of the ceil(c * n) surest grades (ties kept in order),
    and the confidence of the least sure grade accepted (the threshold that gives that coverage).
    Grades without a confidence count as the least sure."""
    h, p, max_score, step, _ = on_one_scale(human, pred, maxes)
    c = np.array([-1.0 if x is None else float(x) for x in conf])
    order = np.argsort(-c, kind="stable")
    out = []
    for cov in coverages:
        n = max(1, math.ceil(cov * len(order)))
        keep = order[:n]
        out.append({"coverage": round(n / len(order), 4), "n": int(n), "threshold": float(c[keep[-1]]),
                    **_accepted_metrics(h[keep], p[keep], max_score, step)})
    return out


def choose_threshold(human: Sequence[float], pred: Sequence[float], conf: Sequence[float | None],
                     maxes: Sequence[float], target_qwk: float = DEFAULT_TARGET_QWK) -> dict:
    """The lowest confidence threshold whose accepted grades (confidence >= threshold) agree with
    the humans at QWK >= ``target_qwk``, i.e. the most grades accepted at that agreement, with the
    coverage and QWK it gave. No threshold meets the target: the threshold accepts nothing (every
    grade needs review) and ``met`` is False."""
    h, p, max_score, step, _ = on_one_scale(human, pred, maxes)
    c = np.array([-1.0 if x is None else float(x) for x in conf])
    order = np.argsort(-c, kind="stable")
    best = {"threshold": 1.01, "coverage": 0.0, "qwk": None, "met": False}
    if len(order) < MIN_ITEMS:
        return {**best, "n": int(len(order)), "target_qwk": target_qwk,
                "why": f"only {len(order)} validation items (a threshold needs {MIN_ITEMS})"}
    # Candidate cut points: where the confidence changes, at most ~200 of them.
    cuts = [n for n in range(MIN_ITEMS // 3, len(order) + 1)
            if n == len(order) or c[order[n - 1]] != c[order[n]]]
    if len(cuts) > 200:
        cuts = sorted(set(cuts[:: max(1, len(cuts) // 200)]) | {cuts[-1]})
    for n in cuts:
        keep = order[:n]
        qwk = _accepted_metrics(h[keep], p[keep], max_score, step)["qwk"]
        if qwk is not None and qwk >= target_qwk:
            best = {"threshold": float(c[keep[-1]]), "coverage": round(n / len(order), 4), "qwk": qwk,
                    "met": True}
    return {**best, "n": int(len(order)), "target_qwk": target_qwk}


def save_review(folder: str | Path, choice: dict, curve: list[dict], anchored: tuple[dict, list[dict]] | None = None) -> Path:
    """The threshold and curve for grades without anchors, and ``anchored``'s (threshold, curve)
    for grades compared with teacher anchors."""
    path = Path(folder) / REVIEW_FILE
    data = {**choice, "curve": curve}
    if anchored is not None:
        data["anchored"] = {**anchored[0], "curve": anchored[1]}
    path.write_text(json.dumps(data, indent=1))
    return path


def review_thresholds(review: dict | None) -> tuple[float | None, float | None]:
    """(threshold for grades without anchors, threshold for grades compared with anchors) from a
    stored review (:func:`load_review`); None where none was chosen."""
    if not review:
        return None, None
    anchored = review.get("anchored")
    return review["threshold"], (anchored["threshold"] if isinstance(anchored, dict)
                                 and isinstance(anchored.get("threshold"), (int, float)) else None)


def load_review(adapter_dir: str | Path | None) -> dict | None:
    """The review threshold stored with an adapter (chosen on its validation data), or None."""
    if adapter_dir is None:
        return None
    path = Path(adapter_dir) / REVIEW_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("threshold"), (int, float)) else None
