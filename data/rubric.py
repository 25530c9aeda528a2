"""The rubric data model, defined once: graded submissions (training data), rubrics (what a new
submission is graded against) and grades (what the model answers).

This module is the one home of what valid data is: every rule (numbers are JSON numbers, finite,
not negative; a score within its maximum; ...) is a validator here, and each error it raises
says what was expected, in words a user can act on (the field's ``description``, or the
``expected`` of a `PydanticCustomError`'s context). `data.loading` reads files and reports those
errors with the file and JSON path; it states no rule of its own.
"""
from __future__ import annotations

import math
import re
import unicodedata
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

# A total that differs from the sum of item scores by more than this is worth a warning.
TOTAL_TOLERANCE = 1e-6
NOT_FINITE = "a finite number (JSON has no NaN or Infinity; at most about 1e308)"


def invalid(kind: str, expected: str, *, shown: str | None = None,
            at: tuple[str | int, ...] = ()) -> PydanticCustomError:
    """A validation error that says what was expected. ``at`` names the field inside the model a
    model-level rule is about (``("score",)``); ``shown`` is how to show the value found."""
    # The text travels in the context, not the template: it may hold braces ("{question, ...}").
    ctx: dict[str, Any] = {"expected": expected, "at": at}
    if shown is not None:
        ctx["shown"] = shown
    return PydanticCustomError(kind, "{expected}", ctx)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def check_number(v: Any, expected: str, *, positive: bool = False) -> float:
    """A JSON number, finite, >= 0 (or > 0). Strings like "5" are refused: the data is wrong, and
    guessing would hide it."""
    if not _is_number(v):
        hint = " (write it without quotes)" if isinstance(v, str) and _looks_numeric(v) else ""
        raise invalid("number_type", expected + hint)
    try:
        finite = math.isfinite(v)
    except OverflowError:  # a 400-digit JSON integer
        finite = False
    if not finite:
        raise invalid("number_finite", NOT_FINITE)
    if v < 0 or (positive and v <= 0):
        raise invalid("number_range", expected)
    return float(v)


def shared_max(total: float, known: list[float | None]) -> float:
    """What each item without its own max_score is worth: the total's remainder, shared equally."""
    missing = sum(1 for m in known if m is None)
    left = max(total - sum(m for m in known if m is not None), 0.0)
    return left / missing if missing else 0.0


def _title(assignment: Any) -> str | None:
    """The free-form ``assignment`` field as a rubric title: ``"assignment": 3`` must not make
    `GradedSubmission.rubric()` fail validation, and a nested object is no title."""
    if isinstance(assignment, str):
        return assignment or None
    if isinstance(assignment, (int, float)) and not isinstance(assignment, bool):
        return str(assignment)
    return None


def _non_blank(v: Any, expected: str) -> Any:
    if isinstance(v, str) and not v.strip():
        raise invalid("blank", expected)
    return v


def expected_of(model: type[BaseModel], loc: tuple[str | int, ...]) -> str:
    """What the schema expects at ``loc`` (a pydantic error location) inside ``model``: the
    field's description, or the object a list element must be."""
    current: type[BaseModel] | None = model
    expected = getattr(model, "EXPECTED", "valid data")
    for part in loc:
        if isinstance(part, int):
            expected = getattr(current, "EXPECTED", expected)
            continue
        info = current.model_fields.get(part) if current is not None else None
        if info is None:
            break
        expected = info.description or expected
        # The model a list field holds (list[RubricItem] -> RubricItem), for the next parts.
        args = getattr(info.annotation, "__args__", ()) or ()
        current = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return expected


class RubricItem(BaseModel):
    """One graded answer: the question, the student's answer, and the score it earned.

    Unknown fields (``question_id``, ``justification``, ...) are kept, not dropped.
    """

    model_config = ConfigDict(extra="allow")
    EXPECTED: ClassVar[str] = "an object {question, answer, score, max_score?}"

    question: str = Field(description="a non-empty string: the question")
    answer: str = Field(description='a string: the student\'s answer ("" if none)')
    score: float = Field(description="a number >= 0: the points this answer earned")
    max_score: float | None = Field(None, description="a number above 0: the points this question is worth")
    reference_answer: str | None = Field(None, description="a string or null: the model answer")
    # Each human grader's score for this item when several graded it (e.g. [3, 4]); ``score`` is
    # what they settled on. Item-level training learns the spread of these, not just one number.
    grader_scores: list[float] | None = Field(
        None, description="a non-empty list of numbers >= 0: each grader's score for this item (or leave it out)")

    @field_validator("question", mode="before")
    @classmethod
    def _question(cls, v: Any) -> Any:
        return _non_blank(v, cls.model_fields["question"].description or "")

    @field_validator("score", "max_score", mode="before")
    @classmethod
    def _number(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None and info.field_name == "max_score":
            return v
        return check_number(v, cls.model_fields[info.field_name].description or "",
                            positive=info.field_name == "max_score")

    @field_validator("grader_scores", mode="before")
    @classmethod
    def _grader_scores(cls, v: Any) -> Any:
        expected = cls.model_fields["grader_scores"].description or ""
        if v is None:
            return v
        if not isinstance(v, list) or not v:
            raise invalid("grader_scores", expected)
        return [check_number(s, expected) for s in v]

    @model_validator(mode="after")
    def _score_within_max(self) -> "RubricItem":
        if self.max_score is not None and self.score > self.max_score:
            raise invalid("score_above_max", "0 <= score <= max_score", at=("score",),
                          shown=f"{self.score:g} (above max_score {self.max_score:g})")
        if self.max_score is not None and self.grader_scores and max(self.grader_scores) > self.max_score:
            raise invalid("grader_score_above_max", "each grader's score within 0..max_score", at=("grader_scores",),
                          shown=f"{self.grader_scores} (a score above max_score {self.max_score:g})")
        return self

    @property
    def question_id(self) -> str | None:
        qid = (self.model_extra or {}).get("question_id")
        return None if qid is None else str(qid)


class GradedSubmission(BaseModel):
    """One student's graded work: the unit of training data."""

    model_config = ConfigDict(extra="allow")
    EXPECTED: ClassVar[str] = "an object with score, max_score and rubric_alignment (a graded submission)"

    score: float = Field(description="a number >= 0: the total score")
    max_score: float = Field(description="a number >= 0: the total maximum score")
    rubric_alignment: list[RubricItem] = Field(
        min_length=1, description="a non-empty list of items {question, answer, score, max_score?}")
    feedback: str | None = Field(None, description="a string or null: the overall feedback")
    submission_id: str | None = Field(None, description="a string or null: an id unique in the data set")

    @field_validator("score", "max_score", mode="before")
    @classmethod
    def _number(cls, v: Any, info: ValidationInfo) -> Any:
        return check_number(v, cls.model_fields[info.field_name].description or "")

    @model_validator(mode="after")
    def _score_within_max(self) -> "GradedSubmission":
        if self.score > self.max_score:
            raise invalid("score_above_max", "0 <= score <= max_score", at=("score",),
                          shown=f"{self.score:g} (above max_score {self.max_score:g})")
        # Items without max_score share what the total leaves over: there must be something left.
        known = [i.max_score for i in self.rubric_alignment]
        if None in known and self.max_score - sum(m for m in known if m is not None) <= TOTAL_TOLERANCE:
            first = known.index(None)
            raise invalid("no_share_left", f"a number: items without max_score share what max_score "
                          f"{self.max_score:g} leaves over, but the other items already use "
                          f"{sum(m for m in known if m is not None):g}",
                          at=("rubric_alignment", first, "max_score"), shown="nothing (field missing)")
        return self

    def item_max_scores(self) -> list[float]:
        """Each item's maximum. Items without ``max_score`` share what the total leaves over."""
        known = [i.max_score for i in self.rubric_alignment]
        share = shared_max(self.max_score, known)
        return [float(m) if m is not None else share for m in known]

    def total_mismatch(self) -> tuple[float, float] | None:
        """(stated total, sum of item scores) when they differ, else None."""
        items = sum(i.score for i in self.rubric_alignment)
        if abs(items - self.score) > TOTAL_TOLERANCE:
            return (self.score, items)
        return None

    def rubric(self) -> "Rubric":
        """The rubric this submission was graded against (answers and scores dropped)."""
        maxes = self.item_max_scores()
        return Rubric(
            questions=[
                RubricQuestion(
                    question=i.question,
                    max_score=m,
                    reference_answer=i.reference_answer,
                    question_id=i.question_id,
                )
                for i, m in zip(self.rubric_alignment, maxes)
            ],
            title=_title((self.model_extra or {}).get("assignment")),
        )

    def grade(self) -> "Grade":
        """The human grade of this submission in the shape the model is trained to answer."""
        maxes = self.item_max_scores()
        items = []
        for item, m in zip(self.rubric_alignment, maxes):
            extra = item.model_extra or {}
            just = extra.get("justification") or extra.get("feedback") or extra.get("comment")
            items.append(
                GradeItem(
                    question=item.question,
                    score=item.score,
                    max_score=m,
                    justification=just if isinstance(just, str) and just else None,
                )
            )
        return Grade(
            score=sum(i.score for i in items),
            max_score=sum(maxes),
            items=items,
            feedback=self.feedback or "",
        )


def normalize_text(text: str) -> str:
    """Text as compared with a question's: Unicode-normalised, case, punctuation, Markdown
    emphasis and spacing ignored."""
    text = unicodedata.normalize("NFKC", str(text)).casefold()
    text = re.sub(r"[*_`~]", "", text)  # Markdown emphasis around a question
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def label_key(label: str) -> str:
    """A question label as compared: :func:`normalize_text` without a leading "question" or "q"
    ("Question 1.2:", "q1.2" and "1.2" are one label); dots inside a label are kept."""
    text = unicodedata.normalize("NFKC", str(label)).casefold().strip()
    text = re.sub(r"^(question|q)(?=[\s\d.:#-])\s*[#:.-]?\s*", "", text)
    return " ".join(re.sub(r"[^\w.]+", " ", text).strip(" .").split())


class RubricQuestion(BaseModel):
    """One question of a rubric: what is asked, what it is worth, optionally a model answer."""

    model_config = ConfigDict(extra="allow")
    EXPECTED: ClassVar[str] = "an object {question, max_score, reference_answer?}"

    question: str = Field(description="a non-empty string: the question")
    max_score: float = Field(description="a number above 0: what the question is worth")
    reference_answer: str | None = Field(None, description="a string or null: the model answer")
    question_id: str | None = Field(None, description='a string or null: the question\'s label, e.g. "1.2"')

    @field_validator("question", mode="before")
    @classmethod
    def _question(cls, v: Any) -> Any:
        return _non_blank(v, cls.model_fields["question"].description or "")

    @field_validator("max_score", mode="before")
    @classmethod
    def _max_score(cls, v: Any) -> float:
        return check_number(v, cls.model_fields["max_score"].description or "", positive=True)

    @field_validator("question_id", mode="before")
    @classmethod
    def _question_id(cls, v: Any) -> Any:
        # "question_id": 3 is a natural way to write it.
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class Rubric(BaseModel):
    """What a new submission is graded against: the questions, without answers or scores."""

    model_config = ConfigDict(extra="allow")
    EXPECTED: ClassVar[str] = 'a rubric {"questions": [{"question", "max_score", "reference_answer"?}]}'

    questions: list[RubricQuestion] = Field(
        min_length=1, description="a non-empty list of {question, max_score, reference_answer?}")
    title: str | None = Field(None, description="a string or null: the rubric's title")

    @property
    def max_score(self) -> float:
        return sum(q.max_score for q in self.questions)

    def labels(self) -> list[str]:
        """Each question's label: its ``question_id``, else its 1-based position. The one rule
        for the Markdown headings of a submission, the grade JSON and matching answers back."""
        return [q.question_id or str(k + 1) for k, q in enumerate(self.questions)]

    def find_question(self, label: str, *, loose: bool = False) -> int | None:
        """Index of the question that ``label`` names, or None: its label (``1.2``, ``Question
        1.2``, ``Q1.2``) or its whole text, case, punctuation and spacing ignored. ``loose`` (a
        model's answer): also its number (``question 3``: the third) and a unique beginning of its
        text of 12 characters or more. The one matcher of labels to questions."""
        key = label_key(label)
        if not key:
            return None
        labels = [label_key(lab) for lab in self.labels()]
        if key in labels:
            return labels.index(key)
        text = normalize_text(label)
        texts = [normalize_text(q.question) for q in self.questions]
        if text in texts:
            return texts.index(text)
        if not loose:
            return None
        if key.isdigit() and 1 <= int(key) <= len(self.questions):
            return int(key) - 1
        hits = [k for k, t in enumerate(texts) if len(text) >= 12 and t.startswith(text)]
        return hits[0] if len(hits) == 1 else None


class GradeItem(BaseModel):
    question: str
    score: float
    max_score: float
    justification: str | None = None


class Grade(BaseModel):
    """What the grader answers, and what it is trained to answer."""

    score: float
    max_score: float
    items: list[GradeItem]
    feedback: str = ""
