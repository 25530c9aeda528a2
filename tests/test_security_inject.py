"""Names and paths from users reach the launcher safely. The shell-syntax injection test shares
the fault tests' training run: tests/test_reliability_faults.py::
test_shell_syntax_in_names_and_paths_does_not_inject (one run instead of two keeps the suite lean)."""
from __future__ import annotations

from tests.test_reliability_support import studio_env, training_cli


def test_a_very_long_run_name_gets_a_usable_run_folder(tmp_path):
    """Names come from users (the Configure form): one longer than a file name may be must not
    crash the launcher with 'File name too long' before the config is even checked."""
    env = studio_env(tmp_path / "checkpoints", tmp_path / "studio.db")
    out = training_cli(["run", "--preset", "smoke", "--set", "name=" + "n" * 300,
                        "--set", "learning_rate=-1", "--detach"], env, timeout_s=300)
    assert "File name too long" not in out.stdout + out.stderr, out.stderr[-2000:]
    assert out.returncode == 2 and "learning_rate" in out.stderr, out.stdout + out.stderr
