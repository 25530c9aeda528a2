"""Grades out as a gradebook (#16): `python -m inference export-grades --out FILE.xlsx|.csv` writes
the stored grades one row per submission, a column per question, total and max; the XLSX (and
CSV) read back with data/spreadsheet.py in wide shape keeps every score; teachers' corrections
replace the model's scores they name."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from openpyxl import load_workbook

from data.rubric import Grade, GradeItem, Rubric, RubricQuestion
from data.spreadsheet import guess_mapping, read_sheet_file, sheet_submissions
from data.store import Store
from inference.__main__ import main as inference_cli
from inference.gradebook import MAX_ROW_LABEL, build_gradebook, export_gradebook, stored_grades

STACKS = Rubric(title="Stacks", questions=[
    RubricQuestion(question_id="1.1", question="What is a stack?", max_score=5),
    RubricQuestion(question_id="1.2", question="Name its two operations", max_score=2),
    RubricQuestion(question="Why LIFO?", max_score=3),  # no id: labelled by position, "3"
])
ESSAY = Rubric(title="Essay", questions=[RubricQuestion(question_id="1", question="Thesis", max_score=10)])


def _grade(store: Store, name: str, rubric: Rubric, scores: list[float], adapter: str | None = None) -> int:
    items = [GradeItem(question=q.question, score=s, max_score=q.max_score) for q, s in zip(rubric.questions, scores)]
    grade = Grade(score=sum(scores), max_score=rubric.max_score, items=items)
    return store.add_grade(grade=grade.model_dump(), raw_text="", base_model="embedded:gemma-3-270m",
                           adapter=adapter, submission_name=name, rubric=rubric.model_dump(), repaired=False,
                           latency_s=0.1)


@pytest.fixture
def graded(tmp_path: Path) -> dict[str, list[float]]:
    """Stacks grades in the store, as expected scores make them (fractions); ann graded twice."""
    store = Store()
    adapter = str(tmp_path / "checkpoints" / "run-a" / "best")
    _grade(store, "ann.md", STACKS, [1.0, 0.0, 0.0], adapter)  # superseded by the next grade of ann.md
    expected = {"ann.md": [3.41, 2.0, 0.0], "bob.md": [4.87, 1.25, 2.5], "cy.md": [0.0, 0.3, 3.0]}
    for name, scores in expected.items():
        _grade(store, name, STACKS, scores, adapter)
    return expected


def _reimport(path: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """The gradebook read back by the spreadsheet importer, wide shape, mapping guessed from the header."""
    sheet, problems = read_sheet_file(path)
    assert sheet is not None, problems
    report = sheet_submissions(sheet, guess_mapping(sheet))
    assert report.ok, report.problems
    return {s.submission_id: {i.question_id: (i.score, i.max_score) for i in s.rubric_alignment}
            for s in report.submissions}


@pytest.mark.parametrize("suffix", [".xlsx", ".csv"])
def test_exported_gradebook_read_back_in_wide_shape_keeps_every_score(graded: dict, tmp_path: Path, suffix: str,
                                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / f"grades{suffix}"
    assert inference_cli(["export-grades", "--out", str(out)]) == 0
    assert f"3 submissions x 3 questions -> {out}" in capsys.readouterr().out
    back = _reimport(out)
    maxima = [5.0, 2.0, 3.0]
    assert back == {name: {lab: (s, m) for lab, s, m in zip(["1.1", "1.2", "3"], scores, maxima)}
                    for name, scores in graded.items()}


def test_xlsx_gradebook_has_a_row_per_submission_totals_and_points_possible(graded: dict, tmp_path: Path) -> None:
    path, book = export_gradebook(tmp_path / "grades.xlsx")
    rows = list(load_workbook(path).active.iter_rows(values_only=True))
    assert rows[0] == ("submission", "1.1", "1.2", "3", "total", "max", "graded_by", "graded_at")
    assert rows[1][:5] == (MAX_ROW_LABEL, 5, 2, 3, 10)
    by_name = {r[0]: r for r in rows[2:]}
    assert sorted(by_name) == ["ann.md", "bob.md", "cy.md"]
    assert by_name["bob.md"][4:6] == (pytest.approx(8.62), 10)
    assert by_name["ann.md"][1] == 3.41  # the newest grade of ann.md, not the first
    assert by_name["ann.md"][6].endswith("run-a/best")


def test_corrections_replace_the_model_scores_and_the_total_follows(tmp_path: Path) -> None:
    store = Store()
    gid = _grade(store, "ann.md", STACKS, [3.41, 2.0, 0.0])
    path, book = export_gradebook(tmp_path / "corrected.xlsx", corrections={(gid, 2): 2.5, (gid + 99, 0): 0.0})
    row = book.rows[0]
    assert (row.scores["3"], row.total, row.corrected) == (2.5, 7.91, {"3"})
    assert _reimport(path)["ann.md"]["3"] == (2.5, 3.0)
    shaded = load_workbook(path).active.cell(row=3, column=4).fill.fgColor.rgb
    assert shaded.endswith("FFF2CC")


def test_several_rubrics_get_their_own_columns_and_blank_cells(tmp_path: Path) -> None:
    store = Store()
    _grade(store, "ann.md", STACKS, [5.0, 2.0, 3.0])
    _grade(store, "ann-essay.md", ESSAY, [7.5])
    out = tmp_path / "two.csv"
    assert inference_cli(["export-grades", "--out", str(out)]) == 0
    back = _reimport(out)
    assert back == {"ann.md": {"Stacks: 1.1": (5, 5), "Stacks: 1.2": (2, 2), "Stacks: 3": (3, 3)},
                    "ann-essay.md": {"Essay: 1": (7.5, 10)}}


def test_adapter_filter_takes_one_adapter_or_every_adapter_of_a_run(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    store = Store()
    run = tmp_path / "checkpoints" / "run-b"
    _grade(store, "ann.md", ESSAY, [4.0], str(run / "best"))
    _grade(store, "bob.md", ESSAY, [6.0], str(run / "checkpoint-10"))
    _grade(store, "cy.md", ESSAY, [8.0], None)  # the base model alone
    assert [g["submission_name"] for g in stored_grades(adapter=str(run / "best"))] == ["ann.md"]
    assert sorted(g["submission_name"] for g in stored_grades(adapter=str(run))) == ["ann.md", "bob.md"]
    book = build_gradebook(stored_grades())
    assert {r.submission: r.graded_by for r in book.rows}["cy.md"] == "embedded:gemma-3-270m (no adapter)"
    assert inference_cli(["export-grades", "--out", str(tmp_path / "x.xlsx"), "--adapter", str(tmp_path / "nothing")]) == 2
    assert "no stored grades made with adapter" in capsys.readouterr().err
    assert not (tmp_path / "x.xlsx").exists()


def test_an_unknown_file_type_is_refused_before_anything_is_written(graded: dict, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    assert inference_cli(["export-grades", "--out", str(tmp_path / "grades.ods")]) == 2
    assert ".csv or .xlsx" in capsys.readouterr().err
    assert list(tmp_path.glob("grades*")) == []


def test_grade_tab_downloads_the_gradebook(tmp_path: Path) -> None:
    """The Grade tab's Gradebook download (the API name the button has): the stored grades as an
    .xlsx that reads back with every score."""
    from gradio_client import Client

    from tests.test_ui_client import app_server

    store = Store(tmp_path / "app" / "studio.db")
    _grade(store, "ann.md", STACKS, [3.41, 2.0, 0.5])
    _grade(store, "bob.md", STACKS, [5.0, 1.0, 3.0])
    with app_server(tmp_path / "app") as url:
        client = Client(url, verbose=False)
        msg, path, _ = client.predict("", "xlsx", api_name="/export_gradebook")
        assert msg == "2 submissions x 3 questions"
        back = _reimport(Path(path))
        assert {k: {q: s for q, (s, _) in v.items()} for k, v in back.items()} == {
            "ann.md": {"1.1": 3.41, "1.2": 2.0, "3": 0.5}, "bob.md": {"1.1": 5.0, "1.2": 1.0, "3": 3.0}}


def test_the_teachers_corrections_replace_the_models_scores_in_the_export(tmp_path: Path) -> None:
    """A score corrected in the Review tab is what the gradebook says (by default)."""
    from data.store import Store
    from inference.gradebook import export_gradebook, teacher_corrections

    store = Store(tmp_path / "studio.db")
    rubric = {"title": "t", "questions": [{"question": "Q one", "max_score": 5, "question_id": "1"},
                                          {"question": "Q two", "max_score": 5, "question_id": "2"}]}
    grade = {"score": 5, "max_score": 10, "feedback": "",
             "items": [{"question": "Q one", "score": 2, "max_score": 5}, {"question": "Q two", "score": 3, "max_score": 5}]}
    gid = store.add_grade(grade=grade, raw_text="", base_model="b", adapter=None, submission_name="ann.md",
                          rubric=rubric, repaired=False, latency_s=0.1,
                          submission_md="## Question 1: Q one\n\na\n\n## Question 2: Q two\n\nb\n")
    store.add_correction(gid, 1, teacher_score=5, corrected_by="teacher")
    assert teacher_corrections(store.grades(limit=-1), store) == {(gid, 1): 5}
    _, book = export_gradebook(tmp_path / "book.csv", store=store)
    (row,) = book.rows
    assert row.submission == "ann.md" and list(row.scores.values()) == [2, 5] and row.total == 7
    assert len(row.corrected) == 1


def test_a_row_names_every_model_that_graded_it(tmp_path: Path) -> None:
    """#27 item 1: one student's grades on four assignments by two models: the row names both
    (it named whichever came last in the row, and at times none)."""
    store = Store()
    adapter = str(tmp_path / "checkpoints" / "run-a" / "best")
    bio = Rubric(title="Bio", questions=[RubricQuestion(question_id="1", question="Photosynthesis?", max_score=4)])
    history = Rubric(title="History", questions=[RubricQuestion(question_id="1", question="Why 1848?", max_score=6)])
    _grade(store, "ann.md", STACKS, [1.0, 1.0, 1.0], adapter)
    _grade(store, "ann.md", ESSAY, [5.0], None)
    _grade(store, "ann.md", bio, [2.0], adapter)
    _grade(store, "ann.md", history, [3.0], None)
    (row,) = build_gradebook(stored_grades()).rows
    assert (row.total, row.max) == (13.0, 30.0)
    assert sorted(row.graded_by.split("; ")) == sorted([adapter, "embedded:gemma-3-270m (no adapter)"])


def test_grades_stored_as_pasted_md_before_27_get_a_row_each(tmp_path: Path) -> None:
    """#27 item 1: the Grade tab stored every pasted submission as `pasted.md`; opening such a
    store names each pasted text on its own (its tuned and base grades stay one submission), so
    the gradebook no longer puts different students in one row."""
    import sqlite_utils

    from data.store import MIGRATIONS

    db_path = tmp_path / "old.db"
    db = sqlite_utils.Database(db_path)
    MIGRATIONS.apply(db, stop_before="0004_name_pasted_submissions")
    rubric = ESSAY.model_dump()
    for text, score, adapter in [("ann's essay", 7.0, "run/best"), ("ann's essay", 5.0, None),
                                 ("bob's essay", 9.0, "run/best"), (None, 4.0, None)]:
        grade = {"score": score, "max_score": 10.0, "feedback": "",
                 "items": [{"question": "Thesis", "score": score, "max_score": 10.0}]}
        db["grades"].insert({"created_at": "2026-12-01T10:00:00+00:00", "base_model": "b", "adapter": adapter,
                             "submission_name": "pasted.md", "score": score, "max_score": 10.0,
                             "grade": json.dumps(grade), "raw_text": "", "rubric": json.dumps(rubric), "repaired": 0,
                             "latency_s": 0.1, "submission_md": text})
    db.close()
    store = Store(db_path)
    names = [g["submission_name"] for g in sorted(store.grades(limit=-1), key=lambda g: g["id"])]
    assert names == ["pasted-1.md", "pasted-1.md", "pasted-3.md", "pasted-4.md"]
    book = build_gradebook(stored_grades(store))
    assert sorted((r.submission, r.total) for r in book.rows) == [("pasted-1.md", 5.0), ("pasted-3.md", 9.0),
                                                                   ("pasted-4.md", 4.0)]


def test_two_files_of_one_name_are_refused_before_they_share_a_row(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """#27 item 1: a row is a submission's name, so two different files named alike (each
    student's folder holding an essay.md) are refused before grading, in the CLI and the Grade
    tab's batch, instead of one student's grade hiding the other's."""
    from gradio_client import Client, handle_file

    from tests.test_ui_client import app_server

    rubric = tmp_path / "essay.json"
    rubric.write_text(ESSAY.model_dump_json())
    files = []
    for student in ("ann", "bob"):
        (tmp_path / student).mkdir()
        files.append(tmp_path / student / "essay.md")
        files[-1].write_text(f"## Question 1: Thesis\n\n{student}'s thesis.\n")
    assert inference_cli(["grade", "--base", "embedded:tiny-gpt-oss", "--rubric", str(rubric), *map(str, files)]) == 2
    assert "different files share the name essay.md" in capsys.readouterr().err
    assert Store().grades() == []
    with app_server(tmp_path / "app") as url:
        client = Client(url, verbose=False)
        with pytest.raises(Exception, match="share the name essay.md"):
            client.predict("embedded:tiny-gpt-oss", "", None, handle_file(str(rubric)),
                           [handle_file(str(f)) for f in files], 16, api_name="/grade_batch")
    assert Store(tmp_path / "app" / "studio.db").grades() == []
