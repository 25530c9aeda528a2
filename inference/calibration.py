"""Calibration: a monotone map from the model's expected score to the human scale.

A tuned grader's expected scores keep the right order but bunch up around the training mean (the
distribution it learnt is wide where humans disagree). Fitted on the validation set, isotonic
regression (scikit-learn) maps them back onto the scale the humans used, keeping their order.
The map works on the fraction of each question's maximum, so one map serves questions worth 2 or
10 points. It is stored with the adapter (``calibration.json`` beside ``adapter_config.json``) and
applied when grading with that adapter; ``evaluate`` reports agreement before and after.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class Calibration:
    """A piecewise-linear monotone map on [0, 1] (fraction of the maximum), by its knots."""

    x: list[float]
    y: list[float]
    n: int  # how many validation items it was fitted on

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


def load_calibration(adapter_dir: str | Path | None) -> Calibration | None:
    """The calibration stored with an adapter, or None when it has none."""
    if adapter_dir is None:
        return None
    path = Path(adapter_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    return Calibration(x=list(d["x"]), y=list(d["y"]), n=int(d.get("n", 0)))
