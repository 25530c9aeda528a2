"""RunConfig: presets, `--set` overrides, refusals before launch (each saying what to change), and
the NF4 path really quantizing (bitsandbytes Linear4bit + packed GPT-OSS experts) and training."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training import launcher, memory, presets
from training.__main__ import main as cli
from training.checks import check_config, config_warnings
from training.config import RunConfig, load_config
from training.memory import estimate_memory
from training.overrides import apply_overrides
from training.presets import PRESETS, hardware_preset, preset
from data.store import Store
from tests.conftest import REPO

GRADED = str(REPO / "data" / "samples" / "graded")


def gpt_oss_shell(folder: Path, **shape) -> Path:
    """A GPT-OSS model folder (config only + a stand-in weights file): enough for the checks,
    which read shapes from the config on the meta device and never load weights."""
    from transformers import GptOssConfig

    GptOssConfig(**shape).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def refused(cfg: RunConfig) -> str:
    """The problems check_config finds, and proof that launch refuses the same (no subprocess)."""
    problems = check_config(cfg)
    with pytest.raises(launcher.ConfigRefused):
        launcher.launch(cfg)
    assert Store().list_runs() == []  # nothing was started or recorded
    return "\n".join(problems)


def test_presets_are_valid_and_the_cpu_ones_launchable():
    assert set(PRESETS) == {"seed-2xh200-120b", "h200-20b", "h200-120b", "embedded-grader", "cpu-default", "smoke"}
    grader = PRESETS["embedded-grader"]  # the recipe measured on Mohler (BENCHMARKS.md), on one GPU
    assert (grader.model, grader.example_unit, grader.lora_r, grader.epochs, grader.num_gpus, grader.train_anchors) == \
        ("embedded:gemma-3-270m", "item", 16, 5.0, 1, 8)
    assert grader.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    seed = PRESETS["seed-2xh200-120b"]
    assert (seed.lora_r, seed.lora_alpha, seed.per_device_batch_size, seed.gradient_accumulation_steps) == (8, 32, 3, 4)
    assert (seed.learning_rate, seed.epochs, seed.quantization, seed.zero_stage, seed.num_gpus) == (2e-4, 3.0, "nf4", 2, 2)
    assert seed.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"] and seed.precision == "bf16"
    assert check_config(preset("smoke")) == []
    assert check_config(preset("cpu-default")) == []
    # The 120b is not on this machine: refused for that reason, with what to do.
    assert any("not found" in p and "model=" in p for p in check_config(preset("seed-2xh200-120b")))


def test_overrides_are_typed_and_unknown_keys_name_close_matches(tmp_path):
    cfg = apply_overrides(preset("smoke"), [
        "lora_r=16", "learning_rate=1e-4", "max_steps=none", "gradient_checkpointing=false",
        "target_modules=q_proj,v_proj", "zero_stage=3", "gpu_memory_gib=80", 'datasets=["a.json","db:essays"]',
    ])
    assert cfg.lora_r == 16 and cfg.learning_rate == 1e-4 and cfg.max_steps is None
    assert cfg.gradient_checkpointing is False and cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.zero_stage == 3 and cfg.gpu_memory_gib == 80.0 and cfg.datasets == ["a.json", "db:essays"]
    with pytest.raises(ValueError, match="lora_rank.*Did you mean: lora_r"):
        apply_overrides(cfg, ["lora_rank=4"])
    with pytest.raises(ValueError, match="zero_stage"):
        apply_overrides(cfg, ["zero_stage=1"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(cfg, ["lora_r"])
    # A config file round-trips; unknown keys in a file are refused the same way.
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({**cfg.model_dump(), "learning_rat": 1}))
    with pytest.raises(ValueError, match="Did you mean: learning_rate"):
        load_config(f)


def test_each_bad_configuration_is_refused_with_what_to_change(tmp_path, tiny_gpt_oss_dir):
    ok = preset("smoke").model_copy(update={"model": str(tiny_gpt_oss_dir)})
    assert check_config(ok) == []

    msg = refused(ok.model_copy(update={"learning_rate": 0.0}))
    assert "learning_rate must be > 0" in msg and "learning_rate=2e-4" in msg
    msg = refused(ok.model_copy(update={"lora_r": 0}))
    assert "lora_r must be >= 1" in msg and "lora_r=8" in msg
    msg = refused(ok.model_copy(update={"model": str(tmp_path / "no-such-model")}))
    assert "no-such-model not found" in msg and "model=" in msg
    msg = refused(ok.model_copy(update={"target_modules": ["q_proj", "query_key_value"]}))
    assert "'query_key_value' is not a layer of this gpt_oss model" in msg and "q_proj" in msg

    # A batch that cannot fit the stated GPU memory: a 20b-shaped GPT-OSS, batch 16 at 2048 tokens.
    m20 = gpt_oss_shell(tmp_path / "gpt-oss-20b", num_hidden_layers=24, num_local_experts=32)
    big_batch = ok.model_copy(update={"model": str(m20), "per_device_batch_size": 16, "max_length": 2048,
                                      "precision": "bf16", "gpu_memory_gib": 80.0, "zero_stage": 2})
    msg = refused(big_batch)
    assert "batch does not fit" in msg and "per_device_batch_size=" in msg and "gradient_accumulation_steps=" in msg
    fits = big_batch.model_copy(update={"per_device_batch_size": 1})
    assert check_config(fits) == [] and estimate_memory(fits).fits

    # ZeRO-2 replicates the weights: a 120b in bf16 cannot fit one 140 GiB H200 per rank.
    m120 = gpt_oss_shell(tmp_path / "gpt-oss-120b")
    z2 = preset("seed-2xh200-120b").model_copy(update={"model": str(m120), "quantization": "none", "datasets": [GRADED],
                                                        "gpu_memory_gib": 140.0})  # the presets leave it to CUDA
    msg = refused(z2)
    assert "ZeRO-2 keeps a full copy of the weights on every rank" in msg and "quantization=nf4" in msg
    est = estimate_memory(z2)
    assert est.weights_gib > 200 and not est.fits
    # The user's own recipe (4-bit) fits its two 140 GiB GPUs; on a machine without them the check
    # refuses it for the GPUs alone.
    seed_ok = z2.model_copy(update={"quantization": "nf4"})
    assert estimate_memory(seed_ok).total_gib < 140
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memory, "gpu_count", lambda: 2)
        mp.setattr(memory, "gpu_memory_gib", lambda: 140.0)
        assert check_config(seed_ok) == []
    if memory.gpu_count() < 2:
        assert [p for p in check_config(seed_ok) if not p.startswith("num_gpus=2 but this machine has")] == []
    # One H200 for the 120b: NF4 experts, recomputation, 6 x 2,048 tokens (measured 64.05 GiB).
    one = preset("h200-120b").model_copy(update={"model": str(m120), "datasets": [GRADED]})
    est = estimate_memory(one)
    assert est.world_size == 1 and 60 < est.total_gib < 68 and est.fits
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memory, "gpu_count", lambda: 1)
        mp.setattr(memory, "gpu_memory_gib", lambda: 140.0)
        assert check_config(one) == []


def test_cli_refuses_before_launch_and_prints_why(capsys):
    assert cli(["run", "--preset", "smoke", "--set", "learning_rate=-1", "--set", "lora_r=0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to launch" in err and "learning_rate" in err and "lora_r" in err
    assert cli(["run", "--preset", "smoke", "--set", "lora_rnk=4"]) == 2
    assert "Did you mean: lora_r" in capsys.readouterr().err
    assert cli(["run", "--preset", "smok"]) == 2
    assert "smoke" in capsys.readouterr().err
    assert Store().list_runs() == []


def test_without_a_preset_the_run_takes_this_machines_preset_and_says_what_max_steps_cuts(capsys):
    everything_here = lambda spec: True  # noqa: E731  (a machine holding every preset's weights)
    assert [hardware_preset(n, weights_present=everything_here) for n in (0, 1, 2, 8)] == [
        "cpu-default", "h200-20b", "seed-2xh200-120b", "seed-2xh200-120b"]
    # lora_r=0 is refused, so nothing launches; what the user reads before that is the point.
    assert cli(["run", "--set", "epochs=3", "--set", "lora_r=0"]) == 2
    err = capsys.readouterr().err
    assert f"using preset {hardware_preset()}, the one for this machine" in err
    if hardware_preset() == "cpu-default":  # max_steps=12: far less than 3 epochs of the sample data
        assert "warning: max_steps=12 stops the run after" in err and "of the 3 asked for" in err
        assert "set max_steps=none" in err
    # A setting the check refuses is reported as such, not as a crash of the warnings before it.
    assert cli(["run", "--preset", "cpu-default", "--set", "per_device_batch_size=0"]) == 2
    assert "per_device_batch_size must be >= 1" in capsys.readouterr().err
    assert Store().list_runs() == []
    # Steps that cover the epochs asked for, or no max_steps at all: nothing to say.
    assert config_warnings(preset("cpu-default").model_copy(update={"max_steps": 100_000})) == []
    assert config_warnings(preset("cpu-default").model_copy(update={"max_steps": None})) == []


def test_a_preset_this_machine_or_model_cannot_run_is_refused_with_what_to_change(tmp_path, monkeypatch):
    gemma_seed = preset("seed-2xh200-120b").model_copy(update={"model": "embedded:gemma-3-270m"})
    if memory.gpu_count() == 0:
        msg = "\n".join(check_config(gemma_seed))
        assert "num_gpus=2 but this machine has no GPU" in msg and "num_gpus=none" in msg
        assert "preset cpu-default" in msg
    # The same preset on a machine with one 80 GiB GPU.
    monkeypatch.setattr(memory, "gpu_count", lambda: 1)
    monkeypatch.setattr(memory, "gpu_memory_gib", lambda: 80.0)
    msg = "\n".join(check_config(gemma_seed.model_copy(update={"gpu_memory_gib": 140.0})))
    # No GPT-OSS weights here: the preset named is one that runs (#27 item 7), not h200-20b.
    assert "num_gpus=2 but this machine has 1 GPU: set num_gpus=1, or start from preset embedded-grader" in msg
    assert "gpu_memory_gib=140 but this machine's GPU has 80.0 GiB: set gpu_memory_gib=80" in msg
    assert check_config(gemma_seed.model_copy(update={"num_gpus": 1, "gpu_memory_gib": None})) == []
    # int8 cannot pack GPT-OSS's 3-D expert weights: refused, nf4 named instead.
    m20 = gpt_oss_shell(tmp_path / "gpt-oss-20b", num_hidden_layers=2, num_local_experts=4)
    msg = "\n".join(check_config(gemma_seed.model_copy(update={"model": str(m20), "quantization": "int8",
                                                                "num_gpus": 1, "gpu_memory_gib": None})))
    assert "quantization=int8 leaves GPT-OSS's expert weights" in msg and "quantization=nf4" in msg


def assert_loss_falls(model, tok, trainable, steps: int = 6) -> None:
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.tensor([tok.encode("The grade is 4 out of 5 because the answer names both reactants.")])
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_nf4_really_quantizes_gpt_oss_and_trains(tiny_gpt_oss_dir):
    from training import models
    from training.packed import is_quantized

    cfg = preset("smoke").model_copy(update={"model": str(tiny_gpt_oss_dir), "quantization": "nf4",
                                             "lora_experts": True, "lora_dropout": 0.0})
    torch.manual_seed(0)
    model, tok, model_type, _ = models.load_model_and_tokenizer(cfg, torch.device("cpu"))
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds  # bitsandbytes took the attention projections
    assert is_quantized(model)  # and the 3-D expert weights are packed too
    report = models.quantization_report(model)
    assert report["linear_4bit_layers"] == 8 and report["packed_expert_params"] > 0
    assert report["quantized_params"] >= report["packed_expert_params"]

    model = models.apply_lora(model, cfg, model_type)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert any("experts" in n for n, p in model.named_parameters() if p.requires_grad)
    assert_loss_falls(model, tok, trainable)


def test_mxfp4_keeps_gpt_oss_experts_packed_and_trains(tmp_path, tiny_gpt_oss_dir):
    """quantization=mxfp4: GPT-OSS experts held in MXFP4 (no bitsandbytes layers), LoRA trains; the
    memory estimate counts the experts at 4.25 bits and the fast path's activations (the h200-20b
    preset's batch of 8 without recomputation fits one H200); other models are refused."""
    from training import models
    from training.packed import MXFP4Store

    cfg = preset("smoke").model_copy(update={"model": str(tiny_gpt_oss_dir), "quantization": "mxfp4",
                                             "lora_experts": True, "lora_dropout": 0.0})
    assert check_config(cfg) == []
    torch.manual_seed(0)
    model, tok, model_type, _ = models.load_model_and_tokenizer(cfg, torch.device("cpu"))
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" not in kinds and "MXFP4Store" in kinds
    report = models.quantization_report(model)
    assert report["packed_expert_format"] == "mxfp4" and report["packed_expert_params"] > 0
    stores = [m for m in model.modules() if isinstance(m, MXFP4Store)]
    assert 0.5 < sum(s.nbytes() for s in stores) / sum(s.logical_numel for s in stores) < 0.54
    model = models.apply_lora(model, cfg, model_type)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any("experts" in n for n, p in model.named_parameters() if p.requires_grad)
    assert_loss_falls(model, tok, trainable)

    m20 = gpt_oss_shell(tmp_path / "gpt-oss-20b", num_hidden_layers=24, num_local_experts=32)
    h200 = preset("h200-20b").model_copy(update={"model": str(m20), "datasets": [GRADED]})
    est, bf16 = estimate_memory(h200), estimate_memory(h200.model_copy(update={"quantization": "none"}))
    assert 11 < est.weights_gib < 15 and 36 < bf16.weights_gib < 42
    assert 48 < est.total_gib < 60 and est.fits  # measured on the H200: 53.0 GiB (bench, BENCHMARKS.md round 2d)
    msg = refused(cfg.model_copy(update={"model": "embedded:gemma-3-270m", "lora_experts": False}))
    assert "quantization=mxfp4 keeps GPT-OSS's expert weights in MXFP4" in msg and "gemma3_text" in msg


def test_a_gpu_newcomer_gets_a_preset_that_runs_on_the_card_they_have(monkeypatch, capsys):
    """#27 item 7: one H100 80 GB, no GPT-OSS weights, no preset or model given: the embedded
    model with the grading recipe, said on stderr, and nothing in it is refused (it used to pick
    h200-20b: 140 GiB on an 80 GB card, the absent openai/gpt-oss-20b)."""
    none_here = presets.weights_here  # this machine: no GPT-OSS weights, the embedded models
    assert not none_here("openai/gpt-oss-20b") and none_here("embedded:gemma-3-270m")
    everything_here = lambda spec: True  # noqa: E731
    assert [hardware_preset(n, 79.2, weights_present=none_here) for n in (0, 1, 2)] == [
        "cpu-default", "embedded-grader", "embedded-grader"]
    # With the weights, by GPU count and what fits one card; presets leave the memory to CUDA.
    assert hardware_preset(1, 79.2, weights_present=everything_here) == "h200-20b"
    assert hardware_preset(2, 139.7, weights_present=everything_here) == "seed-2xh200-120b"
    only_120b = lambda spec: spec == "openai/gpt-oss-120b"  # noqa: E731
    assert hardware_preset(1, 139.7, weights_present=only_120b) == "h200-120b"
    assert all(p.gpu_memory_gib is None for p in PRESETS.values())
    # A model given picks by its kind: a Gemma never gets a GPT-OSS preset's MXFP4.
    assert hardware_preset(1, 79.2, model="embedded:gemma-3-270m", weights_present=everything_here) == "embedded-grader"
    assert hardware_preset(1, 79.2, model="embedded:tiny-gpt-oss", weights_present=none_here) == "h200-20b"
    # A memory estimate that cannot fit the card is passed over for the next preset.
    monkeypatch.setattr(memory, "estimate_memory", lambda cfg: memory.MemoryEstimate(
        *[None] * 7, fits=cfg.model != "openai/gpt-oss-20b"))
    assert hardware_preset(1, 79.2, weights_present=everything_here) == "h200-120b"
    monkeypatch.undo()

    # The CLI on that card: says which preset and why; the preset itself passes every check.
    monkeypatch.setattr(memory, "gpu_count", lambda: 1)
    monkeypatch.setattr(memory, "gpu_memory_gib", lambda: 79.2)
    assert cli(["run", "--set", "lora_r=0"]) == 2  # refused for lora_r alone: nothing launches
    err = capsys.readouterr().err
    assert "using preset embedded-grader, the one for this machine (1 GPU of 79.2 GiB; no GPT-OSS weights here" in err
    assert "the embedded Gemma 3 270M with the grading recipe" in err
    assert [line for line in err.splitlines() if line.startswith("  - ")] == [
        "  - lora_r must be >= 1 (got 0); r=0 trains nothing. Try lora_r=8"], err
    assert check_config(preset("embedded-grader")) == []
    assert Store().list_runs() == []


def test_the_launch_command_gives_the_ranks_the_devices_the_run_is_booked_on(monkeypatch, tmp_path):
    """One host: DeepSpeed's launcher gets the ranks' devices, the same ones the one-run-per-device
    check books (CUDA_VISIBLE_DEVICES respected, num_gpus taking the first); a hostfile: the runner."""
    from training import launcher

    cpu = preset("smoke")
    if memory.gpu_count() == 0:
        cmd = launcher.build_command(cpu, tmp_path)
        assert launcher.world_of(cmd) == {"localhost": [0, 1]} and launcher.device_set(cpu) == {"cpu"}
        assert launcher.command_text(cmd).endswith("# ranks: 2 on localhost (CPU, gloo)")
    monkeypatch.setattr(memory, "gpu_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    one = cpu.model_copy(update={"num_gpus": 1})
    assert launcher.world_of(launcher.build_command(one, tmp_path)) == {"localhost": [2]}
    assert launcher.device_set(one) == {"2"}
    every = cpu.model_copy(update={"num_gpus": None})
    assert launcher.world_of(launcher.build_command(every, tmp_path)) == {"localhost": [2, 3]}
    assert launcher.command_text(launcher.build_command(every, tmp_path)).endswith("(GPUs 2, 3)")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert launcher.world_of(launcher.build_command(every, tmp_path)) == {"localhost": [0, 1, 2, 3]}
    hosts = tmp_path / "hostfile"
    hosts.write_text("node1 slots=8\nnode2 slots=8\n")
    multi = launcher.build_command(every.model_copy(update={"hostfile": str(hosts)}), tmp_path)
    assert Path(multi[0]).name == "deepspeed" and multi[1:3] == ["--hostfile", str(hosts)]
    assert launcher.world_of(multi) is None
