"""Before anything is launched: `check_config` refuses configurations that cannot work, here or on
this machine (each message says what to change); `config_warnings` names settings that launch but
do not do what they seem to ask (a max_steps that cuts the epochs)."""
from __future__ import annotations

import difflib
import importlib.util
import math
import sqlite3
from pathlib import Path

from data import paths
from data.loading import load_graded
from data.model_zoo import EMBEDDED_PREFIX, EMBEDDED_SPECS, embedded_model
from data.store import DB_PREFIX, Store, missing_datasets
from training import memory
from training.config import RunConfig
from training.model_info import KNOWN_LINEAR, inspect_model, model_dir
from training.presets import has_weights, hardware_preset

def _machine_problems(cfg: RunConfig) -> list[str]:
    """What this machine cannot give `cfg`: GPUs, GPU memory, bitsandbytes. A hostfile run is
    not checked here (its GPUs are on the hosts it names)."""
    problems: list[str] = []
    if cfg.quantization in ("nf4", "int8") and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"quantization={cfg.quantization} needs bitsandbytes: .venv/bin/pip install bitsandbytes, "
                        "or set quantization=none")
    if cfg.hostfile:
        return problems
    n = memory.gpu_count()
    if n == 0 and cfg.num_gpus is not None:
        problems.append(f"num_gpus={cfg.num_gpus} but this machine has no GPU (a CPU run starts num_processes "
                        f"ranks): set num_gpus=none, or start from preset {hardware_preset(0)}")
    elif cfg.num_gpus is not None and cfg.num_gpus > n:
        problems.append(f"num_gpus={cfg.num_gpus} but this machine has {n} GPU{'s' if n > 1 else ''}: "
                        f"set num_gpus={n}, or start from preset {hardware_preset()}")
    real = memory.gpu_memory_gib() if n else None
    if real is not None and cfg.gpu_memory_gib is not None and cfg.gpu_memory_gib > real + 0.5:
        problems.append(f"gpu_memory_gib={cfg.gpu_memory_gib:g} but this machine's GPU has {real:.1f} GiB: "
                        f"set gpu_memory_gib={math.floor(real)} (or none to use what CUDA reports)")
    return problems


def training_examples(cfg: RunConfig) -> int | None:
    """About how many training examples `cfg.datasets` give (one per question or per submission,
    less the held-out eval_fraction), or None when the data cannot be read now."""
    n_subs = n_items = 0
    files = [d for d in cfg.datasets if not d.startswith(DB_PREFIX)]
    try:
        if files:
            report = load_graded(files)
            if not report.ok:
                return None
            n_subs += len(report.submissions)
            n_items += sum(len(s.rubric_alignment) for s in report.submissions)
        for d in cfg.datasets:
            if d.startswith(DB_PREFIX):
                found = Store().find_dataset(d[len(DB_PREFIX):])
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
    per_step = cfg.per_device_batch_size * memory.world_size(cfg) * cfg.gradient_accumulation_steps
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
    if cfg.precision == "bf16" and not cfg.hostfile and memory.gpu_count() == 0:
        warnings.append("precision=bf16 is not used on a CPU (training runs in fp32 there); set precision=auto")
    return warnings


def _stored_dataset_problems(cfg: RunConfig) -> list[str]:
    """The `db:` datasets the store lacks, refused here rather than by every rank after DeepSpeed
    has started (a minute later, with a traceback)."""
    try:
        return missing_datasets(cfg.datasets + cfg.validation_datasets)
    except sqlite3.Error as e:  # a store that cannot be read now: the trainer would fail the same way
        return [f"the dataset store {paths.db_path()} cannot be read ({e}); check GRADER_DB or the disk"]


def check_config(cfg: RunConfig) -> list[str]:
    """Problems that refuse a launch. Each message names the setting and what to change."""
    model_problems, info = _model_problems(cfg)
    return (_setting_problems(cfg) + _machine_problems(cfg) + _data_problems(cfg) + model_problems
            + _memory_problems(cfg, info))


def _setting_problems(cfg: RunConfig) -> list[str]:
    """Settings out of their range, or that cannot go together."""
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
    if cfg.offload_optimizer and cfg.zero_stage == 0:
        problems.append("offload_optimizer needs ZeRO: set zero_stage=2 (or offload_optimizer=false)")
    if cfg.quantization != "none" and cfg.zero_stage == 3:
        problems.append(f"quantization={cfg.quantization} cannot be sharded by ZeRO-3; use zero_stage=2 "
                        "or quantization=none")
    return problems


def _data_problems(cfg: RunConfig) -> list[str]:
    """Datasets that are not there: files, folders, stored datasets."""
    problems: list[str] = []
    if not cfg.datasets:
        problems.append("no datasets: set datasets=path/to/graded.json (files, folders or db:<name>)")
    for d in cfg.datasets:
        if not d.startswith(DB_PREFIX) and not Path(d).expanduser().exists():
            problems.append(f"dataset {d} does not exist; give a .json/.jsonl file, a folder, or db:<name>")
    for d in cfg.validation_datasets:
        if not d.startswith(DB_PREFIX) and not Path(d).expanduser().exists():
            problems.append(f"validation dataset {d} does not exist; give a .json/.jsonl file, a folder, "
                            "or db:<name> (or validation_datasets=none to hold out eval_fraction)")
    return problems + _stored_dataset_problems(cfg)


def _model_problems(cfg: RunConfig) -> tuple[list[str], dict | None]:
    """The model: its folder, weights, the LoRA targets and quantization it allows; and its shapes
    (None when it cannot be read)."""
    problems: list[str] = []
    folder = model_dir(cfg)
    info = None
    if cfg.model.startswith(EMBEDDED_PREFIX):
        embedded = embedded_model(cfg.model)
        if embedded is None:
            problems.append(f"unknown embedded model {cfg.model!r}; use one of {', '.join(EMBEDDED_SPECS)}")
        elif folder is not None:
            info = inspect_model(cfg)
        embedded_type = embedded.model_type if embedded is not None else None
        known = set(info["linear_names"]) if info else KNOWN_LINEAR.get(embedded_type or "", set())
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
            if not has_weights(folder):
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
    return problems, info


def _memory_problems(cfg: RunConfig, info: dict | None) -> list[str]:
    """Does one rank hold what it must? When not: the weights alone (what would fit instead), or
    the batch (the largest that fits, the same effective batch)."""
    problems: list[str] = []
    if info is not None:
        est = memory.estimate_memory(cfg)
        limit = est.limit_gib
        if limit is not None and not est.fits:
            if est.weights_gib is not None and est.weights_gib > 0.9 * limit:
                what = "ZeRO-2 keeps a full copy of the weights on every rank" if cfg.zero_stage in (0, 2) \
                    else "the weights shard"
                alt_nf4 = memory.estimate_memory(cfg.model_copy(update={"quantization": "nf4", "zero_stage": 2}))
                alt_z3 = memory.estimate_memory(cfg.model_copy(update={"quantization": "none", "zero_stage": 3}))
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
                    if memory.estimate_memory(cfg.model_copy(update={"per_device_batch_size": bs})).fits:
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
