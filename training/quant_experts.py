"""Packing a GPT-OSS model's experts (``quantize_experts``) and loading GPT-OSS checkpoints
(``load_gpt_oss``, bf16 or MXFP4 ``*_blocks``/``*_scales`` safetensors) straight onto a device,
experts packed layer by layer so a 120B never needs its 234 GB bf16 form in memory. The storage
formats are ``training.packed``'s; the packed experts compute through ``training.fast_path``.

Not supported: ZeRO-3 partitioning of packed experts, merging expert LoRA into packed weights.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from training import fast_path
from training.config import GPT_OSS_EXPERT_WEIGHTS
from training.packed import (STORE_KINDS, default_compute_dtype, dequantize_mxfp4, iter_experts, memory_report,
                             mxfp4_store, pack_experts, quantize_tensor_mxfp4, quantize_tensor_nf4)


def quantize_experts(model: nn.Module, fmt: str = "nf4", compute_dtype: torch.dtype | None = None, *,
                     device: torch.device | str | None = None, random_std: float | None = None,
                     seed: int = 0, chunk_elems: int | None = None) -> dict:
    """Replace every GPT-OSS experts' ``gate_up_proj``/``down_proj`` with frozen packed storage,
    ``fmt`` "nf4" (``NF4Store``) or "mxfp4" (``MXFP4Store``), and route the MLPs through
    ``training.fast_path.moe_forward``.  Works on a plain or PEFT-wrapped model, before or after
    LoRA.  ``compute_dtype``: the dtype experts are dequantized to (default the weights' dtype;
    bf16 on CUDA for meta weights, fp32 on CPU).  ``chunk_elems``: see ``quantize_tensor_nf4``.
    Returns the memory report."""
    if fmt not in STORE_KINDS:
        raise ValueError(f"expert format {fmt!r}: choose one of {sorted(STORE_KINDS)}")
    n = 0
    gen = None
    for _name, ex in iter_experts(model):
        if getattr(ex, "_is_packed_experts", False):
            continue
        ref = ex._parameters.get("gate_up_proj")
        dev = torch.device(device) if device is not None else (
            ref.device if ref is not None and ref.device.type != "meta"
            else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        cdt = compute_dtype or (ref.dtype if ref is not None and ref.device.type != "meta" and ref.dtype.is_floating_point
                                 else default_compute_dtype(dev))
        if gen is None and random_std is not None:
            gen = torch.Generator(device=dev)
            gen.manual_seed(seed)
        stores = {}
        for pname in GPT_OSS_EXPERT_WEIGHTS:
            p = ex._parameters[pname]
            if fmt == "nf4":
                stores[pname] = quantize_tensor_nf4(p, tuple(p.shape), device=dev, compute_dtype=cdt,
                                                    random_std=random_std, generator=gen, chunk_elems=chunk_elems)
            else:
                stores[pname] = quantize_tensor_mxfp4(p, tuple(p.shape), device=dev, random_std=random_std,
                                                      generator=gen, chunk_elems=chunk_elems)
        pack_experts(ex, stores, cdt)
        n += 2
    if n:
        fast_path.install_moe_forward(model)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    rep = memory_report(model)
    rep["quantized_tensors"] = n
    return rep


def load_gpt_oss(path: str | Path, *, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                 quantization: str = "none", attn_implementation: str | None = None) -> tuple[nn.Module, dict]:
    """Build a ``GptOssForCausalLM`` from a local folder straight onto ``device``: meta init, then
    tensors read with safetensors (mmap) and placed; MXFP4 expert blocks are dequantized on the
    device; with ``quantization="nf4"`` or ``"mxfp4"`` each expert tensor is packed right after it
    is read (an MXFP4 checkpoint's blocks are kept as they are), so peak memory is the final model
    plus one expert tensor.  Returns (model, timings)."""
    t0 = time.perf_counter()
    path, device = Path(path), torch.device(device)
    model, config = _meta_model(path, dtype, attn_implementation)
    experts = dict(iter_experts(model))
    params = dict(model.named_parameters())  # before packing replaces the experts' parameters
    reader = _CheckpointReader(path)
    reader.plan(_read_order(params, experts, reader.name_to_file))
    try:
        _load_experts(reader, experts, device, dtype, quantization)
        _load_other_parameters(model, config, params, reader, experts, device, dtype)
    finally:
        reader.close()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    # non-persistent buffers (rotary inv_freq) were left on meta: rebuild those modules on the device
    _materialize_meta_buffers(model, config, device)
    if quantization in STORE_KINDS:
        fast_path.install_moe_forward(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    unused = sorted(set(reader.name_to_file) - reader.loaded)
    return model, {"load_s": elapsed, "bytes_read": reader.bytes_read, "s_per_gb": elapsed / (reader.bytes_read / 1e9),
                   "unused_tensors": unused[:10], "n_unused": len(unused)}


def _meta_model(path: Path, dtype: torch.dtype, attn_implementation: str | None) -> tuple[nn.Module, Any]:
    """The model built from the folder's config on the meta device (no memory), with the
    checkpoint's quantization_config dropped: this module places and packs the weights itself."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        try:
            delattr(config, "quantization_config")
        except AttributeError:
            config.quantization_config = None
    if attn_implementation:
        config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, config


def _checkpoint_names(path: Path) -> dict[str, Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors shards")
    name_to_file: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                name_to_file[k] = f
    return name_to_file


def _read_order(params: dict[str, nn.Parameter], experts: dict[str, nn.Module], names: dict[str, Path]) -> list[str]:
    """The checkpoint's tensors in the order loading uses them: every layer's experts (their
    ``_blocks``/``_scales`` where the checkpoint is MXFP4), then the other parameters (a tied
    lm_head is never read)."""
    order: list[str] = []
    for prefix in experts:
        for pname in GPT_OSS_EXPERT_WEIGHTS:
            full = f"{prefix}.{pname}"
            order += [full + "_blocks", full + "_scales"] if full + "_blocks" in names else [full]
    seen = set(order)
    order += [n for n in params if n in names and n not in seen]
    return order


class _CheckpointReader:
    """Reads a folder's safetensors tensors in a known order, a few ahead on worker threads, so the
    disk is read while the device dequantizes or packs the previous tensor (reads release the GIL).
    Remembers which tensors were read."""

    AHEAD = 8

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name_to_file = _checkpoint_names(path)
        files = sorted(set(self.name_to_file.values()))
        self.bytes_read = sum(f.stat().st_size for f in files)
        self.handles = {f: safe_open(str(f), framework="pt", device="cpu") for f in files}
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ckpt-read")
        self.queue: list[str] = []
        self.cursor = 0
        self.pending: dict[str, Any] = {}
        self.loaded: set[str] = set()

    def plan(self, order: list[str]) -> None:
        """The order ``get`` will be called in, for reading ahead."""
        self.queue, self.cursor = [n for n in order if n in self.name_to_file], 0

    def __contains__(self, name: str) -> bool:
        return name in self.name_to_file

    def get(self, name: str) -> torch.Tensor:
        while self.cursor < len(self.queue) and len(self.pending) < self.AHEAD:
            n = self.queue[self.cursor]
            self.cursor += 1
            self.pending[n] = self.pool.submit(self.handles[self.name_to_file[n]].get_tensor, n)
        fut = self.pending.pop(name, None)
        self.loaded.add(name)
        return fut.result() if fut is not None else self.handles[self.name_to_file[name]].get_tensor(name)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()
        self.handles.clear()


def _load_experts(reader: _CheckpointReader, experts: dict[str, nn.Module], device: torch.device,
                  dtype: torch.dtype, quantization: str) -> None:
    """Every layer's expert weights, one tensor at a time (the big ones, first): dequantized from
    MXFP4 or read as they are, then packed (``quantization`` nf4/mxfp4) or kept as parameters."""
    for prefix, ex in experts.items():
        stores = {}
        for pname in GPT_OSS_EXPERT_WEIGHTS:
            full = f"{prefix}.{pname}"
            shape = tuple(ex._parameters[pname].shape)
            if full + "_blocks" in reader:
                blocks, scales = reader.get(full + "_blocks").to(device), reader.get(full + "_scales").to(device)
                if quantization == "mxfp4":  # kept as read: the checkpoint's own weights
                    stores[pname] = mxfp4_store(blocks.reshape(shape[0], shape[2], -1, 16),
                                                scales.reshape(shape[0], shape[2], -1), shape)
                    continue
                w = dequantize_mxfp4(blocks, scales, dtype).transpose(1, 2).contiguous()  # (E, out, in) -> (E, in, out)
                del blocks, scales
            elif full in reader:
                w = reader.get(full).to(device=device, dtype=dtype)
            else:
                raise KeyError(f"{reader.path}: no tensor for {full} (nor {full}_blocks)")
            if quantization == "nf4":
                stores[pname] = quantize_tensor_nf4(w, shape, device=device, compute_dtype=dtype)
            elif quantization == "mxfp4":
                stores[pname] = quantize_tensor_mxfp4(w, shape, device=device)
            else:
                ex._parameters[pname] = nn.Parameter(w, requires_grad=False)
            del w
        if stores:
            pack_experts(ex, stores, dtype)


def _load_other_parameters(model: nn.Module, config: Any, params: dict[str, nn.Parameter], reader: _CheckpointReader,
                           experts: dict[str, nn.Module], device: torch.device, dtype: torch.dtype) -> None:
    """Every parameter but the experts' in ``dtype`` (fp32 for the model's keep-in-fp32 modules)."""
    keep_fp32_modules = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, p in params.items():
        pre, _, pname = name.rpartition(".")
        if pre in experts and pname in GPT_OSS_EXPERT_WEIGHTS:
            continue
        if name not in reader:
            if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
                continue
            raise KeyError(f"{reader.path}: checkpoint lacks {name}")
        mod = model.get_submodule(pre) if pre else model
        keep_fp32 = any(k in name for k in keep_fp32_modules)
        mod._parameters[pname] = nn.Parameter(
            reader.get(name).to(device=device, dtype=torch.float32 if keep_fp32 and dtype != torch.float32 else dtype),
            requires_grad=p.requires_grad)


def _materialize_meta_buffers(model: nn.Module, config, device: torch.device) -> None:
    for name, mod in list(model.named_modules()):
        if not any(b is not None and b.device.type == "meta" for b in mod._buffers.values()):
            continue
        if type(mod).__name__.endswith("RotaryEmbedding"):
            with torch.device(device):
                fresh = type(mod)(config=config)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)
        else:
            for bname, b in list(mod._buffers.items()):
                if b is not None and b.device.type == "meta":
                    mod._buffers[bname] = torch.zeros(b.shape, dtype=b.dtype, device=device)


def load_gpt_oss_nf4(path: str | Path, *, device: str | torch.device = "cuda",
                     dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module, dict]:
    """``load_gpt_oss`` with NF4 experts (what a 120B on one GPU needs)."""
    model, info = load_gpt_oss(path, device=device, dtype=dtype, quantization="nf4")
    info.update(memory_report(model))
    return model, info
