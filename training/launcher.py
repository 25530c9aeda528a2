"""Start, follow, stop and inspect training runs: the launch path of the UI and the CLI alike.

A run is a folder (`data.run_folder.RunFolder`, which owns its layout) plus a row in the store.
`launch` refuses a run whose devices (GPUs, or the CPU) a live run already uses, then writes the
RunConfig, the DeepSpeed JSON built here from it and the exact command into the folder, and starts
DeepSpeed's launcher as a subprocess (no shell, its own process group) with stdout+stderr going
to `train.log`. The launcher runs `training/train_entry.py` on every rank.

Stopping is cooperative: `stop_run` drops the stop file into the run folder and sends SIGTERM to
the rank processes; they finish the current optimizer step, save a checkpoint, mark the run
"stopped" and exit 0.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from data import paths
from data.library_noise import is_library_noise
from data.run_folder import LAUNCH_LOCK, RunFolder
from training import memory
from training.checks import check_config
from training.config import RunConfig, load_config, save_config

ENTRY = Path(__file__).resolve().parent / "train_entry.py"
ACTIVE = ("created", "running")  # store statuses of a run that may still hold its devices


class ConfigRefused(ValueError):
    """The configuration cannot work; `problems` says what to change."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("refusing to launch:\n" + "\n".join(f"  - {p}" for p in problems))


class DevicesBusy(RuntimeError):
    """A live run already uses some of the devices a launch wants (one run per GPU set, or one
    CPU run per machine). The message names that run and how to stop it."""

    def __init__(self, run_id: str, status: str, shared: frozenset[str]) -> None:
        self.run_id, self.status, self.shared = run_id, status, shared
        where = "the CPU" if shared == {"cpu"} else "GPU " + ",".join(sorted(shared))
        super().__init__(
            f"Refused: run '{run_id}' is still {status} on {where}. One training run at a time per "
            f"GPU set: stop it (python -m training stop {run_id}, or Stop in the Train tab) or wait "
            "for it to finish, then launch again.")


@dataclass
class RunHandle:
    run_id: str
    run_dir: Path
    command: list[str]
    process: subprocess.Popen | None

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir)


# ------------------------------------------------------------------------------- building


def deepspeed_binary() -> Path:
    """The `deepspeed` launcher of this interpreter's environment (.venv/bin/deepspeed)."""
    here = Path(sys.executable).parent / "deepspeed"
    if here.exists():
        return here
    found = shutil.which("deepspeed")
    if found:
        return Path(found)
    raise FileNotFoundError(f"no `deepspeed` launcher next to {sys.executable} or on PATH: pip install deepspeed")


def _cuda_available() -> bool:
    return memory.gpu_count() > 0


def build_ds_config(cfg: RunConfig) -> dict:
    """The DeepSpeed JSON for `cfg`.

    No "optimizer" block: DeepSpeed would JIT-compile fused_adam (~80 s, fails on some GPUs); the
    trainer passes a torch AdamW instead. DeepSpeed's bf16 mode stays off: it would call
    `.bfloat16()` on the whole module (the fp32 LoRA masters and 4-bit weights included); the
    base model is already loaded in bf16 on GPU by `training.models`.
    """
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True,
                    allgather_bucket_size=int(2e8), reduce_bucket_size=int(2e8))
    if cfg.offload_optimizer and cfg.zero_stage >= 2:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": _cuda_available()}
    return {
        "train_micro_batch_size_per_gpu": cfg.per_device_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW under ZeRO
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_command(cfg: RunConfig, run_dir: Path, *, resume: bool = False, master_port: int | None = None) -> list[str]:
    """The launch command (a list: no shell is involved).

    On one host: DeepSpeed's per-host launcher (`python -m deepspeed.launcher.launch`) told which
    devices its ranks take, the command the `deepspeed` runner would build and start after ~4.5 s
    of its own imports (BENCHMARKS.md, "The suite ... one rank"). It takes the GPUs `device_set`
    names (CUDA_VISIBLE_DEVICES respected, also with num_gpus), or num_processes CPU ranks on gloo.
    With a hostfile, the runner, which reaches the other hosts.
    """
    port = str(master_port or _free_port())
    if cfg.hostfile:
        cmd = [str(deepspeed_binary()), "--hostfile", str(cfg.hostfile), "--master_port", port]
    else:
        world = {"localhost": _gpu_ids(cfg.num_gpus) if _cuda_available() else list(range(cfg.num_processes))}
        cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch",
               "--world_info", base64.urlsafe_b64encode(json.dumps(world).encode()).decode(),
               "--master_addr", "127.0.0.1", "--master_port", port]
    cmd += [str(ENTRY), "--run_dir", str(run_dir)]
    if resume:
        cmd.append("--resume")
    return cmd


def world_of(command: list[str]) -> dict[str, list] | None:
    """The hosts and devices a launch command gives its ranks ({"localhost": [0, 1]}); None for
    the multi-host runner, whose hostfile says."""
    if "--world_info" not in command:
        return None
    return json.loads(base64.urlsafe_b64decode(command[command.index("--world_info") + 1]))


def command_text(command: list[str]) -> str:
    """The command as a shell line, and where its ranks run in words (the world info is base64)."""
    world = world_of(command)
    if world is None:
        return f"{shlex.join(command)}\n# ranks: on the hosts of the hostfile"
    gpus = _cuda_available()
    where = "; ".join(f"{len(ids)} on {host} " + (f"(GPUs {', '.join(map(str, ids))})" if gpus else "(CPU, gloo)")
                      for host, ids in world.items())
    return f"{shlex.join(command)}\n# ranks: {where}"


def new_run_id(cfg: RunConfig) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.name).strip("-.")[:80].strip("-.") or "run"
    base = f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id, n = base, 2
    while (paths.checkpoints_dir() / run_id).exists():
        run_id, n = f"{base}-{n}", n + 1
    return run_id


def _env() -> dict[str, str]:
    env = dict(os.environ)
    if not _cuda_available():
        # What DeepSpeed would pick anyway, stated: each rank skips the detection and its warning.
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(paths.cache_dir() / "torch_extensions"))  # shm_comm JIT, once
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    root = str(paths.REPO_ROOT)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # The run folder and store must be the same ones this process sees, wherever the child runs.
    env["GRADER_CHECKPOINTS"] = str(paths.checkpoints_dir())
    env["GRADER_DB"] = str(paths.db_path())
    env["GRADER_CACHE"] = str(paths.cache_dir())
    return env


# ------------------------------------------------------------------------------- running


def device_set(cfg: RunConfig | dict[str, Any]) -> frozenset[str]:
    """The devices a run with `cfg` takes here: GPU ids, or {"cpu"} on a machine without CUDA.

    A run takes the first `num_gpus` visible GPUs (all when None; `build_command`), so two GPU runs
    on one host overlap unless CUDA_VISIBLE_DEVICES differs between them.
    """
    if not _cuda_available():  # 0 GPUs with torch missing or broken: the run could only use the CPU
        return frozenset({"cpu"})
    num_gpus = cfg.get("num_gpus") if isinstance(cfg, dict) else cfg.num_gpus
    return frozenset(str(i) for i in _gpu_ids(num_gpus))


def _gpu_ids(num_gpus: int | None) -> list:
    """The first `num_gpus` visible GPUs (all when None), as CUDA_VISIBLE_DEVICES names them (an
    index as an int, a UUID as given)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    ids = [int(v) if v.isdigit() else v for v in visible] or list(range(memory.gpu_count()))
    return ids[: num_gpus or len(ids)]


def running_runs(store=None) -> list[dict]:
    """The store's runs that are created or running and whose process group is alive (a run
    marked running whose processes are gone is marked failed on the way, as run_status does)."""
    from data.store import Store

    store = store or Store()
    out = []
    for row in store.list_runs():
        if row.get("status") not in ACTIVE:
            continue
        live = _refresh(row, store)
        if live["alive"] and live["status"] in ACTIVE:
            out.append(live)
    return out


def check_devices(cfg: RunConfig, store=None) -> frozenset[str]:
    """The devices `cfg` takes; raises DevicesBusy naming a live run that uses any of them."""
    wanted = device_set(cfg)
    for row in running_runs(store):
        used = RunFolder(row["run_dir"]).read_devices() or device_set(row.get("config") or {})
        if used & wanted:
            raise DevicesBusy(row["run_id"], row["status"], used & wanted)
    return wanted


@contextmanager
def _launch_lock() -> Iterator[None]:
    """One launch at a time on this machine, across processes (the app's threads and CLI runs
    alike), from the device check until the new run is recorded running with its pid."""
    root = paths.checkpoints_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LAUNCH_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resumed_config(path: Path) -> RunConfig:
    """A run's saved config, to resume it. A run saved before sequence packing existed has no
    ``pack_sequences``: it resumes unpacked (what it was planned with), since packing would change
    its steps per epoch, and so its schedule, halfway through."""
    cfg = load_config(path)
    if "pack_sequences" not in json.loads(Path(path).read_text(encoding="utf-8")):
        cfg = cfg.model_copy(update={"pack_sequences": "off"})
    return cfg


def launch(cfg: RunConfig | None, *, resume: str | None = None, store=None, wait: bool = False) -> RunHandle:
    """Check `cfg` and the devices, prepare the run folder and start training; returns at once
    unless `wait`.

    Raises ConfigRefused (what to change) or DevicesBusy (a live run holds some of the devices:
    one run at a time per GPU set, or on the CPU). `resume=RUN_ID` reuses that run's folder and
    continues from its last complete checkpoint; `cfg` may then be None (the run's own
    config.json) or a changed config (say, more steps).
    """
    from data.store import Store

    store = store or Store()
    folder = RunFolder.of(resume) if resume else None
    if folder is not None:
        if not folder.exists():
            raise FileNotFoundError(f"no run {resume!r} in {paths.checkpoints_dir()} (no config.json)")
        cfg = cfg or resumed_config(folder.config)
    elif cfg is None:
        raise ValueError("launch needs a RunConfig (or resume=RUN_ID)")
    problems = check_config(cfg)
    if problems:
        raise ConfigRefused(problems)

    with _launch_lock():
        if folder is not None and _alive(_pid_of(folder.run_id)):
            raise ValueError(f"run {folder.run_id} is still running; stop it first "
                             f"(python -m training stop {folder.run_id})")
        devices = check_devices(cfg, store)
        folder = folder or RunFolder(paths.checkpoints_dir() / new_run_id(cfg))
        run_id, run_dir = folder.run_id, folder.path
        run_dir.mkdir(parents=True, exist_ok=True)
        folder.clear_stop()
        save_config(cfg, folder.config)
        folder.ds_config.write_text(json.dumps(build_ds_config(cfg), indent=2) + "\n")
        folder.write_devices(devices)
        command = build_command(cfg, run_dir, resume=bool(resume))
        with open(folder.command, "a" if resume else "w", encoding="utf-8") as f:
            f.write(shlex.join(command) + "\n")
        if resume and store.get_run(run_id) is not None:
            store.set_run_status(run_id, "created")
        else:
            store.create_run(run_id, cfg.model_dump(), command, str(run_dir))

        sweep_shm_buffers()  # what earlier runs killed with -9 left in /dev/shm
        folder.note_phase("starting the trainer processes (DeepSpeed's launcher)")
        log = open(folder.log, "ab")
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        try:
            process = subprocess.Popen(
                command, cwd=str(paths.REPO_ROOT), env=_env(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,  # own process group: stop/kill reach every rank
            )
        except OSError as e:
            store.set_run_status(run_id, "failed", error=f"could not start {command[0]}: {e}")
            raise
        finally:
            log.close()
        folder.write_pid(process.pid)
        store.set_run_status(run_id, "running", pid=process.pid)
    handle = RunHandle(run_id, run_dir, command, process)
    if wait:
        process.wait()
        finalize(handle)
    return handle


def remove_shm_buffer(port: int | str | None, rank: int) -> int:
    """Unlink the DeepSpeed CPU all-reduce segment of ``rank`` in the run on ``port``.

    DeepSpeed's shm communicator (CPU training) makes a 64 MiB ``/dev/shm`` segment per rank and
    never unlinks it: every CPU run left 128 MiB of RAM behind for good, until a few hundred runs
    filled /dev/shm and the OOM killer stepped in.
    Unlinking is safe while ranks still run: they keep their mappings, only the name goes."""
    if not port:
        return 0
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"
    return _unlink_all(Path("/dev/shm").glob(pattern))


def _unlink_all(files) -> int:
    n = 0
    for f in files:
        try:
            f.unlink()
            n += 1
        except OSError:
            pass
    return n


def sweep_shm_buffers() -> int:
    """Unlink every DeepSpeed all-reduce segment of this user that no live process has mapped or
    open (runs killed with -9 leave theirs). Called at each launch and after each run.

    Open counts too: a starting rank creates its segment, fills its 64 MiB and only then maps it,
    and the other ranks wait for that name; a sweep by a concurrent launch (another GPU set, a
    second studio) that unlinked it in between left the run waiting forever. The creator holds
    the segment open from the moment it exists."""
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_"
    files = list(Path("/dev/shm").glob(prefix + "*"))
    if not files:
        return 0
    in_use: set[str] = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            lines = (proc / "maps").read_text().splitlines()
            fds = list((proc / "fd").iterdir())
        except OSError:  # gone meanwhile, or not ours to read
            continue
        for fd in fds:
            try:
                lines.append(os.readlink(fd))
            except OSError:  # closed meanwhile
                pass
        for line in lines:
            i = line.find("/dev/shm/" + prefix)
            if i >= 0:
                in_use.add(line[i + len("/dev/shm/"):].split(" ")[0])
    return _unlink_all(f for f in files if f.name not in in_use)


def finalize(handle: RunHandle) -> str:
    """After the launcher exits: a run the trainer did not mark (crash before start) -> failed;
    DeepSpeed's leftover shared-memory segments of the run are removed."""
    from data.store import Store

    store = Store()
    rc = handle.process.wait() if handle.process else None
    sweep_shm_buffers()
    row = store.get_run(handle.run_id) or {}
    status = row.get("status")
    if status in ("created", "running") and not (handle.process and _alive(handle.process.pid)):
        lines = [ln for ln in handle.folder.log_tail(200).splitlines() if not is_library_noise(ln)]
        tail = "\n".join(lines[-15:])
        store.set_run_status(handle.run_id, "failed", error=f"launcher exited with {rc}; train.log ends:\n{tail}")
        status = "failed"
    return status or "unknown"


def _pid_of(run_id: str) -> int | None:
    """The run's launcher pid (its process-group id): the store's, else the run folder's."""
    from data.store import Store

    row = Store().get_run(run_id) or {}
    if row.get("pid"):
        return int(row["pid"])
    return RunFolder.of(run_id).read_pid()


def _group_members(pgid: int) -> list:
    """Live (non-zombie) processes of the run's process group. `launch` starts DeepSpeed's launcher
    with start_new_session, so its pid is the group id of the whole run: the launcher (and, with a
    hostfile, the runner above it) and every rank. The ranks may outlive a killed launcher; the
    group still finds them."""
    import psutil

    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (OSError, psutil.Error):
            pass
    return out


def _alive(pid: int | None) -> bool:
    """Whether any process of the run (its process group) is still there."""
    return bool(pid) and bool(_group_members(int(pid)))


def _rank_processes(pid: int) -> list:
    """The train_entry.py rank processes of the run whose launcher had `pid`."""
    import psutil

    out = []
    for c in _group_members(pid):
        try:
            cmd = c.cmdline()
            # A rank: ".../train_entry.py --local_rank=N ..."; not launch.py, whose arguments
            # name the script too (signalling it would start its 30 s kill timer).
            if any(part.endswith(ENTRY.name) for part in cmd) and any(
                part.startswith("--local_rank") for part in cmd
            ) and "deepspeed.launcher.launch" not in cmd:
                out.append(c)
        except psutil.Error:
            pass
    return out


def stop_run(run_id: str) -> bool:
    """Ask a run to stop: it finishes the step, saves, marks itself "stopped". False if not running.

    SIGTERM goes to the rank processes themselves (not the deepspeed launcher, which would kill
    them after 30 s); the STOP file covers ranks on other hosts.
    """
    folder = RunFolder.of(run_id)
    pid = _pid_of(run_id)
    if not _alive(pid):
        return False
    folder.request_stop()
    ranks = _rank_processes(pid)
    for r in ranks:
        try:
            r.send_signal(signal.SIGTERM)
        except Exception:
            pass
    if not ranks:  # still starting up: the process group gets it
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            pass
    return True


def run_status(run_id: str) -> dict:
    """The store's row for the run, plus `alive`, the last train/eval metrics and checkpoints.

    A run marked running whose process is gone is marked failed here (it crashed unrecorded)."""
    from data.store import Store

    store = Store()
    row = store.get_run(run_id)
    if row is None:
        raise KeyError(f"no run {run_id!r} in {store.path}")
    row = _refresh(row, store)
    metrics = RunFolder(row["run_dir"]).read_metrics()
    last_train = next((m for m in reversed(metrics) if m.get("kind") == "train"), None)
    last_eval = next((m for m in reversed(metrics) if m.get("kind") == "eval"), None)
    return {**row, "last_train": last_train, "last_eval": last_eval, "checkpoints": store.checkpoints(row["run_id"])}


def _refresh(row: dict, store) -> dict:
    """The run's row with `alive` (its process group has live processes); a run still marked
    created/running whose processes are all gone crashed unrecorded, and is marked failed."""
    alive = _alive(row.get("pid"))
    if row["status"] in ACTIVE and not alive and row.get("pid"):
        store.set_run_status(row["run_id"], "failed", error="the training process exited without recording an "
                             f"end; see {RunFolder(row['run_dir']).log}")
        row = store.get_run(row["run_id"])
    return {**row, "alive": alive}


def follow(handle: RunHandle, out=sys.stdout) -> str:
    """Print progress (a bar with ETA) until the run's launcher exits; Ctrl-C stops the run cleanly."""
    from tqdm import tqdm

    # Rows already there (a resumed run) are not news; the file is small, so it is re-read.
    folder = handle.folder
    seen = {(r.get("kind"), r.get("step")) for r in folder.read_metrics()}
    bar = None
    log_pos = 0
    stopping = False
    while True:
        try:
            # Done when the launcher exited and no rank of its group is left (ranks can
            # outlive a killed launcher).
            done = handle.process.poll() is not None and not _alive(handle.process.pid)
            if bar is None:  # until the first step, show what the trainer says
                log_pos = _echo_log(folder.log, log_pos, out)
            for row in folder.read_metrics():
                key = (row.get("kind"), row.get("step"))
                if key in seen:
                    continue
                seen.add(key)
                if bar is None:
                    bar = tqdm(total=row["total_steps"], initial=row["step"] - 1, unit="step", file=out,
                               dynamic_ncols=True, desc=handle.run_id)
                if row["kind"] == "train":
                    bar.update(row["step"] - bar.n)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                else:
                    bar.write(f"eval loss {row['eval_loss']:.4f} at step {row['step']}")
            if done:
                break
            time.sleep(0.5)
        except KeyboardInterrupt:
            if stopping:
                os.killpg(handle.process.pid, signal.SIGKILL)
            else:
                stopping = True
                print("\nstopping after this step (Ctrl-C again kills)...", file=out, flush=True)
                stop_run(handle.run_id)
    if bar is not None:
        bar.close()
    _echo_log(folder.log, log_pos if bar is None else _tail_pos(folder.log, 8), out)
    return finalize(handle)


def _tail_pos(log: Path, n: int) -> int:
    """The offset in `log` where its last `n` lines start."""
    try:
        data = log.read_bytes()
    except OSError:
        return 0
    pos = len(data)
    for _ in range(n + 1):
        pos = data.rfind(b"\n", 0, pos)
        if pos < 0:
            return 0
    return pos + 1


def _echo_log(path: Path, pos: int, out) -> int:
    """Print the trainer's own lines (timestamped "[hh:mm:ss] ...") written since `pos`."""
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            data = f.read()
    except OSError:
        return pos
    end = data.rfind(b"\n") + 1
    for line in data[:end].decode("utf-8", "replace").splitlines():
        if (re.match(r"\[\d\d:\d\d:\d\d\] ", line) or "Error" in line or "Traceback" in line) \
                and not is_library_noise(line):
            print(line, file=out, flush=True)
    return pos + end
