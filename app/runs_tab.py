"""Runs tab: the run history from SQLite (config, status, final loss, eval metrics), several runs'
loss curves in one plot, delete a run, export (merge) an adapter into a full model folder, and each
adapter's agreement with the teacher's corrections (table, confusion plot, trend across runs)."""
from __future__ import annotations

import json
import shutil
from typing import Any

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from app import jobs
from app.common import Settings, checked_adapter, empty_figure, loss_figure
from data.run_folder import RunFolder
from training.adapter_quality import weak_agreement_note
from inference.teacher_agreement import (AdapterAgreement, confusion_counts, format_by_question, format_overall,
                                         teacher_agreement)

RUN_COLUMNS = ["run", "name", "status", "model", "datasets", "steps", "final loss",
               "eval loss", "lora r", "lr", "created", "validation QWK"]


def _cfg(run: dict[str, Any]) -> dict[str, Any]:
    cfg = run.get("config")
    if isinstance(cfg, str):
        try:
            return json.loads(cfg)
        except json.JSONDecodeError:
            return {}
    return cfg or {}


def runs_table() -> pd.DataFrame:
    rows = []
    for run in jobs.store().list_runs():
        rid = run["run_id"]
        cfg = _cfg(run)
        metrics = jobs.read_metrics(rid)
        train = [m for m in metrics if m.get("kind", "train") == "train" and m.get("loss") is not None]
        evals = [m for m in metrics if m.get("kind") == "eval" and m.get("eval_loss") is not None]
        qwk = [m["val_qwk"] for m in evals if m.get("val_qwk") is not None]
        status = run.get("status")
        if status in jobs.ACTIVE:
            status = jobs.live_status(rid).get("status", status)
        rows.append([rid, cfg.get("name", ""), status, cfg.get("model", ""),
                     ", ".join(map(str, cfg.get("datasets") or [])),
                     train[-1]["step"] if train else 0,
                     round(train[-1]["loss"], 4) if train else None,
                     round(evals[-1]["eval_loss"], 4) if evals else None,
                     cfg.get("lora_r"), cfg.get("learning_rate"), str(run.get("created_at", "")),
                     round(max(qwk), 3) if qwk else None])
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def compare_figure(run_ids: list[str] | None):
    return loss_figure({rid: jobs.read_metrics(rid) for rid in (run_ids or [])},
                       title="Loss curves of the selected runs")


def run_details(run_id: str | None) -> str:
    if not run_id:
        return ""
    run = jobs.store().get_run(run_id) or {}
    cfg = _cfg(run)
    try:
        ckpts = jobs.store().checkpoints(run_id)
    except Exception:
        ckpts = []
    parts = [f"**{run_id}**: {run.get('status')}"]
    if run.get("error"):
        parts.append(f"error: {run['error']}")
    note = weak_agreement_note(RunFolder(run["run_dir"]).default_adapter()) if run.get("run_dir") else None
    if note:
        parts.append(f"**Its adapter cannot grade yet.** {note}")
    if ckpts:
        parts.append("checkpoints: " + ", ".join(str(c.get("path")) for c in ckpts))
    for used in jobs.store().run_corrections(run_id) if run else []:
        parts.append(f"trained on {len(used.correction_ids)} teacher corrections (`{used.spec}`, dataset "
                     f"{used.dataset_id}): ids {', '.join(map(str, used.correction_ids))}")
    parts.append("```json\n" + json.dumps(cfg, indent=1) + "\n```")
    return "\n\n".join(parts)


def delete_run(run_id: str | None) -> str:
    if not run_id:
        return "Pick a run."
    status = jobs.live_status(run_id).get("status")
    if status in jobs.ACTIVE:
        return f"`{run_id}` is still {status}: stop it first."
    folder = RunFolder.of(run_id).path  # refuses ids outside the checkpoints folder
    jobs.store().delete_run(run_id)
    if folder.exists():
        shutil.rmtree(folder)
    return f"Deleted run `{run_id}` and its folder."


def export_adapter(adapter_path: str | None) -> str:
    from inference.adapters import export_merged

    if not adapter_path:
        return "Pick a checkpoint."
    src = checked_adapter(adapter_path)
    out = src.parent / f"merged-{src.name}"
    path = export_merged(src, out)
    return f"Merged model written to `{path}` (loads with transformers `from_pretrained`)."


def confusion_figure(a: AdapterAgreement | None) -> go.Figure:
    """How often the teacher gave each score (rows) when the model gave each score (columns),
    both rounded to whole points."""
    title = "Model vs teacher scores (rounded)"
    if a is None or not a.pairs:
        return empty_figure(title, "no corrections yet")
    scores, counts = confusion_counts(a.pairs)
    fig = go.Figure(go.Heatmap(z=counts, x=scores, y=scores, colorscale="Blues", texttemplate="%{z}",
                               hovertemplate="teacher %{y}, model %{x}: %{z}<extra></extra>"))
    fig.update_layout(title=f"{title}: {a.label}", xaxis_title="model score", yaxis_title="teacher score",
                      height=360, margin=dict(l=40, r=20, t=50, b=40), xaxis=dict(dtick=1), yaxis=dict(dtick=1))
    return fig


def trend_figure(results: list[AdapterAgreement]) -> go.Figure:
    """One point per adapter, oldest first: QWK and r (left axis) and MAE (right axis)."""
    title = "Agreement with the teacher across runs"
    if not results:
        return empty_figure(title, "no corrections yet")
    x = [a.label for a in results]
    fig = go.Figure()
    for key, name, axis in (("qwk", "QWK", "y"), ("pearson_r", "Pearson r", "y"), ("mae", "MAE", "y2")):
        fig.add_trace(go.Scatter(x=x, y=[a.overall[key]["value"] for a in results], mode="lines+markers",
                                 name=name, yaxis=axis, line=dict(dash="dot") if axis == "y2" else None))
    fig.update_layout(title=title, height=360, margin=dict(l=40, r=40, t=50, b=40), yaxis_title="agreement",
                      yaxis=dict(range=[-0.2, 1.05]), legend=dict(orientation="h", y=-0.3),
                      yaxis2=dict(title="MAE", overlaying="y", side="right", rangemode="tozero"))
    return fig


def agreement_view(pick: str | None):
    """(overall table, adapter picker, the picked adapter's table by question, its confusion plot,
    the trend). The picked adapter defaults to the newest."""
    results = teacher_agreement(jobs.store(), n_boot=0)  # intervals: python -m inference teacher-agreement
    labels = [a.label for a in results]
    chosen = pick if pick in labels else (labels[-1] if labels else None)
    one = next((a for a in results if a.label == chosen), None)
    return (format_overall(results), gr.update(choices=labels, value=chosen),
            format_by_question(one) if one else "", confusion_figure(one), trend_figure(results))


def _evaluation_curves(adapter: str) -> dict[str, list[dict]]:
    """The newest stored evaluation of ``adapter`` that measured selective grading: its coverage
    curve (the product's confidence) at each number of anchors per question."""
    for ev in jobs.store().evaluations(limit=200):
        report = ev.get("report") or {}
        if ev.get("adapter") == adapter and report.get("selective"):
            return {k: v["curves"]["confidence"] for k, v in report["selective"]["by_k"].items()}
    return {}


def selective_view(run_id: str | None) -> tuple[str, go.Figure]:
    """The run's grader and its review threshold: the coverage curve on its validation data (what
    the threshold was chosen on) and, where `python -m inference evaluate` measured it, on test
    data with and without teacher anchors; with the calibration and anchor blend it keeps."""
    from scoring.calibration import load_anchor_blend, load_calibration
    from scoring.selective import load_review

    title = "Share of grades accepted without review vs their agreement (QWK)"
    adapter = RunFolder.of(run_id).default_adapter() if run_id else None
    if adapter is None:
        return "", empty_figure(title, "pick a run with a complete checkpoint")
    review, cal, blend = load_review(adapter), load_calibration(adapter), load_anchor_blend(adapter)
    lines = [f"**{RunFolder.of(run_id).path.name}/{adapter.name}**"]
    anchored = (review or {}).get("anchored")
    plain = "without teacher anchors: " if anchored else ""
    if review and review.get("met"):
        lines.append(f"{plain}needs review below confidence {review['threshold']:.2f}: on the validation data that "
                     f"accepts {review['coverage']:.0%} of grades at QWK {review['qwk']:.2f} "
                     f"(target {review['target_qwk']:g})")
    elif review:
        lines.append(f"{plain}no confidence threshold reached QWK {review['target_qwk']:g} on the validation data: "
                     "every grade needs review (lower review_target_qwk, or train on more data)")
    else:
        lines.append("no review threshold (item-level runs with validation data choose one); the fixed 0.5 applies")
    if anchored:
        lines.append(f"graded with teacher anchors: needs review below confidence {anchored['threshold']:.2f}, "
                     f"on the validation items with anchors {anchored['coverage']:.0%} accepted at QWK "
                     f"{anchored['qwk']:.2f}" if anchored.get("met") else
                     "graded with teacher anchors: no confidence threshold reached the target on the validation "
                     "items with anchors: every such grade needs review")
    if cal is not None and cal.helps is not None:
        lines.append(f"calibration {'applied' if cal.helps else 'off'}: on held-out validation it "
                     f"{'raised' if cal.helps else 'did not raise'} QWK ({cal.qwk_raw} -> {cal.qwk_calibrated})")
    if blend is not None:
        spread = f", spread x{blend.spread:g} around {blend.center:.0%} of the maximum" if blend.spread != 1.0 else ""
        lines.append(f"teacher anchors: the grade takes {blend.weight:.0%} from the closest anchors' scores{spread} "
                     f"(validation QWK {blend.qwk_model} -> {blend.qwk_blend})")
    fig = go.Figure()
    curves = {"validation": (review or {}).get("curve") or [],
              "validation, with anchors": (anchored or {}).get("curve") or []}
    curves.update({f"test, {k} anchors/question": c for k, c in _evaluation_curves(str(adapter.resolve())).items()})
    for name, curve in curves.items():
        if curve:
            fig.add_trace(go.Scatter(x=[pt["coverage"] for pt in curve], y=[pt["qwk"] for pt in curve],
                                     mode="lines+markers", name=name))
    if review and review.get("met"):
        fig.add_hline(y=review["target_qwk"], line_dash="dot", annotation_text="target")
        fig.add_vline(x=review["coverage"], line_dash="dot", annotation_text="threshold")
    if not fig.data:
        return "\n\n".join(lines), empty_figure(title, "no curve yet")
    fig.update_layout(title=title, height=360, margin=dict(l=40, r=20, t=50, b=40), xaxis_title="share accepted",
                      yaxis_title="QWK of the accepted grades", xaxis=dict(range=[0, 1.02], tickformat=".0%"),
                      legend=dict(orientation="h", y=-0.3))
    return "\n\n".join(lines), fig


def build(settings: Settings) -> dict[str, Any]:
    refresh_btn = gr.Button("Refresh", size="sm", elem_id="runs-refresh")
    table = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, wrap=True, elem_id="runs-table")
    with gr.Row():
        pick = gr.Dropdown([], multiselect=True, label="Runs to compare", elem_id="runs-compare")
        one = gr.Dropdown([], label="Run (details / delete)", allow_custom_value=True,
                          elem_id="runs-one")
    plot = gr.Plot(label="Loss curves", elem_id="runs-plot")
    details = gr.Markdown(elem_id="runs-details")
    with gr.Accordion("Selective grading: which grades to accept without review", open=True):
        selective = gr.Markdown(elem_id="runs-selective")
        coverage = gr.Plot(label="Coverage curve", elem_id="runs-coverage")
    with gr.Row():
        del_btn = gr.Button("Delete run", variant="stop", elem_id="runs-delete")
        ckpt = gr.Dropdown([], label="Checkpoint to export (merge)", allow_custom_value=True,
                           elem_id="runs-ckpt")
        export_btn = gr.Button("Export merged model", elem_id="runs-export")
    message = gr.Markdown(elem_id="runs-message")
    gr.Markdown("### Agreement with the teacher\nEach adapter against the corrections made in the Review tab "
                "(every grade of a corrected answer counts). Intervals: `python -m inference teacher-agreement`.")
    agreement = gr.Markdown(elem_id="runs-agreement")
    agree_pick = gr.Dropdown([], label="Adapter (by question, confusion)", elem_id="runs-agreement-pick")
    by_question = gr.Markdown(elem_id="runs-agreement-questions")
    with gr.Row():
        confusion = gr.Plot(label="Model vs teacher", elem_id="runs-confusion")
        trend = gr.Plot(label="Trend across runs", elem_id="runs-trend")

    def refresh():
        df = runs_table()
        ids = df["run"].tolist()
        return (df, gr.update(choices=ids, value=ids[:3]), gr.update(choices=ids),
                gr.update(choices=jobs.list_adapters()), compare_figure(ids[:3]))

    outs = [table, pick, one, ckpt, plot]
    agree_outs = [agreement, agree_pick, by_question, confusion, trend]
    refresh_btn.click(refresh, None, outs, api_name="runs").then(agreement_view, [agree_pick], agree_outs)
    agree_pick.input(agreement_view, [agree_pick], agree_outs, api_name="teacher_agreement")
    pick.change(compare_figure, [pick], [plot])
    one.change(run_details, [one], [details])
    one.change(selective_view, [one], [selective, coverage], api_name="selective")
    del_btn.click(lambda r: (delete_run(r), *refresh()), [one], [message, *outs],
                  api_name="delete_run")
    export_btn.click(export_adapter, [ckpt], [message], api_name="export_adapter",
                     concurrency_limit=1)
    return {"refresh": (refresh, None, outs), "agreement": (agreement_view, [agree_pick], agree_outs)}
