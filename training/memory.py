"""What one GPU holds during a run (weights, LoRA, optimizer, activations), and this machine's GPUs:
the arithmetic behind the "does it fit" checks and the Configure tab's estimate."""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from data.precision import bytes_per_value
from training.config import RunConfig
from training.model_info import embedded_shape, inspect_model

_GIB = 1024**3


_NF4_BYTES = (4 + 0.127) / 8  # 4 bits + double-quantized absmax (~0.127 bit) per weight


_INT8_BYTES = 1.0 + 4 / 64  # int8 + per-row/col scales, roughly


_MXFP4_BYTES = (4 + 8 / 32) / 8  # e2m1 + one 8-bit scale per 32 weights


# GPT-OSS on the GPU fast path (flex attention, grouped-GEMM experts, compiled layers, chunked
# loss): activations kept by one layer that is not recomputed, bytes per token per hidden unit at
# bf16: no s^2 attention matrix, no full logits (calibrated on the 20b shape: BENCHMARKS.md,
# "Training speed, round 2d").
_FAST_GPT_OSS_LAYER = 37


def gpu_count() -> int:
    """CUDA GPUs visible to this process (0 without CUDA or torch). A CPU-only torch wheel
    (version `...+cpu`, as requirements.txt pins) has none, and is not imported to say so: that
    import (~2-3 s) was most of the start-up of `python -m training run` and of the app."""
    try:
        if importlib.metadata.version("torch").endswith("+cpu"):
            return 0
    except importlib.metadata.PackageNotFoundError:
        pass  # not installed as a package (a source tree on the path, say): ask torch itself
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
    """Bytes a value of the run's compute precision takes on its GPUs (data.precision's rule): as
    asked, or for precision=auto what this machine gives (fp32 without a GPU)."""
    return bytes_per_value(cfg.precision, cfg.precision != "auto" or gpu_count() > 0)


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

    Rough arithmetic, calibrated on GPT-OSS-20b at seq 2048 with and without recomputation
    (BENCHMARKS.md; tests/test_train_config.py holds it to those figures).
    """
    info = inspect_model(cfg) or embedded_shape(cfg.model)
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
