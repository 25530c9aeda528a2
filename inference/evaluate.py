"""Evaluate a grader against human grades: the adapter, the same base zero-shot, and a constant
predictor (the training mean), side by side, per item and per submission.

Metrics are those of :mod:`inference.metrics`. When all items (or all submissions) share one
maximum the metrics use that scale; otherwise scores are put on a common 0-10 scale first (score /
max * 10) and the report says so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from inference.results import GradeResult
from inference.engine import get_engine
from inference.adapters import resolve_base
from inference.metrics import compute_metrics, format_table, infer_step
from data.rubric import GradedSubmission

NORMALIZED_MAX = 10.0


def _scale(human: list[float], maxes: list[float]) -> tuple[float, float, bool]:
    """(max_score, step, normalized)."""
    if len(set(maxes)) == 1:
        return maxes[0], infer_step(human, maxes[0]), False
    return NORMALIZED_MAX, 0.5, True


def _level_metrics(human: list[float], pred: list[float], maxes: list[float], n_boot: int) -> dict:
    max_score, step, normalized = _scale(human, maxes)
    h, p, m = np.array(human, float), np.array(pred, float), np.array(maxes, float)
    if normalized:
        h, p = h / m * NORMALIZED_MAX, p / m * NORMALIZED_MAX
    out = compute_metrics(h, p, max_score, step, n_boot=n_boot)
    out["normalized_to_0_10"] = normalized
    return out


def training_mean_fraction(adapter_dir: str | Path | None) -> tuple[float | None, str]:
    """Mean item score as a fraction of its max over the adapter's training data, when the run
    says what it was trained on (run_config.json "datasets"); (None, why) otherwise."""
    import json

    from data.loading import DataError
    from data.run_folder import RUN_CONFIG, RunFolder
    from data.store import load_datasets

    if adapter_dir is None:
        return None, "no adapter"
    folder = Path(adapter_dir)
    cfg_path = next((p for p in (folder / RUN_CONFIG, RunFolder(folder.parent).config) if p.is_file()), None)
    if cfg_path is None:
        return None, f"the adapter has no {RUN_CONFIG}"
    try:
        datasets = json.loads(cfg_path.read_text()).get("datasets") or []
    except (OSError, ValueError, AttributeError):
        return None, f"{cfg_path} is unreadable"
    missing = [d for d in datasets if not str(d).startswith("db:") and not Path(d).exists()]
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


def _predictor_report(results: list[GradeResult], item_h, item_max, sub_h, sub_max, rubrics, n_boot: int) -> dict:
    from collections import Counter

    from inference.scoring import needs_review

    ip = [it.score for r in results for it in r.grade.items]
    sp = [r.grade.score for r in results]
    kinds = Counter(rep.kind for r in results for rep in r.repairs)
    out = {
        "items": _level_metrics(item_h, ip, item_max, n_boot),
        "submissions": _level_metrics(sub_h, sp, sub_max, n_boot),
        "spread_within_assignment": _spread_of([r.grade.score for r in results], sub_h, rubrics),
        "unit": results[0].unit if results else None,
        "n_repaired": sum(r.repaired for r in results),
        "repair_rate": round(sum(r.repaired for r in results) / max(1, len(results)), 4),
        "repair_kinds": dict(kinds),
        "n_needs_review": sum(needs_review(c) for r in results for c in (r.confidence or [])),
        "mean_latency_s": float(np.mean([r.latency_s for r in results])) if results else None,
        "calibrated": any(r.calibrated for r in results),
    }
    if out["calibrated"]:
        # Graded with the calibration map applied; the headline rows are the raw expected scores
        # (what grading gives by default), "calibrated" what --calibrate gives.
        raw = [[s if s is not None else it.score for it, s in zip(r.grade.items, r.raw_scores or [])] for r in results]
        out["calibrated_scores"] = {"items": out["items"], "submissions": out["submissions"]}
        out["items"] = _level_metrics(item_h, [x for row in raw for x in row], item_max, n_boot)
        out["submissions"] = _level_metrics(sub_h, [sum(row) for row in raw], sub_max, n_boot)
        totals = [sum(row) for row in raw]
        out["spread_within_assignment"] = _spread_of(totals, sub_h, rubrics)
    return out


def evaluate(
    data: list[str],
    *,
    adapter: str | None = None,
    base: str | None = None,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    n_boot: int = 1000,
    include_base: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    store: bool = True,
    scoring: str = "expected",
    unit: str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    out_path: str | Path | None = None,
) -> dict:
    """Grade the labelled submissions in ``data`` with the adapter and the base alone, compare
    with the human grades and a constant predictor. ``progress(predictor, done, total)`` is called
    as submissions finish; with ``out_path`` the report (JSON) is rewritten as soon as each
    predictor is done, so a stopped evaluation keeps what it finished. ``unit``: how to grade
    (None: the adapter's own; the base alone then grades by item, see engine.grading_unit)."""
    import json

    from data.loading import DataError, load_graded
    from data.markdown import render_submission_markdown
    from inference.adapters import grading_unit
    from inference.results import store_grade

    report = load_graded(data)
    if not report.ok:
        raise DataError("the evaluation data has problems:\n" + report.format())
    subs = report.submissions
    if not subs:
        raise DataError(f"no graded submissions in {', '.join(map(str, data))}")
    base_model = resolve_base(base, adapter)
    engine = get_engine(base_model, device=device, trust_remote_code=trust_remote_code)
    items = [(s.submission_id or f"#{k + 1}", render_submission_markdown(s), s.rubric()) for k, s in enumerate(subs)]
    rubrics = [it[2] for it in items]
    human = [s.grade() for s in subs]
    item_h = [it.score for g in human for it in g.items]
    item_max = [it.max_score for g in human for it in g.items]
    sub_h = [g.score for g in human]
    sub_max = [g.max_score for g in human]
    frac, source = training_mean_fraction(adapter)
    if frac is None:
        frac = float(np.mean([h / m for h, m in zip(item_h, item_max)]))
        source = f"mean of the evaluation data itself (optimistic; {source})"

    out = {
        "data": [str(d) for d in data],
        "base_model": base_model,
        "adapter": str(Path(adapter).resolve()) if adapter else None,
        "n_submissions": len(subs),
        "scoring": scoring,
        "n_items": len(item_h),
        "max_new_tokens": max_new_tokens,
        "predictors": {},
        "per_submission": [{"submission": name, "human": sub_h[k], "max_score": sub_max[k]}
                           for k, (name, _, _) in enumerate(items)],
    }
    const_name = "constant (training mean)"
    out["predictors"][const_name] = {
        "items": _level_metrics(item_h, [frac * m for m in item_max], item_max, n_boot),
        "submissions": _level_metrics(sub_h, [frac * m for m in sub_max], sub_max, n_boot),
        "spread_within_assignment": {"ratio": 0.0},
        "mean_fraction": frac,
        "source": source,
    }

    def finish() -> None:
        names = [n for n in out["predictors"] if n != const_name] + [const_name]
        out["table_markdown"] = "\n\n".join(
            format_table({n: out["predictors"][n][level] for n in names},
                         f"{level} ({len(item_h) if level == 'items' else len(subs)})")
            for level in ("items", "submissions"))
        if out_path is not None:
            tmp = Path(str(out_path) + ".tmp")
            tmp.write_text(json.dumps(out, indent=1, ensure_ascii=False))
            tmp.replace(out_path)

    plan = []
    if adapter is not None:
        plan.append(("adapter", adapter))
    if include_base or adapter is None:
        plan.append(("base zero-shot", None))
    for name, which in plan:
        done = [0]

        def tick(n: int, name=name, done=done) -> None:
            done[0] += n
            if progress:
                progress(name, done[0], len(items))

        results = engine.grade_many(items, adapter=which, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    progress=tick, scoring=scoring, unit=unit or grading_unit(which if which else adapter),
                                    calibrate=True)
        if store:
            for r, (sub_name, md, rubric) in zip(results, items):
                store_grade(r, rubric, sub_name, submission_md=md)
        out["predictors"][name] = _predictor_report(results, item_h, item_max, sub_h, sub_max, rubrics, n_boot)
        for row, r in zip(out["per_submission"], results):
            row[name] = r.grade.score
        finish()
    if adapter is not None:  # the teacher's own corrections of this adapter's grades (Review tab)
        from inference.teacher_agreement import format_agreement, teacher_agreement

        found = teacher_agreement(adapters={str(Path(adapter).resolve())}, n_boot=n_boot)
        out["teacher_agreement"] = [a.to_dict() for a in found]
        out["teacher_agreement_markdown"] = format_agreement(found) if found else ""
    finish()
    if store:
        from data.store import Store

        out["evaluation_id"] = Store().add_evaluation(base_model=base_model, adapter=out["adapter"],
                                                      data=", ".join(out["data"]), report=out)
    return out
