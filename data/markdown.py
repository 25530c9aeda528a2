"""Markdown submissions: what a student hands in, and how it is matched to a rubric.

Training data (graded JSON) is rendered to the same Markdown a student would write, so the model
sees the same kind of text at training and at grading time. A Markdown file to grade is split
into per-question answers when its headings match the rubric's questions (by question id, by
number, or by the question's text); otherwise the whole text is kept.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from data.loading import DEFAULT_MAX_BYTES, DataError, Problem
from data.rubric import GradedSubmission, Rubric, label_key, normalize_text

# An ATX heading ("## Question 1: ..."), optionally closed by #s; or a line that is bold only
# ("**Question 1**"), which students often use instead of a heading.
_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_BOLD = re.compile(r"^ {0,3}(?:\*\*|__)(.+?)(?:\*\*|__)[ \t]*:?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
# "Question 1.2: text", "Q3) text", "Problem 2 - text", "Exercise 4", "Answer 1.1"
_PREFIXED = re.compile(
    r"^(?:(?:question|problem|exercise|task|part|answer|aufgabe|frage)\b\.?|q(?=\s*\d))\s*(?:no\.?|number|#)?\s*"
    r"(?P<label>[A-Za-z0-9]+(?:[.\-_][A-Za-z0-9]+)*)\s*(?:[:.)\]\-\u2013\u2014]\s*)?(?P<rest>.*)$",
    re.IGNORECASE,
)
# "1.2: text", "3) text", "2. text", "4" (a bare label)
_NUMBERED = re.compile(
    r"^(?P<label>\d+(?:\.\d+)*[a-z]?)(?:(?:\s*[:.)\]\-\u2013\u2014]|\s)\s*(?P<rest>.*))?$", re.IGNORECASE
)
# "b", "c: text", "1.2b) text": any short label, matched against question ids only
_LABELLED = re.compile(
    r"^(?P<label>[A-Za-z0-9]+(?:[.\-_][A-Za-z0-9]+)*)\s*(?:[:.)\]\-\u2013\u2014]\s*(?P<rest>.*))?$"
)
# How close a heading's text must be to a question's text (difflib ratio on normalised text).
FUZZY_RATIO = 0.9


def _heading_text(question: str) -> str:
    """Questions go on one heading line: a multi-line question would break the Markdown."""
    return " ".join(question.split())


# A line of an answer that starts with "#" would read as a heading (and could end the answer
# early when split); like the Mohler files we escape it as "\#", and unescape when splitting.
_HASH_LINE = re.compile(r"^( {0,3})#", re.MULTILINE)
_ESCAPED_HASH_LINE = re.compile(r"^( {0,3})\\#", re.MULTILINE)


def _escape_answer(answer: str) -> str:
    return _HASH_LINE.sub(r"\1\\#", answer.strip())


def _unescape_answer(answer: str) -> str:
    return _ESCAPED_HASH_LINE.sub(r"\1#", answer)


def _render(labels: list[str], questions: list[str], answers: list[str]) -> str:
    return "".join(
        f"## Question {label}: {_heading_text(q)}\n\n{_escape_answer(a)}\n\n"
        for label, q, a in zip(labels, questions, answers)
    )


def render_question_markdown(label: str, question: str, answer: str) -> str:
    """One question's answer as a one-section submission (what item-level examples show the model)."""
    return _render([label], [question], [answer])


def render_submission_markdown(sub: GradedSubmission) -> str:
    """The Markdown a student would hand in: a heading per question, the answer below.

    No title line, no scores, no reference answers. The heading uses the item's ``question_id``
    when it has one, else the 1-based position (the style of the Mohler Markdown files).
    """
    labels = sub.rubric().labels()
    return _render(labels, [i.question for i in sub.rubric_alignment], [i.answer for i in sub.rubric_alignment])


def decode_markdown(name: str, data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Text of an uploaded Markdown file (UTF-8, BOM ok, CRLF -> LF); `DataError` naming ``name``."""
    if len(data) > max_bytes:
        _fail(name, "", f"{len(data):,} bytes", f"at most {max_bytes:,} bytes")
    if data.startswith(b"\xff\xfe") or data.startswith(b"\xfe\xff"):
        _fail(name, "", "UTF-16 text", "UTF-8 text (re-save the file as UTF-8)")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if b"\x00" in data:
        pos = data.index(b"\x00")
        _fail(name, "", f"a binary file (NUL byte at offset {pos})", "a UTF-8 Markdown or text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start]
        line = before.count(b"\n") + 1
        col = e.start - (before.rfind(b"\n") + 1) + 1
        _fail(name, f"line {line}, column {col}", f"bytes that are not valid UTF-8 (at byte offset {e.start})",
              "UTF-8 text (re-save the file as UTF-8)")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_markdown(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Read a Markdown submission (UTF-8, BOM ok); refuses files over ``max_bytes`` before reading."""
    p = Path(path)
    try:
        size = os.stat(p).st_size
        if size > max_bytes:
            _fail(str(p), "", f"{size:,} bytes", f"at most {max_bytes:,} bytes")
        with open(p, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as e:
        _fail(str(p), "", f"a file that cannot be read ({e.strerror})", "a readable Markdown file")
    return decode_markdown(str(p), data, max_bytes)


def _fail(name: str, path: str, value: str, expected: str) -> None:
    problem = Problem(name, path, value, expected)
    raise DataError(str(problem), [problem])


def _headings(text: str, bold: bool) -> list[tuple[int, int, str]]:
    """(line index, end offset of the line, heading text) for each heading outside code fences:
    a `# comment` in a fenced code answer is not a heading."""
    out: list[tuple[int, int, str]] = []
    in_fence: str | None = None
    offset = 0
    for n, line in enumerate(text.split("\n")):
        end = offset + len(line) + 1
        fence = _FENCE.match(line)
        if fence:
            if in_fence is None:
                in_fence = fence.group(1)
            elif fence.group(1) == in_fence:
                in_fence = None
        elif in_fence is None:
            m = _ATX.match(line) or (_BOLD.match(line) if bold else None)
            if m:
                out.append((offset, min(end, len(text)), m.group(m.lastindex or 1).strip()))
        offset = end
    return out


class _QuestionIndex:
    """The rubric's questions prepared once per split: normalised texts, word sets and difflib
    matchers (building a matcher is the expensive part: once per question, not per heading)."""

    # Fuzzy comparisons allowed per split. A hand-in has tens of headings; a 20 MB file of
    # look-alike headings must not keep the UI busy for minutes (exact/id/number matching stays).
    FUZZY_BUDGET = 20_000

    def __init__(self, rubric: Rubric) -> None:
        self.ids = [label_key(q.question_id or "") for q in rubric.questions]
        self.texts = [normalize_text(q.question) for q in rubric.questions]
        self.words = [set(t.split()) for t in self.texts]
        self.matchers = []
        for t in self.texts:
            sm = difflib.SequenceMatcher(None, autojunk=False)
            sm.set_seq2(t)
            self.matchers.append(sm)
        self.budget = self.FUZZY_BUDGET

    def text_matches(self, a: str, i: int) -> bool:
        """Whether normalised heading text ``a`` is question ``i``'s text (exact, truncated, fuzzy)."""
        b = self.texts[i]
        if not a or not b:
            return False
        if a == b:
            return True
        # A heading that is a truncated question ("What is a variable ..."), long enough to be specific.
        if len(a) >= 20 and (b.startswith(a.rstrip(" .")) or a.startswith(b)):
            return True
        # Cheap necessary conditions first: similar lengths, and most words shared.
        if 2 * min(len(a), len(b)) < FUZZY_RATIO * (len(a) + len(b)):
            return False
        aw, bw = set(a.split()), self.words[i]
        if 2 * len(aw & bw) < max(len(aw), len(bw)):
            return False
        if self.budget <= 0:
            return False
        self.budget -= 1
        sm = self.matchers[i]
        sm.set_seq1(a)
        return sm.quick_ratio() >= FUZZY_RATIO and sm.ratio() >= FUZZY_RATIO


def _candidates(heading: str, index: _QuestionIndex) -> list[int]:
    """Rubric questions a heading may introduce, from the strongest kind of match that applies:
    the question id, else the question's text, else the question's number."""
    h = heading.strip().strip("*_").strip()
    label: str | None = None
    rest = ""
    prefixed = _PREFIXED.match(h)
    numbered = None if prefixed else _NUMBERED.match(h)
    if prefixed:
        label, rest = prefixed.group("label"), prefixed.group("rest") or ""
    elif numbered:
        label, rest = numbered.group("label"), numbered.group("rest") or ""
    labelled = _LABELLED.match(h)
    for lab in (label, labelled.group("label") if labelled else None):
        if lab:
            by_id = [i for i, qid in enumerate(index.ids) if qid and qid == label_key(lab)]
            if by_id:
                return by_id
    n_questions = len(index.texts)
    rest_norm, h_norm = normalize_text(rest), normalize_text(h)
    by_text = [i for i in range(n_questions)
               if (rest_norm and index.text_matches(rest_norm, i)) or index.text_matches(h_norm, i)]
    if by_text:
        return by_text
    # By position only when the heading says nothing else ("Question 2", "2."), or says
    # "Question 2: <anything>": a numbered essay heading "2. Method" must not match question 2.
    if label and label.isdigit() and (not rest.strip() or prefixed):
        n = int(label) - 1
        if 0 <= n < n_questions:
            return [n]
    return []


def _assign(headings: list[tuple[int, int, str]], index: _QuestionIndex) -> dict[int, tuple[int, int]]:
    """Question index -> (heading start, body start): each heading takes the first question of
    its best kind of match that is still free; later headings for a taken question are text."""
    assigned: dict[int, tuple[int, int]] = {}
    for start, body, heading in headings:
        if len(assigned) == len(index.texts):
            break  # every question has its heading: later headings belong to the last answer
        for q in _candidates(heading, index):
            if q not in assigned:
                assigned[q] = (start, body)
                break
    return assigned


def split_sections(text: str, rubric: Rubric) -> list[str] | None:
    """The answer to each rubric question (in rubric order) when the text's headings match every
    question exactly once; otherwise None.

    A heading that matches no question (a title, a sub-heading inside an answer) is part of the
    text around it; text before the first matched heading (a title, the student's name) is dropped.
    """
    if not rubric.questions:
        return None
    # Real headings first; bold lines ("**Question 2**") only when headings alone don't cover the
    # rubric, so a bold line inside an answer cannot split a properly headed submission.
    index = _QuestionIndex(rubric)
    plain = _headings(text, False)
    assigned = _assign(plain, index)
    if len(assigned) != len(rubric.questions):
        with_bold = _headings(text, True)
        if len(with_bold) == len(plain):
            return None  # no bold lines: the second pass would see the same headings
        assigned = _assign(with_bold, index)
        if len(assigned) != len(rubric.questions):
            return None
    order = sorted(assigned.items(), key=lambda kv: kv[1][0])
    answers: dict[int, str] = {}
    for k, (q, (_, body)) in enumerate(order):
        end = order[k + 1][1][0] if k + 1 < len(order) else len(text)
        answers[q] = _unescape_answer(text[body:end].strip())
    return [answers[i] for i in range(len(rubric.questions))]


def normalize_submission(text: str, rubric: Rubric) -> str:
    """The text as the model sees it: re-rendered exactly like `render_submission_markdown` when
    the headings match the rubric, otherwise the whole text (stripped)."""
    sections = split_sections(text, rubric)
    if sections is None:
        return text.strip()
    labels = rubric.labels()
    return _render(labels, [q.question for q in rubric.questions], sections)
