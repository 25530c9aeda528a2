"""The training engine end to end: a tiny GPT-OSS trained through the real `deepspeed` launcher
with 2 gloo ranks under ZeRO-2, stopped, resumed, and its adapter reloaded with PEFT."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.run_folder import RunFolder
from data.store import Store
from training import launcher
from training.config import save_config
from training.overrides import apply_overrides
from training.presets import preset
from tests.conftest import REPO
from tests.test_reliability_support import frozen, write_tiny_dataset


def small_config(data: Path, **changes):
    """The smoke preset on a fixed set of 10 short one-question submissions (2 held out; tests/
    test_reliability_support.py's tiny dataset, ~200 tokens an example instead of the samples'
    ~1.2k: the launcher, DeepSpeed and the trainer are under test here, not the data), 8 optimizer
    steps, whole-submission examples. A step takes well under a second on 2 cores, so the stop test
    freezes the run before it asks it to stop (an item-level step takes ~0.1 s; tests/
    test_agreement.py trains item-level runs)."""
    cfg = apply_overrides(preset("smoke"), [
        "datasets=" + json.dumps([str(data)]),
        "eval_fraction=0.2", "max_steps=8", "save_every_steps=4", "learning_rate=1e-2",
        "lr_scheduler=constant", "lora_experts=true", "lora_dropout=0", "debug=true", "example_unit=submission",
        "max_length=512",
    ])
    return cfg.model_copy(update=changes)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """10 graded one-question submissions (all valid), the same for every run of this module."""
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_data"), n=10)


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in RunFolder(run_dir).read_metrics() if r["kind"] == "train"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_gpt_oss_dir, tiny_data) -> dict:
    """One uninterrupted run through the CLI (`python -m training run --config FILE`)."""
    base = tmp_path_factory.mktemp("ds_run")
    env = dict(os.environ, GRADER_CHECKPOINTS=str(base / "checkpoints"), GRADER_DB=str(base / "studio.db"))
    cfg_file = base / "cfg.json"
    save_config(small_config(tiny_data, name="ds-test"), cfg_file)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "training", "run", "--config", str(cfg_file)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    return {"run_dir": run_dir, "stdout": proc.stdout, "db": base / "studio.db", "wall_s": wall}


def test_run_through_deepspeed_launcher_learns_and_saves_a_loadable_adapter(finished_run, tiny_gpt_oss_dir):
    run_dir: Path = finished_run["run_dir"]
    out = finished_run["stdout"]
    # The exact command is printed and recorded: DeepSpeed's launcher with 2 CPU ranks.
    assert "command: " in out and "# ranks: 2 on localhost (CPU, gloo)" in out
    command = shlex.split((run_dir / "command.txt").read_text().splitlines()[0])
    assert command[1:4] == ["-u", "-m", "deepspeed.launcher.launch"] and str(launcher.ENTRY) in command
    assert launcher.world_of(command) == {"localhost": [0, 1]}
    # DeepSpeed's CPU all-reduce segments (64 MiB of RAM per rank) are gone with the run.
    port = command[command.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    assert json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2

    # Loss falls on the fixed set (8 train examples seen 4 times).
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    first, last = (rows[0]["loss"] + rows[1]["loss"]) / 2, (rows[-1]["loss"] + rows[-2]["loss"]) / 2
    assert last < first - 0.05, [r["loss"] for r in rows]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["grad_norm"] is not None and r["samples"] == 4 * r["step"]
    assert any(r["kind"] == "eval" for r in RunFolder(run_dir).read_metrics())

    # The store saw the same run: finished, its metrics, its checkpoints.
    store = Store(finished_run["db"])
    run = store.get_run(run_dir.name)
    assert run["status"] == "finished"
    assert [m["step"] for m in store.metrics(run_dir.name) if m["kind"] == "train"] == list(range(1, 9))
    steps = sorted(c["step"] for c in store.checkpoints(run_dir.name))
    assert 4 in steps and 8 in steps

    # Both ranks hold identical LoRA weights after ZeRO-2 training.
    h0 = (run_dir / "debug" / "lora_hash_rank0.txt").read_text()
    h1 = (run_dir / "debug" / "lora_hash_rank1.txt").read_text()
    assert h0 == h1

    # The final adapter is plain PEFT (safetensors only) and reproduces the trainer's logits.
    final = run_dir / "final"
    names = {p.name for p in final.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt", "run_config.json",
            "tokenizer.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_gpt_oss_dir), dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, str(final)).eval()
    ref = torch.load(run_dir / "debug" / "reference.pt")
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    assert torch.allclose(logits, ref["logits"], atol=1e-4, rtol=1e-4)
    # And the adapter is not a no-op: the base model alone gives other logits.
    with model.disable_adapter(), torch.no_grad():
        assert not torch.allclose(model(input_ids=ref["input_ids"]).logits, ref["logits"], atol=1e-3)


def test_the_run_notes_each_phase_a_user_waits_through(finished_run):
    """#27 item 6: what the Train tab shows before the first step and during evaluations comes
    from the run itself: the launcher and the trainer note each phase as it starts."""
    phases = [p["phase"] for p in RunFolder(finished_run["run_dir"]).phases()]
    assert phases[:4] == ["starting the trainer processes (DeepSpeed's launcher)", "reading the data",
                          "loading model embedded:tiny-gpt-oss", "starting DeepSpeed"], phases
    assert phases[4] == "training" and "evaluating at step 2" in phases and phases[-1] == "training", phases
    # Once steps are counted, the bar shows them, not the phase.
    from app.train_tab import phase_text, progress

    folder = RunFolder(finished_run["run_dir"])
    assert phase_text(folder.current_phase(), progress(folder.read_metrics()), "running") is None


def test_stop_then_resume_carries_on_the_step_count_and_the_loss_curve(finished_run, tiny_data):
    cfg = small_config(tiny_data, name="ds-stop", save_every_steps=100)
    handle = launcher.launch(cfg)
    metrics = handle.run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and len(train_rows(handle.run_dir)) < 2:
        assert handle.process.poll() is None, (handle.run_dir / "train.log").read_text()[-3000:]
        time.sleep(0.05)
    # Freeze the run (SIGSTOP to its process group) while Stop is asked for: its steps are short
    # enough that it could otherwise finish all 8 before the stop arrives.
    with frozen(int((handle.run_dir / "pid").read_text()), Store().path):
        assert launcher.stop_run(handle.run_id)
    handle.process.wait(timeout=300)
    assert launcher.finalize(handle) == "stopped", (handle.run_dir / "train.log").read_text()[-3000:]
    stopped_at = train_rows(handle.run_dir)[-1]["step"]
    assert 2 <= stopped_at < 8
    # A checkpoint was written at the stop step (save_every_steps would not have saved yet).
    assert (handle.run_dir / f"checkpoint-{stopped_at}" / "complete.json").exists()
    assert launcher.run_status(handle.run_id)["status"] == "stopped"
    assert metrics.exists()

    resumed = launcher.launch(None, resume=handle.run_id, wait=True)
    assert Store().get_run(handle.run_id)["status"] == "finished", (resumed.run_dir / "train.log").read_text()[-3000:]
    rows = train_rows(handle.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))  # no step repeated, none skipped
    assert (handle.run_dir / "final" / "adapter_model.safetensors").exists()
    # Optimizer, scheduler, RNG and data position were restored: the resumed curve is the one the
    # uninterrupted run (same config and seed) drew.
    ref = {r["step"]: r["loss"] for r in train_rows(finished_run["run_dir"])}
    for r in rows:
        assert r["loss"] == pytest.approx(ref[r["step"]], rel=1e-3, abs=1e-3), (r["step"], stopped_at)


def test_mxfp4_run_trains_on_the_checkpoints_own_experts(tmp_path, tiny_data):
    """quantization=mxfp4 without recomputation (the h200-20b preset's settings) through the real
    launcher on an MXFP4 checkpoint (the published GPT-OSS layout, tiny, the real tokenizer): the
    experts stay packed as read, the loss falls, and the saved adapter on stock transformers' model
    (MXFP4 dequantized on load) gives the trainer's own logits, so what was trained is the
    checkpoint's model, not a re-quantized copy. One rank: the experts' format is under test here,
    the ranks' teamwork in the tests above."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, Mxfp4Config

    twin = tmp_path / "twin"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "launcher_twin.py"), "--shape", "tiny-vocab",
                           "--out", str(twin), "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((twin / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    env = dict(os.environ, GRADER_CHECKPOINTS=str(tmp_path / "checkpoints"), GRADER_DB=str(tmp_path / "studio.db"))
    cfg_file = tmp_path / "cfg.json"
    save_config(small_config(tiny_data, name="mxfp4-test", model=str(twin), quantization="mxfp4", gradient_checkpointing=False,
                             max_steps=6, save_every_steps=6, num_processes=1), cfg_file)
    proc = subprocess.run([sys.executable, "-m", "training", "run", "--config", str(cfg_file)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    log = (run_dir / "train.log").read_text()
    assert "'packed_expert_format': 'mxfp4'" in log
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert (rows[-1]["loss"] + rows[-2]["loss"]) / 2 < (rows[0]["loss"] + rows[1]["loss"]) / 2 - 0.05

    base = AutoModelForCausalLM.from_pretrained(str(twin), dtype=torch.float32, attn_implementation="eager",
                                                quantization_config=Mxfp4Config(dequantize=True))
    model = PeftModel.from_pretrained(base, str(run_dir / "final")).eval()
    ref = torch.load(run_dir / "debug" / "reference.pt")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ref["input_ids"]).logits, ref["logits"], atol=1e-4, rtol=1e-4)
