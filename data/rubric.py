"""The rubric data model, defined once: graded submissions (training data), rubrics (what a new
submission is graded against) and grades (what the model answers).

Reading files and reporting every problem in them lives in `data.loading`; this module only
says what valid data is.
"""
from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# A total that differs from the sum of item scores by more than this is worth a warning.
TOTAL_TOLERANCE = 1e-6


def _finite(value: float | None, what: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return value


def _title(assignment: Any) -> str | None:
    """The free-form ``assignment`` field as a rubric title: ``"assignment": 3`` must not make
    `GradedSubmission.rubric()` fail validation, and a nested object is no title."""
    if isinstance(assignment, str):
        return assignment or None
    if isinstance(assignment, (int, float)) and not isinstance(assignment, bool):
        return str(assignment)
    return None


class RubricItem(BaseModel):
    """One graded answer: the question, the student's answer, and the score it earned.

    Unknown fields (``question_id``, ``grader_scores``, ...) are kept, not dropped.
    """

    model_config = ConfigDict(extra="allow")

    question: str = Field(min_length=1)
    answer: str
    score: float
    max_score: float | None = None
    reference_answer: str | None = None
    # Each human grader's score for this item when several graded it (e.g. [3, 4]); ``score`` is
    # what they settled on. Item-level training learns the spread of these, not just one number.
    grader_scores: list[float] | None = None

    @field_validator("score", "max_score")
    @classmethod
    def _check_finite(cls, v: float | None, info: Any) -> float | None:
        _finite(v, info.field_name)
        if v is not None and v < 0:
            raise ValueError(f"{info.field_name} must be >= 0, got {v!r}")
        return v

    @field_validator("grader_scores")
    @classmethod
    def _check_grader_scores(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            if not v:
                raise ValueError("grader_scores must list at least one score (or be left out)")
            for s in v:
                _finite(s, "grader_scores")
                if s < 0:
                    raise ValueError(f"grader_scores must be >= 0, got {s!r}")
        return v

    @model_validator(mode="after")
    def _score_within_max(self) -> "RubricItem":
        if self.max_score is not None and self.score > self.max_score:
            raise ValueError(f"score {self.score} is above max_score {self.max_score}")
        if self.max_score is not None and self.grader_scores and max(self.grader_scores) > self.max_score:
            raise ValueError(f"grader_scores {self.grader_scores} has a score above max_score {self.max_score}")
        return self

    @property
    def question_id(self) -> str | None:
        qid = (self.model_extra or {}).get("question_id")
        return None if qid is None else str(qid)


class GradedSubmission(BaseModel):
    """One student's graded work: the unit of training data."""

    model_config = ConfigDict(extra="allow")

    score: float
    max_score: float
    rubric_alignment: list[RubricItem] = Field(min_length=1)
    feedback: str | None = None
    submission_id: str | None = None

    @field_validator("score", "max_score")
    @classmethod
    def _check_finite(cls, v: float, info: Any) -> float:
        _finite(v, info.field_name)
        if v < 0:
            raise ValueError(f"{info.field_name} must be >= 0, got {v!r}")
        return v

    @model_validator(mode="after")
    def _score_within_max(self) -> "GradedSubmission":
        if self.score > self.max_score:
            raise ValueError(f"score {self.score} is above max_score {self.max_score}")
        return self

    def item_max_scores(self) -> list[float]:
        """Each item's maximum. Items without ``max_score`` share what the total leaves over."""
        known = [i.max_score for i in self.rubric_alignment]
        missing = [k for k, m in enumerate(known) if m is None]
        if not missing:
            return [float(m) for m in known]  # type: ignore[arg-type]
        left = max(self.max_score - sum(m for m in known if m is not None), 0.0)
        share = left / len(missing)
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


class RubricQuestion(BaseModel):
    """One question of a rubric: what is asked, what it is worth, optionally a model answer."""

    model_config = ConfigDict(extra="allow")

    question: str = Field(min_length=1)
    max_score: float = Field(gt=0)
    reference_answer: str | None = None
    question_id: str | None = None

    @field_validator("max_score")
    @classmethod
    def _check_finite(cls, v: float) -> float:
        _finite(v, "max_score")
        return v


class Rubric(BaseModel):
    """What a new submission is graded against: the questions, without answers or scores."""

    model_config = ConfigDict(extra="allow")

    questions: list[RubricQuestion] = Field(min_length=1)
    title: str | None = None

    @property
    def max_score(self) -> float:
        return sum(q.max_score for q in self.questions)


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
