"""The launch command is a list run without a shell: a run name, a dataset folder and a
checkpoints folder full of shell syntax (`;`, `$(...)`, backticks, `&&`) start a real training run
through `python -m training run`, and no injected command runs (marker files never appear)."""
from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from pathlib import Path

from tests.test_reliability_support import (REPO, complete_checkpoints, studio_env, train_steps,
                                            training_cli, write_tiny_dataset)


def test_shell_syntax_in_names_and_paths_does_not_inject(tmp_path):
    short = Path(tempfile.mkdtemp(prefix="inj"))  # short marker paths: the run name stays < 255
    markers = [short / f"M{i}" for i in range(4)]
    # Folder names cannot hold "/", so their payloads touch relative names: they would land in the
    # launcher's working directory (the repo root) or the test's folder.
    rel = "pwned-by-path"
    data = write_tiny_dataset(tmp_path / f"data; touch {rel} $(touch {rel}) `touch {rel}`")
    ckpts = tmp_path / f"ckpt && touch {rel} ; $(touch {rel})"
    env = studio_env(ckpts, tmp_path / "studio.db")
    name = (f"x; touch {markers[0]}; $(touch {markers[1]}) `touch {markers[2]}` "
            f"&& rm -rf {markers[3]}")
    markers[3].write_text("must survive")
    args = ["run", "--preset", "smoke", "--set", f"name={name}", "--set", f"datasets={json.dumps([str(data)])}",
            "--set", "max_steps=1", "--set", "save_every_steps=1", "--set", "eval_fraction=0",
            "--set", "per_device_batch_size=1", "--set", "max_length=512"]
    out = training_cli(args, env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    assert not any(m.exists() for m in markers[:3]), [m for m in markers if m.exists()]
    assert markers[3].read_text() == "must survive"
    for where in (REPO, tmp_path, data, ckpts, data.parent):
        assert not (where / rel).exists(), where / rel
    [run_dir] = [d for d in ckpts.iterdir() if d.is_dir()]
    assert train_steps(run_dir) == [1] and complete_checkpoints(run_dir) == [1]
    # The recorded command quotes the hostile folder as one argument.
    command = shlex.split((run_dir / "command.txt").read_text().splitlines()[0])
    assert command[command.index("--run_dir") + 1] == str(run_dir)
    assert json.loads((run_dir / "config.json").read_text())["datasets"] == [str(data)]
    shutil.rmtree(short)


def test_a_very_long_run_name_gets_a_usable_run_folder(tmp_path):
    """Names come from users (the Configure form): one longer than a file name may be must not
    crash the launcher with 'File name too long' before the config is even checked."""
    env = studio_env(tmp_path / "checkpoints", tmp_path / "studio.db")
    out = training_cli(["run", "--preset", "smoke", "--set", "name=" + "n" * 300,
                        "--set", "learning_rate=-1", "--detach"], env, timeout_s=300)
    assert "File name too long" not in out.stdout + out.stderr, out.stderr[-2000:]
    assert out.returncode == 2 and "learning_rate" in out.stderr, out.stdout + out.stderr
