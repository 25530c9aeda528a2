"""The SQLite store: round-trips, idempotent import, WAL, readable by any SQLite client, and two
processes writing at once lose no rows."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data.loading import content_hash, load_graded
from data.store import SCHEMA_VERSION, Store

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples" / "graded"
TABLES = ["schema_version", "datasets", "submissions", "items", "runs", "metrics", "checkpoints", "grades",
          "evaluations"]


@pytest.fixture(scope="module")
def mohler_a01(mohler_dir: Path) -> list:
    report = load_graded(sorted((mohler_dir / "json").glob("unt-ds-a01-*.json")))
    assert report.ok
    return report.submissions


@pytest.fixture(scope="module")
def sample_submissions() -> list:
    """Our own sample data (in the repository): for tests that need some submissions, any."""
    report = load_graded([SAMPLES])
    assert report.ok, report.format()
    return report.submissions


def test_default_path_comes_from_env(isolated_store: Path) -> None:
    store = Store()
    assert store.path == isolated_store / "studio.db" and store.path.exists()


def test_dataset_round_trip_and_idempotent_reimport(tmp_path: Path, mohler_dir: Path, mohler_a01: list) -> None:
    store = Store(tmp_path / "sub" / "studio.db")  # creates the parent folder
    dataset_id, created = store.import_dataset("mohler a01", mohler_a01, ["mohler/json"])
    assert created
    back = store.dataset_submissions(dataset_id)
    assert back == mohler_a01  # grader_scores and extra fields (score_avg_unrounded, ...) included
    assert back[0].rubric_alignment[0].grader_scores == mohler_a01[0].rubric_alignment[0].grader_scores
    assert (back[0].rubric_alignment[0].model_extra or {})["score_avg_unrounded"] == \
        (mohler_a01[0].rubric_alignment[0].model_extra or {})["score_avg_unrounded"]
    (info,) = store.list_datasets()
    assert info["name"] == "mohler a01" and info["content_hash"] == content_hash(mohler_a01)
    assert info["n_submissions"] == len(mohler_a01)
    assert info["n_items"] == sum(len(s.rubric_alignment) for s in mohler_a01)
    assert info["sources"] == ["mohler/json"]

    # the same content again, even under another name: same id, nothing added
    assert store.import_dataset("again", mohler_a01, ["copy"]) == (dataset_id, False)
    assert store.import_dataset("again", load_graded(sorted((mohler_dir / "json").glob("unt-ds-a01-*.json"))).submissions,
                                []) == (dataset_id, False)
    assert len(store.list_datasets()) == 1
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT count(*) FROM submissions").fetchone()[0] == len(mohler_a01)

    # different content is a new dataset
    other_id, created = store.import_dataset("first two", mohler_a01[:2], [])
    assert created and other_id != dataset_id
    assert store.find_dataset("first two")["id"] == other_id
    assert store.find_dataset(dataset_id)["name"] == "mohler a01"
    assert store.find_dataset(str(dataset_id))["id"] == dataset_id
    assert store.find_dataset("nope") is None

    store.delete_dataset(other_id)
    assert store.find_dataset(other_id) is None and store.dataset_submissions(other_id) == []
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT count(*) FROM items WHERE dataset_id = ?", [other_id]).fetchone()[0] == 0
    # deleted content can be imported again
    assert store.import_dataset("first two", mohler_a01[:2], [])[1]


def test_runs_metrics_checkpoints(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.create_run("r1", {"lora_r": 8}, ["deepspeed", "--num_gpus", "2"], str(tmp_path / "r1"))
    run = store.get_run("r1")
    assert run["status"] == "created" and run["config"] == {"lora_r": 8} and run["command"][0] == "deepspeed"
    store.set_run_status("r1", "running", pid=1234)
    store.set_run_status("r1", "failed", error="killed")
    run = store.get_run("r1")
    assert (run["status"], run["pid"], run["error"]) == ("failed", 1234, "killed")
    with pytest.raises(ValueError):
        store.set_run_status("r1", "exploded")
    with pytest.raises(KeyError):
        store.set_run_status("missing", "running")
    assert store.get_run("missing") is None

    rows = [{"kind": "train", "step": s, "epoch": s / 10, "loss": 2.0 / s, "lr": 1e-4, "tokens_per_s": 10.5,
             "custom": "kept"} for s in range(1, 6)]
    rows.append({"kind": "eval", "step": 5, "eval_loss": float("nan")})  # a diverged loss is stored as null
    store.add_metrics("r1", rows)
    got = store.metrics("r1")
    assert got[:5] == rows[:5] and got[5] == {"kind": "eval", "step": 5, "eval_loss": None}

    store.add_checkpoint("r1", 50, str(tmp_path / "r1" / "checkpoint-50"))
    store.add_checkpoint("r1", 50, str(tmp_path / "r1" / "checkpoint-50b"))  # re-saved: updated, not doubled
    store.add_checkpoint("r1", 60, str(tmp_path / "r1" / "final"), final=True)
    cps = store.checkpoints("r1")
    assert [(c["step"], c["final"]) for c in cps] == [(50, False), (60, True)]
    assert cps[0]["path"].endswith("checkpoint-50b")

    store.create_run("r2", {}, [], "d")
    assert [r["run_id"] for r in store.list_runs()] == ["r2", "r1"]
    store.delete_run("r1")
    assert store.get_run("r1") is None and store.metrics("r1") == [] and store.checkpoints("r1") == []


def test_grades_and_evaluations(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    grade = {"score": 3, "max_score": 5, "items": [{"question": "q", "score": 3, "max_score": 5}], "feedback": "ok"}
    gid = store.add_grade(grade=grade, raw_text='{"score": 3}', base_model="embedded:gemma-3-270m", adapter=None,
                          submission_name="ana.md", rubric={"questions": [{"question": "q", "max_score": 5}]},
                          repaired=True, latency_s=1.5)
    (row,) = store.grades()
    assert row["id"] == gid and row["grade"] == grade and row["repaired"] is True and row["score"] == 3
    eid = store.add_evaluation(base_model="m", adapter="runs/x/final", data="mohler a12", report={"mae": 0.8})
    (ev,) = store.evaluations()
    assert ev["id"] == eid and ev["report"] == {"mae": 0.8} and ev["data"] == "mohler a12"


def test_wal_schema_version_and_any_sqlite_client_reads_every_table(tmp_path: Path, sample_submissions: list) -> None:
    store = Store(tmp_path / "s.db")
    store.import_dataset("d", sample_submissions[:3], ["x"])
    store.create_run("r", {"a": 1}, ["x"], "d")
    store.add_metrics("r", [{"kind": "train", "step": 1, "loss": 1.0}])
    store.add_checkpoint("r", 1, "p")
    store.add_grade(grade={"score": 1, "max_score": 2}, raw_text="", base_model="m", adapter=None,
                    submission_name="s", rubric={}, repaired=False, latency_s=0.0)
    store.add_evaluation(base_model="m", adapter=None, data="d", report={})
    assert store.schema_version() == SCHEMA_VERSION
    Store(store.path)  # opening again changes nothing
    conn = sqlite3.connect(store.path)  # a plain client, no sqlite-utils
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert set(TABLES) <= names
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        for table in TABLES:
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] >= 1, table
        # JSON columns are JSON text that SQLite's own json functions read
        assert conn.execute("SELECT json_extract(data, '$.rubric_alignment[0].question') FROM submissions").fetchone()[0]
        assert conn.execute("SELECT json_extract(config, '$.a') FROM runs").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM items WHERE json_valid(extra) = 0").fetchone()[0] == 0
        assert conn.execute("SELECT loss FROM metrics").fetchone()[0] == 1.0
    finally:
        conn.close()


WRITER = textwrap.dedent(
    """
    import sys
    from data.store import Store
    db, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = Store(db)
    for i in range(n):
        store.add_metrics("shared-run", [{"kind": "train", "step": i, "loss": 1.0, "writer": who}])
        store.add_grade(grade={"score": 1, "max_score": 2}, raw_text=who, base_model="m", adapter=None,
                        submission_name=f"{who}-{i}", rubric={}, repaired=False, latency_s=0.0)
        if i % 10 == 0:
            store.set_run_status("shared-run", "running", pid=i)
    print("done", who)
    """
)


def test_two_processes_writing_at_once_lose_no_rows(tmp_path: Path) -> None:
    """The trainer appends metrics while the UI records grades: both in full, no 'database is locked'."""
    db = tmp_path / "shared.db"
    store = Store(db)
    store.create_run("shared-run", {}, [], "d")
    n = 150
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), who, str(n)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for who in ("trainer", "ui")]
    # this process writes too, meanwhile
    for i in range(n):
        store.add_metrics("shared-run", [{"kind": "eval", "step": i, "eval_loss": 0.5, "writer": "main"}])
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    rows = store.metrics("shared-run")
    assert len(rows) == 3 * n
    for who in ("trainer", "ui", "main"):
        assert sorted(r["step"] for r in rows if r["writer"] == who) == list(range(n))
    assert len(store.grades(limit=10_000)) == 2 * n
    assert store.get_run("shared-run")["status"] == "running"


def test_concurrent_import_of_the_same_file_creates_one_dataset(tmp_path: Path, mohler_dir: Path) -> None:
    db = tmp_path / "s.db"
    Store(db)
    script = textwrap.dedent(
        """
        import sys
        from data.loading import load_graded
        from data.store import Store
        subs = load_graded([sys.argv[2]]).submissions
        print(Store(sys.argv[1]).import_dataset(sys.argv[3], subs, [sys.argv[2]]))
        """
    )
    src = str(mohler_dir / "json")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(db), src, f"import {k}"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(out.strip())
    assert sorted(results) == ["(1, False)", "(1, True)"]
    (info,) = Store(db).list_datasets()
    assert info["n_submissions"] == 336


def test_threads_share_one_store_object(tmp_path: Path) -> None:
    """The UI serves requests from several threads with one Store: no 'SQLite objects created in
    a thread can only be used in that same thread', no lost rows."""
    from concurrent.futures import ThreadPoolExecutor

    store = Store(tmp_path / "s.db")
    store.create_run("r", {}, [], "d")

    def work(k: int) -> None:
        for i in range(20):
            store.add_metrics("r", [{"kind": "train", "step": k * 100 + i}])
            store.add_grade(grade={"score": 0, "max_score": 1}, raw_text="", base_model="m", adapter=None,
                            submission_name=f"{k}-{i}", rubric={}, repaired=False, latency_s=0.0)
            store.get_run("r")

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(work, range(6)))
    assert sorted(r["step"] for r in store.metrics("r")) == sorted(k * 100 + i for k in range(6) for i in range(20))
    assert len(store.grades(limit=1000)) == 120
