"""The teacher's review loop without the browser: corrections are stored beside what the model
said and never overwrite anything, the queue puts the least sure questions first, corrected grades
become a db: dataset that keeps the teacher's scores and says which corrections it holds (and a
run that trains on it says so), and agreement with the teacher comes out right on known numbers.
The grades are stored rows (the store is what is under test); one test grades with the real tiny
GPT-OSS to check what store_grade keeps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.rubric import Rubric, RubricQuestion
from data.store import CorrectionError, Store, load_datasets
from inference.teacher_agreement import confusion_counts, teacher_agreement
from tests.conftest import REPO

RUBRIC = Rubric(title="Data structures",
                questions=[RubricQuestion(question="What is a stack?", max_score=2, question_id="1",
                                          reference_answer="LIFO"),
                           RubricQuestion(question="What is a queue?", max_score=2, question_id="2")])


def md(n: int) -> str:
    return (f"# Student {n}\n\n## Question 1: What is a stack?\n\nAnswer one of student {n}.\n\n"
            f"## Question 2: What is a queue?\n\nAnswer two of student {n}.\n")


def add_grade(store: Store, n: int, scores: tuple[float, float], *, adapter: str | None = None,
              confidence: list[float | None] | None = None, text: str | None = None) -> int:
    """A stored grade of student n's submission, as store_grade writes one."""
    items = [{"question": q.question, "score": s, "max_score": q.max_score, "justification": f"model says {s}"}
             for q, s in zip(RUBRIC.questions, scores)]
    grade = {"score": sum(scores), "max_score": RUBRIC.max_score, "items": items, "feedback": ""}
    return store.add_grade(grade=grade, raw_text="{}", base_model="embedded:tiny-gpt-oss", adapter=adapter,
                           submission_name=f"student-{n}.md", rubric=RUBRIC.model_dump(), repaired=False,
                           latency_s=0.1, submission_md=md(n) if text is None else text,
                           confidence=confidence if confidence is not None else [0.9, 0.8])


def test_corrections_never_overwrite_and_the_newest_one_counts() -> None:
    store = Store()
    gid = add_grade(store, 1, (1.0, 2.0))
    before = store.get_grade(gid)
    first = store.add_correction(gid, 0, 2, "names LIFO", "Ms Rivera")
    second = store.add_correction(gid, 0, 1.5, "LIFO, but no example", "Mr Chen")
    # both rows are kept, with what the model said, who and when
    history = store.corrections(gid)
    assert [(c.id, c.teacher_score, c.corrected_by) for c in history] == [(first.id, 2.0, "Ms Rivera"),
                                                                        (second.id, 1.5, "Mr Chen")]
    assert all(c.model_score == 1.0 and c.model_justification == "model says 1.0" for c in history)
    assert all(c.question_label == "1" and c.question == "What is a stack?" and c.created_at for c in history)
    # the grade itself is untouched
    assert store.get_grade(gid) == before
    # reading: the newest correction wins
    (q1,) = [q for q in store.review_items() if q.question_index == 0]
    assert q1.correction == second and q1.model_score == 1.0
    # another adapter's grade of the same text shows the teacher's word too
    other = add_grade(store, 1, (0.0, 1.0), adapter="/runs/x/final")
    (q1_other,) = [q for q in store.review_items() if q.grade_id == other and q.question_index == 0]
    assert q1_other.correction == second


@pytest.mark.parametrize("score, field", [(2.5, "outside 0..2"), (-1, "outside 0..2"), (float("nan"), "not a number"),
                                          ("2", "not a number")])
def test_a_score_outside_0_to_max_or_not_a_number_is_refused_and_stores_nothing(score, field) -> None:
    store = Store()
    gid = add_grade(store, 1, (1.0, 2.0))
    with pytest.raises(CorrectionError, match=field) as err:
        store.add_correction(gid, 1, score)
    assert f"grade {gid}" in str(err.value) and "question 2" in str(err.value)
    with pytest.raises(CorrectionError, match="not one of its 2 questions"):
        store.add_correction(gid, 2, 1)
    with pytest.raises(CorrectionError, match="no such grade"):
        store.add_correction(gid + 1, 0, 1)
    with pytest.raises(CorrectionError, match="who corrected"):
        store.add_correction(gid, 0, 1, corrected_by="  ")
    assert store.corrections() == []


def test_review_queue_puts_the_least_confident_questions_first_and_filters_by_adapter() -> None:
    store = Store()
    sure = add_grade(store, 1, (2.0, 2.0), confidence=[0.95, 0.9])
    unsure = add_grade(store, 2, (1.0, 1.0), adapter="/runs/a/final", confidence=[0.7, 0.2])
    whole = add_grade(store, 3, (1.0, 0.0), confidence=[None, None])  # generated whole: no confidence
    order = [(q.grade_id, q.question_label) for q in store.review_items()]
    assert order == [(unsure, "2"), (unsure, "1"), (sure, "2"), (sure, "1"), (whole, "1"), (whole, "2")]
    assert [q.grade_id for q in store.review_items(order="newest")] == [whole, whole, unsure, unsure, sure, sure]
    assert {q.grade_id for q in store.review_items(adapters={"/runs/a/final"})} == {unsure}
    assert {q.grade_id for q in store.review_items(adapters={None})} == {sure, whole}
    # each question carries the student's answer to it, cut from the Markdown
    (q,) = [q for q in store.review_items() if q.grade_id == unsure and q.question_index == 1]
    assert q.answer == "Answer two of student 2." and q.confidence == 0.2 and q.question == "What is a queue?"


def test_dataset_from_corrections_round_trips_the_corrected_scores_and_names_its_corrections() -> None:
    store = Store()
    g1 = add_grade(store, 1, (1.0, 2.0))
    g2 = add_grade(store, 2, (0.0, 0.0), confidence=[0.3, 0.4])
    add_grade(store, 3, (1.0, 1.0))  # never corrected: not training data
    old = store.add_correction(g1, 0, 0.5, "first look")
    c1 = store.add_correction(g1, 0, 2, "names LIFO and gives an example", "Ms Rivera")  # supersedes `old`
    c2 = store.add_correction(g2, 1, 1.5, None)
    no_text = store.add_grade(grade={"score": 1, "max_score": 2, "items": [{"question": "Q", "score": 1, "max_score": 2}]},
                              raw_text="", base_model="m", adapter=None, submission_name="old.md",
                              rubric={"questions": [{"question": "Q", "max_score": 2}]}, repaired=False, latency_s=0)
    c3 = store.add_correction(no_text, 0, 2)  # a grade that kept no Markdown: corrected, but no answer to train on

    ds_id, created, data = store.store_corrections_dataset("fixes week 1")
    assert created and data.correction_ids == [c1.id, c2.id]
    assert len(data.skipped) == 1 and f"grade {no_text}" in data.skipped[0] and "no submission text" in data.skipped[0]
    info = store.find_dataset("fixes week 1")
    assert info["id"] == ds_id and info["correction_ids"] == [c1.id, c2.id] and info["sources"] == ["corrections"]
    # what training loads (db:<name>) holds the teacher's scores and the students' answers
    subs = load_datasets(["db:fixes week 1"], store)
    got = {(s.submission_id, i.question_id): (i.score, i.max_score, i.answer, (i.model_extra or {}).get("justification"))
           for s in subs for i in s.rubric_alignment}
    assert got == {(f"grade-{g1}", "1"): (2.0, 2.0, "Answer one of student 1.", "names LIFO and gives an example"),
                   (f"grade-{g2}", "2"): (1.5, 2.0, "Answer two of student 2.", None)}
    first = next(s for s in subs if s.submission_id == f"grade-{g1}")
    assert first.score == 2.0 and first.max_score == 2.0 and first.rubric().title == "Data structures"
    assert first.rubric_alignment[0].reference_answer == "LIFO"
    assert (first.rubric_alignment[0].model_extra or {})["model_score"] == 1.0
    # the same corrections again: the same dataset; a default name when none is given
    assert store.store_corrections_dataset()[:2] == (ds_id, False)
    store.add_correction(g2, 0, 1)
    new_id, created, _ = store.store_corrections_dataset()
    assert created and store.find_dataset(new_id)["name"].startswith("corrections-")
    # a run that names the dataset says which corrections it trained on
    store.create_run("r1", {"datasets": ["db:fixes week 1", "data/samples/graded"]}, ["deepspeed"], "runs/r1")
    (used,) = store.run_corrections("r1")
    assert (used.spec, used.dataset_id, used.correction_ids) == ("db:fixes week 1", ds_id, [c1.id, c2.id])
    assert old.id not in used.correction_ids and c3.id not in used.correction_ids


def test_no_corrections_means_no_dataset_and_says_why() -> None:
    store = Store()
    add_grade(store, 1, (1.0, 1.0))
    with pytest.raises(CorrectionError, match="no corrections yet"):
        store.store_corrections_dataset("x")
    assert store.list_datasets() == []


def _adapter_folder(root: Path, name: str, trained_at: float) -> str:
    folder = root / name / "final"
    folder.mkdir(parents=True)
    (folder / "complete.json").write_text(json.dumps({"step": 1, "time": trained_at}))
    return str(folder)


def test_teacher_agreement_on_known_numbers(tmp_path: Path) -> None:
    """Two students x two questions (max 2), corrected on the base model's grades. The teacher's
    scores are 0,1 (question 1) and 2,2 (question 2). Adapter `good` gives exactly those, in its
    newest grades; `fair` gives 0,2 and 2,1: MAE 0.5, and r = QWK = 7/11 by hand (deviations from
    the mean 1.25 give r = 1.75/2.75; quadratic weights give 1 - 2/5.5); the base gives 1 everywhere."""
    store = Store()
    base1 = add_grade(store, 1, (1.0, 1.0))
    base2 = add_grade(store, 2, (1.0, 1.0))
    for gid, (a, b) in ((base1, (0, 2)), (base2, (1, 2))):
        store.add_correction(gid, 0, a)
        store.add_correction(gid, 1, b)
    good = _adapter_folder(tmp_path, "run-good", trained_at=200.0)
    fair = _adapter_folder(tmp_path, "run-fair", trained_at=100.0)
    add_grade(store, 1, (2.0, 0.0), adapter=good)  # an older grade of the same text: the newest counts
    add_grade(store, 1, (0.0, 2.0), adapter=good)
    add_grade(store, 2, (1.0, 2.0), adapter=good)
    add_grade(store, 1, (0.0, 2.0), adapter=fair)
    add_grade(store, 2, (2.0, 1.0), adapter=fair)
    add_grade(store, 4, (0.0, 0.0), adapter=fair)  # an answer nobody corrected: not counted

    results = teacher_agreement(store, n_boot=0)
    assert [a.adapter for a in results] == [None, fair, good]  # the base, then by training time
    base, f, g = results
    assert [a.n for a in results] == [4, 4, 4]
    assert g.overall["mae"]["value"] == 0.0 and g.overall["qwk"]["value"] == pytest.approx(1.0)
    assert g.overall["pearson_r"]["value"] == pytest.approx(1.0)
    assert f.overall["mae"]["value"] == pytest.approx(0.5)
    assert f.overall["pearson_r"]["value"] == pytest.approx(7 / 11)
    assert f.overall["qwk"]["value"] == pytest.approx(7 / 11)
    assert base.overall["mae"]["value"] == pytest.approx(0.75) and base.overall["pearson_r"]["value"] is None
    assert base.overall["qwk"]["value"] == pytest.approx(0.0)
    by_q = {q.question_label: q.metrics for q in f.per_question}
    assert by_q["1"]["mae"]["value"] == pytest.approx(0.5) and by_q["1"]["n"] == 2
    assert by_q["2"]["mae"]["value"] == pytest.approx(0.5) and by_q["2"]["n"] == 2
    scores, counts = confusion_counts(f.pairs)  # rows: teacher, columns: model
    assert scores == [0, 1, 2] and counts == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    assert [a.adapter for a in teacher_agreement(store, adapters={good}, n_boot=0)] == [good]


def test_the_cli_stores_the_dataset_and_shows_agreement_and_what_a_run_trained_on(isolated_store: Path) -> None:
    store = Store()
    gid = add_grade(store, 1, (1.0, 1.0))
    store.add_correction(gid, 0, 2, "complete")
    env = {**os.environ, "GRADER_DB": str(store.path), "GRADER_CHECKPOINTS": str(isolated_store / "checkpoints"),
           "PYTHONPATH": str(REPO)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)

    out = cli("training", "corrections-dataset", "week-1")
    assert out.returncode == 0, out.stderr
    assert "dataset 'week-1'" in out.stdout and "1 submissions from 1 corrections" in out.stdout
    assert "datasets=db:week-1" in out.stdout
    (corr,) = store.corrections()
    run_dir = isolated_store / "checkpoints" / "r-cli"
    run_dir.mkdir()
    store.create_run("r-cli", {"datasets": ["db:week-1"]}, ["deepspeed"], str(run_dir))
    status = cli("training", "status", "r-cli")
    assert status.returncode == 0, status.stderr
    assert f"trained on 1 teacher corrections (db:week-1, dataset {store.find_dataset('week-1')['id']}): ids {corr.id}" \
        in status.stdout
    from app.runs_tab import run_details  # the Runs tab's run details say it too

    assert f"trained on 1 teacher corrections (`db:week-1`" in run_details("r-cli")
    agree = cli("inference", "teacher-agreement", "--n-boot", "0")
    assert agree.returncode == 0, agree.stderr
    assert "| embedded:tiny-gpt-oss (base) | 1 |" in agree.stdout and "1: What is a stack?" in agree.stdout


def test_store_grade_keeps_the_markdown_and_the_confidence_of_a_real_grade(tiny_gpt_oss_dir: Path) -> None:
    from inference.engine import get_engine
    from inference.results import store_grade

    engine = get_engine(str(tiny_gpt_oss_dir), device="cpu")
    result = engine.grade(md(7), RUBRIC, adapter=None)  # the base alone grades by item: a confidence each
    gid = store_grade(result, RUBRIC, "student-7.md", submission_md=md(7))
    row = Store().get_grade(gid)
    assert row["submission_md"] == md(7)
    assert row["confidence"] == result.confidence and len(row["confidence"]) == 2
    assert row["min_confidence"] == pytest.approx(min(result.confidence))
    items = Store().review_items()
    assert [q.answer for q in sorted(items, key=lambda q: q.question_index)] == \
        ["Answer one of student 7.", "Answer two of student 7."]
    assert items[0].confidence == min(result.confidence)
