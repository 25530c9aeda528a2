"""The studio clicked in a real browser: Debian's Chromium (apt `chromium`) driven by Playwright
(never `playwright install`), headless, against a real `python app.py` server.

One server per module. Screenshots of every tab are saved under tests/artifacts/.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.test_ui_client import (DATA, TRAIN_ASSIGNMENT, TRAIN_TIMEOUT_S, app_server, kill_runs,
                                  ui_run_config)

CHROMIUM = "/usr/bin/chromium"
# Flags measured to work for Debian's Chromium headless in a container (FACTS.md).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("ui_browser")
    with app_server(work) as url:
        yield url
    kill_runs(work / "checkpoints")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "install Debian's chromium: apt-get install -y chromium"
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000})
        yield ctx
        ctx.close()


def new_page(browser, url: str, tab: str = "Data"):
    """A page of the studio at ``url``, loaded (its tab ``tab`` there), as the tests drive it."""
    pg = browser.new_page()
    pg.set_default_timeout(60_000)
    pg.goto(url)
    pg.get_by_role("tab", name=tab).wait_for()
    return pg


@pytest.fixture
def page(browser, server):
    pg = new_page(browser, server)
    yield pg
    pg.close()


def open_tab(pg, name: str) -> None:
    pg.get_by_role("tab", name=name).click()
    pg.wait_for_timeout(800)


def text_of(pg, selector: str) -> str:
    return pg.locator(selector).inner_text()


def wait_text(pg, selector: str, pattern: str, timeout_s: float = 60) -> str:
    """Wait until the element's text matches `pattern` (regex); returns the text. Looks 4 times a
    second: a match is seen within 0.25 s of the page showing it."""
    rx = re.compile(pattern, re.S)
    deadline = time.monotonic() + timeout_s
    while True:
        txt = pg.locator(selector).inner_text() if pg.locator(selector).count() else ""
        if rx.search(txt):
            return txt
        if time.monotonic() >= deadline:
            raise AssertionError(f"{selector} never matched {pattern!r}; text: {txt[-1500:]!r}")
        pg.wait_for_timeout(250)


def shot(pg, artifacts_dir: Path, name: str) -> Path:
    path = artifacts_dir / f"ui_{name}.png"
    pg.screenshot(path=str(path), full_page=True)
    return path


def test_malformed_upload_shows_errors_in_the_page(page, tmp_path, artifacts_dir):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"score": 7, "max_score": 5, "rubric_alignment": '
                   '[{"question": "Q1", "answer": "a", "score": 7, "max_score": 5}]}]')
    not_json = tmp_path / "notes.jsonl"
    not_json.write_text('{"score": 1, "max_score": 2, "rubric_alignment": [\n')
    page.locator("#data-files input[type=file]").set_input_files([str(bad), str(not_json)])
    summary = wait_text(page, "#data-summary", r"Some files have errors")
    assert "broken.json" in summary and "notes.jsonl" in summary
    problems = wait_text(page, "#data-problems", r"broken\.json")
    assert "notes.jsonl" in problems
    assert re.search(r"\[0\]\.(rubric_alignment\[0\]\.)?score", problems), problems
    # Nothing partial: storing is refused and no dataset appears.
    page.locator("#data-name textarea, #data-name input").first.fill("broken-set")
    page.locator("#data-save").click()
    assert "Nothing stored" in wait_text(page, "#data-save-msg", r"Nothing stored")
    assert "broken-set" not in text_of(page, "#data-datasets")
    shot(page, artifacts_dir, "data_errors")


def test_browser_flow_upload_train_grade_with_screenshots(page, artifacts_dir, tmp_path):
    from training.config import save_config

    # Data: upload one sample assignment's graded files, store them as a dataset.
    files = [str(f) for f in sorted((DATA / "graded" / TRAIN_ASSIGNMENT).glob("*.json"))]
    page.locator("#data-files input[type=file]").set_input_files(files)
    wait_text(page, "#data-summary", r"All files valid", timeout_s=120)
    wait_text(page, "#data-stats", r"would be cut", timeout_s=120)
    page.locator("#data-plot .js-plotly-plot").wait_for()
    page.locator("#data-name textarea, #data-name input").first.fill("browser-samples")
    page.locator("#data-save").click()
    wait_text(page, "#data-save-msg", r"Stored dataset")
    wait_text(page, "#data-datasets", r"browser-samples")
    shot(page, artifacts_dir, "tab_data")

    # Configure: load a config file (the smoke preset cut to 2 steps, on the stored dataset).
    open_tab(page, "Configure")
    cfg_file = tmp_path / "ui_run.json"
    save_config(ui_run_config("browser-samples"), cfg_file)
    page.locator("#cfg-load input[type=file]").set_input_files(str(cfg_file))
    wait_text(page, "#cfg-datasets", r"db:browser-samples")
    page.wait_for_function(
        "() => document.querySelector('#cfg-max_steps textarea, #cfg-max_steps input').value == '2'")
    wait_text(page, "#cfg-messages", r"Config is valid")
    assert "ranks: 1 on localhost (CPU, gloo)" in wait_text(page, "#cfg-command", r"deepspeed\.launcher\.launch")
    wait_text(page, "#cfg-memory", r"GiB")
    shot(page, artifacts_dir, "tab_configure")

    # Train: launch, loss points appear, the run finishes with a checkpoint.
    open_tab(page, "Train")
    page.locator("#train-launch").click()
    wait_text(page, "#train-message", r"Launched run")
    # A second launch while it runs is refused. Clicked at once, while the run still loads its
    # model: a fast machine can finish two steps before the first loss point is even drawn.
    page.locator("#train-launch").click()
    wait_text(page, "#train-message", r"Refused")
    wait_text(page, "#train-status", r"\bloss \d", timeout_s=TRAIN_TIMEOUT_S)
    page.locator("#train-plot .js-plotly-plot").wait_for()
    status = wait_text(page, "#train-status", r"finished|failed", timeout_s=TRAIN_TIMEOUT_S)
    assert "finished" in status, (status, page.locator("#train-log textarea").input_value())
    assert "checkpoints:" in wait_text(page, "#train-status", r"checkpoints:")
    page.wait_for_timeout(2500)  # one more timer tick draws the last points
    shot(page, artifacts_dir, "tab_train")
    run_id = re.search(r"Run (\S+):", status).group(1).strip("`")

    # Grade: the run's final adapter, the first sample rubric, a sample Markdown file.
    open_tab(page, "Grade")
    page.locator("#grade-refresh").click()
    page.wait_for_timeout(1000)
    page.locator("#grade-adapter input").click()
    page.get_by_role("option", name=f"{run_id}/final").click()
    rubric = DATA / "rubrics" / f"{TRAIN_ASSIGNMENT}.json"
    page.locator("#grade-rubric input").click()
    page.get_by_role("option", name=rubric.name).click()
    wait_text(page, "#grade-rubric-view", r"questions")
    md = next((DATA / "submissions").glob(f"{TRAIN_ASSIGNMENT}-*.md"))
    page.locator("#grade-md-file input[type=file]").set_input_files(str(md))
    page.wait_for_function(
        "() => document.querySelector('#grade-md textarea').value.length > 20")
    page.locator("#grade-max-new input").fill("24")
    page.locator("#grade-compare input").check()
    page.locator("#grade-run").click()
    total = wait_text(page, "#grade-tuned-total", r"Tuned: [\d.]+ / [\d.]+", timeout_s=300)
    assert "Tuned" in total
    wait_text(page, "#grade-base-total", r"Base: [\d.]+ / [\d.]+", timeout_s=300)
    assert page.locator("#grade-tuned-raw textarea").input_value()  # the streamed output
    table = text_of(page, "#grade-tuned-table")
    assert "justification" in table
    shot(page, artifacts_dir, "tab_grade")

    # Runs: the run is in the history with its final loss and curve.
    open_tab(page, "Runs")
    wait_text(page, "#runs-table", re.escape(run_id))
    page.locator("#runs-plot .js-plotly-plot").wait_for()
    shot(page, artifacts_dir, "tab_runs")

    # A reload shows the run again (nothing lives only in the page).
    page.reload()
    open_tab(page, "Train")
    wait_text(page, "#train-status", re.escape(run_id) + r".*finished")
