"""Shared pieces of the reliability and security tests (no tests here).

Real processes only: the training CLI (`python -m training`), the `deepspeed` launcher and its
rank processes, and `python app.py` servers. A tiny graded dataset (8 one-question submissions,
~150 GPT-OSS tokens each) keeps every smoke-preset step around a second on 2 cores, so a test
run's cost is mostly the launcher start-up.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator
from tests.conftest import REPO

PY = sys.executable
ENTRY_NAME = "train_entry.py"


def write_tiny_dataset(folder: Path, n: int = 8) -> Path:
    """`folder/tiny.json`: n short graded submissions (valid), for fast smoke runs."""
    folder.mkdir(parents=True, exist_ok=True)
    subs = []
    for i in range(n):
        s = i % 3
        subs.append({"submission_id": f"tiny-{i}", "score": s, "max_score": 2,
                     "rubric_alignment": [{"question": "What is 2 + 2?", "answer": f"It is {2 + i}.",
                                           "score": s, "max_score": 2, "justification": "checked"}]})
    (folder / "tiny.json").write_text(json.dumps(subs), encoding="utf-8")
    return folder


def tiny_overrides(data: Path, *, max_steps: int, save_every: int, name: str = "rel", ranks: int = 1) -> list[str]:
    """--set values: the smoke preset (tiny GPT-OSS, ZeRO-2 on gloo) on the tiny dataset, with one
    rank unless a test is about several: a second rank costs ~25 CPU-seconds of start-up and step
    time on 2 cores, and the launcher, the store and the UI treat one rank as they treat two.
    Ranks working together (sharded state, gathers, a rank killed under its peers) are under test
    in tests/test_train_deepspeed.py, test_agreement.py, test_packing.py and the fault tests' run."""
    return [f"name={name}", f"datasets={json.dumps([str(data)])}", f"max_steps={max_steps}",
            f"save_every_steps={save_every}", "eval_fraction=0", "per_device_batch_size=1",
            "gradient_accumulation_steps=1", "max_length=512", f"num_processes={ranks}"]


def studio_env(checkpoints: Path, db: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "GRADER_CHECKPOINTS": str(checkpoints), "GRADER_DB": str(db),
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    env.pop("GRADER_AUTH", None)
    env.update(extra)
    return env


def training_cli(args: list[str], env: dict[str, str], timeout_s: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "training", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout_s)


def detach_run(overrides: list[str], env: dict[str, str]) -> str:
    """`python -m training run --preset smoke --set ... --detach`; returns the run id."""
    args = ["run", "--preset", "smoke", "--detach"]
    for o in overrides:
        args += ["--set", o]
    out = training_cli(args, env, timeout_s=300)
    assert out.returncode == 0, out.stdout + out.stderr
    first = next(line for line in out.stdout.splitlines() if line.startswith("run "))
    return first.split()[1].rstrip(":")


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; last: {last!r}")


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def rank_pids(run_dir: Path) -> dict[int, int]:
    """{local_rank: pid} of the live train_entry.py rank processes of `run_dir` (not the
    deepspeed launcher processes, whose command lines also name train_entry.py)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        pid = int(d.name)
        cmd = _cmdline(pid)
        if (len(cmd) > 2 and cmd[2].endswith(ENTRY_NAME) and str(run_dir) in cmd
                and _state(pid) not in ("Z", "X")):
            rank = next((int(a.split("=", 1)[1]) for a in cmd if a.startswith("--local_rank=")), -1)
            out[rank] = pid
    return out


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid` (the launcher starts a new session)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                out.append(int(d.name))
    return out


def kill_group(pgid: int | None) -> None:
    """Clean-up: end a run's whole process group (only ever the group this test started)."""
    if not pgid:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


@contextmanager
def frozen(pgid: int, db: Path) -> Iterator[None]:
    """The run's process group stopped (SIGSTOP) for the block, then continued: a test's way to
    ask for something a short run could otherwise finish first. Frozen only at a moment when
    none of its processes holds the store's write lock (a rank records metrics in it), or the
    block's own store reads would wait for a process that cannot let go."""
    for _ in range(200):
        os.killpg(pgid, signal.SIGSTOP)
        try:
            conn = sqlite3.connect(str(db), timeout=0.05)
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.rollback()
                break
            finally:
                conn.close()
        except sqlite3.OperationalError:  # locked: let it finish that write, try again
            os.killpg(pgid, signal.SIGCONT)
            time.sleep(0.02)
    else:
        raise AssertionError(f"the run (process group {pgid}) held the store's lock at every try")
    try:
        yield
    finally:
        os.killpg(pgid, signal.SIGCONT)


def launcher_pid(run_dir: Path) -> int:
    return int((run_dir / "pid").read_text())


def train_steps(run_dir: Path) -> list[int]:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return []
    steps = []
    for line in f.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("kind") == "train":
            steps.append(int(row["step"]))
    return steps


def complete_checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(d.name.split("-", 1)[1]) for d in run_dir.glob("checkpoint-*")
                  if (d / "complete.json").is_file())


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) with a socket listening on `port`."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            addr, p = parts[1].rsplit(":", 1)
            if int(p, 16) == port and parts[3] == "0A":  # 0A = LISTEN
                out.add(addr)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python app.py --port N ARGS` as a real process with its own log."""

    def __init__(self, workdir: Path, env: dict[str, str], *args: str, port: int | None = None):
        self.workdir, self.env, self.args = workdir, env, args
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 240) -> "AppServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen([PY, str(REPO / "app.py"), "--port", str(self.port), *self.args],
                                     cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("app.py exited:\n" + self.log()[-4000:])
            try:
                urllib.request.urlopen(self.url, timeout=5)
                return self
            except urllib.error.HTTPError:
                return self  # answering (a login page, say)
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("app.py did not answer:\n" + self.log()[-4000:])
                time.sleep(0.5)

    def log(self) -> str:
        try:
            return (self.workdir / f"server-{self.port}.log").read_text(errors="replace")
        except OSError:
            return ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def app_server(workdir: Path, env: dict[str, str], *args: str) -> Iterator[AppServer]:
    srv = AppServer(workdir, env, *args).start()
    try:
        yield srv
    finally:
        srv.stop()
