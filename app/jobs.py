"""The run manager the UI uses: at most one training run per GPU set, and "which run to show".

Nothing lives only in memory: the SQLite store (kept up to date by the launcher and the trainer)
and the run folders are the truth, so a browser reload or an app restart finds the same runs.
The launcher starts the trainer in its own process; when the app dies the run keeps going and
the next app start reattaches to it (it reads the run's folder and status, and can stop it).
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from data import paths

ACTIVE = ("created", "running")
_launch_lock = threading.Lock()


def store():
    """A Store for this call (sqlite connections are per thread; the store opens per call)."""
    from data.store import Store

    return Store()


def gpu_set(config: dict[str, Any]) -> frozenset[str]:
    """The devices a run uses: GPU indices, or {"cpu"} on a machine without CUDA.

    The launcher takes the first `num_gpus` visible GPUs (all when None), so two GPU runs on one
    host overlap unless the visible devices differ.
    """
    try:
        import torch

        n_visible = torch.cuda.device_count()
    except Exception:  # torch missing or broken: treat as CPU
        n_visible = 0
    if n_visible == 0:
        return frozenset({"cpu"})
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(n_visible)]
    n = config.get("num_gpus") or len(ids)
    return frozenset(ids[:n])


def _config_of(run: dict[str, Any]) -> dict[str, Any]:
    cfg = run.get("config")
    if isinstance(cfg, str):
        try:
            cfg = json.loads(cfg)
        except json.JSONDecodeError:
            cfg = {}
    return cfg or {}


def live_status(run_id: str) -> dict[str, Any]:
    """The launcher's view (store + pid liveness), so a dead trainer never shows as running."""
    from training.launcher import run_status

    try:
        return run_status(run_id) or {}
    except Exception as exc:  # a broken run folder must not break the page
        return {"run_id": run_id, "status": "unknown", "error": str(exc)}


def active_runs() -> list[dict[str, Any]]:
    """Runs that are still alive (status created/running and the process exists)."""
    out = []
    for run in store().list_runs():
        if run.get("status") in ACTIVE:
            status = live_status(run["run_id"]).get("status", run.get("status"))
            if status in ACTIVE:
                out.append({**run, "status": status})
    return out


def conflict_message(config: dict[str, Any]) -> str | None:
    """Why a launch with `config` must wait, or None when its devices are free."""
    wanted = gpu_set(config)
    for run in active_runs():
        used = gpu_set(_config_of(run))
        if used & wanted:
            where = "the CPU" if used == {"cpu"} else "GPU " + ",".join(sorted(used & wanted))
            return (f"Refused: run '{run['run_id']}' is still {run['status']} on {where}. "
                    "One training run at a time per GPU set: stop it (Train tab, Stop) or wait "
                    "for it to finish, then launch again.")
    return None


def launch_run(cfg, *, resume: str | None = None):
    """Check the devices are free and launch; serialized so two clicks cannot both start.

    `resume=RUN_ID` continues that run in its own folder from its last complete checkpoint
    (cfg None: the run's own config.json). A thread reaps the launcher when it exits and marks a
    run the trainer did not mark (a crash before it started) as failed.
    """
    from training.config import load_config
    from training.launcher import finalize, launch

    with _launch_lock:
        check = cfg if cfg is not None else load_config(run_dir(resume) / "config.json")
        msg = conflict_message(check.model_dump())
        if msg:
            raise RuntimeError(msg)
        handle = launch(cfg, resume=resume, store=store())
    threading.Thread(target=_reap, args=(handle, finalize), daemon=True,
                     name=f"reap-{handle.run_id}").start()
    return handle


def _reap(handle, finalize) -> None:
    try:
        finalize(handle)
    except Exception:
        pass  # run_status() marks a dead run failed on the next look anyway


def latest_run_id() -> str | None:
    """The run to show after a reload or restart: a live one first, else the newest."""
    runs = store().list_runs()
    if not runs:
        return None
    live = [r for r in runs if r.get("status") in ACTIVE]
    pool = live or runs
    pool = sorted(pool, key=lambda r: str(r.get("created_at") or ""), reverse=True)
    return pool[0]["run_id"]


def run_dir(run_id: str) -> Path:
    """The run's folder, refusing ids that would step outside the checkpoints folder."""
    root = paths.checkpoints_dir().resolve()
    path = (root / run_id).resolve()
    if path.parent != root:
        raise ValueError(f"run id {run_id!r} is not a folder name inside {root}")
    return path


def read_metrics(run_id: str) -> list[dict[str, Any]]:
    """Metric rows of a run: the run folder's metrics.jsonl (what the trainer appends to), else
    the store's copy. A half-written last line (trainer mid-write) is skipped."""
    rows: list[dict[str, Any]] = []
    try:
        f = run_dir(run_id) / "metrics.jsonl"
    except ValueError:
        return rows
    if f.exists():
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows
    try:
        return list(store().metrics(run_id))
    except Exception:
        return rows


def log_tail(run_id: str, n_lines: int = 40, width: int = 220) -> str:
    """The last lines of the run's train.log (read from the end: logs can grow large), each cut
    to `width` characters so the tail fits the box."""
    try:
        f = run_dir(run_id) / "train.log"
    except ValueError:
        return ""
    if not f.exists():
        return ""
    with open(f, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 64 * 1024))
        data = fh.read().decode("utf-8", errors="replace")
    lines = [ln.rsplit("\r", 1)[-1] for ln in data.splitlines()[-n_lines:]]  # progress bars
    return "\n".join(ln if len(ln) <= width else ln[:width] + "..." for ln in lines)


def is_complete_adapter(folder: Path) -> bool:
    """A checkpoint the trainer finished (marker written last) with safetensors weights."""
    from training.train_entry import COMPLETE_MARKER

    return all((folder / f).is_file() for f in
               (COMPLETE_MARKER, "adapter_model.safetensors", "adapter_config.json"))


def list_adapters() -> list[tuple[str, str]]:
    """(label, path) for every complete adapter under the checkpoints folder, newest run first.

    A checkpoint counts only when the trainer finished writing it (its ``complete.json`` marker,
    the same test resume uses) and holds adapter_model.safetensors: a half-written or hand-copied
    folder is not offered, and pickled adapters are never listed.
    """
    root = paths.checkpoints_dir()
    out: list[tuple[str, str, float]] = []
    if not root.exists():
        return []
    for run in root.iterdir():
        if not run.is_dir():
            continue
        for ck in run.iterdir():
            if not ck.is_dir() or not (ck.name == "final" or ck.name.startswith("checkpoint-")):
                continue
            if is_complete_adapter(ck):
                out.append((f"{run.name}/{ck.name}", str(ck), ck.stat().st_mtime))
    out.sort(key=lambda t: t[2], reverse=True)
    return [(label, path) for label, path, _ in out]
