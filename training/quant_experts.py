"""4-bit (bitsandbytes NF4, double quant) storage for GPT-OSS's 3-D expert weights.

bitsandbytes replaces only ``nn.Linear``; GPT-OSS keeps its experts as 3-D ``nn.Parameter``s
(``mlp.experts.gate_up_proj`` (E, H, 2I) and ``down_proj`` (E, I, H)), which are >95 % of the
weights.  ``quantize_experts_nf4`` packs each of them with ``bitsandbytes.functional.quantize_4bit``
(NF4, blocksize 64, double-quantized absmax: ~0.516 bytes per weight), in groups of experts, and
deletes the bf16 parameter.  The forward pass (``training.fast_path.moe_forward``) dequantizes
one chunk of a layer's experts at a time right before that chunk's grouped GEMM, and again in
backward, so at most one chunk's bf16 copy (<= 512 MiB) exists at a time.  On CUDA the
dequantization is ``nf4_dequant_torch`` compiled into one kernel (bitsandbytes' own maths; its
kernel is the fallback, ``DEQUANT_BACKEND``).  The packed weights are frozen buffers, so optimizers,
DeepSpeed ZeRO-0/2 and PEFT never see them as trainable; ``.to(device)`` moves them.  LoRA on the
experts (PEFT ``target_parameters``) works with NF4 experts in either order (before or after
``quantize_experts_nf4``): the adapter factors are read from PEFT and fused into the grouped GEMMs.

Not supported: ZeRO-3 partitioning of NF4 experts, merging expert LoRA into NF4 weights.

Also here: ``load_gpt_oss_nf4`` / ``load_gpt_oss`` build a GPT-OSS model from a local checkpoint
folder (bf16 or MXFP4 ``*_blocks``/``*_scales`` safetensors) straight onto a device, quantizing
experts layer by layer so a 120B never needs its 234 GB bf16 form in memory.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.config import GPT_OSS_EXPERT_WEIGHTS
_CHUNK_ELEMS = 1 << 28  # quantize at most this many weights per bitsandbytes call


def _bnb_functional():
    import bitsandbytes.functional as bnbf  # noqa: WPS433 (optional dependency, imported late)

    return bnbf


def _f32_to_i32(t: torch.Tensor) -> torch.Tensor:
    # fp32 statistics are stored as int32 bit patterns so model.to(bf16)/.half() never rounds them
    return t.detach().float().contiguous().view(torch.int32)


# How NF4 chunks are dequantized on CUDA: "torch" = ``nf4_dequant_torch`` compiled by inductor into
# one fused kernel (falls back to bitsandbytes if compiling fails), "bnb" = bitsandbytes'
# dequantize_4bit (~0.5 TB/s on the H200: 0.082 ms per 2880x5760 expert matrix, FACTS.md).
DEQUANT_BACKEND = "torch"


def nf4_dequant_torch(q: torch.Tensor, absmax_q: torch.Tensor, code_i32: torch.Tensor, s2absmax_i32: torch.Tensor,
                      s2code_i32: torch.Tensor, offset_i32: torch.Tensor, blocksize: int, blocksize2: int,
                      numel: int, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' double-quantized NF4 dequantization written as index arithmetic over the output
    elements (no intermediate the size of the weight, so inductor makes it one pointwise kernel).
    Element i: nibble = high half of byte i//2 for even i, low half for odd i; value =
    code[nibble] * (s2code[absmax_q[i//blocksize]] * s2absmax[i//blocksize//blocksize2] + offset),
    computed in fp32 and rounded to ``dtype`` once, as bitsandbytes does."""
    code = code_i32.view(torch.float32)
    s2code = s2code_i32.view(torch.float32)
    s2absmax = s2absmax_i32.view(torch.float32)
    offset = offset_i32.view(torch.float32)
    i = torch.arange(numel, device=q.device)
    byte = q.reshape(-1)[i // 2].to(torch.int32)
    nib = torch.where(i % 2 == 0, byte >> 4, byte & 15)
    blk = i // blocksize
    scale = s2code[absmax_q[blk].to(torch.int64)] * s2absmax[blk // blocksize2] + offset
    return (code[nib.to(torch.int64)] * scale).to(dtype)


_COMPILED: dict = {}


def _dequant_compiled(store: "NF4Store", i: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Chunk i through the compiled ``nf4_dequant_torch``; None (and bitsandbytes from then on)
    if compiling fails."""
    global DEQUANT_BACKEND
    m = store.meta[i]
    if not m["nested"] or m["quant_type"] != "nf4":
        return None
    import torch._dynamo

    fn = _COMPILED.get("fn")
    if fn is None:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
        fn = _COMPILED["fn"] = torch.compile(nf4_dequant_torch, dynamic=False)
    try:  # errors must reach us (compile_layers turns suppress_errors on): eagerly this would
        # materialise int64 indices the size of the chunk (2 GiB at 2**28 weights)
        with torch._dynamo.config.patch(suppress_errors=False):
            return fn(getattr(store, f"q{i}"), getattr(store, f"absmax{i}"), getattr(store, f"code{i}"),
                      getattr(store, f"s2absmax{i}"), getattr(store, f"s2code{i}"), getattr(store, f"offset{i}"),
                      m["blocksize"], m["blocksize2"], m["numel"], dtype)
    except Exception as e:  # no inductor/triton here: bitsandbytes' kernel is always there
        import warnings

        warnings.warn(f"compiled NF4 dequantization failed ({type(e).__name__}: {e}); using bitsandbytes'")
        DEQUANT_BACKEND = "bnb"
        return None


class NF4Store(nn.Module):
    """A 3-D weight held as NF4 chunks (groups of whole experts); ``dequantize(dtype)`` rebuilds it."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.meta: list[dict] = []  # per chunk: expert range, blocksizes, numel

    @property
    def logical_numel(self) -> int:
        return math.prod(self.shape)

    def add_chunk(self, e0: int, e1: int, packed: torch.Tensor, state) -> None:
        i = len(self.meta)
        self.register_buffer(f"q{i}", packed, persistent=False)
        self.register_buffer(f"code{i}", _f32_to_i32(state.code), persistent=False)
        if state.nested:
            self.register_buffer(f"absmax{i}", state.absmax, persistent=False)  # uint8
            self.register_buffer(f"offset{i}", _f32_to_i32(state.offset.reshape(1)), persistent=False)
            self.register_buffer(f"s2absmax{i}", _f32_to_i32(state.state2.absmax), persistent=False)
            self.register_buffer(f"s2code{i}", _f32_to_i32(state.state2.code), persistent=False)
        else:
            self.register_buffer(f"absmax{i}", _f32_to_i32(state.absmax), persistent=False)
        self.meta.append({
            "e0": e0, "e1": e1, "nested": bool(state.nested), "blocksize": int(state.blocksize),
            "blocksize2": int(state.state2.blocksize) if state.nested else None,
            "numel": int(math.prod(state.shape)), "quant_type": state.quant_type,
        })

    def _state(self, i: int, dtype: torch.dtype):
        bnbf = _bnb_functional()
        m = self.meta[i]
        code = getattr(self, f"code{i}").view(torch.float32)
        if m["nested"]:
            state2 = bnbf.QuantState(
                absmax=getattr(self, f"s2absmax{i}").view(torch.float32),
                code=getattr(self, f"s2code{i}").view(torch.float32),
                blocksize=m["blocksize2"], dtype=torch.float32,
            )
            return bnbf.QuantState(
                absmax=getattr(self, f"absmax{i}"), shape=torch.Size([m["numel"]]), code=code,
                blocksize=m["blocksize"], quant_type=m["quant_type"], dtype=dtype,
                offset=getattr(self, f"offset{i}").view(torch.float32)[0], state2=state2,
            )
        return bnbf.QuantState(
            absmax=getattr(self, f"absmax{i}").view(torch.float32), shape=torch.Size([m["numel"]]),
            code=code, blocksize=m["blocksize"], quant_type=m["quant_type"], dtype=dtype,
        )

    def chunk_ranges(self) -> list[tuple[int, int]]:
        """(first expert, end expert) of each packed chunk, in order; together they cover every expert."""
        return [(m["e0"], m["e1"]) for m in self.meta]

    def dequantize_chunk(self, i: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Chunk ``i``'s experts as a dense (e1 - e0, ...) tensor of ``dtype`` (default bf16)."""
        dtype = dtype or torch.bfloat16
        m = self.meta[i]
        q = getattr(self, f"q{i}")
        shape = (m["e1"] - m["e0"], *self.shape[1:])
        if q.device.type == "cuda" and DEQUANT_BACKEND != "bnb":
            w = _dequant_compiled(self, i, dtype)
            if w is not None:
                return w.view(shape)
        return self._dequantize_chunk_bnb(i, dtype).view(shape)

    def _dequantize_chunk_bnb(self, i: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        bnbf = _bnb_functional()
        q = getattr(self, f"q{i}")
        st = self._state(i, dtype)
        if out is None:
            out = torch.empty(self.meta[i]["numel"], dtype=dtype, device=q.device)
        if q.device.type == "cuda":
            bnbf.dequantize_4bit(q, st, out=out)
        else:  # bitsandbytes' CPU backend has no out= variant
            out.copy_(bnbf.dequantize_4bit(q, st).reshape(-1))
        return out

    def dequantize_chunk_torch(self, i: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Chunk ``i`` dequantized by ``nf4_dequant_torch`` (plain torch ops: what runs compiled on
        CUDA), flat."""
        m = self.meta[i]
        if not m["nested"] or m["quant_type"] != "nf4":
            return self._dequantize_chunk_bnb(i, dtype or torch.bfloat16)
        return nf4_dequant_torch(
            getattr(self, f"q{i}"), getattr(self, f"absmax{i}"), getattr(self, f"code{i}"),
            getattr(self, f"s2absmax{i}"), getattr(self, f"s2code{i}"), getattr(self, f"offset{i}"),
            m["blocksize"], m["blocksize2"], m["numel"], dtype or torch.bfloat16)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole (E, ...) weight in ``dtype`` (default bf16)."""
        dtype = dtype or torch.bfloat16
        q0 = getattr(self, "q0")
        out = torch.empty(self.shape, dtype=dtype, device=q0.device)
        for i, (e0, e1) in enumerate(self.chunk_ranges()):
            out[e0:e1] = self.dequantize_chunk(i, dtype)
        return out

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"shape={self.shape}, nf4 double-quant, {len(self.meta)} chunk(s)"


def _placeholder(self, name: str) -> torch.Tensor:
    store: NF4Store = getattr(self, name + "_nf4")
    ref = store.q0
    dtype = getattr(self, "_nf4_compute_dtype", torch.bfloat16)
    # zero-stride view: shape/device/dtype for PEFT's ParamWrapper, no memory
    return torch.empty((), dtype=dtype, device=ref.device).expand(store.shape)


def _nf4_named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
    """PEFT finds ``target_parameters`` by calling ``module.named_parameters(recurse=False)`` on
    each module.  For that direct, non-recursive call the packed experts answer with zero-memory
    placeholders in the original order (gate_up_proj, its bias, down_proj, its bias), so LoRA can
    go onto experts that were quantized first, and the adapter's layout (PEFT nests one wrapper
    per parameter, in this order) is the same as on a bf16 model.  Recursive walks from a parent
    (optimizers, ``model.parameters()``) and every other caller never see the placeholders."""
    import sys

    caller = sys._getframe(1).f_globals.get("__name__", "")
    if recurse or not caller.startswith("peft."):  # only PEFT's matcher sees the placeholders
        yield from nn.Module.named_parameters(self, prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)
        return
    own = dict(self._parameters)
    prefix = prefix + "." if prefix else ""
    for name in (n for w in GPT_OSS_EXPERT_WEIGHTS for n in (w, w + "_bias")):
        if name in own:
            if own[name] is not None:
                yield prefix + name, own.pop(name)
        elif name in GPT_OSS_EXPERT_WEIGHTS:
            yield prefix + name, getattr(self, name)
    for name, p in own.items():
        if p is not None:
            yield prefix + name, p


_NF4_CLASSES: dict[type, type] = {}


def _nf4_class(cls: type) -> type:
    if cls not in _NF4_CLASSES:
        _NF4_CLASSES[cls] = type(
            "NF4" + cls.__name__, (cls,),
            {
                **{w: property(lambda self, w=w: _placeholder(self, w)) for w in GPT_OSS_EXPERT_WEIGHTS},
                "_is_nf4_experts": True,
                "named_parameters": _nf4_named_parameters,
            },
        )
    return _NF4_CLASSES[cls]


def _iter_experts(model: nn.Module):
    for name, m in model.named_modules():
        if type(m).__name__.endswith("GptOssExperts") and hasattr(m, "num_experts"):
            yield name, m


def quantize_tensor_nf4(w: torch.Tensor | None, shape: tuple[int, ...], *, device: torch.device,
                        compute_dtype: torch.dtype, random_std: float | None = None,
                        generator: torch.Generator | None = None, chunk_elems: int | None = None) -> NF4Store:
    """Pack a (E, ...) weight into an NF4Store chunk by chunk (whole experts per chunk).  ``w`` None
    (or on meta) with ``random_std``: draw N(0, std) weights chunk by chunk (random-weights bench).
    ``chunk_elems``: at most this many weights per chunk (default 2**28: 512 MiB in bf16), which is
    also the unit the expert GEMMs dequantize at a time."""
    bnbf = _bnb_functional()
    E = shape[0]
    per = math.prod(shape[1:])
    step = max(1, min(E, (chunk_elems or _CHUNK_ELEMS) // per))
    store = NF4Store(shape)
    for e0 in range(0, E, step):
        e1 = min(E, e0 + step)
        if w is None or w.device.type == "meta":
            if random_std is None:
                raise ValueError("expert weight is on the meta device: give random_std to fill it")
            chunk = torch.randn((e1 - e0) * per, device=device, dtype=torch.float32, generator=generator)
            chunk = chunk.mul_(random_std).to(compute_dtype)
        else:
            chunk = w.detach()[e0:e1].to(device=device, dtype=compute_dtype).reshape(-1)
        packed, state = bnbf.quantize_4bit(
            chunk, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8
        )
        store.add_chunk(e0, e1, packed, state)
        del chunk
    return store


def _default_compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def quantize_experts_nf4(model: nn.Module, compute_dtype: torch.dtype | None = None, *,
                         device: torch.device | str | None = None, random_std: float | None = None,
                         seed: int = 0, chunk_elems: int | None = None) -> dict:
    """Replace every GPT-OSS experts' ``gate_up_proj``/``down_proj`` with frozen NF4 storage and
    route the MLPs through ``training.fast_path.moe_forward``.  Works on a plain or PEFT-wrapped
    model, before or after LoRA.  ``compute_dtype``: the dtype experts are dequantized to (default
    the weights' dtype; bf16 on CUDA for meta weights, fp32 on CPU).  ``chunk_elems``: see
    ``quantize_tensor_nf4``.  Returns the memory report."""
    from training import fast_path  # here, not at the top: fast_path imports this module

    n = 0
    gen = None
    for _name, ex in _iter_experts(model):
        if getattr(ex, "_is_nf4_experts", False):
            continue
        ref = ex._parameters.get("gate_up_proj")
        dev = torch.device(device) if device is not None else (
            ref.device if ref is not None and ref.device.type != "meta"
            else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        cdt = compute_dtype or (ref.dtype if ref is not None and ref.device.type != "meta" and ref.dtype.is_floating_point
                                 else _default_compute_dtype(dev))
        if gen is None and random_std is not None:
            gen = torch.Generator(device=dev)
            gen.manual_seed(seed)
        stores = {}
        for pname in GPT_OSS_EXPERT_WEIGHTS:
            p = ex._parameters[pname]
            stores[pname] = quantize_tensor_nf4(p, tuple(p.shape), device=dev, compute_dtype=cdt,
                                                random_std=random_std, generator=gen, chunk_elems=chunk_elems)
        for pname in GPT_OSS_EXPERT_WEIGHTS:
            del ex._parameters[pname]
            setattr(ex, pname + "_nf4", stores[pname])
        ex._nf4_compute_dtype = cdt
        ex.__class__ = _nf4_class(type(ex))
        n += 2
    if n:
        fast_path.install_moe_forward(model)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    rep = memory_report(model)
    rep["quantized_tensors"] = n
    return rep


def _nf4_stores(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, NF4Store)]


def memory_report(model: nn.Module) -> dict:
    """Bytes held by the model's weights, split into NF4 experts and the rest."""
    stores = _nf4_stores(model)
    store_ids = {id(b) for s in stores for b in s.buffers()}
    expert_bytes = sum(s.nbytes() for s in stores)
    expert_params = sum(s.logical_numel for s in stores)
    seen = set()
    other_bytes = 0
    other_params = 0
    trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        other_bytes += p.numel() * p.element_size()
        other_params += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    for b in model.buffers():
        if id(b) in store_ids or id(b) in seen:
            continue
        seen.add(id(b))
        other_bytes += b.numel() * b.element_size()
    total_params = expert_params + other_params
    total_bytes = expert_bytes + other_bytes
    return {
        "bytes_per_param": total_bytes / max(1, total_params),
        "expert_bytes": expert_bytes,
        "expert_params": expert_params,
        "expert_bytes_per_param": expert_bytes / expert_params if expert_params else None,
        "other_bytes": other_bytes,
        "other_params": other_params,
        "total_bytes": total_bytes,
        "total_params": total_params,
        "trainable_params": trainable,
    }


def bytes_per_param(model: nn.Module) -> float:
    """Bytes of weights held per logical parameter (NF4 experts count their unpacked size)."""
    return memory_report(model)["bytes_per_param"]


def is_quantized(model: nn.Module) -> bool:
    return any(getattr(m, "_is_nf4_experts", False) for m in model.modules())


# --------------------------------------------------------------------------------------------
# Loading GPT-OSS checkpoints (bf16 or MXFP4) straight to a device, experts layer by layer
# --------------------------------------------------------------------------------------------
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16,
                     rows_per_chunk: int = 1 << 24) -> torch.Tensor:
    """OpenAI's MXFP4 layout: blocks (..., G, 16) uint8 (two e2m1 nibbles, low first), scales
    (..., G) uint8 exponents with bias 127 -> (..., G*32).  Same maths as transformers', in row
    chunks so the index tensors stay small."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    *prefix, G, B = blocks.shape
    rows = math.prod(prefix) * G
    blk = blocks.reshape(rows, B)
    exp = (scales.to(torch.int32) - 127).reshape(rows, 1)
    out = torch.empty(rows, 2 * B, dtype=dtype, device=blocks.device)
    for r0 in range(0, rows, rows_per_chunk):
        r1 = min(rows, r0 + rows_per_chunk)
        sub = out[r0:r1]
        sub[:, 0::2] = lut[(blk[r0:r1] & 0x0F).to(torch.int32)]
        sub[:, 1::2] = lut[(blk[r0:r1] >> 4).to(torch.int32)]
        torch.ldexp(sub, exp[r0:r1], out=sub)
    return out.view(*prefix, G * B * 2)


def _mxfp4_expert_weight(blocks: torch.Tensor, scales: torch.Tensor, dtype) -> torch.Tensor:
    # checkpoint stores (E, out, G, 16) for the transposed weight; the model wants (E, in, out)
    w = dequantize_mxfp4(blocks, scales, dtype)  # (E, out, in)
    return w.transpose(1, 2).contiguous()


def load_gpt_oss(path: str | Path, *, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                 quantization: str = "none", attn_implementation: str | None = None) -> tuple[nn.Module, dict]:
    """Build a ``GptOssForCausalLM`` from a local folder straight onto ``device``: meta init, then
    tensors read with safetensors (mmap) and placed; MXFP4 expert blocks are dequantized on the
    device; with ``quantization="nf4"`` each expert tensor is packed right after it is read, so
    peak memory is the final model plus one expert tensor.  Returns (model, timings)."""
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
    experts_by_prefix = {n: m for n, m in _iter_experts(model)}
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
        for pname in GPT_OSS_EXPERT_WEIGHTS:
            full = f"{prefix}.{pname}"
            if full + "_blocks" in name_to_file:
                w = _mxfp4_expert_weight(get(full + "_blocks").to(device), get(full + "_scales").to(device), cdt)
                loaded.update({full + "_blocks", full + "_scales"})
            elif full in name_to_file:
                w = get(full).to(device=device, dtype=cdt)
                loaded.add(full)
            else:
                raise KeyError(f"{path}: no tensor for {full} (nor {full}_blocks)")
            if quantization == "nf4":
                store = quantize_tensor_nf4(w, tuple(w.shape), device=device, compute_dtype=cdt)
                del ex._parameters[pname]
                setattr(ex, pname + "_nf4", store)
            else:
                ex._parameters[pname] = nn.Parameter(w, requires_grad=False)
            del w
        if quantization == "nf4":
            ex._nf4_compute_dtype = cdt
            ex.__class__ = _nf4_class(type(ex))
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
    if quantization == "nf4":
        from training import fast_path  # (fast_path imports this module)

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

