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
import hashlib
import json
import math
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils
from pydantic import ValidationError

from data import paths
from data.anchors import Anchor, AnchorBank, pick_to_grade_first, question_key
from data.loading import DataError, content_hash, load_graded
from data.markdown import split_sections
from data.rubric import GradedSubmission, Rubric

BUSY_TIMEOUT_S = 30.0
RUN_STATUSES = ("created", "running", "stopped", "failed", "finished")
# metrics.jsonl keys that get their own column (queryable); the whole row is kept in `data`.
METRIC_COLUMNS = ("kind", "step", "epoch", "loss", "eval_loss", "lr", "grad_norm", "tokens_per_s",
                  "samples", "elapsed_s", "peak_mem_gib", "total_steps")

MIGRATIONS = sqlite_utils.Migrations("grader_studio")
# The review queue: least sure first; newest grade first; or, per question, the answers that make
# the best teacher anchors first (the most typical and the most unusual, data.anchors), then the rest.
REVIEW_ORDERS = ("confidence", "newest", "grade-first")
GRADE_FIRST_K = 5  # answers per question the "grade-first" order puts first
DEFAULT_CORRECTOR = "teacher"
CORRECTIONS_SOURCE = "corrections"  # the `sources` of a dataset made from the teacher's corrections


class CorrectionError(ValueError):
    """A correction the store refuses (no such grade or question, a score outside 0..max, no name)."""


@dataclass(frozen=True)
class Correction:
    """One teacher correction of one question of a stored grade: what the model said, what the
    teacher says, who and when. Rows are never changed; the newest one of an answer counts."""

    id: int
    grade_id: int
    question_index: int  # position in the grade's items (rubric order)
    question_label: str
    question: str
    max_score: float
    model_score: float
    model_justification: str | None
    teacher_score: float
    teacher_justification: str | None
    corrected_by: str
    created_at: str


@dataclass(frozen=True)
class ReviewItem:
    """One question of a stored grade as the review queue shows it."""

    grade_id: int
    question_index: int
    question_label: str
    question: str
    max_score: float
    model_score: float
    model_justification: str | None
    confidence: float | None  # None: the grade was generated whole, so there is no distribution
    submission_name: str
    adapter: str | None  # None: the base model alone
    base_model: str
    graded_at: str
    answer: str | None  # the student's answer to it; None when the grade kept no Markdown
    answer_key: str  # the same answer to the same question, whichever grade (adapter) it is in
    correction: Correction | None  # the teacher's latest correction of this answer, from any grade


@dataclass(frozen=True)
class CorrectedData:
    """The corrected answers as graded submissions (one per submission text and rubric, holding
    only its corrected questions), the corrections used, and why any corrected answer is left out."""

    submissions: list[GradedSubmission]
    correction_ids: list[int]
    skipped: list[str]


@dataclass(frozen=True)
class CorrectionsDataset:
    """A dataset made from corrections, as a run's config names it."""

    spec: str  # "db:<name or id>" as in the run's config
    dataset_id: int
    name: str
    correction_ids: list[int]


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


@MIGRATIONS(name="0003_review_corrections")
def _review_corrections(db: sqlite_utils.Database) -> None:
    """The teacher's review loop (#16). A grade keeps the Markdown it was made from (a correction
    becomes training data only with the student's answer) and its per-question confidence (JSON
    list; `min_confidence` so the least sure grades are found without reading every row). The
    `corrections` table only ever gains rows: a second correction of a question is a new row and
    the newest one counts. A dataset made from corrections lists their ids (`correction_ids`)."""
    grades = db["grades"]
    grades.add_column("submission_md", str)
    grades.add_column("confidence", str)
    grades.add_column("min_confidence", float)
    grades.create_index(["min_confidence"], if_not_exists=True)
    db["datasets"].add_column("correction_ids", str)
    db["corrections"].create(
        {"id": int, "grade_id": int, "question_index": int, "question_label": str, "question": str,
         "max_score": float, "model_score": float, "model_justification": str, "teacher_score": float,
         "teacher_justification": str, "corrected_by": str, "created_at": str},
        pk="id", foreign_keys=[("grade_id", "grades", "id")],
        not_null={"grade_id", "question_index", "teacher_score", "corrected_by", "created_at"},
    )
    db["corrections"].create_index(["grade_id", "question_index"], if_not_exists=True)


@MIGRATIONS(name="0004_name_pasted_submissions")
def _name_pasted_submissions(db: sqlite_utils.Database) -> None:
    """Before #27 the Grade tab stored every pasted submission as `pasted.md`, whoever wrote it,
    and the gradebook put them all in one row. Each such grade gets a name of its own,
    ``pasted-<id>.md`` with the id of the first grade of the same text (a text's tuned and base
    grades stay one submission; a grade that kept no text is its own)."""
    db.execute(
        "UPDATE grades SET submission_name = 'pasted-' || CASE WHEN submission_md IS NULL THEN id "
        "ELSE (SELECT min(g.id) FROM grades g WHERE g.submission_md = grades.submission_md) END || '.md' "
        "WHERE submission_name = 'pasted.md'")


_JSON = {
    "datasets": frozenset({"sources", "correction_ids"}),
    "submissions": frozenset({"data"}),
    "metrics": frozenset({"data"}),
    "runs": frozenset({"config", "command"}),
    "grades": frozenset({"grade", "rubric", "confidence"}),
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

    def import_dataset(self, name: str, submissions: list[GradedSubmission], sources: list[str], *,
                       correction_ids: list[int] | None = None) -> tuple[int, bool]:
        """Store validated submissions as a named dataset. The same content (by `content_hash`)
        imported again returns the existing id and ``created=False``, whatever the name.
        ``correction_ids``: the teacher's corrections it was made from (:meth:`store_corrections_dataset`)."""
        if not submissions:
            raise ValueError("import_dataset: no submissions to import (validate the files first)")
        digest = content_hash(submissions)
        with self._write() as db:
            existing = list(db.query("SELECT id FROM datasets WHERE content_hash = ?", [digest]))
            if existing:
                return int(existing[0]["id"]), False
            n_items = sum(len(s.rubric_alignment) for s in submissions)
            cur = db.execute(
                "INSERT INTO datasets (name, content_hash, n_submissions, n_items, sources, created_at, correction_ids) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [name, digest, len(submissions), n_items, _dumps(list(sources)), _now(),
                 None if correction_ids is None else _dumps([int(i) for i in correction_ids])],
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
                  submission_name: str, rubric: dict, repaired: bool, latency_s: float,
                  submission_md: str | None = None, confidence: list[float | None] | None = None) -> int:
        """Record one grading result; returns its id. ``submission_md``: the Markdown that was
        graded (what makes a corrected grade training data); ``confidence``: per question, how sure
        the model was (item-level grading; None where unknown), for the review queue's order."""
        conf = None if confidence is None else [_finite_or_none(c) for c in confidence]
        known = [float(c) for c in conf or [] if c is not None]
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO grades (created_at, base_model, adapter, submission_name, score, max_score, grade, "
                "raw_text, rubric, repaired, latency_s, submission_md, confidence, min_confidence) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [_now(), base_model, adapter, submission_name, grade.get("score"), grade.get("max_score"),
                 _dumps(grade), raw_text, _dumps(rubric), int(bool(repaired)), float(latency_s),
                 submission_md, None if conf is None else _dumps(conf), min(known) if known else None],
            )
            return int(cur.lastrowid)

    def get_grade(self, grade_id: int) -> dict | None:
        """One stored grade (grade, rubric and confidence decoded), or None."""
        rows = self._rows("SELECT * FROM grades WHERE id = ?", [int(grade_id)], _JSON["grades"])
        for r in rows:
            r["repaired"] = bool(r["repaired"])
        return rows[0] if rows else None

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

    # -- the teacher's review loop -------------------------------------------------------------

    def add_correction(self, grade_id: int, question_index: int, teacher_score: float,
                       teacher_justification: str | None = None,
                       corrected_by: str = DEFAULT_CORRECTOR) -> Correction:
        """Store the teacher's score (and justification) for question ``question_index`` of grade
        ``grade_id``, beside what the model said. Nothing is overwritten: correcting the same
        question again adds a row, and the newest row is the one read. Raises `CorrectionError`
        for a missing grade or question, a score that is not a number within 0..max, or no name."""
        row = self.get_grade(grade_id)
        if row is None:
            raise CorrectionError(f"grade {grade_id}: no such grade in {self.path}")
        questions = _grade_questions(row)
        if not 0 <= int(question_index) < len(questions):
            raise CorrectionError(f"grade {grade_id}: question index {question_index} is not one of its "
                                  f"{len(questions)} questions (0..{len(questions) - 1})")
        q = questions[int(question_index)]
        where = f"grade {grade_id} ({q.submission_name}), question {q.question_label}"
        if isinstance(teacher_score, bool) or not isinstance(teacher_score, (int, float)) \
                or not math.isfinite(teacher_score):
            raise CorrectionError(f"{where}: teacher score {teacher_score!r} is not a number; give 0..{q.max_score:g}")
        if not 0 <= teacher_score <= q.max_score:
            raise CorrectionError(f"{where}: teacher score {teacher_score:g} is outside 0..{q.max_score:g}")
        who = " ".join(str(corrected_by or "").split())
        if not who:
            raise CorrectionError(f"{where}: say who corrected it (the name field; default {DEFAULT_CORRECTOR!r})")
        why = (teacher_justification or "").strip() or None
        now = _now()
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO corrections (grade_id, question_index, question_label, question, max_score, model_score, "
                "model_justification, teacher_score, teacher_justification, corrected_by, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [int(grade_id), int(question_index), q.question_label, q.question, q.max_score, q.model_score,
                 q.model_justification, float(teacher_score), why, who, now],
            )
            cid = int(cur.lastrowid)
        return Correction(id=cid, grade_id=int(grade_id), question_index=int(question_index),
                          question_label=q.question_label, question=q.question, max_score=q.max_score,
                          model_score=q.model_score, model_justification=q.model_justification,
                          teacher_score=float(teacher_score), teacher_justification=why, corrected_by=who,
                          created_at=now)

    def corrections(self, grade_id: int | None = None) -> list[Correction]:
        """Every correction (of one grade, or all), oldest first: the full history, none dropped."""
        sql = "SELECT * FROM corrections" + (" WHERE grade_id = ?" if grade_id is not None else "") + " ORDER BY id"
        return [_correction(r) for r in self._rows(sql, [int(grade_id)] if grade_id is not None else [])]

    def latest_corrections(self) -> dict[str, Correction]:
        """The teacher's current word on each corrected answer: {answer key: newest correction}.
        The key is the same for every grade of the same submission text and question, so a
        correction made on one adapter's grade is the truth for all of them."""
        rows = self._rows("SELECT c.*, g.submission_md AS _md FROM corrections c JOIN grades g ON g.id = c.grade_id "
                          "ORDER BY c.id")
        latest: dict[str, Correction] = {}
        for r in rows:
            c = _correction(r)
            latest[_answer_key(r["_md"], c.grade_id, c.question_index, c.question_label, c.question,
                               c.max_score)] = c
        return latest

    def review_items(self, *, adapters: set[str | None] | None = None, order: str = "confidence",
                     limit_grades: int = 500, grade_ids: list[int] | None = None,
                     first_k: int = GRADE_FIRST_K) -> list[ReviewItem]:
        """The questions of stored grades, those most in need of review first (``order``
        "confidence": the least sure first, questions without a confidence after them, newest
        grades first among equals; "newest": newest grade first; "grade-first": for each question,
        ``first_k`` answers to grade first so every other answer has a close anchor, counting those
        already corrected, then the rest by confidence). ``adapters``: only grades made by these
        adapter folders (None in the set: the base model alone); None: every grade.
        ``grade_ids``: only these grades. Reads the ``limit_grades`` grades that come first in that order."""
        if order not in REVIEW_ORDERS:
            raise ValueError(f"review order {order!r}: expected one of {', '.join(REVIEW_ORDERS)}")
        conditions, params = [], []
        if adapters is not None:
            named = sorted(a for a in adapters if a is not None)
            parts = [f"adapter IN ({', '.join('?' * len(named))})"] if named else []
            if None in adapters:
                parts.append("adapter IS NULL")
            conditions.append("(" + (" OR ".join(parts) if parts else "0") + ")")
            params += named
        if grade_ids is not None:
            conditions.append(f"id IN ({', '.join('?' * len(grade_ids))})" if grade_ids else "0")
            params += [int(g) for g in grade_ids]
        where = " WHERE " + " AND ".join(conditions) if conditions else ""
        sort = ("id DESC" if order == "newest" else "min_confidence IS NULL, min_confidence, id DESC")
        rows = self._rows(f"SELECT * FROM grades{where} ORDER BY {sort} LIMIT ?", [*params, int(limit_grades)],
                          _JSON["grades"])
        latest = self.latest_corrections()
        items = [q for row in rows for q in _grade_questions(row, latest)]
        if order == "newest":
            items.sort(key=lambda q: (-q.grade_id, q.question_index))
            return items
        items.sort(key=lambda q: (q.confidence is None, q.confidence or 0.0, -q.grade_id, q.question_index))
        if order == "grade-first":
            first = _grade_first(items, first_k)
            items.sort(key=lambda q: (first.get((q.grade_id, q.question_index), len(first)),))
        return items

    def corrected_review_items(self) -> list[ReviewItem]:
        """Every question, in any stored grade, whose answer the teacher has corrected (its
        ``correction`` set): the grade where it was corrected and every other grade of the same
        submission text, whichever adapter made it. What agreement with the teacher is computed on."""
        latest = self.latest_corrections()
        if not latest:
            return []
        rows = self._rows(
            "SELECT * FROM grades WHERE id IN (SELECT grade_id FROM corrections) OR submission_md IN "
            "(SELECT g.submission_md FROM corrections c JOIN grades g ON g.id = c.grade_id "
            "WHERE g.submission_md IS NOT NULL) ORDER BY id", (), _JSON["grades"])
        return [q for row in rows for q in _grade_questions(row, latest) if q.correction is not None]

    def anchor_bank(self) -> AnchorBank:
        """The teacher's anchors: every answer with the teacher's score, from the stored datasets
        (imported grades) and the Review tab's corrections (the newest of each answer, applied
        last, so a correction outranks an imported score of the same answer)."""
        bank = AnchorBank()
        rows = self._rows("SELECT i.question, i.max_score, i.answer, i.score, d.name FROM items i "
                          "JOIN datasets d ON d.id = i.dataset_id WHERE i.max_score IS NOT NULL AND "
                          "coalesce(d.sources, '') NOT LIKE ?", [f"%{CORRECTIONS_SOURCE}%"])
        for r in rows:
            bank.add(r["question"], r["max_score"], Anchor(r["answer"] or "", r["score"], f"dataset {r['name']}"))
        for q in sorted(self.corrected_review_items(), key=lambda q: q.correction.id):
            if q.answer:
                bank.add(q.question, q.max_score, Anchor(q.answer, q.correction.teacher_score,
                                                         f"correction {q.correction.id}"))
        return bank

    def graded_adapters(self) -> list[tuple[str | None, str]]:
        """(adapter, base model) pairs that made stored grades, newest grade first."""
        rows = self._rows("SELECT adapter, base_model, max(id) AS last FROM grades GROUP BY adapter, base_model "
                          "ORDER BY last DESC")
        return [(r["adapter"], r["base_model"]) for r in rows]

    def corrected_submissions(self) -> CorrectedData:
        """The teacher's corrected answers as training data: one graded submission per corrected
        submission text and rubric, holding its corrected questions (the teacher's score and
        justification, the answer cut from the Markdown by `data.markdown.split_sections`).
        Questions nobody corrected are left out: their only score is the model's own."""
        latest = self.latest_corrections()
        if not latest:
            return CorrectedData([], [], [])
        ids = sorted({c.grade_id for c in latest.values()})
        rows = self._rows(f"SELECT * FROM grades WHERE id IN ({', '.join('?' * len(ids))}) ORDER BY id", ids,
                          _JSON["grades"])
        groups: dict[tuple[str, str], dict] = {}  # (text, rubric) -> its newest grade
        skipped: list[str] = []
        for row in rows:
            if not row.get("submission_md"):
                skipped.append(f"grade {row['id']} ({row['submission_name']}): it kept no submission text "
                               "(graded before the review loop, or by evaluate), so there is no answer to train on")
                continue
            groups[(row["submission_md"], _dumps(row["rubric"]))] = row
        subs: list[GradedSubmission] = []
        used: list[int] = []
        for row in sorted(groups.values(), key=lambda r: r["id"]):
            questions = [q for q in _grade_questions(row, latest) if q.correction is not None]
            if not questions:
                continue
            if any(q.answer is None for q in questions):
                skipped.append(f"grade {row['id']} ({row['submission_name']}): its Markdown headings do not match "
                               "the rubric's questions, so there is no answer per question")
                continue
            rubric = _rubric(row)
            items = []
            for q in questions:
                c = q.correction
                ref = rubric.questions[q.question_index].reference_answer if rubric else None
                item: dict[str, Any] = {
                    "question_id": q.question_label, "question": q.question, "answer": q.answer,
                    "score": c.teacher_score, "max_score": q.max_score, "reference_answer": ref,
                    "model_score": c.model_score, "correction_id": c.id, "corrected_by": c.corrected_by}
                if c.teacher_justification:
                    item["justification"] = c.teacher_justification
                items.append(item)
                used.append(c.id)
            sub: dict[str, Any] = {
                "submission_id": f"grade-{row['id']}", "submission_name": row["submission_name"],
                "score": sum(i["score"] for i in items), "max_score": sum(i["max_score"] for i in items),
                "graded_by": row["adapter"] or row["base_model"], "source": CORRECTIONS_SOURCE,
                "rubric_alignment": items}
            if rubric is not None and rubric.title:
                sub["assignment"] = rubric.title
            subs.append(GradedSubmission.model_validate(sub))
        return CorrectedData(subs, sorted(used), skipped)

    def store_corrections_dataset(self, name: str | None = None) -> tuple[int, bool, CorrectedData]:
        """Store the corrected answers (:meth:`corrected_submissions`) as a dataset for
        ``datasets=db:<name>`` (default name ``corrections-<UTC date>``), recording the ids of the
        corrections it holds. Returns (dataset id, created, the data); the same corrections again
        give the existing dataset (``created=False``). Raises `CorrectionError` when no corrected
        answer can become training data, saying why."""
        data = self.corrected_submissions()
        if not data.submissions:
            why = "; ".join(data.skipped) or "there are no corrections yet: correct a question in the Review tab first"
            raise CorrectionError(f"no training data from corrections: {why}")
        name = " ".join((name or "").split()) or f"corrections-{datetime.now(timezone.utc).date().isoformat()}"
        dataset_id, created = self.import_dataset(name, data.submissions, [CORRECTIONS_SOURCE],
                                                  correction_ids=data.correction_ids)
        return dataset_id, created, data

    def run_corrections(self, run_id: str) -> list[CorrectionsDataset]:
        """The datasets made from corrections that run ``run_id`` trained on, with their
        correction ids. The run's config names each ``db:`` dataset; a name means the newest
        dataset of that name when the run was created (what its trainer loaded then)."""
        run = self.get_run(run_id)
        if run is None:
            raise KeyError(f"no run {run_id!r} in {self.path}")
        cfg = run["config"] if isinstance(run["config"], dict) else {}
        out: list[CorrectionsDataset] = []
        for spec in cfg.get("datasets") or []:
            if not isinstance(spec, str) or not spec.startswith(DB_PREFIX):
                continue
            ref = spec[len(DB_PREFIX):]
            rows = self._rows("SELECT * FROM datasets WHERE id = ?", [int(ref)], _JSON["datasets"]) if ref.isdigit() else []
            if not rows:
                rows = self._rows("SELECT * FROM datasets WHERE name = ? AND created_at <= ? ORDER BY id DESC LIMIT 1",
                                  [ref, run["created_at"]], _JSON["datasets"])
            if rows and rows[0].get("correction_ids") is not None:
                out.append(CorrectionsDataset(spec, int(rows[0]["id"]), rows[0]["name"], list(rows[0]["correction_ids"])))
        return out


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
        missing = missing_datasets(specs, store)
        if missing:
            raise DataError(missing[0])
        for name in names:
            subs += store.dataset_submissions(store.find_dataset(name)["id"])
    if not subs:
        raise DataError(f"no graded submissions in {specs}: give .json/.jsonl files, folders or db:<name>")
    return subs


def _grade_first(items: list[ReviewItem], k: int) -> dict[tuple[int, int], int]:
    """{(grade, question): rank} of the answers to grade first: per question, the answers already
    corrected count as graded, and data.anchors.pick_to_grade_first adds the rest up to ``k``."""
    by_question: dict[str, dict[str, ReviewItem]] = {}
    for q in items:
        if q.answer:
            by_question.setdefault(question_key(q.question, q.max_score), {}).setdefault(q.answer_key, q)
    ranks: dict[tuple[int, int], int] = {}
    for answers in by_question.values():
        distinct = list(answers.values())
        graded = [n for n, q in enumerate(distinct) if q.correction is not None]
        for rank, j in enumerate(pick_to_grade_first([q.answer or "" for q in distinct], k - len(graded), graded)):
            ranks[(distinct[j].grade_id, distinct[j].question_index)] = rank
    return ranks


def missing_datasets(specs: list[str], store: Store | None = None) -> list[str]:
    """For each ``db:<name or id>`` of ``specs`` that the store lacks, what to do instead: the
    stored datasets by name (the closest first, as ``db:`` specs to copy), or how to import one
    when none is stored. The one wording of this refusal, for the config check and the trainer."""
    import difflib

    wanted = [d[len(DB_PREFIX):] for d in specs if d.startswith(DB_PREFIX)]
    if not wanted:
        return []
    store = store if store is not None else Store()
    out = []
    for name in wanted:
        if store.find_dataset(name) is not None:
            continue
        stored = list(dict.fromkeys(x["name"] for x in store.list_datasets()))
        if stored:
            close = difflib.get_close_matches(name, stored, n=len(stored), cutoff=0.0)
            fix = "use " + " or ".join(f"datasets=db:{n}" for n in close[:3]) + f" (stored: {', '.join(stored)})"
        else:
            fix = f"import it first: python -m training import {name} PATH... (or the Data tab's Store as dataset)"
        out.append(f"db:{name}: dataset {name!r} is not in the store {store.path}; {fix}")
    return out


def _rubric(row: dict) -> Rubric | None:
    """The rubric a grade was made against, or None for a row whose rubric is not one."""
    try:
        return Rubric.model_validate(row.get("rubric"))
    except ValidationError:
        return None


def _answer_key(md: str | None, grade_id: int, index: int, label: str, question: str, max_score: float) -> str:
    """Names one answer to one question: by the submission text when the grade kept it (so every
    grade of that text shares it), else by the grade and question position."""
    if not md:
        return f"grade:{grade_id}:{index}"
    digest = hashlib.sha256(_dumps([md, label, question, float(max_score)]).encode("utf-8")).hexdigest()
    return f"text:{digest[:24]}"


def _grade_questions(row: dict, latest: dict[str, Correction] | None = None) -> list[ReviewItem]:
    """The questions of a stored grade row (grade, rubric and confidence decoded)."""
    grade = row.get("grade") if isinstance(row.get("grade"), dict) else {}
    items = [i for i in grade.get("items") or [] if isinstance(i, dict)]
    rubric = _rubric(row)
    labels = rubric.labels() if rubric is not None and len(rubric.questions) == len(items) else \
        [str(k + 1) for k in range(len(items))]
    md = row.get("submission_md")
    answers: list[str] | None = None
    if md and rubric is not None and len(rubric.questions) == len(items):
        # The answer each question was graded on (as grade_items cuts it); a single question is
        # the whole text. Headings that do not match a multi-question rubric give no answers.
        answers = split_sections(md, rubric) or ([md.strip()] if len(items) == 1 else None)
    conf = row.get("confidence") if isinstance(row.get("confidence"), list) else []
    out = []
    for k, item in enumerate(items):
        max_score = float(item.get("max_score") or 0.0)
        key = _answer_key(md, int(row["id"]), k, labels[k], str(item.get("question", "")), max_score)
        c = conf[k] if k < len(conf) else None
        out.append(ReviewItem(
            grade_id=int(row["id"]), question_index=k, question_label=labels[k],
            question=str(item.get("question", "")), max_score=max_score, model_score=float(item.get("score") or 0.0),
            model_justification=item.get("justification"), confidence=None if c is None else float(c),
            submission_name=row.get("submission_name") or "", adapter=row.get("adapter"),
            base_model=row.get("base_model") or "", graded_at=row.get("created_at") or "",
            answer=answers[k] if answers is not None else None, answer_key=key,
            correction=(latest or {}).get(key)))
    return out


def _correction(row: dict) -> Correction:
    return Correction(**{f: row[f] for f in Correction.__dataclass_fields__})


def _decode_row(row: dict, json_columns: frozenset[str]) -> dict:
    """JSON text columns back to Python values."""
    out = dict(row)
    for key in json_columns & out.keys():
        if isinstance(out[key], str):
            out[key] = json.loads(out[key])
    return out
