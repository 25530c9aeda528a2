"""The SQLite store: datasets, submissions and items, runs, metrics, checkpoints, grades and
evaluations, as plain tables any SQLite client can open (JSON columns are JSON text).

The trainer (a subprocess) and the UI write at once, so the database is in WAL mode, every
operation opens its own connection with a 30 s busy timeout, and every write is one
``BEGIN IMMEDIATE`` transaction (taking the write lock up front: a read-then-write transaction in
WAL mode could otherwise fail at once with "database is locked" instead of waiting).

Schema changes are named migrations (sqlite-utils' `Migrations`), applied in order, each once, and
recorded in the table ``_sqlite_migrations``; opening a database applies the ones it lacks, in one
write transaction, so a database of any earlier version upgrades on open and a failed migration
leaves it as it was. To change the schema, append a migration at the end of the list below and
never edit one that has shipped (databases out there already ran it)::

    @MIGRATIONS(name="0003_grades_scoring")
    def _grades_scoring(db: sqlite_utils.Database) -> None:
        db["grades"].add_column("scoring", str)

Databases made before migrations (a ``schema_version`` table holding 1) have exactly the tables
of 0001, which creates only what is missing, so they upgrade like any other.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils

from data import paths
from data.loading import DataError, content_hash, load_graded
from data.rubric import GradedSubmission

BUSY_TIMEOUT_S = 30.0
RUN_STATUSES = ("created", "running", "stopped", "failed", "finished")
# metrics.jsonl keys that get their own column (queryable); the whole row is kept in `data`.
METRIC_COLUMNS = ("kind", "step", "epoch", "loss", "eval_loss", "lr", "grad_norm", "tokens_per_s",
                  "samples", "elapsed_s", "peak_mem_gib", "total_steps")

MIGRATIONS = sqlite_utils.Migrations("grader_studio")


@MIGRATIONS(name="0001_create_tables")
def _create_tables(db: sqlite_utils.Database) -> None:
    """The first schema. `if_not_exists`: databases made before migrations already have it all."""
    tables: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        # table: (columns, create() keyword arguments)
        "datasets": (
            {"id": int, "name": str, "content_hash": str, "n_submissions": int, "n_items": int,
             "sources": str, "created_at": str},
            {"pk": "id", "not_null": {"name", "content_hash"}},
        ),
        "submissions": (
            {"id": int, "dataset_id": int, "position": int, "submission_id": str, "score": float,
             "max_score": float, "feedback": str, "data": str},
            {"pk": "id", "foreign_keys": [("dataset_id", "datasets", "id")]},
        ),
        "items": (
            {"id": int, "submission_row": int, "dataset_id": int, "position": int, "question_id": str,
             "question": str, "answer": str, "score": float, "max_score": float,
             "reference_answer": str, "extra": str},
            {"pk": "id", "foreign_keys": [("submission_row", "submissions", "id"), ("dataset_id", "datasets", "id")]},
        ),
        "runs": (
            {"run_id": str, "status": str, "config": str, "command": str, "run_dir": str, "pid": int,
             "error": str, "created_at": str, "updated_at": str},
            {"pk": "run_id"},
        ),
        "metrics": (
            {"id": int, "run_id": str, "kind": str, "step": int, "epoch": float, "loss": float,
             "eval_loss": float, "lr": float, "grad_norm": float, "tokens_per_s": float, "samples": int,
             "elapsed_s": float, "peak_mem_gib": float, "total_steps": int, "data": str, "created_at": str},
            {"pk": "id"},
        ),
        "checkpoints": (
            {"id": int, "run_id": str, "step": int, "path": str, "final": int, "created_at": str},
            {"pk": "id"},
        ),
        "grades": (
            {"id": int, "created_at": str, "base_model": str, "adapter": str, "submission_name": str,
             "score": float, "max_score": float, "grade": str, "raw_text": str, "rubric": str,
             "repaired": int, "latency_s": float},
            {"pk": "id"},
        ),
        "evaluations": (
            {"id": int, "created_at": str, "base_model": str, "adapter": str, "data": str, "report": str},
            {"pk": "id"},
        ),
    }
    for table, (columns, kwargs) in tables.items():
        db[table].create(columns, if_not_exists=True, **kwargs)
    for table, cols, unique in [
        ("datasets", ["content_hash"], True),
        ("submissions", ["dataset_id", "position"], False),
        ("items", ["submission_row", "position"], False),
        ("items", ["dataset_id"], False),
        ("metrics", ["run_id", "step"], False),
        ("checkpoints", ["run_id", "step", "final"], True),
    ]:
        db[table].create_index(cols, unique=unique, if_not_exists=True)


@MIGRATIONS(name="0002_drop_schema_version")
def _drop_schema_version(db: sqlite_utils.Database) -> None:
    """The version number of databases made before migrations: `_sqlite_migrations` says it now."""
    db.execute("DROP TABLE IF EXISTS schema_version")


_JSON = {
    "datasets": frozenset({"sources"}),
    "submissions": frozenset({"data"}),
    "metrics": frozenset({"data"}),
    "runs": frozenset({"config", "command"}),
    "grades": frozenset({"grade", "rubric"}),
    "evaluations": frozenset({"report"}),  # its `data` column names the data, it is not JSON
}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _dumps(value: Any) -> str:
    # allow_nan=False: NaN is not JSON, and other SQLite clients' json functions would choke on it.
    return json.dumps(value, ensure_ascii=False, allow_nan=False, default=str)


def _finite_or_none(value: Any) -> Any:
    """Metric values as stored: NaN/inf (a diverged loss) become NULL, not invalid JSON."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    return value


class Store:
    """The studio's SQLite database. Safe to use from several threads and processes at once:
    nothing holds a connection between calls."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else paths.db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.enable_wal()  # persistent: stored in the database file
            # Opening an up-to-date database must not take the write lock (the UI opens a Store
            # per request while the trainer writes): `pending` only reads.
            if not MIGRATIONS.pending(db):
                return
        # Under the write lock: two processes opening a new database at once apply each migration
        # once (the second finds none pending), and all of them commit together or not at all.
        with self._write() as db:
            MIGRATIONS.apply(db)

    # -- connections ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite_utils.Database]:
        """A fresh connection for one operation (sqlite3 objects must not cross threads)."""
        conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        # In WAL mode NORMAL is crash-safe (a killed process loses nothing committed); only a power
        # cut can drop the last commits. It saves an fsync per write, which metrics logging feels.
        conn.execute("PRAGMA synchronous = NORMAL")
        try:
            yield sqlite_utils.Database(conn, execute_plugins=False)
        finally:
            conn.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite_utils.Database]:
        """One write transaction holding the write lock from its start (see module docstring)."""
        with self._connect() as db:
            for attempt in range(5):
                try:
                    db.conn.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as e:
                    # busy_timeout already waited 30 s; a few more tries cover a pathological burst.
                    if "locked" not in str(e) or attempt == 4:
                        raise
                    time.sleep(0.2 * (attempt + 1))
            try:
                yield db
            except BaseException:
                db.conn.execute("ROLLBACK")
                raise
            else:
                db.conn.execute("COMMIT")

    def _rows(self, sql: str, params: list[Any] | tuple[Any, ...] = (),
              json_columns: frozenset[str] = frozenset()) -> list[dict]:
        """Query rows as dicts, decoding the named JSON text columns."""
        with self._connect() as db:
            return [_decode_row(r, json_columns) for r in db.query(sql, list(params))]

    def applied_migrations(self) -> list[str]:
        """The names of the schema migrations this database has had, in the order applied."""
        with self._connect() as db:
            return [m.name for m in MIGRATIONS.applied(db)]

    # -- datasets ------------------------------------------------------------------------------

    def import_dataset(self, name: str, submissions: list[GradedSubmission], sources: list[str]) -> tuple[int, bool]:
        """Store validated submissions as a named dataset. The same content (by `content_hash`)
        imported again returns the existing id and ``created=False``, whatever the name."""
        if not submissions:
            raise ValueError("import_dataset: no submissions to import (validate the files first)")
        digest = content_hash(submissions)
        with self._write() as db:
            existing = list(db.query("SELECT id FROM datasets WHERE content_hash = ?", [digest]))
            if existing:
                return int(existing[0]["id"]), False
            n_items = sum(len(s.rubric_alignment) for s in submissions)
            cur = db.execute(
                "INSERT INTO datasets (name, content_hash, n_submissions, n_items, sources, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [name, digest, len(submissions), n_items, _dumps(list(sources)), _now()],
            )
            dataset_id = int(cur.lastrowid)
            for pos, sub in enumerate(submissions):
                cur = db.execute(
                    "INSERT INTO submissions (dataset_id, position, submission_id, score, max_score, feedback, data) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [dataset_id, pos, sub.submission_id, sub.score, sub.max_score, sub.feedback,
                     _dumps(sub.model_dump(mode="json"))],
                )
                row = int(cur.lastrowid)
                db["items"].insert_all(
                    (
                        {"submission_row": row, "dataset_id": dataset_id, "position": k,
                         "question_id": item.question_id, "question": item.question, "answer": item.answer,
                         "score": item.score, "max_score": item.max_score,
                         "reference_answer": item.reference_answer, "extra": _dumps(item.model_extra or {})}
                        for k, item in enumerate(sub.rubric_alignment)
                    ),
                    batch_size=500,
                )
        return dataset_id, True

    def list_datasets(self) -> list[dict]:
        """Datasets, newest first: id, name, content_hash, n_submissions, n_items, sources, created_at."""
        return self._rows("SELECT * FROM datasets ORDER BY id DESC", (), _JSON["datasets"])

    def dataset_submissions(self, dataset_id: int) -> list[GradedSubmission]:
        """The dataset's submissions exactly as imported (extra fields included), in order."""
        rows = self._rows("SELECT data FROM submissions WHERE dataset_id = ? ORDER BY position", [int(dataset_id)],
                          _JSON["submissions"])
        return [GradedSubmission.model_validate(r["data"]) for r in rows]

    def find_dataset(self, name_or_id: str | int) -> dict | None:
        """A dataset by id (int or digits) or by name (the newest of that name)."""
        if isinstance(name_or_id, int) or (isinstance(name_or_id, str) and name_or_id.isdigit()):
            rows = self._rows("SELECT * FROM datasets WHERE id = ?", [int(name_or_id)], _JSON["datasets"])
            if rows:
                return rows[0]
        rows = self._rows("SELECT * FROM datasets WHERE name = ? ORDER BY id DESC LIMIT 1", [str(name_or_id)],
                          _JSON["datasets"])
        return rows[0] if rows else None

    def delete_dataset(self, dataset_id: int) -> None:
        """Remove a dataset with its submissions and items."""
        with self._write() as db:
            db.execute("DELETE FROM items WHERE dataset_id = ?", [int(dataset_id)])
            db.execute("DELETE FROM submissions WHERE dataset_id = ?", [int(dataset_id)])
            db.execute("DELETE FROM datasets WHERE id = ?", [int(dataset_id)])

    # -- runs ----------------------------------------------------------------------------------

    def create_run(self, run_id: str, config: dict, command: list[str], run_dir: str) -> None:
        """Record a new run with status "created"."""
        now = _now()
        with self._write() as db:
            db.execute(
                "INSERT INTO runs (run_id, status, config, command, run_dir, pid, error, created_at, updated_at) "
                "VALUES (?, 'created', ?, ?, ?, NULL, NULL, ?, ?)",
                [run_id, _dumps(config), _dumps(list(command)), str(run_dir), now, now],
            )

    def set_run_status(self, run_id: str, status: str, *, error: str | None = None, pid: int | None = None) -> None:
        """Move a run to created|running|stopped|failed|finished (pid/error kept unless given)."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r}: expected one of {', '.join(RUN_STATUSES)}")
        with self._write() as db:
            cur = db.execute(
                "UPDATE runs SET status = ?, error = COALESCE(?, error), pid = COALESCE(?, pid), updated_at = ? "
                "WHERE run_id = ?",
                [status, error, pid, _now(), run_id],
            )
            if cur.rowcount == 0:
                raise KeyError(f"no run {run_id!r} in {self.path}")

    def get_run(self, run_id: str) -> dict | None:
        """One run (config and command decoded), or None."""
        rows = self._rows("SELECT * FROM runs WHERE run_id = ?", [run_id], _JSON["runs"])
        return rows[0] if rows else None

    def list_runs(self) -> list[dict]:
        """All runs, newest first."""
        return self._rows("SELECT * FROM runs ORDER BY created_at DESC, rowid DESC", (), _JSON["runs"])

    def delete_run(self, run_id: str) -> None:
        """Forget a run and its metrics and checkpoints (files on disk are not touched)."""
        with self._write() as db:
            for table in ("metrics", "checkpoints", "runs"):
                db.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])

    def add_metrics(self, run_id: str, rows: list[dict]) -> None:
        """Append metrics.jsonl rows; known keys get columns, the whole row is kept in `data`."""
        if not rows:
            return
        now = _now()
        records = []
        for row in rows:
            clean = {k: _finite_or_none(v) for k, v in row.items()}
            rec = {c: clean.get(c) for c in METRIC_COLUMNS}
            rec.update(run_id=run_id, data=_dumps(clean), created_at=now)
            records.append(rec)
        with self._write() as db:
            db["metrics"].insert_all(records, batch_size=500)

    def metrics(self, run_id: str) -> list[dict]:
        """The run's metrics rows as they were added (metrics.jsonl shape), in insertion order."""
        rows = self._rows("SELECT data FROM metrics WHERE run_id = ? ORDER BY id", [run_id], _JSON["metrics"])
        return [r["data"] for r in rows]

    def add_checkpoint(self, run_id: str, step: int, path: str, *, final: bool = False) -> None:
        """Record a saved checkpoint; saving the same step again updates its path."""
        with self._write() as db:
            db.execute(
                "INSERT INTO checkpoints (run_id, step, path, final, created_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(run_id, step, final) DO UPDATE SET path = excluded.path, created_at = excluded.created_at",
                [run_id, int(step), str(path), int(final), _now()],
            )

    def checkpoints(self, run_id: str) -> list[dict]:
        """The run's checkpoints by step (final last): run_id, step, path, final (bool), created_at."""
        rows = self._rows("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY step, final", [run_id])
        for r in rows:
            r["final"] = bool(r["final"])
        return rows

    # -- grades and evaluations ----------------------------------------------------------------

    def add_grade(self, *, grade: dict, raw_text: str, base_model: str, adapter: str | None,
                  submission_name: str, rubric: dict, repaired: bool, latency_s: float) -> int:
        """Record one grading result; returns its id."""
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO grades (created_at, base_model, adapter, submission_name, score, max_score, grade, "
                "raw_text, rubric, repaired, latency_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [_now(), base_model, adapter, submission_name, grade.get("score"), grade.get("max_score"),
                 _dumps(grade), raw_text, _dumps(rubric), int(bool(repaired)), float(latency_s)],
            )
            return int(cur.lastrowid)

    def grades(self, limit: int = 100) -> list[dict]:
        """The most recent grades, newest first (grade and rubric decoded)."""
        rows = self._rows("SELECT * FROM grades ORDER BY id DESC LIMIT ?", [int(limit)], _JSON["grades"])
        for r in rows:
            r["repaired"] = bool(r["repaired"])
        return rows

    def add_evaluation(self, *, base_model: str, adapter: str | None, data: str, report: dict) -> int:
        """Record an evaluation report (metrics against human grades); returns its id."""
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO evaluations (created_at, base_model, adapter, data, report) VALUES (?, ?, ?, ?, ?)",
                [_now(), base_model, adapter, data, _dumps(report)],
            )
            return int(cur.lastrowid)

    def evaluations(self, limit: int = 100) -> list[dict]:
        """The most recent evaluations, newest first (report decoded)."""
        return self._rows("SELECT * FROM evaluations ORDER BY id DESC LIMIT ?", [int(limit)], _JSON["evaluations"])


DB_PREFIX = "db:"  # a dataset spec naming a stored dataset: "db:<name or id>"


def load_datasets(specs: list[str], store: Store | None = None) -> list[GradedSubmission]:
    """All graded submissions that dataset specs name: files and folders (validated together,
    as `load_graded`) first, then each ``db:<name or id>`` dataset of the store, in order.

    The one resolver of a run's ``datasets`` for training, evaluation and the UI. Raises
    `DataError` (a ValueError) naming what is wrong: the files' problems, a stored dataset that is
    not there (with the names that are), or specs that hold no submission at all.
    """
    subs: list[GradedSubmission] = []
    files = [d for d in specs if not d.startswith(DB_PREFIX)]
    if files:
        report = load_graded(files)
        if not report.ok:
            raise DataError("the data has errors; fix them or drop the file:\n" + report.format(), report.errors)
        subs += report.submissions
    names = [d[len(DB_PREFIX):] for d in specs if d.startswith(DB_PREFIX)]
    if names:
        store = store if store is not None else Store()
        for name in names:
            found = store.find_dataset(name)
            if found is None:
                stored = ", ".join(x["name"] for x in store.list_datasets()) or "none"
                raise DataError(f"dataset {name!r} is not in the store {store.path} (stored: {stored}); "
                                f"import it with `python -m training import {name} PATH...`")
            subs += store.dataset_submissions(found["id"])
    if not subs:
        raise DataError(f"no graded submissions in {specs}: give .json/.jsonl files, folders or db:<name>")
    return subs


def _decode_row(row: dict, json_columns: frozenset[str]) -> dict:
    """JSON text columns back to Python values."""
    out = dict(row)
    for key in json_columns & out.keys():
        if isinstance(out[key], str):
            out[key] = json.loads(out[key])
    return out
