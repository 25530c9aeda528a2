"""Configure tab: the RunConfig form (generated from the pydantic model), presets, a live memory
estimate per GPU, validation messages, the exact launch command, save/load config files.

Everything here calls `training.config` and `training.launcher.build_command`, the same code the
CLI uses, so the command shown is the command that runs.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from app.common import Settings, dataset_choices, model_choices
from app.forms import ModelForm
from data import paths

# Layout only (which accordion a field sits in); widgets and values come from the model itself.
GROUPS = {
    "Run": ["name", "model", "datasets", "validation_datasets", "eval_fraction", "eval_split", "split_seed",
            "example_unit", "train_anchors", "review_target_qwk", "max_length"],
    "Schedule": ["epochs", "max_steps", "per_device_batch_size", "gradient_accumulation_steps",
                 "learning_rate", "weight_decay", "lr_scheduler", "warmup_ratio", "save_every_steps",
                 "eval_every_steps", "seed"],
    "LoRA": ["lora_r", "lora_alpha", "lora_dropout", "target_modules", "lora_experts"],
    "Hardware": ["precision", "quantization", "zero_stage", "offload_optimizer", "num_gpus",
                 "num_processes", "hostfile", "gpu_memory_gib", "gradient_checkpointing",
                 "fast_path", "compile_layers", "trust_remote_code"],
}


def presets() -> dict[str, Any]:
    from training.presets import PRESETS

    return PRESETS


def memory_estimate(cfg) -> tuple[Any, str]:
    """(MemoryEstimate or None, its Markdown for the page): the per-GPU memory of `cfg`."""
    from training.memory import estimate_memory

    try:
        est = estimate_memory(cfg)
    except Exception as exc:  # a model folder the estimate cannot read must not break the page
        return None, f"Memory estimate unavailable: {type(exc).__name__}: {exc}"
    return est, est.markdown()


def command_text(cfg) -> str:
    from training import launcher

    try:
        cmd = launcher.build_command(cfg, paths.checkpoints_dir() / "<run id>")
    except Exception as exc:
        return f"# cannot build the command: {exc}"
    return launcher.command_text(cmd)


def describe(form: ModelForm, values) -> tuple[str, str, str]:
    """(validation messages, memory estimate, launch command) for the form's current values."""
    from training.checks import check_config, config_warnings

    cfg, errors = form.to_model(values)
    if cfg is None:
        return ("**Invalid config:**\n" + "\n".join(f"- {e}" for e in errors), "", "")
    problems = check_config(cfg)
    est, memory = memory_estimate(cfg)
    msg = ("**Launch refused until fixed:**\n" + "\n".join(f"- {p}" for p in problems)
           if problems else "Config is valid.")
    if est is not None and not est.fits:
        msg += " **But it will probably run out of GPU memory: see the estimate.**"
    warnings = config_warnings(cfg)
    if warnings:
        msg += "\n\n**Check before launching:**\n" + "\n".join(f"- {w}" for w in warnings)
    return msg, memory, command_text(cfg)


def build(settings: Settings) -> dict[str, Any]:
    from training.config import RunConfig, load_config, save_config
    from training.presets import hardware_preset

    all_presets = presets()
    # The form opens on the real preset for this machine's hardware (not the smoke pipeline check).
    start = hardware_preset()
    initial = all_presets[start]
    with gr.Row():
        preset = gr.Dropdown(list(all_presets), value=start, label="Preset", elem_id="cfg-preset")
        load_file = gr.File(label="Load config file (.json)", file_types=[".json"], height=110,
                            elem_id="cfg-load")
        save_btn = gr.Button("Save config file", elem_id="cfg-save")
        saved = gr.File(label="Saved config", interactive=False, height=110, elem_id="cfg-saved")
    form = ModelForm(RunConfig, choices={"model": model_choices(), "datasets": dataset_choices(),
                                         "validation_datasets": dataset_choices()}, groups=GROUPS)
    form.render(initial)
    with gr.Row():
        with gr.Column():
            messages = gr.Markdown(elem_id="cfg-messages")
            memory = gr.Markdown(elem_id="cfg-memory")
        command = gr.Code(label="Launch command (exactly what Train runs)", language="shell",
                          interactive=False, wrap_lines=True, lines=3, max_lines=8,
                          elem_id="cfg-command")

    def on_preset(name):
        if name not in all_presets:
            return [gr.update()] * len(form.names)
        return form.values_of(all_presets[name])

    def on_load(file):
        if not file:
            return [gr.update()] * len(form.names)
        try:
            cfg = load_config(file)
        except Exception as exc:
            gr.Warning(f"Could not load the config: {exc}")
            return [gr.update()] * len(form.names)
        return form.values_of(cfg)

    def on_save(*values):
        cfg, errors = form.to_model(values)
        if cfg is None:
            raise gr.Error("Fix the config first: " + "; ".join(errors))
        out = Path(tempfile.mkdtemp(prefix="grader-config-")) / "run_config.json"
        save_config(cfg, out)
        return str(out)

    preset.change(on_preset, [preset], form.inputs)
    load_file.upload(on_load, [load_file], form.inputs)
    save_btn.click(on_save, form.inputs, [saved], api_name="save_config")
    gr.on([w.change for w in form.inputs], lambda *v: describe(form, v), form.inputs,
          [messages, memory, command], trigger_mode="always_last", api_name="describe_config")

    def refresh_choices():
        choices = dataset_choices()
        return gr.update(choices=choices), gr.update(choices=choices)

    return {"form": form, "preset": preset, "describe": (lambda *v: describe(form, v),
                                                        form.inputs, [messages, memory, command]),
            "refresh_datasets": (refresh_choices, None,
                                 [form.widgets["datasets"], form.widgets["validation_datasets"]])}
