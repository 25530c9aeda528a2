"""Loading graded submissions: real data validates; every kind of bad input is refused with the
file, the JSON path, the value and what was expected, never with a traceback."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from data.loading import (
    DataError,
    content_hash,
    load_graded,
    load_graded_bytes,
    load_rubric,
    parse_rubric_bytes,
    validate_cli,
)
from tests.conftest import REPO

DATA = REPO / "data" / "samples"


def sub(n_items: int = 2, score: float = 3, item_max: float = 5, **extra) -> dict:
    """A valid graded submission: items score 1, 2, ... (their sum is the total)."""
    items = [{"question": f"Question {k}?", "answer": f"answer {k}", "score": k + 1, "max_score": item_max}
             for k in range(n_items)]
    d = {"score": sum(i["score"] for i in items), "max_score": item_max * n_items, "rubric_alignment": items,
         "feedback": "fine"}
    d.update(extra)
    return d


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text


# -- real data ---------------------------------------------------------------------------------


def test_all_mohler_files_validate(mohler_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted((mohler_dir / "json").glob("*.json"))
    assert len(files) == 336
    report = load_graded([mohler_dir / "json"])
    assert report.ok, report.format()
    assert len(report.files) == 336 and len(report.submissions) == 336
    assert report.errors == []
    # the 9 answers the source lost (text "", scored > 0) are flagged, nothing else
    assert len(report.warnings) == 9 and all(w.path.endswith(".answer") for w in report.warnings)
    # each grader's score is read; unknown fields are kept, not dropped
    first = report.submissions[0]
    assert first.rubric_alignment[0].grader_scores and len(first.rubric_alignment[0].grader_scores) == 2
    assert "score_avg_unrounded" in (first.rubric_alignment[0].model_extra or {})
    assert first.model_extra and first.model_extra.get("assignment") == "a01"
    assert validate_cli([str(mohler_dir / "json")], 20 * 1024 * 1024) == 0
    out = capsys.readouterr().out
    assert "336 valid submission(s)" in out and "Result: OK" in out


def test_our_sample_graded_data_validates() -> None:
    files = sorted(p for p in (DATA / "graded").rglob("*") if p.suffix in (".json", ".jsonl"))
    assert files, "data/samples/graded holds the sample graded submissions"
    report = load_graded(files)
    assert report.ok, report.format()
    assert len(report.submissions) >= 40
    assignments = {s.rubric().title or (s.model_extra or {}).get("assignment") for s in report.submissions}
    assert len(assignments) >= 4


def test_our_sample_rubrics_load() -> None:
    rubrics = sorted((DATA / "rubrics").glob("*.json"))
    assert rubrics
    for path in rubrics:
        rubric = load_rubric(path)
        assert rubric.questions and rubric.max_score > 0


# -- the malformed-input corpus ----------------------------------------------------------------

S = json.dumps(sub())
CORPUS: dict[str, tuple[str, bytes, list[str]]] = {
    # name: (file name, content, JSON paths (or locations) that must be named)
    "bad_json": ("bad.json", b'{"score": 1,\n "max_score": 2\n "rubric_alignment": []}', ["line 3, column 2"]),
    "wrong_types": (
        "types.json",
        json.dumps([sub(), {**sub(), "score": "five", "feedback": 3,
                            "rubric_alignment": [{"question": 1, "answer": 42, "score": [1]}]}]).encode(),
        ["[1].score", "[1].feedback", "[1].rubric_alignment[0].question", "[1].rubric_alignment[0].answer",
         "[1].rubric_alignment[0].score"],
    ),
    "nan": ("nan.json", S.replace('"score": 1,', '"score": NaN,', 1).encode(), ["rubric_alignment[0].score"]),
    "infinity": ("inf.json", S.replace('"max_score": 10', '"max_score": Infinity').encode(), ["max_score"]),
    "huge_number": ("huge.json", S.replace('"max_score": 10', '"max_score": 1e999').encode(), ["max_score"]),
    "score_above_max": ("above.json", json.dumps({**sub(), "score": 11}).encode(), ["score"]),
    "item_above_max": (
        "item.json",
        json.dumps({**sub(), "rubric_alignment": [{"question": "q", "answer": "a", "score": 6, "max_score": 5}]}).encode(),
        ["rubric_alignment[0].score"],
    ),
    "negative": ("neg.json", json.dumps({**sub(), "score": -1}).encode(), ["score"]),
    "negative_item": ("negitem.json", json.dumps(sub()).replace('"score": 2', '"score": -2').encode(),
                      ["rubric_alignment[1].score"]),
    "empty_rubric_alignment": ("empty_items.json", json.dumps({**sub(), "rubric_alignment": []}).encode(),
                               ["rubric_alignment"]),
    "missing_fields": (
        "missing.json",
        json.dumps({"rubric_alignment": [{"question": "q"}]}).encode(),
        ["score", "max_score", "rubric_alignment[0].answer", "rubric_alignment[0].score"],
    ),
    "not_an_object": ("list_of_numbers.json", b"[1, 2]", ["[0]", "[1]"]),
    "binary": ("picture.json", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), []),
    "invalid_utf8": ("latin1.json", '{"feedback": "très bien"}'.encode("latin-1"), ["line 1, column 17"]),
    "utf16": ("utf16.json", S.encode("utf-16"), []),
    "deeply_nested": ("deep.json", b"[" * 100_000 + b"]" * 100_000, []),
    "nested_in_extra": ("deep_extra.json", json.dumps({**sub(), "meta": 1}).replace(
        '"meta": 1', '"meta": ' + "[" * 200 + "]" * 200).encode(), ["meta[0][0]"]),
    "empty_file": ("empty.json", b"", []),
    "whitespace_file": ("blank.json", b" \n\t\n", []),
    "empty_list": ("nothing.json", b"[]", []),
    "duplicate_ids": (
        "dups.json",
        json.dumps([sub(submission_id="s1"), sub(submission_id="s2"), sub(submission_id="s1")]).encode(),
        ["[2].submission_id"],
    ),
    "jsonl_bad_line": ("lines.jsonl", (S + "\n" + S + "\n" + '{"score": }' + "\n").encode(), ["line 3, column 11"]),
    "jsonl_bad_record": ("records.jsonl", (S + "\n\n" + json.dumps({**sub(), "max_score": "x"}) + "\n").encode(),
                         ["line 3: max_score"]),
    "integer_too_big_for_float": ("bigint.json", json.dumps(sub()).replace('"max_score": 10', '"max_score": 1' + "0" * 400).encode(),
                                  ["max_score"]),
    "lone_surrogate": ("surrogate.json", json.dumps({**sub(), "feedback": "bad \ud800"}).encode(), ["feedback"]),
    "zero_item_max": ("zero.json", json.dumps({**sub(1), "score": 0, "rubric_alignment": [
        {"question": "q", "answer": "a", "score": 0, "max_score": 0}]}).encode(), ["rubric_alignment[0].max_score"]),
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_malformed_input_is_rejected_naming_file_and_path(case: str, tmp_path: Path) -> None:
    name, content, paths = CORPUS[case]
    path = tmp_path / name
    path.write_bytes(content)
    report = load_graded([path])
    assert not report.ok
    assert report.submissions == []
    (fr,) = report.files
    assert fr.file == str(path) and fr.submissions == []
    assert fr.errors and all(p.file == str(path) for p in fr.problems)
    named = {p.path for p in fr.errors}
    for expected_path in paths:
        assert expected_path in named, (expected_path, [str(p) for p in fr.errors])
    text = report.format()
    assert str(path) in text and "INVALID" in text
    no_traceback(text)
    for p in fr.errors:
        assert p.value and p.expected and str(p).startswith(str(path))
        no_traceback(str(p))


def test_every_problem_in_a_file_is_reported_with_value_and_expectation() -> None:
    bad = [sub() for _ in range(13)]
    bad[12] = sub(4)
    bad[12]["rubric_alignment"][3]["score"] = 7
    bad[12]["score"] = 7  # keeps the total consistent: only the item is wrong
    bad[3]["max_score"] = float("nan")
    bad[5]["rubric_alignment"] = []
    report = load_graded_bytes("essay.json", json.dumps(bad).encode())
    messages = [str(p) for p in report.errors]
    assert "essay.json: [12].rubric_alignment[3].score: got 7 (above max_score 5); expected 0 <= score <= max_score" in messages
    assert "essay.json: [3].max_score: got NaN; expected a finite number (JSON has no NaN or Infinity)" in messages
    assert any(m.startswith("essay.json: [5].rubric_alignment: got an empty list") for m in messages)
    assert report.submissions == []  # nothing partial


@pytest.mark.parametrize(
    "record, path, words",
    [
        ({**sub(), "score": "3"}, "score", "write it without quotes"),
        ({**sub(1), "rubric_alignment": [{"question": "  ", "answer": "a", "score": 1}]},
         "rubric_alignment[0].question", "a non-empty string"),
        ({**sub(1), "score": 0, "rubric_alignment": [{"question": "q", "answer": "a", "score": 0, "max_score": 0}]},
         "rubric_alignment[0].max_score", "above 0"),
        ({"score": 1, "max_score": 5, "rubric_alignment": [{"question": "a", "answer": "a", "score": 1, "max_score": 5},
                                                           {"question": "b", "answer": "b", "score": 0}]},
         "rubric_alignment[1].max_score", "already use 5"),
        ({**sub(1), "rubric_alignment": [{"question": "a", "answer": "a", "score": 1, "max_score": 5,
                                          "grader_scores": [1, 7]}]},
         "rubric_alignment[0].grader_scores", "within 0..max_score"),
        ({**sub(1), "rubric_alignment": [{"question": "a", "answer": "a", "score": 1, "max_score": 5,
                                          "grader_scores": []}]},
         "rubric_alignment[0].grader_scores", "each grader's score for this item"),
    ],
)
def test_the_schema_is_the_one_judge_of_validity(record: dict, path: str, words: str) -> None:
    """A Python caller of the schema meets the rule the loader reports, in the same words."""
    from pydantic import ValidationError

    from data.rubric import GradedSubmission

    with pytest.raises(ValidationError, match=re.escape(words)):
        GradedSubmission.model_validate(record)
    (err,) = load_graded_bytes("x.json", json.dumps(record).encode()).errors
    assert err.path == path and words in err.expected, str(err)


def test_special_numbers_are_named_by_kind() -> None:
    for literal, shown in (("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "-Infinity")):
        data = json.dumps(sub()).replace('"max_score": 10', f'"max_score": {literal}').encode()
        (err,) = load_graded_bytes("x.json", data).errors
        assert err.path == "max_score" and err.value == shown and "finite" in err.expected


def test_bad_json_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"score": 1,\n   "max_score": 5,,\n}]', encoding="utf-8")
    (err,) = load_graded([path]).errors
    assert err.path == "line 3, column 19"
    assert "line 3" in str(err) and "column 19" in str(err)


def test_oversize_files_are_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    # Invalid JSON: if the file were parsed, a JSON error would be reported instead of its size.
    path.write_bytes(b"{" + b" " * 500)
    (err,) = load_graded([path], max_bytes=100).errors
    assert "501 bytes" in err.value and "100" in err.expected
    (err,) = load_graded_bytes("upload.json", b"{" + b" " * 500, max_bytes=100).errors
    assert "501 bytes" in err.value
    # the same content under the limit is read (and is then a JSON error)
    assert "JSON" in load_graded([path], max_bytes=1000).errors[0].value


def test_duplicate_submission_ids_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(sub(submission_id="x")), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps(sub(submission_id="y")) + "\n" + json.dumps(sub(submission_id="x")),
                                      encoding="utf-8")
    report = load_graded([tmp_path])
    a, b = report.files
    assert a.ok and not b.ok and b.submissions == []
    (err,) = b.errors
    assert err.file == str(tmp_path / "b.jsonl") and err.path == "line 2: submission_id"
    assert "a.json" in err.value
    # the same file named twice (directly and via its folder) is read once
    assert load_graded([tmp_path / "a.json", tmp_path]).files[0].ok


def test_accepted_shapes_bom_and_extra_fields(tmp_path: Path) -> None:
    (tmp_path / "one.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(sub(submission_id="1", assignment="essay")).encode())
    (tmp_path / "many.json").write_text(json.dumps([sub(submission_id="2"), sub(submission_id="3")]), encoding="utf-8")
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(sub(submission_id=str(i))) for i in (4, 5)) + "\n\n",
                                          encoding="utf-8")
    (tmp_path / "lines_named_json.json").write_text(
        "\n".join(json.dumps(sub(submission_id=str(i))) for i in (6, 7)), encoding="utf-8")
    sub_dir = tmp_path / "more"
    sub_dir.mkdir()
    item = {"question": "q", "answer": "a", "score": 1, "max_score": 2, "rubric_note": "kept"}
    (sub_dir / "x.json").write_text(json.dumps({"score": 1, "max_score": 2, "rubric_alignment": [item],
                                                "submission_id": "8"}), encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not data", encoding="utf-8")  # folders: only .json/.jsonl
    report = load_graded([tmp_path])
    assert report.ok, report.format()
    assert sorted(s.submission_id for s in report.submissions) == [str(i) for i in range(1, 9)]
    by_id = {s.submission_id: s for s in report.submissions}
    assert by_id["1"].model_extra == {"assignment": "essay"}
    assert by_id["8"].rubric_alignment[0].model_extra == {"rubric_note": "kept"}


def test_total_that_differs_from_items_is_a_warning_showing_both_numbers() -> None:
    report = load_graded_bytes("w.json", json.dumps({**sub(), "score": 2}).encode())
    assert report.ok and len(report.submissions) == 1
    (warning,) = report.warnings
    assert warning.path == "score" and "2" in warning.value and "3" in warning.expected
    assert "warning" in __import__("data.loading", fromlist=["x"]).ValidationReport([report]).format()


def test_upload_name_is_only_a_label(tmp_path: Path) -> None:
    report = load_graded_bytes("../../etc/passwd.json", json.dumps(sub()).encode())
    assert report.ok and report.file == "../../etc/passwd.json"


def test_missing_path_and_empty_folder(tmp_path: Path) -> None:
    report = load_graded([tmp_path / "nope.json", tmp_path])
    assert not report.ok
    assert [f.file for f in report.files] == [str(tmp_path / "nope.json"), str(tmp_path)]
    assert validate_cli([str(tmp_path / "nope.json")], 1000) == 1


def test_validate_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(sub()), encoding="utf-8")
    bad.write_text(json.dumps({**sub(), "score": float("nan")}), encoding="utf-8")
    assert validate_cli([str(good)], 10_000) == 0
    assert validate_cli([str(good), str(bad)], 10_000) == 1
    out = capsys.readouterr().out
    assert f"{bad}: INVALID" in out and "score: got NaN" in out
    assert validate_cli([str(good)], 10) == 1  # the size limit is configurable
    assert validate_cli([], 10) == 2


def test_content_hash_is_canonical() -> None:
    a = load_graded_bytes("a.json", json.dumps(sub()).encode()).submissions
    b = load_graded_bytes("b.json", b"\xef\xbb\xbf" + json.dumps(sub(), indent=4, sort_keys=True).encode()).submissions
    c = load_graded_bytes("c.json", json.dumps({**sub(), "feedback": "other"}).encode()).submissions
    assert content_hash(a) == content_hash(b) != content_hash(c)
    assert len(content_hash(a)) == 64


# -- rubrics -----------------------------------------------------------------------------------


def test_rubric_from_rubric_json_and_from_graded_submission(tmp_path: Path) -> None:
    rubric_file = tmp_path / "rubric.json"
    rubric_file.write_text(json.dumps({"title": "Essay", "questions": [
        {"question": "Why?", "max_score": 4, "reference_answer": "Because.", "question_id": 1},
        {"question": "How?", "max_score": 6}]}), encoding="utf-8")
    r = load_rubric(rubric_file)
    assert r.title == "Essay" and [q.max_score for q in r.questions] == [4, 6]
    assert r.questions[0].question_id == "1" and r.max_score == 10

    # JSONL / list of graded submissions: the first; items without max_score share the total
    lines = json.dumps({"score": 99, "max_score": 10, "rubric_alignment": [
        {"question": "a", "answer": "x", "score": 99}, {"question": "b", "answer": "y", "score": 1}]})
    r = parse_rubric_bytes("g.jsonl", (lines + "\n" + lines).encode())
    assert [q.max_score for q in r.questions] == [5, 5]  # scores are ignored, even invalid ones
    r = parse_rubric_bytes("qs.json", json.dumps([{"question": "a", "max_score": 1}]).encode())
    assert r.questions[0].question == "a"


def test_rubric_from_a_real_graded_submission(mohler_dir: Path) -> None:
    graded = load_rubric(mohler_dir / "json" / "unt-ds-a01-s01.json")
    assert len(graded.questions) == 7 and graded.questions[0].question_id == "1.1"
    assert graded.questions[0].reference_answer and graded.max_score == 35


@pytest.mark.parametrize(
    "content, where",
    [
        (json.dumps({"questions": [{"question": "a", "max_score": 1}, {"question": "b", "max_score": 0}]}),
         "questions[1].max_score"),
        (json.dumps({"questions": [{"max_score": 1}]}), "questions[0].question"),
        (json.dumps({"questions": []}), "questions"),
        ('{"questions": [{"question": "a", "max_score": NaN}]}', "questions[0].max_score"),
        (json.dumps({"score": 1, "max_score": 2, "rubric_alignment": [{"answer": "x"}]}), "rubric_alignment[0].question"),
        ('{"questions": [', "line 1, column 16"),
        ("[1, 2]", "[0]"),
    ],
)
def test_bad_rubric_raises_data_error_naming_file_and_field(content: str, where: str) -> None:
    with pytest.raises(DataError) as exc:
        parse_rubric_bytes("rubric.json", content.encode())
    message = str(exc.value)
    assert message.startswith("rubric.json: ") and where in message
    no_traceback(message)


def test_unreadable_rubric_files(tmp_path: Path) -> None:
    for name, data in (("bin.json", b"\x00\x01\x02"), ("latin.json", "é".encode("latin-1")), ("empty.json", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=name):
            load_rubric(tmp_path / name)
    with pytest.raises(DataError, match="nope.json"):
        load_rubric(tmp_path / "nope.json")


def test_duplicate_ids_across_uploads() -> None:
    from data.loading import check_across_files

    first = load_graded_bytes("a.json", json.dumps([sub(submission_id="x"), sub(submission_id="y")]).encode())
    second = load_graded_bytes("b.json", json.dumps(sub(submission_id="y")).encode())
    report = check_across_files([first, second])
    assert report.files[0].ok and not report.files[1].ok
    (err,) = report.errors
    assert str(err) == 'b.json: submission_id: got "y" (also in a.json [1]); expected a submission_id unique in the data set'
    assert [s.submission_id for s in report.submissions] == ["x", "y"]


def test_any_assignment_field_still_gives_a_rubric() -> None:
    for assignment, title in ((3, "3"), ("essay", "essay"), ({"name": "x"}, None), (None, None)):
        (s,) = load_graded_bytes("a.json", json.dumps(sub(assignment=assignment)).encode()).submissions
        assert s.rubric().title == title and s.grade().max_score == 10
