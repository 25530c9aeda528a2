"""Turn whatever a model wrote into a valid Grade, and say what had to be fixed.

A grader that sometimes answers with broken JSON is still useful if every answer becomes a valid
grade whose repairs are listed beside it. The rules, in order:

1. find the first JSON object in the text (text before or after it is ignored; an object cut off by
   the token limit is closed; Python-style literals are tried last);
2. map its items to the rubric's questions by label (question text, question id, "Question N"),
   then by order; a question with no item scores 0;
3. clamp each score to [0, max_score] of the rubric (never the model's own maximum);
4. the total is the sum of the item scores, the maximum the rubric's.

Each fix is a :class:`Repair` record (kind, question, detail): code branches on ``kind``; the
``message`` sentence is for people only.
"""
from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from data.prompt_format import question_labels, score_number  # the labels and numbers the format writes
from data.rubric import Grade, GradeItem, Rubric

RepairKind = Literal[
    "ignored_text",  # text before/after the JSON object (a note: the grade itself is not changed)
    "truncated_json",  # the object was cut off (token limit); closed, complete parts kept
    "python_dict",  # a Python-style dict, not JSON
    "no_json",  # nothing parseable: every question scored 0
    "retried",  # no JSON in the first answer; the engine's guided retry produced one
    "items_list_broken",  # the items array was broken; item objects read from the text
    "no_items",  # the object has no items: every question scored 0
    "total_as_only_score",  # a one-question rubric answered with just a total
    "matched_by_order",  # items matched to questions by order, not by label
    "unmatched_items",  # items that match no rubric question, ignored
    "missing_item",  # a question with no item: scored 0
    "score_read_from_text",  # a score written as text ("3/5") read as a number
    "unreadable_score",  # an item without a readable score: scored 0
    "score_clamped",  # a score outside [0, max] clamped
    "total_replaced",  # the stated total replaced by the sum of the item scores
    "max_score_replaced",  # the stated maximum replaced by the rubric's
    "feedback_not_text",  # non-text feedback kept as JSON text
]
REPAIR_KINDS: tuple[str, ...] = get_args(RepairKind)
# Kinds that note something about the text around the grade without changing the grade.
NOTE_KINDS = frozenset({"ignored_text"})
# Kinds after which a question's score was filled in (0), not read from the model's answer.
_FILLED_FOR_ALL = frozenset({"no_json", "no_items"})
_FILLED_FOR_QUESTION = frozenset({"missing_item", "unreadable_score"})


@dataclass(frozen=True)
class Repair:
    """One thing the repair had to fix, guess or fill in.

    ``question`` is the rubric question's label (data.prompt_format.question_labels) when the
    repair concerns one question; ``detail`` says what was done, for people."""

    kind: RepairKind
    detail: str
    question: str | None = None

    @property
    def message(self) -> str:
        """The sentence shown to people (never parsed by code)."""
        return f"question {self.question}: {self.detail}" if self.question is not None else self.detail

    def to_dict(self) -> dict:
        return {"kind": self.kind, "question": self.question, "detail": self.detail, "message": self.message}


def repair_messages(repairs: list[Repair]) -> str:
    """The repairs as one line for people ("; "-separated), e.g. a CSV cell or a UI note."""
    return "; ".join(r.message for r in repairs)

# Keys a model may use for an item's score / label / comment.
_SCORE_KEYS = ("score", "points", "mark", "grade", "value")
_LABEL_KEYS = ("question", "question_id", "id", "label", "name", "title")
_JUSTIFICATION_KEYS = ("justification", "feedback", "comment", "reason", "explanation", "rationale")


def zero_grade(rubric: Rubric, feedback: str = "") -> Grade:
    """A grade with every question at 0: what an unusable answer is worth."""
    items = [GradeItem(question=q.question, score=0.0, max_score=q.max_score) for q in rubric.questions]
    return Grade(score=0.0, max_score=rubric.max_score, items=items, feedback=feedback)


def _scan(text: str) -> tuple[str | None, int]:
    """What closes an unfinished JSON text (missing quote, then brackets), and the index just
    after its last complete member. Closers are None when a bracket closes with nothing open or
    the top-level value is already complete (nothing to repair there)."""
    stack: list[str] = []
    in_str = esc = False
    last_safe = -1
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if not stack:
                return None, last_safe
            stack.pop()
            last_safe = i + 1
            if not stack:
                return None, last_safe
        elif ch == ",":
            last_safe = i  # cut before the comma: everything before it is complete
    if not stack:
        return None, last_safe
    return ('"' if in_str else "") + "".join(reversed(stack)), last_safe


def _close_truncated(text: str) -> str | None:
    """Close a JSON object that was cut off (token limit): drop the last incomplete member and
    append the missing quotes/brackets. None when the text does not start an object."""
    if not text.startswith("{"):
        return None
    closers, last_safe = _scan(text)
    if closers is None:  # a complete object that raw_decode already refused: not fixable here
        return None
    # Try the whole text closed as-is first (cut inside a string value), then cut at the last
    # safe point and close that prefix.
    candidates = [text + closers]
    if last_safe > 0:
        prefix = text[:last_safe]
        prefix_closers, _ = _scan(prefix)
        if prefix_closers is not None:
            candidates.append(prefix + prefix_closers)
    for cand in candidates:
        try:
            json.loads(cand)
            return cand
        except ValueError:
            continue
    return None


def extract_json_object(raw_text: str) -> tuple[dict | None, list[Repair]]:
    """The first JSON object in the text, and notes on how it was found."""
    notes: list[Repair] = []
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"\{", raw_text)]
    for n_try, pos in enumerate(starts):
        try:
            obj, end = decoder.raw_decode(raw_text, pos)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            if raw_text[:pos].strip():
                notes.append(Repair("ignored_text", "ignored text before the JSON object"))
            if raw_text[end:].strip():
                notes.append(Repair("ignored_text", "ignored text after the JSON object"))
            return obj, notes
        # Cut off by the token limit: close this (outer) object before trying the ones inside it.
        if n_try < 3:
            closed = _close_truncated(raw_text[pos:].rstrip())
            if closed is not None:
                try:
                    obj = json.loads(closed)
                except ValueError:
                    obj = None
                if isinstance(obj, dict):
                    notes.append(Repair("truncated_json",
                                        "the JSON object was cut off; closed it and kept its complete parts"))
                    return obj, notes
    # Python-style dict (single quotes, True/None).
    for pos in starts[:3]:
        end = raw_text.rfind("}")
        if end <= pos:
            break
        try:
            obj = ast.literal_eval(raw_text[pos : end + 1])
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            continue
        if isinstance(obj, dict):
            notes.append(Repair("python_dict", "the answer was a Python-style dict, not JSON"))
            return obj, notes
    return None, notes


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        m = re.search(r"-?\d+(?:\.\d+)?", value)
        if m:
            return float(m.group())
    return None


def _item_label(item: dict) -> str | None:
    for key in _LABEL_KEYS:
        if key in item and isinstance(item[key], (str, int, float)) and not isinstance(item[key], bool):
            return str(item[key])
    return None


def _items_of(obj: dict) -> list[dict] | None:
    items = obj.get("items")
    if items is None:
        for key in ("scores", "questions", "rubric_alignment", "grades"):
            if isinstance(obj.get(key), list):
                items = obj[key]
                break
    if isinstance(items, dict):  # {"question text": score} or {"q1": {...}}
        items = [
            ({"question": k, **v} if isinstance(v, dict) else {"question": k, "score": v}) for k, v in items.items()
        ]
    if not isinstance(items, list):
        return None
    return [it for it in items if isinstance(it, dict)]


def _item_objects(raw_text: str) -> list[dict]:
    """Every JSON object in the text that looks like a grade item (has a label and a score)."""
    decoder = json.JSONDecoder()
    out = []
    for m in re.finditer(r"\{", raw_text):
        try:
            obj, _ = decoder.raw_decode(raw_text, m.start())
        except ValueError:
            continue
        if isinstance(obj, dict) and _item_label(obj) is not None and any(k in obj for k in _SCORE_KEYS) \
                and "items" not in obj:
            out.append(obj)
        if len(out) >= 1000:
            break
    return out


def parse_grade(raw_text: str, rubric: Rubric) -> tuple[Grade, bool, list[Repair]]:
    """Always a valid Grade for ``rubric``: (grade, repaired, repairs).

    ``repaired`` is True when anything had to be fixed, guessed or filled in; ``repairs`` says what,
    one record each. Never raises on bad text. In steps: the JSON object, its items, each item to
    its question, each question's score, the totals and the feedback.
    """
    obj, repairs = extract_json_object(raw_text or "")
    if obj is None:
        return (
            zero_grade(rubric, feedback=""),
            True,
            [Repair("no_json", "no JSON grade found in the model output; every question scored 0")],
        )
    obj, items = _read_items(obj, raw_text or "", repairs)
    assigned = _assign_items(items, obj, rubric, repairs)
    labels = question_labels(rubric)
    grade_items = [_grade_item(q, assigned[k], labels[k], repairs) for k, q in enumerate(rubric.questions)]
    grade = Grade(score=_total(grade_items, obj, rubric, bool(items), repairs), max_score=rubric.max_score,
                  items=grade_items, feedback=_feedback(obj, repairs))
    # Notes on surrounding text alone are not repairs of the grade itself.
    real = [r for r in repairs if r.kind not in NOTE_KINDS]
    return grade, bool(real), repairs


def _read_items(obj: dict, raw_text: str, repairs: list[Repair]) -> tuple[dict, list[dict] | None]:
    """The grade object and its items; a broken items array leaves the item objects themselves
    readable from the text."""
    items = _items_of(obj)
    if items is None:
        found = _item_objects(raw_text)
        if found:
            items = found
            obj = {k: v for k, v in obj.items() if "items" in obj or k == "feedback"}  # obj was an item
            repairs[:] = [r for r in repairs if r.kind != "ignored_text"]
            repairs.append(Repair("items_list_broken",
                                  f"the items list was broken; read {len(found)} item object(s) from the text"))
    return obj, items


def _assign_items(items: list[dict] | None, obj: dict, rubric: Rubric, repairs: list[Repair]) -> list[dict | None]:
    """Each question's item: by label first, then the unmatched items fill the unmatched questions
    in order; a one-question rubric answered with just a total takes the total."""
    n = len(rubric.questions)
    assigned: list[dict | None] = [None] * n
    if items is None:
        if n == 1 and _as_number(obj.get("score")) is not None:
            assigned[0] = {"score": obj.get("score")}
            repairs.append(Repair("total_as_only_score",
                                  "no items in the output; used its total as the only question's score"))
        else:
            repairs.append(Repair("no_items", "no items in the output"))
        return assigned
    unmatched: list[dict] = []
    for it in items:
        label = _item_label(it)
        k = rubric.find_question(label, loose=True) if label is not None else None
        if k is not None and assigned[k] is None:
            assigned[k] = it
        else:
            unmatched.append(it)
    by_order = 0
    for k in range(n):
        if assigned[k] is None and unmatched:
            assigned[k] = unmatched.pop(0)
            by_order += 1
    if by_order and items and any(_item_label(it) is not None for it in items):
        repairs.append(Repair("matched_by_order", f"{by_order} item(s) matched to questions by order, not by label"))
    if unmatched:
        repairs.append(Repair("unmatched_items", f"ignored {len(unmatched)} item(s) that match no rubric question"))
    return assigned


def _grade_item(q, it: dict | None, label: str, repairs: list[Repair]) -> GradeItem:
    """One question's grade from its item: the score read (as a number, or from text), clamped to
    0..max; 0 when there is no item or no readable score."""
    if it is None:
        repairs.append(Repair("missing_item", "no item in the output; scored 0", label))
        return GradeItem(question=q.question, score=0.0, max_score=q.max_score)
    score = None
    for key in _SCORE_KEYS:
        if key in it:
            score = _as_number(it[key])
            if score is not None:
                if not isinstance(it[key], (int, float)):
                    repairs.append(Repair("score_read_from_text", f"score {it[key]!r} read as {score:g}", label))
                break
    if score is None:
        repairs.append(Repair("unreadable_score", "no readable score; scored 0", label))
        score = 0.0
    if score < 0 or score > q.max_score:
        clamped = min(max(score, 0.0), q.max_score)
        repairs.append(Repair("score_clamped", f"score {score:g} clamped to {clamped:g} (max {q.max_score:g})", label))
        score = clamped
    just = next((it[key] for key in _JUSTIFICATION_KEYS if isinstance(it.get(key), str) and it[key].strip()), None)
    return GradeItem(question=q.question, score=score, max_score=q.max_score, justification=just)


def _total(grade_items: list[GradeItem], obj: dict, rubric: Rubric, had_items: bool, repairs: list[Repair]) -> float:
    """The sum of the item scores (a stated total or maximum that differs is noted as replaced)."""
    total = sum(i.score for i in grade_items)
    stated = _as_number(obj.get("score"))
    # A total written as the format writes numbers (score_number: 3 decimals) is the sum.
    if stated is not None and abs(stated - score_number(total)) > 1e-6 and had_items:
        repairs.append(Repair("total_replaced", f"total {stated:g} replaced by the sum of the item scores {total:g}"))
    stated_max = _as_number(obj.get("max_score"))
    if stated_max is not None and abs(stated_max - rubric.max_score) > 1e-6:
        repairs.append(Repair("max_score_replaced",
                              f"max_score {stated_max:g} replaced by the rubric's {rubric.max_score:g}"))
    return total


def _feedback(obj: dict, repairs: list[Repair]) -> str:
    feedback = obj.get("feedback")
    if feedback is None:
        return ""
    if not isinstance(feedback, str):
        repairs.append(Repair("feedback_not_text", "feedback was not text; kept it as JSON text"))
        return json.dumps(feedback, ensure_ascii=False)
    return feedback


def scores_read_from_output(repairs: list[Repair], rubric: Rubric) -> list[bool]:
    """Per rubric question: was its score read from the model's answer (True), or filled in by
    ``parse_grade`` because no item or no readable score was there (False)?"""
    if any(r.kind in _FILLED_FOR_ALL for r in repairs):  # (a one-question total used as its score was read)
        return [False] * len(rubric.questions)
    filled = {r.question for r in repairs if r.kind in _FILLED_FOR_QUESTION}
    return [label not in filled for label in question_labels(rubric)]
