"""One training run at a time per GPU set (on a machine without GPUs, one on the CPU), enforced
by the launcher, so `python -m training run` obeys it as the UI does: of two launches on the same
devices the second is refused, names the running one and says how to stop it, and starts nothing."""
from __future__ import annotations

import subprocess

from tests.test_reliability_support import (PY, REPO, group_pids, kill_group, launcher_pid, studio_env,
                                            tiny_overrides, train_steps, training_cli, wait_for,
                                            write_tiny_dataset)

START_TIMEOUT_S = 600  # launcher + model start-up on a busy 2-core machine (seen: 1.5-2.5 min)
STOP_TIMEOUT_S = 300   # finish the step, save a checkpoint, exit


def run_args(overrides: list[str]) -> list[str]:
    args = [PY, "-m", "training", "run", "--preset", "smoke", "--detach"]
    for o in overrides:
        args += ["--set", o]
    return args


def test_two_cli_launches_on_one_device_set_the_second_is_refused_naming_the_first(
        isolated_store, tiny_gpt_oss_dir):
    root = isolated_store  # the test's checkpoints folder and store (conftest), shared with the CLI
    data = write_tiny_dataset(root / "data")
    env = studio_env(root / "checkpoints", root / "studio.db")
    # Both at once: the launch lock decides which one runs; the other is refused, not both started.
    procs = [subprocess.Popen(run_args(tiny_overrides(data, max_steps=500, save_every=1000, name=name)),
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("first", "second")]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    started = [out for out, code in zip(outs, codes) if code == 0]
    refused = [out for out, code in zip(outs, codes) if code != 0]
    assert len(started) == 1 and len(refused) == 1, (codes, outs)
    run_id = next(line for line in started[0][0].splitlines() if line.startswith("run ")).split()[1].rstrip(":")
    run_dir = root / "checkpoints" / run_id
    pgid = launcher_pid(run_dir)
    try:
        stdout, stderr = refused[0]
        assert codes[outs.index(refused[0])] == 3, (codes, stderr)
        assert "Refused: " in stderr and f"run '{run_id}' is still" in stderr, stderr
        assert "the CPU" in stderr or "GPU " in stderr, stderr
        assert f"python -m training stop {run_id}" in stderr, stderr
        assert "run " not in stdout, stdout  # nothing was launched
        assert [d.name for d in (root / "checkpoints").iterdir() if d.is_dir()] == [run_id]

        # Launching it again later is refused the same way (not only in the race).
        again = subprocess.run(run_args(tiny_overrides(data, max_steps=2, save_every=1, name="later")),
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 3 and f"run '{run_id}'" in again.stderr, again.stdout + again.stderr

        # The running one is untouched: it trains, and stops when asked the way the message says.
        wait_for(lambda: train_steps(run_dir), START_TIMEOUT_S, "the first training step")
        stop = training_cli(["stop", run_id], env)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        wait_for(lambda: not group_pids(pgid), STOP_TIMEOUT_S, "the stopped run's processes to exit")
        status = training_cli(["status", run_id], env)
        assert f"{run_id}" in status.stdout and " stopped " in status.stdout, status.stdout + status.stderr
    finally:
        kill_group(pgid)

    # The devices are free again: the launcher's check passes for the same config.
    from training.overrides import apply_overrides
    from training.presets import preset
    from training.launcher import check_devices, device_set

    cfg = apply_overrides(preset("smoke"), tiny_overrides(data, max_steps=2, save_every=1))
    assert check_devices(cfg) == device_set(cfg)
