"""Agreement between predicted and human scores: MAE, RMSE, Pearson r, quadratic weighted kappa,
exact and within-1 agreement, each with a bootstrap 95% interval.

Scores live on a scale: 0..max_score in steps of ``step`` (Mohler: 0..5 in halves). Kappa and the
agreement rates compare scores rounded to that scale; MAE, RMSE and r use the raw predictions.
"Within 1" means within one score point (not one scale step).

The statistics are the libraries' (scipy's `pearsonr` and `bootstrap`, scikit-learn's
`cohen_kappa_score`); this module only puts scores on the scale and says when a figure is undefined.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np

# scipy.stats and scikit-learn are imported where a figure is computed, not with this module: they
# take ~2 s to import, and the web app, the trainer and the CLIs import this module on start-up.

METRICS = ("mae", "rmse", "pearson_r", "qwk", "exact", "within_1")
CONFIDENCE = 0.95
# Items with different maxima are compared on this scale, in halves (score / max * 10).
NORMALIZED_MAX = 10.0


def infer_step(scores: Sequence[float], max_score: float) -> float:
    """The coarsest step in {1, 0.5, 0.25, 0.1} that every score (and the maximum) sits on."""
    values = list(scores) + [max_score]
    for step in (1.0, 0.5, 0.25, 0.1):
        if all(abs(v / step - round(v / step)) < 1e-6 for v in values):
            return step
    return 0.1


def on_one_scale(human: Sequence[float], pred: Sequence[float], maxes: Sequence[float],
                 ) -> tuple[np.ndarray, np.ndarray, float, float, bool]:
    """(human, pred, max_score, step, normalized): the scores on their own scale when every item
    has the same maximum, else each as a fraction of its maximum times NORMALIZED_MAX, in halves."""
    h, p, m = np.asarray(human, float), np.asarray(pred, float), np.asarray(maxes, float)
    if len(set(m.tolist())) <= 1:
        top = float(m[0]) if len(m) else 1.0
        return h, p, top, infer_step(h.tolist(), top), False
    return h / m * NORMALIZED_MAX, p / m * NORMALIZED_MAX, NORMALIZED_MAX, 0.5, True


def round_to_scale(x: Sequence[float] | np.ndarray, max_score: float, step: float) -> np.ndarray:
    """Scores rounded to the nearest point of the scale 0, step, ..., max_score."""
    arr = np.asarray(x, dtype=float)
    return np.clip(np.round(arr / step) * step, 0.0, max_score)


def pearson_r(y: np.ndarray, p: np.ndarray) -> float | None:
    """Pearson's r (scipy); None when either side is constant (r is undefined)."""
    # ptp, not std: a constant like 4.2638 repeated has a std of ~1e-16 from rounding.
    if len(y) < 2 or np.ptp(y) == 0 or np.ptp(p) == 0:
        return None
    from scipy import stats

    return float(stats.pearsonr(y, p).statistic)


def quadratic_weighted_kappa(y_cat: np.ndarray, p_cat: np.ndarray, n_categories: int) -> float | None:
    """Cohen's kappa with quadratic weights (scikit-learn) over integer categories 0..K-1.

    All K categories are named, so the weights are (i-j)^2 on the whole scale even when some
    scores never occur. 1 is perfect agreement, 0 chance level (a constant predictor scores 0).
    None when the expected disagreement is 0 (both sides constant and equal).
    """
    if n_categories < 2 or len(y_cat) == 0:
        return None
    y_int = np.asarray(y_cat, dtype=int)
    p_int = np.asarray(p_cat, dtype=int)
    if np.ptp(y_int) == 0 and np.ptp(p_int) == 0 and y_int[0] == p_int[0]:
        return None  # no disagreement is expected: kappa is 0/0
    from sklearn.metrics import cohen_kappa_score

    return float(cohen_kappa_score(y_int, p_int, labels=np.arange(n_categories), weights="quadratic"))


def point_metrics(y_true: Sequence[float], y_pred: Sequence[float], max_score: float, step: float) -> dict:
    """Every metric of METRICS on one sample (None where undefined)."""
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(y_pred, dtype=float)
    yr = round_to_scale(y, max_score, step)
    pr = round_to_scale(p, max_score, step)
    n_cat = int(round(max_score / step)) + 1
    return {
        "mae": float(np.mean(np.abs(p - y))),
        "rmse": float(math.sqrt(np.mean((p - y) ** 2))),
        "pearson_r": pearson_r(y, p),
        "qwk": quadratic_weighted_kappa(np.round(yr / step), np.round(pr / step), n_cat),
        "exact": float(np.mean(np.abs(pr - yr) < 1e-9)),
        "within_1": float(np.mean(np.abs(pr - yr) <= 1.0 + 1e-9)),
    }


def _bootstrap_intervals(y: np.ndarray, p: np.ndarray, max_score: float, step: float, n_boot: int,
                         seed: int) -> dict[str, tuple[float, float] | None]:
    """Percentile bootstrap intervals (scipy) of every metric, resampling examples in pairs.

    A resample can leave a metric undefined (r of a resample that happens to be constant). Such a
    metric gets the percentile interval of the resamples where it is defined, when they are at
    least half of them (and 10); otherwise no interval, rather than one from a few lucky draws.
    """

    import sklearn
    from scipy import stats

    def statistic(y_b: np.ndarray, p_b: np.ndarray) -> np.ndarray:
        m = point_metrics(y_b, p_b, max_score, step)
        return np.array([np.nan if m[k] is None else m[k] for k in METRICS])

    # scikit-learn's argument checks cost 2/3 of a kappa call, a thousand times over; the labels
    # here are integers made above. Degenerate distributions (every resample exact, say) are
    # fine for a percentile interval, so scipy's warning about them is not shown.
    with warnings.catch_warnings(), sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        warnings.simplefilter("ignore")
        res = stats.bootstrap((y, p), statistic, paired=True, vectorized=False, n_resamples=n_boot,
                              confidence_level=CONFIDENCE, method="percentile", rng=np.random.default_rng(seed))
    out: dict[str, tuple[float, float] | None] = {}
    alpha = (1 - CONFIDENCE) / 2
    for k, low, high, dist in zip(METRICS, res.confidence_interval.low, res.confidence_interval.high,
                                  res.bootstrap_distribution):
        defined = dist[np.isfinite(dist)]
        if len(defined) < max(10, n_boot // 2):
            out[k] = None
        elif len(defined) == len(dist):
            out[k] = (float(low), float(high))
        else:
            lo, hi = np.percentile(defined, [100 * alpha, 100 * (1 - alpha)])
            out[k] = (float(lo), float(hi))
    return out


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
    intervals: dict[str, tuple[float, float] | None] = {}
    if len(y) >= 2 and n_boot > 0:
        intervals = _bootstrap_intervals(y, p, max_score, step, n_boot, seed)
    for k in METRICS:
        ci = intervals.get(k) if point[k] is not None else None
        lo, hi = ci if ci is not None else (None, None)
        out[k] = {"value": point[k], "ci_low": lo, "ci_high": hi}
    return out


def scaled_metrics(human: Sequence[float], pred: Sequence[float], maxes: Sequence[float], *,
                   n_boot: int = 1000) -> dict:
    """:func:`compute_metrics` of items that may have different maxima (:func:`on_one_scale`),
    saying whether they were put on the 0-10 scale (``normalized_to_0_10``)."""
    h, p, max_score, step, normalized = on_one_scale(human, pred, maxes)
    out = compute_metrics(h, p, max_score, step, n_boot=n_boot)
    out["normalized_to_0_10"] = normalized
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
