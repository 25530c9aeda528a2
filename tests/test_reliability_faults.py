"""Faults with real processes: kill -9 of a training rank mid-run, half-written checkpoints,
resume after a crash while the UI writes the same SQLite store, and a full disk during a
checkpoint save (a small tmpfs as the checkpoints folder).

One smoke-preset run (tiny GPT-OSS, 2 gloo ranks, ZeRO-2, tiny dataset) is shared by the kill,
half-written, resume and shell-injection tests; the full-disk test has its own run on its own
tmpfs. The shared run is deliberately hostile: its name, dataset folder and checkpoints folder
are full of shell syntax (`;`, `$(...)`, backticks, `&&`), so every launch and resume command of
this module also proves that no shell is involved (marker files never appear).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.test_reliability_support import (PY, REPO, complete_checkpoints, detach_run, group_pids,
                                            kill_group, launcher_pid, rank_pids, studio_env,
                                            tiny_overrides, train_steps, training_cli, wait_for,
                                            write_tiny_dataset)

START_TIMEOUT_S = 600   # launcher + model start-up on a busy 2-core machine (seen: 1.5-2.5 min)
DEATH_TIMEOUT_S = 180   # kill -9 -> every process of the run gone and the run marked failed


# Folder names cannot hold "/": their payloads touch a relative name, which would land in the
# launcher's working directory (the repo root) or the test's folders.
PWNED = "pwned-by-path"


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A smoke run whose rank 0 got SIGKILL mid-training, after its first complete checkpoint."""
    root = tmp_path_factory.mktemp("faults")
    short = Path(tempfile.mkdtemp(prefix="inj"))  # short marker paths keep the run name short
    markers = [short / f"M{i}" for i in range(4)]
    markers[3].write_text("must survive")
    name = f"kill; touch {markers[0]}; $(touch {markers[1]}) `touch {markers[2]}` && rm -rf {markers[3]}"
    data = write_tiny_dataset(root / f"data; touch {PWNED} $(touch {PWNED}) `touch {PWNED}`")
    ckpts = root / f"ckpt && touch {PWNED} ; $(touch {PWNED})"
    env = studio_env(ckpts, root / "studio.db")
    run_id = detach_run(tiny_overrides(data, max_steps=200, save_every=2, name=name, ranks=2), env)
    run_dir = ckpts / run_id
    pgid = launcher_pid(run_dir)
    try:
        # Kill after checkpoint-2 is complete and step 3 has been logged: mid-training, between
        # checkpoints, while the ranks are inside a step.
        wait_for(lambda: complete_checkpoints(run_dir) and max(train_steps(run_dir) or [0]) >= 3,
                 START_TIMEOUT_S, "checkpoint-2 and step 3", poll_s=0.2)
        ranks = rank_pids(run_dir)
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[0], signal.SIGKILL)
        killed_at_step = max(train_steps(run_dir))
        # Every process of the run (launcher, other rank) goes away on its own.
        wait_for(lambda: not group_pids(pgid), DEATH_TIMEOUT_S, "the run's processes to exit")
    finally:
        kill_group(pgid)
    yield {"root": root, "env": env, "run_id": run_id, "run_dir": run_dir, "data": data,
           "killed_at_step": killed_at_step, "markers": markers, "ckpts": ckpts}
    shutil.rmtree(short, ignore_errors=True)


def _use(run: dict, monkeypatch) -> None:
    monkeypatch.setenv("GRADER_CHECKPOINTS", run["env"]["GRADER_CHECKPOINTS"])
    monkeypatch.setenv("GRADER_DB", run["env"]["GRADER_DB"])


def test_kill9_of_a_rank_marks_the_run_failed_in_cli_and_ui(killed_run, monkeypatch):
    _use(killed_run, monkeypatch)
    from app.train_tab import run_view
    from training.launcher import run_status

    st = run_status(killed_run["run_id"])
    assert st["status"] == "failed" and not st["alive"], st
    assert st["error"], "a failed run says why"
    out = training_cli(["status", killed_run["run_id"]], killed_run["env"])
    assert "failed" in out.stdout, out.stdout + out.stderr
    status_md, bar, _fig, _log = run_view(killed_run["run_id"])
    assert "**failed**" in status_md, status_md
    assert "ETA" not in bar  # not shown as still running


def test_kill9_keeps_the_last_complete_checkpoint_loadable(killed_run):
    import torch
    from safetensors.torch import load_file

    run_dir = killed_run["run_dir"]
    done = complete_checkpoints(run_dir)
    assert done and done[-1] <= killed_run["killed_at_step"], (done, killed_run["killed_at_step"])
    last = run_dir / f"checkpoint-{done[-1]}"
    weights = load_file(str(last / "adapter_model.safetensors"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    state = torch.load(last / "trainer_state.pt", map_location="cpu", weights_only=False)
    assert state["step"] == done[-1]
    assert json.loads((last / "adapter_config.json").read_text())["r"] == 8
    assert not (run_dir / "final").exists()


def _plant_half_written(run_dir: Path) -> tuple[Path, Path]:
    """A checkpoint folder without its completion marker (crash before the marker) and a
    temporary folder (crash before the rename), both newer than every real checkpoint."""
    last = run_dir / f"checkpoint-{complete_checkpoints(run_dir)[-1]}"
    no_marker = run_dir / "checkpoint-9998"
    tmp = run_dir / ".tmp-checkpoint-9999"
    for d in (no_marker, tmp):
        if not d.exists():
            shutil.copytree(last, d)
    (no_marker / "complete.json").unlink(missing_ok=True)
    return no_marker, tmp


def test_half_written_checkpoints_are_never_listed_for_grading(killed_run, monkeypatch):
    _use(killed_run, monkeypatch)
    from app import jobs
    from app.grade_tab import adapter_choices
    from data.run_folder import RunFolder

    run_dir = killed_run["run_dir"]
    no_marker, tmp = _plant_half_written(run_dir)
    assert RunFolder(run_dir).last_complete_checkpoint().name == f"checkpoint-{complete_checkpoints(run_dir)[-1]}"
    listed = {Path(p).name for _, p in jobs.list_adapters()}
    offered = {Path(p).name for _, p in adapter_choices() if p}
    assert tmp.name not in listed | offered
    assert no_marker.name not in listed | offered, f"incomplete checkpoint offered for grading: {listed}"


def test_resume_after_kill_continues_while_the_ui_writes_the_store(killed_run, monkeypatch):
    """`python -m training run --resume RUN` carries on from the last complete checkpoint (not a
    half-written one) while another process writes grade rows like the Grade tab does: the
    trainer's metric rows and every grade row are in SQLite afterwards."""
    _use(killed_run, monkeypatch)
    from data.store import Store

    run_id, run_dir = killed_run["run_id"], killed_run["run_dir"]
    _plant_half_written(run_dir)
    resume_from = complete_checkpoints(run_dir)[-1]
    target = resume_from + 3

    n_grades = 300
    writer = subprocess.Popen([PY, "-c", WRITER, str(n_grades)], cwd=REPO, env=killed_run["env"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = training_cli(["run", "--resume", run_id, "--set", f"max_steps={target}"],
                           killed_run["env"])
    finally:
        w_out, _ = writer.communicate(timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert writer.returncode == 0, w_out

    log = (run_dir / "train.log").read_text(errors="replace")
    assert f"resuming from checkpoint-{resume_from} at step {resume_from}" in log, log[-3000:]
    assert "checkpoint-9998" not in log.split("resuming from", 1)[1].split("\n", 1)[0]
    steps = train_steps(run_dir)
    assert steps == list(range(1, target + 1)), steps  # the curve carries on, no gap, no repeat
    store = Store(killed_run["env"]["GRADER_DB"])
    assert store.get_run(run_id)["status"] == "finished"
    assert (run_dir / "final" / "adapter_model.safetensors").exists()
    stored_steps = {m["step"] for m in store.metrics(run_id) if m.get("kind", "train") == "train"}
    assert set(range(resume_from + 1, target + 1)) <= stored_steps, stored_steps
    names = [g["submission_name"] for g in store.grades(limit=10 * n_grades)]
    assert sorted(n for n in names if n.startswith("concurrent-")) == sorted(
        f"concurrent-{i}" for i in range(n_grades))


def test_shell_syntax_in_names_and_paths_does_not_inject(killed_run):
    """The launch (and, when the resume test ran first, the resume) of this module's run: its
    name, dataset folder and checkpoints folder hold shell syntax; nothing of it ran."""
    markers, run_dir, data = killed_run["markers"], killed_run["run_dir"], killed_run["data"]
    assert not any(m.exists() for m in markers[:3]), [m for m in markers if m.exists()]
    assert markers[3].read_text() == "must survive"
    for where in (REPO, killed_run["root"], data, killed_run["ckpts"], run_dir):
        assert not (where / PWNED).exists(), where / PWNED
    assert train_steps(run_dir)[:3] == [1, 2, 3]  # it really trained from those folders
    # The recorded command quotes the hostile folder as one argument.
    command = shlex.split((run_dir / "command.txt").read_text().splitlines()[0])
    assert command[command.index("--run_dir") + 1] == str(run_dir)
    assert json.loads((run_dir / "config.json").read_text())["datasets"] == [str(data)]


# The Grade tab's write (app.grade_tab._record -> Store.add_grade), from a second process, as
# fast as it can: it overlaps the resumed trainer's metric and checkpoint writes.
WRITER = r"""
import sys, time
from data.store import Store
n = int(sys.argv[1])
store = Store()
for i in range(n):
    store.add_grade(grade={"score": 1, "max_score": 2, "items": [], "feedback": ""}, raw_text="{}",
                    base_model="embedded:tiny-gpt-oss", adapter=None, submission_name=f"concurrent-{i}",
                    rubric={"questions": []}, repaired=False, latency_s=0.01)
    if i % 10 == 0:
        time.sleep(0.2)  # spread over the resumed run
print("wrote", n)
"""


# ----------------------------------------------------------------------------- full disk


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 45 MiB tmpfs: room for one checkpoint of the tiny model (~28 MiB, most of it the
    tokenizer) and the logs, not for a second one."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=45m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"cannot mount a tmpfs (this test needs root): {r.stderr}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_during_checkpoint_save_fails_clearly_and_keeps_the_previous_one(tmp_path, small_tmpfs):
    data = write_tiny_dataset(tmp_path / "data")
    ckpts = small_tmpfs / "checkpoints"
    env = studio_env(ckpts, tmp_path / "studio.db")
    run_id = detach_run(tiny_overrides(data, max_steps=8, save_every=2, name="fulldisk"), env)
    run_dir = ckpts / run_id
    pgid = launcher_pid(run_dir)
    try:
        wait_for(lambda: not group_pids(pgid), START_TIMEOUT_S + DEATH_TIMEOUT_S,
                 "the run to end on the full disk", poll_s=2)
    finally:
        kill_group(pgid)
    out = training_cli(["status", run_id], env)
    assert "failed" in out.stdout, out.stdout
    assert "No space left on device" in out.stdout, out.stdout  # the reason, in words
    assert complete_checkpoints(run_dir) == [2]
    from safetensors.torch import load_file

    assert load_file(str(run_dir / "checkpoint-2" / "adapter_model.safetensors"))
    assert not (run_dir / "checkpoint-4").exists()
    assert not (run_dir / "final").exists()
    from data.store import Store

    stored = [c["step"] for c in Store(tmp_path / "studio.db").checkpoints(run_id)]
    assert stored == [2], stored


def test_deepspeed_shared_memory_of_dead_runs_is_freed_and_live_ones_kept():
    """DeepSpeed's CPU all-reduce leaves a 64 MiB /dev/shm segment per rank and run (RAM, until
    reboot); the launcher frees those no live process maps, and never one a live rank maps."""
    import subprocess
    import sys

    from training.launcher import sweep_shm_buffers

    prefix = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_"
    dead, live = Path(prefix + "1_0"), Path(prefix + "2_0")
    for f in (dead, live):
        f.write_bytes(b"\0" * 4096)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import mmap, sys, time\n"
        f"f = open({str(live)!r}, 'r+b'); m = mmap.mmap(f.fileno(), 4096)\n"
        "print('mapped', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mapped"
        assert sweep_shm_buffers() >= 1
        assert not dead.exists() and live.exists()
    finally:
        holder.kill()
        holder.wait()
    sweep_shm_buffers()
    assert not live.exists()


def test_a_segment_still_being_created_is_never_swept():
    """A starting rank creates its segment and fills it before it maps it, while the other ranks
    wait for the name: a concurrent launch's sweep must leave a segment some process holds open."""
    from training.launcher import sweep_shm_buffers

    creating = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_3_0")
    with open(creating, "wb") as f:
        f.write(b"\0" * 4096)
        sweep_shm_buffers()
        assert creating.exists()
    sweep_shm_buffers()
    assert not creating.exists()


def test_a_killed_run_leaves_no_shared_memory_once_swept(killed_run):
    from training.launcher import sweep_shm_buffers

    port = (killed_run["run_dir"] / "command.txt").read_text().split("--master_port ")[1].split()[0]
    sweep_shm_buffers()  # what the next launch (or the run's reaper) does
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
