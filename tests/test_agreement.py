"""A grader judged by agreement with the humans (issue #13), on the tiny GPT-OSS with the real
tokenizer: a run with a validation set logs MAE / r / QWK and keeps the best one as best/;
calibration maps a skewed predictor back onto the human scale; item-level grades add up to the
submission's grade; unsure questions are flagged for review in the CLI and the CSV."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from data.loading import load_rubric
from data.markdown import read_markdown
from data.prompt_format import soft_score_target
from data.run_folder import RunFolder, read_complete
from scoring.calibration import fit_calibration, load_calibration
from inference.engine import get_engine
from scoring.distribution import REVIEW_THRESHOLD, confidence, expected_score
from scoring.selective import load_review
from training.config import save_config
from training.overrides import apply_overrides
from training.presets import preset
from tests.conftest import REPO

GRADED = REPO / "data" / "samples" / "graded"
RUBRIC = REPO / "data" / "samples" / "rubrics" / "algebra-linear.json"
SUBMISSION = REPO / "data" / "samples" / "submissions" / "algebra-linear-chloe.md"


def test_calibration_maps_a_skewed_predictor_back_onto_the_human_scale() -> None:
    rng = np.random.default_rng(0)
    human = rng.integers(0, 6, size=400).astype(float)
    # A grader that keeps the order but squeezes everything towards 3.5 of 5.
    predicted = 3.0 + 0.2 * human + rng.normal(0, 0.05, size=400)
    cal = fit_calibration(predicted, human, [5.0] * 400)
    assert cal is not None
    mapped = np.array([cal.apply(p, 5.0) for p in predicted])
    assert np.abs(mapped - human).mean() < 0.2 < np.abs(predicted - human).mean()
    assert mapped.std() > 3 * predicted.std()
    # monotone: a higher expected score never maps lower
    grid = np.linspace(0, 5, 51)
    assert all(np.diff([cal.apply(g, 5.0) for g in grid]) >= -1e-12)


def test_soft_targets_and_confidence() -> None:
    assert soft_score_target([3.5], 5) == [0, 0, 0, 0.5, 0.5, 0]
    q = soft_score_target([4, 3], 5)
    assert q == [0, 0, 0, 0.5, 0.5, 0] and expected_score(q) == 3.5
    assert confidence([0, 0, 0, 0, 1, 0]) == 1.0
    assert confidence([0.5, 0, 0, 0, 0, 0.5]) == 0.0
    assert confidence(q) > REVIEW_THRESHOLD > confidence([0.5, 0, 0, 0, 0, 0.5])


def test_item_level_grades_add_up_to_the_submission_grade(tiny_gpt_oss_dir: Path) -> None:
    engine = get_engine(str(tiny_gpt_oss_dir), device="cpu")
    rubric = load_rubric(RUBRIC)
    result = engine.grade(read_markdown(SUBMISSION), rubric, unit="item")
    g = result.grade
    assert result.unit == "item" and not result.repaired and result.repairs == []
    assert [it.question for it in g.items] == [q.question for q in rubric.questions]
    assert g.score == pytest.approx(sum(it.score for it in g.items), abs=0.011)
    assert g.max_score == rubric.max_score
    for it, probs, conf in zip(g.items, result.score_probs, result.confidence):
        assert 0 <= it.score <= it.max_score
        assert list(probs) == [str(v) for v in range(int(it.max_score) + 1)]
        assert sum(probs.values()) == pytest.approx(1, abs=1e-3)
        assert it.score == pytest.approx(expected_score(list(probs.values())), abs=0.011)
        assert 0 <= conf <= 1


@pytest.fixture(scope="module")
def validated_run(tmp_path_factory, tiny_gpt_oss_dir) -> dict:
    """A CLI run (2 gloo ranks) with a separate validation set, evaluated every 2 steps, its prompts
    showing teacher anchors (up to 3 other graded answers of the question; some show none)."""
    base = tmp_path_factory.mktemp("agreement_run")
    env = dict(os.environ, GRADER_CHECKPOINTS=str(base / "checkpoints"), GRADER_DB=str(base / "studio.db"))
    train = [str(p) for p in sorted((GRADED / "py-functions").glob("*.json"))]
    cfg = apply_overrides(preset("smoke"), [
        "datasets=" + json.dumps(train), "validation_datasets=" + json.dumps([str(GRADED / "algebra-linear")]),
        "max_steps=8", "eval_every_steps=2", "save_every_steps=100", "learning_rate=5e-2", "lr_scheduler=constant",
        "train_anchors=3",
    ]).model_copy(update={"name": "agreement"})
    save_config(cfg, base / "cfg.json")
    proc = subprocess.run([sys.executable, "-m", "training", "run", "--config", str(base / "cfg.json")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"run_dir": Path(proc.stdout.strip().splitlines()[-1]), "env": env, "base": base}


def test_validation_agreement_is_logged_and_the_best_checkpoint_kept(validated_run) -> None:
    folder = RunFolder(validated_run["run_dir"])
    evals = [r for r in folder.read_metrics() if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    for r in evals:
        assert r["val_n"] == 40  # 10 validation submissions x 4 questions
        assert r["val_mae"] >= 0 and -1 <= r["val_qwk"] <= 1
    # best/ is the evaluation with the highest QWK (ties: r, then the earlier step)
    key = lambda r: (r["val_qwk"], r["val_pearson_r"] if r["val_pearson_r"] is not None else -1.0)  # noqa: E731
    best_row = max(evals, key=key)
    best_step = next(r["step"] for r in evals if key(r) == key(best_row))
    assert read_complete(folder.best)["step"] == best_step
    assert folder.default_adapter() == folder.best
    assert load_calibration(folder.best) is not None  # fitted on the validation set at that step
    # grades with and without anchors have confidences of different kinds: a review threshold each,
    # chosen on the validation items of that kind
    review = load_review(folder.best)
    assert review["anchored"]["n"] > 0 and review["n"] > 0 and review["anchored"]["n"] + review["n"] == 40
    assert isinstance(review["anchored"]["threshold"], float) and review["anchored"]["curve"]
    best_w = load_file(str(folder.best / "adapter_model.safetensors"))
    final_w = load_file(str(folder.final / "adapter_model.safetensors"))
    same = all(np.array_equal(best_w[k].numpy(), final_w[k].numpy()) for k in best_w)
    assert same == (best_step == 8), "best/ must be the best step's weights, not the last step's"


def test_unsure_questions_are_flagged_in_cli_and_csv(validated_run, tmp_path: Path) -> None:
    folder = RunFolder(validated_run["run_dir"])
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / SUBMISSION.name).write_text(SUBMISSION.read_text())
    out = subprocess.run([sys.executable, "-m", "inference", "grade", "--adapter", str(folder.best), "--rubric",
                          str(RUBRIC), str(SUBMISSION)], cwd=REPO, env=validated_run["env"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    graded = json.loads(out.stdout)
    graded = graded[0] if isinstance(graded, list) else graded
    conf = graded["confidence"]
    assert graded["unit"] == "item" and len(conf) == 4
    assert graded["needs_review"] == [c < REVIEW_THRESHOLD for c in conf]
    batch = subprocess.run([sys.executable, "-m", "inference", "batch", "--adapter", str(folder.best), "--rubric",
                            str(RUBRIC), "--out-dir", str(tmp_path), str(inbox)], cwd=REPO,
                           env=validated_run["env"], capture_output=True, text=True, timeout=600)
    assert batch.returncode == 0, batch.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "grades.csv", encoding="utf-8")))
    assert [float(r["confidence"]) for r in rows] == pytest.approx(conf, abs=1e-4)
    assert [r["needs_review"] == "1" for r in rows] == graded["needs_review"]


def test_evaluate_reports_agreement_with_the_teachers_corrections(validated_run, tmp_path: Path) -> None:
    """A question the teacher corrected in the Review tab shows up in evaluate's report for the
    adapter that graded it."""
    from data.store import Store

    folder = RunFolder(validated_run["run_dir"])
    env = validated_run["env"]
    out = subprocess.run([sys.executable, "-m", "inference", "grade", "--adapter", str(folder.best), "--rubric",
                          str(RUBRIC), str(SUBMISSION)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    store = Store(Path(env["GRADER_DB"]))
    grade_id = max(g["id"] for g in store.grades(limit=-1))
    store.add_correction(grade_id, 0, teacher_score=3, corrected_by="teacher")
    report_path = tmp_path / "report.json"
    ev = subprocess.run([sys.executable, "-m", "inference", "evaluate", "--adapter", str(folder.best), "--data",
                         str(GRADED / "algebra-linear"), "--no-base", "--n-boot", "10", "--json", str(report_path)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "agreement with the teacher's corrections" in ev.stdout
    report = json.loads(report_path.read_text())
    (mine,) = report["teacher_agreement"]
    assert mine["adapter"] == str(folder.best.resolve()) and mine["n"] == 1
    assert mine["pairs"][0]["teacher_score"] == 3
