"""Runs tab: the run history from SQLite (config, status, final loss, eval metrics), several runs'
loss curves in one plot, delete a run, export (merge) an adapter into a full model folder."""
from __future__ import annotations

import json
import shutil
from typing import Any

import gradio as gr
import pandas as pd

from app import jobs
from app.common import Settings, checked_adapter, loss_figure
from data.run_folder import RunFolder

RUN_COLUMNS = ["run", "name", "status", "model", "datasets", "steps", "final loss",
               "eval loss", "lora r", "lr", "created"]


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
        status = run.get("status")
        if status in jobs.ACTIVE:
            status = jobs.live_status(rid).get("status", status)
        rows.append([rid, cfg.get("name", ""), status, cfg.get("model", ""),
                     ", ".join(map(str, cfg.get("datasets") or [])),
                     train[-1]["step"] if train else 0,
                     round(train[-1]["loss"], 4) if train else None,
                     round(evals[-1]["eval_loss"], 4) if evals else None,
                     cfg.get("lora_r"), cfg.get("learning_rate"), str(run.get("created_at", ""))])
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
    if ckpts:
        parts.append("checkpoints: " + ", ".join(str(c.get("path")) for c in ckpts))
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
    from inference.engine import export_merged

    if not adapter_path:
        return "Pick a checkpoint."
    src = checked_adapter(adapter_path)
    out = src.parent / f"merged-{src.name}"
    path = export_merged(src, out)
    return f"Merged model written to `{path}` (loads with transformers `from_pretrained`)."


def build(settings: Settings) -> dict[str, Any]:
    refresh_btn = gr.Button("Refresh", size="sm", elem_id="runs-refresh")
    table = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, wrap=True, elem_id="runs-table")
    with gr.Row():
        pick = gr.Dropdown([], multiselect=True, label="Runs to compare", elem_id="runs-compare")
        one = gr.Dropdown([], label="Run (details / delete)", allow_custom_value=True,
                          elem_id="runs-one")
    plot = gr.Plot(label="Loss curves", elem_id="runs-plot")
    details = gr.Markdown(elem_id="runs-details")
    with gr.Row():
        del_btn = gr.Button("Delete run", variant="stop", elem_id="runs-delete")
        ckpt = gr.Dropdown([], label="Checkpoint to export (merge)", allow_custom_value=True,
                           elem_id="runs-ckpt")
        export_btn = gr.Button("Export merged model", elem_id="runs-export")
    message = gr.Markdown(elem_id="runs-message")

    def refresh():
        df = runs_table()
        ids = df["run"].tolist()
        return (df, gr.update(choices=ids, value=ids[:3]), gr.update(choices=ids),
                gr.update(choices=jobs.list_adapters()), compare_figure(ids[:3]))

    outs = [table, pick, one, ckpt, plot]
    refresh_btn.click(refresh, None, outs, api_name="runs")
    pick.change(compare_figure, [pick], [plot])
    one.change(run_details, [one], [details])
    del_btn.click(lambda r: (delete_run(r), *refresh()), [one], [message, *outs],
                  api_name="delete_run")
    export_btn.click(export_adapter, [ckpt], [message], api_name="export_adapter",
                     concurrency_limit=1)
    return {"refresh": (refresh, None, outs)}
