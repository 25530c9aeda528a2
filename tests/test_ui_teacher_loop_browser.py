"""The teacher's loop as a teacher meets it (#27), clicked in a real browser (Debian's Chromium via
Playwright, as in tests/test_ui_browser.py) against a real `python app.py`: the Data tab's advice
names the page's own fields, in row order; the encoding is detected; a sheet without answers is
refused; each submission graded in the Grade tab keeps its identity into the gradebook.

Grading uses the embedded tiny GPT-OSS base (random weights: the scores mean nothing, the
identities and the page are the point)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from data.store import Store
from tests.test_spreadsheet import _write_xlsx
from tests.test_ui_browser import browser, new_page, open_tab, shot, text_of, wait_text  # noqa: F401  (browser: a fixture)
from tests.test_ui_client import DATA, app_server
# A studio on this module's `work` folder and a fresh page of it per test (fixtures).
from tests.test_ui_review_browser import page, server  # noqa: F401

HEADER = ["Student", "Question", "Desired answer", "Student answer", "Score me", "Score other"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui_teacher_loop")


def upload(pg, *paths: Path) -> None:
    pg.locator("#data-files input[type=file]").set_input_files([str(p) for p in paths])


def problem_rows(pg) -> list[str]:
    """The problems table's rows as the page shows them, top to bottom."""
    table = pg.locator("#data-problems [role=row][data-index]")
    return [table.nth(k).inner_text() for k in range(table.count())]


def test_a_sheet_without_answers_is_refused_and_nothing_is_stored(page, tmp_path: Path, work: Path) -> None:
    """#27 item 3: scores without the answers they were given for cannot train a grader."""
    sheet = tmp_path / "scores-only.csv"
    sheet.write_text("student,question,score,max_score\nann,Why?,3,5\nbob,Why?,4,5\n", encoding="utf-8")
    upload(page, sheet)
    summary = wait_text(page, "#data-summary", r"errors")
    assert "scores-only.csv" in summary and "ready to store" not in summary
    problems = wait_text(page, "#data-problems", r"no answer column mapped")
    assert 'the "Answer" column' in problems, problems
    page.locator("#data-name textarea, #data-name input").first.fill("scores-only")
    page.locator("#data-save").click()
    wait_text(page, "#data-save-msg", r"Nothing stored")
    assert Store(work / "studio.db").list_datasets() == []


def test_advice_names_the_pages_fields_and_problems_come_in_row_order(page, tmp_path: Path,
                                                                      artifacts_dir: Path) -> None:
    """#27 item 4: no maximum anywhere -> the message names the page's max-score field (not a CLI
    flag) and does not send the user back to their file; with it, the row errors in row order."""
    sheet = _write_xlsx(tmp_path / "class.xlsx", [
        HEADER,
        ["ann", "What is a stack?", "a LIFO list", "last in first out", 5, 4],
        ["bob", "What is a stack?", "a LIFO list", "a queue", 7, 2],  # row 3: above the maximum
        ["bob", "What is a queue?", "a FIFO list", "first in first out", "five", 5],  # row 4: not a number
    ])
    upload(page, sheet)
    summary = wait_text(page, "#data-summary", r"errors")
    problems = wait_text(page, "#data-problems", r"no maximum score")
    assert 'the "Max score (where no column or row says it)" field' in problems, problems
    assert "--max-score" not in problems and "--map" not in problems
    assert "upload again" not in summary and "a setting here fixes" in summary, summary
    shot(page, artifacts_dir, "data_setting_advice")

    page.locator("#data-map-default-max input").fill("5")
    page.locator("#data-map-apply").click()
    wait_text(page, "#data-problems", r"five")
    rows = problem_rows(page)
    assert [r.split()[0] for r in rows] == ["class.xlsx"] * 2, rows
    assert "row 3" in rows[0] and "row 4" in rows[1], rows
    assert "upload again" in text_of(page, "#data-summary")  # a cell to fix: that is in the file


def test_a_csv_saved_by_excel_on_windows_reads_without_naming_an_encoding(page, tmp_path: Path) -> None:
    """#27 item 4: the encoding is detected (and said), where the page has no --encoding flag."""
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("student,question,answer,score,max_score\nann,Why?,ok,3,5\nbob,Why?,caf\u00e9 au lait,4,5\n"
                      .encode("cp1252"))
    upload(page, latin)
    summary = wait_text(page, "#data-summary", r"All files valid|errors")
    assert "All files valid" in summary, (summary, text_of(page, "#data-problems"))
    problems = text_of(page, "#data-problems")
    assert "read as cp1252 (detected)" in problems and "--encoding" not in problems, problems
    wait_text(page, "#data-preview", "caf\u00e9 au lait")


def pick(pg, selector: str, option: str) -> None:
    """Choose ``option`` in the dropdown ``selector`` as a user does."""
    pg.locator(f"{selector} input").click()
    pg.get_by_role("option", name=option).click()


def upload_file(pg, selector: str, path: Path) -> None:
    """Upload into a file box, clearing the file it shows first (as a user clicks its x)."""
    clear = pg.locator(f"{selector} button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
    pg.locator(f"{selector} input[type=file]").set_input_files(str(path))


def stored_names(work: Path) -> list[str]:
    return [g["submission_name"] for g in sorted(Store(work / "studio.db").grades(limit=-1), key=lambda g: g["id"])]


def wait_graded(pg, work: Path, n: int) -> list[str]:
    """Wait until the store holds ``n`` grades; their submission names, oldest first."""
    for _ in range(300):
        names = stored_names(work)
        if len(names) >= n:
            return names
        pg.wait_for_timeout(500)
    raise AssertionError(f"{n} grades never stored; store has {stored_names(work)}")


def test_each_graded_submission_keeps_its_identity_in_the_gradebook(page, work: Path, tmp_path: Path,
                                                                     artifacts_dir: Path) -> None:
    """#27 item 1: two uploaded files of two assignments and a pasted text are three rows of the
    gradebook, named by the file or by the student the page asks for (they were all `pasted.md`,
    in one row)."""
    from openpyxl import load_workbook

    open_tab(page, "Grade")
    pick(page, "#grade-adapter", "(none: base model only)")
    pick(page, "#grade-base", "embedded:tiny-gpt-oss")
    before = len(stored_names(work))
    student = page.locator("#grade-student textarea, #grade-student input").first
    for k, (assignment, md) in enumerate([("algebra-linear", "algebra-linear-chloe.md"),
                                          ("bio-photosynthesis", "bio-photosynthesis-lena.md")], start=1):
        pick(page, "#grade-rubric", f"{assignment}.json")
        upload_file(page, "#grade-md-file", DATA / "submissions" / md)
        page.wait_for_function("(name) => { const e = document.querySelector('#grade-student textarea, "
                               "#grade-student input'); return e && e.value == name; }", arg=md)
        page.locator("#grade-run").click()
        assert wait_graded(page, work, before + k)[-1] == md

    # Pasted text has no name: the page asks for one and grades nothing until it has it.
    pick(page, "#grade-rubric", "algebra-linear.json")
    page.locator("#grade-md textarea").fill((DATA / "submissions" / "algebra-linear-noah.md").read_text())
    student.fill("")
    page.locator("#grade-run").click()
    page.get_by_text("Whose submission is this?").first.wait_for()
    assert len(stored_names(work)) == before + 2
    student.fill("Noah R.")
    page.locator("#grade-run").click()
    assert wait_graded(page, work, before + 3)[-1] == "Noah R."
    shot(page, artifacts_dir, "grade_identity")

    # The gradebook: one row per submission, none merged.
    page.get_by_role("tab", name="Gradebook").click()
    page.locator("#grade-book-export").click()
    wait_text(page, "#grade-book-msg", r"submissions x")
    with page.expect_download() as download:
        page.locator("#grade-book-file a").first.click()
    path = tmp_path / "gradebook.xlsx"
    download.value.save_as(path)
    rows = list(load_workbook(path).active.iter_rows(values_only=True))
    header, body = rows[0], rows[2:]
    assert {r[0] for r in body} >= {"algebra-linear-chloe.md", "bio-photosynthesis-lena.md", "Noah R."}, body
    assert not any(str(r[0]).startswith("pasted") for r in body)
    graded_by = header.index("graded_by")
    assert all(r[graded_by] == "embedded:tiny-gpt-oss (no adapter)" for r in body)


def header_fits(pg, table: str, column: str) -> bool:
    """Whether the table's header cell ``column`` lies inside the table's box (not scrolled off)."""
    box = pg.locator(table).bounding_box()
    cell = pg.locator(f"{table} th").filter(has_text=column).first.bounding_box()
    return cell is not None and cell["x"] >= box["x"] - 1 and cell["x"] + cell["width"] <= box["x"] + box["width"] + 1


def test_the_grade_shows_what_needs_review_why_and_which_rubric_graded(page, tmp_path: Path,
                                                                     artifacts_dir: Path) -> None:
    """#27 item 5: the review and justification columns are on screen, the total says how many
    questions need review, item grading's empty justification is explained (with the reference
    answer), and an uploaded rubric is the one the page shows as in use."""
    from app.grade_tab import ITEM_GRADING_NOTE

    open_tab(page, "Grade")
    pick(page, "#grade-adapter", "(none: base model only)")
    pick(page, "#grade-base", "embedded:tiny-gpt-oss")
    rubric = tmp_path / "stacks-rubric.json"
    rubric.write_text(json.dumps({"title": "Stacks", "questions": [
        {"question_id": "1", "question": "What is a stack?", "max_score": 5,
         "reference_answer": "A last-in first-out list."},
        {"question_id": "2", "question": "Name its two operations", "max_score": 2}]}))
    upload_file(page, "#grade-rubric-file", rubric)
    wait_text(page, "#grade-rubric-view", r"Stacks \(uploaded: stacks-rubric\.json\)")
    assert page.locator("#grade-rubric input").input_value() == ""  # the list shows no other rubric
    page.locator("#grade-md textarea").fill("## Question 1: What is a stack?\n\nA pile: last in, first out.\n\n"
                                            "## Question 2: Name its two operations\n\npush and pop\n")
    page.locator("#grade-student textarea, #grade-student input").first.fill("ann")
    page.locator("#grade-run").click()
    total = wait_text(page, "#grade-base-total", r"Base: [\d.]+ / 7\b.*review", timeout_s=300)
    table = "#grade-base-table"
    assert header_fits(page, table, "review") and header_fits(page, table, "justification")
    cells = [[page.locator(f'{table} [data-testid="cell-{r}-{c}"]').inner_text().strip() for c in (3, 5)]
             for r in range(2)]
    n_review = sum(review == "needs review" for review, _ in cells)
    assert (f"{n_review} of 2 questions need review" in total if n_review else "no question needs review" in total)
    assert cells[0][1] == f"{ITEM_GRADING_NOTE}; reference answer: A last-in first-out list."
    assert cells[1][1] == ITEM_GRADING_NOTE
    shot(page, artifacts_dir, "grade_review_columns")


def test_an_adapter_that_cannot_grade_is_said_so_in_the_grade_and_runs_tabs(page, work: Path,
                                                                          artifacts_dir: Path) -> None:
    """#27 item 8: the default CPU run's adapter (validation QWK 0.015) is not offered like any
    other grader: both tabs say its agreement is near zero and what would train a useful one."""
    from tests.test_run_folder import finished_cpu_run

    run = finished_cpu_run(work / "checkpoints", Store(work / "studio.db"), 0.015)
    open_tab(page, "Grade")
    page.locator("#grade-refresh").click()
    page.wait_for_timeout(800)
    pick(page, "#grade-adapter", f"{run.run_id}/final")
    note = wait_text(page, "#grade-adapter-note", r"cannot grade yet")
    assert "near zero (QWK 0.015" in note and "a GPU" in note, note
    shot(page, artifacts_dir, "grade_weak_adapter")
    pick(page, "#grade-adapter", "(none: base model only)")  # the other tests grade with the base
    wait_text(page, "#grade-adapter-note", r"^$")

    open_tab(page, "Runs")
    wait_text(page, "#runs-table", run.run_id + r".*0\.015")
    pick(page, "#runs-one", run.run_id)
    details = wait_text(page, "#runs-details", r"cannot grade yet")
    assert "near zero (QWK 0.015" in details and "max_steps=none" in details, details


# Every text the page's progress displays show, recorded as they change (a phase can last less
# than a poll interval).
RECORD_PROGRESS = """() => {
  window.__progress = [];
  const seen = new Set();
  const look = () => document.querySelectorAll('.progress-level-inner, .progress-text, .meta-text-center, '
                                               + '.meta-text, #train-progress-box').forEach(e => {
    const t = e.innerText.trim();
    if (t && !seen.has(t)) { seen.add(t); window.__progress.push(t); }
  });
  new MutationObserver(look).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def progress_seen(pg) -> str:
    return "\n".join(pg.evaluate("() => window.__progress"))


def test_long_waits_in_the_grade_tab_say_what_is_happening(browser, tmp_path: Path) -> None:  # noqa: F811
    """#27 item 6: the first grade loads the model (converting it, the first time), a batch grades
    file after file: the page says which, instead of a bare spinner. A server of its own, so the
    model is loaded by this test."""
    with app_server(tmp_path / "app") as url:
        pg = new_page(browser, url, "Grade")
        try:
            open_tab(pg, "Grade")
            pg.evaluate(RECORD_PROGRESS)
            pick(pg, "#grade-base", "embedded:tiny-gpt-oss")
            pick(pg, "#grade-rubric", "algebra-linear.json")
            upload_file(pg, "#grade-md-file", DATA / "submissions" / "algebra-linear-chloe.md")
            pg.wait_for_function("() => document.querySelector('#grade-student textarea, #grade-student input')"
                                 ".value.length > 0")
            pg.locator("#grade-run").click()
            wait_text(pg, "#grade-base-total", r"Base: [\d.]+ / 15", timeout_s=300)
            seen = progress_seen(pg)
            assert "loading model embedded:tiny-gpt-oss" in seen, seen
            assert "grading 4 questions with the base model" in seen, seen

            pg.get_by_role("tab", name="Many submissions").click()
            files = sorted((DATA / "submissions").glob("*.md"))[:5]
            pg.locator("#grade-batch-files input[type=file]").set_input_files([str(f) for f in files])
            pg.wait_for_timeout(1000)
            pg.locator("#grade-batch-run").click()
            wait_text(pg, "#grade-batch-table", files[-1].name, timeout_s=300)
            seen = progress_seen(pg)
            assert "grading 5 submissions" in seen or "of 5 submissions" in seen, seen
        finally:
            pg.close()


def test_a_starting_run_shows_its_phase_not_a_bare_step_zero(page, work: Path) -> None:
    """#27 item 6: before its first step a run loads (converts) its model, starts DeepSpeed,
    compiles: the Train tab says which and for how long, not "step 0 / ? - ETA -"."""
    from data.run_folder import RunFolder
    from data.model_zoo import load_phase
    from training.config import save_config
    from training.presets import preset

    store = Store(work / "studio.db")
    run_id = "cpu-default-20261207-140000"
    folder = RunFolder(work / "checkpoints" / run_id)
    folder.path.mkdir(parents=True)
    save_config(preset("cpu-default"), folder.config)
    store.create_run(run_id, preset("cpu-default").model_dump(), ["deepspeed"], str(folder.path))
    store.set_run_status(run_id, "running")
    folder.note_phase("starting the trainer processes (DeepSpeed's launcher)")
    folder.note_phase(load_phase("embedded:gemma-3-270m"))
    try:
        page.reload()  # the page reads the runs when it loads: a live one is what it shows
        page.get_by_role("tab", name="Train").wait_for()
        open_tab(page, "Train")
        bar = wait_text(page, "#train-progress-box", r"loading model|converting")
        assert re.search(r"step 0 / \? - (loading model|converting) embedded:gemma-3-270m.* \(0m\d\ds\)", bar), bar
        assert "ETA" not in bar
    finally:
        store.set_run_status(run_id, "failed", error="a test's stand-in run")
