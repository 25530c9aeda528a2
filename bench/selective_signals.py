"""Other confidence signals, read offline from `python -m inference evaluate --anchors ... --json R`
reports: the QWK of the accepted grades by share accepted, for each signal, per number of anchors.

    python bench/selective_signals.py REPORT.json [REPORT.json ...] [--without-exact]
    python bench/selective_signals.py REPORT.json [REPORT.json ...] --fit-on OTHER.json [--fit-k 10] [--k 5]
    python bench/selective_signals.py REPORT.json [REPORT.json ...] --bounds
    python bench/selective_signals.py SEED_A.json SEED_B.json --seed-pair

Signals: `confidence` (what the report stored: before 2026-12-08 the distribution's spread times
the agreement with the anchors' suggested score; since, ``scoring.distribution.item_confidence``'s
agreement squared times the nearest anchor's similarity), `agree*sim` (the agreement times that
similarity), `agree^2*sim`, `spread*agree` (the stored confidence before 2026-12-08, recomputed)
and `agree*sim*spread^.5`; the mean over REPORTs closes each k. Rows are every anchor draw's items. An answer identical to an anchor gets the
teacher's score at confidence 1; `--without-exact` leaves those out, to see the model's own grades.

`--fit-on` checks the anchor blend offline, across runs: it fits ``scoring.calibration.fit_anchor_blend``
(weight and spread) on OTHER's rows with ``--fit-k`` anchors (the model's expected scores, from their
distributions, and the anchors' suggested scores) and prints each REPORT's agreement at ``--k``
anchors with the grades it stored and with that blend instead (rows graded by the model only).

`--bounds` prints what rankings no confidence can beat, from the answers: grades ranked by their own
error (the best any per-item signal could do), by their question's mean error (the best any
per-question signal could do) and by how closely the two human graders agree, each draw's rows
apart, means over draws and REPORTs. `--seed-pair` takes two runs that differ only in their seed
(the same anchor draws): each alone, their mean grade (a two-seed ensemble) and, as confidences
for that ensemble, the agreement of the two seeds and agree^2*sim.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scoring.calibration import fit_anchor_blend  # noqa: E402
from scoring.distribution import expected_score  # noqa: E402
from scoring.metrics import on_one_scale, point_metrics  # noqa: E402
from scoring.selective import coverage_curve  # noqa: E402


def signals(rows: list[dict]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"confidence": [], "spread*agree": [], "agree*sim": [], "agree^2*sim": [],
                                   "agree*sim*spread^.5": []}
    for r in rows:
        a = r.get("anchors") or {}
        exact = r.get("probs") is None and "exact" in a
        sim = 1.0 if exact else (a.get("nearest_similarity") or 0.0)
        n = a.get("neighbour_score")
        agree = 1.0 if exact else (1 - abs(r["model"] - n) / r["max_score"] if n is not None else 0.0)
        spread = 1.0 if exact else r.get("spread", r["confidence"])
        out["confidence"].append(r["confidence"])
        out["spread*agree"].append(spread * agree)
        out["agree*sim"].append(agree * sim)
        out["agree^2*sim"].append(agree * agree * sim)
        out["agree*sim*spread^.5"].append(agree * sim * spread ** 0.5)
    return out


def model_rows(report: dict, k: str) -> list[tuple[float, float | None, float, float, float]]:
    """(expected score, anchors' suggested score, human, max, stored grade) of every draw's rows
    at ``k`` anchors that the model graded (not those identical to an anchor)."""
    out = []
    for run in report["anchors"]["by_k"][k]["runs"]:
        for r in run["rows"]:
            if r.get("probs") is None:
                continue
            probs = [r["probs"][str(v)] for v in range(len(r["probs"]))]
            out.append((expected_score(probs), (r.get("anchors") or {}).get("neighbour_score"), r["human"],
                        r["max_score"], r["model"]))
    return out


def cross_fit(paths: list[str], fit_on: str, fit_k: str, k: str) -> None:
    blend = fit_anchor_blend(*zip(*[row[:4] for row in model_rows(json.loads(Path(fit_on).read_text()), fit_k)]))
    print(f"fitted on {Path(fit_on).name}, k = {fit_k}: {blend}")
    for path in paths:
        rows = model_rows(json.loads(Path(path).read_text()), k)
        human, maxes = [r[2] for r in rows], [r[3] for r in rows]
        for name, pred in (("stored", [r[4] for r in rows]), ("refit", [blend.apply(r[0], r[1], r[3]) for r in rows])):
            m = point_metrics(*on_one_scale(human, pred, maxes)[:4])
            print(f"  {Path(path).name}, k = {k}, {name:6s}: n {len(rows)}  r {m['pearson_r']:.3f}  "
                  f"QWK {m['qwk']:.3f}  MAE {m['mae']:.3f}")


def _curve(human, pred, conf, maxes) -> list[float]:
    return [c["qwk"] or 0.0 for c in coverage_curve(human, pred, conf, maxes)]


def _print_means(curves: dict[tuple[int, str], list[list[float]]]) -> None:
    """The mean curve of each (k, signal) seen in more than one report or draw."""
    for (k, name), got in sorted(curves.items()):
        if len(got) < 2:
            continue
        mean = [sum(col) / len(col) for col in zip(*got)]
        print(f"mean of {len(got)}, k = {k}: {name:24s} " + " ".join(f"{x:.3f}" for x in mean))


def bounds(paths: list[str]) -> None:
    curves: dict[tuple[int, str], list[list[float]]] = {}
    for path in paths:
        for k, study in json.loads(Path(path).read_text())["anchors"]["by_k"].items():
            if k == "0":  # no anchors: no agree^2*sim to compare
                continue
            for run in study["runs"]:
                rows = run["rows"]
                human, pred, maxes = [r["human"] for r in rows], [r["model"] for r in rows], [r["max_score"] for r in rows]
                errors: dict[str, list[float]] = {}
                for r in rows:
                    errors.setdefault(r["question"], []).append(abs(r["model"] - r["human"]) / r["max_score"])
                question_error = {q: sum(v) / len(v) for q, v in errors.items()}
                for name, conf in (("agree^2*sim", signals(rows)["agree^2*sim"]),
                                   ("oracle: item error", [-abs(r["model"] - r["human"]) for r in rows]),
                                   ("oracle: question error", [-question_error[r["question"]] for r in rows]),
                                   ("graders agree", [-abs(r["graders"][0] - r["graders"][-1]) for r in rows])):
                    curves.setdefault((int(k), name), []).append(_curve(human, pred, conf, maxes))
    _print_means(curves)


def seed_pair(path_a: str, path_b: str) -> None:
    a, b = (json.loads(Path(p).read_text())["anchors"]["by_k"] for p in (path_a, path_b))
    for k in sorted(set(a) & set(b), key=int):
        rows_a = [r for run in a[k]["runs"] for r in run["rows"]]
        rows_b = [r for run in b[k]["runs"] for r in run["rows"]]
        if [(r["submission"], r["question"], r.get("anchors")) for r in rows_a] != \
                [(r["submission"], r["question"], r.get("anchors")) for r in rows_b]:
            sys.exit(f"k = {k}: the two reports' anchor draws differ; --seed-pair needs the same draws")
        human, maxes = [r["human"] for r in rows_a], [r["max_score"] for r in rows_a]
        mean = [(x["model"] + y["model"]) / 2 for x, y in zip(rows_a, rows_b)]
        print(f"k = {k}: {len(rows_a)} rows")
        for name, pred in (("seed A", [r["model"] for r in rows_a]), ("seed B", [r["model"] for r in rows_b]),
                           ("mean of the two", mean)):
            m = point_metrics(*on_one_scale(human, pred, maxes)[:4])
            print(f"  {name:16s} r {m['pearson_r']:.3f}  QWK {m['qwk']:.3f}  MAE {m['mae']:.3f}")
        seeds_agree = [1 - abs(x["model"] - y["model"]) / x["max_score"] for x, y in zip(rows_a, rows_b)]
        ensembled = [dict(r, model=g) for r, g in zip(rows_a, mean)]
        for name, pred, conf in (("A alone, confidence", [r["model"] for r in rows_a], [r["confidence"] for r in rows_a]),
                                 ("mean, agree^2*sim", mean, signals(ensembled)["agree^2*sim"]),
                                 ("mean, seeds agree", mean, seeds_agree)):
            print(f"  {name:20s} " + " ".join(f"{x:.2f}" for x in _curve(human, pred, conf, maxes)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--without-exact", action="store_true")
    ap.add_argument("--fit-on", help="fit the anchor blend on this report's rows and apply it to the others'")
    ap.add_argument("--fit-k", default="10")
    ap.add_argument("--k", default="5")
    ap.add_argument("--bounds", action="store_true", help="the curves no confidence can beat")
    ap.add_argument("--seed-pair", action="store_true", help="two runs that differ in their seed, ensembled")
    args = ap.parse_args()
    if args.bounds:
        bounds(args.reports)
        return
    if args.seed_pair:
        seed_pair(*args.reports)
        return
    if args.fit_on:
        cross_fit(args.reports, args.fit_on, args.fit_k, args.k)
        return
    curves: dict[tuple[int, str], list[list[float]]] = {}
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
                print(f"  {name:19s} " + " ".join(f"{c['qwk']:.2f}" if c["qwk"] is not None else " n/a" for c in curve))
                curves.setdefault((int(k), name), []).append([c["qwk"] or 0.0 for c in curve])
    _print_means(curves)


if __name__ == "__main__":
    main()
