"""Choices that generalise (issue #26): the coverage curve of a known predictor, a review threshold
chosen on validation meets its target there, a calibration is marked helpful only where it helps on
held-out halves, anchored grades are spread back out only where that helps, the confidence of
an anchored grade follows the teacher's similar answers, and validation holds out whole questions
from several assignments."""
from __future__ import annotations

import numpy as np
import pytest

from data.rubric import GradedSubmission
from data.split import choose_split, split_questions, split_submissions
from scoring.calibration import AnchorBlend, fit_anchor_blend, fit_checked_calibration, load_anchor_blend
from scoring.distribution import confidence, item_confidence
from scoring.metrics import point_metrics
from scoring.selective import choose_threshold, coverage_curve


def _known_predictor(n: int = 400, seed: int = 0):
    """Human scores 0..5; the first half predicted exactly (confidence 0.9-1), the second half at
    random (confidence 0-0.5)."""
    rng = np.random.default_rng(seed)
    human = rng.integers(0, 6, n).astype(float)
    good = np.arange(n) < n // 2
    pred = np.where(good, human, rng.integers(0, 6, n))
    conf = np.where(good, rng.uniform(0.9, 1.0, n), rng.uniform(0.0, 0.5, n))
    return human.tolist(), pred.tolist(), conf.tolist(), [5.0] * n


def test_the_coverage_curve_accepts_the_surest_grades_first() -> None:
    human, pred, conf, maxes = _known_predictor()
    curve = coverage_curve(human, pred, conf, maxes)
    assert [pt["coverage"] for pt in curve] == pytest.approx([0.1 * k for k in range(1, 11)])
    for pt in curve[:5]:  # up to half: only the exact grades
        assert pt["qwk"] == 1.0 and pt["mae"] == 0.0 and pt["threshold"] >= 0.9
    assert curve[-1]["qwk"] == pytest.approx(point_metrics(human, pred, 5, 1)["qwk"], abs=1e-3)
    assert curve[6]["qwk"] < curve[4]["qwk"]  # past half, the random grades come in


def test_an_anchored_grade_is_as_sure_as_the_teachers_similar_answers_make_it() -> None:
    peaked = [0.0, 0.0, 0.0, 0.02, 0.96, 0.02]  # the model is sure: 4 of 5
    flat = [0.0, 0.1, 0.2, 0.4, 0.2, 0.1]  # the model hesitates around 3
    assert item_confidence(peaked) == confidence(peaked) > item_confidence(flat)  # no anchors: the spread
    # similar answers the teacher gave 1 contradict the sure 4; ones given 3 support the hesitant 3
    assert item_confidence(peaked, neighbour=1.0, similarity=0.9) < 0.3 < item_confidence(flat, neighbour=3.0, similarity=0.9)
    # the same agreement means less for an answer unlike any the teacher graded
    near, far = (item_confidence(flat, neighbour=3.0, similarity=s) for s in (0.9, 0.2))
    assert far < near and near == pytest.approx(0.9 * (1 - abs(sum(v * p for v, p in enumerate(flat)) - 3.0) / 5) ** 2, abs=1e-4)
    # the grade as given (anchor blend and spread applied) is what is compared
    assert item_confidence(flat, neighbour=3.0, similarity=0.9, grade=3.0) == pytest.approx(0.9)


def test_grades_with_anchors_are_checked_against_their_own_review_threshold(tmp_path) -> None:
    from data.rubric import Grade, GradeItem
    from inference.results import GradeResult
    from scoring.selective import load_review, review_thresholds, save_review

    # the two kinds of confidence differ in scale: each kind gets the threshold chosen on its own items
    plain, anchored = choose_threshold(*_known_predictor(seed=2)[:3], [5.0] * 400), {"threshold": 0.3, "met": True}
    save_review(tmp_path, plain, [], (anchored, []))
    assert review_thresholds(load_review(tmp_path)) == (plain["threshold"], 0.3)
    assert review_thresholds(None) == (None, None)
    items = [GradeItem(question=q, score=1, max_score=5) for q in "abc"]
    result = GradeResult(grade=Grade(score=3, max_score=15, items=items), raw_text="", repaired=False, repairs=[],
                         latency_s=0.0, base_model="m", adapter=None, confidence=[0.5, 0.5, 1.0],
                         anchors=[None, {"in_prompt": ["t1"]}, {"exact": "t2"}],
                         review_threshold=0.9, anchored_review_threshold=0.3)
    assert result.question_thresholds() == [0.9, 0.3, 0.3]
    assert result.needs_review == [True, False, False]  # the same 0.5: unsure alone, sure beside the teacher's answers
    result.anchored_review_threshold = None  # an adapter without one: the plain threshold for every grade
    assert result.needs_review == [True, True, False]


def test_the_threshold_chosen_on_validation_meets_its_target_there() -> None:
    human, pred, conf, maxes = _known_predictor(seed=1)
    for target in (0.8, 0.95):
        chosen = choose_threshold(human, pred, conf, maxes, target)
        assert chosen["met"]
        keep = [i for i, c in enumerate(conf) if c >= chosen["threshold"]]
        got = point_metrics([human[i] for i in keep], [pred[i] for i in keep], 5, 1)["qwk"]
        assert got >= target and got == pytest.approx(chosen["qwk"], abs=1e-3)
        assert chosen["coverage"] == pytest.approx(len(keep) / len(conf))
        assert chosen["coverage"] >= 0.5  # at least every exact grade is accepted
    assert not choose_threshold(human, [5.0 - h for h in human], conf, maxes, 0.8)["met"]  # nothing reaches it
    assert not choose_threshold(human[:20], pred[:20], conf[:20], maxes[:20])["met"]  # too few to choose on


def test_a_calibration_is_marked_helpful_only_where_it_helps_held_out_items() -> None:
    rng = np.random.default_rng(0)
    human = rng.integers(0, 6, 300).astype(float)
    squeezed = 2 + 0.2 * human + rng.normal(0, 0.1, 300)  # right order, bunched near the middle
    assert fit_checked_calibration(squeezed, human, [5.0] * 300).helps is True
    noisy = np.clip(human + rng.normal(0, 1.5, 300), 0, 5)  # already on the scale: a map only fits noise
    cal = fit_checked_calibration(noisy, human, [5.0] * 300)
    assert cal.helps is False and cal.qwk_calibrated <= cal.qwk_raw


def _anchored(n: int, seed: int):
    """Human scores 0..5 with the answers' order known but bunched (model) and noisy (neighbours)."""
    rng = np.random.default_rng(seed)
    human = rng.integers(0, 6, n).astype(float)
    model = 3.5 + 0.4 * (human - 3.5) + rng.normal(0, 0.3, n)
    neighbour = np.clip(human + rng.normal(0, 1.2, n), 0, 5)
    return model, neighbour, human


def test_anchored_grades_that_bunch_up_are_spread_out_where_that_helps_new_items(tmp_path) -> None:
    model, neighbour, human = _anchored(300, seed=0)
    blend = fit_anchor_blend(model, neighbour, human, [5.0] * 300)
    assert blend.spread > 1.0 and blend.qwk_blend > blend.qwk_model
    assert blend.apply(4.2, None, 5.0) == 4.2  # no anchors compared: the model's score as it is
    assert 0.0 <= blend.apply(0.0, 0.0, 5.0) and blend.apply(5.0, 5.0, 5.0) <= 5.0  # stays on the scale
    new_model, new_neighbour, new_human = _anchored(300, seed=1)
    plain = AnchorBlend(weight=blend.weight, n=0)  # the same blend, not spread
    for metric, better in (("qwk", 1), ("mae", -1)):
        got, before = (point_metrics(new_human, [b.apply(m, nb, 5.0) for m, nb in zip(new_model, new_neighbour)], 5, 1)[metric]
                       for b in (blend, plain))
        assert better * (got - before) > 0
    blend.save(tmp_path)
    assert load_anchor_blend(tmp_path) == blend
    on_scale = np.clip(human + np.random.default_rng(2).normal(0, 0.4, 300), 0, 5)  # not bunched: nothing to undo
    assert fit_anchor_blend(on_scale, neighbour, human, [5.0] * 300).spread == 1.0


def _subs(assignments: int = 4, questions: int = 4, students: int = 5) -> list[GradedSubmission]:
    return [GradedSubmission.model_validate({
        "submission_id": f"a{a}-s{s}", "assignment": f"A{a}", "score": questions, "max_score": 5 * questions,
        "rubric_alignment": [{"question": f"A{a} question {q}", "answer": f"answer {s}", "score": 1, "max_score": 5}
                             for q in range(questions)]})
        for a in range(assignments) for s in range(students)]


def test_validation_holds_out_whole_questions_from_several_assignments() -> None:
    subs = _subs()
    train, val, n_held = split_questions(subs, 0.25, seed=0)
    held = {it.question for s in val for it in s.rubric_alignment}
    assert n_held == len(held) == 4
    assert len({q.split()[0] for q in held}) >= 3  # spread over assignments, not one
    assert not held & {it.question for s in train for it in s.rubric_alignment}  # unseen in training
    assert sum(len(s.rubric_alignment) for s in train + val) == 4 * 4 * 5  # every answer kept once
    assert all(s.score == sum(i.score for i in s.rubric_alignment) and s.max_score == 5 * len(s.rubric_alignment)
               for s in train + val)
    assert choose_split(subs, "item", "auto") == "questions"
    assert choose_split(subs[:5], "item", "auto") == "submissions"  # 4 questions: too few to hold any out
    assert choose_split(subs, "submission", "auto") == "submissions"
    tr, va = split_submissions(subs, 0.1, seed=0)
    assert len(va) == 2 and len(tr) == 18


def test_a_calibration_that_helps_one_question_only_is_not_applied_to_new_questions() -> None:
    # Half the validation items are one question on which the model is squeezed (a map would help
    # it); on eight others it is already on the scale. Checked on held-out items the map looks
    # helpful (the squeezed question is on both sides); checked on held-out questions, as grading
    # new questions needs, it is not.
    rng = np.random.default_rng(0)
    groups = ["q0"] * 200 + [f"q{q}" for q in range(1, 9) for _ in range(25)]
    human = rng.integers(0, 6, 400).astype(float)
    pred = np.where(np.array(groups) == "q0", 2 + 0.2 * human + rng.normal(0, 0.05, 400),
                    np.clip(human + rng.normal(0, 0.8, 400), 0, 5))
    assert fit_checked_calibration(pred, human, [5.0] * 400).helps is True
    assert fit_checked_calibration(pred, human, [5.0] * 400, groups=groups).helps is False
