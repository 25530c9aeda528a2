"""Lean load test: 8 concurrent /grade requests on the tiny GPT-OSS through gradio_client against
a real `python app.py --max-jobs 2` (bench/load_grading.py, the same code, runs 32 on Gemma 3
270M): every request completes without an error, never more than --max-jobs run at once, and
every grade is recorded in SQLite."""
from __future__ import annotations

import sqlite3

from bench.load_grading import run_load
from tests.test_reliability_support import app_server, studio_env

MAX_JOBS = 2
N = 8


def test_concurrent_grading_requests_all_complete_within_the_job_limit(tmp_path):
    env = studio_env(tmp_path / "checkpoints", tmp_path / "studio.db")
    with app_server(tmp_path, env, "--max-jobs", str(MAX_JOBS)) as srv:
        res = run_load(srv.url, n=N, model="embedded:tiny-gpt-oss", max_new_tokens=16)
    assert res["errors"] == [] and res["ok"] == N, res
    assert 1 <= res["max_processing_at_once"] <= MAX_JOBS, res
    with sqlite3.connect(tmp_path / "studio.db") as con:
        (n_grades,) = con.execute("SELECT COUNT(*) FROM grades").fetchone()
    assert n_grades == N + 1  # + the warm-up request
