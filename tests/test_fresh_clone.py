"""A fresh clone without the third-party data (../shared) passes: every test that reads it skips,
saying which folder is missing, and nothing else in the suite reaches for it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .conftest import SHARED_DATA_ENV
from tests.conftest import REPO

TESTS = REPO / "tests"


def _users_of_shared_data() -> list[Path]:
    """The test files that ask for the third-party data (through conftest's `mohler_dir`)."""
    return sorted(p for p in TESTS.glob("test_*.py")
                  if p.name != Path(__file__).name and "mohler_dir" in p.read_text(encoding="utf-8"))


def test_tests_that_need_the_shared_data_skip_without_it(tmp_path: Path) -> None:
    empty = tmp_path / "no-shared-data"
    empty.mkdir()
    files = _users_of_shared_data()
    assert len(files) >= 5, files  # loading, Markdown, store, prompt format, tokenizer
    env = {**os.environ, SHARED_DATA_ENV: str(empty)}
    # Only the tests that use the data: the rest of those files never touch it (checked below), and
    # running them here would repeat their work. In this one process (-n 0): they only skip, and
    # parallel workers would each collect the files again.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-n", "0", "-m", "needs_shared_data", "-p", "no:cacheprovider",
         *map(str, files)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    summary = out.strip().splitlines()[-1]
    assert re.search(r"\d+ skipped", summary) and "failed" not in summary and "error" not in summary, summary
    assert "passed" not in summary, summary  # every selected test needs the data: none can run
    n_skipped = int(re.search(r"(\d+) skipped", summary).group(1))
    assert n_skipped >= 10, summary
    # Each skip says what is missing and how to point the tests at it.
    missing = str(empty / "datasets" / "mohler" / "json")
    reasons = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert reasons and all(missing in line and SHARED_DATA_ENV in line for line in reasons), reasons


def test_nothing_outside_conftest_knows_where_the_shared_data_is() -> None:
    # The location has one home (conftest: GRADER_SHARED_DATA, default ../shared); a test that
    # built the path itself would fail on a fresh clone instead of skipping.
    pattern = re.compile(r"""["']shared["']|parents\[2\]|REPO\.parent|/datasets/mohler|SHARED_DATA\b|MOHLER\b""")
    offenders = [f"{p.name}:{n}" for p in sorted(TESTS.glob("*.py")) if p.name not in ("conftest.py", Path(__file__).name)
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert offenders == []
