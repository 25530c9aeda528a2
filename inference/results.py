"""What a grading returns (:class:`GradeResult`) and how it is recorded in the store."""
from __future__ import annotations

from dataclasses import dataclass

from data.rubric import Grade, Rubric
from inference.repair import Repair


@dataclass
class GradeResult:
    """One grading: the valid grade, what the model wrote, what was repaired, and what made it."""

    grade: Grade
    raw_text: str
    repaired: bool
    repairs: list[Repair]
    latency_s: float
    base_model: str
    adapter: str | None  # resolved adapter folder, None for the base alone
    prompt_tokens: int = 0
    new_tokens: int = 0
    retried: bool = False
    scoring: str = "generated"  # how the item scores were made: "expected" or "generated"
    # per question: {value: probability} the expected score came from (None where it was not used)
    score_probs: list[dict[str, float] | None] | None = None
    unit: str = "submission"  # "item": each question scored on its own (no generation); see grade_items
    # per question (item-level grading): confidence from the score distribution, the expected score
    # before calibration, and whether the calibration stored with the adapter was applied
    confidence: list[float | None] | None = None
    raw_scores: list[float | None] | None = None
    calibrated: bool = False
    # where the time went, this grade's share of its batch: item unit {"encode_s", "model_s"};
    # submission unit {"prefill_s", "decode_s", "scoring_s"}
    timings: dict[str, float] | None = None
    # submission unit: the model forward passes that wrote the answer (the prefill included); fewer
    # than new_tokens where forced spans of the grade schema went in without a step of their own
    model_steps: int = 0
    # item unit, per question: the teacher anchors that graded it ({"exact": source}) or were in its
    # prompt ({"in_prompt": [sources], "nearest_similarity", "neighbour_score"}); None without any
    anchors: list[dict | None] | None = None
    # the adapters whose score distributions were averaged (an ensemble), else None
    ensemble: list[str] | None = None
    # a question below this confidence needs review: the adapter's, chosen on its validation data
    # for the agreement asked (scoring.selective), else scoring.distribution.REVIEW_THRESHOLD;
    # questions graded with teacher anchors use the adapter's threshold for those, where it has one
    review_threshold: float | None = None
    anchored_review_threshold: float | None = None

    def question_thresholds(self) -> list[float]:
        """Per question, the confidence below which its grade needs review."""
        from scoring.distribution import REVIEW_THRESHOLD

        plain = REVIEW_THRESHOLD if self.review_threshold is None else self.review_threshold
        anchored = self.anchored_review_threshold
        return [anchored if anchored is not None and self.anchors and self.anchors[i] is not None else plain
                for i in range(len(self.grade.items))]

    @property
    def needs_review(self) -> list[bool]:
        """Per question: the model was unsure (confidence below its review threshold)."""
        from scoring.distribution import needs_review

        return [needs_review(c, t) for c, t in zip(self.confidence or [None] * len(self.grade.items),
                                                    self.question_thresholds())]

    def to_dict(self) -> dict:
        return {
            "grade": self.grade.model_dump(),
            "repaired": self.repaired,
            "repairs": [r.to_dict() for r in self.repairs],
            "raw_text": self.raw_text,
            "latency_s": round(self.latency_s, 3),
            "base_model": self.base_model,
            "adapter": self.adapter,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "scoring": self.scoring,
            "score_probs": self.score_probs,
            "unit": self.unit,
            "confidence": self.confidence,
            "needs_review": self.needs_review,
            "raw_scores": self.raw_scores,
            "calibrated": self.calibrated,
            "timings": self.timings,
            "model_steps": self.model_steps,
            "anchors": self.anchors,
            "ensemble": self.ensemble,
            "review_threshold": self.review_threshold,
            "anchored_review_threshold": self.anchored_review_threshold,
        }


def store_grade(result: GradeResult, rubric: Rubric, submission_name: str, store=None, *,
                submission_md: str | None = None) -> int:
    """Record ``result`` in the studio's store (``store``: a data.store.Store, default the user's)
    with the base model and adapter that made it and its per-question confidence; returns its row
    id. ``submission_md``: the Markdown that was graded; the teacher's corrections of this grade
    become training data only when it is kept (the Review tab)."""
    from data.store import Store

    return (store or Store()).add_grade(
        grade=result.grade.model_dump(), raw_text=result.raw_text, base_model=result.base_model,
        adapter=result.adapter, submission_name=submission_name, rubric=rubric.model_dump(),
        repaired=result.repaired, latency_s=result.latency_s, submission_md=submission_md,
        confidence=result.confidence,
    )
