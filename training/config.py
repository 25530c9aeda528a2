"""The one typed training configuration: `RunConfig`.

The UI edits it, the CLI reads it from a file (or a preset plus `--set key=value` overrides), the
launcher writes it into the run folder, and the trainer reads it back. Every knob lives here.

`check_config` refuses configurations that cannot work, here or on this machine, before anything is
launched (each message says what to change); `config_warnings` names settings that launch but do
not do what they seem to ask (a max_steps that cuts the epochs); `estimate_memory` is the per-GPU
memory arithmetic behind the "does it fit" checks; `preset_choice` is the preset for a machine (its
GPUs, their memory, the weights it holds) and `hardware_preset` the one for this machine.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import math
import sqlite3
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from data import paths
from data.model_zoo import EMBEDDED_PREFIX, EMBEDDED_SPECS, ModelNotFoundError, embedded_model, resolve_model_path

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
    # GPT-OSS on GPU with fast_path: torch.compile each decoder layer, bf16 or NF4 experts
    # (1.6-1.8x tokens/s on the H200; the first step compiles for 20-40 s, BENCHMARKS.md).
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


# The user's seed recipe: gpt-oss-120b, 4-bit, ZeRO-2 on two H200s.
_SEED_120B = RunConfig(
    name="seed-2xh200-120b",
    model="openai/gpt-oss-120b",
    datasets=[str(paths.samples_dir() / "graded")],
    max_length=2048,
    lora_r=8,
    lora_alpha=32,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    quantization="nf4",
    precision="bf16",
    zero_stage=2,
    num_gpus=2,
    per_device_batch_size=3,
    gradient_accumulation_steps=4,
    learning_rate=2e-4,
    epochs=3.0,
)

PRESETS: dict[str, RunConfig] = {
    "seed-2xh200-120b": _SEED_120B,
    # gpt-oss-20b on one H200: experts kept in the checkpoint's MXFP4 (12.8 GiB of weights instead
    # of 39 in bf16, the same values), which leaves room to keep every layer's activations instead
    # of recomputing them (a third fewer FLOPs a step; 53 GiB at 8 x 2,048 tokens, H200).
    "h200-20b": RunConfig(
        name="h200-20b",
        model="openai/gpt-oss-20b",
        datasets=[str(paths.samples_dir() / "graded")],
        max_length=2048,
        quantization="mxfp4",
        precision="bf16",
        zero_stage=2,
        num_gpus=1,
        per_device_batch_size=8,
        gradient_accumulation_steps=2,
        gradient_checkpointing=False,
        learning_rate=2e-4,
        epochs=3.0,
    ),
    # The seed recipe on one H200: experts packed to NF4 while loading (55 GiB; attention, embeddings
    # and head stay bf16, 4 GiB), every layer recomputed; the bench's 36-layer rows at these settings
    # ran 8,431 tokens/s at 64.05 GiB (6 x 2,048 tokens, BENCHMARKS.md round 2d).
    "h200-120b": _SEED_120B.model_copy(deep=True, update=dict(name="h200-120b", num_gpus=1, per_device_batch_size=6,
                                                              gradient_accumulation_steps=2)),
    # The grading recipe measured on real short-answer data (BENCHMARKS.md, "Grading quality"):
    # the embedded Gemma 3 270M on one GPU, LoRA on every projection, one question per example.
    "embedded-grader": RunConfig(
        name="embedded-grader",
        datasets=[str(paths.samples_dir() / "graded")],
        max_length=1024,
        lora_r=16,
        lora_dropout=0.1,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        num_gpus=1,
        per_device_batch_size=16,
        gradient_accumulation_steps=1,
        warmup_ratio=0.05,
        epochs=5.0,
        gradient_checkpointing=False,
        save_every_steps=100000,
    ),
    # No GPU: the embedded Gemma 3 270M in fp32, sized to finish a first run in minutes on 2 cores.
    "cpu-default": RunConfig(
        name="cpu-default",
        model="embedded:gemma-3-270m",
        datasets=[str(paths.samples_dir() / "graded")],
        eval_fraction=0.1,
        # Measured: one fwd+bwd of ~1.2k tokens costs Gemma 270M ~20 s on 2 cores (fp32), so a
        # first run is a dozen samples at 1k tokens (long submissions are cut, not the grade).
        max_length=1024,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        precision="fp32",
        zero_stage=0,
        num_processes=1,
        per_device_batch_size=1,
        gradient_accumulation_steps=1,
        learning_rate=5e-4,
        lr_scheduler="cosine",
        warmup_ratio=0.0,
        epochs=1.0,
        max_steps=12,
        gradient_checkpointing=False,
        save_every_steps=6,
    ),
    # Pipeline check: a tiny GPT-OSS with the real tokenizer, 2 gloo ranks, ZeRO-2, ~1 minute.
    "smoke": RunConfig(
        name="smoke",
        model="embedded:tiny-gpt-oss",
        datasets=[str(paths.samples_dir() / "graded")],
        eval_fraction=0.2,
        max_length=1536,  # the sample submissions are 1.0-1.4k GPT-OSS tokens
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        precision="fp32",
        zero_stage=2,
        num_processes=2,
        per_device_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=2e-3,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        epochs=1.0,
        max_steps=8,
        gradient_checkpointing=False,
        save_every_steps=4,
    ),
}


# ----------------------------------------------------------------------------------- files


def load_config(path: str | Path) -> RunConfig:
    """Read a RunConfig from JSON. Unknown keys are refused with close matches."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    unknown = [k for k in data if k not in RunConfig.model_fields]
    if unknown:
        raise ValueError(f"{path}: " + "; ".join(_unknown_key_message(k) for k in unknown))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"{path}: {_validation_message(e)}") from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(cfg.model_dump_json(indent=2) + "\n", encoding="utf-8")


def preset(name: str) -> RunConfig:
    """A copy of a preset (so callers may change it freely)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown preset {name!r}.{hint} Presets: {', '.join(PRESETS)}")
    return PRESETS[name].model_copy(deep=True)


# ------------------------------------------------------------------------------- overrides


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, RunConfig.model_fields, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown setting {key!r}.{hint} Known settings: {', '.join(RunConfig.model_fields)}"


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


def _parse_value(key: str, raw: str) -> Any:
    """Turn the text of `key=raw` into the field's type: numbers, booleans, null, lists."""
    annotation = RunConfig.model_fields[key].annotation
    args = typing.get_args(annotation)
    optional = type(None) in args
    text = raw.strip()
    if optional and text.lower() in ("none", "null", ""):
        return None
    is_list = typing.get_origin(annotation) is list or any(typing.get_origin(a) is list for a in args)
    if is_list:
        if text.startswith("["):
            return json.loads(text)
        return [x.strip() for x in text.split(",") if x.strip()]
    if annotation is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}: expected true or false, got {raw!r}")
    # Numbers and literals: let pydantic coerce ("3" -> 3, "2e-4" -> 0.0002, "2" -> Literal 2).
    try:
        return TypeAdapter(annotation).validate_python(json.loads(text))
    except (json.JSONDecodeError, ValidationError):
        pass
    try:
        return TypeAdapter(annotation).validate_strings(text)
    except ValidationError:
        return text  # let the final model validation produce the message


def _split_override(item: str) -> tuple[str, str]:
    """``key=value`` as typed (``--set lora-r=16``) -> (the field name, the raw value)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value (e.g. lora_r=16)")
    key, raw = item.split("=", 1)
    return key.strip().replace("-", "_"), raw


def overridden(overrides: list[str], key: str) -> str | None:
    """The value the last ``key=value`` of ``overrides`` gives ``key`` (stripped), or None."""
    found = [raw.strip() for k, raw in map(_split_override, overrides) if k == key]
    return found[-1] if found else None


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `key=value` settings (as typed on the command line) to a copy of `cfg`.

    Values are parsed by the field's type: `lora_r=16`, `learning_rate=1e-4`, `max_steps=none`,
    `target_modules=q_proj,v_proj` (or a JSON list), `gradient_checkpointing=false`.
    """
    data = cfg.model_dump()
    for item in overrides:
        key, raw = _split_override(item)
        if key not in RunConfig.model_fields:
            raise ValueError(_unknown_key_message(key))
        data[key] = _parse_value(key, raw)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ValueError(_validation_message(e)) from None


# ------------------------------------------------------------------------ model inspection

# Module names of embedded models that may not be built yet (building Gemma takes a minute).
_KNOWN_LINEAR = {
    "gemma3_text": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"},
    "gpt_oss": {"q_proj", "k_proj", "v_proj", "o_proj", "lm_head"},
}


def _embedded_shape(spec: str) -> dict | None:
    """Dims for the memory estimate of an embedded model that is not built yet (data.model_zoo)."""
    embedded = embedded_model(spec)
    return None if embedded is None else {**embedded.shape, "model_type": embedded.model_type}


def model_dir(cfg: RunConfig) -> Path | None:
    """The local folder of `cfg.model` if it exists now (never builds an embedded model)."""
    if cfg.model.startswith(EMBEDDED_PREFIX):
        embedded = embedded_model(cfg.model)
        return embedded.built_folder() if embedded is not None else None
    p = Path(cfg.model).expanduser()
    if p.is_dir():
        return p
    # A hub id like "openai/gpt-oss-120b" resolves only when a local copy exists (offline).
    try:
        return Path(resolve_model_path(cfg.model))
    except ModelNotFoundError:
        return None


@lru_cache(maxsize=8)
def _inspect_folder(folder: str, trust_remote_code: bool) -> dict:
    """Shapes and module names of the model in `folder`, from its config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg, trust_remote_code=trust_remote_code)
    linear_names: set[str] = set()
    linear_params = 0
    lora_in_out: dict[str, list[tuple[int, int]]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) or type(mod).__name__ == "Conv1D":
            leaf = name.split(".")[-1]
            linear_names.add(leaf)
            if isinstance(mod, torch.nn.Linear):
                lora_in_out.setdefault(leaf, []).append((mod.in_features, mod.out_features))
                if leaf != "lm_head":
                    linear_params += mod.weight.numel()
    expert_params = 0
    expert_shapes: dict[str, list[tuple[int, ...]]] = {}
    for name, p in model.named_parameters():
        if ".experts." in name and p.dim() == 3:
            expert_params += p.numel()
            for suffix in GPT_OSS_EXPERT_PARAMETERS:
                if name.endswith(suffix):
                    expert_shapes.setdefault(suffix, []).append(tuple(p.shape))
    text_cfg = hf_cfg.get_text_config() if hasattr(hf_cfg, "get_text_config") else hf_cfg
    return dict(
        model_type=hf_cfg.model_type,
        n_params=sum(p.numel() for p in model.parameters()),
        linear_params=linear_params,
        expert_params=expert_params,
        linear_names=sorted(linear_names),
        lora_in_out=lora_in_out,
        expert_shapes=expert_shapes,
        n_layers=int(getattr(text_cfg, "num_hidden_layers", 1)),
        hidden=int(getattr(text_cfg, "hidden_size", 1)),
        heads=int(getattr(text_cfg, "num_attention_heads", 1)),
        vocab=int(getattr(text_cfg, "vocab_size", 1)),
        quantized_checkpoint=(getattr(hf_cfg, "quantization_config", None) or {}).get("quant_method")
        if isinstance(getattr(hf_cfg, "quantization_config", None), dict) else None,
    )


def inspect_model(cfg: RunConfig) -> dict | None:
    """Shapes and LoRA-targetable module names of `cfg.model`, or None when it cannot be read."""
    folder = model_dir(cfg)
    if folder is not None and (folder / "config.json").exists():
        return _inspect_folder(str(folder), cfg.trust_remote_code)
    return None


# ------------------------------------------------------------------------ memory estimate

_GIB = 1024**3
_NF4_BYTES = (4 + 0.127) / 8  # 4 bits + double-quantized absmax (~0.127 bit) per weight
_INT8_BYTES = 1.0 + 4 / 64  # int8 + per-row/col scales, roughly
_MXFP4_BYTES = (4 + 8 / 32) / 8  # e2m1 + one 8-bit scale per 32 weights
# GPT-OSS on the GPU fast path (flex attention, grouped-GEMM experts, compiled layers, chunked
# loss): activations kept by one layer that is not recomputed, bytes per token per hidden unit at
# bf16 (20b shape, MXFP4 experts, H200 2026-12-03: activations 30.2 GiB at batch 6, 40.0 at batch 8,
# 4.9 GiB per 2,048-token sample over 24 layers = 37 x 2880 bytes a token a layer; no s^2 attention
# matrix, no full logits; 44 before the experts stopped keeping the gathered down bias).
_FAST_GPT_OSS_LAYER = 37


def gpu_count() -> int:
    """CUDA GPUs visible to this process (0 without CUDA or torch)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install: train on the CPU
        return 0


def gpu_memory_gib() -> float | None:
    """Memory of GPU 0 in GiB, or None without a GPU."""
    if not gpu_count():
        return None
    import torch

    return torch.cuda.get_device_properties(0).total_memory / _GIB


def compute_dtype_bytes(cfg: RunConfig) -> int:
    if cfg.precision == "fp32":
        return 4
    if cfg.precision == "bf16":
        return 2
    return 2 if gpu_count() else 4


def world_size(cfg: RunConfig) -> int:
    """Number of data-parallel ranks the launcher will start (hostfile: counted from its slots)."""
    if cfg.hostfile:
        try:
            total = 0
            for line in Path(cfg.hostfile).read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if "slots=" in line:
                    total += int(line.split("slots=", 1)[1].split()[0])
            if total:
                return total
        except (OSError, ValueError):
            pass
    if cfg.num_gpus is not None:
        return max(1, cfg.num_gpus)
    return gpu_count() or max(1, cfg.num_processes)


def _lora_params(cfg: RunConfig, info: dict) -> int:
    n = 0
    for target in cfg.target_modules:
        for fin, fout in info.get("lora_in_out", {}).get(target, []):
            n += cfg.lora_r * (fin + fout)
    if cfg.lora_experts:
        for shapes in info.get("expert_shapes", {}).values():
            for e, fin, fout in shapes:
                n += cfg.lora_r * e * (fin + fout)
    return n


@dataclass(frozen=True)
class MemoryEstimate:
    """What one rank (one GPU) holds during a run, in GiB, and whether it fits one GPU.

    The parts are None when the model's config cannot be read (no estimate then, `fits` True).
    """

    weights_gib: float | None  # the base model (quantized parts at their packed size)
    lora_gib: float | None  # LoRA weights and their gradients (fp32)
    optimizer_gib: float | None  # AdamW moments (0 when offloaded to the CPU)
    activations_gib: float | None
    overhead_gib: float | None  # CUDA context, allocator fragmentation, temporary buffers
    total_gib: float | None
    limit_gib: float | None  # one GPU's memory: gpu_memory_gib, else what CUDA reports, else None
    fits: bool  # total_gib <= limit_gib (True when either is unknown)
    world_size: int | None = None
    params: int | None = None
    lora_params: int | None = None
    warning: str | None = None  # for people: why there is no estimate or no fit check, or by how much it is over

    def markdown(self) -> str:
        """The estimate as a small Markdown table for people, the out-of-memory warning first."""
        head = ""
        if not self.fits:
            head = f"### Warning: likely out of memory\n{self.warning or ''}\n\n"
        elif self.warning:
            head = f"Note: {self.warning}\n\n"
        parts = [("weights", self.weights_gib), ("lora", self.lora_gib), ("optimizer", self.optimizer_gib),
                 ("activations", self.activations_gib), ("overhead", self.overhead_gib), ("total", self.total_gib)]
        rows = "\n".join(f"| {name} | {gib:.2f} |" for name, gib in parts if gib is not None)
        if not rows:
            return head.strip()
        fit = "" if self.limit_gib is None else (f" - fits in {self.limit_gib:g} GiB" if self.fits
                                                  else f" - does NOT fit in {self.limit_gib:g} GiB")
        extra = []
        if self.params:
            extra.append(f"{self.params:,} parameters")
        if self.lora_params:
            extra.append(f"{self.lora_params:,} trainable (LoRA)")
        if self.world_size:
            extra.append(f"{self.world_size} rank(s)")
        return (f"{head}**Estimated memory per GPU{fit}**\n\n| part | GiB |\n|---|---|\n{rows}"
                + ("\n\n" + ", ".join(extra) if extra else ""))


def estimate_memory(cfg: RunConfig) -> MemoryEstimate:
    """Per-GPU (per-rank) memory of a run: weights, LoRA, optimizer, activations, total.

    Rough arithmetic, calibrated on GPT-OSS-20b on an H200 (bf16, seq 2048, checkpointing: 44 GiB
    at batch 1, +4.9 GiB per extra sample; without checkpointing +23.6 GiB per sample).
    """
    info = inspect_model(cfg) or _embedded_shape(cfg.model)
    if info is None:
        return MemoryEstimate(weights_gib=None, lora_gib=None, optimizer_gib=None, activations_gib=None,
                              overhead_gib=None, total_gib=None, limit_gib=None, fits=True,
                              warning=f"cannot read the model config of {cfg.model!r}: no estimate")
    ws = world_size(cfg)
    cb = compute_dtype_bytes(cfg)
    n_params = info["n_params"]
    quantizable = info.get("linear_params", 0) + info.get("expert_params", 0)
    if cfg.quantization == "nf4":
        # bitsandbytes takes the nn.Linear layers; training.quant_experts takes GPT-OSS experts.
        q_bytes = _NF4_BYTES
    elif cfg.quantization == "mxfp4":  # the experts only
        q_bytes = _MXFP4_BYTES
        quantizable = info.get("expert_params", 0)
    elif cfg.quantization == "int8":
        q_bytes = _INT8_BYTES
    else:
        q_bytes = cb
        quantizable = 0
    weights = quantizable * q_bytes + (n_params - quantizable) * cb
    if cfg.zero_stage == 3:
        weights /= ws
    lora_n = _lora_params(cfg, info) if "lora_in_out" in info else int(n_params * 0.002)
    lora = lora_n * 4  # trainable LoRA weights are kept in fp32
    grads = lora_n * 4
    optim = lora_n * 8  # AdamW exp_avg + exp_avg_sq, fp32
    if cfg.zero_stage >= 2:
        grads /= ws
        optim /= ws
    if cfg.offload_optimizer:
        optim = 0
    if cfg.zero_stage == 3:
        lora /= ws
    # Activations per sample (bytes): see the docstring for the calibration.
    s, h, L, a, V = cfg.max_length, info["hidden"], info["n_layers"], info["heads"], info["vocab"]
    scale = cb / 2
    per_layer_full = (34 * s * h + 2.5 * a * s * s) * scale
    logits = s * V * (cb + 4 + 4)  # logits, their fp32 upcast for the loss, and its gradient
    if cfg.fast_path and info.get("model_type") == "gpt_oss":
        per_layer_full = _FAST_GPT_OSS_LAYER * s * h * scale
        logits = 0  # the fused loss works 1,024 label tokens at a time (in the overhead)
    if cfg.gradient_checkpointing:
        per_sample = L * s * h * cb + per_layer_full + logits
    else:
        per_sample = L * per_layer_full + logits
    activations = per_sample * cfg.per_device_batch_size
    overhead = 1.5 * _GIB
    total = weights + lora + grads + optim + activations + overhead
    gib = lambda x: round(x / _GIB, 2)  # noqa: E731
    limit = cfg.gpu_memory_gib
    if limit is None:
        limit = gpu_memory_gib()  # None on a CPU machine: no fit check
    fits = True if limit is None else total / _GIB <= limit
    warning = None
    if limit is None:
        warning = "no gpu_memory_gib stated: fit not checked"
    elif not fits:
        warning = f"needs ~{gib(total)} GiB per GPU, more than the {limit:g} GiB available"
    return MemoryEstimate(
        weights_gib=gib(weights), lora_gib=gib(lora + grads), optimizer_gib=gib(optim),
        activations_gib=gib(activations), overhead_gib=gib(overhead), total_gib=gib(total), limit_gib=limit,
        fits=fits, world_size=ws, params=n_params, lora_params=lora_n, warning=warning,
    )


# ------------------------------------------------------------------------------ the checks


def _weights_present(folder: Path) -> bool:
    pats = ("*.safetensors", "*.bin", "*.gguf", "*.pt")
    return any(any(folder.glob(p)) for p in pats)


def _machine_problems(cfg: RunConfig) -> list[str]:
    """What this machine cannot give `cfg`: GPUs, GPU memory, bitsandbytes. A hostfile run is
    not checked here (its GPUs are on the hosts it names)."""
    problems: list[str] = []
    if cfg.quantization in ("nf4", "int8") and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"quantization={cfg.quantization} needs bitsandbytes: .venv/bin/pip install bitsandbytes, "
                        "or set quantization=none")
    if cfg.hostfile:
        return problems
    n = gpu_count()
    if n == 0 and cfg.num_gpus is not None:
        problems.append(f"num_gpus={cfg.num_gpus} but this machine has no GPU (a CPU run starts num_processes "
                        f"ranks): set num_gpus=none, or start from preset {hardware_preset(0)}")
    elif cfg.num_gpus is not None and cfg.num_gpus > n:
        problems.append(f"num_gpus={cfg.num_gpus} but this machine has {n} GPU{'s' if n > 1 else ''}: "
                        f"set num_gpus={n}, or start from preset {hardware_preset()}")
    real = gpu_memory_gib() if n else None
    if real is not None and cfg.gpu_memory_gib is not None and cfg.gpu_memory_gib > real + 0.5:
        problems.append(f"gpu_memory_gib={cfg.gpu_memory_gib:g} but this machine's GPU has {real:.1f} GiB: "
                        f"set gpu_memory_gib={math.floor(real)} (or none to use what CUDA reports)")
    return problems


# The preset of a GPU machine where no GPT-OSS preset can run (no weights here, a model of another
# kind, too little memory): the embedded model with the grading recipe, which needs nothing absent.
GPU_FALLBACK_PRESET = "embedded-grader"
CPU_PRESET = "cpu-default"


@dataclass(frozen=True)
class PresetChoice:
    """The preset for a machine, and why (what `run` says when no preset is given)."""

    name: str
    reason: str


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
    return folder is not None and _weights_present(folder)


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
        if gpu_memory is None or estimate_memory(sized).fits:
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
        n_gpus, gpu_memory = gpu_count(), gpu_memory_gib()
    return preset_choice(n_gpus, gpu_memory, model=model, weights_present=weights_present).name


def training_examples(cfg: RunConfig) -> int | None:
    """About how many training examples `cfg.datasets` give (one per question or per submission,
    less the held-out eval_fraction), or None when the data cannot be read now."""
    from data.loading import load_graded
    from data.store import Store

    n_subs = n_items = 0
    files = [d for d in cfg.datasets if not d.startswith("db:")]
    try:
        if files:
            report = load_graded(files)
            if not report.ok:
                return None
            n_subs += len(report.submissions)
            n_items += sum(len(s.rubric_alignment) for s in report.submissions)
        for d in cfg.datasets:
            if d.startswith("db:"):
                found = Store().find_dataset(d[3:])
                if found is None:
                    return None
                n_subs += found["n_submissions"]
                n_items += found["n_items"]
    except (OSError, ValueError, sqlite3.Error):  # unreadable now: check_config says why
        return None
    n = n_items if cfg.example_unit == "item" else n_subs
    if not cfg.validation_datasets:
        n -= round(n * cfg.eval_fraction)
    return max(n, 0)


def config_warnings(cfg: RunConfig) -> list[str]:
    """What launches but does not do what the settings seem to ask. Each names what to change."""
    warnings: list[str] = []
    per_step = cfg.per_device_batch_size * world_size(cfg) * cfg.gradient_accumulation_steps
    if cfg.max_steps is not None and cfg.max_steps >= 1 and cfg.epochs > 0 and per_step >= 1:
        n = training_examples(cfg)
        if n:
            per_epoch = math.ceil(n / per_step)
            asked = max(1, math.ceil(cfg.epochs * per_epoch))
            if cfg.max_steps < asked:
                examples = f"{per_step} example{'s' if per_step > 1 else ''}"
                warnings.append(
                    f"max_steps={cfg.max_steps} stops the run after {cfg.max_steps / per_epoch:.2g} epochs of the "
                    f"{cfg.epochs:g} asked for (~{asked} steps of {examples}; ~{n} training {cfg.example_unit}s); "
                    f"set max_steps=none for the full epochs={cfg.epochs:g}"
                    + ("" if cfg.pack_sequences == "off" else
                       " (counted unpacked: packed rows hold several examples, so an epoch may take fewer "
                       "steps; train.log's packing line gives the real count)"))
    if cfg.precision == "bf16" and not cfg.hostfile and gpu_count() == 0:
        warnings.append("precision=bf16 is not used on a CPU (training runs in fp32 there); set precision=auto")
    return warnings


def _stored_dataset_problems(cfg: RunConfig) -> list[str]:
    """The `db:` datasets the store lacks, refused here rather than by every rank after DeepSpeed
    has started (a minute later, with a traceback)."""
    from data.store import missing_datasets

    try:
        return missing_datasets(cfg.datasets + cfg.validation_datasets)
    except sqlite3.Error as e:  # a store that cannot be read now: the trainer would fail the same way
        return [f"the dataset store {paths.db_path()} cannot be read ({e}); check GRADER_DB or the disk"]


def check_config(cfg: RunConfig) -> list[str]:
    """Problems that refuse a launch. Each message names the setting and what to change."""
    problems: list[str] = []
    if not cfg.learning_rate > 0 or not math.isfinite(cfg.learning_rate):
        problems.append(f"learning_rate must be > 0 (got {cfg.learning_rate}); try learning_rate=2e-4")
    if cfg.lora_r <= 0:
        problems.append(f"lora_r must be >= 1 (got {cfg.lora_r}); r=0 trains nothing. Try lora_r=8")
    if cfg.lora_alpha <= 0:
        problems.append(f"lora_alpha must be > 0 (got {cfg.lora_alpha}); a common choice is 2-4x lora_r")
    if not 0 <= cfg.lora_dropout < 1:
        problems.append(f"lora_dropout must be in [0, 1) (got {cfg.lora_dropout})")
    if cfg.per_device_batch_size < 1:
        problems.append(f"per_device_batch_size must be >= 1 (got {cfg.per_device_batch_size})")
    if cfg.gradient_accumulation_steps < 1:
        problems.append(f"gradient_accumulation_steps must be >= 1 (got {cfg.gradient_accumulation_steps})")
    if cfg.max_length < 32:
        problems.append(f"max_length {cfg.max_length} is too short for a rubric and a grade; use >= 256")
    if cfg.max_steps is None and not cfg.epochs > 0:
        problems.append(f"epochs must be > 0 (got {cfg.epochs}), or set max_steps")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        problems.append(f"max_steps must be >= 1 (got {cfg.max_steps}), or max_steps=none to use epochs")
    if not 0 < cfg.review_target_qwk <= 1:
        problems.append(f"review_target_qwk must be in (0, 1] (got {cfg.review_target_qwk}); 0.8 is a common bar")
    if cfg.train_anchors < 0:
        problems.append(f"train_anchors must be >= 0 (got {cfg.train_anchors}); 0 trains without anchors")
    if cfg.train_anchors and cfg.example_unit != "item":
        problems.append("train_anchors needs example_unit=item (anchors are shown one question at a time); "
                        "set train_anchors=0 or example_unit=item")
    if not 0 <= cfg.eval_fraction < 1:
        problems.append(f"eval_fraction must be in [0, 1) (got {cfg.eval_fraction})")
    if not 0 <= cfg.warmup_ratio < 1:
        problems.append(f"warmup_ratio must be in [0, 1) (got {cfg.warmup_ratio})")
    if cfg.save_every_steps < 1:
        problems.append(f"save_every_steps must be >= 1 (got {cfg.save_every_steps})")
    if cfg.num_processes < 1:
        problems.append(f"num_processes must be >= 1 (got {cfg.num_processes})")
    if cfg.num_gpus is not None and cfg.num_gpus < 1:
        problems.append(f"num_gpus must be >= 1 (got {cfg.num_gpus}), or none for all visible GPUs")
    if cfg.hostfile and not Path(cfg.hostfile).is_file():
        problems.append(f"hostfile {cfg.hostfile} does not exist; give a DeepSpeed hostfile or hostfile=none")
    problems += _machine_problems(cfg)
    if not cfg.datasets:
        problems.append("no datasets: set datasets=path/to/graded.json (files, folders or db:<name>)")
    for d in cfg.datasets:
        if not d.startswith("db:") and not Path(d).expanduser().exists():
            problems.append(f"dataset {d} does not exist; give a .json/.jsonl file, a folder, or db:<name>")
    for d in cfg.validation_datasets:
        if not d.startswith("db:") and not Path(d).expanduser().exists():
            problems.append(f"validation dataset {d} does not exist; give a .json/.jsonl file, a folder, "
                            "or db:<name> (or validation_datasets=none to hold out eval_fraction)")
    problems += _stored_dataset_problems(cfg)
    if cfg.offload_optimizer and cfg.zero_stage == 0:
        problems.append("offload_optimizer needs ZeRO: set zero_stage=2 (or offload_optimizer=false)")
    if cfg.quantization != "none" and cfg.zero_stage == 3:
        problems.append(f"quantization={cfg.quantization} cannot be sharded by ZeRO-3; use zero_stage=2 "
                        "or quantization=none")

    # The model: folder, weights, module names.
    folder = model_dir(cfg)
    info = None
    if cfg.model.startswith(EMBEDDED_PREFIX):
        embedded = embedded_model(cfg.model)
        if embedded is None:
            problems.append(f"unknown embedded model {cfg.model!r}; use one of {', '.join(EMBEDDED_SPECS)}")
        elif folder is not None:
            info = inspect_model(cfg)
        embedded_type = embedded.model_type if embedded is not None else None
        known = set(info["linear_names"]) if info else _KNOWN_LINEAR.get(embedded_type or "", set())
        model_type = info["model_type"] if info else embedded_type
    else:
        if folder is None:
            problems.append(f"model folder {cfg.model} not found; set model=<a local folder with config.json "
                            "and weights> (the hub is not reachable) or model=embedded:gemma-3-270m")
            known, model_type = set(), None
        elif not (folder / "config.json").exists():
            problems.append(f"model folder {folder} has no config.json; point model= at a Hugging Face model folder")
            known, model_type = set(), None
        else:
            if not _weights_present(folder):
                problems.append(f"model folder {folder} has no weights (*.safetensors/*.bin); copy the checkpoint there")
            info = inspect_model(cfg)
            known, model_type = set(info["linear_names"]), info["model_type"]
    if known:
        for t in cfg.target_modules:
            if t not in known and not any(k.endswith(t) for k in known):
                close = difflib.get_close_matches(t, sorted(known), n=3, cutoff=0.4)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                problems.append(
                    f"target module {t!r} is not a layer of this {model_type} model.{hint} "
                    f"Its LoRA-able layers: {', '.join(sorted(known - {'lm_head', 'embed_tokens'}))}"
                )
    if not cfg.target_modules and not cfg.lora_experts:
        problems.append("target_modules is empty: LoRA would train nothing; e.g. target_modules=q_proj,k_proj,v_proj,o_proj")
    if cfg.lora_experts and model_type is not None and model_type != "gpt_oss":
        problems.append(f"lora_experts applies to GPT-OSS expert weights; this model is {model_type}: "
                        "set lora_experts=false")
    if cfg.quantization == "int8" and model_type == "gpt_oss":
        problems.append("quantization=int8 leaves GPT-OSS's expert weights (most of the model) unquantized: "
                        "bitsandbytes' int8 takes only nn.Linear layers. Set quantization=nf4 (the experts are "
                        "packed too) or quantization=none")
    if cfg.quantization == "mxfp4" and model_type is not None and model_type != "gpt_oss":
        problems.append(f"quantization=mxfp4 keeps GPT-OSS's expert weights in MXFP4; this model is {model_type}: "
                        "set quantization=nf4 or none")
    packed = (info or {}).get("quantized_checkpoint")
    if cfg.quantization != "none" and packed not in (None, "mxfp4"):  # MXFP4 GPT-OSS is dequantized on load
        problems.append(f"the checkpoint of {cfg.model} is already quantized ({packed}); set quantization=none")

    # Memory: does one rank hold what it must?
    if info is not None:
        est = estimate_memory(cfg)
        limit = est.limit_gib
        if limit is not None and not est.fits:
            if est.weights_gib is not None and est.weights_gib > 0.9 * limit:
                what = "ZeRO-2 keeps a full copy of the weights on every rank" if cfg.zero_stage in (0, 2) \
                    else "the weights shard"
                alt_nf4 = estimate_memory(cfg.model_copy(update={"quantization": "nf4", "zero_stage": 2}))
                alt_z3 = estimate_memory(cfg.model_copy(update={"quantization": "none", "zero_stage": 3}))
                problems.append(
                    f"the weights alone need ~{est.weights_gib} GiB per rank ({what}; {est.params / 1e9:.1f}B params, "
                    f"precision={cfg.precision}, quantization={cfg.quantization}) but one GPU has {limit:g} GiB. "
                    f"Set quantization=nf4 (~{alt_nf4.total_gib} GiB per GPU) or zero_stage=3 with more GPUs "
                    f"(~{alt_z3.total_gib} GiB per GPU with {alt_z3.world_size}), or a smaller model."
                )
            else:
                # Largest batch that fits, by the same arithmetic.
                fit_bs = 0
                for bs in range(cfg.per_device_batch_size - 1, 0, -1):
                    if estimate_memory(cfg.model_copy(update={"per_device_batch_size": bs})).fits:
                        fit_bs = bs
                        break
                if fit_bs:
                    ga = math.ceil(cfg.per_device_batch_size * cfg.gradient_accumulation_steps / fit_bs)
                    fix = (f"set per_device_batch_size={fit_bs} and gradient_accumulation_steps={ga} "
                           "(same effective batch)")
                else:
                    fix = "lower max_length, enable gradient_checkpointing, or use quantization=nf4"
                problems.append(
                    f"batch does not fit: per_device_batch_size={cfg.per_device_batch_size} at max_length="
                    f"{cfg.max_length} needs ~{est.total_gib} GiB per GPU (weights {est.weights_gib}, "
                    f"activations {est.activations_gib}) but gpu_memory_gib is {limit:g}; {fix}"
                )
    return problems
