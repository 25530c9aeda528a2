"""The app dies while training runs: `kill -9` of `python app.py`, then a new app reattaches to
the run (run folder + SQLite store + the run's pid: nothing lives only in the app's memory) and
controls it. Then `kill -9` of the deepspeed launcher itself (same run): the run is never
shown failed while its ranks still train, never stays running once they are gone, and the
restarted app can still stop it. One training run for the whole module.

Design chosen (issue 8): the training run outlives the app (own process group); the next app
start shows it again and controls it.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from tests.test_reliability_support import (AppServer, complete_checkpoints, group_pids, kill_group,
                                            launcher_pid, rank_pids, studio_env, tiny_overrides,
                                            train_steps, wait_for, write_tiny_dataset)

START_TIMEOUT_S = 600
LAUNCHER_GRACE_S = 20  # after the launcher dies: time for its ranks to go, if they are to go
# (nothing takes them down when only the launcher dies: they train on, and the test watches
# the run's status, checked every 2 s, for this long before it stops them itself)


def _launch_values(data):
    from app.forms import ModelForm
    from training.config import RunConfig
    from training.overrides import apply_overrides
    from training.presets import PRESETS

    cfg = apply_overrides(PRESETS["smoke"], tiny_overrides(data, max_steps=2000, save_every=3,
                                                           name="restart"))
    return ModelForm(RunConfig).values_of(cfg)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("restart")
    data = write_tiny_dataset(root / "data")
    env = studio_env(root / "checkpoints", root / "studio.db")
    state = {"root": root, "env": env, "data": data, "servers": [], "pgids": set()}
    yield state
    for srv in state["servers"]:
        srv.stop()
    for pgid in state["pgids"]:
        kill_group(pgid)


def _client(srv):
    from gradio_client import Client

    return Client(srv.url, verbose=False)


def _use(studio, monkeypatch):
    monkeypatch.setenv("GRADER_CHECKPOINTS", studio["env"]["GRADER_CHECKPOINTS"])
    monkeypatch.setenv("GRADER_DB", studio["env"]["GRADER_DB"])


def test_app_kill9_while_training_then_restart_reattaches_to_the_run(studio, monkeypatch):
    _use(studio, monkeypatch)
    from app import jobs

    first = AppServer(studio["root"], studio["env"]).start()
    studio["servers"].append(first)
    message, run = _client(first).predict(*_launch_values(studio["data"]), api_name="/launch")
    assert message.startswith("Launched"), message
    run_id = run if isinstance(run, str) else run["value"]
    run_dir = studio["root"] / "checkpoints" / run_id
    studio["run_id"], studio["run_dir"] = run_id, run_dir
    studio["pgids"].add(launcher_pid(run_dir))
    wait_for(lambda: len(train_steps(run_dir)) >= 2, START_TIMEOUT_S, "two training steps")

    first.kill9()  # the app dies; the run must not
    step_at_kill = max(train_steps(run_dir))
    wait_for(lambda: max(train_steps(run_dir)) >= step_at_kill + 2, 120, "training to go on")
    assert set(rank_pids(run_dir)) == {0}

    second = AppServer(studio["root"], studio["env"]).start()
    studio["servers"].append(second)
    client = _client(second)
    assert jobs.latest_run_id() == run_id  # what the Train tab shows on page load
    status, bar, fig, log = client.predict(run_id, api_name="/run_view")
    assert "**running**" in status, status
    assert "train loss" in str(fig)
    step_seen = int(bar.split('data-step="', 1)[1].split('"', 1)[0])
    assert step_seen >= step_at_kill + 2, bar
    # The new app knows the devices are busy with the old app's run: a second launch is refused.
    again, _ = client.predict(*_launch_values(studio["data"]), api_name="/launch")
    assert again.startswith("Refused") and run_id in again, again


def test_kill9_of_the_deepspeed_launcher_never_shows_a_training_run_as_failed(studio, monkeypatch):
    """The run the restarted app reattached to: SIGKILL its `deepspeed` launcher process (the
    pid the studio recorded). Either the ranks go too and the run is failed, or they train on
    and the run is shown running and the restarted app can still stop it (finish the step, save,
    "stopped"); never 'failed' while ranks still train."""
    _use(studio, monkeypatch)
    from training.launcher import run_status

    run_id, run_dir = studio["run_id"], studio["run_dir"]
    client = _client(studio["servers"][-1])
    pgid = launcher_pid(run_dir)
    assert len(rank_pids(run_dir)) == 1, "the run should still be training"

    os.kill(pgid, signal.SIGKILL)
    deadline = time.monotonic() + LAUNCHER_GRACE_S
    while time.monotonic() < deadline and rank_pids(run_dir):
        st = run_status(run_id)
        if rank_pids(run_dir):  # re-check: the ranks may have gone between the two reads
            assert st["status"] == "running", (
                f"run shown {st['status']!r} while its ranks {rank_pids(run_dir)} still train")
        time.sleep(2)
    if rank_pids(run_dir):
        # They train on: the (restarted) studio must still control the run.
        msg = client.predict(run_id, api_name="/stop")
        assert msg.startswith("Stopping"), msg
        wait_for(lambda: not rank_pids(run_dir), 180, "the ranks to stop")
        status = wait_for(lambda: (lambda s: s if "**running**" not in s else None)(
            client.predict(run_id, api_name="/run_view")[0]), 60, "the page to show the end", poll_s=0.5)
        assert "**stopped**" in status, status
        assert run_status(run_id)["status"] == "stopped"
        assert complete_checkpoints(run_dir)[-1] == max(train_steps(run_dir))  # saved at the stop
    else:
        wait_for(lambda: not group_pids(pgid), 60, "every process of the run to exit")
        assert run_status(run_id)["status"] == "failed"
