"""Calibration: a monotone map from the model's expected score to the human scale.

A tuned grader's expected scores keep the right order but bunch up around the training mean (the
distribution it learnt is wide where humans disagree). Fitted on the validation set, isotonic
regression (scikit-learn) maps them back onto the scale the humans used, keeping their order.
The map works on the fraction of each question's maximum, so one map serves questions worth 2 or
10 points. It is stored with the adapter (``calibration.json`` beside ``adapter_config.json``)
with whether it helps: fitted on one half of the validation questions and tried on the other
(both ways), it must raise QWK there by a margin without raising MAE, which a map that only fits
its own data does not. Grading applies it when it helps, or when asked; ``evaluate`` reports agreement before and after.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

CALIBRATION_FILE = "calibration.json"
# How much a calibration must raise held-out QWK to be applied (Mohler: gains of 0.014-0.024 on
# validation came with worse MAE on new questions).
MIN_QWK_GAIN = 0.03


@dataclass(frozen=True)
class Calibration:
    """A piecewise-linear monotone map on [0, 1] (fraction of the maximum), by its knots."""

    x: list[float]
    y: list[float]
    n: int  # how many validation items it was fitted on
    # Cross-fitted on the validation set (each half mapped by the other half's fit): QWK before and
    # after; ``helps`` when after > before. None: not checked (too few items).
    qwk_raw: float | None = None
    qwk_calibrated: float | None = None
    helps: bool | None = None

    def apply(self, score: float, max_score: float) -> float:
        """The calibrated score of ``score`` out of ``max_score``."""
        if max_score <= 0:
            return score
        frac = float(np.interp(score / max_score, self.x, self.y))
        return round(min(max(frac, 0.0), 1.0) * max_score, 3)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CALIBRATION_FILE
        path.write_text(json.dumps({"method": "isotonic", **asdict(self)}))
        return path


def fit_calibration(predicted: Sequence[float], human: Sequence[float], max_scores: Sequence[float]) -> Calibration | None:
    """Isotonic fit of human on predicted scores (as fractions of each maximum); None when the
    data cannot support one (fewer than 10 items, or constant predictions)."""
    from sklearn.isotonic import IsotonicRegression

    m = np.asarray(max_scores, dtype=float)
    x = np.asarray(predicted, dtype=float) / m
    y = np.asarray(human, dtype=float) / m
    if len(x) < 10 or np.ptp(x) == 0:
        return None
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(x, y)
    return Calibration(x=[float(v) for v in iso.X_thresholds_], y=[float(v) for v in iso.y_thresholds_], n=len(x))


def fit_checked_calibration(predicted: Sequence[float], human: Sequence[float], max_scores: Sequence[float],
                            seed: int = 0, groups: Sequence[str] | None = None) -> Calibration | None:
    """:func:`fit_calibration` on all the items, with whether it helps: the items split in two at
    random (whole questions to one side where ``groups`` names each item's question, since the map
    will meet questions it never saw), each half mapped by the map fitted on the other. It helps
    only where QWK rises by at least MIN_QWK_GAIN and MAE does not rise: on Mohler, smaller
    validation gains turned into worse test MAE every time (BENCHMARKS.md, "Teacher anchors")."""
    from scoring.metrics import on_one_scale, point_metrics

    full = fit_calibration(predicted, human, max_scores)
    if full is None:
        return None
    pred, hum, m = (np.asarray(a, dtype=float) for a in (predicted, human, max_scores))
    rng = np.random.default_rng(seed)
    if groups is not None and len(set(groups)) >= 4:
        names = sorted(set(groups))
        side_of = dict(zip(names, rng.permutation(len(names)) % 2))
        halves = np.array([side_of[g] for g in groups])
    else:
        halves = rng.permutation(len(pred)) % 2
    crossed = pred.copy()
    for side in (0, 1):
        fit = fit_calibration(pred[halves != side], hum[halves != side], m[halves != side])
        if fit is None:
            return full
        crossed[halves == side] = [fit.apply(p, mx) for p, mx in zip(pred[halves == side], m[halves == side])]
    raw, cal = (point_metrics(*on_one_scale(hum, p, m)[:4]) for p in (pred, crossed))
    if raw["qwk"] is None or cal["qwk"] is None:
        return full
    return Calibration(x=full.x, y=full.y, n=full.n, qwk_raw=round(raw["qwk"], 4), qwk_calibrated=round(cal["qwk"], 4),
                       helps=cal["qwk"] >= raw["qwk"] + MIN_QWK_GAIN and cal["mae"] <= raw["mae"])


def load_calibration(adapter_dir: str | Path | None) -> Calibration | None:
    """The calibration stored with an adapter, or None when it has none."""
    if adapter_dir is None:
        return None
    path = Path(adapter_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    return Calibration(x=list(d["x"]), y=list(d["y"]), n=int(d.get("n", 0)), qwk_raw=d.get("qwk_raw"),
                       qwk_calibrated=d.get("qwk_calibrated"), helps=d.get("helps"))


ANCHOR_BLEND_FILE = "anchor_blend.json"
BLEND_WEIGHTS = tuple(round(0.1 * k, 1) for k in range(10))
SPREADS = tuple(round(1.0 + 0.1 * k, 1) for k in range(7))


@dataclass(frozen=True)
class AnchorBlend:
    """Where teacher anchors were compared with an answer: the grade is (1 - weight) x the model's
    expected score + weight x the score the nearest anchors suggest (``data.anchors``), then moved
    away from ``center`` (a fraction of the maximum) by ``spread``. An expected score bunches up
    around the middle of what the model has seen; with anchors the order of the grades is good
    enough that spreading them back out to the humans' range raises QWK and lowers MAE. The
    weight is the one of BLEND_WEIGHTS with the best QWK on the validation items that had anchors;
    the spread (1 = none) is the one of SPREADS with the best QWK there among those that do not
    raise the blend's MAE."""

    weight: float
    n: int
    qwk_model: float | None = None
    qwk_blend: float | None = None
    spread: float = 1.0
    center: float = 0.5

    def apply(self, score: float, neighbour: float | None, max_score: float) -> float:
        if neighbour is None:
            return score
        blended = (1 - self.weight) * score + self.weight * neighbour
        return _spread(blended, max_score, self.spread, self.center)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / ANCHOR_BLEND_FILE
        path.write_text(json.dumps(asdict(self)))
        return path


def _spread(score, max_score, spread: float, center: float):
    """``score`` (a number or an array, out of ``max_score``) moved away from ``center`` x max by
    the factor ``spread``, kept on [0, max]."""
    if spread == 1.0 or np.any(np.asarray(max_score) <= 0):
        return score
    frac = center + spread * (np.asarray(score, dtype=float) / max_score - center)
    out = np.clip(frac, 0.0, 1.0) * max_score
    return float(out) if np.ndim(out) == 0 else out


def fit_anchor_blend(predicted: Sequence[float], neighbour: Sequence[float | None], human: Sequence[float],
                     max_scores: Sequence[float]) -> AnchorBlend | None:
    """The blend weight and spread fitted on validation items that had anchors (None: fewer than
    30 of them)."""
    from scoring.metrics import on_one_scale, point_metrics

    rows = [(p, nb, h, m) for p, nb, h, m in zip(predicted, neighbour, human, max_scores) if nb is not None]
    if len(rows) < 30:
        return None
    p, nb, h, m = (np.asarray(col, dtype=float) for col in zip(*rows))

    def scored(pred: np.ndarray) -> tuple[float, float]:
        r = point_metrics(*on_one_scale(h, pred, m)[:4])
        return (-1.0 if r["qwk"] is None else r["qwk"]), r["mae"]

    by_weight = {w: scored((1 - w) * p + w * nb) for w in BLEND_WEIGHTS}
    best = max(BLEND_WEIGHTS, key=lambda w: (by_weight[w][0], -w))
    blended = (1 - best) * p + best * nb
    center = float(np.mean(blended / m))
    mae_blend = by_weight[best][1]
    spread_qwk = {1.0: by_weight[best][0]}
    for s in SPREADS[1:]:
        q, mae = scored(_spread(blended, m, s, center))
        if mae <= mae_blend:
            spread_qwk[s] = q
    spread = max(spread_qwk, key=lambda s: (spread_qwk[s], -s))
    return AnchorBlend(weight=best, n=len(rows), qwk_model=round(by_weight[0.0][0], 4), qwk_blend=round(spread_qwk[spread], 4),
                       spread=spread, center=round(center, 4))


def load_anchor_blend(adapter_dir: str | Path | None) -> AnchorBlend | None:
    """The anchor blend stored with an adapter, or None."""
    if adapter_dir is None:
        return None
    try:
        d = json.loads((Path(adapter_dir) / ANCHOR_BLEND_FILE).read_text())
        return AnchorBlend(weight=float(d["weight"]), n=int(d.get("n", 0)), qwk_model=d.get("qwk_model"),
                           qwk_blend=d.get("qwk_blend"), spread=float(d.get("spread", 1.0)),
                           center=float(d.get("center", 0.5)))
    except (OSError, ValueError, KeyError, TypeError):
        return None
