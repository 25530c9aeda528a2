"""The grade repair and the agreement metrics: what a user sees when a model writes nonsense, and
figures checked against values worked out by hand."""
from __future__ import annotations

import math

import pytest

from scoring.metrics import compute_metrics, infer_step, point_metrics
from inference.repair import parse_grade, scores_read_from_output
from data.rubric import Grade, Rubric, RubricQuestion

RUBRIC = Rubric(
    questions=[
        RubricQuestion(question="What is a stack?", max_score=5, question_id="1.1"),
        RubricQuestion(question="What is a queue?", max_score=3, question_id="1.2"),
    ]
)


def _valid(grade: Grade) -> None:
    assert len(grade.items) == len(RUBRIC.questions)
    for item, q in zip(grade.items, RUBRIC.questions):
        assert item.question == q.question
        assert 0 <= item.score <= q.max_score
        assert item.max_score == q.max_score
    assert math.isclose(grade.score, sum(i.score for i in grade.items))
    assert grade.max_score == 8


def test_clean_answer_is_not_repaired() -> None:
    raw = (
        '{"items":[{"question":"What is a stack?","score":4,"max_score":5,"justification":"ok"},'
        '{"question":"What is a queue?","score":2.5,"max_score":3}],"score":6.5,"max_score":8,"feedback":"good"}'
    )
    grade, repaired, repairs = parse_grade(raw, RUBRIC)
    _valid(grade)
    assert not repaired, repairs
    assert [i.score for i in grade.items] == [4, 2.5]
    assert grade.score == 6.5 and grade.feedback == "good"
    assert grade.items[0].justification == "ok"


def test_trailing_text_clamping_and_wrong_total_are_repaired() -> None:
    raw = (
        'Sure! {"items":[{"question":"1.2","score":9},{"question":"1.1","score":"3/5"}],'
        '"score":100,"max_score":10}\nThanks <|end|> more text {'
    )
    grade, repaired, repairs = parse_grade(raw, RUBRIC)
    _valid(grade)
    assert repaired
    # Mapped by question id, not by order; 9 clamped to the question's max 3.
    assert [i.score for i in grade.items] == [3.0, 3.0]
    assert {"score_clamped", "total_replaced", "max_score_replaced", "score_read_from_text"} <= {r.kind for r in repairs}
    clamped = next(r for r in repairs if r.kind == "score_clamped")
    assert clamped.question == "1.2" and clamped.message == "question 1.2: score 9 clamped to 3 (max 3)"
    text = " ".join(r.message for r in repairs)  # the sentences people read
    assert "clamped" in text and "replaced by the sum" in text and "max_score 10" in text


def test_truncated_json_keeps_complete_items() -> None:
    raw = '{"items":[{"question":"What is a stack?","score":4},{"question":"What is a queue?","sco'
    grade, repaired, repairs = parse_grade(raw, RUBRIC)
    _valid(grade)
    assert repaired and grade.items[0].score == 4 and grade.items[1].score == 0
    assert any(r.kind == "truncated_json" and "cut off" in r.message for r in repairs)
    # Question 1.2's score was filled in (0), not read: the engine must not re-score it.
    assert [r.question for r in repairs if r.kind == "unreadable_score"] == ["1.2"]
    assert scores_read_from_output(repairs, RUBRIC) == [True, False]


@pytest.mark.parametrize(
    "garbage",
    ["", "   ", "no json here at all", "{{{{", '{"items": "lots"}', "[1, 2, 3]", '{"score": NaN}',
     "\x00\xff<|return|>", '{"items":[{"score":true},{"score":null}]}', "}{" * 50, '{"a":' * 300],
)
def test_garbage_still_yields_a_valid_grade(garbage: str) -> None:
    grade, repaired, repairs = parse_grade(garbage, RUBRIC)
    _valid(grade)
    assert repaired and repairs
    assert grade.score == 0


def test_nothing_parseable_says_so() -> None:
    grade, repaired, repairs = parse_grade("I think it deserves a B.", RUBRIC)
    assert repaired and repairs[0].kind == "no_json" and "no JSON grade found" in repairs[0].message
    assert repairs[0].to_dict() == {"kind": "no_json", "question": None, "detail": repairs[0].detail,
                                    "message": repairs[0].message}
    assert scores_read_from_output(repairs, RUBRIC) == [False, False]
    assert grade.score == 0 and all(i.score == 0 for i in grade.items)


def test_metrics_match_hand_computed_values() -> None:
    # human [0,1,2,2], predicted [0,2,2,1] on a 0..2 integer scale, worked out by hand:
    # MAE (0+1+0+1)/4 = 0.5; RMSE sqrt(2/4); both means 1.25, cov 1.75, var 2.75 each -> r = 7/11;
    # QWK: observed weighted disagreement 2 * (1/4 * 1/4) = 0.125, expected 0.34375 -> 1 - 4/11 = 7/11;
    # exact 2/4; every prediction within 1 point.
    m = point_metrics([0, 1, 2, 2], [0, 2, 2, 1], max_score=2, step=1)
    assert m["mae"] == pytest.approx(0.5)
    assert m["rmse"] == pytest.approx(math.sqrt(0.5))
    assert m["pearson_r"] == pytest.approx(7 / 11)
    assert m["qwk"] == pytest.approx(7 / 11)
    assert m["exact"] == pytest.approx(0.5)
    assert m["within_1"] == pytest.approx(1.0)


def test_half_point_scale_rounding_and_constant_predictor() -> None:
    # 0.74 rounds to 0.5 (exact), 1.3 to 1.5 (not exact): exact = 1/2.
    m = point_metrics([0.5, 1.0], [0.74, 1.3], max_score=2, step=0.5)
    assert m["exact"] == pytest.approx(0.5)
    assert infer_step([0.5, 1.0, 3.0], 5) == 0.5 and infer_step([1, 2], 5) == 1.0
    # A constant predictor: kappa 0 (chance), r undefined.
    c = compute_metrics([0, 1, 2, 2, 1], [1.4] * 5, max_score=2, step=1, n_boot=200)
    assert c["qwk"]["value"] == pytest.approx(0.0)
    assert c["pearson_r"]["value"] is None
    # A training mean that is not exactly representable is still a constant (no r from rounding noise).
    assert compute_metrics([1, 2, 3], [4.263842281879195] * 3, 5, 0.5, n_boot=0)["pearson_r"]["value"] is None
    assert c["mae"]["value"] == pytest.approx((1.4 + 0.4 + 0.6 + 0.6 + 0.4) / 5)
    lo, hi = c["mae"]["ci_low"], c["mae"]["ci_high"]
    assert lo <= c["mae"]["value"] <= hi


def test_retry_opening_with_random_continuation_is_valid() -> None:
    # What the engine's retry produces with a random model: the forced opening, then noise.
    for tail in ['}', ' ]]]', '"1"', '"1",,,"score":', '"1","score":}', '\u00e9\u4e2d<|end|>']:
        grade, repaired, _ = parse_grade('{"items":[{"question":' + tail, RUBRIC)
        _valid(grade)
        assert repaired


def test_broken_items_array_still_reads_the_items() -> None:
    # Seen from Gemma 3 270M zero-shot: the items array is never closed.
    raw = ('{"items":[{"question":"1.1","score":4,"max_score":5}\n  {"question":"1.2","score":2}\n'
           '  "score":6,"max_score":8,"feedback":"x"}')
    grade, repaired, repairs = parse_grade(raw, RUBRIC)
    _valid(grade)
    assert [i.score for i in grade.items] == [4, 2] and repaired
    assert any(r.kind == "items_list_broken" and "items list was broken" in r.message for r in repairs)


# What the hand-written metrics (before scipy/scikit-learn, #12) gave on these inputs, n_boot=1000,
# seed 0: (value, ci_low, ci_high). The library versions must give the same figures.
_H1 = [3.0, 1.0, 5.0, 5.0, 0.0, 1.0, 1.0, 0.5, 3.0, 1.5, 2.5, 1.0, 5.0, 3.5, 3.5, 0.5, 0.5, 4.5, 1.5, 4.5, 4.0, 0.0,
       2.5, 2.5, 2.5, 0.5, 3.5, 1.0, 1.5, 2.0, 1.5, 2.0, 4.5, 2.5, 4.0, 5.0, 1.0, 1.0, 3.0, 1.0]
_P1 = [3.59, 0.69, 4.55, 4.9, 0.0, 0.47, 0.74, 0.0, 3.69, 0.06, 3.24, 0.44, 4.51, 2.28, 3.37, 0.28, 0.67, 4.02, 1.58,
       5.0, 4.37, 0.0, 3.36, 2.38, 3.03, 1.05, 3.15, 0.0, 1.19, 2.5, 1.16, 2.4, 5.0, 2.01, 5.0, 5.0, 1.97, 2.05, 3.99, 3.03]
_H2 = [10.0, 9.0, 7.0, 5.0, 10.0, 4.0, 10.0, 7.0, 10.0, 6.0, 3.0, 4.0, 6.0, 3.0, 1.0, 10.0, 8.0, 9.0, 5.0, 1.0, 10.0,
       4.0, 1.0, 8.0, 4.0]
_P2 = [9.0, 9.2, 6.5, 5.9, 6.4, 2.6, 8.4, 7.2, 9.1, 6.5, 5.0, 5.6, 3.0, 2.7, 3.3, 8.9, 4.5, 9.2, 4.3, 2.3, 8.4, 5.5,
       0.5, 8.3, 4.5]
RECORDED_INPUTS = {
    "halves": (_H1, _P1, 5, None),  # Mohler-like: 0..5 in halves, step inferred
    "ten": (_H2, _P2, 10, None),  # whole points 0..10
    "hand": ([0, 1, 2, 2], [0, 2, 2, 1], 2, 1),  # the hand-worked example above; r undefined in many resamples
    "constant": ([0, 1, 2, 2, 1], [1.4] * 5, 2, 1),  # r undefined, kappa 0
}
RECORDED = {
    "halves": {
        "mae": (0.5455, 0.42899375, 0.6767624999999999),
        "rmse": (0.6860867292114022, 0.528080489833539, 0.8551768084438811),
        "pearson_r": (0.9146397059044548, 0.8546302888752338, 0.9556898436282978),
        "qwk": (0.9113265547410735, 0.8437845172881081, 0.9478005145776718),
        "exact": (0.225, 0.1, 0.35),
        "within_1": (0.95, 0.875, 1.0),
    },
    "ten": {
        "mae": (1.2479999999999998, 0.888, 1.6801999999999997),
        "rmse": (1.5836666315863321, 1.1101125979852016, 2.0434333850326736),
        "pearson_r": (0.8633608729707731, 0.738443025799456, 0.9407771685460256),
        "qwk": (0.813508064516129, 0.6195604509632805, 0.9091230062712952),
        "exact": (0.28, 0.12, 0.48),
        "within_1": (0.64, 0.44, 0.8),
    },
    "hand": {
        "mae": (0.5, 0.0, 1.0),
        "rmse": (0.7071067811865476, 0.0, 1.0),
        "pearson_r": (0.6363636363636364, -1.0, 1.0),
        "qwk": (0.6363636363636364, -1.0, 1.0),
        "exact": (0.5, 0.0, 1.0),
        "within_1": (1.0, 1.0, 1.0),
    },
    "constant": {
        "mae": (0.6799999999999999, 0.43999999999999995, 1.0399999999999998),
        "rmse": (0.7745966692414834, 0.44721359549995787, 1.131370849898476),
        "pearson_r": (None, None, None),
        "qwk": (0.0, 0.0, 0.0),
        "exact": (0.4, 0.0, 0.8),
        "within_1": (1.0, 1.0, 1.0),
    },
}


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_library_metrics_reproduce_the_recorded_figures(case: str) -> None:
    human, pred, max_score, step = RECORDED_INPUTS[case]
    got = compute_metrics(human, pred, max_score, step, n_boot=1000)
    for metric, (value, low, high) in RECORDED[case].items():
        m = got[metric]
        if value is None:
            assert m == {"value": None, "ci_low": None, "ci_high": None}, metric
            continue
        assert m["value"] == pytest.approx(value, abs=1e-9), metric
        # A bootstrap interval is a random estimate: close, within a tenth of its width.
        tol = 0.1 * (high - low) + 1e-9
        assert m["ci_low"] == pytest.approx(low, abs=tol) and m["ci_high"] == pytest.approx(high, abs=tol), metric
