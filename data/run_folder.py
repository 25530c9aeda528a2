"""The run folder: the one place that knows a training run's files, and reads and writes them.

    <checkpoints>/<run_id>/          (data.paths.checkpoints_dir())
        config.json         the RunConfig of the run (training.config.save_config)
        ds_config.json      the DeepSpeed JSON the launcher built from it
        command.txt         the launch command, one line per launch and resume
        devices.json        the devices the run took: GPU ids, or ["cpu"]
        train.log           stdout and stderr of the launcher and of every rank
        metrics.jsonl       one JSON row per optimizer step ("kind": "train") or evaluation ("eval")
        pid                 the deepspeed launcher's pid, which is the run's process-group id
        STOP                when present, the ranks stop after the current step (and save)
        checkpoint-<step>/  a PEFT adapter (safetensors), tokenizer, run_config.json, trainer_state.pt
        final/              the last step, the same files
        best/               the checkpoint with the best validation agreement, copied, the same files
        .tmp-<name>/        a checkpoint being written; never read
        .old-<name>/        the previous <name>/ while a new one replaces it; never read
        debug/              test mode only (LoRA hashes, reference logits)

A checkpoint is complete when its `complete.json` is there: it is written last, then the folder is
flushed and renamed into place, so a crash leaves either the old folder or a `.tmp-` one, never a
half-written checkpoint under a listed name. Everything that resumes, lists or grades a checkpoint
asks `is_complete`.

Standard library only: the UI imports this without pulling in torch.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

from data import paths

CONFIG = "config.json"
DS_CONFIG = "ds_config.json"
COMMAND = "command.txt"
DEVICES = "devices.json"
LOG = "train.log"
METRICS = "metrics.jsonl"
PHASES = "phases.jsonl"  # what the run is doing while no step is being counted (loading, evaluating...)
TRAINING_PHASE = "training"  # the phase in which the steps themselves say where the run is
PID = "pid"
STOP_FILE = "STOP"
FINAL = "final"
BEST = "best"
DEBUG = "debug"
CHECKPOINT_PREFIX = "checkpoint-"
STAGING_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
# Inside a checkpoint folder. The first two are PEFT's names: a checkpoint is a plain PEFT adapter.
COMPLETE_MARKER = "complete.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.pt"  # optimizer, scheduler, RNG and step of a checkpoint (resume)
RUN_CONFIG = "run_config.json"
# In the checkpoints folder itself: held while a launch checks the devices and starts its run.
LAUNCH_LOCK = ".launch.lock"

_LOG_TAIL_BYTES = 64 * 1024  # logs grow large; a tail never needs more than the end


# ------------------------------------------------------------------------------ checkpoints


def is_complete(checkpoint_dir: str | Path) -> bool:
    """Whether the trainer finished writing this checkpoint: its complete.json (written last)
    and the safetensors adapter are there. A `.tmp-` folder or one without the marker is not."""
    folder = Path(checkpoint_dir)
    return all((folder / name).is_file() for name in (COMPLETE_MARKER, ADAPTER_WEIGHTS, ADAPTER_CONFIG))


def read_complete(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """The checkpoint's complete.json ({"step": ..., "time": ..., and what the writer added}),
    or None when it is missing or unreadable."""
    try:
        data = json.loads((Path(checkpoint_dir) / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_complete(checkpoint_dir: str | Path, step: int, **extra: Any) -> None:
    """Mark a checkpoint complete. Call it after every other file of the checkpoint is written
    (`RunFolder.publish` does, then flushes and renames the folder into place)."""
    marker = {"step": int(step), "time": time.time(), **extra}
    (Path(checkpoint_dir) / COMPLETE_MARKER).write_text(json.dumps(marker), encoding="utf-8")


def checkpoint_step(checkpoint_dir: str | Path) -> int | None:
    """The step of a checkpoint: from its name (checkpoint-<step>), else its complete.json."""
    folder = Path(checkpoint_dir)
    if folder.name.startswith(CHECKPOINT_PREFIX):
        try:
            return int(folder.name[len(CHECKPOINT_PREFIX):])
        except ValueError:
            return None
    marker = read_complete(folder)
    step = marker.get("step") if marker else None
    return step if isinstance(step, int) else None


def is_inside_checkpoints(path: str | Path, root: str | Path | None = None) -> bool:
    """Whether `path`, with symlinks and `..` resolved, lies inside the checkpoints folder (the
    only place the app loads adapters from)."""
    base = Path(root if root is not None else paths.checkpoints_dir()).resolve()
    return base in Path(path).resolve().parents


def _completed_at(checkpoint_dir: Path) -> float:
    """When the checkpoint was completed: its complete.json's time (file times are too coarse to
    order two checkpoints saved in one clock tick), else the marker file's mtime."""
    when = (read_complete(checkpoint_dir) or {}).get("time")
    if isinstance(when, (int, float)):
        return float(when)
    return (checkpoint_dir / COMPLETE_MARKER).stat().st_mtime


def fsync_tree(folder: Path) -> None:
    """Flush every file of `folder` and the folder itself, so a rename publishes complete data."""
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename inside it survives a power cut)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------- the folder


class RunFolder:
    """One run's folder: its paths, and the readers and writers of its files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, run_id: str, root: str | Path | None = None) -> "RunFolder":
        """The folder of run `run_id` in the checkpoints folder. Ids that would step outside it
        (`..`, slashes, absolute paths, a symlink to elsewhere) are refused with ValueError."""
        base = Path(root if root is not None else paths.checkpoints_dir())
        resolved = base.resolve()
        if not run_id or (resolved / str(run_id)).resolve().parent != resolved:
            raise ValueError(f"run id {run_id!r} is not a folder name inside {resolved}")
        return cls(base / str(run_id))

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunFolder) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # -- names
    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def ds_config(self) -> Path:
        return self.path / DS_CONFIG

    @property
    def command(self) -> Path:
        return self.path / COMMAND

    @property
    def devices(self) -> Path:
        return self.path / DEVICES

    @property
    def log(self) -> Path:
        return self.path / LOG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def phases_file(self) -> Path:
        return self.path / PHASES

    @property
    def pid_file(self) -> Path:
        return self.path / PID

    @property
    def stop_file(self) -> Path:
        return self.path / STOP_FILE

    @property
    def final(self) -> Path:
        return self.path / FINAL

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def debug(self) -> Path:
        return self.path / DEBUG

    def checkpoint(self, step: int) -> Path:
        return self.path / f"{CHECKPOINT_PREFIX}{int(step)}"

    def exists(self) -> bool:
        """Whether this is a run folder (the launcher wrote its config.json)."""
        return self.config.is_file()

    # -- what the run is
    def base_model(self) -> str | None:
        """The base model the run trains (config.json "model"), or None when unreadable."""
        try:
            model = json.loads(self.config.read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError, AttributeError):
            return None
        return model if isinstance(model, str) and model else None

    def write_devices(self, devices: Iterable[str]) -> None:
        """Record the devices the run takes (GPU ids or "cpu"), for the one-run-per-device rule."""
        self.devices.write_text(json.dumps({"devices": sorted(devices)}) + "\n", encoding="utf-8")

    def read_devices(self) -> frozenset[str] | None:
        """The devices the run took, or None for a run launched before they were recorded."""
        try:
            found = json.loads(self.devices.read_text(encoding="utf-8")).get("devices")
        except (OSError, ValueError, AttributeError):
            return None
        return frozenset(map(str, found)) if isinstance(found, list) and found else None

    # -- the process
    def write_pid(self, pid: int) -> None:
        self.pid_file.write_text(str(int(pid)), encoding="utf-8")

    def read_pid(self) -> int | None:
        """The launcher pid recorded at launch, or None."""
        try:
            return int(self.pid_file.read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            return None

    # -- stopping
    def request_stop(self) -> None:
        """Ask every rank (on any host that sees this folder) to stop after the current step."""
        self.stop_file.write_text(str(time.time()), encoding="utf-8")

    def stop_requested(self) -> bool:
        return self.stop_file.exists()

    def clear_stop(self) -> None:
        """Forget an earlier stop request (a resumed run must not stop at its first step)."""
        self.stop_file.unlink(missing_ok=True)

    # -- metrics.jsonl
    def append_metrics(self, *rows: dict[str, Any]) -> None:
        """Append rows to metrics.jsonl (one write per call, so a reader sees whole lines or a
        last line it skips)."""
        text = "".join(json.dumps(row) + "\n" for row in rows)
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(text)

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every row of metrics.jsonl, in order; a line being written (not yet JSON) is skipped."""
        return _read_jsonl(self.metrics)

    def validation_at(self, step: int | None) -> dict[str, Any] | None:
        """The newest evaluation row with the validation agreement (``val_qwk``) at or before
        ``step`` (None: the run's last one): what a checkpoint of that step was judged by."""
        rows = [r for r in self.read_metrics() if r.get("kind") == "eval" and r.get("val_qwk") is not None
                and (step is None or (r.get("step") or 0) <= step)]
        return rows[-1] if rows else None

    def truncate_metrics(self, after_step: int) -> int:
        """Drop the rows of steps after `after_step` (a resume from that checkpoint draws the curve
        on from there); returns how many rows went. The file is replaced in one rename."""
        if not self.metrics.exists():
            return 0
        rows = self.read_metrics()
        keep = [r for r in rows if (r.get("step") or 0) <= after_step]
        lines = self.metrics.read_text(encoding="utf-8", errors="replace").splitlines()
        if len(keep) == len(rows) == len(lines):
            return 0
        tmp = self.path / f"{STAGING_PREFIX}{METRICS}"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, self.metrics)
        return len(rows) - len(keep)

    # -- phases.jsonl
    def note_phase(self, phase: str) -> None:
        """Record what the run starts doing now, for the Train tab: the launcher and the trainer's
        rank 0 write it; `TRAINING_PHASE` when the steps take over."""
        with open(self.phases_file, "a", encoding="utf-8") as f:
            f.write(json.dumps({"phase": phase, "time": time.time()}) + "\n")

    def phases(self) -> list[dict[str, Any]]:
        """Every phase noted, oldest first (a line being written is skipped)."""
        return [r for r in _read_jsonl(self.phases_file) if isinstance(r.get("phase"), str)]

    def current_phase(self) -> dict[str, Any] | None:
        """The phase noted last ({"phase", "time"}), unless a metrics row was written after it
        (the steps say where the run is then); None when there is none."""
        found = self.phases()
        if not found:
            return None
        try:
            last_row = self.metrics.stat().st_mtime
        except OSError:
            last_row = 0.0
        return found[-1] if float(found[-1].get("time") or 0) >= last_row else None

    # -- train.log
    def log_tail(self, n_lines: int = 40, width: int | None = None) -> str:
        """The last `n_lines` lines of train.log (read from the end of the file), a progress
        bar's carriage-return updates reduced to the last one, each cut to `width` characters
        when given. "" when there is no log yet."""
        try:
            with open(self.log, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - _LOG_TAIL_BYTES))
                data = fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        # Split on newlines only (str.splitlines would also split a progress bar's "\r" updates
        # into lines of their own); of a line's "\r" updates only the last one is shown.
        lines = data.replace("\r\n", "\n").rstrip("\n").split("\n")
        lines = [next((u for u in reversed(ln.split("\r")) if u.strip()), "") for ln in lines]
        lines = lines[-n_lines:] if n_lines > 0 and data else []
        if width is not None:
            lines = [ln if len(ln) <= width else ln[:width] + "..." for ln in lines]
        return "\n".join(lines)

    # -- checkpoints
    def complete_checkpoints(self) -> list[Path]:
        """The complete checkpoint-<step>/ folders, oldest first (newest last)."""
        found = []
        for d in self.path.glob(f"{CHECKPOINT_PREFIX}*"):
            step = checkpoint_step(d)
            if step is not None and d.is_dir() and is_complete(d):
                found.append((step, d))
        return [d for _, d in sorted(found)]

    def last_complete_checkpoint(self) -> Path | None:
        """The newest complete checkpoint-<step>/, where a resume starts; half-written ones
        (no complete.json, or still `.tmp-`) are never it."""
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def adapters(self) -> list[Path]:
        """Every complete adapter of the run in the order to offer them: best/, final/, then the
        checkpoints newest first. The first one is `default_adapter()`."""
        named = [d for d in (self.best, self.final) if is_complete(d)]
        return named + self.complete_checkpoints()[::-1]

    def default_adapter(self) -> Path | None:
        """The adapter to grade with: best/ (the best validation agreement) when complete, else
        final/, else the last complete checkpoint; None before the first checkpoint."""
        found = self.adapters()
        return found[0] if found else None

    def staging(self, name: str) -> Path:
        """An empty `.tmp-<name>/` to write checkpoint `name` into before `publish`."""
        tmp = self.path / f"{STAGING_PREFIX}{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def publish(self, staged: Path, name: str, step: int, **marker: Any) -> Path:
        """Make the staged folder checkpoint `name` (checkpoint-<step>, final or best): write its
        complete.json (with `marker`'s keys), flush it and rename it into place, replacing an
        older `name/` so that a crash at any point leaves one complete folder under the name."""
        write_complete(staged, step, **marker)
        fsync_tree(staged)
        out = self.path / name
        if out.exists():
            old = self.path / f"{OLD_PREFIX}{name}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
            os.rename(staged, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staged, out)
        fsync_dir(self.path)
        return out

    def save_best(self, checkpoint_dir: Path, **marker: Any) -> Path:
        """Copy a complete checkpoint to best/ (its complete.json also says which checkpoint it
        came from, plus `marker`, e.g. the agreement that made it best)."""
        if not is_complete(checkpoint_dir):
            raise ValueError(f"{checkpoint_dir} is not a complete checkpoint (no {COMPLETE_MARKER}); "
                             "only a complete one can become best/")
        step = checkpoint_step(checkpoint_dir)
        if step is None:
            raise ValueError(f"{checkpoint_dir}: no step in its name or its {COMPLETE_MARKER}")
        staged = self.staging(BEST)
        shutil.copytree(checkpoint_dir, staged, dirs_exist_ok=True)
        (staged / COMPLETE_MARKER).unlink()
        return self.publish(staged, BEST, step, source=Path(checkpoint_dir).name, **marker)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file another process appends to, in order: a line being
    written (not yet JSON) is skipped; no file, no rows."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def run_folders(root: str | Path | None = None) -> list[RunFolder]:
    """Every run folder in the checkpoints folder (those with a config.json), in name order."""
    base = Path(root if root is not None else paths.checkpoints_dir())
    if not base.is_dir():
        return []
    return [RunFolder(d) for d in sorted(base.iterdir()) if d.is_dir() and (d / CONFIG).is_file()]


def all_adapters(root: str | Path | None = None) -> list[tuple[str, Path]]:
    """("<run>/<name>", folder) for every complete adapter in the checkpoints folder: the run
    with the newest checkpoint first, each run's own `adapters()` order (best/ first)."""
    runs = []
    for folder in run_folders(root):
        found = folder.adapters()
        if found:
            runs.append((max(_completed_at(d) for d in found), folder, found))
    runs.sort(key=lambda t: t[0], reverse=True)
    return [(f"{folder.run_id}/{d.name}", d) for _, folder, found in runs for d in found]
