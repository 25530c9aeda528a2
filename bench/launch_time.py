"""How long a training launch takes as a user starts it: `python -m training run --preset smoke`
on the sample data, cut to a few steps, timed end to end (CLI start, DeepSpeed's launcher, rank
imports, model and tokenizer, the steps, the exit), with the CPU time of every process it started.

    .venv/bin/python bench/launch_time.py                   # 2 ranks (the smoke preset), 3 runs
    .venv/bin/python bench/launch_time.py --ranks 1 --runs 5

Each run gets its own temporary checkpoints folder and store. Prints each run and the medians.
To compare two versions of the code, run this script from a worktree of each (it launches the
code of the repository it lives in).
"""
from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(ranks: int, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the CLI and everything it started)."""
    cmd = [sys.executable, "-m", "training", "run", "--preset", "smoke", "--set", "datasets=data/samples/graded",
           "--set", f"max_steps={steps}", "--set", f"num_processes={ranks}"]
    with tempfile.TemporaryDirectory(prefix="launch_time_") as tmp:
        env = dict(os.environ, GRADER_CHECKPOINTS=str(Path(tmp) / "checkpoints"), GRADER_DB=str(Path(tmp) / "studio.db"))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print(f"$ python bench/launch_time.py --ranks {args.ranks} --steps {args.steps} --runs {args.runs}  ({REPO})")
    results = []
    for n in range(args.runs):
        wall, cpu = one_run(args.ranks, args.steps)
        results.append((wall, cpu))
        print(f"run {n + 1}: wall {wall:.1f} s, CPU {cpu:.1f} s")
    print(f"median: wall {statistics.median(r[0] for r in results):.1f} s, "
          f"CPU {statistics.median(r[1] for r in results):.1f} s")


if __name__ == "__main__":
    main()
