"""Builds the studio's Blocks: one tab per module, wired to each other only where a tab's output
is another tab's input (the Configure form feeds Train; stored datasets feed Configure)."""
from __future__ import annotations

import gradio as gr

from app import config_tab, data_tab, grade_tab, review_tab, runs_tab, train_tab
from app.common import Settings

TITLE = "Grader studio"


def build_app(settings: Settings | None = None) -> gr.Blocks:
    settings = settings or Settings()
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nTrain a LoRA grader on your rubric-graded work, then grade "
                    "Markdown submissions with it. Every action here is also a CLI command "
                    "(`python -m training ...`, `python -m inference ...`).")
        with gr.Tabs():
            with gr.Tab("Data", id="data") as t_data:
                data = data_tab.build(settings)
            with gr.Tab("Configure", id="configure") as t_cfg:
                cfg = config_tab.build(settings)
            with gr.Tab("Train", id="train"):
                train = train_tab.build(settings, cfg["form"])
            with gr.Tab("Grade", id="grade") as t_grade:
                grade = grade_tab.build(settings)
            with gr.Tab("Review", id="review") as t_review:
                review = review_tab.build(settings)
            with gr.Tab("Runs", id="runs") as t_runs:
                runs = runs_tab.build(settings)

        # Lists that other tabs (or other processes) change are re-read when a tab is opened.
        t_data.select(*data["refresh"])
        t_cfg.select(*cfg["refresh_datasets"])
        t_grade.select(*grade["refresh"])
        t_review.select(*review["refresh"])
        t_runs.select(*runs["refresh"])
        t_runs.select(*runs["agreement"])
        # A reload (or an app restart) shows the stored state again: the latest run, datasets...
        demo.load(*train["on_load"], api_name="current_run")
        demo.load(*data["refresh"])
        demo.load(*runs["refresh"])
        demo.load(*cfg["describe"])
        demo.load(*grade["rubric_load"])
        demo.load(*review["on_load"])  # the teacher's name from the login
    return demo
