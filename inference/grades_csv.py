"""The grades CSV: one shape for every place that writes one (``python -m inference batch`` and the
Grade tab's many-submissions download), and the batch output folder it lives in.

One row per question of each submission, so a spreadsheet or pandas reads the justifications
beside the scores; the submission's total, feedback, repairs and what graded it repeat on each of
its rows (filter or pivot on ``file`` for one row per submission).

A batch's output folder (:class:`BatchOutput`) holds ``grades.jsonl``, the record (one
``GradeResult.to_dict()`` per line, with the file name and the hashes of the file and the rubric
it was graded from), and ``grades.csv``, derived from it. Both grow as batches finish, so a kill
loses at most the batch in flight, and a second run over the same folder grades only what the
record does not hold yet.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from inference.repair import Repair, repair_messages

if TYPE_CHECKING:  # the engine imports torch lazily; writing a CSV should not need it
    from data.rubric import Rubric
    from inference.results import GradeResult

GRADES_CSV_COLUMNS = ("file", "question", "score", "max_score", "confidence", "needs_review", "justification",
                      "total", "max_total", "feedback", "repaired", "repairs", "scoring", "base_model", "adapter")
GRADES_CSV = "grades.csv"
GRADES_JSONL = "grades.jsonl"


def grade_rows(name: str, graded: dict) -> list[list]:
    """The CSV rows (GRADES_CSV_COLUMNS) of one submission, from its ``GradeResult.to_dict()``,
    which is what grades.jsonl holds: the CSV can always be rebuilt from the JSONL."""
    g = graded["grade"]
    n = len(g["items"])
    conf = graded.get("confidence") or [None] * n
    review = graded.get("needs_review") or [False] * n
    repairs = repair_messages([Repair(r["kind"], r["detail"], r.get("question")) for r in graded.get("repairs") or []])
    return [[name, it["question"], it["score"], it["max_score"], "" if c is None else c, int(bool(rv)),
             it.get("justification") or "", g["score"], g["max_score"], g.get("feedback") or "",
             int(bool(graded.get("repaired"))), repairs, graded.get("scoring", ""), graded.get("base_model", ""),
             graded.get("adapter") or ""]
            for it, c, rv in zip(g["items"], conf, review)]


def write_grades_csv(path: str | Path, graded: Iterable[tuple[str, "GradeResult"]]) -> Path:
    """Write (submission name, GradeResult) pairs to ``path`` as the grades CSV (UTF-8, columns
    GRADES_CSV_COLUMNS, one row per question); returns the path."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(GRADES_CSV_COLUMNS)
        for name, res in graded:
            w.writerows(grade_rows(name, res.to_dict()))
    return path


def append_grades_csv(path: str | Path, graded: Iterable[tuple[str, "GradeResult"]]) -> Path:
    """Append (submission name, GradeResult) pairs to the grades CSV at ``path``, flushed; the
    header is written only when the file is new or empty."""
    path = Path(path)
    with open(path, "a", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        if fh.tell() == 0:
            w.writerow(GRADES_CSV_COLUMNS)
        for name, res in graded:
            w.writerows(grade_rows(name, res.to_dict()))
        fh.flush()
    return path


def content_sha256(data: bytes) -> str:
    """What a submission file is recognised by on a second run: the hash of its bytes."""
    return hashlib.sha256(data).hexdigest()


def rubric_sha256(rubric: "Rubric") -> str:
    """The rubric a grade was made against, as a hash (grades against another rubric are not reused)."""
    return hashlib.sha256(rubric.model_dump_json().encode("utf-8")).hexdigest()


class OutputMismatchError(ValueError):
    """The output folder already holds grades made by another model, adapter or rubric."""


class BatchOutput:
    """A batch's output folder: ``grades.jsonl`` (the record) and ``grades.csv`` (derived from it),
    appended batch by batch.

    Opening it reads the record: a last line without its newline was cut by a kill and is
    dropped (that submission is graded again); a file graded before but changed since (another
    hash under the same name) is dropped too. The CSV is then rebuilt from what is kept, so the
    two agree and every submission appears once in each. Grades made by another base model,
    adapter or rubric are refused (:class:`OutputMismatchError`): one folder, one grader.
    """

    def __init__(self, folder: str | Path, *, base_model: str, adapter: str | None, rubric: "Rubric",
                 files: dict[str, str]) -> None:
        """``files``: the submissions to grade now, {file name: content_sha256}."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.csv = self.folder / GRADES_JSONL, self.folder / GRADES_CSV
        self.base_model, self.adapter, self.rubric_sha256 = base_model, adapter, rubric_sha256(rubric)
        self.records: list[dict] = []
        self.n_cut = self.n_changed = 0
        if self.jsonl.exists():
            self._read(files)
        self._rewrite()

    def _read(self, files: dict[str, str]) -> None:
        text = self.jsonl.read_text(encoding="utf-8")
        lines = text.split("\n")
        if lines[-1]:  # no newline at the end: the line being written when the run was killed
            self.n_cut = 1
        for n, line in enumerate(lines[:-1], 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise OutputMismatchError(f"{self.jsonl} line {n} is not JSON ({e}); it is not a grades file "
                                          "this command wrote: choose another --out-dir") from e
            made_by = (rec.get("base_model"), rec.get("adapter"), rec.get("rubric_sha256"))
            if made_by != (self.base_model, self.adapter, self.rubric_sha256):
                what = ("rubric" if made_by[:2] == (self.base_model, self.adapter)
                        else f"base model {made_by[0]!r} with adapter {made_by[1]!r}")
                raise OutputMismatchError(
                    f"{self.jsonl} holds grades of {rec.get('file')!r} made with another {what}; this run grades "
                    f"with base {self.base_model!r}, adapter {self.adapter!r} and its own rubric. Choose another "
                    "--out-dir (or delete that folder to grade everything again)")
            if rec.get("file") in files and files[rec["file"]] != rec.get("sha256"):
                self.n_changed += 1  # edited since it was graded: graded again
                continue
            self.records.append(rec)

    def _rewrite(self) -> None:
        """The kept records and the CSV rebuilt from them, each replaced in one rename."""
        for path, write in ((self.jsonl, self._write_jsonl), (self.csv, self._write_csv)):
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                write(fh, self.records)
            os.replace(tmp, path)

    @staticmethod
    def _write_jsonl(fh, records: list[dict]) -> None:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())

    @staticmethod
    def _write_csv(fh, records: list[dict]) -> None:
        w = csv.writer(fh)
        w.writerow(GRADES_CSV_COLUMNS)
        for rec in records:
            w.writerows(grade_rows(rec["file"], rec))
        fh.flush()
        os.fsync(fh.fileno())

    def done(self) -> set[tuple[str, str]]:
        """(file name, content_sha256) of every submission already graded here."""
        return {(r["file"], r["sha256"]) for r in self.records}

    def append(self, graded: list[tuple[str, str, "GradeResult"]]) -> None:
        """Add (file name, content_sha256, result) triples: CSV rows first, then the JSONL lines,
        each flushed (the JSONL also fsynced: it is what a second run trusts)."""
        append_grades_csv(self.csv, [(name, res) for name, _, res in graded])
        recs = [{"file": name, "sha256": sha, "rubric_sha256": self.rubric_sha256, **res.to_dict()}
                for name, sha, res in graded]
        with open(self.jsonl, "a", encoding="utf-8") as fh:
            self._write_jsonl(fh, recs)
        self.records += recs
