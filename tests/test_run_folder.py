"""The run folder (data.run_folder): which checkpoints count as complete, which adapter grading
uses by default, metrics.jsonl across a resume, the stop file, the log tail, and that the UI can
import it without torch. Plain files in a temporary folder; no training."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.run_folder import RunFolder, all_adapters, is_complete, is_inside_checkpoints, read_complete
from tests.conftest import REPO



def new_run(root: Path, run_id: str = "run-1") -> RunFolder:
    folder = RunFolder(root / run_id)
    folder.path.mkdir(parents=True)
    folder.config.write_text(json.dumps({"name": run_id, "model": "embedded:tiny-gpt-oss"}))
    return folder


def write_adapter(folder: Path) -> Path:
    """The files of a PEFT adapter, as the trainer writes them before the marker."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


def save_checkpoint(run: RunFolder, step: int, name: str | None = None) -> Path:
    """What the trainer does: write into .tmp-<name>/, then publish (marker, flush, rename)."""
    name = name or run.checkpoint(step).name
    return run.publish(write_adapter(run.staging(name)), name, step)


def test_half_written_checkpoints_never_count(tmp_path):
    run = new_run(tmp_path)
    save_checkpoint(run, 2)
    save_checkpoint(run, 4)
    no_marker = write_adapter(run.checkpoint(6))  # crash before complete.json
    staged = write_adapter(run.staging("checkpoint-8"))  # crash before the rename
    (staged / "complete.json").write_text("{}")

    assert is_complete(run.checkpoint(4)) and not is_complete(no_marker)
    assert run.complete_checkpoints() == [run.checkpoint(2), run.checkpoint(4)]
    assert run.last_complete_checkpoint() == run.checkpoint(4)
    assert run.default_adapter() == run.checkpoint(4)
    assert [label for label, _ in all_adapters(tmp_path)] == ["run-1/checkpoint-4", "run-1/checkpoint-2"]
    assert read_complete(run.checkpoint(4))["step"] == 4
    # A new run has nothing to resume from or grade with.
    empty = new_run(tmp_path, "run-2")
    assert empty.last_complete_checkpoint() is None and empty.default_adapter() is None


def test_default_adapter_is_best_then_final_then_the_last_checkpoint(tmp_path):
    run = new_run(tmp_path)
    save_checkpoint(run, 3)
    save_checkpoint(run, 6)
    assert run.default_adapter() == run.checkpoint(6)
    save_checkpoint(run, 6, name="final")
    assert run.default_adapter() == run.final
    write_adapter(run.best)  # a best/ without its marker (crash while copying) is not used
    assert run.default_adapter() == run.final

    best = run.save_best(run.checkpoint(3), qwk=0.71)
    assert best == run.best and run.default_adapter() == run.best
    assert read_complete(best)["step"] == 3 and read_complete(best)["source"] == "checkpoint-3"
    assert read_complete(best)["qwk"] == 0.71
    assert (best / "adapter_model.safetensors").read_bytes() == b"weights"
    # Offered best first, then final, then the checkpoints newest first.
    assert run.adapters() == [run.best, run.final, run.checkpoint(6), run.checkpoint(3)]
    # Across runs: the run with the newest checkpoint first, its best/ first of all.
    other = new_run(tmp_path, "older")
    save_checkpoint(other, 1)
    newer = save_checkpoint(run, 9)
    labels = [label for label, _ in all_adapters(tmp_path)]
    assert labels == ["run-1/best", "run-1/final", "run-1/checkpoint-9", "run-1/checkpoint-6",
                      "run-1/checkpoint-3", "older/checkpoint-1"], labels
    assert all_adapters(tmp_path)[0][1] == run.default_adapter() and newer.exists()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        run.save_best(run.path / "checkpoint-42")


def test_metrics_append_read_and_truncate_for_a_resume(tmp_path):
    run = new_run(tmp_path)
    assert run.read_metrics() == []
    for step in range(1, 6):
        run.append_metrics({"kind": "train", "step": step, "loss": 1.0 / step})
    run.append_metrics({"kind": "eval", "step": 4, "eval_loss": 0.3})
    with open(run.metrics, "a") as f:
        f.write('{"kind": "train", "st')  # the trainer was killed mid-write
    rows = run.read_metrics()
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 1), ("train", 2), ("train", 3),
                                                     ("train", 4), ("train", 5), ("eval", 4)]
    # Resuming from checkpoint-3: the rows after it go, and so does the half line, so the
    # resumed run's first row is a line of its own.
    assert run.truncate_metrics(after_step=3) == 3
    run.append_metrics({"kind": "train", "step": 4, "loss": 0.2})
    assert [(r["kind"], r["step"]) for r in run.read_metrics()] == [
        ("train", 1), ("train", 2), ("train", 3), ("train", 4)]
    assert run.read_metrics()[-1]["loss"] == 0.2
    assert run.truncate_metrics(after_step=10) == 0
    assert not list(run.path.glob(".tmp-*"))


def test_stop_file_pid_and_base_model(tmp_path):
    run = new_run(tmp_path)
    assert not run.stop_requested()
    run.request_stop()
    assert run.stop_requested() and run.stop_file.name == "STOP"  # the trainer's name, unchanged
    run.clear_stop()
    assert not run.stop_requested()
    assert run.read_pid() is None
    run.write_pid(4242)
    assert run.read_pid() == 4242
    assert run.base_model() == "embedded:tiny-gpt-oss"
    assert RunFolder(tmp_path / "nothing").base_model() is None
    run.write_devices({"1", "0"})
    assert run.read_devices() == {"0", "1"}


def test_log_tail_keeps_the_last_lines_and_the_last_progress_update(tmp_path):
    run = new_run(tmp_path)
    assert run.log_tail() == ""
    lines = [f"line {i}" for i in range(100)] + ["steps  10%\r steps  50%\r steps 100%", "x" * 500]
    run.log.write_text("\n".join(lines) + "\n")
    tail = run.log_tail(3, width=40).splitlines()
    assert tail == ["line 99", " steps 100%", "x" * 40 + "..."]
    assert run.log_tail(2).splitlines()[-1] == "x" * 500


def test_run_ids_and_adapters_must_stay_inside_the_checkpoints_folder(tmp_path):
    root = tmp_path / "checkpoints"
    run = new_run(root)
    assert RunFolder.of("run-1", root) == run
    for bad in ("../elsewhere", "run-1/../../x", "/etc", "a/b", ""):
        with pytest.raises(ValueError, match="not a folder name inside"):
            RunFolder.of(bad, root)
    outside = write_adapter(tmp_path / "elsewhere" / "checkpoint-1")
    (root / "linked").symlink_to(outside.parent, target_is_directory=True)
    assert is_inside_checkpoints(run.path / "checkpoint-1", root)
    assert not is_inside_checkpoints(outside, root)
    assert not is_inside_checkpoints(f"{root}/../elsewhere/checkpoint-1", root)
    assert not is_inside_checkpoints(root / "linked" / "checkpoint-1", root)
    assert not is_inside_checkpoints(root, root)
    with pytest.raises(ValueError):
        RunFolder.of("linked", root)


def test_the_ui_side_imports_without_torch():
    code = ("import sys, data.run_folder, app.jobs, training.launcher; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_grading_cli_takes_a_run_folder_as_its_default_adapter(tmp_path, capsys):
    from inference.__main__ import adapter_of
    from inference.adapters import AdapterError

    run = new_run(tmp_path)
    with pytest.raises(AdapterError, match="no complete checkpoint yet"):
        adapter_of(str(run.path))
    save_checkpoint(run, 2)
    save_checkpoint(run, 2, name="final")
    assert adapter_of(str(run.path)) == str(run.final)
    run.save_best(run.checkpoint(2))
    assert adapter_of(str(run.path)) == str(run.best)
    assert str(run.best) in capsys.readouterr().err  # said on stderr; stdout is the result's
    # An adapter folder, or anything that is not a run folder, is passed on as given.
    assert adapter_of(str(run.checkpoint(2))) == str(run.checkpoint(2))
    assert adapter_of(str(tmp_path / "nowhere")) == str(tmp_path / "nowhere")
    assert adapter_of(None) is None


def finished_cpu_run(root: Path, store, val_qwk: float, run_id: str = "cpu-default-20261207-120000") -> RunFolder:
    """What the default CPU run leaves (12 steps, one evaluation with its validation agreement, a
    final adapter), recorded in ``store`` as finished; no training."""
    from training.config import save_config
    from training.presets import preset

    cfg = preset("cpu-default")
    folder = RunFolder(root / run_id)
    folder.path.mkdir(parents=True)
    save_config(cfg, folder.config)
    folder.append_metrics(*[{"kind": "train", "step": s, "epoch": round(s / 66, 4), "loss": 2.0 - s / 20, "lr": 5e-4,
                             "tokens_per_s": 50.0,
                             "total_steps": 12, "elapsed_s": 20.0 * s} for s in range(1, 13)])
    folder.append_metrics({"kind": "eval", "step": 12, "epoch": 0.1818, "eval_loss": 1.9, "total_steps": 12,
                           "val_n": 26, "val_mae": 1.4, "val_pearson_r": 0.05, "val_qwk": val_qwk})
    save_checkpoint(folder, 12, "final")
    store.create_run(run_id, cfg.model_dump(), ["deepspeed"], str(folder.path))
    store.set_run_status(run_id, "finished")
    return folder


def test_an_adapter_that_agrees_near_chance_is_said_to_be_so_with_what_would_help(tmp_path, capsys):
    """#27 item 8: the default CPU run ends at validation QWK 0.015; its adapter is not presented
    like any other grader: the note says so, and what trains a useful one."""
    from data import paths
    from data.store import Store
    from training.__main__ import main as training_cli
    from training.adapter_quality import weak_agreement_note

    store = Store()
    weak = finished_cpu_run(paths.checkpoints_dir(), store, 0.015)
    note = weak_agreement_note(weak.final)
    assert "near zero (QWK 0.015 on 26 held-out answers" in note, note
    assert "12 steps (0.18 epochs) on ~" in note and "max_steps=none" in note and "a GPU" in note
    assert training_cli(["status", weak.run_id]) == 0
    assert f"warning: {note}" in capsys.readouterr().out
    useful = finished_cpu_run(paths.checkpoints_dir(), store, 0.45, run_id="cpu-default-20261207-130000")
    assert weak_agreement_note(useful.final) is None
    assert weak_agreement_note(None) is None
