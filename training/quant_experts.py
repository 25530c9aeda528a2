"""Packing a GPT-OSS model's experts (``quantize_experts``) and loading GPT-OSS checkpoints
(``load_gpt_oss``, bf16 or MXFP4 ``*_blocks``/``*_scales`` safetensors) straight onto a device,
experts packed layer by layer so a 120B never needs its 234 GB bf16 form in memory. The storage
formats are ``training.packed``'s; the packed experts compute through ``training.fast_path``.

Not supported: ZeRO-3 partitioning of packed experts, merging expert LoRA into packed weights.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
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
    import time

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.perf_counter()
    path = Path(path)
    device = torch.device(device)
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
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors shards")
    name_to_file: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                name_to_file[k] = f
    params = dict(model.named_parameters())
    experts_by_prefix = {n: m for n, m in iter_experts(model)}
    bytes_read = sum(f.stat().st_size for f in files)
    handles = {f: safe_open(str(f), framework="pt", device="cpu") for f in files}

    # Reads in the order they are used, a few tensors ahead on worker threads, so the disk is
    # read while the device dequantizes/packs the previous tensor (reads release the GIL).
    order: list[str] = []
    for prefix in experts_by_prefix:
        for pname in GPT_OSS_EXPERT_WEIGHTS:
            full = f"{prefix}.{pname}"
            order += [full + "_blocks", full + "_scales"] if full + "_blocks" in name_to_file else [full]
    seen = set(order)
    order += [n for n in params if n in name_to_file and n not in seen]
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ckpt-read")
    pending: dict[str, Any] = {}
    queue = [n for n in order if n in name_to_file]  # (a tied lm_head is never read)
    cursor = 0

    def get(name: str) -> torch.Tensor:
        nonlocal cursor
        while cursor < len(queue) and len(pending) < 8:
            n = queue[cursor]
            cursor += 1
            pending[n] = pool.submit(handles[name_to_file[n]].get_tensor, n)
        fut = pending.pop(name, None)
        return fut.result() if fut is not None else handles[name_to_file[name]].get_tensor(name)

    loaded = set()
    # experts first (the big ones), one tensor at a time
    for prefix, ex in experts_by_prefix.items():
        cdt = dtype
        stores = {}
        for pname in GPT_OSS_EXPERT_WEIGHTS:
            full = f"{prefix}.{pname}"
            shape = tuple(ex._parameters[pname].shape)
            if full + "_blocks" in name_to_file:
                blocks, scales = get(full + "_blocks").to(device), get(full + "_scales").to(device)
                loaded.update({full + "_blocks", full + "_scales"})
                if quantization == "mxfp4":  # kept as read: the checkpoint's own weights
                    stores[pname] = mxfp4_store(blocks.reshape(shape[0], shape[2], -1, 16),
                                                scales.reshape(shape[0], shape[2], -1), shape)
                    continue
                w = dequantize_mxfp4(blocks, scales, cdt).transpose(1, 2).contiguous()  # (E, out, in) -> (E, in, out)
                del blocks, scales
            elif full in name_to_file:
                w = get(full).to(device=device, dtype=cdt)
                loaded.add(full)
            else:
                raise KeyError(f"{path}: no tensor for {full} (nor {full}_blocks)")
            if quantization == "nf4":
                stores[pname] = quantize_tensor_nf4(w, shape, device=device, compute_dtype=cdt)
            elif quantization == "mxfp4":
                stores[pname] = quantize_tensor_mxfp4(w, shape, device=device)
            else:
                ex._parameters[pname] = nn.Parameter(w, requires_grad=False)
            del w
        if stores:
            pack_experts(ex, stores, cdt)
    # everything else
    for name, p in params.items():
        pre, _, pname = name.rpartition(".")
        if pre in experts_by_prefix and pname in GPT_OSS_EXPERT_WEIGHTS:
            continue
        key = name if name in name_to_file else None
        if key is None and name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        if key is None:
            raise KeyError(f"{path}: checkpoint lacks {name}")
        t = get(key)
        mod = model.get_submodule(pre) if pre else model
        keep_fp32 = any(k in name for k in getattr(model, "_keep_in_fp32_modules", None) or [])
        mod._parameters[pname] = nn.Parameter(
            t.to(device=device, dtype=torch.float32 if keep_fp32 and dtype != torch.float32 else dtype),
            requires_grad=p.requires_grad)
        loaded.add(key)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    # non-persistent buffers (rotary inv_freq) were left on meta: rebuild those modules on the device
    _materialize_meta_buffers(model, config, device)
    pool.shutdown(wait=True, cancel_futures=True)
    pending.clear()
    handles.clear()
    if quantization in STORE_KINDS:
        fast_path.install_moe_forward(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    unused = sorted(set(name_to_file) - loaded)
    return model, {"load_s": t1 - t0, "bytes_read": bytes_read, "s_per_gb": (t1 - t0) / (bytes_read / 1e9),
                   "unused_tensors": unused[:10], "n_unused": len(unused)}


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
