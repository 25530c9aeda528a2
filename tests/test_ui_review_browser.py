"""The teacher's review loop clicked in a real browser (Debian's Chromium via Playwright, as in
tests/test_ui_browser.py) against a real `python app.py`: the queue shows the least sure questions
first; a score outside 0..max is refused and stores nothing; a corrected score and justification
are stored with the teacher's name beside what the model said, a second correction adds a row; the
corrections become a dataset that the Configure tab offers; the Runs tab shows the agreement.

The grades to review are made before the server starts, with the embedded tiny GPT-OSS base
(item-level grading, so each question has a confidence), and stored the way the Grade tab stores them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest

from data.store import Store
from tests.test_ui_browser import browser, new_page, open_tab, shot, wait_text  # noqa: F401  (browser: a fixture)
from tests.test_ui_client import DATA, app_server

RUBRIC = DATA / "rubrics" / "algebra-linear.json"
SUBMISSIONS = [DATA / "submissions" / "algebra-linear-chloe.md", DATA / "submissions" / "algebra-linear-noah.md"]
COLUMNS = {"grade": 0, "item": 1, "model score": 3, "max": 4, "confidence": 5, "teacher score": 6,
           "teacher justification": 7, "corrected by": 11}


def grade_samples(db: Path) -> list[int]:
    """Grade the sample submissions with the tiny GPT-OSS base and store them (with their text)."""
    from data.loading import load_rubric
    from data.markdown import read_markdown
    from inference.engine import get_engine
    from inference.results import store_grade

    rubric = load_rubric(RUBRIC)
    engine = get_engine("embedded:tiny-gpt-oss", device="cpu")
    ids = []
    for path in SUBMISSIONS:
        md = read_markdown(path)
        ids.append(store_grade(engine.grade(md, rubric), rubric, path.name, store=Store(db), submission_md=md))
    return ids


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ui_review")
    grade_samples(folder / "studio.db")
    return folder


@pytest.fixture(scope="module")
def server(work: Path) -> Iterator[str]:
    with app_server(work) as url:
        yield url


@pytest.fixture
def page(browser, server):  # noqa: F811
    pg = new_page(browser, server, "Review")
    yield pg
    pg.close()


def cell(pg, row: int, column: str):
    return pg.locator(f'#review-table [data-testid="cell-{row}-{COLUMNS[column]}"]')


def rows(pg) -> list[dict[str, str]]:
    """The review table as the page shows it, one dict per row."""
    out = []
    n = pg.locator("#review-table [role=row][data-index]").count()
    for r in range(n):
        out.append({name: cell(pg, r, name).inner_text().replace("⋮", "").strip() for name in COLUMNS})
    return out


def edit(pg, row: int, column: str, text: str) -> None:
    """Type into a cell the way a user does: double-click, type, Enter."""
    cell(pg, row, column).dblclick()
    box = pg.locator('#review-table textarea[aria-label="Edit cell"]')
    box.wait_for()
    box.fill(text)
    pg.keyboard.press("Enter")
    pg.wait_for_timeout(300)


def test_correct_a_score_see_it_stored_and_offered_as_training_data(page, work: Path, artifacts_dir: Path) -> None:
    store = Store(work / "studio.db")
    open_tab(page, "Review")
    wait_text(page, "#review-table", r"Solve 3\(x - 4\)")
    shown = rows(page)
    assert len(shown) == 8  # 2 submissions x 4 questions
    conf = [float(r["confidence"]) for r in shown]
    assert conf == sorted(conf)  # the least sure first
    assert page.locator("#review-name input, #review-name textarea").first.input_value() == "teacher"
    grade_id, item = int(shown[0]["grade"]), int(shown[0]["item"])
    top = float(shown[0]["max"])
    model_score = float(shown[0]["model score"])

    # A score above the maximum is refused, naming the row; nothing is stored.
    edit(page, 0, "teacher score", str(int(top) + 5))
    page.locator("#review-save").click()
    msg = wait_text(page, "#review-message", r"Nothing stored")
    assert f"grade {grade_id}" in msg and f"outside 0..{top:g}" in msg
    assert store.corrections() == []

    # A valid score and justification, by a named teacher: stored beside what the model said.
    edit(page, 0, "teacher score", "2.5")
    edit(page, 0, "teacher justification", "right answer, one sign slip")
    page.locator("#review-name input, #review-name textarea").first.fill("Ms Rivera")
    page.locator("#review-save").click()
    wait_text(page, "#review-message", r"Stored 1 correction by Ms Rivera")
    (first,) = store.corrections()
    assert (first.grade_id, first.question_index, first.teacher_score, first.teacher_justification,
            first.corrected_by) == (grade_id, item - 1, 2.5, "right answer, one sign slip", "Ms Rivera")
    assert first.model_score == pytest.approx(model_score, abs=0.01)
    row = next(r for r in rows(page) if (int(r["grade"]), int(r["item"])) == (grade_id, item))
    assert (row["teacher score"], row["corrected by"]) == ("2.5", "Ms Rivera")

    # Correcting it again adds a row; the newest one is what the table shows.
    r = next(k for k, x in enumerate(rows(page)) if (int(x["grade"]), int(x["item"])) == (grade_id, item))
    edit(page, r, "teacher score", "2")
    page.locator("#review-save").click()
    wait_text(page, "#review-message", r"model [\d.]+ -> teacher 2 /")
    assert [c.teacher_score for c in store.corrections()] == [2.5, 2.0]
    row = next(x for x in rows(page) if (int(x["grade"]), int(x["item"])) == (grade_id, item))
    assert row["teacher score"] == "2"
    # Clicking the row shows the student's answer to that question.
    cell(page, r, "grade").click()
    wait_text(page, "#review-answer", r"Student's answer")
    shot(page, artifacts_dir, "tab_review")

    # The corrections become a dataset...
    page.locator("#review-dataset-name input, #review-dataset-name textarea").first.fill("review-fixes")
    page.locator("#review-make-dataset").click()
    wait_text(page, "#review-dataset-msg", r"Stored dataset `?db:review-fixes`?: 1 submissions from 1 corrections")
    info = store.find_dataset("review-fixes")
    assert info["correction_ids"] == [store.corrections()[-1].id]
    (sub,) = store.dataset_submissions(info["id"])
    assert [(i.score, i.max_score) for i in sub.rubric_alignment] == [(2.0, top)]

    # ... that the Configure tab offers for a run.
    open_tab(page, "Configure")
    page.locator("#cfg-datasets input").click()
    page.get_by_role("option", name="db:review-fixes").wait_for()
    page.keyboard.press("Escape")

    # The Runs tab: the base model's agreement with the teacher, its confusion plot and trend.
    open_tab(page, "Runs")
    table = wait_text(page, "#runs-agreement", r"embedded:tiny-gpt-oss \(base\)\s+1\s")
    assert "qwk" in table and f"{abs(model_score - 2):.3f}" in table  # MAE of the one corrected answer
    wait_text(page, "#runs-agreement-questions", re.escape(f"{item}: Solve 3(x - 4)"))
    page.locator("#runs-confusion .js-plotly-plot").wait_for()
    page.locator("#runs-trend .js-plotly-plot").wait_for()
    shot(page, artifacts_dir, "tab_runs_agreement")


def test_the_login_names_who_corrects(browser, work: Path) -> None:  # noqa: F811
    with app_server(work / "auth", "--auth", "rivera:s3cret-pass") as url:
        pg = browser.new_page()
        try:
            pg.set_default_timeout(60_000)
            pg.goto(url)
            pg.get_by_label("username").fill("rivera")
            pg.get_by_label("password").fill("s3cret-pass")
            pg.get_by_role("button", name="Login").click()
            open_tab(pg, "Review")
            pg.wait_for_function("() => { const e = document.querySelector('#review-name input, #review-name textarea');"
                                 " return e && e.value == 'rivera'; }")
        finally:
            pg.close()
