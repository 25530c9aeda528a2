"""Grades out as a gradebook: one row per submission (student), a column per question, the total
and the maximum, as CSV or Excel .xlsx. The one writer behind ``python -m inference export-grades``
and the Runs tab's download.

The rows come from the grades the studio stored (`data.store.Store.grades`): each submission's
newest grade per rubric (optionally only those one adapter made). Under the header, a
"Points possible" row holds each question's maximum (Canvas's convention), so a teacher sees what
each column is out of, and `data.spreadsheet` reads the file back in wide shape (it finds that
row by its name). When the grades span several rubrics, each question's column is prefixed with
its rubric's title, and a submission's cells for questions it was not graded on stay empty.

Teachers' corrections replace the model's score where given (``corrections``: the corrected score
per (grade id, question position)); the total follows, and Excel shows corrected cells shaded.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from data.rubric import Rubric

GRADEBOOK_SUFFIXES = (".csv", ".xlsx")
SUBMISSION_COLUMN = "submission"
MAX_ROW_LABEL = "Points possible"
# After the question columns: the totals, then what made the grade (text, so a re-import never
# takes them for questions).
TAIL_COLUMNS = ("total", "max", "graded_by", "graded_at")

# (grade id in the store, position of the question in that grade) -> the teacher's score
Corrections = Mapping[tuple[int, int], float]


@dataclass
class GradebookRow:
    """One submission's line: its score per question column (absent: not graded on it)."""

    submission: str
    scores: dict[str, float] = field(default_factory=dict)
    total: float = 0.0
    max: float = 0.0
    graded_by: str = ""
    graded_at: str = ""
    corrected: set[str] = field(default_factory=set)  # the columns a teacher's correction set


@dataclass
class Gradebook:
    """Question columns (label and maximum, in rubric order) and one row per submission."""

    columns: list[str] = field(default_factory=list)
    max_scores: dict[str, float] = field(default_factory=dict)
    rows: list[GradebookRow] = field(default_factory=list)

    def header(self) -> list[str]:
        return [SUBMISSION_COLUMN, *self.columns, *TAIL_COLUMNS]

    def table(self) -> list[list[Any]]:
        """The sheet as rows of cells: header, the row of maxima, one row per submission
        (None where a submission has no score for a question)."""
        out: list[list[Any]] = [self.header(),
                                [MAX_ROW_LABEL, *(self.max_scores[c] for c in self.columns),
                                 sum(self.max_scores.values()), None, None, None]]
        for r in self.rows:
            out.append([r.submission, *(r.scores.get(c) for c in self.columns), r.total, r.max,
                        r.graded_by, r.graded_at])
        return out


def _rubric_key(rubric: Rubric) -> tuple:
    return (rubric.title or "", tuple((lab, q.max_score) for lab, q in zip(rubric.labels(), rubric.questions)))


def build_gradebook(grades: Iterable[dict], corrections: Corrections | None = None) -> Gradebook:
    """A gradebook from stored grade rows (`Store.grades` dicts: id, created_at, submission_name,
    adapter, base_model, grade, rubric). A submission graded more than once against the same
    rubric counts with its newest grade. ``corrections`` replace the model's scores they name."""
    corrections = corrections or {}
    # Newest first, so the first grade seen of a (submission, rubric) is the one that counts.
    ordered = sorted(grades, key=lambda g: (g.get("created_at") or "", g.get("id") or 0), reverse=True)
    chosen: dict[tuple[str, tuple], dict] = {}
    rubrics: dict[tuple, Rubric] = {}
    for g in ordered:
        rubric = Rubric.model_validate(_json(g["rubric"]))
        key = _rubric_key(rubric)
        rubrics.setdefault(key, rubric)
        chosen.setdefault((g["submission_name"], key), g)
    # Question columns: prefixed by the rubric's title only when there is more than one rubric.
    names: dict[tuple, str] = {}
    for n, key in enumerate(sorted(rubrics, key=lambda k: (k[0], k[1]))):
        title = key[0] or f"rubric {n + 1}"
        names[key] = title if title not in names.values() else f"{title} ({n + 1})"
    book = Gradebook()
    column_of: dict[tuple[tuple, int], str] = {}
    for key in sorted(rubrics, key=lambda k: names[k]):
        for k, label in enumerate(rubrics[key].labels()):
            col = label if len(rubrics) == 1 else f"{names[key]}: {label}"
            column_of[(key, k)] = col
            book.columns.append(col)
            book.max_scores[col] = float(rubrics[key].questions[k].max_score)
    rows: dict[str, GradebookRow] = {}
    models: dict[str, dict[str, None]] = {}  # submission -> the models whose grades its row holds
    for (sub, key), g in sorted(chosen.items(), key=lambda kv: (kv[0][0], names[kv[0][1]])):
        row = rows.setdefault(sub, GradebookRow(submission=sub))
        items = _json(g["grade"]).get("items") or []
        for k in range(len(rubrics[key].questions)):
            col = column_of[(key, k)]
            fixed = corrections.get((int(g["id"]), k)) if g.get("id") is not None else None
            if fixed is not None:
                row.scores[col] = float(fixed)
                row.corrected.add(col)
            elif k < len(items):
                row.scores[col] = float(items[k]["score"])
            row.max += book.max_scores[col]
        models.setdefault(sub, {})[_made_by(g)] = None  # an ordered set: each model once
        row.graded_at = max(row.graded_at, str(g.get("created_at") or ""))
    for sub, row in rows.items():
        row.graded_by = "; ".join(models[sub])
        # Rounded like the grades themselves: a sum of 2-decimal scores shows no float noise.
        row.total = round(sum(row.scores.values()), 4)
    book.rows = list(rows.values())
    return book


def clashing_names(named_texts: Iterable[tuple[str, str]]) -> list[str]:
    """The names given to more than one different text. Graded together, their grades would be
    one gradebook row (a row is a submission's name) and the newer would hide the older."""
    texts: dict[str, set[str]] = {}
    for name, text in named_texts:
        texts.setdefault(name, set()).add(text)
    return sorted(name for name, found in texts.items() if len(found) > 1)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _made_by(g: dict) -> str:
    return g.get("adapter") or f"{g.get('base_model') or 'base model'} (no adapter)"


def stored_grades(store=None, adapter: str | None = None) -> list[dict]:
    """Every grade in the store (``store``: a data.store.Store, default the user's), or only those
    made with ``adapter``: an adapter folder, or a run folder for any adapter of that run
    (compared as resolved paths)."""
    from data.store import Store

    rows = (store or Store()).grades(limit=-1)  # SQLite: LIMIT -1 is no limit
    if adapter is None:
        return rows
    want = Path(adapter).expanduser().resolve()
    return [g for g in rows if g.get("adapter") and _within(Path(g["adapter"]).resolve(), want)]


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def write_gradebook(book: Gradebook, path: str | Path) -> Path:
    """Write ``book`` to ``path``: .csv (UTF-8 with a BOM, so Excel reads accents right) or .xlsx
    (header bold and frozen, corrected cells shaded). Returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in GRADEBOOK_SUFFIXES:
        raise ValueError(f"gradebook {path}: expected a file name ending in .csv or .xlsx")
    table = book.table()
    if suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8-sig") as fh:
            w = csv.writer(fh)
            for row in table:
                w.writerow(["" if v is None else _short(v) for v in row])
        return path
    from openpyxl import Workbook
    from openpyxl.styles import Font, PatternFill

    wb = Workbook()
    ws = wb.active
    ws.title = "gradebook"
    for row in table:
        ws.append(row)
    bold = Font(bold=True)
    for cell in ws[1] + ws[2]:
        cell.font = bold
    ws.freeze_panes = "B3"
    shade = PatternFill("solid", fgColor="FFF2CC")
    col_index = {c: k + 2 for k, c in enumerate(book.columns)}
    for r, row in enumerate(book.rows, start=3):
        for col in row.corrected:
            ws.cell(row=r, column=col_index[col]).fill = shade
    ws.column_dimensions["A"].width = max([12] + [min(len(r.submission), 40) for r in book.rows])
    tmp = path.with_name(f".{path.name}.tmp")
    wb.save(tmp)
    tmp.replace(path)  # a reader never sees a half-written workbook
    return path


def _short(v: Any) -> Any:
    """Numbers as a spreadsheet writes them: 4, not 4.0 (and the exact float otherwise)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def teacher_corrections(grades: list[dict], store=None) -> dict[tuple[int, int], float]:
    """The teacher's current score for every corrected question of ``grades`` (Review tab): a
    correction made on any grade of the same answer counts for all of them."""
    from data.store import Store

    ids = [int(g["id"]) for g in grades if g.get("id") is not None]
    if not ids:
        return {}
    items = (store or Store()).review_items(grade_ids=ids, limit_grades=len(ids))
    return {(it.grade_id, it.question_index): it.correction.teacher_score for it in items if it.correction}


def export_gradebook(path: str | Path, *, adapter: str | None = None, store=None,
                     corrections: Corrections | None = None) -> tuple[Path, Gradebook]:
    """Write the stored grades (all, or ``adapter``'s) to ``path`` as a gradebook, with the
    teacher's corrections in place of the model's scores (``corrections``; default: those stored
    by the Review tab). Raises ValueError when there is no grade to write."""
    grades = stored_grades(store, adapter)
    if corrections is None:
        corrections = teacher_corrections(grades, store)
    if not grades:
        who = f" made with adapter {adapter}" if adapter else ""
        raise ValueError(f"no stored grades{who}: grade submissions first (python -m inference grade/batch, "
                         "or the Grade tab)")
    book = build_gradebook(grades, corrections)
    return write_gradebook(book, path), book
