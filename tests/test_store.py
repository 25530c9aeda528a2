"""The SQLite store: round-trips, idempotent import, WAL, readable by any SQLite client, and two
processes writing at once lose no rows."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlite_utils

from data.loading import DataError, content_hash, load_graded
from data.store import MIGRATIONS, Store, load_datasets
from tests.conftest import REPO

SAMPLES = REPO / "data" / "samples" / "graded"
TABLES = ["_sqlite_migrations", "datasets", "submissions", "items", "runs", "metrics", "checkpoints", "grades",
          "evaluations"]
# Every migration in order: what a new database has had.
MIGRATION_NAMES = [m.name for m in MIGRATIONS.pending(sqlite_utils.Database(memory=True))]


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


def test_wal_migrations_and_any_sqlite_client_reads_every_table(tmp_path: Path, sample_submissions: list) -> None:
    store = Store(tmp_path / "s.db")
    store.import_dataset("d", sample_submissions[:3], ["x"])
    store.create_run("r", {"a": 1}, ["x"], "d")
    store.add_metrics("r", [{"kind": "train", "step": 1, "loss": 1.0}])
    store.add_checkpoint("r", 1, "p")
    store.add_grade(grade={"score": 1, "max_score": 2}, raw_text="", base_model="m", adapter=None,
                    submission_name="s", rubric={}, repaired=False, latency_s=0.0)
    store.add_evaluation(base_model="m", adapter=None, data="d", report={})
    assert store.applied_migrations() == MIGRATION_NAMES
    assert MIGRATION_NAMES[:2] == ["0001_create_tables", "0002_drop_schema_version"]
    Store(store.path)  # opening again changes nothing
    conn = sqlite3.connect(store.path)  # a plain client, no sqlite-utils
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert set(TABLES) <= names
        assert conn.execute("SELECT name FROM _sqlite_migrations ORDER BY id").fetchall() == [(n,) for n in MIGRATION_NAMES]
        for table in TABLES:
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] >= 1, table
        # JSON columns are JSON text that SQLite's own json functions read
        assert conn.execute("SELECT json_extract(data, '$.rubric_alignment[0].question') FROM submissions").fetchone()[0]
        assert conn.execute("SELECT json_extract(config, '$.a') FROM runs").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM items WHERE json_valid(extra) = 0").fetchone()[0] == 0
        assert conn.execute("SELECT loss FROM metrics").fetchone()[0] == 1.0
    finally:
        conn.close()


# The schema as the code before migrations made it (data/store.py with SCHEMA_VERSION = 1): its
# exact CREATE statements, so the upgrade is tested on what users' databases hold.
V1_SCHEMA = """
CREATE TABLE "schema_version" ("version" INTEGER PRIMARY KEY, "applied_at" TEXT);
CREATE TABLE "datasets" ("id" INTEGER PRIMARY KEY, "name" TEXT NOT NULL, "content_hash" TEXT NOT NULL,
   "n_submissions" INTEGER, "n_items" INTEGER, "sources" TEXT, "created_at" TEXT);
CREATE TABLE "submissions" ("id" INTEGER PRIMARY KEY, "dataset_id" INTEGER REFERENCES "datasets"("id"),
   "position" INTEGER, "submission_id" TEXT, "score" REAL, "max_score" REAL, "feedback" TEXT, "data" TEXT);
CREATE TABLE "items" ("id" INTEGER PRIMARY KEY, "submission_row" INTEGER REFERENCES "submissions"("id"),
   "dataset_id" INTEGER REFERENCES "datasets"("id"), "position" INTEGER, "question_id" TEXT, "question" TEXT,
   "answer" TEXT, "score" REAL, "max_score" REAL, "reference_answer" TEXT, "extra" TEXT);
CREATE TABLE "runs" ("run_id" TEXT PRIMARY KEY, "status" TEXT, "config" TEXT, "command" TEXT, "run_dir" TEXT,
   "pid" INTEGER, "error" TEXT, "created_at" TEXT, "updated_at" TEXT);
CREATE TABLE "metrics" ("id" INTEGER PRIMARY KEY, "run_id" TEXT, "kind" TEXT, "step" INTEGER, "epoch" REAL,
   "loss" REAL, "eval_loss" REAL, "lr" REAL, "grad_norm" REAL, "tokens_per_s" REAL, "samples" INTEGER,
   "elapsed_s" REAL, "peak_mem_gib" REAL, "total_steps" INTEGER, "data" TEXT, "created_at" TEXT);
CREATE TABLE "checkpoints" ("id" INTEGER PRIMARY KEY, "run_id" TEXT, "step" INTEGER, "path" TEXT, "final" INTEGER,
   "created_at" TEXT);
CREATE TABLE "grades" ("id" INTEGER PRIMARY KEY, "created_at" TEXT, "base_model" TEXT, "adapter" TEXT,
   "submission_name" TEXT, "score" REAL, "max_score" REAL, "grade" TEXT, "raw_text" TEXT, "rubric" TEXT,
   "repaired" INTEGER, "latency_s" REAL);
CREATE TABLE "evaluations" ("id" INTEGER PRIMARY KEY, "created_at" TEXT, "base_model" TEXT, "adapter" TEXT,
   "data" TEXT, "report" TEXT);
CREATE UNIQUE INDEX "idx_datasets_content_hash" ON "datasets" ("content_hash");
CREATE INDEX "idx_submissions_dataset_id_position" ON "submissions" ("dataset_id", "position");
CREATE INDEX "idx_items_submission_row_position" ON "items" ("submission_row", "position");
CREATE INDEX "idx_items_dataset_id" ON "items" ("dataset_id");
CREATE INDEX "idx_metrics_run_id_step" ON "metrics" ("run_id", "step");
CREATE UNIQUE INDEX "idx_checkpoints_run_id_step_final" ON "checkpoints" ("run_id", "step", "final");
INSERT INTO schema_version VALUES (1, '2026-11-20T09:00:00+00:00');
"""


def _v1_database(path: Path, sub) -> None:
    """A database as the pre-migration code left it: its schema and a row in every table, written
    the way that code wrote them."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode = wal")
        conn.executescript(V1_SCHEMA)
        t = "2026-11-20T09:00:00+00:00"
        conn.execute("INSERT INTO datasets VALUES (1, 'old data', ?, 1, ?, '[\"old.json\"]', ?)",
                     [content_hash([sub]), len(sub.rubric_alignment), t])
        conn.execute("INSERT INTO submissions VALUES (1, 1, 0, ?, ?, ?, ?, ?)",
                     [sub.submission_id, sub.score, sub.max_score, sub.feedback, json.dumps(sub.model_dump(mode="json"))])
        conn.executemany("INSERT INTO items VALUES (NULL, 1, 1, ?, ?, ?, ?, ?, ?, ?, ?)",
                         [(k, i.question_id, i.question, i.answer, i.score, i.max_score, i.reference_answer,
                           json.dumps(i.model_extra or {})) for k, i in enumerate(sub.rubric_alignment)])
        conn.execute("INSERT INTO runs VALUES ('old-run', 'finished', '{\"lora_r\": 8}', '[\"deepspeed\"]', 'runs/old-run',"
                     " 42, NULL, ?, ?)", [t, t])
        conn.execute("INSERT INTO metrics (run_id, kind, step, loss, data, created_at) VALUES "
                     "('old-run', 'train', 1, 2.5, '{\"kind\": \"train\", \"step\": 1, \"loss\": 2.5}', ?)", [t])
        conn.execute("INSERT INTO checkpoints VALUES (NULL, 'old-run', 1, 'runs/old-run/final', 1, ?)", [t])
        conn.execute("INSERT INTO grades VALUES (NULL, ?, 'embedded:gemma-3-270m', NULL, 'ana.md', 3, 5,"
                     " '{\"score\": 3, \"max_score\": 5}', 'raw', '{}', 0, 1.5)", [t])
        conn.execute("INSERT INTO evaluations VALUES (NULL, ?, 'm', 'runs/old-run/final', 'old data', '{\"mae\": 0.8}')", [t])
        conn.commit()
    finally:
        conn.close()


def _schema(path: Path) -> dict[str, tuple]:
    """Each table's columns (name, type, not null, primary key), foreign keys and indexes."""
    db = sqlite_utils.Database(path)
    try:
        return {t.name: ([(c.name, c.type, c.notnull, c.is_pk) for c in t.columns], sorted(t.foreign_keys),
                         sorted((i.name, tuple(i.columns), i.unique) for i in t.indexes)) for t in db.tables}
    finally:
        db.close()


def test_a_database_made_before_migrations_upgrades_and_keeps_its_rows(tmp_path: Path,
                                                                        sample_submissions: list) -> None:
    sub = sample_submissions[0]
    db = tmp_path / "v1.db"
    _v1_database(db, sub)
    store = Store(db)
    assert store.applied_migrations() == MIGRATION_NAMES
    # every row is still there and reads back through the store
    (info,) = store.list_datasets()
    assert info["name"] == "old data" and info["sources"] == ["old.json"] and info["n_submissions"] == 1
    assert store.dataset_submissions(info["id"]) == [sub]
    run = store.get_run("old-run")
    assert run["status"] == "finished" and run["config"] == {"lora_r": 8} and run["pid"] == 42
    assert store.metrics("old-run") == [{"kind": "train", "step": 1, "loss": 2.5}]
    assert [(c["step"], c["final"]) for c in store.checkpoints("old-run")] == [(1, True)]
    (grade,) = store.grades()
    assert grade["grade"] == {"score": 3, "max_score": 5} and grade["latency_s"] == 1.5
    (ev,) = store.evaluations()
    assert ev["report"] == {"mae": 0.8}
    # the same content imported again is recognised (the content hash index survived)
    assert store.import_dataset("again", [sub], []) == (info["id"], False)
    # and the upgraded database has exactly the schema of a new one (later migrations see the same)
    fresh = tmp_path / "new.db"
    Store(fresh)
    assert _schema(db) == _schema(fresh)
    assert "schema_version" not in _schema(db)
    # opening it again applies nothing
    Store(db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM _sqlite_migrations").fetchone()[0] == len(MIGRATION_NAMES)
    # it still takes new rows
    store.create_run("new-run", {}, [], "d")
    assert [r["run_id"] for r in store.list_runs()] == ["new-run", "old-run"]


def test_load_datasets_resolves_files_folders_and_stored_datasets(tmp_path: Path, sample_submissions: list) -> None:
    store = Store(tmp_path / "s.db")
    store.import_dataset("three", sample_submissions[:3], ["x"])
    one = tmp_path / "one.json"
    one.write_text(sample_submissions[5].model_dump_json(), encoding="utf-8")
    # files first, then stored datasets in the order named (a run's split depends on the order)
    assert load_datasets(["db:three", str(one)], store) == [sample_submissions[5], *sample_submissions[:3]]
    assert load_datasets([str(SAMPLES)], store) == sample_submissions
    dataset_id = store.find_dataset("three")["id"]
    assert load_datasets([f"db:{dataset_id}"], store) == sample_submissions[:3]

    with pytest.raises(DataError, match=r"dataset 'nope' is not in the store .*\(stored: three\)"):
        load_datasets(["db:nope"], store)
    bad = tmp_path / "bad.json"
    bad.write_text('{"score": 1}', encoding="utf-8")
    with pytest.raises(DataError, match="bad.json") as e:
        load_datasets([str(one), str(bad)], store)
    assert e.value.problems and all(p.file == str(bad) for p in e.value.problems)
    with pytest.raises(DataError, match="no graded submissions"):
        load_datasets([], store)


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
