"""Grade tab: pick a base model and an adapter (a checkpoint of a run), a rubric, paste or upload
Markdown; the answer streams in, then shows as a table (question, score, justification) with the
total. Base and tuned side by side; many .md files at once give a downloadable CSV.

Grading goes through `inference.engine` (the same engine as `python -m inference grade`).
"""
from __future__ import annotations

import functools
import math
import queue
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
import pandas as pd

from app import jobs
from app.common import Settings, checked_adapter, model_choices, rubric_choices, safe_display_name
from inference.repair import repair_messages

# What a teacher acts on first (the score, whether to check it) before the long texts; a width for
# every column, so none is pushed out of the half-page table.
GRADE_COLUMNS = ["question", "score", "max", "review", "confidence", "justification"]
GRADE_WIDTHS = ["26%", "11%", "9%", "13%", "13%", "28%"]
ITEM_GRADING_NOTE = "item grading scores without writing a justification"
BATCH_COLUMNS = ["file", "total", "max total", "repaired", "latency s"]
NO_ADAPTER = "(none: base model only)"
STUDENT_LABEL = "Student (name or id)"
PROGRESS_STEPS = 4  # how many times, at least, the bar moves while a batch of files is graded


def adapter_choices() -> list[tuple[str, str]]:
    """The base alone, then every complete adapter, the default one (the newest run's best/,
    else its final/, else its last checkpoint) first."""
    return [(NO_ADAPTER, "")] + jobs.list_adapters()


def gradebook_choices() -> list[tuple[str, str]]:
    """Whose grades a gradebook holds: all of them, or one adapter's (or a run's)."""
    return [("all grades (each submission's newest)", "")] + jobs.list_adapters()


def default_adapter(choices: list[tuple[str, str]]) -> str:
    """The adapter the tab starts on: the first listed (see adapter_choices), else none."""
    return choices[1][1] if len(choices) > 1 else ""


def adapter_warning(adapter: str | None) -> str:
    """What the page says above the grades about the adapter picked: that it cannot grade yet,
    when its validation agreement is near zero ("" otherwise)."""
    from training.adapter_quality import weak_agreement_note

    note = weak_agreement_note(adapter)
    return f"**This adapter cannot grade yet.** {note}" if note else ""


def base_of(adapter: str | None) -> str | None:
    if not adapter:
        return None
    from inference.adapters import base_model_of_adapter

    try:
        return base_model_of_adapter(adapter)
    except Exception:
        return None


def load_rubric_choice(rubric_path: str | None, rubric_file: str | None):
    """The rubric from an upload (read as bytes; its name only displayed) or from data/samples/rubrics."""
    from data.loading import load_rubric, parse_rubric_bytes

    if rubric_file:
        p = Path(rubric_file)
        return parse_rubric_bytes(safe_display_name(p.name), p.read_bytes())
    if rubric_path:
        allowed = {path for _, path in rubric_choices()}
        if rubric_path not in allowed:
            raise gr.Error("Pick a rubric from the list or upload one.")
        return load_rubric(rubric_path)
    raise gr.Error("Pick a rubric from the list or upload one.")


def rubric_markdown(rubric, uploaded: str | None = None) -> str:
    """The rubric that grading will use; ``uploaded``: the name of the file it came from."""
    source = f" (uploaded: `{uploaded}`)" if uploaded else ""
    lines = [f"**{rubric.title or 'Rubric'}**{source}: {len(rubric.questions)} questions, "
             f"max {rubric.max_score:g} points"]
    for k, q in enumerate(rubric.questions, 1):
        lines.append(f"{k}. {q.question} ({q.max_score:g} pts)")
    return "\n".join(lines)


def justification_cell(item, question, unit: str) -> str:
    """What the justification column says for one graded question: the model's justification;
    for item grading (which writes none) that it writes none, and the question's reference answer
    to compare with. ``question``: the rubric's question (None when the grade has more items)."""
    if item.justification:
        return item.justification
    if unit != "item":
        return ""
    reference = getattr(question, "reference_answer", None)
    return f"{ITEM_GRADING_NOTE}; reference answer: {reference}" if reference else ITEM_GRADING_NOTE


def grade_table(result, rubric=None) -> pd.DataFrame:
    """One row per question of ``result`` (graded against ``rubric``)."""
    if result is None:
        return pd.DataFrame(columns=GRADE_COLUMNS)
    items = result.grade.items
    conf = result.confidence or [None] * len(items)
    questions = list(rubric.questions) if rubric is not None and len(rubric.questions) == len(items) else \
        [None] * len(items)
    rows = [[i.question, i.score, i.max_score, "needs review" if r else "", "" if c is None else round(c, 2),
             justification_cell(i, q, result.unit)]
            for i, q, c, r in zip(items, questions, conf, result.needs_review)]
    return pd.DataFrame(rows, columns=GRADE_COLUMNS)


def review_count(result) -> str:
    """How many questions the model was unsure of, said with the total ("" where it gives no
    confidence: a whole grade written at once)."""
    if not result.confidence:
        return ""
    n, of = sum(result.needs_review), len(result.needs_review)
    limits = sorted(set(result.question_thresholds()))
    below = " or ".join(f"{t:.2g}" for t in limits)
    return (f"**{n} of {of} questions need review** (confidence below {below}: check them in the "
            "Review tab)" if n else f"no question needs review (all {of} confident)")


def total_markdown(result, who: str) -> str:
    if result is None:
        return ""
    g = result.grade
    note = f" (output repaired: {repair_messages(result.repairs)})" if result.repaired else ""
    how = (" - scores are the model's expected score (its probabilities for 0..max averaged)"
           if getattr(result, "scoring", "") == "expected" else "")
    fb = f"\n\n{g.feedback}" if g.feedback else ""
    review = review_count(result)
    review = f"\n\n{review}" if review else ""
    return f"**{who}: {g.score:g} / {g.max_score:g}** in {result.latency_s:.1f} s{how}{note}{review}{fb}"


def submission_identity(student: str | None) -> str:
    """The name a graded submission is stored under, which is its gradebook row: the *Student*
    field (an upload fills it with the file's name). Raises gr.Error when it is empty: a pasted
    text has no name of its own, and grades stored under one shared name read as one student."""
    name = " ".join((student or "").split())
    if not name:
        raise gr.Error(f"Whose submission is this? Type the student's name or id under \"{STUDENT_LABEL}\" "
                       "(it names the submission's row in the gradebook), or upload the .md file.")
    return name


def loaded_engine(base_model: str, progress):
    """The grading engine for ``base_model``, the page told meanwhile what loading it involves
    (on first use the embedded model is converted: the longest wait a new user meets)."""
    from data.model_zoo import load_phase
    from inference.engine import get_engine

    progress(0.0, desc=load_phase(base_model))
    return get_engine(base_model)


def page_batch_size(engine, n_files: int) -> int:
    """Batches for grading ``n_files`` in the page: the engine's, but small enough that the bar
    moves `PROGRESS_STEPS` times (a little throughput for a visible wait)."""
    return max(1, min(engine.default_batch_size(), math.ceil(n_files / PROGRESS_STEPS)))


def stream_grade(base: str, adapter: str | None, markdown: str, rubric, max_new_tokens: int,
                 name: str) -> Iterator[tuple[str, Any]]:
    """Yield ("token", text_so_far) while generating, then ("done", GradeResult).

    Every grade is recorded in the store (the Runs/grades history) under ``name`` (see
    `submission_identity`). The cached engine is shared by all sessions: each grade names its
    adapter, and the engine switches and grades under its lock."""
    from inference.engine import get_engine
    from inference.results import store_grade

    q: queue.Queue = queue.Queue()
    box: dict[str, Any] = {}

    def work():
        try:
            result = get_engine(base).grade(markdown, rubric, adapter=adapter or None,
                                            max_new_tokens=max_new_tokens, on_token=lambda t: q.put(t),
                                            anchors=jobs.store().anchor_bank())
            store_grade(result, rubric, name, submission_md=markdown)
            box["result"] = result
        except Exception as exc:  # shown to the user
            box["error"] = exc
        finally:
            q.put(None)

    threading.Thread(target=work, daemon=True).start()
    text = ""
    while True:
        tok = q.get()
        if tok is None:
            break
        text += tok
        yield "token", text
    if "error" in box:
        raise gr.Error(f"Grading failed: {type(box['error']).__name__}: {box['error']}")
    yield "done", box["result"]


# ------------------------------------------------------------------ handlers (wired in build)


def on_adapter(path):
    b = base_of(path)
    return (gr.update(value=b) if b else gr.update()), adapter_warning(path)

def on_refresh():
    return gr.update(choices=adapter_choices())

def on_open(current):
    """Opening the tab re-reads the adapters; with none picked (or the picked one gone) it
    shows the default one, so a run trained meanwhile is what the tab grades with."""
    choices = adapter_choices()
    if current and current in {path for _, path in choices}:
        return gr.update(choices=choices)
    return gr.update(choices=choices, value=default_adapter(choices))

def on_rubric(path, file):
    try:
        uploaded = safe_display_name(Path(file).name) if file else None
        return rubric_markdown(load_rubric_choice(path, file), uploaded)
    except gr.Error as exc:
        return str(exc)
    except Exception as exc:
        return f"Rubric problem: {exc}"

# One rubric is in use, and the page shows which: an upload clears the list's pick (the
# upload is what grades), picking from the list clears the upload.
def on_rubric_upload(file):
    return on_rubric(None, file), gr.update(value=None)

def on_rubric_pick(path):
    return on_rubric(path, None), gr.update(value=None)

def on_md_file(settings: Settings, file):
    """The uploaded file's text, and its name as the student (the submission's identity)."""
    from data.markdown import read_markdown

    if not file:
        return gr.update(), gr.update()
    try:
        text = read_markdown(file, max_bytes=settings.max_upload_bytes)
    except Exception as exc:
        raise gr.Error(str(exc))
    return text, safe_display_name(Path(file).name)


def do_grade(settings: Settings, base_model, adapter_path, rubric_path, rubric_upload, text, both, max_new_tokens,
             student="", progress=gr.Progress()):
    if not (text or "").strip():
        raise gr.Error("Paste a submission or upload a .md file.")
    rubric = load_rubric_choice(rubric_path, rubric_upload)
    adapter_dir = str(checked_adapter(adapter_path)) if adapter_path else None
    name = submission_identity(student)
    base_model = (base_of(adapter_dir) or base_model) if adapter_dir else base_model
    loaded_engine(base_model, progress)
    n = int(max_new_tokens or 512)
    runs = [("tuned", adapter_dir)] if adapter_dir else []
    if both or not adapter_dir:
        runs.append(("base", None))
    out = {"tuned": ["", None], "base": ["", None]}

    def view():
        return (*ResultPanel.values(*out["tuned"], rubric, "Tuned"), *ResultPanel.values(*out["base"], rubric, "Base"))

    for k, (who, adp) in enumerate(runs):
        progress(k / len(runs), desc=f"grading {len(rubric.questions)} questions with the {who} model")
        for kind, value in stream_grade(base_model, adp, text, rubric, n, name):
            if kind == "token":
                out[who][0] = value
            else:
                out[who] = [value.raw_text, value]
            yield view()


def do_batch(settings: Settings, base_model, adapter_path, rubric_path, rubric_upload, files, max_new_tokens,
             progress=gr.Progress()):
    from data.markdown import read_markdown
    from inference.gradebook import clashing_names
    from inference.grades_csv import write_grades_csv
    from inference.results import store_grade

    if not files:
        raise gr.Error("Upload one or more .md files.")
    rubric = load_rubric_choice(rubric_path, rubric_upload)
    adapter_dir = str(checked_adapter(adapter_path)) if adapter_path else None
    base_model = (base_of(adapter_dir) or base_model) if adapter_dir else base_model
    items = []
    for f in files:
        p = Path(f)
        items.append((safe_display_name(p.name),
                      read_markdown(p, max_bytes=settings.max_upload_bytes), rubric))
    clash = clashing_names((name, md) for name, md, _ in items)
    if clash:
        raise gr.Error(f"Different files share the name {', '.join(clash)}: rename them and upload again "
                       "(a file's name is its submission's row in the gradebook).")
    engine = loaded_engine(base_model, progress)
    done = [0]

    def graded_more(n: int) -> None:
        done[0] += n
        progress((done[0], len(items)), desc=f"graded {done[0]} of {len(items)} submissions", unit="submissions")

    progress((0, len(items)), desc=f"grading {len(items)} submissions", unit="submissions")
    # Batched across submissions (and, item by item, with each question's shared prefix computed once).
    results = engine.grade_many(items, adapter=adapter_dir, batch_size=page_batch_size(engine, len(items)),
                                max_new_tokens=int(max_new_tokens or 512), progress=graded_more,
                                anchors=jobs.store().anchor_bank())
    graded = [(name, res) for (name, _, _), res in zip(items, results)]
    rows = []
    for (name, md, _), res in zip(items, results):
        store_grade(res, rubric, name, submission_md=md)
        rows.append([name, res.grade.score, res.grade.max_score, res.repaired, round(res.latency_s, 2)])
    csv_path = write_grades_csv(Path(tempfile.mkdtemp(prefix="grader-batch-")) / "grades.csv", graded)
    return pd.DataFrame(rows, columns=BATCH_COLUMNS), str(csv_path)

def do_gradebook(adapter_filter, fmt):
    from inference.gradebook import export_gradebook

    out = Path(tempfile.mkdtemp(prefix="grader-gradebook-")) / f"gradebook.{fmt or 'xlsx'}"
    try:
        path, book = export_gradebook(out, adapter=adapter_filter or None)
    except ValueError as exc:
        return str(exc), None, gr.update(choices=gradebook_choices())
    return (f"{len(book.rows)} submissions x {len(book.columns)} questions", str(path),
            gr.update(choices=gradebook_choices()))


@dataclass(frozen=True)
class ResultPanel:
    """One grader's result on the page: the streamed model output, the total, the table."""

    raw: Any
    total: Any
    table: Any

    @classmethod
    def build(cls, title: str, key: str) -> "ResultPanel":
        with gr.Column():
            gr.Markdown(f"#### {title}")
            raw = gr.Textbox(label="Model output (streamed)", lines=6, elem_id=f"grade-{key}-raw")
            total = gr.Markdown(elem_id=f"grade-{key}-total")
            table = gr.Dataframe(headers=GRADE_COLUMNS, interactive=False, wrap=True, column_widths=GRADE_WIDTHS,
                                 elem_id=f"grade-{key}-table")
        return cls(raw, total, table)

    def components(self) -> list[Any]:
        return [self.raw, self.total, self.table]

    @staticmethod
    def values(text: str, result, rubric, who: str) -> list[Any]:
        """The panel's values for ``result`` (None: nothing yet) in :meth:`components` order."""
        return [text, total_markdown(result, who), grade_table(result, rubric)]


def build(settings: Settings) -> dict[str, Any]:
    with gr.Row():
        # Custom values are accepted here and checked server-side (inside the checkpoints folder,
        # safetensors only), so API clients can name a checkpoint directly.
        choices = adapter_choices()
        adapter = gr.Dropdown(choices, value=default_adapter(choices), label="Adapter (run checkpoint)",
                              allow_custom_value=True, elem_id="grade-adapter")
        base = gr.Dropdown(model_choices(), value=base_of(default_adapter(choices)) or "embedded:gemma-3-270m",
                           allow_custom_value=True, label="Base model", elem_id="grade-base")
        max_new = gr.Number(value=512, precision=0, label="max new tokens", elem_id="grade-max-new")
        refresh_btn = gr.Button("Refresh adapters", size="sm", elem_id="grade-refresh")
    adapter_note = gr.Markdown(adapter_warning(default_adapter(choices)), elem_id="grade-adapter-note")
    with gr.Row():
        rubrics = rubric_choices()
        rubric_pick = gr.Dropdown(rubrics, value=rubrics[0][1] if rubrics else None,
                                  label="Rubric (data/samples/rubrics)", elem_id="grade-rubric")
        rubric_file = gr.File(label="...or upload a rubric JSON", file_types=[".json", ".jsonl"],
                              height=110, elem_id="grade-rubric-file")
    rubric_view = gr.Markdown(elem_id="grade-rubric-view")
    with gr.Tab("One submission"):
        with gr.Row():
            md_text = gr.Textbox(label="Submission (Markdown)", lines=10, elem_id="grade-md")
            with gr.Column():
                md_file = gr.File(label="...or upload a .md file", file_types=[".md", ".txt"],
                                  height=110, elem_id="grade-md-file")
                # value="": API clients that leave it out get the page's own refusal, not a missing argument
                student = gr.Textbox("", label=STUDENT_LABEL, placeholder="an upload fills in its file name",
                                     elem_id="grade-student")
        with gr.Row():
            compare = gr.Checkbox(label="Also grade with the base model (side by side)",
                                  value=False, elem_id="grade-compare")
            grade_btn = gr.Button("Grade", variant="primary", elem_id="grade-run")
        with gr.Row():
            tuned = ResultPanel.build("Tuned (adapter)", "tuned")
            base_panel = ResultPanel.build("Base model", "base")
    with gr.Tab("Many submissions"):
        batch_files = gr.File(label="Markdown submissions (.md)", file_count="multiple",
                              file_types=[".md", ".txt"], elem_id="grade-batch-files")
        batch_btn = gr.Button("Grade all", variant="primary", elem_id="grade-batch-run")
        batch_table = gr.Dataframe(headers=BATCH_COLUMNS, interactive=False,
                                   elem_id="grade-batch-table")
        batch_csv = gr.File(label="Grades (CSV)", interactive=False, elem_id="grade-batch-csv")
    with gr.Tab("Gradebook"):
        gr.Markdown("Every stored grade as a gradebook: a row per submission (its newest grade), a column "
                    "per question, total and max, under a *Points possible* row. The same file as "
                    "`python -m inference export-grades`; it imports back in the Data tab.")
        with gr.Row():
            book_adapter = gr.Dropdown(gradebook_choices(), value="", label="Grades made by",
                                       elem_id="grade-book-adapter")
            book_format = gr.Radio(["xlsx", "csv"], value="xlsx", label="Format", elem_id="grade-book-format")
            book_btn = gr.Button("Export gradebook", elem_id="grade-book-export")
        book_msg = gr.Markdown(elem_id="grade-book-msg")
        book_file = gr.File(label="Gradebook", interactive=False, elem_id="grade-book-file")

    adapter.change(on_adapter, [adapter], [base, adapter_note])
    book_btn.click(do_gradebook, [book_adapter, book_format], [book_msg, book_file, book_adapter],
                   api_name="export_gradebook")
    refresh_btn.click(on_refresh, None, [adapter], api_name="refresh_adapters")
    rubric_pick.input(on_rubric_pick, [rubric_pick], [rubric_view, rubric_file])
    rubric_file.upload(on_rubric_upload, [rubric_file], [rubric_view, rubric_pick])
    rubric_file.clear(on_rubric, [rubric_pick, rubric_file], [rubric_view])
    md_file.upload(functools.partial(on_md_file, settings), [md_file], [md_text, student])
    grade_btn.click(functools.partial(do_grade, settings),
                    [base, adapter, rubric_pick, rubric_file, md_text, compare, max_new, student],
                    [*tuned.components(), *base_panel.components()],
                    api_name="grade", concurrency_limit=settings.max_jobs,
                    concurrency_id="grading")
    batch_btn.click(functools.partial(do_batch, settings), [base, adapter, rubric_pick, rubric_file, batch_files, max_new],
                    [batch_table, batch_csv], api_name="grade_batch",
                    concurrency_limit=settings.max_jobs, concurrency_id="grading")
    return {"refresh": (on_open, [adapter], [adapter]),
            "rubric_load": (on_rubric, [rubric_pick, rubric_file], [rubric_view])}
