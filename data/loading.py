"""Reading graded submissions and rubrics from files, with every problem reported.

A user hands the studio weeks of grading as JSON: one object, a list, JSON Lines, or a folder of
such files. This module turns those bytes into validated `GradedSubmission` models, or into a
list of `Problem`s that each say which file, which JSON path (``[12].rubric_alignment[3].score``),
what value was found and what was expected. It never raises on bad content: binary files,
invalid UTF-8, broken JSON, absurd nesting, NaN, oversize files all become problems.

A file with any error yields no submissions (nothing partial reaches training or the store).

What valid data is lives in `data.rubric` (the pydantic schema and its validators); this module
only reads bytes into JSON records, and turns the schema's errors into problems with the file and
the JSON path. The checks here are of the file, not the data: encoding, JSON syntax, nesting
depth, NaN/Infinity (JSON has none), size, submission ids unique across the data set, and the
warnings about data that is valid but suspicious.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from pydantic import BaseModel, ValidationError

from data.rubric import TOTAL_TOLERANCE, GradedSubmission, Rubric, expected_of, shared_max

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
# Real submissions are a few levels deep; anything far deeper is an accident or an attack, and
# would make recursive code (json.dumps, pydantic) hit Python's recursion limit later on.
MAX_DEPTH = 64
# A report listing a hundred thousand problems helps nobody; the report keeps them all, the
# human-readable text shows this many per file.
MAX_SHOWN_PER_FILE = 50

_BOM = b"\xef\xbb\xbf"


@dataclass
class Problem:
    """One thing wrong (error) or suspicious (warning) in one file."""

    file: str
    path: str
    value: str
    expected: str
    severity: Literal["error", "warning"] = "error"
    row: int | None = None  # a spreadsheet's row number (problems are listed in row order)
    # The reading setting that fixes it ("columns", "max_score", "encoding"), where the file itself
    # is fine; None: the file has to change.
    setting: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}: " if self.path else f"{self.file}: "
        return f"{where}got {self.value}; expected {self.expected}"


@dataclass
class FileReport:
    """What one file held: its submissions (only when it has no errors) and its problems."""

    file: str
    submissions: list[GradedSubmission] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    # Where each submission sits in the file ("[3]", "line 4", ""), for messages about it later.
    record_paths: list[str] = field(default_factory=list, repr=False)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class ValidationReport:
    """The outcome of loading several files: per-file reports plus totals."""

    files: list[FileReport] = field(default_factory=list)

    @property
    def submissions(self) -> list[GradedSubmission]:
        """All submissions of files without errors, in file order."""
        return [s for f in self.files if f.ok for s in f.submissions]

    @property
    def errors(self) -> list[Problem]:
        return [p for f in self.files for p in f.errors]

    @property
    def warnings(self) -> list[Problem]:
        return [p for f in self.files for p in f.warnings]

    @property
    def ok(self) -> bool:
        return bool(self.files) and all(f.ok for f in self.files)

    def format(self, max_ok_listed: int = 10) -> str:
        """A report for people: each file OK or its errors and warnings, then totals.

        Files that are OK without warnings are listed one per line up to ``max_ok_listed``,
        then summarised, so validating a folder of hundreds of files stays readable.
        """
        lines: list[str] = []
        clean = [f for f in self.files if f.ok and not f.warnings]
        for f in self.files:
            if f.ok and not f.warnings:
                continue
            n = len(f.submissions)
            if f.ok:
                head = f"{f.file}: OK, {n} submission{'s' if n != 1 else ''}, {len(f.warnings)} warning(s)"
            else:
                head = f"{f.file}: INVALID, {len(f.errors)} error(s), {len(f.warnings)} warning(s); nothing loaded from it"
            lines.append(head)
            shown = f.errors + f.warnings
            for p in shown[:MAX_SHOWN_PER_FILE]:
                where = f"{p.path}: " if p.path else ""
                lines.append(f"  {p.severity}: {where}got {p.value}; expected {p.expected}")
            if len(shown) > MAX_SHOWN_PER_FILE:
                lines.append(f"  ... and {len(shown) - MAX_SHOWN_PER_FILE} more problem(s) in this file")
        for f in clean[:max_ok_listed]:
            n = len(f.submissions)
            lines.append(f"{f.file}: OK, {n} submission{'s' if n != 1 else ''}")
        if len(clean) > max_ok_listed:
            rest = clean[max_ok_listed:]
            lines.append(
                f"... and {len(rest)} more file(s) OK ({sum(len(f.submissions) for f in rest)} submissions)"
            )
        n_bad = sum(1 for f in self.files if not f.ok)
        lines.append(
            f"Total: {len(self.files)} file(s), {len(self.files) - n_bad} valid, {n_bad} invalid; "
            f"{len(self.submissions)} valid submission(s); {len(self.errors)} error(s), "
            f"{len(self.warnings)} warning(s)"
        )
        lines.append("Result: OK" if self.ok else "Result: INVALID (fix the errors above; files with errors are not loaded)")
        return "\n".join(lines)


class DataError(ValueError):
    """A file cannot be used; the message names the file, the field and the fix."""

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


# ---------------------------------------------------------------------------------------------
# Small helpers: how values and paths are shown


def show_value(value: Any, limit: int = 80) -> str:
    """A short, JSON-like rendering of a value for messages."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    # Lone surrogates (from "\ud800" escapes) would make printing the message itself fail.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for 'got a string' style messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _join(prefix: str, part: str | int) -> str:
    """Extend a JSON path: ints become ``[i]``, names become ``.name`` (no dot at the start)."""
    if isinstance(part, int):
        return f"{prefix}[{part}]"
    if not prefix:
        return part
    if prefix.endswith(": "):  # JSONL prefix "line 3: "
        return prefix + part
    return f"{prefix}.{part}"


def _loc_to_path(prefix: str, loc: tuple[Any, ...]) -> str:
    """Translate a pydantic error location into our JSON path format."""
    path = prefix
    for part in loc:
        path = _join(path, part if isinstance(part, int) else str(part))
    return path.rstrip(": ") if path.endswith(": ") else path


def _scan(value: Any, limit: int) -> tuple[bool, bool]:
    """(nested deeper than ``limit``, holds NaN/Infinity): one fast pass without paths; the
    path-naming walks below run only when something is wrong."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    non_finite = False
    while stack:
        v, d = stack.pop()
        if d > limit:
            return True, non_finite
        t = type(v)
        if t is dict:
            stack.extend((x, d + 1) for x in v.values())
        elif t is list:
            stack.extend((x, d + 1) for x in v)
        elif t is float and not math.isfinite(v):
            non_finite = True
    return False, non_finite


def _too_deep(value: Any, limit: int, prefix: str = "") -> str | None:
    """The path (first few levels) of data nested deeper than ``limit``, else None.

    Iterative on purpose: deeply nested input must not make the checker itself recurse.
    """
    stack: list[tuple[Any, int, str]] = [(value, 1, prefix)]
    while stack:
        v, d, p = stack.pop()
        if d > limit:
            return p.rstrip(": ") if p.endswith(": ") else p
        # Name the path for the first levels only: a path 64 levels long helps nobody.
        if isinstance(v, dict):
            stack.extend((x, d + 1, _join(p, str(k)) if d <= 3 else p) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((x, d + 1, _join(p, i) if d <= 3 else p) for i, x in enumerate(v))
    return None


def _non_finite(value: Any, prefix: str) -> Iterator[tuple[str, float]]:
    """Every NaN/Infinity in a parsed document with its path (Python's json accepts them)."""
    stack: list[tuple[Any, str]] = [(value, prefix)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            yield (p.rstrip(": ") if p.endswith(": ") else p), v
        elif isinstance(v, dict):
            stack.extend((x, _join(p, str(k))) for k, x in reversed(list(v.items())))
        elif isinstance(v, list):
            stack.extend((x, _join(p, i)) for i, x in reversed(list(enumerate(v))))


# A \uD800-\uDFFF escape: the only way a lone surrogate gets into decoded UTF-8 JSON. Python's json
# accepts it, but such a string cannot be written as UTF-8 again (hashing, SQLite, tokenizers).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogates(value: Any, prefix: str) -> Iterator[tuple[str, str]]:
    """(path, string) for every string or key holding a lone surrogate."""
    stack: list[tuple[Any, str]] = [(value, prefix)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                yield (p.rstrip(": ") if p.endswith(": ") else p), v
        elif isinstance(v, dict):
            for k, x in v.items():
                if _SURROGATE.search(k):
                    yield _join(p, "<key>"), k
                stack.append((x, _join(p, k)))
        elif isinstance(v, list):
            stack.extend((x, _join(p, i)) for i, x in enumerate(v))


def _unicode_problem(name: str, path: str, text: str) -> Problem:
    return Problem(name, path, f"{show_value(text, 60)} (a lone UTF-16 surrogate escape)",
                   "valid Unicode text (a \\uD800-\\uDFFF escape must be half of a pair)")


# ---------------------------------------------------------------------------------------------
# Bytes -> text -> JSON records


def _decode(name: str, data: bytes) -> tuple[str | None, list[Problem]]:
    """UTF-8 (BOM allowed) text, or a problem that says what the bytes look like instead."""
    if data.startswith(b"\xff\xfe") or data.startswith(b"\xfe\xff"):
        return None, [Problem(name, "", "UTF-16 text (byte order mark FF FE / FE FF)",
                              "UTF-8 text (re-save the file as UTF-8)")]
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    if b"\x00" in data:
        pos = data.index(b"\x00")
        return None, [Problem(name, "", f"a binary file (NUL byte at offset {pos})",
                              "UTF-8 JSON text; is this the right file?")]
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError as e:
        before = data[: e.start]
        line = before.count(b"\n") + 1
        col = e.start - (before.rfind(b"\n") + 1) + 1
        bad = data[e.start : e.start + 4].hex(" ")
        return None, [Problem(name, f"line {line}, column {col}",
                              f"bytes that are not valid UTF-8 ({bad} at byte offset {e.start})",
                              "UTF-8 text (re-save the file as UTF-8)")]


def _json_error(name: str, text: str, e: json.JSONDecodeError, line_offset: int = 0) -> Problem:
    lines = text.split("\n")
    snippet = lines[e.lineno - 1] if 0 < e.lineno <= len(lines) else ""
    start = max(0, e.colno - 30)
    context = snippet[start : e.colno + 20].strip()
    where = f"line {e.lineno + line_offset}, column {e.colno}"
    return Problem(name, where, f"invalid JSON near {show_value(context)}",
                   f"valid JSON ({e.msg} at {where})")


def _loads(name: str, text: str, line_offset: int = 0) -> tuple[Any, list[Problem]]:
    """json.loads that turns every failure into a problem (never a traceback)."""
    try:
        return json.loads(text), []
    except json.JSONDecodeError as e:
        return None, [_json_error(name, text, e, line_offset)]
    except RecursionError:
        where = f"line {line_offset + 1}" if line_offset else ""
        return None, [Problem(name, where, "JSON nested too deeply to read",
                              f"at most {MAX_DEPTH} levels of nested lists/objects")]
    except (ValueError, TypeError, MemoryError) as e:  # e.g. a 5000-digit integer
        where = f"line {line_offset + 1}" if line_offset else ""
        return None, [Problem(name, where, f"JSON that cannot be read ({e})", "ordinary JSON numbers and strings")]


def _records(name: str, text: str, jsonl: bool) -> tuple[list[tuple[str, Any]], list[Problem]]:
    """The file's records as (path prefix, value): one object, a list's elements, or JSONL lines."""
    if not text.strip():
        return [], [Problem(name, "", "an empty file", "a JSON object, a list of objects, or JSON Lines")]
    if not jsonl:
        value, problems = _loads(name, text)
        if problems and "Extra data" in problems[0].expected:
            # A .json file holding JSON Lines: accept it if every line parses as JSON Lines.
            recs, jl_problems = _records(name, text, True)
            if not jl_problems:
                return recs, []
        if problems:
            return [], problems
        if isinstance(value, list):
            if not value:
                return [], [Problem(name, "", "an empty list []", "at least one graded submission")]
            return [(f"[{i}]", v) for i, v in enumerate(value)], []
        return [("", value)], []
    records: list[tuple[str, Any]] = []
    problems: list[Problem] = []
    # Split on "\n" only: str.splitlines() also splits on U+2028 etc., which JSON strings may hold.
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        value, p = _loads(name, line, n - 1)
        problems += p
        if not p:
            records.append((f"line {n}: ", value))
    if not records and not problems:
        problems.append(Problem(name, "", "no JSON lines", "one graded submission per line"))
    return records, problems


def read_limited(path: Path, max_bytes: int) -> tuple[bytes | None, list[Problem]]:
    """The file's bytes, refusing (before reading) files above ``max_bytes``."""
    name = str(path)
    try:
        size = os.stat(path).st_size
    except OSError as e:
        return None, [Problem(name, "", f"a file that cannot be opened ({e.strerror})", "a readable file")]
    if size > max_bytes:
        return None, [too_big(name, size, max_bytes)]
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)  # +1: the file may have grown since stat
    except OSError as e:
        return None, [Problem(name, "", f"a file that cannot be read ({e.strerror})", "a readable file")]
    if len(data) > max_bytes:
        return None, [too_big(name, len(data), max_bytes)]
    return data, []


def too_big(name: str, size: int, max_bytes: int) -> Problem:
    """The problem of a file over the size limit (refused before it is read)."""
    return Problem(name, "", f"{size:,} bytes",
                   f"at most {max_bytes:,} bytes (split the file, or raise the limit with --max-bytes)")


# ---------------------------------------------------------------------------------------------
# One record -> the schema's verdict as problems -> GradedSubmission

# Errors about a value's type: shown with the JSON name of what was found ('"five" (a string)').
_TYPE_ERRORS = {"number_type", "blank", "string_type", "list_type", "model_type", "model_attributes_type",
                "dict_type", "float_type", "int_type", "grader_scores"}


def schema_problems(name: str, prefix: str, model: type[BaseModel], error: ValidationError) -> list[Problem]:
    """The schema's errors as problems: the JSON path of each, the value found, and what the schema
    expects there (its own words, from `data.rubric`)."""
    problems = []
    for err in error.errors():
        ctx = err.get("ctx") or {}
        loc = tuple(err["loc"]) + tuple(ctx.get("at", ()))
        value = err.get("input")
        if ctx.get("shown"):
            shown = ctx["shown"]
        elif err["type"] == "missing":
            shown = "nothing (field missing)"
        elif err["type"] == "too_short" and value == []:
            shown = "an empty list []"
        elif err["type"] in _TYPE_ERRORS:
            shown = f"{show_value(value)} ({_kind(value)})"
        else:
            shown = show_value(value, 40)
        expected = ctx["expected"] if "expected" in ctx else expected_of(model, loc)
        problems.append(Problem(name, _loc_to_path(prefix, loc), shown, expected))
    return problems


def _check_submission(name: str, prefix: str, rec: Any) -> tuple[GradedSubmission | None, list[Problem]]:
    """The submission, or every problem the schema finds in the record."""
    here = prefix.rstrip(": ") if prefix.endswith(": ") else prefix
    try:
        return GradedSubmission.model_validate(rec), []
    except ValidationError as e:
        return None, schema_problems(name, prefix, GradedSubmission, e)
    except (RecursionError, ValueError, TypeError) as e:
        return None, [Problem(name, here, f"a value that cannot be validated ({e})", "a graded submission")]


def _suspicious(name: str, prefix: str, rec: dict, sub: GradedSubmission) -> list[Problem]:
    """Warnings about valid data that is probably wrong: it loads, and the user hears of it."""
    problems: list[Problem] = []
    items_path = _join(prefix, "rubric_alignment")
    for i, item in enumerate(sub.rubric_alignment):
        if not item.answer.strip() and item.score > 0:
            # Points for nothing usually means the answer text was lost (Mohler has 9 such items);
            # training on it teaches the model to reward empty answers.
            problems.append(Problem(name, _join(_join(items_path, i), "answer"),
                                    f"an empty answer that scored {show_value(rec['rubric_alignment'][i]['score'])}",
                                    "the student's answer text (was it lost? leave such items out of training)",
                                    "warning"))
    mismatch = sub.total_mismatch()
    if mismatch is not None:
        total, summed = mismatch
        problems.append(Problem(name, _join(prefix, "score"), f"{show_value(rec['score'])} (the stated total)",
                                f"the sum of the item scores, {summed:g} (total {total:g} != items "
                                f"{summed:g}; training uses the sum of the items)", "warning"))
    known = [i.max_score for i in sub.rubric_alignment]
    if None not in known:
        if abs(sum(known) - sub.max_score) > TOTAL_TOLERANCE:  # type: ignore[arg-type]
            problems.append(Problem(name, _join(prefix, "max_score"), f"{show_value(rec['max_score'])} (the stated maximum)",
                                    f"the sum of the items' max_score, {sum(known):g} "  # type: ignore[arg-type]
                                    "(training uses the sum of the items)", "warning"))
        return problems
    share = shared_max(sub.max_score, known)
    for i, (item, m) in enumerate(zip(sub.rubric_alignment, known)):
        if m is None and item.score > share + TOTAL_TOLERANCE:
            problems.append(Problem(name, _join(_join(items_path, i), "score"),
                                    f"{show_value(rec['rubric_alignment'][i]['score'])} "
                                    f"(above this item's share of the maximum, {share:g})",
                                    "a max_score on this item, or a score within its share", "warning"))
    return problems


def _report_from_records(name: str, records: list[tuple[str, Any]], problems: list[Problem],
                         maybe_surrogates: bool = False) -> FileReport:
    subs: list[GradedSubmission] = []
    where: list[str] = []
    seen: dict[str, str] = {}
    for prefix, rec in records:
        here = prefix.rstrip(": ") if prefix.endswith(": ") else prefix
        is_deep, has_non_finite = _scan(rec, MAX_DEPTH)
        deep = _too_deep(rec, MAX_DEPTH, prefix) if is_deep else None
        if deep is not None:
            problems.append(Problem(name, deep, f"data nested more than {MAX_DEPTH} levels deep",
                                    f"at most {MAX_DEPTH} levels of nested lists/objects"))
            continue
        bad_numbers = list(_non_finite(rec, prefix)) if has_non_finite else []
        bad_text = list(_lone_surrogates(rec, prefix)) if maybe_surrogates else []
        problems += [_unicode_problem(name, path, v) for path, v in bad_text]
        for path, v in bad_numbers:
            problems.append(Problem(name, path, show_value(v), "a finite number (JSON has no NaN or Infinity)"))
        sub, p = _check_submission(name, prefix, rec)
        # NaN/Infinity found by the scan above are not repeated by the field checks.
        nan_paths = {path for path, _ in bad_numbers}
        problems += [x for x in p if not (x.path in nan_paths and "finite" in x.expected)]
        if sub is None or bad_numbers or bad_text:
            continue
        problems += _suspicious(name, prefix, rec, sub)
        if sub.submission_id is not None:
            if sub.submission_id in seen:
                problems.append(Problem(name, _join(prefix, "submission_id"),
                                        f"{show_value(sub.submission_id)} (also at {seen[sub.submission_id]})",
                                        "a submission_id unique in the data set"))
                continue
            seen[sub.submission_id] = here or "the top level"
        subs.append(sub)
        where.append(here)
    report = FileReport(file=name, problems=problems)
    if report.ok:
        report.submissions, report.record_paths = subs, where
    return report


# ---------------------------------------------------------------------------------------------
# Public API


def load_graded_bytes(name: str, data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> FileReport:
    """Validate one uploaded file. ``name`` is shown in messages (and its ending picks JSON Lines
    for ``.jsonl``); it is never used as a path. Never raises on bad content."""
    try:
        if len(data) > max_bytes:
            return FileReport(file=name, problems=[too_big(name, len(data), max_bytes)])
        text, problems = _decode(name, data)
        if text is None:
            return FileReport(file=name, problems=problems)
        records, problems = _records(name, text, name.lower().endswith(".jsonl"))
        if problems and not records:
            return FileReport(file=name, problems=problems)
        return _report_from_records(name, records, problems, bool(_SURROGATE_ESCAPE.search(text)))
    except (RecursionError, MemoryError) as e:
        return FileReport(file=name, problems=[Problem(name, "", f"content that cannot be processed ({type(e).__name__})",
                                                       "a graded submission JSON file")])
    except Exception as e:  # noqa: BLE001 - a checker bug must still not reach the user as a traceback
        return FileReport(file=name, problems=[Problem(
            name, "", f"content the checker failed on (internal error {type(e).__name__}: {e})",
            "a graded submission JSON file; please report this file to the studio's developers")])


def _expand(paths: Iterable[str | Path]) -> Iterator[tuple[Path, list[Problem]]]:
    """Files to read: files as given; folders searched recursively for .json/.jsonl (sorted)."""
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in (".json", ".jsonl")
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                yield p, [Problem(str(p), "", "a folder without .json or .jsonl files",
                                  "graded submissions as .json or .jsonl files")]
            for f in found:
                yield f, []
        elif p.exists():
            yield p, []
        else:
            yield p, [Problem(str(p), "", "a path that does not exist", "a .json/.jsonl file or a folder of them")]


def load_graded(paths: Iterable[str | Path], max_bytes: int = DEFAULT_MAX_BYTES) -> ValidationReport:
    """Load graded submissions from files (.json: one object or a list; .jsonl) and folders.

    Every problem is reported with file, JSON path, value and expectation; files over
    ``max_bytes`` are refused before they are read. A duplicate ``submission_id`` (within a file
    or across the files) is an error in the file where it appears again.
    """
    reports: list[FileReport] = []
    done: set[Path] = set()
    for path, problems in _expand(paths):
        if not problems:
            # A file named twice (itself and via its folder) is read once, not reported as duplicates.
            key = path.resolve()
            if key in done:
                continue
            done.add(key)
        if problems:
            reports.append(FileReport(file=str(path), problems=problems))
            continue
        data, problems = read_limited(path, max_bytes)
        if data is None:
            reports.append(FileReport(file=str(path), problems=problems))
            continue
        reports.append(load_graded_bytes(str(path), data, max_bytes))
    return check_across_files(reports)


def check_across_files(reports: list[FileReport]) -> ValidationReport:
    """Combine per-file reports (e.g. several uploads) into one, adding the checks that span files:
    a ``submission_id`` seen in an earlier file is an error in the later one (which then yields
    nothing)."""
    seen: dict[str, str] = {}
    for fr in reports:
        for i, sub in enumerate(fr.submissions):
            sid = sub.submission_id
            if sid is None or sid not in seen:
                continue
            at = fr.record_paths[i] if i < len(fr.record_paths) else ""
            fr.problems.append(Problem(fr.file, _join(at + (": " if at.startswith("line") else ""), "submission_id"),
                                       f"{show_value(sid)} (also in {seen[sid]})",
                                       "a submission_id unique in the data set"))
        if fr.ok:
            for sub, at in zip(fr.submissions, fr.record_paths):
                if sub.submission_id is not None:
                    seen[sub.submission_id] = f"{fr.file} {at}".strip()
        else:
            fr.submissions = []
    return ValidationReport(files=list(reports))


def content_hash(submissions: list[GradedSubmission]) -> str:
    """A canonical sha256 of submissions (order matters): same data -> same hash, whatever the
    file's whitespace, key order or BOM. Used for idempotent import."""
    canon = json.dumps([s.model_dump(mode="json") for s in submissions], sort_keys=True,
                       ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def validate_cli(paths: list[str], max_bytes: int = DEFAULT_MAX_BYTES) -> int:
    """`python -m training validate PATH...`: print the report; exit code 0 only if all files are valid."""
    if not paths:
        print("validate: give at least one .json/.jsonl file or folder")
        return 2
    report = load_graded(paths, max_bytes=max_bytes)
    print(report.format())
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------------------------
# Rubrics


def load_rubric(path: str | Path) -> Rubric:
    """Read a rubric file, or a graded submission of that assignment (its answers and scores are
    ignored). Raises `DataError` naming the file, the field and the fix."""
    p = Path(path)
    data, problems = read_limited(p, DEFAULT_MAX_BYTES)
    if data is None:
        raise DataError("\n".join(map(str, problems)), problems)
    return parse_rubric_bytes(str(p), data)


def parse_rubric_bytes(name: str, data: bytes) -> Rubric:
    """Same as `load_rubric`, from bytes (uploads: ``name`` is for messages only)."""
    if len(data) > DEFAULT_MAX_BYTES:
        _raise([too_big(name, len(data), DEFAULT_MAX_BYTES)])
    text, problems = _decode(name, data)
    if text is None:
        _raise(problems)
    records, problems = _records(name, text, name.lower().endswith(".jsonl"))
    if problems:
        _raise(problems)
    prefix, first = records[0]
    deep = _too_deep(first, MAX_DEPTH, prefix)
    if deep is not None:
        _raise([Problem(name, deep, f"data nested more than {MAX_DEPTH} levels deep",
                        f"at most {MAX_DEPTH} levels")])
    bad_text = list(_lone_surrogates(first, prefix)) if _SURROGATE_ESCAPE.search(text) else []
    if bad_text:
        _raise([_unicode_problem(name, p, v) for p, v in bad_text])
    bad = list(_non_finite(first, prefix))
    if bad:
        _raise([Problem(name, p, show_value(v), "a finite number (JSON has no NaN or Infinity)") for p, v in bad])
    # A bare list of questions is a rubric too.
    if isinstance(first, dict) and "question" in first and "rubric_alignment" not in first and prefix.startswith("["):
        return _validate_rubric(name, "", {"questions": [v for _, v in records]})
    if isinstance(first, dict) and "questions" in first:
        return _validate_rubric(name, prefix, first)
    if isinstance(first, dict) and "rubric_alignment" in first:
        return _rubric_from_graded(name, prefix, first)
    _raise([Problem(name, prefix.rstrip(": "), f"{show_value(first)} ({_kind(first)})",
                    'a rubric {"questions": [{"question", "max_score", "reference_answer"?}]} '
                    "or a graded submission {score, max_score, rubric_alignment}")])
    raise AssertionError("unreachable")


def _raise(problems: list[Problem]) -> None:
    raise DataError("\n".join(map(str, problems)), problems)


def _validate_rubric(name: str, prefix: str, obj: dict) -> Rubric:
    try:
        return Rubric.model_validate(obj)
    except ValidationError as e:
        _raise(schema_problems(name, prefix, Rubric, e))
    raise AssertionError("unreachable")


# What a graded submission's rubric needs; its answers and scores are not looked at.
_RUBRIC_ITEM_KEYS = ("question", "max_score", "reference_answer", "question_id")


def _rubric_from_graded(name: str, prefix: str, rec: dict) -> Rubric:
    """A graded submission's rubric (`GradedSubmission.rubric`). Only what a rubric needs is
    checked: answers and scores are ignored, so a submission with a bad score still gives a
    usable rubric."""
    items = rec.get("rubric_alignment")
    if isinstance(items, list):
        items = [{**{k: it[k] for k in _RUBRIC_ITEM_KEYS if k in it}, "answer": "", "score": 0}
                 if isinstance(it, dict) else it for it in items]
    shape: dict[str, Any] = {"score": 0, "rubric_alignment": items}
    if "assignment" in rec:
        shape["assignment"] = rec["assignment"]
    # The total matters only to items without a max_score of their own (they share what it leaves).
    maxes = [it.get("max_score") if isinstance(it, dict) else None for it in items] if isinstance(items, list) else []
    if maxes and all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in maxes):
        try:  # a 400-digit JSON integer next to a float overflows the sum: validation names the field
            shape["max_score"] = sum(maxes)
        except OverflowError:
            shape["max_score"] = 0
    elif "max_score" in rec:
        shape["max_score"] = rec["max_score"]
    try:
        return GradedSubmission.model_validate(shape).rubric()
    except ValidationError as e:
        _raise(schema_problems(name, prefix, GradedSubmission, e))
    raise AssertionError("unreachable")
