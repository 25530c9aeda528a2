"""Data tab: upload graded JSON/JSONL or spreadsheets (CSV, Excel .xlsx), see every problem per
file, preview, statistics, store.

Uploads are read as bytes and validated by `data.loading.load_graded_bytes`, the same
validator `python -m training validate` uses; spreadsheets by `data.spreadsheet` with the column
mapping the user picks (guessed from the header on upload), as `python -m training import --map`
does. The uploaded file name is only shown, never used to build a path. A dataset is stored only
when every file is valid (nothing partial).
"""
from __future__ import annotations

import functools
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from app.common import Settings, empty_figure, model_choices, safe_display_name
from data.spreadsheet import Controls

PROBLEM_COLUMNS = ["file", "where (JSON path, or row and column)", "severity", "reason"]
PREVIEW_COLUMNS = ["file", "submission", "question", "answer", "score", "max score"]
DATASET_COLUMNS = ["id", "name", "submissions", "items", "created", "content hash"]
# Token statistics tokenize at most this many submissions: the page stays quick on big uploads.
TOKEN_SAMPLE = 300


# -- pure functions (the handlers below only wire them to widgets) ----------------------------
def _upload_path(f: Any) -> Path:
    return Path(f if isinstance(f, str) else getattr(f, "name", str(f)))


def read_uploads(files: list[str] | None, max_bytes: int, mapping: Any = None,
                 progress: Callable[[str, int, int], None] | None = None, encoding: str = "auto") -> list:
    """Validate each uploaded file from its bytes. Oversize files are refused before reading all.
    Spreadsheets are read with ``mapping`` (a `data.spreadsheet.ColumnMap`; None: guessed per
    file) and ``encoding`` (CSV text; "auto": detected); ``progress(file, rows_done, rows_total)``
    follows their rows. Their problems' advice names this page's fields."""
    from data.loading import FileReport, Problem, check_across_files, load_graded_bytes
    from data.spreadsheet import is_spreadsheet, load_spreadsheet_bytes

    reports = []
    for f in files or []:
        path = _upload_path(f)
        name = safe_display_name(path.name)
        size = path.stat().st_size
        if size > max_bytes:
            reports.append(FileReport(file=name, submissions=[], problems=[Problem(
                file=name, path="(file)", value=f"{size} bytes",
                expected=f"at most {max_bytes} bytes; split the file", severity="error")]))
            continue
        if is_spreadsheet(name):
            rows = (lambda done, total, n=name: progress(n, done, total)) if progress else None
            reports.append(load_spreadsheet_bytes(name, path.read_bytes(), mapping, encoding=encoding,
                                                  max_bytes=max_bytes, progress=rows, controls=PAGE_CONTROLS)[0])
            continue
        reports.append(load_graded_bytes(name, path.read_bytes(), max_bytes=max_bytes))
    # A submission_id repeated in a later upload is an error there, as it is for the CLI.
    return check_across_files(reports).files


def first_sheet(files: list[str] | None, max_bytes: int, encoding: str = "auto"):
    """The first uploaded spreadsheet that can be read (its header fills the column dropdowns),
    else None."""
    from data.spreadsheet import is_spreadsheet, read_sheet

    for f in files or []:
        path = _upload_path(f)
        name = safe_display_name(path.name)
        if is_spreadsheet(name) and path.stat().st_size <= max_bytes:
            sheet, _ = read_sheet(name, path.read_bytes(), encoding=encoding, max_bytes=max_bytes)
            if sheet is not None:
                return sheet
    return None


# The column dropdowns of a mapping, in the order the widgets are built and passed around.
MAPPING_SINGLE = ["submission", "group_by", "question_id", "question", "reference_answer", "answer", "score",
                  "max_score"]
NO_COLUMN = "(none)"
# Each mapping field's widget label: the widgets are built with them and messages name them.
MAPPING_LABELS = {
    "submission": "Submission id (e.g. student)", "group_by": "Group by (e.g. assignment)",
    "question_id": "Question id", "question": "Question", "reference_answer": "Reference answer",
    "answer": "Answer", "score": "Score (default: the graders' mean)", "max_score": "Max score",
    "graders": "Graders' scores (one column each)", "questions": "Question score columns",
    "answers": "Answer columns (in the order of the questions; optional)",
    "max_row": "Row of maxima (its submission id, e.g. Points possible)",
}
DEFAULT_MAX_LABEL = "Max score (where no column or row says it)"
ENCODING_LABEL = "Text encoding (CSV files)"
ENCODINGS = [("detect", "auto"), "utf-8", "cp1252", "cp1250", "latin-1", "utf-16", "mac_roman"]

# How the spreadsheet reader's advice names this page's fields (the CLI's names its flags).
PAGE_CONTROLS = Controls(column='the "{label}" column', max_score=f'the "{DEFAULT_MAX_LABEL}" field',
                         encoding=f'pick {{encoding}} under "{ENCODING_LABEL}"', labels=MAPPING_LABELS)


@dataclass
class MappingWidgets:
    """The spreadsheet-columns form: each mapping field's widget by name, read and filled by name
    (the one place that knows their order, the order Gradio passes their values in)."""

    shape: Any
    singles: dict[str, Any]  # MAPPING_SINGLE field -> its column dropdown
    graders: Any
    questions: Any
    answers: Any
    max_row: Any
    default_max: Any

    def components(self) -> list[Any]:
        return [self.shape, *self.singles.values(), self.graders, self.questions, self.answers, self.max_row,
                self.default_max]

    def named(self, values: Sequence[Any], *more: str) -> dict[str, Any]:
        """The widgets' values (in :meth:`components` order, then the ``more`` named after them)
        by field name."""
        names = ["shape", *self.singles, "graders", "questions", "answers", "max_row", "default_max", *more]
        return dict(zip(names, values))

    @staticmethod
    def mapping(values: dict[str, Any]):
        """The `ColumnMap` the widgets say (a `ValueError` with the reason if they cannot be one)."""
        from pydantic import ValidationError

        from data.spreadsheet import ColumnMap

        picked = {k: values[k] for k in MAPPING_SINGLE if values.get(k) and values[k] != NO_COLUMN}
        default_max = values.get("default_max")
        try:
            return ColumnMap(shape=values.get("shape") or "long", graders=list(values.get("graders") or []),
                             questions=list(values.get("questions") or []),
                             answers=list(values.get("answers") or []),
                             max_row=(values.get("max_row") or "").strip() or None,
                             default_max_score=float(default_max) if default_max else None, **picked)
        except ValidationError as e:
            raise ValueError("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from e

    def updates(self, mapping, header: list[str]) -> list[Any]:
        """Widget updates (in :meth:`components` order) showing ``mapping`` (None: the empty form)
        with the sheet's ``header`` as the choices."""
        value = (lambda k, empty: empty if mapping is None else (getattr(mapping, k) or empty))  # noqa: E731
        return [gr.update(value=value("shape", "long")),
                *[gr.update(choices=[NO_COLUMN, *header], value=value(k, NO_COLUMN)) for k in self.singles],
                *[gr.update(choices=header, value=value(k, [])) for k in ("graders", "questions", "answers")],
                gr.update(value=value("max_row", "")), gr.update(value=value("default_max_score", None))]


def problems_table(reports: list) -> pd.DataFrame:
    rows = []
    for rep in reports:
        for p in rep.problems:
            reason = f"got {p.value}; expected {p.expected}" if p.value or p.expected else str(p)
            rows.append([p.file, p.path, p.severity, reason])
    return pd.DataFrame(rows, columns=PROBLEM_COLUMNS)


def summary_markdown(reports: list, list_ok: int = 5) -> str:
    """One line per file with problems; valid files listed by name only when there are few."""
    if not reports:
        return "Upload one or more `.json` / `.jsonl` files of graded submissions, or a `.csv` / `.xlsx` sheet."
    lines = []
    ok_files = [r for r in reports if r.ok and not r.problems]
    for rep in reports:
        if rep in ok_files and len(ok_files) > list_ok:
            continue
        n_err = sum(p.severity == "error" for p in rep.problems)
        n_warn = sum(p.severity == "warning" for p in rep.problems)
        mark = "OK" if rep.ok else "ERRORS"
        lines.append(f"- **{rep.file}**: {mark}: {len(rep.submissions)} submissions, "
                     f"{n_err} errors, {n_warn} warnings")
    if len(ok_files) > list_ok:
        lines.append(f"- {len(ok_files)} files valid without warnings "
                     f"({sum(len(r.submissions) for r in ok_files)} submissions)")
    errors = [p for r in reports for p in r.errors]
    if not errors:
        head = "### All files valid: ready to store"
    elif all(p.setting for p in errors):  # the files are fine: only how they are read must change
        head = ("### Some files have errors that a setting here fixes: change what each one names "
                "(then **Apply columns**, or pick the encoding); the files can stay as they are")
    else:
        head = ("### Some files have errors: fix them in the file and upload again (nothing is stored from a "
                "set with errors)")
    return head + "\n" + "\n".join(lines)


def preview_table(reports: list, limit: int = 200) -> pd.DataFrame:
    rows = []
    for rep in reports:
        for k, sub in enumerate(rep.submissions):
            maxes = sub.item_max_scores()
            for item, m in zip(sub.rubric_alignment, maxes):
                rows.append([rep.file, sub.submission_id or f"#{k + 1}", item.question[:120],
                             item.answer[:160], item.score, m])
                if len(rows) >= limit:
                    return pd.DataFrame(rows, columns=PREVIEW_COLUMNS)
    return pd.DataFrame(rows, columns=PREVIEW_COLUMNS)


def score_figure(submissions: list) -> go.Figure:
    if not submissions:
        return empty_figure("Score distribution")
    pct = [100.0 * s.score / s.max_score if s.max_score else 0.0 for s in submissions]
    fig = go.Figure(go.Histogram(x=pct, nbinsx=20, name="submissions"))
    fig.update_layout(title="Score distribution (% of max score per submission)",
                      xaxis_title="score %", yaxis_title="submissions", height=320,
                      margin=dict(l=40, r=20, t=50, b=40))
    return fig


@functools.lru_cache(maxsize=4)
def _tokenizer_for(model: str):
    """(tokenizer, prompt format) of a model, loaded once per model (tokenizer only: cheap)."""
    from transformers import AutoTokenizer

    from data.model_zoo import resolve_model_path
    from data.prompt_format import detect_format

    path = resolve_model_path(model)
    model_type = None
    cfg = Path(path) / "config.json"
    if cfg.exists():
        model_type = json.loads(cfg.read_text()).get("model_type")
    tok = AutoTokenizer.from_pretrained(str(path))
    return tok, detect_format(tok, model_type)


def token_stats(submissions: list, model: str, max_length: int) -> dict[str, Any]:
    """Tokens per training example with `model`'s tokenizer and the real prompt format, and how
    many examples `max_length` would cut."""
    from data.prompt_format import build_training_examples

    sample = submissions[:TOKEN_SAMPLE]
    tok, fmt = _tokenizer_for(model)
    # Encode without a cap to see each example's true length, then count the ones over the cap.
    examples, _ = build_training_examples(sample, tok, fmt, 10**9)
    lengths = [len(e.input_ids) for e in examples]
    return {
        "model": model, "format": fmt, "sampled": len(sample), "of": len(submissions),
        "min": min(lengths), "median": int(statistics.median(lengths)), "max": max(lengths),
        "cut": sum(n > max_length for n in lengths), "max_length": max_length,
    }


def stats_markdown(submissions: list, tokens: dict[str, Any] | str | None) -> str:
    if not submissions:
        return ""
    n_items = sum(len(s.rubric_alignment) for s in submissions)
    mean_pct = statistics.mean(100.0 * s.score / s.max_score if s.max_score else 0.0
                               for s in submissions)
    lines = [f"**{len(submissions)} submissions**, **{n_items} items**, mean score {mean_pct:.1f}%"]
    if isinstance(tokens, dict):
        sampled = ("" if tokens["sampled"] == tokens["of"]
                   else f" (first {tokens['sampled']} of {tokens['of']})")
        lines.append(
            f"Tokens per example with `{tokens['model']}` ({tokens['format']} format){sampled}: "
            f"min {tokens['min']}, median {tokens['median']}, max {tokens['max']}. "
            f"**{tokens['cut']} would be cut** at max length {tokens['max_length']} "
            "(the submission is shortened, never the grade).")
    elif tokens:
        lines.append(f"Token counts unavailable: {tokens}")
    return "\n\n".join(lines)


def datasets_table() -> pd.DataFrame:
    from data.store import Store

    rows = [[d["id"], d["name"], d["n_submissions"], d["n_items"], str(d.get("created_at", "")),
             str(d.get("content_hash", ""))[:12]] for d in Store().list_datasets()]
    return pd.DataFrame(rows, columns=DATASET_COLUMNS)


def dataset_names() -> list[str]:
    from data.store import Store

    return [d["name"] for d in Store().list_datasets()]


# -- handlers ---------------------------------------------------------------------------------
# ------------------------------------------------------------------ handlers (wired in build)


def check(settings: Settings, file_list, model, max_len, mapping, progress, text_encoding):
    """Validate the uploads (spreadsheets with ``mapping``, a ColumnMap or None: guessed)."""
    from data.spreadsheet import is_spreadsheet

    def rows(name: str, done: int, total: int) -> None:
        progress(done / max(total, 1), desc=f"{name}: row {done:,} of {total:,}")

    reports = read_uploads(file_list, settings.max_upload_bytes, mapping, rows, text_encoding or "auto")
    subs = [s for r in reports if r.ok for s in r.submissions]
    tokens: dict | str | None = None
    if subs:
        try:
            tokens = token_stats(subs, model, int(max_len or 2048))
        except Exception as exc:  # a missing model must not hide the validation report
            tokens = f"{type(exc).__name__}: {exc}"
    ok = bool(reports) and all(r.ok for r in reports)
    state = ({"submissions": [s.model_dump(mode="json") for s in subs],
              "sources": [r.file for r in reports]} if ok else None)
    head = summary_markdown(reports)
    if mapping is not None and any(is_spreadsheet(r.file) for r in reports):
        head += f"\n\nSpreadsheet columns: `{mapping.describe()}`"
    return (head, problems_table(reports), stats_markdown(subs, tokens),
            score_figure(subs), preview_table(reports), state)

def validate(settings: Settings, file_list, model, max_len, mapping_dict=None, text_encoding="auto",
             progress=gr.Progress()):
    from data.spreadsheet import ColumnMap

    mapping = ColumnMap.model_validate(mapping_dict) if mapping_dict else None
    return check(settings, file_list, model, max_len, mapping, progress, text_encoding)

def on_upload(settings: Settings, form: MappingWidgets, file_list, model, max_len, text_encoding="auto",
              progress=gr.Progress()):
    """New files: the first spreadsheet's header fills the dropdowns, with guessed columns."""
    from data.spreadsheet import guess_mapping

    sheet = first_sheet(file_list, settings.max_upload_bytes, text_encoding or "auto")
    mapping = guess_mapping(sheet) if sheet is not None else None
    header = sheet.header if sheet is not None else []
    updates = form.updates(mapping, header)
    return (*check(settings, file_list, model, max_len, mapping, progress, text_encoding),
            mapping.model_dump() if mapping else None, gr.update(visible=sheet is not None), *updates)

def apply_columns(settings: Settings, form: MappingWidgets, file_list, model, max_len, *form_values,
                  progress=gr.Progress()):
    """Re-read the spreadsheets with the columns the form says (its values, then the encoding)."""
    values = form.named(form_values, "encoding")
    text_encoding = values.get("encoding") or "auto"
    try:
        mapping = form.mapping(values)
    except ValueError as e:
        return (f"### Column mapping not usable: {e}", problems_table([]), "", score_figure([]),
                preview_table([]), None, None)
    return (*check(settings, file_list, model, max_len, mapping, progress, text_encoding), mapping.model_dump())

def on_shape(value):
    return gr.update(visible=value != "wide"), gr.update(visible=value == "wide")

def save(state, name):
    from data.rubric import GradedSubmission
    from data.store import Store

    name = (name or "").strip()
    if not state:
        return "Nothing stored: upload files and fix every error first.", *refresh()
    if not name:
        return "Give the dataset a name.", *refresh()
    subs = [GradedSubmission.model_validate(d) for d in state["submissions"]]
    store = Store()
    ds_id, created = store.import_dataset(name, subs, state["sources"])
    stored_as = name if created else store.find_dataset(ds_id)["name"]
    msg = (f"Stored dataset **{name}** (id {ds_id}, {len(subs)} submissions). Use it in "
           f"Configure as `db:{name}`." if created else
           f"Same content already stored as dataset **{stored_as}** (id {ds_id}); nothing new written. "
           f"Use it in Configure as `db:{stored_as}`.")
    return msg, *refresh()

def refresh():
    names = dataset_names()
    return datasets_table(), gr.update(choices=names, value=names[0] if names else None)

def delete(name):
    from data.store import Store

    st = Store()
    ds = st.find_dataset(name) if name else None
    if not ds:
        return "Pick a stored dataset.", *refresh()
    st.delete_dataset(ds["id"])
    return f"Deleted dataset **{ds['name']}**.", *refresh()


def build(settings: Settings) -> dict[str, Any]:
    """Create the Data tab's widgets (inside a gr.Tab context) and wire them."""
    gr.Markdown("Upload graded submissions (`.json` with one submission or a list, or `.jsonl`), or a "
                "spreadsheet of grades (`.csv`, `.xlsx`: one row per answer, or one row per student with a "
                "column per question). "
                f"Each file is checked on its own; files over {settings.max_upload_mb:g} MB are refused.")
    with gr.Row():
        files = gr.File(label="Graded JSON / JSONL files, or CSV / Excel sheets", file_count="multiple",
                        file_types=[".json", ".jsonl", ".csv", ".tsv", ".xlsx"], height=240, elem_id="data-files")
        with gr.Column():
            token_model = gr.Dropdown(model_choices(), value="embedded:tiny-gpt-oss",
                                      allow_custom_value=True,
                                      label="Model (for token counts; tiny-gpt-oss has the "
                                            "real GPT-OSS tokenizer)",
                                      elem_id="data-token-model")
            max_length = gr.Number(value=2048, precision=0, label="max length (tokens)",
                                   elem_id="data-max-length")
            encoding = gr.Dropdown(ENCODINGS, value="auto", label=ENCODING_LABEL, elem_id="data-encoding")
            check_btn = gr.Button("Validate", elem_id="data-validate")
    with gr.Accordion("Spreadsheet columns", open=True, visible=False, elem_id="data-sheet-columns") as sheet_box:
        gr.Markdown("Which column holds what, guessed from the header's names: check them, change what is "
                    "wrong, then **Apply columns**. Without a submission (or group-by) column each row is its "
                    "own one-question submission.")
        shape = gr.Radio([("one row per answer", "long"), ("one row per student, a column per question", "wide")],
                         value="long", label="Shape", elem_id="data-map-shape")
        singles = {}
        with gr.Row():
            for key in ("submission", "group_by"):
                singles[key] = gr.Dropdown([NO_COLUMN], value=NO_COLUMN, label=MAPPING_LABELS[key],
                                           elem_id=f"data-map-{key}")
            default_max = gr.Number(value=None, label=DEFAULT_MAX_LABEL, elem_id="data-map-default-max")
        with gr.Group(visible=True) as long_box:
            with gr.Row():
                for key in ("question_id", "question", "reference_answer", "answer"):
                    singles[key] = gr.Dropdown([NO_COLUMN], value=NO_COLUMN, label=MAPPING_LABELS[key],
                                               elem_id=f"data-map-{key}")
            with gr.Row():
                for key in ("score", "max_score"):
                    singles[key] = gr.Dropdown([NO_COLUMN], value=NO_COLUMN, label=MAPPING_LABELS[key],
                                               elem_id=f"data-map-{key}")
                graders = gr.Dropdown([], value=[], multiselect=True, label=MAPPING_LABELS["graders"],
                                      elem_id="data-map-graders")
        with gr.Group(visible=False) as wide_box:
            with gr.Row():
                questions = gr.Dropdown([], value=[], multiselect=True, label=MAPPING_LABELS["questions"],
                                        elem_id="data-map-questions")
                answers = gr.Dropdown([], value=[], multiselect=True, label=MAPPING_LABELS["answers"],
                                      elem_id="data-map-answers")
                max_row = gr.Textbox(label=MAPPING_LABELS["max_row"], elem_id="data-map-max-row")
        apply_btn = gr.Button("Apply columns", elem_id="data-map-apply")
    mapping_state = gr.State(None)  # the ColumnMap (as a dict) spreadsheets are read with
    form = MappingWidgets(shape, {k: singles[k] for k in MAPPING_SINGLE}, graders, questions, answers, max_row,
                          default_max)
    summary = gr.Markdown(elem_id="data-summary")
    problems = gr.Dataframe(headers=PROBLEM_COLUMNS, label="Problems (file, JSON path, reason)",
                            interactive=False, wrap=True, column_widths=["18%", "24%", "8%", "50%"],
                            elem_id="data-problems")
    with gr.Row():
        stats = gr.Markdown(elem_id="data-stats")
        plot = gr.Plot(label="Score distribution", elem_id="data-plot")
    preview = gr.Dataframe(headers=PREVIEW_COLUMNS, label="Preview (first 200 items)",
                           interactive=False, wrap=True, max_height=420,
                           column_widths=["14%", "12%", "32%", "30%", "6%", "6%"],
                           elem_id="data-preview")
    valid_state = gr.State(None)  # (submissions as dicts, source names) when every file is valid
    with gr.Row():
        ds_name = gr.Textbox(label="Dataset name", placeholder="e.g. essays-fall", elem_id="data-name")
        save_btn = gr.Button("Store as dataset", variant="primary", elem_id="data-save")
    save_msg = gr.Markdown(elem_id="data-save-msg")
    gr.Markdown("### Stored datasets")
    table = gr.Dataframe(headers=DATASET_COLUMNS, interactive=False, elem_id="data-datasets")
    with gr.Row():
        del_name = gr.Dropdown([], label="Dataset to delete", allow_custom_value=True,
                               elem_id="data-del-name")
        del_btn = gr.Button("Delete dataset", variant="stop", elem_id="data-delete")
    del_msg = gr.Markdown()

    outputs = [summary, problems, stats, plot, preview, valid_state]
    files.upload(functools.partial(on_upload, settings, form), [files, token_model, max_length, encoding],
                 [*outputs, mapping_state, sheet_box, *form.components()], api_name="validate_upload")
    check_btn.click(functools.partial(validate, settings), [files, token_model, max_length, mapping_state, encoding], outputs, api_name="validate")
    # Picking an encoding (what an encoding problem asks for) reads the files again at once.
    encoding.input(functools.partial(validate, settings), [files, token_model, max_length, mapping_state, encoding], outputs, api_name=False)
    apply_btn.click(functools.partial(apply_columns, settings, form), [files, token_model, max_length, *form.components(), encoding],
                    [*outputs, mapping_state], api_name="validate_mapped")
    shape.change(on_shape, [shape], [long_box, wide_box])
    save_btn.click(save, [valid_state, ds_name], [save_msg, table, del_name], api_name="store_dataset")
    del_btn.click(delete, [del_name], [del_msg, table, del_name], api_name="delete_dataset")
    return {"refresh": (refresh, None, [table, del_name]), "files": files}
