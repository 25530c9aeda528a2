"""Evaluate a grader against human grades: the adapter, the same base zero-shot, and a constant
predictor (the training mean), side by side, per item and per submission; with ``anchors``, the
same with k teacher-graded answers of each question drawn from the data itself (left out of
scoring); and how well its confidence finds the wrong grades (selective grading).

Metrics are those of :mod:`scoring.metrics`. When all items (or all submissions) share one
maximum the metrics use that scale; otherwise scores are put on a common 0-10 scale first (score /
max * 10) and the report says so. The report keeps every item (question, human and model scores,
confidence, the anchors used), so any figure in it can be recomputed from it.
"""
from __future__ import annotations

import functools
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from data.anchors import Anchor, AnchorBank, draw_anchors, question_key
from data.rubric import Grade, GradedSubmission, Rubric
from inference.adapters import resolve_base
from scoring.calibration import load_calibration
from inference.engine import get_engine
from scoring.metrics import format_table, scaled_metrics
from inference.results import GradeResult
from scoring.distribution import confidence
from scoring.selective import DEFAULT_TARGET_QWK, choose_threshold, coverage_curve, load_review

CONSTANT = "constant (training mean)"
# The grades' confidence signals that evaluate compares (the first is what grading uses).
SIGNALS = ("confidence", "spread only")


def _level_metrics(human: list[float], pred: list[float], maxes: list[float], n_boot: int) -> dict:
    return scaled_metrics(human, pred, maxes, n_boot=n_boot)


@dataclass
class EvalData:
    """Labelled submissions as the grader sees them ((name, markdown, rubric) triples) and as the
    humans graded them, with each item's place: ``where[n] = (submission, question)``."""

    subs: list[GradedSubmission]
    items: list[tuple[str, str, Rubric]]
    human: list[Grade]
    where: list[tuple[int, int]]

    @property
    def item_h(self) -> list[float]:
        return [it.score for g in self.human for it in g.items]

    @property
    def item_max(self) -> list[float]:
        return [it.max_score for g in self.human for it in g.items]

    def question_groups(self) -> dict[str, list[int]]:
        """Items (flat indices) by question, answered ones only: what anchors are drawn from."""
        groups: dict[str, list[int]] = {}
        for n, (i, k) in enumerate(self.where):
            item = self.subs[i].rubric_alignment[k]
            if item.answer.strip():
                groups.setdefault(question_key(item.question, self.human[i].items[k].max_score), []).append(n)
        return groups


def load_eval_data(data: list[str]) -> EvalData:
    from data.loading import DataError, load_graded
    from data.markdown import render_submission_markdown

    report = load_graded(data)
    if not report.ok:
        raise DataError("the evaluation data has problems:\n" + report.format())
    subs = report.submissions
    if not subs:
        raise DataError(f"no graded submissions in {', '.join(map(str, data))}")
    items = [(s.submission_id or f"#{k + 1}", render_submission_markdown(s), s.rubric()) for k, s in enumerate(subs)]
    human = [s.grade() for s in subs]
    where = [(i, k) for i, g in enumerate(human) for k in range(len(g.items))]
    return EvalData(subs, items, human, where)


def training_mean_fraction(adapter_dir: str | Path | None) -> tuple[float | None, str]:
    """Mean item score as a fraction of its max over the adapter's training data, when the run
    says what it was trained on (run_config.json "datasets"); (None, why) otherwise."""
    from data.loading import DataError
    from data.store import DB_PREFIX, load_datasets
    from inference.adapters import adapter_run_config

    if adapter_dir is None:
        return None, "no adapter"
    cfg = adapter_run_config(adapter_dir)
    if cfg is None:
        return None, "the adapter has no readable run config"
    datasets = cfg.get("datasets") or []
    missing = [d for d in datasets if not str(d).startswith(DB_PREFIX) and not Path(d).exists()]
    if missing:
        return None, f"training data {missing[0]} is not on this machine"
    try:
        subs: list[GradedSubmission] = load_datasets(datasets)
    except DataError as e:
        return None, str(e)
    fracs = [it.score / m for s in subs for it, m in zip(s.rubric_alignment, s.item_max_scores()) if m > 0]
    if not fracs:
        return None, "the training data could not be read"
    return float(np.mean(fracs)), f"training data of the adapter ({len(fracs)} items)"


def _spread_of(totals: list[float], human: list[float], rubrics: list) -> dict:
    """Within each assignment (submissions sharing a rubric), the standard deviation of the
    predicted totals against the humans': a grader that gives every student the same total
    has ratio 0, whatever its MAE."""
    groups: dict[str, list[int]] = {}
    for k, rubric in enumerate(rubrics):
        groups.setdefault(rubric.model_dump_json(), []).append(k)
    pred_sd, human_sd = [], []
    for idx in groups.values():
        if len(idx) >= 3:
            pred_sd.append(float(np.std([totals[k] for k in idx])))
            human_sd.append(float(np.std([human[k] for k in idx])))
    if not human_sd or sum(human_sd) == 0:
        return {"assignments": len(human_sd), "pred_sd": None, "human_sd": None, "ratio": None}
    return {"assignments": len(human_sd), "pred_sd": round(float(np.mean(pred_sd)), 3),
            "human_sd": round(float(np.mean(human_sd)), 3), "ratio": round(float(np.mean(pred_sd) / np.mean(human_sd)), 3)}


def _predictor_report(results: list[GradeResult], d: EvalData, n_boot: int, cal=None) -> dict:
    """Agreement of one predictor's grades (as grading gives them by default), repairs, review
    flags; with the adapter's calibration ``cal`` (item grading), agreement with it applied and
    without, whichever grading used, and whether it helped on held-out validation."""
    item_h, item_max, rubrics = d.item_h, d.item_max, [it[2] for it in d.items]
    sub_h, sub_max = [g.score for g in d.human], [g.max_score for g in d.human]

    def levels(rows: list[list[float]]) -> dict:
        return {"items": _level_metrics(item_h, [x for row in rows for x in row], item_max, n_boot),
                "submissions": _level_metrics(sub_h, [sum(row) for row in rows], sub_max, n_boot)}

    graded = [[it.score for it in r.grade.items] for r in results]
    kinds = Counter(rep.kind for r in results for rep in r.repairs)
    out = {
        **levels(graded),
        "spread_within_assignment": _spread_of([sum(row) for row in graded], sub_h, rubrics),
        "unit": results[0].unit if results else None,
        "n_repaired": sum(r.repaired for r in results),
        "repair_rate": round(sum(r.repaired for r in results) / max(1, len(results)), 4),
        "repair_kinds": dict(kinds),
        "n_needs_review": sum(sum(r.needs_review) for r in results if r.confidence),
        "mean_latency_s": float(np.mean([r.latency_s for r in results])) if results else None,
        "calibrated": any(r.calibrated for r in results),
    }
    if cal is not None and out["unit"] == "item":
        raw = [[s if s is not None else it.score for it, s in zip(r.grade.items, r.raw_scores or [])] for r in results]
        mapped = [[cal.apply(x, it.max_score) for x, it in zip(row, r.grade.items)] for row, r in zip(raw, results)]
        out["calibration"] = {"applied": out["calibrated"], "helps_on_validation": cal.helps,
                              "validation_qwk": {"raw": cal.qwk_raw, "calibrated": cal.qwk_calibrated}}
        out["calibrated_scores"] = levels(mapped)
        out["uncalibrated_scores"] = levels(raw)
    return out


def evaluate(
    data: list[str],
    *,
    adapter: str | list[str] | None = None,
    base: str | None = None,
    max_new_tokens: int = 512,
    batch_size: int | None = None,
    n_boot: int = 1000,
    include_base: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    store: bool = True,
    scoring: str = "expected",
    unit: str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    out_path: str | Path | None = None,
    anchors: Sequence[int] = (),
    anchor_draws: int = 3,
    anchor_seed: int = 0,
    validation: list[str] | None = None,
    target_qwk: float = DEFAULT_TARGET_QWK,
) -> dict:
    """Grade the labelled submissions in ``data`` with the adapter (a list: an ensemble) and the
    base alone, compare with the human grades and a constant predictor. ``progress(predictor, done,
    total)`` is called as submissions finish; with ``out_path`` the report (JSON) is rewritten as
    soon as each part is done, so a stopped evaluation keeps what it finished. ``unit``: how to
    grade (None: the adapter's own; the base alone then grades by item).

    ``anchors`` (item grading): for each k, ``anchor_draws`` times, k answers of each question are
    drawn from ``data`` as the teacher's anchors, the rest graded with them and scored (k=0: none).
    Selective grading: the coverage curve of each confidence signal, and the review threshold for
    ``target_qwk`` chosen on ``validation`` data (graded the same way), else the adapter's own
    (``review.json``), applied to ``data``."""
    d = load_eval_data(data)
    adapters = adapter if isinstance(adapter, list) else ([adapter] if adapter else [])
    lead = adapters[0] if adapters else None
    base_model = resolve_base(base, lead)
    engine = get_engine(base_model, device=device, trust_remote_code=trust_remote_code)
    batch_size = batch_size or engine.default_batch_size()
    out = {
        "data": [str(x) for x in data], "base_model": base_model,
        "adapter": str(Path(lead).resolve()) if lead else None,
        "ensemble": [str(Path(a).resolve()) for a in adapters] if len(adapters) > 1 else None,
        "n_submissions": len(d.subs), "scoring": scoring, "n_items": len(d.where), "max_new_tokens": max_new_tokens,
        "predictors": {CONSTANT: _constant_predictor(d, lead, n_boot)},
        "per_submission": [{"submission": name, "human": g.score, "max_score": g.max_score}
                           for (name, _, _), g in zip(d.items, d.human)],
    }
    write = functools.partial(_write_report, out, len(d.where), len(d.subs), out_path)
    plan = [("adapter", adapters if len(adapters) > 1 else lead)] if adapters else []
    if include_base or not adapters:
        plan.append(("base zero-shot", None))
    graded: dict[str, list[GradeResult]] = {}
    for name, which in plan:  # the report rewritten after each, so a stopped evaluation keeps it
        graded[name] = _grade_predictor(engine, d, out, name, which, lead=lead, ensemble=len(adapters) > 1,
                                        progress=progress, store=store, n_boot=n_boot, batch_size=batch_size,
                                        max_new_tokens=max_new_tokens, scoring=scoring, unit=unit)
        write()
    if adapters and graded["adapter"][0].unit == "item":
        out["items"] = _item_rows(d, graded["adapter"], set())
        val = load_eval_data(validation) if validation else None
        ks = sorted(set(anchors) | {0})
        out["anchors"] = _anchor_study(engine, d, plan[0][1], ks, anchor_draws, anchor_seed, n_boot, batch_size,
                                       graded["adapter"], progress) if anchors else None
        out["selective"] = _selective(engine, d, val, plan[0][1], lead, ks if anchors else [0], anchor_draws,
                                      anchor_seed, target_qwk, batch_size, graded["adapter"], out.get("anchors"))
        write()
    if lead is not None:
        out.update(_teacher_part(lead, n_boot))
    write()
    if store:
        from data.store import Store

        out["evaluation_id"] = Store().add_evaluation(base_model=base_model, adapter=out["adapter"],
                                                      data=", ".join(out["data"]), report=out)
    return out


def _grade_predictor(engine, d: EvalData, out: dict, name: str, which: str | list[str] | None, *, lead: str | None,
                     ensemble: bool, progress: Callable[[str, int, int], None] | None, store: bool, n_boot: int,
                     batch_size: int, max_new_tokens: int, scoring: str, unit: str | None) -> list[GradeResult]:
    """Grade every submission with one predictor (an adapter, an ensemble, or the base alone: None),
    keep the grades in the store, and add its agreement and per-submission scores to ``out``."""
    from inference.adapters import grading_unit
    from inference.results import store_grade

    results = engine.grade_many(d.items, adapter=which, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                progress=_ticker(progress, name, len(d.items)), scoring=scoring,
                                unit=unit or grading_unit(which and lead))
    if store:
        for r, (sub_name, md, rubric) in zip(results, d.items):
            store_grade(r, rubric, sub_name, submission_md=md)
    cal = load_calibration(lead) if which is not None and not ensemble else None
    out["predictors"][name] = _predictor_report(results, d, n_boot, cal)
    for row, r in zip(out["per_submission"], results):
        row[name] = r.grade.score
    return results


def _teacher_part(lead: str, n_boot: int) -> dict:
    """The teacher's own corrections of this adapter's grades (Review tab), as agreement."""
    from inference.teacher_agreement import format_agreement, teacher_agreement

    found = teacher_agreement(adapters={str(Path(lead).resolve())}, n_boot=n_boot)
    return {"teacher_agreement": [a.to_dict() for a in found],
            "teacher_agreement_markdown": format_agreement(found) if found else ""}


def _ticker(progress: Callable[[str, int, int], None] | None, name: str, total: int) -> Callable[[int], None]:
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress:
            progress(name, done[0], total)

    return tick


def _write_report(out: dict, n_items: int, n_subs: int, out_path: str | Path | None) -> None:
    """The tables for people, and the report on disk (written whole, then renamed into place)."""
    names = [n for n in out["predictors"] if n != CONSTANT] + [CONSTANT]
    out["table_markdown"] = "\n\n".join(
        format_table({n: out["predictors"][n][level] for n in names},
                     f"{level} ({n_items if level == 'items' else n_subs})")
        for level in ("items", "submissions"))
    if out.get("anchors"):
        out["anchors_markdown"] = anchors_table(out["anchors"])
    if out.get("selective"):
        out["selective_markdown"] = selective_table(out["selective"])
    if out_path is not None:
        tmp = Path(str(out_path) + ".tmp")
        tmp.write_text(json.dumps(out, indent=1, ensure_ascii=False))
        tmp.replace(out_path)


def _constant_predictor(d: EvalData, adapter: str | None, n_boot: int) -> dict:
    frac, source = training_mean_fraction(adapter)
    if frac is None:
        frac = float(np.mean([h / m for h, m in zip(d.item_h, d.item_max)]))
        source = f"mean of the evaluation data itself (optimistic; {source})"
    return {
        "items": _level_metrics(d.item_h, [frac * m for m in d.item_max], d.item_max, n_boot),
        "submissions": _level_metrics([g.score for g in d.human], [frac * g.max_score for g in d.human],
                                      [g.max_score for g in d.human], n_boot),
        "spread_within_assignment": {"ratio": 0.0}, "mean_fraction": frac, "source": source,
    }


def _item_rows(d: EvalData, results: list[GradeResult], anchors: set[int]) -> list[dict]:
    """Every scored item (those in ``anchors`` left out): question, human score(s), model score,
    confidence (and the distribution's spread alone), the distribution and the anchors used."""
    rows = []
    for n, (i, k) in enumerate(d.where):
        if n in anchors:
            continue
        r, item = results[i], d.subs[i].rubric_alignment[k]
        probs = (r.score_probs or [None] * (k + 1))[k]
        rows.append({
            "n": n, "submission": d.items[i][0], "question": d.items[i][2].labels()[k],
            "question_text": item.question, "human": item.score, "graders": item.grader_scores,
            "max_score": d.human[i].items[k].max_score, "model": r.grade.items[k].score,
            "confidence": (r.confidence or [None] * (k + 1))[k],
            "spread": None if probs is None else confidence([probs[v] for v in sorted(probs, key=int)]),
            "probs": probs, "anchors": (r.anchors or [None] * (k + 1))[k]})
    return rows


def _graded_with_anchors(engine, d: EvalData, adapter, drawn: set[int], batch_size: int,
                         progress: Callable[[int], None] | None = None) -> list[GradeResult]:
    """``d`` graded with the drawn items as the teacher's anchors (each source names the submission
    and question it came from)."""
    bank = AnchorBank()
    for n in sorted(drawn):
        i, k = d.where[n]
        item = d.subs[i].rubric_alignment[k]
        bank.add(item.question, d.human[i].items[k].max_score,
                 Anchor(item.answer, item.score, source=f"{d.items[i][0]} q{d.items[i][2].labels()[k]}"))
    return engine.grade_items(d.items, adapter=adapter, batch_size=batch_size, anchors=bank, progress=progress)


def _scored(d: EvalData, results: list[GradeResult], drawn: set[int], n_boot: int) -> dict:
    """Item and submission agreement over the items not drawn as anchors (a submission's total
    and its human total over those items alone)."""
    keep = [n for n in range(len(d.where)) if n not in drawn]
    h = [d.item_h[n] for n in keep]
    p = [results[d.where[n][0]].grade.items[d.where[n][1]].score for n in keep]
    m = [d.item_max[n] for n in keep]
    subs: dict[int, list[float]] = {}
    for n in keep:
        i, k = d.where[n]
        row = subs.setdefault(i, [0.0, 0.0, 0.0])
        row[0] += d.item_h[n]
        row[1] += results[i].grade.items[k].score
        row[2] += d.item_max[n]
    sh, sp, sm = zip(*subs.values()) if subs else ((), (), ())
    return {"items": _level_metrics(h, p, m, n_boot),
            "submissions": _level_metrics(list(sh), list(sp), list(sm), n_boot)}


def _anchor_study(engine, d: EvalData, adapter, ks: list[int], draws: int, seed: int, n_boot: int,
                  batch_size: int, plain: list[GradeResult], progress) -> dict:
    """Agreement with k anchors per question, for each k, over ``draws`` random draws (k=0: the
    adapter without anchors, once); each draw also scores the k=0 grades on the same items."""
    groups = d.question_groups()
    out: dict = {"k": ks, "draws": draws, "seed": seed, "by_k": {}}
    for k in ks:
        runs = []
        for draw in range(draws if k else 1):
            drawn = draw_anchors(groups, k, random.Random(f"{seed}-{k}-{draw}")) if k else set()
            results = _graded_with_anchors(engine, d, adapter, drawn, batch_size,
                                           _ticker(progress, f"anchors k={k} draw {draw + 1}", len(d.items)))
            runs.append({"draw": draw, "anchors": sorted(drawn), **_scored(d, results, drawn, n_boot),
                         "k0_same_items": _scored(d, plain, drawn, 0)["items"] if k else None,
                         "rows": _item_rows(d, results, drawn)})
        out["by_k"][str(k)] = {"runs": runs, "mean": _mean_over_runs(runs)}
    return out


def _mean_over_runs(runs: list[dict]) -> dict:
    """Mean and standard deviation over draws of the headline figures."""
    out = {}
    for level in ("items", "submissions"):
        for metric in ("mae", "pearson_r", "qwk"):
            vals = [r[level][metric]["value"] for r in runs if r[level][metric]["value"] is not None]
            out[f"{level}_{metric}"] = round(float(np.mean(vals)), 4) if vals else None
            out[f"{level}_{metric}_sd"] = round(float(np.std(vals)), 4) if len(vals) > 1 else None
    base = [r["k0_same_items"]["qwk"]["value"] for r in runs if r.get("k0_same_items")]
    out["k0_same_items_qwk"] = round(float(np.mean([b for b in base if b is not None])), 4) if base else None
    return out


def _signal_values(rows: list[dict], signal: str) -> list[float | None]:
    return [r["confidence"] if signal == "confidence" else r["spread"] for r in rows]


def _selective(engine, d: EvalData, val: EvalData | None, adapter, lead: str | None, ks: list[int], draws: int,
               seed: int, target_qwk: float, batch_size: int, plain: list[GradeResult], study: dict | None) -> dict:
    """Coverage curves of each confidence signal at each k (pooled over draws), and the review
    threshold for ``target_qwk``: chosen on ``val`` graded the same way when given, else the
    adapter's own, with the coverage and agreement it gives here."""
    out: dict = {"target_qwk": target_qwk, "by_k": {}}
    for k in ks:
        rows = ([row for run in study["by_k"][str(k)]["runs"] for row in run["rows"]] if study and k
                else _item_rows(d, plain, set()))
        h, p, m = [r["human"] for r in rows], [r["model"] for r in rows], [r["max_score"] for r in rows]
        entry: dict = {"n": len(rows), "curves": {s: coverage_curve(h, p, _signal_values(rows, s), m) for s in SIGNALS}}
        chosen = None
        if val is not None:
            vrows = _validation_rows(engine, val, adapter, k, draws, seed, batch_size)
            chosen = choose_threshold([r["human"] for r in vrows], [r["model"] for r in vrows],
                                      _signal_values(vrows, SIGNALS[0]), [r["max_score"] for r in vrows], target_qwk)
            chosen["source"] = f"validation data ({len(vrows)} items)"
        elif load_review(lead) is not None:
            review = load_review(lead)
            with_anchors = bool(k) and isinstance(review.get("anchored"), dict)  # its own threshold
            part = review["anchored"] if with_anchors else review
            chosen = {**{key: v for key, v in part.items() if key not in ("curve", "anchored")},
                      "source": "the adapter's review.json (its validation data"
                                + (", items with anchors)" if with_anchors else ")")}
        if chosen is not None:
            accepted = [n for n, r in enumerate(rows) if r["confidence"] is not None
                        and r["confidence"] >= chosen["threshold"]]
            got = coverage_curve([h[n] for n in accepted], [p[n] for n in accepted], [1.0] * len(accepted),
                                 [m[n] for n in accepted], (1.0,))[0] if accepted else {"qwk": None, "mae": None}
            entry["threshold"] = {**chosen, "test_coverage": round(len(accepted) / max(1, len(rows)), 4),
                                  "test_qwk": got["qwk"], "test_mae": got["mae"]}
        out["by_k"][str(k)] = entry
    return out


def _validation_rows(engine, val: EvalData, adapter, k: int, draws: int, seed: int, batch_size: int) -> list[dict]:
    """The validation data graded as the test data is at this k (its own answers as anchors)."""
    groups = val.question_groups()
    rows: list[dict] = []
    for draw in range(draws if k else 1):
        drawn = draw_anchors(groups, k, random.Random(f"val-{seed}-{k}-{draw}")) if k else set()
        rows += _item_rows(val, _graded_with_anchors(engine, val, adapter, drawn, batch_size), drawn)
    return rows


def anchors_table(study: dict) -> str:
    """Markdown: agreement by number of anchors per question (mean over draws, sd in brackets)."""
    def cell(m: dict, key: str) -> str:
        v, sd = m.get(key), m.get(f"{key}_sd")
        return "n/a" if v is None else f"{v:.3f}" + (f" ({sd:.3f})" if sd is not None else "")

    lines = ["| anchors per question | draws | item MAE | item r | item QWK | submission r | submission QWK | "
             "QWK without anchors, same items |", "|---|---|---|---|---|---|---|---|"]
    for k, entry in study["by_k"].items():
        m = entry["mean"]
        base = m.get("k0_same_items_qwk")
        lines.append(f"| {k} | {len(entry['runs'])} | {cell(m, 'items_mae')} | {cell(m, 'items_pearson_r')} | "
                     f"{cell(m, 'items_qwk')} | {cell(m, 'submissions_pearson_r')} | {cell(m, 'submissions_qwk')} | "
                     f"{'n/a' if base is None else f'{base:.3f}'} |")
    return "\n".join(lines)


def selective_table(sel: dict) -> str:
    """Markdown: the coverage curve (QWK of the accepted grades) per k and signal, and the
    review threshold's coverage and agreement."""
    lines = []
    for k, entry in sel["by_k"].items():
        curves = entry["curves"]
        covs = [pt["coverage"] for pt in curves[SIGNALS[0]]]
        lines += [f"**k = {k} anchors: QWK of the accepted grades by share accepted ({entry['n']} items)**", "",
                  "| signal | " + " | ".join(f"{c:.0%}" for c in covs) + " |", "|---|" + "---|" * len(covs)]
        for s in SIGNALS:
            lines.append(f"| {s} | " + " | ".join("n/a" if pt["qwk"] is None else f"{pt['qwk']:.3f}"
                                                  for pt in curves[s]) + " |")
        t = entry.get("threshold")
        if t and not t.get("met", True):
            lines.append(f"\nno confidence threshold reaches QWK >= {t['target_qwk']} on the {t['source']}: "
                         "every grade needs review")
        elif t:
            qwk = "n/a" if t["test_qwk"] is None else f"{t['test_qwk']:.3f}"
            lines.append(f"\nneeds review below confidence {t['threshold']} (for QWK >= {t['target_qwk']}, from "
                         f"the {t['source']}): accepts {t['test_coverage']:.0%} here at QWK {qwk}")
        lines.append("")
    return "\n".join(lines).strip()


