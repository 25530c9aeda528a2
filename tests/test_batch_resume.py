"""Batch grading at scale (issue #14): `python -m inference batch` writes each batch as it
finishes, and a run killed with SIGKILL resumes on the next start without grading a finished
submission twice; a half-written last line is dropped and that submission graded again; a file
edited since it was graded is graded again; an output folder made by another grader is refused."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.loading import load_rubric
from tests.conftest import REPO

RUBRIC = REPO / "data" / "samples" / "rubrics" / "bio-photosynthesis.json"
SAMPLES = sorted((REPO / "data" / "samples" / "submissions").glob("bio-photosynthesis-*.md"))
N_FILES = 6  # 3 batches of 2: a kill lands after the first, before the last


@pytest.fixture(scope="module")
def generating_adapter(tiny_gpt_oss_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the tiny GPT-OSS trained (so its run_config says) to write whole grades:
    batches generate text, slow enough that a kill lands between two of them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter") / "final"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gpt_oss_dir), dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(str(out))
    (out / "run_config.json").write_text(json.dumps({"name": "resume", "model": str(tiny_gpt_oss_dir),
                                                     "datasets": [], "example_unit": "submission"}))
    return out


def _inbox(tmp_path: Path) -> Path:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for n in range(N_FILES):  # copies of the samples, each its own text (and so its own hash)
        src = SAMPLES[n % len(SAMPLES)]
        (inbox / f"student-{n:02d}.md").write_text(src.read_text() + f"\n\nSubmitted by student {n}.\n")
    return inbox


def _batch_cmd(adapter: Path, inbox: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "inference", "batch", "--adapter", str(adapter), "--rubric", str(RUBRIC),
            "--out-dir", str(out), "--batch-size", "2", "--max-new-tokens", "24", "--device", "cpu", str(inbox)]


def _complete_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return text[: text.rfind("\n") + 1].splitlines()


def _final(out: Path) -> tuple[list[dict], list[dict]]:
    jsonl = [json.loads(line) for line in (out / "grades.jsonl").read_text(encoding="utf-8").splitlines()]
    with open(out / "grades.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return jsonl, rows


def test_a_killed_batch_resumes_and_grades_each_file_once(generating_adapter: Path, tmp_path: Path) -> None:
    inbox, out = _inbox(tmp_path), tmp_path / "out"
    cmd = _batch_cmd(generating_adapter, inbox, out)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not _complete_lines(out / "grades.jsonl") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # the first rows are out: kill it mid-run, no chance to clean up
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the batch finished before it could be killed"
    before = _complete_lines(out / "grades.jsonl")
    assert 1 <= len(before) < N_FILES
    # Rows are on disk as each batch finishes, in the CSV too.
    with open(out / "grades.csv", newline="", encoding="utf-8") as fh:
        streamed = {r["file"] for r in csv.DictReader(fh)}
    assert {json.loads(line)["file"] for line in before} <= streamed
    # A kill in the middle of writing leaves half a line: dropped on resume, that file graded again.
    graded = {json.loads(line)["file"] for line in before}
    cut_name = next(p.name for p in sorted(inbox.iterdir()) if p.name not in graded)
    with open(out / "grades.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"file": cut_name, "grade": {"score": 1}})[:30])
    with open(out / "grades.csv", "a", encoding="utf-8") as fh:
        fh.write(f"{cut_name},Write the overall")

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(before)} of {N_FILES} already graded, a half-written last line dropped" in again.stderr
    assert f"graded {N_FILES - len(before)} submissions" in again.stdout
    jsonl, rows = _final(out)
    names = sorted(p.name for p in inbox.iterdir())
    assert sorted(r["file"] for r in jsonl) == names  # each file exactly once
    assert [json.dumps(r, ensure_ascii=False) for r in jsonl[: len(before)]] == before  # kept, not regraded
    questions = [q.question for q in load_rubric(RUBRIC).questions]
    assert [(r["file"], r["question"]) for r in rows] == [(o["file"], q) for o in jsonl for q in questions]
    assert all(r["file"] != "file" for r in rows)  # the header once

    # Nothing left: a third run grades nothing and leaves the files as they are.
    snapshot = (out / "grades.jsonl").read_bytes(), (out / "grades.csv").read_bytes()
    third = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"graded 0 submissions (0 repaired; {N_FILES} already graded)" in third.stdout
    assert ((out / "grades.jsonl").read_bytes(), (out / "grades.csv").read_bytes()) == snapshot

    # An edited file is graded again, and still appears once.
    edited = inbox / names[0]
    edited.write_text(edited.read_text() + "\nA late correction.\n")
    fourth = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert "1 changed since graded (graded again)" in fourth.stderr and "graded 1 submissions" in fourth.stdout
    jsonl, rows = _final(out)
    assert sorted(r["file"] for r in jsonl) == names
    assert len(rows) == N_FILES * len(questions)
    from inference.grades_csv import content_sha256

    assert next(r for r in jsonl if r["file"] == names[0])["sha256"] == content_sha256(edited.read_bytes())


def test_an_output_folder_of_another_grader_is_refused(tiny_gpt_oss_dir: Path, tmp_path: Path) -> None:
    inbox, out = _inbox(tmp_path), tmp_path / "out"
    out.mkdir()
    record = {"file": "student-00.md", "sha256": "0" * 64, "rubric_sha256": "0" * 64, "base_model": "other-model",
              "adapter": None, "grade": {"score": 1, "max_score": 2, "items": []}}
    (out / "grades.jsonl").write_text(json.dumps(record) + "\n")
    proc = subprocess.run([sys.executable, "-m", "inference", "batch", "--base", str(tiny_gpt_oss_dir), "--rubric",
                           str(RUBRIC), "--out-dir", str(out), "--device", "cpu", str(inbox)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.search(r"made with another base model 'other-model'.*Choose another --out-dir", proc.stderr)
    assert (out / "grades.jsonl").read_text() == json.dumps(record) + "\n"  # left as it was
