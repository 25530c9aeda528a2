"""Named configurations (presets state what differs from RunConfig's defaults) and the preset for a
machine: its GPUs, their memory, the weights it holds."""
from __future__ import annotations

import difflib
import json
import typing
from dataclasses import dataclass
from pathlib import Path

from data import paths
from data.model_zoo import embedded_model
from training import memory
from training.config import RunConfig
from training.model_info import model_dir

def _preset(name: str, **differences) -> RunConfig:
    """A preset: RunConfig's defaults, trained on the sample data, with ``differences``."""
    return RunConfig(name=name, datasets=[str(paths.samples_dir() / "graded")], **differences)


# The user's seed recipe: gpt-oss-120b, 4-bit, ZeRO-2 on two H200s (RunConfig's defaults are its
# LoRA r 8 / alpha 32 on q/k/v/o, batch 3 x 4, lr 2e-4, 3 epochs, ZeRO-2).
_SEED_120B = _preset("seed-2xh200-120b", model="openai/gpt-oss-120b", quantization="nf4", precision="bf16",
                     num_gpus=2)

PRESETS: dict[str, RunConfig] = {
    "seed-2xh200-120b": _SEED_120B,
    # gpt-oss-20b on one big GPU: experts kept in the checkpoint's MXFP4 (a quarter of bf16's
    # memory, the same values) leaves room to keep every layer's activations instead of
    # recomputing them.
    "h200-20b": _preset("h200-20b", model="openai/gpt-oss-20b", quantization="mxfp4", precision="bf16", num_gpus=1,
                        per_device_batch_size=8, gradient_accumulation_steps=2, gradient_checkpointing=False),
    # The seed recipe on one big GPU: experts packed to NF4 while loading, every layer recomputed,
    # more rows a micro-batch (BENCHMARKS.md, "Training speed, round 2").
    "h200-120b": _SEED_120B.model_copy(deep=True, update=dict(name="h200-120b", num_gpus=1, per_device_batch_size=6,
                                                              gradient_accumulation_steps=2)),
    # The grading recipe measured on real short-answer data (BENCHMARKS.md, "Grading quality" and
    # "Teacher anchors"): the embedded Gemma 3 270M on one GPU, LoRA on every projection, one
    # question per example, trained to read up to 8 teacher-graded answers of the question.
    "embedded-grader": _preset(
        "embedded-grader", max_length=1024, train_anchors=8, lora_r=16, lora_dropout=0.1,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], num_gpus=1,
        per_device_batch_size=16, gradient_accumulation_steps=1, warmup_ratio=0.05, epochs=5.0,
        gradient_checkpointing=False, save_every_steps=100000),
    # No GPU: the embedded Gemma 3 270M in fp32, sized to finish a first run in minutes on 2 cores
    # (a dozen samples at 1k tokens: long submissions are cut, never the grade).
    "cpu-default": _preset(
        "cpu-default", max_length=1024, lora_alpha=16, precision="fp32", zero_stage=0, per_device_batch_size=1,
        gradient_accumulation_steps=1, learning_rate=5e-4, warmup_ratio=0.0, epochs=1.0, max_steps=12,
        gradient_checkpointing=False, save_every_steps=6),
    # Pipeline check: a tiny GPT-OSS with the real tokenizer, 2 gloo ranks, ZeRO-2, about a minute
    # (max_length: the sample submissions are 1.0-1.4k GPT-OSS tokens).
    "smoke": _preset(
        "smoke", model="embedded:tiny-gpt-oss", eval_fraction=0.2, max_length=1536, lora_alpha=16,
        lora_dropout=0.0, precision="fp32", num_processes=2, per_device_batch_size=2,
        gradient_accumulation_steps=1, learning_rate=2e-3, lr_scheduler="constant", warmup_ratio=0.0,
        epochs=1.0, max_steps=8, gradient_checkpointing=False, save_every_steps=4),
}


def preset(name: str) -> RunConfig:
    """A copy of a preset (so callers may change it freely)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown preset {name!r}.{hint} Presets: {', '.join(PRESETS)}")
    return PRESETS[name].model_copy(deep=True)


# The preset of a GPU machine where no GPT-OSS preset can run (no weights here, a model of another
# kind, too little memory): the embedded model with the grading recipe, which needs nothing absent.
GPU_FALLBACK_PRESET = "embedded-grader"


CPU_PRESET = "cpu-default"


@dataclass(frozen=True)
class PresetChoice:
    """The preset for a machine, and why (what `run` says when no preset is given)."""

    name: str
    reason: str


def has_weights(folder: Path) -> bool:
    pats = ("*.safetensors", "*.bin", "*.gguf", "*.pt")
    return any(any(folder.glob(p)) for p in pats)


def _model_type(spec: str) -> str | None:
    """The model_type of the model ``spec`` names, read without loading or building it (None:
    not here, or no config)."""
    embedded = embedded_model(spec)
    if embedded is not None:
        return embedded.model_type
    folder = model_dir(RunConfig(model=spec))
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") if folder else None
    except (OSError, ValueError, AttributeError):
        return None


def weights_here(spec: str) -> bool:
    """Whether the model ``spec`` names can be trained here without a download: an embedded model
    (built from its package), or a folder or Hugging Face cache entry holding weights."""
    if embedded_model(spec) is not None:
        return True
    folder = model_dir(RunConfig(model=spec))
    return folder is not None and has_weights(folder)


def preset_choice(n_gpus: int, gpu_memory: float | None, *, model: str | None = None,
                  weights_present: typing.Callable[[str], bool] = weights_here) -> PresetChoice:
    """The preset for a machine with ``n_gpus`` GPUs of ``gpu_memory`` GiB each (None: unknown)
    and the models ``weights_present`` says are here; ``model``: the model the user gave (the
    preset's own otherwise). Without a GPU: cpu-default. With GPUs: the GPT-OSS preset that uses
    the most of them whose model is here (a given model: a GPT-OSS one) and fits one GPU by
    `estimate_memory`; else the embedded grading recipe. A pure function of its arguments."""
    if n_gpus <= 0:
        return PresetChoice(CPU_PRESET, "no GPU")
    machine = f"{n_gpus} GPU{'s' if n_gpus > 1 else ''}" + (f" of {gpu_memory:.1f} GiB" if gpu_memory else "")
    gpt_oss = sorted(((name, p) for name, p in PRESETS.items()
                      if p.num_gpus is not None and p.num_gpus <= n_gpus and name != GPU_FALLBACK_PRESET),
                     key=lambda kv: -(kv[1].num_gpus or 0))  # stable: the listed order among equals
    for name, p in gpt_oss:
        if model is None and not weights_present(p.model):
            continue
        if model is not None and _model_type(model) != "gpt_oss":
            break  # these presets are GPT-OSS recipes (MXFP4, NF4 experts)
        sized = p.model_copy(update={"model": model or p.model, "gpu_memory_gib": gpu_memory})
        if gpu_memory is None or memory.estimate_memory(sized).fits:
            return PresetChoice(name, f"{machine}; {model or p.model} is here")
    if model is not None:
        why = f"{model} is not a GPT-OSS model" if _model_type(model) != "gpt_oss" else \
            f"no GPT-OSS preset fits {machine} with {model}"
    else:
        absent = sorted({p.model for _, p in gpt_oss if not weights_present(p.model)})
        why = (f"no GPT-OSS weights here ({', '.join(absent)})" if absent else
               f"no GPT-OSS preset fits {machine}")
    return PresetChoice(GPU_FALLBACK_PRESET, f"{machine}; {why}: the embedded Gemma 3 270M with the grading recipe")


def hardware_preset(n_gpus: int | None = None, gpu_memory: float | None = None, *, model: str | None = None,
                    weights_present: typing.Callable[[str], bool] = weights_here) -> str:
    """The name of the preset for a machine (`preset_choice`); ``n_gpus`` None: this machine,
    its GPU count and memory as CUDA reports them."""
    if n_gpus is None:
        n_gpus, gpu_memory = memory.gpu_count(), memory.gpu_memory_gib()
    return preset_choice(n_gpus, gpu_memory, model=model, weights_present=weights_present).name
