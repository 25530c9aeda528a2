"""Graded work from spreadsheets (#16): `python -m training import NAME FILE.csv|.xlsx --map ...`
stores a dataset from a real third-party CSV export (Mohler) and from our own long and wide
sheets; a bad sheet (missing column, score outside [0, max], a non-number, an empty sheet, a wrong
encoding) gets an error naming the file, row and column, and nothing is stored."""
from __future__ import annotations

import collections
import csv
import json
from pathlib import Path

import pytest
from openpyxl import Workbook

from data.spreadsheet import ColumnMap, guess_mapping, load_spreadsheet, read_sheet_file
from data.store import Store
from training.__main__ import main as training_cli

MOHLER_MAP = ["--map", "question_id=id", "--map", "question=question", "--map", "reference_answer=desired_answer",
              "--map", "answer=student_answer", "--map", "score=score_avg", "--map", "graders=score_me,score_other",
              "--max-score", "5"]


@pytest.fixture(scope="module")
def mohler_csv(mohler_dir: Path) -> Path:
    """The third-party CSV export the Mohler JSON was converted from (read in place, never copied)."""
    path = mohler_dir / "raw" / "mohler_dataset_edited.csv"
    if not path.is_file():
        pytest.skip(f"needs the Mohler CSV export: {path} is missing")
    return path


def _items(dataset_name: str) -> list:
    store = Store()
    found = store.find_dataset(dataset_name)
    assert found is not None, f"dataset {dataset_name} was not stored"
    return [(s, item) for s in store.dataset_submissions(found["id"]) for item in s.rubric_alignment]


def _write_csv(path: Path, rows: list[list], encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as fh:
        csv.writer(fh).writerows(rows)
    return path


def _write_xlsx(path: Path, rows: list[list]) -> Path:
    wb = Workbook()
    for row in rows:
        wb.active.append(row)
    wb.save(path)
    return path


# -- the real third-party export -----------------------------------------------------------------


def test_mohler_csv_imports_every_answer_with_both_graders_scores(mohler_csv: Path, mohler_dir: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    assert training_cli(["import", "mohler-csv", str(mohler_csv), *MOHLER_MAP]) == 0
    assert "stored: dataset 'mohler-csv'" in capsys.readouterr().out
    items = _items("mohler-csv")
    # No student column: each row is its own one-question submission; the CSV has one row per answer.
    with open(mohler_csv, newline="", encoding="utf-8") as fh:
        n_rows = sum(1 for _ in csv.DictReader(fh))
    assert len(items) == n_rows == len({s.submission_id for s, _ in items})
    assert all(len(s.rubric_alignment) == 1 and s.max_score == 5 for s, _ in items)
    # Both graders' scores on every item, the score their mean (the score_avg column), and the same
    # (question, grader 1, grader 2) triples as the JSON conversion of the same export.
    assert all(len(item.grader_scores) == 2 and item.score == pytest.approx(sum(item.grader_scores) / 2)
               for _, item in items)
    from_json = collections.Counter(
        (it["question_id"], tuple(it["grader_scores"]))
        for f in (mohler_dir / "json").glob("*.json") for it in json.loads(f.read_text())["rubric_alignment"])
    assert collections.Counter((item.question_id, tuple(item.grader_scores)) for _, item in items) == from_json
    assert all(item.reference_answer and item.question and item.answer for _, item in items)


def test_mohler_csv_guessed_columns_and_grouping_by_a_chosen_column(mohler_csv: Path) -> None:
    sheet, problems = read_sheet_file(mohler_csv)
    assert sheet is not None and not problems
    guess = guess_mapping(sheet)
    # The pandas index columns are left alone; the named ones are recognised.
    assert (guess.shape, guess.question_id, guess.reference_answer, guess.answer, guess.score, guess.graders) == (
        "long", "id", "desired_answer", "student_answer", "score_avg", ["score_me", "score_other"])
    # Rows grouped by a column: one submission per question id.
    assert training_cli(["import", "mohler-by-question", str(mohler_csv), *MOHLER_MAP, "--group-by", "id"]) == 0
    subs = {s.submission_id for s, _ in _items("mohler-by-question")}
    assert "1.1" in subs and "12.11" in subs and len(subs) == len({item.question_id for _, item in _items("mohler-by-question")})


# -- our own sheets: long and wide ----------------------------------------------------------------


def test_long_sheet_groups_rows_into_submissions_and_keeps_labels_as_text(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "class.csv", [
        ["Student", "Assignment", "Question ID", "Question", "Model answer", "Answer", "Score", "Max"],
        ["ann", "hw1", "1.10", "Name a sorting algorithm", "merge sort", "quicksort", "2", "2"],
        ["bob", "hw1", "1.10", "Name a sorting algorithm", "merge sort", "", "0", "2"],
        ["ann", "hw1", "1.2", "Its complexity?", "n log n", "n^2 worst case", "1.5", "3"],
        ["ann", "hw2", "1", "Define a stack", "", "LIFO list", "4", "4"],
    ])
    mapping = ColumnMap(submission="Student", group_by="Assignment", question_id="Question ID", question="Question",
                        reference_answer="Model answer", answer="Answer", score="Score", max_score="Max")
    report, _ = load_spreadsheet(path, mapping)
    assert report.ok, report.problems
    subs = {s.submission_id: s for s in report.submissions}
    assert sorted(subs) == ["ann/hw1", "ann/hw2", "bob/hw1"]
    ann = subs["ann/hw1"]
    assert [i.question_id for i in ann.rubric_alignment] == ["1.10", "1.2"]  # not the number 1.1
    assert (ann.score, ann.max_score) == (3.5, 5)
    assert ann.rubric_alignment[0].reference_answer == "merge sort"
    assert subs["ann/hw2"].rubric_alignment[0].reference_answer is None  # an empty cell is no model answer
    assert report.record_paths == ["row 2", "row 3", "row 5"]


def test_graders_columns_without_a_score_column_give_their_mean(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "two-graders.csv", [
        ["student", "question", "answer", "grader_1", "grader_2"],
        ["ann", "Why?", "because", "3", "4"],
        ["bob", "Why?", "dunno", "1", ""],  # the second grader left it blank: one grader's score
    ])
    report, used = load_spreadsheet(path, ColumnMap(submission="student", question="question", answer="answer",
                                                    graders=["grader_1", "grader_2"], default_max_score=5))
    assert report.ok, report.problems
    items = {s.submission_id: s.rubric_alignment[0] for s in report.submissions}
    assert (items["ann"].score, items["ann"].grader_scores) == (3.5, [3, 4])
    assert (items["bob"].score, items["bob"].grader_scores) == (1, [1])


def test_wide_xlsx_with_answer_columns_and_a_points_possible_row(tmp_path: Path) -> None:
    path = _write_xlsx(tmp_path / "gradebook.xlsx", [
        ["Student", "Q1", "Q1 answer", "Q2", "Q2 answer", "Total"],
        ["Points possible", 5, None, 10, None, 15],
        ["ann", 4, "a stack is LIFO", 7.5, "a queue is FIFO", 11.5],
        [None, None, None, None, None, None],  # a blank row in the middle: later row numbers stay Excel's
        ["bob", 5, "LIFO", None, None, 5],  # Q2 not graded yet: no item
    ])
    sheet, _ = read_sheet_file(path)
    guess = guess_mapping(sheet)
    assert (guess.shape, guess.submission, guess.questions, guess.answers, guess.max_row) == (
        "wide", "Student", ["Q1", "Q2"], ["Q1 answer", "Q2 answer"], "Points possible")
    assert training_cli(["import", "wide", str(path), "--shape", "wide"]) == 0
    by_sub = collections.defaultdict(dict)
    for s, item in _items("wide"):
        by_sub[s.submission_id][item.question_id] = (item.score, item.max_score, item.answer)
    assert by_sub == {"ann": {"Q1": (4, 5, "a stack is LIFO"), "Q2": (7.5, 10, "a queue is FIFO")},
                      "bob": {"Q1": (5, 5, "LIFO")}}


# -- bad input: file, row and column named; nothing stored -------------------------------------------

LONG = ["student", "question", "answer", "score", "max_score"]


def _bad_sheets(tmp: Path) -> list[tuple[str, Path, list[str], list[str]]]:
    """(case, file, extra CLI flags, what the error must name)."""
    latin = tmp / "latin1.csv"
    latin.write_bytes("student,question,answer,score,max_score\nann,Why?,ok,3,5\nbob,Why?,caf\u00e9 au lait,4,5\n"
                      .encode("cp1252"))
    return [
        ("missing column", _write_csv(tmp / "no-score.csv", [["student", "question", "answer", "points", "max_score"],
                                                             ["ann", "Why?", "ok", "3", "5"]]),
         [], ["no-score.csv", "row 1", "'score'", "points"]),
        ("score above max", _write_csv(tmp / "above.csv", [LONG, ["ann", "Why?", "ok", "3", "5"],
                                                           ["bob", "Why?", "ok", "6", "5"]]),
         [], ["above.csv", "row 3, column D (score)", "6", "0 <= score <= max_score"]),
        ("negative score", _write_xlsx(tmp / "negative.xlsx", [LONG, ["ann", "Why?", "ok", -1, 5]]),
         [], ["negative.xlsx", "row 2, column D (score)", "-1", ">= 0"]),
        ("not a number", _write_xlsx(tmp / "text.xlsx", [LONG, ["ann", "Why?", "ok", 3, 5], ["bob", "Why?", "ok", "four", 5]]),
         [], ["text.xlsx", "row 3, column D (score)", "four", "a number"]),
        ("empty sheet", _write_xlsx(tmp / "empty.xlsx", []), ["--max-score", "5"], ["empty.xlsx", "row 1", "empty sheet"]),
        ("header only", _write_csv(tmp / "header.csv", [LONG]), [], ["header.csv", "row 2", "no data"]),
        ("wrong encoding", latin, [], ["latin1.csv", "row 3, column C", "not utf-8", "CSV UTF-8", "--encoding cp1252"]),
    ]


@pytest.mark.parametrize("case", ["missing column", "score above max", "negative score", "not a number",
                                  "empty sheet", "header only", "wrong encoding"])
def test_bad_sheet_names_file_row_and_column_and_stores_nothing(case: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    _, path, flags, named = next(c for c in _bad_sheets(tmp_path) if c[0] == case)
    good = _write_csv(tmp_path / "good.csv", [LONG, ["cy", "Why?", "fine", "2", "5"]])
    # With a good file beside it: still nothing is stored.
    code = training_cli(["import", "bad", str(good), str(path), "--map", "submission=student",
                         "--map", "question=question", "--map", "answer=answer", "--map", "score=score",
                         "--map", "max_score=max_score", *flags])
    out = capsys.readouterr()
    assert code == 1
    assert "nothing imported" in out.err
    report = out.out
    assert "INVALID" in report
    for text in named:
        assert text in report, f"{case}: {text!r} not in the report:\n{report}"
    assert Store().list_datasets() == []


def test_wrong_encoding_imports_when_the_encoding_is_named(tmp_path: Path) -> None:
    latin = next(c for c in _bad_sheets(tmp_path) if c[0] == "wrong encoding")[1]
    assert training_cli(["import", "latin", str(latin), "--encoding", "cp1252"]) == 0
    assert {i.answer for _, i in _items("latin")} == {"ok", "caf\u00e9 au lait"}


def test_every_bad_row_is_reported_not_only_the_first(tmp_path: Path) -> None:
    rows = [LONG] + [["s%d" % k, "Why?", "ok", "x" if k % 2 else "9", "5"] for k in range(6)]
    report, _ = load_spreadsheet(_write_csv(tmp_path / "many.csv", rows),
                                 ColumnMap(submission="student", question="question", answer="answer",
                                           score="score", max_score="max_score"))
    assert not report.ok and report.submissions == []
    assert sorted(p.path for p in report.errors) == [f"row {r}, column D (score)" for r in range(2, 8)]


def test_json_import_still_works_beside_the_spreadsheet_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    repo = Path(__file__).resolve().parents[1]
    assert training_cli(["import", "essays", str(repo / "data" / "samples" / "graded" / "essay-climate")]) == 0
    assert "stored: dataset 'essays'" in capsys.readouterr().out
    # Spreadsheet flags with JSON alone are a mistake worth saying.
    assert training_cli(["import", "essays2", str(repo / "data" / "samples" / "graded"), "--max-score", "5"]) == 2


# -- the Data tab ------------------------------------------------------------------------------------


def test_data_tab_guesses_columns_shows_errors_then_stores_the_mapped_sheet(tmp_path: Path) -> None:
    """Through the studio's API, as the page does it: upload a sheet (columns guessed from the
    header; no maximum anywhere: an error, nothing stored), pick the maximum, apply, store."""
    from gradio_client import Client, handle_file

    from tests.test_ui_client import app_server

    sheet = _write_xlsx(tmp_path / "class.xlsx", [
        ["Student", "Question", "Desired answer", "Student answer", "Score me", "Score other"],
        ["ann", "What is a stack?", "a LIFO list", "last in first out", 5, 4],
        ["bob", "What is a stack?", "a LIFO list", "a queue", 1, 2],
        ["bob", "What is a queue?", "a FIFO list", "first in first out", "five", 5],
    ])
    with app_server(tmp_path / "app") as url:
        client = Client(url, verbose=False)
        summary, problems, *_ = client.predict([handle_file(str(sheet))], "embedded:tiny-gpt-oss", 512,
                                               api_name="/validate_upload")
        assert "errors" in summary.lower() and "class.xlsx" in summary
        assert any(r[1] == "row 1 (header)" and "maximum" in r[3] for r in problems["data"]), problems
        msg, *_ = client.predict("class", api_name="/store_dataset")
        assert "Nothing stored" in msg
        # The columns the page would show, with the maximum filled in (what the user does).
        mapping = ["long", "Student", "(none)", "(none)", "Question", "Desired answer", "Student answer", "(none)",
                   "(none)", ["Score me", "Score other"], [], [], "", 5]
        summary, problems, stats, _plot, preview = client.predict(
            [handle_file(str(sheet))], "embedded:tiny-gpt-oss", 512, *mapping, api_name="/validate_mapped")[:5]
        rows = problems["data"]
        assert [r[1] for r in rows] == ["row 4, column E (Score me)"] and "five" in rows[0][3], rows
        fixed = _write_xlsx(tmp_path / "class-fixed.xlsx", [
            ["Student", "Question", "Desired answer", "Student answer", "Score me", "Score other"],
            ["ann", "What is a stack?", "a LIFO list", "last in first out", 5, 4],
            ["bob", "What is a stack?", "a LIFO list", "a queue", 1, 2],
            ["bob", "What is a queue?", "a FIFO list", "first in first out", 5, 5],
        ])
        summary, problems, stats, _plot, preview = client.predict(
            [handle_file(str(fixed))], "embedded:tiny-gpt-oss", 512, *mapping, api_name="/validate_mapped")[:5]
        assert "All files valid" in summary and "graders=Score me,Score other" in summary, (summary, problems)
        assert "2 submissions" in stats and "3 items" in stats
        assert [r[1] for r in preview["data"]] == ["ann", "bob", "bob"]
        msg, table, _ = client.predict("class", api_name="/store_dataset")
        assert "Stored dataset **class**" in msg, msg
    stored = Store(tmp_path / "app" / "studio.db")
    subs = stored.dataset_submissions(stored.find_dataset("class")["id"])
    assert {s.submission_id: [i.grader_scores for i in s.rubric_alignment] for s in subs} == {
        "ann": [[5, 4]], "bob": [[1, 2], [5, 5]]}


def test_the_same_content_under_a_new_name_points_to_the_stored_dataset_and_a_run_on_that_name_is_refused(
        mohler_csv: Path, capsys: pytest.CaptureFixture) -> None:
    """#27 item 2: importing a file stored before under another name says the name it is stored under
    (the advice must work); a run on a db: name the store lacks is refused before DeepSpeed starts."""
    assert training_cli(["import", "mohler-csv", str(mohler_csv), *MOHLER_MAP]) == 0
    capsys.readouterr()
    assert training_cli(["import", "mohler-cli", str(mohler_csv), *MOHLER_MAP]) == 0
    out = capsys.readouterr().out
    assert "already stored (same content) as dataset 'mohler-csv'" in out, out
    assert "--set datasets=db:mohler-csv" in out and "db:mohler-cli" not in out
    assert [d["name"] for d in Store().list_datasets()] == ["mohler-csv"]
    # The name that is not stored: refused at the check, naming the dataset that is.
    assert training_cli(["run", "--preset", "cpu-default", "--set", "datasets=db:mohler-cli"]) == 2
    err = capsys.readouterr().err
    assert "refusing to launch" in err and "db:mohler-cli" in err and "datasets=db:mohler-csv" in err, err
    assert Store().list_runs() == []


def test_a_sheet_without_an_answer_column_is_refused_naming_what_is_missing(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    """#27 item 3: question, answer and score are required; a sheet of scores alone (one row per
    answer) would train on empty answers, so it is an error, and nothing is stored."""
    path = _write_csv(tmp_path / "scores-only.csv", [["student", "question", "score", "max_score"],
                                                     ["ann", "Why?", "3", "5"], ["bob", "Why?", "4", "5"]])
    assert training_cli(["import", "scores", str(path)]) == 1
    out = capsys.readouterr()
    assert "scores-only.csv: INVALID" in out.out and "no answer column mapped" in out.out, out.out
    assert "nothing imported" in out.err
    assert Store().list_datasets() == []
