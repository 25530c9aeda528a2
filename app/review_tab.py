"""Review tab: the teacher checks the grader. Stored grades are listed question by question, the
least sure first (or the newest, or one adapter's); the teacher types a score and justification
into the table and saves; each change is a new row of the store's `corrections` table beside what
the model said, who corrected it and when (nothing is overwritten). The corrections then become a
training dataset (`db:<name>`) for the Configure tab, and the Runs tab shows each adapter's
agreement with them. The same actions: `python -m training corrections-dataset`,
`python -m inference teacher-agreement`."""
from __future__ import annotations

import math
from typing import Any

import gradio as gr
import pandas as pd

from app import jobs
from app.common import Settings
from data.store import DEFAULT_CORRECTOR, GRADE_FIRST_K, REVIEW_ORDERS, CorrectionError, ReviewItem
from inference.teacher_agreement import adapter_label

# The teacher's columns come early, so they are on screen without scrolling sideways.
QUEUE_COLUMNS = ["grade", "item", "question", "model score", "max", "confidence", "teacher score",
                 "teacher justification", "model justification", "submission", "graded by", "corrected by"]
QUEUE_TYPES = ["number", "number", "str", "number", "number", "str", "str", "str", "str", "str", "str", "str"]
QUEUE_WIDTHS = ["72px", "64px", "300px", "96px", "56px", "100px", "110px", "260px", "220px", "180px", "200px", "120px"]
SHORT_QUESTION = 90  # characters of a question in the table; the full text shows when its row is clicked
TEACHER_SCORE, TEACHER_WHY = QUEUE_COLUMNS.index("teacher score"), QUEUE_COLUMNS.index("teacher justification")
HISTORY_COLUMNS = ["correction", "grade", "question", "model score", "teacher score", "max", "teacher justification",
                   "corrected by", "when"]
ALL = "all"
BASE = "base"  # the filter value for grades of the base model alone
ORDER_CHOICES = [("least confident first", REVIEW_ORDERS[0]), ("newest first", REVIEW_ORDERS[1]),
                 ("grade these first (a new assignment)", REVIEW_ORDERS[2])]
QUEUE_LIMIT_GRADES = 200  # grades read per view: the first ones in the chosen order


def _filter(adapter: str | None) -> set[str | None] | None:
    if not adapter or adapter == ALL:
        return None
    return {None} if adapter == BASE else {adapter}


def adapter_choices() -> list[tuple[str, str]]:
    """(label, filter value) of every adapter that made stored grades, after "all"."""
    out, seen = [("all adapters", ALL)], set()
    for adapter, base in jobs.store().graded_adapters():
        value = adapter if adapter is not None else BASE
        if value not in seen:
            seen.add(value)
            out.append((adapter_label(adapter, base) if adapter else "base model alone", value))
    return out


def queue_items(adapter: str | None, order: str, hide_corrected: bool,
                first_k: int | float | None = GRADE_FIRST_K) -> list[ReviewItem]:
    """The review queue as the tab shows it."""
    items = jobs.store().review_items(adapters=_filter(adapter), order=order or REVIEW_ORDERS[0],
                                      limit_grades=QUEUE_LIMIT_GRADES, first_k=int(first_k or GRADE_FIRST_K))
    return [q for q in items if not (hide_corrected and q.correction is not None)]


def regrade_with_anchors(items: list[ReviewItem]) -> str:
    """Grade the submissions of the listed questions again, each with the adapter that graded it,
    now with the teacher's corrections (and imported grades) as anchors: an answer the teacher
    graded takes that score, the others see the closest ones. New grades are stored beside the
    old; no training. Returns what changed, for the page."""
    from data.rubric import Rubric
    from inference.engine import get_engine
    from inference.results import store_grade

    store = jobs.store()
    bank = store.anchor_bank()
    if not bank:
        return "No teacher anchors yet: correct some answers first (their scores become anchors)."
    rows = [store.get_grade(g) for g in dict.fromkeys(q.grade_id for q in items)]
    groups: dict[tuple[str, str | None], list[dict]] = {}
    for row in rows:
        if row and row.get("submission_md"):
            groups.setdefault((row["base_model"], row["adapter"]), []).append(row)
    changed = regraded = 0
    for (base, adapter), group in groups.items():
        subs = [(r["submission_name"], r["submission_md"], Rubric.model_validate(r["rubric"])) for r in group]
        results = get_engine(base).grade_many(subs, adapter=adapter, unit="item", anchors=bank)
        for r, (name, md, rubric), old in zip(results, subs, group):
            store_grade(r, rubric, name, submission_md=md)
            regraded += 1
            changed += sum(abs(it.score - (o.get("score") or 0)) >= 0.05
                           for it, o in zip(r.grade.items, old["grade"].get("items") or []))
    return (f"Regraded {regraded} submissions with {len(bank)} teacher-graded answers of {bank.questions()} "
            f"questions as anchors (no training): {changed} question scores changed. The queue shows the new grades.")


def queue_table(items: list[ReviewItem]) -> pd.DataFrame:
    rows = []
    for q in items:
        c = q.correction
        text = q.question if len(q.question) <= SHORT_QUESTION else q.question[:SHORT_QUESTION - 3] + "..."
        rows.append([q.grade_id, q.question_index + 1, f"{q.question_label}: {text}", q.model_score, q.max_score,
                     "" if q.confidence is None else f"{q.confidence:.2f}",
                     "" if c is None else f"{c.teacher_score:g}", "" if c is None else c.teacher_justification or "",
                     q.model_justification or "", q.submission_name, adapter_label(q.adapter, q.base_model),
                     "" if c is None else c.corrected_by])
    return pd.DataFrame(rows, columns=QUEUE_COLUMNS)


def history_table() -> pd.DataFrame:
    """Every correction, newest first: the full history (a later one of the same answer wins)."""
    rows = [[c.id, c.grade_id, f"{c.question_label}: {c.question}", c.model_score, c.teacher_score, c.max_score,
             c.teacher_justification or "", c.corrected_by, c.created_at]
            for c in reversed(jobs.store().corrections())]
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _teacher_cells(q: ReviewItem) -> tuple[str, str]:
    c = q.correction
    return ("" if c is None else f"{c.teacher_score:g}", "" if c is None else c.teacher_justification or "")


def edited_corrections(table: pd.DataFrame | None, shown: list[ReviewItem]) -> tuple[list[tuple], list[str]]:
    """The rows whose teacher score or justification the user changed: ([(item, score,
    justification)], problems). A row counts when it differs from the teacher's word in the store
    and from what the page showed (``shown``; empty for an API call), so a row left alone never
    re-stores an older value over a colleague's newer correction. A problem names the row and the fix."""
    changes, problems = [], []
    if table is None or table.empty:
        return changes, problems
    keyed = []
    for n, row in enumerate(table.itertuples(index=False), start=1):
        values = list(row)
        try:
            keyed.append((n, (int(float(values[0])), int(float(values[1])) - 1), values))
        except (TypeError, ValueError):
            continue  # a row added in the page: not a stored question
    stored = {(q.grade_id, q.question_index): q
              for q in jobs.store().review_items(grade_ids=sorted({k[0] for _, k, _ in keyed}))}
    was_shown = {(q.grade_id, q.question_index): _teacher_cells(q) for q in shown}
    for n, key, values in keyed:
        q = stored.get(key)
        if q is None:
            continue
        score_text, why = _cell(values[TEACHER_SCORE]), _cell(values[TEACHER_WHY])
        if (score_text, why) == _teacher_cells(q) or (score_text, why) == was_shown.get(key):
            continue
        where = f"row {n} (grade {q.grade_id}, question {q.question_label})"
        if not score_text:
            problems.append(f"{where}: give the teacher score (0..{q.max_score:g}) with the justification")
            continue
        try:
            score = float(score_text.replace(",", "."))
        except ValueError:
            problems.append(f"{where}: teacher score {score_text!r} is not a number; give 0..{q.max_score:g}")
            continue
        if not math.isfinite(score) or not 0 <= score <= q.max_score:
            problems.append(f"{where}: teacher score {score_text} is outside 0..{q.max_score:g}")
            continue
        changes.append((q, score, why))
    return changes, problems


def save_corrections(table: pd.DataFrame | None, shown: list[ReviewItem], who: str | None) -> str:
    """Store every edited row as a correction, or none of them when any row is wrong."""
    changes, problems = edited_corrections(table, shown)
    name = " ".join(str(who or "").split())
    if not name:
        problems.append(f"say who corrects (the name field; e.g. {DEFAULT_CORRECTOR!r})")
    if problems:
        return "Nothing stored:\n\n" + "\n".join(f"- {p}" for p in problems)
    if not changes:
        return "No changes to store: type a score in the **teacher score** column first."
    store = jobs.store()
    try:
        saved = [store.add_correction(q.grade_id, q.question_index, score, why, name) for q, score, why in changes]
    except CorrectionError as e:  # a grade deleted meanwhile, say; earlier rows of this save are kept
        return f"Stopped: {e}"
    lines = [f"- grade {c.grade_id}, question {c.question_label}: model {c.model_score:g} -> teacher "
             f"{c.teacher_score:g} / {c.max_score:g} (correction {c.id})" for c in saved]
    return f"Stored {len(saved)} correction{'s' if len(saved) != 1 else ''} by {name}:\n\n" + "\n".join(lines)


def answer_view(items: list[ReviewItem], row: int | None) -> str:
    """The selected question in full: the student's answer, what the model said, the teacher's word."""
    if row is None or not 0 <= row < len(items):
        return ""
    q = items[row]
    conf = "" if q.confidence is None else f", confidence {q.confidence:.2f}"
    answer = q.answer if q.answer is not None else "(this grade kept no submission text)"
    quoted = "\n".join("> " + line for line in answer.splitlines()) or "> (empty)"
    parts = [f"**Grade {q.grade_id}, question {q.question_label}** ({q.submission_name}, graded by "
             f"{adapter_label(q.adapter, q.base_model)}{conf})", f"**Question:** {q.question}",
             f"**Student's answer:**\n\n{quoted}",
             f"**Model:** {q.model_score:g} / {q.max_score:g}" + (f": {q.model_justification}" if q.model_justification else "")]
    if q.correction is not None:
        c = q.correction
        parts.append(f"**Teacher:** {c.teacher_score:g} / {c.max_score:g}"
                     + (f": {c.teacher_justification}" if c.teacher_justification else "")
                     + f" ({c.corrected_by}, {c.created_at})")
    return "\n\n".join(parts)


def make_dataset(name: str | None) -> str:
    """The corrections as a stored dataset, for the Configure tab's datasets."""
    try:
        ds_id, created, data = jobs.store().store_corrections_dataset(name)
    except CorrectionError as e:
        return f"Nothing stored: {e}"
    stored = jobs.store().find_dataset(ds_id) or {}
    dsname = stored.get("name", name)
    head = (f"Stored dataset `db:{dsname}`" if created else f"These corrections are already dataset `db:{dsname}`")
    msg = (f"{head}: {len(data.submissions)} submissions from {len(data.correction_ids)} corrections "
           f"(ids {', '.join(map(str, data.correction_ids))}). Add it to a run's datasets in the Configure tab.")
    if data.skipped:
        msg += "\n\nLeft out:\n\n" + "\n".join(f"- {why}" for why in data.skipped)
    return msg


def build(settings: Settings) -> dict[str, Any]:
    gr.Markdown("Questions of stored grades, those the grader was least sure of first. Type your score (and "
                "why) in the **teacher score** and **teacher justification** columns, then **Save corrections**: "
                "each is stored beside what the model said, with your name and the time; nothing is overwritten. "
                "Click a row to read the student's answer. Every correction is a **teacher anchor** at once: "
                "grading that question again uses it (the same answer gets your score, others see it as an "
                "example), without training; **Regrade with my corrections** does that for the listed grades.")
    with gr.Row():
        adapter = gr.Dropdown([("all adapters", ALL)], value=ALL, label="Graded by", elem_id="review-adapter")
        order = gr.Radio(ORDER_CHOICES, value=REVIEW_ORDERS[0], label="Order", elem_id="review-order",
                         info="'grade these first': per question, the most typical and the most unusual answers, "
                              "so each of your corrections teaches the grader the most (they become anchors at once)")
        first_k = gr.Number(GRADE_FIRST_K, precision=0, minimum=1, maximum=30, label="Answers per question first",
                            elem_id="review-first-k")
        hide = gr.Checkbox(False, label="Hide corrected questions", elem_id="review-hide")
        refresh_btn = gr.Button("Refresh", size="sm", elem_id="review-refresh")
    table = gr.Dataframe(headers=QUEUE_COLUMNS, interactive=True, wrap=True, elem_id="review-table",
                         datatype=QUEUE_TYPES, column_widths=QUEUE_WIDTHS,
                         static_columns=[i for i in range(len(QUEUE_COLUMNS)) if i not in (TEACHER_SCORE, TEACHER_WHY)],
                         label="Review queue (edit the teacher columns)")
    items = gr.State([])
    with gr.Row():
        who = gr.Textbox(DEFAULT_CORRECTOR, label="Corrected by", elem_id="review-name", scale=1)
        save_btn = gr.Button("Save corrections", variant="primary", elem_id="review-save", scale=1)
        regrade_btn = gr.Button("Regrade with my corrections", elem_id="review-regrade", scale=1)
    message = gr.Markdown(elem_id="review-message")
    answer = gr.Markdown(elem_id="review-answer", line_breaks=True)  # a student's lines stay lines
    with gr.Accordion("Corrections so far (newest first)", open=False):
        history = gr.Dataframe(headers=HISTORY_COLUMNS, interactive=False, wrap=True, elem_id="review-history")
    with gr.Row():
        ds_name = gr.Textbox(label="Dataset name", placeholder="corrections-<date>", elem_id="review-dataset-name")
        ds_btn = gr.Button("Make a training dataset from corrections", elem_id="review-make-dataset")
    ds_msg = gr.Markdown(elem_id="review-dataset-msg")

    def refresh(adapter_value, order_value, hide_value, k_value=GRADE_FIRST_K):
        choices = adapter_choices()
        values = [v for _, v in choices]
        chosen = adapter_value if adapter_value in values else ALL
        found = queue_items(chosen, order_value, hide_value, k_value)
        return (queue_table(found), found, gr.update(choices=choices, value=chosen), history_table())

    def save(table_value, shown, who_value, adapter_value, order_value, hide_value, k_value=GRADE_FIRST_K):
        msg = save_corrections(table_value, shown or [], who_value)
        return (msg, *refresh(adapter_value, order_value, hide_value, k_value))

    def regrade(shown, adapter_value, order_value, hide_value, k_value=GRADE_FIRST_K, progress=gr.Progress()):
        progress(0, desc="grading again with the teacher's anchors")
        msg = regrade_with_anchors(shown or [])
        return (msg, *refresh(adapter_value, order_value, hide_value, k_value))

    def on_select(shown, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return answer_view(shown or [], row)

    def on_load(request: gr.Request):
        # The --auth login names the teacher; without a login the default stands.
        return getattr(request, "username", None) or DEFAULT_CORRECTOR

    filters = [adapter, order, hide, first_k]
    outs = [table, items, adapter, history]
    refresh_btn.click(refresh, filters, outs, api_name="review_queue")
    for control in filters:
        control.input(refresh, filters, outs)
    save_btn.click(save, [table, items, who, *filters], [message, *outs], api_name="save_corrections")
    regrade_btn.click(regrade, [items, *filters], [message, *outs], api_name="regrade_with_anchors")
    table.select(on_select, [items], [answer])
    ds_btn.click(make_dataset, [ds_name], [ds_msg], api_name="corrections_dataset")
    return {"refresh": (refresh, filters, outs), "on_load": (on_load, None, [who])}
