"""Agreement between predicted and human scores: MAE, RMSE, Pearson r, quadratic weighted kappa,
exact and within-1 agreement, each with a bootstrap 95% interval.

Scores live on a scale: 0..max_score in steps of ``step`` (Mohler: 0..5 in halves). Kappa and the
agreement rates compare scores rounded to that scale; MAE, RMSE and r use the raw predictions.
"Within 1" means within one score point (not one scale step).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

METRICS = ("mae", "rmse", "pearson_r", "qwk", "exact", "within_1")


def infer_step(scores: Sequence[float], max_score: float) -> float:
    """The coarsest step in {1, 0.5, 0.25, 0.1} that every score (and the maximum) sits on."""
    values = list(scores) + [max_score]
    for step in (1.0, 0.5, 0.25, 0.1):
        if all(abs(v / step - round(v / step)) < 1e-6 for v in values):
            return step
    return 0.1


def round_to_scale(x: Sequence[float] | np.ndarray, max_score: float, step: float) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    return np.clip(np.round(arr / step) * step, 0.0, max_score)


def mae(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(np.abs(p - y)))


def rmse(y: np.ndarray, p: np.ndarray) -> float:
    return float(math.sqrt(np.mean((p - y) ** 2)))


def pearson_r(y: np.ndarray, p: np.ndarray) -> float | None:
    """None when either side is constant (r is undefined)."""
    # ptp, not std: a constant like 4.2638 repeated has a std of ~1e-16 from rounding.
    if len(y) < 2 or np.ptp(y) == 0 or np.ptp(p) == 0:
        return None
    return float(np.corrcoef(y, p)[0, 1])


def quadratic_weighted_kappa(y_cat: np.ndarray, p_cat: np.ndarray, n_categories: int) -> float | None:
    """Cohen's kappa with weights (i-j)^2/(K-1)^2 over integer categories 0..K-1.

    1 is perfect agreement, 0 chance level (a constant predictor scores 0). None when the expected
    disagreement is 0 (both sides constant and equal).
    """
    k = n_categories
    if k < 2 or len(y_cat) == 0:
        return None
    observed = np.zeros((k, k))
    np.add.at(observed, (np.asarray(y_cat, dtype=int), np.asarray(p_cat, dtype=int)), 1)
    observed /= observed.sum()
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    idx = np.arange(k)
    weights = (idx[:, None] - idx[None, :]) ** 2 / (k - 1) ** 2
    den = float((weights * expected).sum())
    if den == 0:
        return None
    return float(1.0 - (weights * observed).sum() / den)


def point_metrics(y_true: Sequence[float], y_pred: Sequence[float], max_score: float, step: float) -> dict:
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(y_pred, dtype=float)
    yr = round_to_scale(y, max_score, step)
    pr = round_to_scale(p, max_score, step)
    n_cat = int(round(max_score / step)) + 1
    return {
        "mae": mae(y, p),
        "rmse": rmse(y, p),
        "pearson_r": pearson_r(y, p),
        "qwk": quadratic_weighted_kappa(np.round(yr / step), np.round(pr / step), n_cat),
        "exact": float(np.mean(np.abs(pr - yr) < 1e-9)),
        "within_1": float(np.mean(np.abs(pr - yr) <= 1.0 + 1e-9)),
    }


def compute_metrics(
    y_true: Sequence[float],
    y_pred: Sequence[float],
    max_score: float,
    step: float | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Every metric as {"value", "ci_low", "ci_high"} plus n, max_score and step.

    The interval is the percentile bootstrap over examples (resampled with replacement, fixed seed
    so reports are reproducible). A metric that is undefined (r of a constant) is None.
    """
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(y_pred, dtype=float)
    if y.shape != p.shape:
        raise ValueError(f"{len(y)} human scores but {len(p)} predictions")
    if step is None:
        step = infer_step(y.tolist(), max_score)
    point = point_metrics(y, p, max_score, step)
    out: dict = {"n": int(len(y)), "max_score": float(max_score), "step": float(step)}
    boots: dict[str, list[float]] = {m: [] for m in METRICS}
    if len(y) >= 2 and n_boot > 0:
        rng = np.random.default_rng(seed)
        for _ in range(n_boot):
            idx = rng.integers(0, len(y), len(y))
            m = point_metrics(y[idx], p[idx], max_score, step)
            for k in METRICS:
                if m[k] is not None:
                    boots[k].append(m[k])
    for k in METRICS:
        vals = boots[k]
        lo = hi = None
        if point[k] is not None and len(vals) >= max(10, n_boot // 2):
            lo, hi = (float(v) for v in np.percentile(vals, [2.5, 97.5]))
        out[k] = {"value": point[k], "ci_low": lo, "ci_high": hi}
    return out


def format_table(rows: dict[str, dict], title: str = "") -> str:
    """A Markdown table, one row per predictor: value [low, high] per metric."""

    def cell(m: dict) -> str:
        v = m["value"]
        if v is None:
            return "n/a"
        if m["ci_low"] is None:
            return f"{v:.3f}"
        return f"{v:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"

    lines = []
    if title:
        lines.append(f"**{title}**\n")
    lines.append("| predictor | n | " + " | ".join(METRICS) + " |")
    lines.append("|---|---|" + "---|" * len(METRICS))
    for name, res in rows.items():
        lines.append(f"| {name} | {res['n']} | " + " | ".join(cell(res[k]) for k in METRICS) + " |")
    return "\n".join(lines)
