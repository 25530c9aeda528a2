"""Graded work from spreadsheets (CSV, Excel .xlsx) into `GradedSubmission`s, with every problem
named by file, row and column as a spreadsheet shows them.

Teachers keep grades in spreadsheets, in one of two shapes:

- **long**: one row per answer, i.e. per (student, question): columns such as student, question
  id, question, reference answer, answer, score, max score, and one column per grader when
  several graded. Rows with the same submission (and group-by) value form one submission; without
  either column each row is its own one-question submission (the Mohler export is like that).
- **wide**: one row per student and one column per question holding its score (a gradebook),
  optionally a column per question holding the answer. Each question's maximum comes from a row
  of maxima (a gradebook's "Points possible" row) or one maximum for all (``--max-score``).

A `ColumnMap` says which column is what (the CLI's ``--map field=column``, the Data tab's
dropdowns); `guess_mapping` proposes one from the header's names. The cells become the same
records a JSON file holds and are validated by the one schema (`data.rubric`): a rule such as
"score within 0..max_score" lives there, and its error is reported here at the row and column the
value came from. What this module checks itself is what only a spreadsheet can get wrong: the
encoding, a missing column, a cell that is not a number, an empty sheet, a submission id twice.

A file with any error yields no submission (`FileReport.ok` is False), so nothing partial is
stored; problems come in row order, and those a reading setting fixes (the mapping, the maximum,
the encoding) say so (`Problem.setting`), in the words of whoever reads the sheet (`Controls`: the
CLI's flags, or the Data tab's fields). Reading is pandas' CSV parser (text decoded here, so a wrong
encoding is reported where it is; `AUTO_ENCODING` detects it with charset-normalizer) and openpyxl
for .xlsx (directly, so row numbers match Excel's even across blank rows).
"""
from __future__ import annotations

import csv
import io
import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data.loading import (DEFAULT_MAX_BYTES, FileReport, Problem, read_limited, schema_problems, show_value,
                          too_big)
from data.rubric import GradedSubmission, RubricItem, expected_of

SPREADSHEET_SUFFIXES = (".csv", ".tsv", ".xlsx")
# The encoding "name" that detects the text's encoding (UTF-8 when it is, else charset-normalizer's guess).
AUTO_ENCODING = "auto"
# Progress is reported every this many rows (a callback per row would cost more than the row).
PROGRESS_EVERY = 2000
# Names a row of per-question maxima goes by in the submission column (Canvas: "Points Possible").
MAX_ROW_NAMES = ("points possible", "max", "max score", "max_score", "maximum", "out of")
# Header names that are totals or bookkeeping, never a question's score (wide shape guesses).
_NOT_QUESTIONS = {"total", "sum", "max", "max_score", "maximum", "out_of", "percent", "percentage",
                  "grade", "final", "final_score", "graded_by", "graded_at", "adapter", "feedback", "comment"}

# What each mapping field is, in the words the CLI's help and the Data tab show.
FIELDS: dict[str, str] = {
    "submission": "the submission's id (e.g. the student): rows with the same value form one submission",
    "group_by": "a further column grouping rows into submissions (e.g. the assignment); "
                "without submission and group_by each row is its own submission",
    "question_id": "the question's label, e.g. 1.2",
    "question": "the question's text (default: its label)",
    "reference_answer": "the model answer",
    "answer": "the student's answer",
    "score": "the score the answer earned (default: the mean of the graders' scores)",
    "max_score": "what the question is worth (default: --max-score)",
    "graders": "one column per grader's score (comma-separated): the item's grader_scores",
    "questions": "wide shape: one score column per question (comma-separated); the header is the question",
    "answers": "wide shape: the answer column of each question, in the order of questions",
    "max_row": "wide shape: the value in the submission column of the row holding each question's maximum",
}


class ColumnMap(BaseModel):
    """Which spreadsheet column holds what. Columns are named by their header text (a blank or
    repeated header by ``column C``, as `Sheet.header` shows it)."""

    model_config = ConfigDict(extra="forbid")

    shape: Literal["long", "wide"] = Field("long", description="long: a row per answer; wide: a row per student")
    submission: str | None = None
    group_by: str | None = None
    question_id: str | None = None
    question: str | None = None
    reference_answer: str | None = None
    answer: str | None = None
    score: str | None = None
    max_score: str | None = None
    graders: list[str] = Field(default_factory=list)
    questions: list[str] = Field(default_factory=list)
    answers: list[str] = Field(default_factory=list)
    max_row: str | None = None
    default_max_score: float | None = Field(
        None, gt=0, description="each question's maximum where no max_score column or max row says it")

    def describe(self) -> str:
        """The mapping in the CLI's own syntax (``submission=Student, questions=Q1,Q2``)."""
        parts = [f"shape={self.shape}"]
        for name in FIELDS:
            value = getattr(self, name)
            if value:
                parts.append(f"{name}={','.join(value) if isinstance(value, list) else value}")
        if self.default_max_score is not None:
            parts.append(f"max-score={self.default_max_score:g}")
        return ", ".join(parts)


@dataclass
class Sheet:
    """A spreadsheet's cells: the header (row 1) and the data rows below it. ``rows[i]`` is the
    spreadsheet's row ``i + 2``; cells are strings (CSV) or Excel's values (str, int, float, bool,
    datetime, None)."""

    file: str
    header: list[str]
    rows: list[list[Any]] = field(repr=False)

    def index(self, column: str) -> int | None:
        """The position of a column named as in `header`, or None."""
        try:
            return self.header.index(column)
        except ValueError:
            return None


def is_spreadsheet(name: str) -> bool:
    """Whether a file name is one this module reads (by its ending)."""
    return name.lower().endswith(SPREADSHEET_SUFFIXES)


def column_letter(index: int) -> str:
    """Excel's name of the 0-based column ``index``: 0 -> A, 25 -> Z, 26 -> AA."""
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(65 + rem) + letters
    return letters


def _where(sheet: Sheet, row: int, col: int | None) -> str:
    """'row 5, column C (score)': what a spreadsheet user looks for."""
    if col is None:
        return f"row {row}"
    name = sheet.header[col]
    shown = "" if name == f"column {column_letter(col)}" else f" ({name})"
    return f"row {row}, column {column_letter(col)}{shown}"


def _at(sheet: Sheet, row: int, col: int | None, value: str, expected: str,
        severity: Literal["error", "warning"] = "error", setting: str | None = None) -> Problem:
    """A problem at a cell (or a row, ``col`` None), numbered as the spreadsheet shows it."""
    return Problem(sheet.file, _where(sheet, row, col), value, expected, severity, row=row, setting=setting)


@dataclass(frozen=True)
class Controls:
    """How the reader of a sheet changes what a message asks for, so its advice names something
    that reader has: the CLI's flags (`CLI_CONTROLS`), or a page's own fields (the Data tab gives
    its labels). Each is a template: ``{field}`` a mapping field, ``{label}`` its label in
    ``labels``, ``{encoding}`` an encoding."""

    column: str = "--map {field}=..."
    max_score: str = "--max-score 5"
    encoding: str = "give --encoding {encoding}"
    labels: dict[str, str] = field(default_factory=dict)

    def column_for(self, fld: str) -> str:
        """How to say which column holds ``fld`` (a `FIELDS` name)."""
        return self.column.format(field=fld, label=self.labels.get(fld, fld))

    def encoding_of(self, encoding: str) -> str:
        """How to read the text as ``encoding``."""
        return self.encoding.format(encoding=encoding)


CLI_CONTROLS = Controls()


# ---------------------------------------------------------------------------------------------
# Bytes -> Sheet


def read_sheet(name: str, data: bytes, *, encoding: str = "utf-8", max_bytes: int = DEFAULT_MAX_BYTES,
               controls: Controls = CLI_CONTROLS) -> tuple[Sheet | None, list[Problem]]:
    """Read a .csv/.tsv (text in ``encoding``, UTF-8 by default, BOM allowed; `AUTO_ENCODING`:
    detected) or .xlsx (its first sheet) into a `Sheet`, with any warning about how it was read
    (the encoding detected); or None and the problems that stop it (too big, wrong encoding, not
    a workbook, empty). ``name`` is shown in messages and picks the format by its ending; it is
    never opened. ``controls``: how the messages' advice names the settings."""
    if len(data) > max_bytes:
        return None, [too_big(name, len(data), max_bytes)]
    try:
        if name.lower().endswith(".xlsx"):
            cells, problems = _xlsx_cells(name, data)
        else:
            cells, problems = _csv_cells(name, data, encoding, "\t" if name.lower().endswith(".tsv") else None,
                                         controls)
    except MemoryError:
        return None, [Problem(name, "", "a sheet too large to read in memory", "a smaller file (split it)")]
    if cells is None:
        return None, problems
    sheet, empty = _sheet(name, cells)
    return sheet, problems + empty


def _sheet(name: str, cells: list[list[Any]]) -> tuple[Sheet | None, list[Problem]]:
    # Trailing blank rows are how spreadsheets end, not data.
    while cells and _blank_row(cells[-1]):
        cells.pop()
    if not cells or _blank_row(cells[0]):
        return None, [Problem(name, "row 1", "an empty sheet" if not cells else "an empty first row",
                              "a header row (the column names) in row 1, and a row per answer or student below it")]
    raw = [_text(v).strip() for v in cells[0]]
    while raw and not raw[-1]:
        raw.pop()
    header: list[str] = []
    for k, h in enumerate(raw):
        # Blank and repeated names get the column's letter, so each column has one name to map.
        header.append(f"column {column_letter(k)}" if not h else
                      h if h not in header else f"{h} (column {column_letter(k)})")
    rows = [(r + [None] * (len(header) - len(r)))[: len(header)] for r in cells[1:]]
    if all(_blank_row(r) for r in rows):
        return None, [Problem(name, "row 2", "a sheet with a header and no data",
                              "a row per answer (or per student) below the header")]
    return Sheet(name, header, rows), []


def _blank_row(row: Iterable[Any]) -> bool:
    return all(_blank(v) for v in row)


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and math.isnan(v))


def _text(v: Any) -> str:
    """A cell as text: Excel's 3.0 is "3" (a question labelled 3), 1.1 stays "1.1"."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _decode(name: str, data: bytes, encoding: str,
            controls: Controls = CLI_CONTROLS) -> tuple[str | None, list[Problem]]:
    """The text, or where the bytes stop being ``encoding`` (row and column of the bad byte)."""
    if encoding == AUTO_ENCODING:
        return _decode_detected(name, data, controls)
    if data.startswith(b"\xef\xbb\xbf") and encoding.replace("-", "").lower() in ("utf8", "utf8sig"):
        data = data[3:]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) and not encoding.lower().startswith("utf-16"):
        return None, [Problem(name, "row 1", "UTF-16 text (byte order mark FF FE / FE FF)",
                              f"UTF-8 text: in Excel, Save As 'CSV UTF-8'; or {controls.encoding_of('utf-16')}",
                              row=1, setting="encoding")]
    if b"\x00" in data[:4096] and not encoding.lower().startswith("utf-16"):
        return None, [Problem(name, "row 1", "a binary file (NUL bytes)",
                              "a CSV text file, or an Excel workbook saved as .xlsx", row=1)]
    try:
        return data.decode(encoding), []
    except LookupError:
        return None, [Problem(name, "", f"an unknown encoding {encoding!r}",
                              "an encoding Python knows, e.g. utf-8, cp1252", setting="encoding")]
    except UnicodeDecodeError as e:
        before = data[: e.start]
        row = before.count(b"\n") + 1
        line = before[before.rfind(b"\n") + 1:].decode(encoding, "replace")
        # The column the bad byte is in: the number of cells its line has begun up to it.
        col = max(len(next(csv.reader([line]), [""])) - 1, 0)
        bad = data[e.start: e.start + 2].hex(" ")
        return None, [Problem(name, f"row {row}, column {column_letter(col)}",
                              f"bytes that are not {encoding} text ({bad} at byte offset {e.start})",
                              f"{encoding} text: in Excel, Save As 'CSV UTF-8'; a file saved as plain 'CSV' "
                              f"by Excel on Windows is usually cp1252 ({controls.encoding_of('cp1252')})",
                              row=row, setting="encoding")]


def _decode_detected(name: str, data: bytes, controls: Controls) -> tuple[str | None, list[Problem]]:
    """UTF-8 (with or without BOM) when the bytes are UTF-8, UTF-16 by its byte order mark, else
    the encoding charset-normalizer finds, said in a warning (a guess the user should see)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return _decode(name, data, "utf-16", controls)
    text, problems = _decode(name, data, "utf-8", controls)
    if text is not None or not any(p.setting == "encoding" for p in problems):
        return text, problems
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None:
        return None, problems  # where the bytes stop being UTF-8, and how to name the encoding
    # Excel on Windows writes cp1252: taken when it reads the bytes as the best guess does (on a
    # few accents cp1250 and cp1252 tie, and the guess names the first).
    found = "cp1252" if "cp1252" in best.could_be_from_charset else best.encoding
    text, _ = _decode(name, data, found, controls)
    if text is None:
        return None, problems
    return text, [Problem(name, "", f"text that is not UTF-8, read as {found} (detected)",
                          "UTF-8 text; if accents or symbols look wrong in the preview, "
                          f"{controls.encoding_of('the encoding the file was saved in')}", "warning",
                          setting="encoding")]


def _delimiter(text: str) -> str:
    """The separator of the header line: ',' unless ';' or a tab splits it into more cells
    (Excel in many European locales writes ';')."""
    first = text.split("\n", 1)[0]
    best, most = ",", 0
    for d in (",", ";", "\t"):
        n = len(next(csv.reader([first], delimiter=d), []))
        if n > most:
            best, most = d, n
    return best


def _csv_cells(name: str, data: bytes, encoding: str, sep: str | None,
               controls: Controls = CLI_CONTROLS) -> tuple[list[list[Any]] | None, list[Problem]]:
    import pandas as pd

    text, problems = _decode(name, data, encoding, controls)
    if text is None:
        return None, problems
    if not text.strip():
        return None, [Problem(name, "row 1", "an empty file", "a header row (the column names) and rows of data")]
    try:
        # Every cell as the text it is: pandas' guesses would turn a question "1.10" into 1.1 and an
        # answer "NA" into a missing value. Blank lines stay rows, so row numbers are the sheet's.
        df = pd.read_csv(io.StringIO(text), header=None, dtype=str, keep_default_na=False, na_filter=False,
                         skip_blank_lines=False, sep=sep or _delimiter(text), engine="c")
    except pd.errors.ParserError as e:
        m = re.search(r"line (\d+)", str(e))
        return None, [Problem(name, f"row {m.group(1)}" if m else "", f"a row that cannot be read ({e})",
                              "the same number of cells in every row (is a quote left open?)")]
    except pd.errors.EmptyDataError:
        return None, [Problem(name, "row 1", "an empty file", "a header row (the column names) and rows of data")]
    return df.to_numpy(dtype=object, na_value=None).tolist(), problems


def _xlsx_cells(name: str, data: bytes) -> tuple[list[list[Any]] | None, list[Problem]]:
    import openpyxl

    if not data.startswith(b"PK"):
        old = data.startswith(b"\xd0\xcf\x11\xe0")  # the OLE2 container of .xls (Excel 97-2003)
        return None, [Problem(name, "", "an old .xls workbook" if old else "a file that is not an Excel workbook",
                              "an .xlsx workbook (in Excel: Save As 'Excel Workbook (.xlsx)') or a CSV file")]
    try:
        wb = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as e:
        return None, [Problem(name, "", f"a damaged or unsupported .xlsx file ({type(e).__name__}: {e})",
                              "an .xlsx workbook saved by Excel, LibreOffice or Google Sheets")]
    try:
        if not wb.worksheets:
            return None, [Problem(name, "", "a workbook without sheets", "a workbook whose first sheet holds the data")]
        ws = wb.worksheets[0]
        # The dimension a file declares may be wrong (some writers leave it A1): read what is there.
        ws.reset_dimensions()
        return [list(r) for r in ws.iter_rows(values_only=True)], []
    finally:
        wb.close()


# ---------------------------------------------------------------------------------------------
# Guessing a mapping from the header


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


_GUESSES: dict[str, tuple[str, ...]] = {
    "submission": ("submission_id", "submission", "student_id", "student", "student_name", "learner", "candidate",
                   "username", "user", "email", "name"),
    "question_id": ("question_id", "qid", "question_number", "question_no", "item_id", "id"),
    "question": ("question", "question_text", "prompt", "item", "task"),
    "reference_answer": ("reference_answer", "desired_answer", "model_answer", "expected_answer", "reference",
                         "answer_key", "solution"),
    "answer": ("answer", "student_answer", "response", "student_response", "answer_text"),
    "score": ("score", "score_avg", "avg_score", "mean_score", "final_score", "points", "mark", "marks", "grade"),
    "max_score": ("max_score", "max_points", "points_possible", "out_of", "maximum", "max"),
}
_GRADER = re.compile(r"^(score|grade|mark|points)_(?!avg|mean|max)|grader|rater|marker|^teacher")


def _find(names: list[str], wanted: tuple[str, ...], taken: set[str]) -> str | None:
    norm = {_norm(n): n for n in reversed(names)}
    for w in wanted:
        if w in norm and norm[w] not in taken:
            return norm[w]
    return None


def _numeric(v: Any) -> bool:
    return _number(v) is not None


def guess_mapping(sheet: Sheet, shape: Literal["long", "wide"] | None = None) -> ColumnMap:
    """A mapping proposed from the header's names (e.g. ``desired_answer`` -> reference answer,
    ``score_me``/``score_other`` -> graders). Without ``shape``: wide when no column looks like
    a score of one answer and several columns hold numbers. The user checks it; nothing is
    guessed where the names say nothing."""
    names = sheet.header
    taken: set[str] = set()
    picked: dict[str, Any] = {}
    for key in ("submission", "question_id", "question", "reference_answer", "answer", "score", "max_score"):
        found = _find(names, _GUESSES[key], taken)
        if found:
            picked[key] = found
            taken.add(found)
    graders = [n for n in names if n not in taken and _GRADER.search(_norm(n))]
    if graders and "score" not in picked and len(graders) == 1:
        picked["score"], graders = graders[0], []
    sample = sheet.rows[:50]
    numeric_cols = [n for k, n in enumerate(names)
                    if n not in taken and _norm(n) not in _NOT_QUESTIONS and not _GRADER.search(_norm(n))
                    and any(not _blank(r[k]) for r in sample)
                    and sum(_numeric(r[k]) for r in sample if not _blank(r[k])) >= 0.8 * sum(not _blank(r[k]) for r in sample)]
    if shape is None:
        shape = "long" if ("score" in picked or graders or "answer" in picked) else "wide" if numeric_cols else "long"
    if shape == "long":
        return ColumnMap(shape="long", graders=graders, **picked)
    sub = picked.get("submission")
    max_row = None
    if sub is not None:
        col = names.index(sub)
        max_row = next((_text(r[col]).strip() for r in sheet.rows if _text(r[col]).strip().lower() in MAX_ROW_NAMES), None)
    # In a wide sheet every numeric column that is no total is a question (a "score" column too).
    questions = [n for n in names if n != sub and _norm(n) not in _NOT_QUESTIONS and n in numeric_cols + [picked.get("score")]]
    answers = [_find(names, (f"{_norm(q)}_answer", f"answer_{_norm(q)}", f"{_norm(q)}_response"), set()) or "" for q in questions]
    return ColumnMap(shape="wide", submission=sub, questions=questions,
                     answers=answers if any(answers) else [], max_row=max_row)


# ---------------------------------------------------------------------------------------------
# Sheet + ColumnMap -> GradedSubmissions


def _number(v: Any) -> float | None:
    """A cell's number, or None when it holds none (text, a date, TRUE/FALSE, NaN, infinity)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        x = float(v)
    elif isinstance(v, str):
        s = v.strip()
        if not s or not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", s):
            return None
        x = float(s)
    else:
        return None
    return x if math.isfinite(x) else None


@dataclass
class _Item:
    record: dict[str, Any]
    row: int
    cols: dict[str, int | None]  # the column each field came from (for the schema's errors)


def _mapping_problems(sheet: Sheet, m: ColumnMap, c: Controls = CLI_CONTROLS) -> list[Problem]:
    """A mapped column the header lacks, or a mapping that cannot make submissions: each fixed by
    the mapping (``c`` says how its reader sets it), not by the file."""
    where = "row 1 (header)"
    problems: list[Problem] = []

    def need(value: str, expected: str, setting: str = "columns") -> None:
        problems.append(Problem(sheet.file, where, value, expected, row=1, setting=setting))

    have = ", ".join(sheet.header[:30]) + (", ..." if len(sheet.header) > 30 else "")
    single = ["submission", "group_by", "question_id", "question", "reference_answer", "answer", "score", "max_score"]
    mapped = [(f, getattr(m, f)) for f in single if getattr(m, f)]
    mapped += [("graders", col) for col in m.graders] + [("questions", col) for col in m.questions]
    mapped += [("answers", col) for col in m.answers if col]
    for fld, col in mapped:
        if sheet.index(col) is None:
            need(f"no column {col!r} (mapped to {fld})", f"a column of this sheet: {have} ({c.column_for(fld)})")
    one_max = f"one maximum for all ({c.max_score})"
    if m.shape == "long":
        if not (m.score or m.graders):
            need("no score column mapped",
                 f"a score column ({c.column_for('score')}) or the graders' score columns ({c.column_for('graders')})")
        if not (m.question or m.question_id):
            need("no question column mapped",
                 f"the question's text ({c.column_for('question')}) or its label ({c.column_for('question_id')})")
        if not m.answer:  # items with empty answers teach the model nothing about answers
            need("no answer column mapped", f"the column of the students' answers ({c.column_for('answer')})")
        if not (m.max_score or m.default_max_score):
            need("no maximum score", f"a max score column ({c.column_for('max_score')}) or {one_max}", "max_score")
        if m.questions or m.answers or m.max_row:
            need("questions/answers/max_row in a long mapping",
                 f"those for shape wide (one row per student); for long, {c.column_for('score')} and "
                 f"{c.column_for('question')}")
    else:
        if not m.questions:
            need("no question columns mapped", f"the score column of each question ({c.column_for('questions')})")
        if m.answers and len(m.answers) != len(m.questions):
            need(f"{len(m.answers)} answer columns for {len(m.questions)} questions",
                 "one answer column per question, in the same order (leave one empty for none)")
        if not (m.max_row or m.default_max_score):
            need("no maximum score", f"a row of maxima ({c.column_for('max_row')}) or {one_max}", "max_score")
        extra = [f for f in ("group_by", "question_id", "question", "reference_answer", "answer", "score", "max_score")
                 if getattr(m, f)] + (["graders"] if m.graders else [])
        if extra:
            need(f"{', '.join(extra)} in a wide mapping",
                 "for one row per student: submission, questions, answers, max_row")
    return problems


def sheet_submissions(sheet: Sheet, mapping: ColumnMap, progress: Callable[[int, int], None] | None = None,
                      controls: Controls = CLI_CONTROLS) -> FileReport:
    """The graded submissions ``mapping`` reads from ``sheet``, validated by the schema, with every
    problem at its row and column, in row order. ``progress(rows_done, rows_total)`` is called as
    rows are read; ``controls``: how advice names the settings. Any error: the report holds no
    submission."""
    problems = _mapping_problems(sheet, mapping, controls)
    if problems:
        return FileReport(file=sheet.file, problems=problems)
    if mapping.shape == "long":
        groups, problems = _long_items(sheet, mapping, progress)
    else:
        groups, problems = _wide_items(sheet, mapping, progress)
    subs: list[GradedSubmission] = []
    where: list[str] = []
    for sid, items in groups.items():
        if not items:
            continue
        rec = {"submission_id": sid, "score": sum(i.record["score"] for i in items),
               "max_score": sum(i.record["max_score"] for i in items),
               "rubric_alignment": [i.record for i in items]}
        try:
            subs.append(GradedSubmission.model_validate(rec))
            where.append(f"row {items[0].row}")
        except ValidationError as e:
            problems += _located(sheet, items, e)
    if mapping.shape == "wide" and not mapping.answers and subs:
        problems.append(Problem(sheet.file, "", "no answer columns",
                                "answer columns for training (fine for a gradebook of scores only: every "
                                "item's answer is empty)", "warning"))
    if progress is not None:
        progress(len(sheet.rows), len(sheet.rows))
    # The schema's errors are found per submission, after every row's own: listed as the sheet reads.
    problems.sort(key=lambda p: p.row or 0)
    report = FileReport(file=sheet.file, problems=problems)
    if report.ok:
        report.submissions, report.record_paths = subs, where
    return report


def _located(sheet: Sheet, items: list[_Item], error: ValidationError) -> list[Problem]:
    """The schema's errors (worded by `data.loading`, as for JSON) at the row and column the value
    came from: ``rubric_alignment[3].score`` is item 3's score cell."""
    out = []
    found = schema_problems(sheet.file, "", GradedSubmission, error)
    in_items = any(p.path.startswith("rubric_alignment[") for p in found)
    for p in found:
        m = re.match(r"rubric_alignment\[(\d+)\](?:\.(\w+))?", p.path)
        if m is None and in_items:
            continue  # the total is the sum of the items: its error repeats theirs
        item = items[int(m.group(1))] if m and int(m.group(1)) < len(items) else items[0]
        col = item.cols.get(m.group(2)) if m and m.group(2) else None
        p.path, p.row = _where(sheet, item.row, col), item.row
        x = _number(p.value)
        if x is not None:  # a cell's -1 was read as -1.0: show it as the sheet does
            p.value = f"{x:g}"
        out.append(p)
    return out


def _cell_number(sheet: Sheet, row: int, col: int, v: Any, fld: str, problems: list[Problem]) -> float | None:
    x = _number(v)
    if x is None:
        expected = expected_of(RubricItem, (fld,))
        got = "an empty cell" if _blank(v) else f"{show_value(_text(v), 40)} (not a number)"
        problems.append(_at(sheet, row, col, got,
                                f"{expected} (digits with a dot for decimals, e.g. 3.5)"))
    return x


def _long_items(sheet: Sheet, m: ColumnMap, progress) -> tuple[dict[str, list[_Item]], list[Problem]]:
    ix = sheet.index
    key_cols = [c for c in (ix(m.submission) if m.submission else None, ix(m.group_by) if m.group_by else None)
                if c is not None]
    c_qid, c_q = (ix(m.question_id) if m.question_id else None), (ix(m.question) if m.question else None)
    c_ref, c_ans = (ix(m.reference_answer) if m.reference_answer else None), (ix(m.answer) if m.answer else None)
    c_score, c_max = (ix(m.score) if m.score else None), (ix(m.max_score) if m.max_score else None)
    c_graders = [ix(g) for g in m.graders]
    stem = Path(sheet.file).stem
    groups: dict[str, list[_Item]] = {}
    problems: list[Problem] = []
    seen_q: dict[str, set[str]] = {}
    repeated: set[str] = set()
    # Rows grouped by the question itself (Mohler has no student column) repeat it on purpose.
    check_repeats = bool(key_cols) and not ({c_qid, c_q} & set(key_cols))
    total = len(sheet.rows)
    for k, cells in enumerate(sheet.rows):
        if progress is not None and k % PROGRESS_EVERY == 0:
            progress(k, total)
        if _blank_row(cells):
            continue
        row = k + 2
        before = len(problems)
        parts = []
        for c in key_cols:
            v = _text(cells[c]).strip()
            if not v:
                problems.append(_at(sheet, row, c, "an empty cell",
                                        "a value in every row: rows are grouped into submissions by it"))
            parts.append(v)
        sid = "/".join(parts) if key_cols else f"{stem}:row{row}"
        qid = _text(cells[c_qid]).strip() if c_qid is not None else ""
        question = _text(cells[c_q]).strip() if c_q is not None else ""
        if not (question or qid):
            problems.append(_at(sheet, row, c_q if c_q is not None else c_qid, "an empty cell",
                                    expected_of(RubricItem, ("question",))))
        grader_scores = []
        for c in c_graders:
            if not _blank(cells[c]):  # a grader who did not grade this answer leaves it blank
                x = _cell_number(sheet, row, c, cells[c], "grader_scores", problems)
                if x is not None:
                    grader_scores.append(x)
        if c_score is not None:
            score = _cell_number(sheet, row, c_score, cells[c_score], "score", problems)
        elif grader_scores:
            score = sum(grader_scores) / len(grader_scores)
        else:
            score = None
            if len(problems) == before:
                problems.append(_at(sheet, row, c_graders[0], "no grader's score in this row",
                                        "a score from at least one grader (a number)"))
        if c_max is not None and not (_blank(cells[c_max]) and m.default_max_score):
            mx = _cell_number(sheet, row, c_max, cells[c_max], "max_score", problems)
        else:
            mx = m.default_max_score
        if len(problems) > before:
            continue
        rec: dict[str, Any] = {"question": question or qid,
                               "answer": _text(cells[c_ans]) if c_ans is not None else "",
                               "score": score, "max_score": mx}
        if qid:
            rec["question_id"] = qid
        if c_ref is not None and not _blank(cells[c_ref]):
            rec["reference_answer"] = _text(cells[c_ref])
        if grader_scores:
            rec["grader_scores"] = grader_scores
        if c_ans is not None and not rec["answer"].strip() and score:
            problems.append(_at(sheet, row, c_ans, f"an empty answer that scored {score:g}",
                                    "the student's answer text (was it lost? leave such items out of training)",
                                    "warning"))
        label = qid or question
        if check_repeats and label in seen_q.setdefault(sid, set()) and sid not in repeated:
            repeated.add(sid)  # once per submission: the first repeat is what to look at
            problems.append(_at(sheet, row, c_qid if c_qid is not None else c_q,
                                    f"question {show_value(label, 40)} again in submission {show_value(sid, 40)}",
                                    "each question once per submission (is a row repeated?)", "warning"))
        if check_repeats:
            seen_q[sid].add(label)
        groups.setdefault(sid, []).append(_Item(rec, row, {
            "question": c_q if c_q is not None else c_qid, "question_id": c_qid, "answer": c_ans,
            "reference_answer": c_ref, "score": c_score if c_score is not None else (c_graders or [None])[0],
            "max_score": c_max, "grader_scores": (c_graders or [None])[0]}))
    return groups, problems


def _wide_items(sheet: Sheet, m: ColumnMap, progress) -> tuple[dict[str, list[_Item]], list[Problem]]:
    ix = sheet.index
    c_sub = ix(m.submission) if m.submission else None
    c_qs = [ix(q) for q in m.questions]
    c_ans = [ix(a) if a else None for a in m.answers] or [None] * len(c_qs)
    stem = Path(sheet.file).stem
    problems: list[Problem] = []
    maxes: list[float | None] = [m.default_max_score] * len(c_qs)
    max_row = None
    if m.max_row:
        max_row = next((k for k, r in enumerate(sheet.rows)
                        if c_sub is not None and _text(r[c_sub]).strip().lower() == m.max_row.strip().lower()), None)
        if max_row is None:
            problems.append(_at(sheet, 1, c_sub,
                                    f"no row named {m.max_row!r} in the submission column",
                                    "a row holding each question's maximum, named so in the submission column",
                                    setting="columns"))
            return {}, problems
        for j, c in enumerate(c_qs):
            cell = sheet.rows[max_row][c]
            if _blank(cell) and m.default_max_score:
                continue
            maxes[j] = _cell_number(sheet, max_row + 2, c, cell, "max_score", problems)
        if problems:
            return {}, problems
    groups: dict[str, list[_Item]] = {}
    rows_of: dict[str, int] = {}
    total = len(sheet.rows)
    for k, cells in enumerate(sheet.rows):
        if progress is not None and k % PROGRESS_EVERY == 0:
            progress(k, total)
        if k == max_row or _blank_row(cells):
            continue
        row = k + 2
        if c_sub is not None:
            sid = _text(cells[c_sub]).strip()
            if not sid:
                problems.append(_at(sheet, row, c_sub, "an empty cell",
                                        "the submission's id (e.g. the student) in every row"))
                continue
            if sid in rows_of:
                problems.append(_at(sheet, row, c_sub,
                                        f"{show_value(sid, 40)} again (also in row {rows_of[sid]})",
                                        "one row per submission"))
                continue
            rows_of[sid] = row
        else:
            sid = f"{stem}:row{row}"
        items: list[_Item] = []
        before = len(problems)
        for j, c in enumerate(c_qs):
            if _blank(cells[c]):
                continue  # not graded (yet): a gradebook's empty cell
            score = _cell_number(sheet, row, c, cells[c], "score", problems)
            if score is None:
                continue
            ca = c_ans[j]
            label = sheet.header[c]
            rec = {"question": label, "question_id": label, "answer": _text(cells[ca]) if ca is not None else "",
                   "score": score, "max_score": maxes[j]}
            items.append(_Item(rec, row, {"score": c, "answer": ca, "question": c, "question_id": c,
                                          "max_score": c if max_row is None else None}))
        if len(problems) > before:
            continue
        if not items:
            problems.append(_at(sheet, row, None, "a row without any score",
                                    "a score in at least one question column (the row is left out)", "warning"))
            continue
        groups[sid] = items
    return groups, problems


# ---------------------------------------------------------------------------------------------
# Public entry points


def load_spreadsheet_bytes(name: str, data: bytes, mapping: ColumnMap | None = None, *, encoding: str = "utf-8",
                           max_bytes: int = DEFAULT_MAX_BYTES, progress: Callable[[int, int], None] | None = None,
                           controls: Controls = CLI_CONTROLS) -> tuple[FileReport, ColumnMap | None]:
    """Read and validate one spreadsheet (``name`` only for messages and its ending). Without
    ``mapping`` the guessed one is used. Returns the report (how it was read, e.g. the encoding
    detected, first) and the mapping used (None when the file could not be read). Never raises on
    bad content."""
    try:
        sheet, read = read_sheet(name, data, encoding=encoding, max_bytes=max_bytes, controls=controls)
        if sheet is None:
            return FileReport(file=name, problems=read), None
        mapping = mapping or guess_mapping(sheet)
        report = sheet_submissions(sheet, mapping, progress, controls)
        report.problems[:0] = read
        return report, mapping
    except Exception as e:  # noqa: BLE001 - a reader bug must still reach the user as a problem, not a traceback
        return FileReport(file=name, problems=[Problem(
            name, "", f"content the reader failed on (internal error {type(e).__name__}: {e})",
            "a CSV or .xlsx file; please report this file to the studio's developers")]), None


def read_sheet_file(path: str | Path, *, encoding: str = "utf-8",
                    max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Sheet | None, list[Problem]]:
    """`read_sheet` for a file on disk (refused before reading when over ``max_bytes``)."""
    data, problems = read_limited(Path(path), max_bytes)
    if data is None:
        return None, problems
    return read_sheet(str(path), data, encoding=encoding, max_bytes=max_bytes)


def load_spreadsheet(path: str | Path, mapping: ColumnMap | None = None, *, encoding: str = "utf-8",
                     max_bytes: int = DEFAULT_MAX_BYTES,
                     progress: Callable[[int, int], None] | None = None) -> tuple[FileReport, ColumnMap | None]:
    """`load_spreadsheet_bytes` for a file on disk (refused before reading when over ``max_bytes``)."""
    data, problems = read_limited(Path(path), max_bytes)
    if data is None:
        return FileReport(file=str(path), problems=problems), None
    return load_spreadsheet_bytes(str(path), data, mapping, encoding=encoding, max_bytes=max_bytes, progress=progress)


def parse_map_args(items: list[str], base: ColumnMap | None = None) -> ColumnMap:
    """The CLI's ``--map field=column`` (repeatable; list fields take commas or repeat; an empty
    value clears a guess) applied over ``base``. Raises ValueError naming the bad item."""
    data = (base or ColumnMap()).model_dump()
    given: set[str] = set()
    aliases = {"grader": "graders", "question_ids": "question_id", "answer_column": "answer",
               "student": "submission", "group-by": "group_by", "max": "max_score", "reference": "reference_answer"}
    for item in items:
        key, sep, value = item.partition("=")
        key = aliases.get(key.strip(), key.strip().replace("-", "_"))
        if not sep or key not in FIELDS:
            raise ValueError(f"--map {item!r}: expected FIELD=COLUMN with FIELD one of {', '.join(FIELDS)}")
        value = value.strip()
        if isinstance(data[key], list):
            new = [v.strip() for v in value.split(",")] if value else []
            data[key] = data[key] + new if key in given else new
        else:
            data[key] = value or None
        given.add(key)
    return ColumnMap.model_validate(data)
