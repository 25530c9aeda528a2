"""The one typed training configuration: `RunConfig`, and reading and writing it as a file.

The UI edits it, the CLI reads it from a file (or a preset plus `--set key=value` overrides), the
launcher writes it into the run folder, and the trainer reads it back. Every knob lives here.
Around it, one job a module: `training.presets` (named configurations and the one for a machine),
`training.overrides` (`--set key=value`), `training.model_info` (a model's shapes, read without
loading it), `training.memory` (the per-GPU memory estimate) and `training.checks` (what refuses a
launch, and what launches but is worth a warning).
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# GPT-OSS keeps its expert weights as 3-D parameters of `mlp.experts` (not nn.Linear), so
# bitsandbytes skips them: training.quant_experts packs them, peft reaches them through
# target_parameters. The one list of their names (the attributes of transformers' GptOssExperts).
GPT_OSS_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


GPT_OSS_EXPERT_PARAMETERS = tuple(f"mlp.experts.{w}" for w in GPT_OSS_EXPERT_WEIGHTS)  # peft target_parameters


class RunConfig(BaseModel):
    """Everything a training run needs. Field names are the contract (UI, CLI, run folder)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = "run"
    model: str = "embedded:gemma-3-270m"  # local folder, or embedded:gemma-3-270m | embedded:tiny-gpt-oss
    datasets: list[str] = Field(default_factory=list)  # files/folders, or "db:<dataset name or id>"
    # Validation data graded by agreement with the humans at every evaluation (files/folders or
    # "db:<name>"); empty: eval_fraction of datasets is held out instead.
    validation_datasets: list[str] = Field(default_factory=list)
    eval_fraction: float = 0.1
    # What eval_fraction holds out: "questions" (every answer to them, several assignments: a
    # grader is trusted on questions it never saw), "submissions", or "auto": questions for
    # item-level runs on data with 10 or more questions (data.split), else submissions.
    eval_split: Literal["auto", "questions", "submissions"] = "auto"
    # "item": one example per rubric question (question, reference answer, the student's answer),
    # the score learnt as a distribution over 0..max (soft when several graders scored it); a
    # submission's grade is assembled from its questions. "submission": one example per whole
    # submission, the grade JSON written token by token (holistic rubrics, written feedback).
    example_unit: Literal["item", "submission"] = "item"
    # Item prompts show up to this many other answers of the same question with their human scores
    # (teacher anchors, data.anchors), drawn at random from the training data, so the model learns
    # to grade a question by what this teacher accepted; grading then shows this many of the
    # teacher's graded answers (imported or corrected). 0: prompts without anchors.
    train_anchors: int = 0
    # The agreement (QWK) that grades accepted without review must reach on the validation data:
    # the confidence threshold below which a grade "needs review" is chosen there for it.
    review_target_qwk: float = 0.8
    split_seed: int = 0
    max_length: int = 2048
    # LoRA
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lora_experts: bool = False  # MoE: LoRA on the expert weights too (peft target_parameters)
    # numerics
    # nf4: bitsandbytes 4-bit for nn.Linear and GPT-OSS experts (lossy). mxfp4 (GPT-OSS): the
    # experts stay in MXFP4, the format GPT-OSS checkpoints ship them in (exactly the checkpoint's
    # weights, a quarter of bf16's memory; the rest at `precision`), no bitsandbytes needed.
    quantization: Literal["none", "nf4", "int8", "mxfp4"] = "none"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # DeepSpeed / processes
    zero_stage: Literal[0, 2, 3] = 2
    offload_optimizer: bool = False
    num_gpus: int | None = None  # GPUs on this host (None: all visible); ignored on CPU
    num_processes: int = 1  # CPU ranks (gloo)
    hostfile: str | None = None  # several nodes: a DeepSpeed hostfile
    # optimisation
    per_device_batch_size: int = 3
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    weight_decay: float = 0.01
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    gradient_checkpointing: bool = True
    save_every_steps: int = 50
    eval_every_steps: int | None = None
    seed: int = 42
    gpu_memory_gib: float | None = None  # memory of one GPU, for the fit check (None: ask CUDA)
    trust_remote_code: bool = False
    # GPU speed path (training.fast_path): flex attention, grouped-GEMM experts, chunked loss.
    fast_path: bool = True
    # GPT-OSS on GPU with fast_path: torch.compile each decoder layer, bf16 or packed experts
    # (the first step compiles; BENCHMARKS.md has the gain).
    compile_layers: bool = True
    # Training rows packed with whole examples (best-fit decreasing) instead of one right-padded
    # example per row: each micro-batch is per_device_batch_size rows of one width (the longest
    # example's, rounded up to 64, or max_length, whichever pads less), every example keeping its
    # own positions and attending only to itself. A step then sees as many examples as fit (item
    # prompts of a few hundred tokens: several per row), so an epoch has fewer steps. The loss is
    # the mean over the step's examples (item) or label tokens (submission), what one unpacked
    # batch of the same examples gives. "auto": pack when the packed rows pad less than the
    # unpacked batches would (GPU with compiled layers: they pad every batch to the longest
    # example; on CPU length-bucketed batches already pad little); "on": always; "off": never.
    # train.log says what was chosen and the padding of both. Models not verified for packing
    # (training.train_entry.PACKABLE_MODEL_TYPES) train unpacked, saying so. Validation is unpacked.
    pack_sequences: Literal["auto", "on", "off"] = "auto"
    # Test/diagnostic mode: each rank writes a hash of its LoRA weights, rank 0 records reference
    # logits of the final model, so a test can check replication and reload.
    debug: bool = False


def load_config(path: str | Path) -> RunConfig:
    """Read a RunConfig from JSON. Unknown keys are refused with close matches."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    unknown = [k for k in data if k not in RunConfig.model_fields]
    if unknown:
        raise ValueError(f"{path}: " + "; ".join(unknown_key_message(k) for k in unknown))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"{path}: {validation_message(e)}") from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(cfg.model_dump_json(indent=2) + "\n", encoding="utf-8")


def unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, RunConfig.model_fields, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown setting {key!r}.{hint} Known settings: {', '.join(RunConfig.model_fields)}"


def validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)
