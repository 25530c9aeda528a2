"""The run manager the UI uses: launching (through the launcher, which refuses a second run on a
busy GPU set for the UI and the CLI alike), and "which run to show".

Nothing lives only in memory: the SQLite store (kept up to date by the launcher and the trainer)
and the run folders (`data.run_folder`) are the truth, so a browser reload or an app restart finds
the same runs. The launcher starts the trainer in its own process; when the app dies the run keeps
going and the next app start reattaches to it (it reads the run's folder and status, and can stop it).
"""
from __future__ import annotations

import threading
from typing import Any

from data.run_folder import RunFolder, all_adapters
from training.launcher import ACTIVE


def store():
    """A Store for this call (sqlite connections are per thread; the store opens per call)."""
    from data.store import Store

    return Store()


def live_status(run_id: str) -> dict[str, Any]:
    """The launcher's view (store + pid liveness), so a dead trainer never shows as running."""
    from training.launcher import run_status

    try:
        return run_status(run_id) or {}
    except Exception as exc:  # a broken run folder must not break the page
        return {"run_id": run_id, "status": "unknown", "error": str(exc)}


def launch_run(cfg, *, resume: str | None = None):
    """Launch (or `resume=RUN_ID`: continue that run from its last complete checkpoint, cfg None
    meaning the run's own config.json) and reap the launcher in a thread when it exits, so a run
    the trainer did not mark (a crash before it started) is marked failed.

    The launcher refuses devices a live run holds (DevicesBusy: its message names that run and
    says how to stop it) and serializes launches across threads and processes.
    """
    from training.launcher import finalize, launch

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


def read_metrics(run_id: str) -> list[dict[str, Any]]:
    """Metric rows of a run: its folder's metrics.jsonl (what the trainer appends to), else the
    store's copy (a run folder deleted by hand still has its curve)."""
    try:
        folder = RunFolder.of(run_id)
    except ValueError:
        return []
    if folder.metrics.exists():
        return folder.read_metrics()
    try:
        return list(store().metrics(run_id))
    except Exception:
        return []


def current_phase(run_id: str) -> dict[str, Any] | None:
    """The phase the run noted last (`RunFolder.note_phase`), or None."""
    try:
        return RunFolder.of(run_id).current_phase()
    except ValueError:
        return None


def log_tail(run_id: str, n_lines: int = 40, width: int = 220) -> str:
    """The last lines of the run's train.log without repeated library noise (the launcher's
    filter), each cut to `width` characters so they fit the box ("" for an id that is not a run
    folder name)."""
    from data.library_noise import is_library_noise

    try:
        text = RunFolder.of(run_id).log_tail(n_lines * 3, width=width)
    except ValueError:
        return ""
    return "\n".join([ln for ln in text.splitlines() if not is_library_noise(ln)][-n_lines:])


def list_adapters() -> list[tuple[str, str]]:
    """(label, path) for every complete adapter under the checkpoints folder: the run with the
    newest checkpoint first, and in each run best/ first, then final/, then its checkpoints
    newest first. The first one is the adapter to grade with by default.

    A checkpoint counts only when the trainer finished writing it (its ``complete.json`` marker,
    the same test resume uses) and holds adapter_model.safetensors: a half-written or hand-copied
    folder is not offered, and pickled adapters are never listed.
    """
    return [(label, str(path)) for label, path in all_adapters()]
