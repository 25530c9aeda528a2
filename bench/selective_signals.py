"""Other confidence signals, read offline from `python -m inference evaluate --anchors ... --json R`
reports: the QWK of the accepted grades by share accepted, for each signal, per number of anchors.

    python bench/selective_signals.py REPORT.json [REPORT.json ...] [--without-exact]

Signals: `confidence` (the product's: the distribution's spread times the agreement with the
anchors' suggested score), `agree*sim` (that agreement times the similarity to the nearest anchor)
and `confidence*sim`. Rows are every anchor draw's items. An answer identical to an anchor gets the
teacher's score at confidence 1; `--without-exact` leaves those out, to see the model's own grades.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scoring.selective import coverage_curve  # noqa: E402


def signals(rows: list[dict]) -> dict[str, list[float]]:
    conf, agree_sim, conf_sim = [], [], []
    for r in rows:
        a = r.get("anchors") or {}
        exact = r.get("probs") is None and "exact" in a
        sim = 1.0 if exact else (a.get("nearest_similarity") or 0.0)
        n = a.get("neighbour_score")
        agree = 1.0 if exact else (1 - abs(r["model"] - n) / r["max_score"] if n is not None else 0.0)
        conf.append(r["confidence"])
        agree_sim.append(agree * sim)
        conf_sim.append(r["confidence"] * sim)
    return {"confidence": conf, "agree*sim": agree_sim, "confidence*sim": conf_sim}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--without-exact", action="store_true")
    args = ap.parse_args()
    for path in args.reports:
        report = json.loads(Path(path).read_text())
        for k, study in sorted((report.get("anchors") or {}).get("by_k", {}).items(), key=lambda kv: int(kv[0])):
            rows = [r for run in study["runs"] for r in run["rows"]]
            if args.without_exact:
                rows = [r for r in rows if not (r.get("probs") is None and "exact" in (r.get("anchors") or {}))]
            if not rows:
                continue
            print(f"{Path(path).name}, k = {k}: {len(rows)} rows")
            human, pred, maxes = [r["human"] for r in rows], [r["model"] for r in rows], [r["max_score"] for r in rows]
            for name, conf in signals(rows).items():
                curve = coverage_curve(human, pred, conf, maxes)
                print(f"  {name:15s} " + " ".join(f"{c['qwk']:.2f}" if c["qwk"] is not None else " n/a" for c in curve))


if __name__ == "__main__":
    main()
