"""Markdown submissions: rendering matches the Mohler hand-in files, splitting recovers each
answer, and text whose headings don't match the rubric stays whole."""
from __future__ import annotations

from pathlib import Path

import pytest

from data.loading import DataError, load_graded, load_rubric
from data.markdown import (
    decode_markdown,
    normalize_submission,
    read_markdown,
    render_submission_markdown,
    split_sections,
)
from data.rubric import GradedSubmission, Rubric
from tests.conftest import REPO

DATA = REPO / "data" / "samples"


def squash(text: str) -> str:
    return " ".join(text.split())


def mohler_pairs(mohler_dir: Path) -> list[tuple[GradedSubmission, Path]]:
    report = load_graded([mohler_dir / "json"])
    assert report.ok
    return [(s, mohler_dir / "markdown" / f"{s.submission_id}.md") for s in report.submissions]


def test_mohler_markdown_splits_into_the_json_answers(mohler_dir: Path) -> None:
    checked = 0
    for sub, md_path in mohler_pairs(mohler_dir):
        if any((i.model_extra or {}).get("answer_text_lost") for i in sub.rubric_alignment):
            continue  # the source lost these answers: the .md holds a placeholder instead
        text = read_markdown(md_path)
        rubric = sub.rubric()
        sections = split_sections(text, rubric)
        assert sections is not None, md_path.name
        assert [squash(s) for s in sections] == [squash(i.answer) for i in sub.rubric_alignment], md_path.name
        assert render_submission_markdown(sub) == normalize_submission(text, rubric), md_path.name
        checked += 1
    assert checked == 333  # 336 minus the 3 files with lost answers


def test_render_style_matches_the_mohler_files(mohler_dir: Path) -> None:
    sub, md_path = mohler_pairs(mohler_dir)[0]
    rendered = render_submission_markdown(sub)
    assert rendered.startswith(f"## Question 1.1: {sub.rubric_alignment[0].question}\n\n{sub.rubric_alignment[0].answer}\n\n")
    body = read_markdown(md_path).split("\n", 2)[2]  # the file's title line is not part of the hand-in
    assert rendered.rstrip() == body.rstrip()
    assert "score" not in rendered.lower() and sub.rubric_alignment[0].reference_answer not in rendered


def make_rubric(*questions: str, ids: list[str] | None = None) -> Rubric:
    return Rubric(questions=[{"question": q, "max_score": 2, "question_id": (ids[k] if ids else None)}
                             for k, q in enumerate(questions)])


def test_render_without_question_ids_numbers_the_questions() -> None:
    sub = GradedSubmission(score=1, max_score=4, rubric_alignment=[
        {"question": "What is a stack?", "answer": "LIFO.", "score": 1, "max_score": 2},
        {"question": "Multi\nline  question", "answer": "#1 answer\n\nsecond line", "score": 0, "max_score": 2}])
    text = render_submission_markdown(sub)
    assert text == ("## Question 1: What is a stack?\n\nLIFO.\n\n"
                    "## Question 2: Multi line question\n\n\\#1 answer\n\nsecond line\n\n")
    # the escaped '#' line is not a heading and comes back unescaped
    assert split_sections(text, sub.rubric()) == ["LIFO.", "#1 answer\n\nsecond line"]


def test_headings_match_by_id_number_or_text_in_any_order() -> None:
    rubric = make_rubric("What is a variable?", "Where do C++ programs begin to execute?", "Explain recursion.",
                         ids=["a", "b", "c"])
    text = """# Homework 3 - Ana

Some preamble that is not an answer.

### Q3) explain RECURSION
It calls itself.

**Question 1**
A named place in memory.

## where do c++ programs begin to execute
At main.
"""
    assert split_sections(text, rubric) == ["A named place in memory.", "At main.", "It calls itself."]
    assert normalize_submission(text, rubric) == (
        "## Question a: What is a variable?\n\nA named place in memory.\n\n"
        "## Question b: Where do C++ programs begin to execute?\n\nAt main.\n\n"
        "## Question c: Explain recursion.\n\nIt calls itself.\n\n")
    # by question id
    by_id = "## b\nmain\n## c: anything\nrec\n## Question a\nbox"
    assert split_sections(by_id, rubric) == ["box", "main", "rec"]


def test_text_without_matching_headings_stays_whole() -> None:
    rubric = make_rubric("What is a variable?", "Explain recursion.")
    essay = "  # My essay\n\n## 1. Introduction\nVariables are...\n\n## 2. Method\nRecursion is...\n"
    assert split_sections(essay, rubric) is None
    assert normalize_submission(essay, rubric) == essay.strip()
    only_one = "## Question 1: What is a variable?\nA box.\n"
    assert split_sections(only_one, rubric) is None
    assert split_sections("", rubric) is None and normalize_submission("", rubric) == ""


def test_headings_inside_code_blocks_are_not_section_breaks() -> None:
    rubric = make_rubric("Write hello world in Python.", "What does # do in Python?")
    text = ("## Question 1: Write hello world in Python.\n\n```python\n# Question 2\nprint('hi')\n```\n\n"
            "## Question 2: What does # do in Python?\n\nStarts a comment.\n")
    assert split_sections(text, rubric) == ["```python\n# Question 2\nprint('hi')\n```", "Starts a comment."]


def test_our_sample_markdown_submissions_match_their_rubrics() -> None:
    rubrics = {p.stem: load_rubric(p) for p in (DATA / "rubrics").glob("*.json")}
    files = sorted((DATA / "submissions").glob("*.md"))
    assert len(files) >= 10
    for path in files:
        (rubric,) = [r for stem, r in rubrics.items() if path.stem.startswith(stem)]
        text = read_markdown(path)
        sections = split_sections(text, rubric)
        if "freeform" in path.stem:
            assert sections is None and normalize_submission(text, rubric) == text.strip()
        else:
            assert sections is not None and len(sections) == len(rubric.questions), path.name
            assert normalize_submission(text, rubric).startswith("## Question "), path.name


def test_read_markdown_encodings_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "sub.md"
    path.write_bytes(b"\xef\xbb\xbf## Question 1: Q?\r\n\r\nAnswer \xc3\xa9\r\n")
    assert read_markdown(path) == "## Question 1: Q?\n\nAnswer \u00e9\n"
    for name, data, needle in (
        ("bin.md", b"\x89PNG\x00\x00", "binary"),
        ("latin.md", "line one\ncaf\u00e9".encode("latin-1"), "line 2, column 4"),
        ("utf16.md", "hello".encode("utf-16"), "UTF-16"),
    ):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError) as exc:
            read_markdown(tmp_path / name)
        assert str(exc.value).startswith(str(tmp_path / name)) and needle in str(exc.value)
    (tmp_path / "big.md").write_text("x" * 200, encoding="utf-8")
    with pytest.raises(DataError, match="200 bytes"):
        read_markdown(tmp_path / "big.md", max_bytes=100)
    with pytest.raises(DataError, match="missing.md"):
        read_markdown(tmp_path / "missing.md")
    with pytest.raises(DataError, match="upload.md"):
        decode_markdown("upload.md", b"\x00")
