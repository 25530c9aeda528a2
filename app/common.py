"""Small helpers shared by the tabs: choices for dropdowns, the loss figure, the adapter check."""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from data import paths


@dataclass
class Settings:
    """Server-wide limits, set from the command line (app.py)."""

    max_upload_mb: float = 20.0
    max_jobs: int = 2  # concurrent grading jobs (queue concurrency)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def model_choices() -> list[str]:
    """Embedded models, the presets' models and every model folder the presets name."""
    from data.model_zoo import EMBEDDED_SPECS

    from training.presets import PRESETS

    return list(dict.fromkeys(list(EMBEDDED_SPECS) + [p.model for p in PRESETS.values()]))


def dataset_choices() -> list[str]:
    """Stored datasets as `db:<name>` plus the sample folders, for the config's datasets field."""
    from data.store import Store

    out: list[str] = []
    try:
        out += [f"db:{d['name']}" for d in Store().list_datasets()]
    except sqlite3.Error:  # a store the app cannot read yet (locked, or on a missing disk): no choices
        pass
    graded = paths.samples_dir() / "graded"
    if graded.exists():
        out.append(str(graded))
    return out


def rubric_choices() -> list[tuple[str, str]]:
    """(file name, path) of the rubrics shipped in data/samples/rubrics."""
    folder = paths.samples_dir() / "rubrics"
    if not folder.exists():
        return []
    return [(p.name, str(p)) for p in sorted(folder.glob("*.json"))]


def empty_figure(title: str, message: str = "no data yet") -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, height=360, margin=dict(l=40, r=20, t=50, b=40),
                      xaxis=dict(visible=False), yaxis=dict(visible=False),
                      plot_bgcolor="rgba(0,0,0,0)", annotations=[dict(text=message, showarrow=False, x=0.5, y=0.5,
                                        xref="paper", yref="paper")])
    return fig


def loss_figure(series: dict[str, list[dict[str, Any]]], title: str = "Loss") -> go.Figure:
    """Train (solid) and eval (dotted, markers) loss against step for one or several runs, and,
    on a second axis, the validation agreement with the humans (QWK, Pearson r) where logged."""
    if not any(series.values()):
        return empty_figure(title)
    fig = go.Figure()
    several = len(series) > 1
    for name, rows in series.items():
        train = [r for r in rows if r.get("kind", "train") == "train" and r.get("loss") is not None]
        evals = [r for r in rows if r.get("kind") == "eval" and r.get("eval_loss") is not None]
        prefix = f"{name} " if several else ""
        if train:
            fig.add_trace(go.Scatter(x=[r["step"] for r in train], y=[r["loss"] for r in train],
                                     mode="lines+markers", name=f"{prefix}train loss"))
        if evals:
            fig.add_trace(go.Scatter(x=[r["step"] for r in evals], y=[r["eval_loss"] for r in evals],
                                     mode="lines+markers", line=dict(dash="dot"),
                                     name=f"{prefix}eval loss"))
        for key, label in (("val_qwk", "validation QWK"), ("val_pearson_r", "validation r")):
            pts = [r for r in rows if r.get("kind") == "eval" and r.get(key) is not None]
            if pts:
                fig.add_trace(go.Scatter(x=[r["step"] for r in pts], y=[r[key] for r in pts], yaxis="y2",
                                         mode="lines+markers", line=dict(dash="dash"), name=f"{prefix}{label}"))
    fig.update_layout(yaxis2=dict(title="agreement", overlaying="y", side="right", range=[-0.2, 1.0]))
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="loss", height=360,
                      margin=dict(l=40, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.2))
    return fig


def checked_adapter(adapter: str) -> Path:
    """The adapter folder a tab was given, checked server-side (the dropdown's paths and an API
    client's alike): inside the checkpoints folder, safetensors weights, a complete checkpoint
    (:meth:`inference.adapters.Adapter.open`). Raises gr.Error saying which check failed."""
    import gradio as gr

    from inference.adapters import Adapter, AdapterError

    try:
        return Adapter.open(adapter, inside=paths.checkpoints_dir(), complete=True).path
    except AdapterError as e:
        raise gr.Error(f"Adapter {adapter!r}: {e}") from None


def safe_display_name(name: str) -> str:
    """An uploaded file's name for display only (never used to build a path)."""
    return Path(str(name)).name or "upload"
