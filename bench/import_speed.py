"""How fast a large spreadsheet of graded work imports: `python -m training import` on a generated
sheet of N rows (default 100,000), timed end to end as a user runs it (process start, reading,
validation, storing in a fresh SQLite store).

    .venv/bin/python bench/import_speed.py                      # 100k rows, long CSV, 10 questions per student
    .venv/bin/python bench/import_speed.py --format xlsx        # the same as an Excel workbook
    .venv/bin/python bench/import_speed.py --per-row            # no student column: 100k one-question submissions

The sheet is synthetic (student answers of Mohler-like length, ~150 characters; two graders'
scores); it is written to a temporary folder and deleted afterwards. Prints the figures and the
exact command that made them. The goal (#16) is under a minute for 100k rows on the CPU.
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("stack queue pointer node list array tree heap sort merge insert delete push pop memory "
         "recursion base case loop index value return function class object linked binary search").split()
HEADER = ["student", "question_id", "question", "reference_answer", "answer", "grader_1", "grader_2", "max_score"]


def make_rows(n_rows: int, n_questions: int, seed: int = 0) -> list[list]:
    rng = random.Random(seed)
    questions = [f"Explain {' '.join(rng.choices(WORDS, k=6))}?" for _ in range(n_questions)]
    refs = [" ".join(rng.choices(WORDS, k=15)) for _ in range(n_questions)]
    rows = []
    for k in range(n_rows):
        q = k % n_questions
        g1 = rng.randint(0, 5)
        g2 = min(5, max(0, g1 + rng.choice((-1, 0, 0, 1))))
        rows.append([f"s{k // n_questions:06d}", f"{q + 1}", questions[q], refs[q],
                     " ".join(rng.choices(WORDS, k=22)), g1, g2, 5])
    return rows


def write_sheet(path: Path, rows: list[list]) -> None:
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(HEADER)
            w.writerows(rows)
        return
    from openpyxl import Workbook

    wb = Workbook(write_only=True)
    ws = wb.create_sheet()
    ws.append(HEADER)
    for r in rows:
        ws.append(r)
    wb.save(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--questions", type=int, default=10, help="questions per student (rows per submission)")
    ap.add_argument("--format", choices=["csv", "xlsx"], default="csv")
    ap.add_argument("--per-row", action="store_true", help="no student column: each row its own submission")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="import-bench-") as tmp:
        sheet = Path(tmp) / f"graded.{args.format}"
        t0 = time.perf_counter()
        write_sheet(sheet, make_rows(args.rows, args.questions))
        made_s = time.perf_counter() - t0
        size_mb = sheet.stat().st_size / 2**20
        maps = ["question_id=question_id", "question=question", "reference_answer=reference_answer",
                "answer=answer", "graders=grader_1,grader_2", "max_score=max_score"]
        maps += ["submission=" if args.per_row else "submission=student"]
        cmd = [sys.executable, "-m", "training", "import", "bench", str(sheet), "--max-mb", str(int(size_mb) + 16)]
        for m in maps:
            cmd += ["--map", m]
        env = {**os.environ, "GRADER_DB": str(Path(tmp) / "studio.db"),
               "GRADER_CHECKPOINTS": str(Path(tmp) / "checkpoints")}
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        took = time.perf_counter() - t0
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
            return 1
        print(done.stdout.strip())
    n_subs = args.rows if args.per_row else -(-args.rows // args.questions)
    print(f"\nimport of {args.rows:,} rows ({args.format}, {size_mb:.1f} MB, {n_subs:,} submissions): "
          f"{took:.1f} s end to end = {args.rows / took:,.0f} rows/s  (sheet written in {made_s:.1f} s, not counted)")
    print(f"cpu: {os.cpu_count()} cores visible; load average {os.getloadavg()[0]:.1f}")
    print("command: " + shlex.join([sys.executable, "bench/import_speed.py", *sys.argv[1:]]))
    print("timed: " + shlex.join(["python", *cmd[1:]]).replace(tmp, "$TMP"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
