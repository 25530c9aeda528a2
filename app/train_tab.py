"""Train tab: launch the config from Configure as a DeepSpeed subprocess, watch it live (loss plot,
progress with ETA, tokens/s, memory, log tail), stop and resume.

The page polls the run folder (metrics.jsonl, train.log) and the store with a gr.Timer; nothing
about the run lives in the app's memory, so a reload or an app restart shows it again.
"""
from __future__ import annotations

import html
import statistics
import time
from typing import Any

import gradio as gr

from app import jobs
from app.common import Settings, loss_figure
from data.run_folder import TRAINING_PHASE

POLL_S = 2.0
LOG_LINES = 16


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _seconds_per_step(train: list[dict[str, Any]]) -> float | None:
    """Typical seconds per step: the median over the last 20 steps, so the first step of a GPU run
    (which compiles the layers: ~50 s against ~1 s per step after it) does not inflate the ETA."""
    pts = [(int(r["step"]), float(r["elapsed_s"])) for r in train
           if r.get("step") and r.get("elapsed_s") is not None]
    per = [(e2 - e1) / (s2 - s1) for (s1, e1), (s2, e2) in zip(pts, pts[1:]) if s2 > s1 and e2 >= e1]
    if per:
        return statistics.median(per[-20:])
    return pts[-1][1] / pts[-1][0] if pts else None


def progress(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Step, total, ETA, tokens/s, memory from the newest metric rows."""
    train = [r for r in rows if r.get("kind", "train") == "train"]
    last = train[-1] if train else (rows[-1] if rows else {})
    step = int(last.get("step") or 0)
    total = last.get("total_steps") or next((r.get("total_steps") for r in reversed(rows)
                                             if r.get("total_steps")), None)
    elapsed = last.get("elapsed_s")
    eta = None
    per_step = _seconds_per_step(train)
    if total and step and per_step is not None:
        eta = per_step * max(int(total) - step, 0)
    evals = [r for r in rows if r.get("kind") == "eval" and r.get("eval_loss") is not None]
    return {"step": step, "total": total, "eta_s": eta, "elapsed_s": elapsed,
            "tokens_per_s": last.get("tokens_per_s"), "peak_mem_gib": last.get("peak_mem_gib"),
            "loss": last.get("loss"), "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "epoch": last.get("epoch")}


def phase_text(phase: dict[str, Any] | None, p: dict[str, Any], status: str, now: float | None = None) -> str | None:
    """What a live run is doing where its steps say nothing (loading, converting, compiling,
    evaluating: `RunFolder.current_phase`), with how long it has been at it; None once the steps
    tell (or the run is over)."""
    if status not in jobs.ACTIVE or not phase or (phase["phase"] == TRAINING_PHASE and p["step"]):
        return None
    since = (now if now is not None else time.time()) - float(phase.get("time") or 0)
    return f"{phase['phase']} ({_fmt_duration(since)})"


def progress_html(p: dict[str, Any], status: str, phase: str | None = None) -> str:
    """The progress bar: step / total, and the ETA, or the run's phase (`phase_text`) while it
    has one."""
    total = p["total"] or 0
    frac = min(p["step"] / total, 1.0) if total else 0.0
    label = f"step {p['step']} / {total or '?'}"
    if phase:
        label += f" - {phase}"
    elif status in ("created", "running"):
        label += f" - ETA {_fmt_duration(p['eta_s'])}"
    return (f'<div id="train-progress" data-step="{p["step"]}" data-total="{total}" '
            'style="border:1px solid #bbb;border-radius:6px;height:26px;position:relative;'
            'background:#f4f4f5">'
            f'<div style="width:{frac * 100:.1f}%;height:100%;background:#f97316;'
            'border-radius:6px"></div><div style="position:absolute;top:3px;width:100%;'
            f'text-align:center;font-size:14px">{html.escape(label)}</div></div>')


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def status_markdown(run_id: str | None, info: dict[str, Any], p: dict[str, Any]) -> str:
    if not run_id:
        return "No run yet. Pick a config in Configure and press **Launch**."
    status = info.get("status", "unknown")
    exiting = " (process still exiting)" if info.get("alive") and status not in jobs.ACTIVE else ""
    lines = [f"**Run `{run_id}`**: **{status}**{exiting}"
             + (f" (error: {info['error']})" if info.get("error") else ""),
             f"loss {_num(p['loss'], '.4f')} | eval loss {_num(p['eval_loss'], '.4f')} | "
             f"epoch {_num(p['epoch'], '.2f')} | tokens/s {_num(p['tokens_per_s'], ',.0f')} | "
             f"peak memory {_num(p['peak_mem_gib'], '.2f')} GiB | elapsed "
             f"{_fmt_duration(p['elapsed_s'])}"]
    ckpts = [c for c in (info.get("checkpoints") or [])]
    if ckpts:
        lines.append("checkpoints: " + ", ".join(
            f"`{c.get('step')}{' (final)' if c.get('final') else ''}`" for c in ckpts))
    return "\n\n".join(lines)


def run_view(run_id: str | None):
    """Everything the Train tab shows about one run (status, progress bar, plot, log tail)."""
    if not run_id:
        p = progress([])
        return status_markdown(None, {}, p), progress_html(p, ""), loss_figure({}), ""
    info = jobs.live_status(run_id)
    if "checkpoints" not in info:
        try:
            info["checkpoints"] = jobs.store().checkpoints(run_id)
        except Exception:
            info["checkpoints"] = []
    rows = jobs.read_metrics(run_id)
    p = progress(rows)
    status = info.get("status", "unknown")
    phase = phase_text(jobs.current_phase(run_id), p, status)
    return (status_markdown(run_id, info, p), progress_html(p, status, phase),
            loss_figure({run_id: rows}, title=f"Loss - {run_id}"), jobs.log_tail(run_id, LOG_LINES))


def run_choices() -> list[str]:
    return [r["run_id"] for r in jobs.store().list_runs()]


def build(settings: Settings, form) -> dict[str, Any]:
    gr.Markdown("Launches the config from **Configure** (the command shown there) as a separate "
                "process; closing the page or restarting the app does not stop it.")
    with gr.Row():
        launch_btn = gr.Button("Launch", variant="primary", elem_id="train-launch")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop")
        resume_btn = gr.Button("Resume", elem_id="train-resume")
        run_pick = gr.Dropdown([], label="Run shown", allow_custom_value=True, elem_id="train-run")
    message = gr.Markdown(elem_id="train-message")
    status = gr.Markdown(elem_id="train-status")
    bar = gr.HTML(elem_id="train-progress-box")
    plot = gr.Plot(label="Loss (train and eval)", elem_id="train-plot")
    log = gr.Textbox(label="Log (tail of train.log)", lines=LOG_LINES, max_lines=LOG_LINES,
                     autoscroll=True,
                     interactive=False, elem_id="train-log")
    timer = gr.Timer(POLL_S)

    def do_launch(*values):
        from training.checks import check_config

        cfg, errors = form.to_model(values)
        if cfg is None:
            return "Not launched: invalid config: " + "; ".join(errors), gr.update()
        problems = check_config(cfg)
        if problems:
            return "Not launched: " + "; ".join(problems), gr.update()
        try:
            handle = jobs.launch_run(cfg)
        except Exception as exc:  # refused (devices busy, config) or could not start
            return str(exc), gr.update()
        return (f"Launched run `{handle.run_id}`.",
                gr.update(choices=run_choices(), value=handle.run_id))

    def do_stop(run_id):
        from training.launcher import stop_run

        if not run_id:
            return "No run selected."
        ok = stop_run(run_id)
        return (f"Stopping `{run_id}`: it finishes the current step and saves a checkpoint."
                if ok else f"`{run_id}` is not running.")

    def do_resume(run_id):
        if not run_id:
            return "No run selected.", gr.update()
        try:
            handle = jobs.launch_run(None, resume=run_id)
        except Exception as exc:
            return f"Not resumed: {exc}", gr.update()
        return (f"Resuming `{run_id}` from its last complete checkpoint.",
                gr.update(choices=run_choices(), value=handle.run_id))

    def on_load():
        rid = jobs.latest_run_id()
        return (gr.update(choices=run_choices(), value=rid), *run_view(rid))

    view_out = [status, bar, plot, log]
    launch_btn.click(do_launch, form.inputs, [message, run_pick], api_name="launch",
                     concurrency_limit=1)
    stop_btn.click(do_stop, [run_pick], [message], api_name="stop")
    resume_btn.click(do_resume, [run_pick], [message, run_pick], api_name="resume",
                     concurrency_limit=1)
    run_pick.change(run_view, [run_pick], view_out, api_name="run_view")
    timer.tick(run_view, [run_pick], view_out, api_name=False, show_progress="hidden")
    return {"on_load": (on_load, None, [run_pick, *view_out])}
