"""4-bit storage for GPT-OSS's 3-D expert weights: bitsandbytes NF4 or the checkpoint's own MXFP4.

bitsandbytes replaces only ``nn.Linear``; GPT-OSS keeps its experts as 3-D ``nn.Parameter``s
(``mlp.experts.gate_up_proj`` (E, H, 2I) and ``down_proj`` (E, I, H)), which are >95 % of the
weights.  A ``PackedStore`` holds one of them in groups of whole experts:

* ``"nf4"`` (``NF4Store``): ``bitsandbytes.functional.quantize_4bit``, NF4, blocksize 64,
  double-quantized absmax (~0.516 bytes per weight); lossy.  Dequantized on CUDA by
  ``nf4_dequant_torch`` compiled into one kernel (bitsandbytes' own maths; its kernel is the
  fallback, ``DEQUANT_BACKEND``).
* ``"mxfp4"`` (``MXFP4Store``): OpenAI's MXFP4, the format GPT-OSS checkpoints ship their experts
  in (e2m1 values, a power-of-two scale per 32, ~0.531 bytes per weight).  Kept as read from an
  MXFP4 checkpoint, so training sees exactly the checkpoint's weights; from other weights it rounds
  them (``quantize_mxfp4``).  Dequantized on CUDA by ``mxfp4_dequant_torch``, compiled.

The packed weights are frozen buffers, so optimizers, DeepSpeed ZeRO-0/2 and PEFT never see them
as trainable; ``.to(device)`` moves them.  ``training.fast_path`` computes with them (one chunk of
experts dequantized at a time, forward and backward); ``training.quant_experts`` packs a model's
experts and loads GPT-OSS checkpoints into this form.
"""
from __future__ import annotations

import math
import sys
import warnings

import torch
from torch import nn

from data.precision import torch_dtype
from training.config import GPT_OSS_EXPERT_WEIGHTS


_CHUNK_ELEMS = 1 << 28  # quantize at most this many weights per bitsandbytes call


# An MXFP4 weight of at most this many values (1.1 GiB in bf16) is one chunk: it dequantizes in one
# kernel and feeds one grouped GEMM whose routed-row offsets stay on the device, with no host sync
# (20b shape: gate_up 531M values, 1.06 GB in bf16).  Bigger ones (the 120b's 2.1G-value gate_up)
# are split, each chunk at most this size, at one host sync per GEMM for the chunks' row ranges.
MXFP4_CHUNK_ELEMS = int(1.1 * 2**30) // 2


def _bnb_functional():
    import bitsandbytes.functional as bnbf  # noqa: WPS433 (optional dependency, imported late)

    return bnbf


def _f32_to_i32(t: torch.Tensor) -> torch.Tensor:
    # fp32 statistics are stored as int32 bit patterns so model.to(bf16)/.half() never rounds them
    return t.detach().float().contiguous().view(torch.int32)


# How NF4 chunks are dequantized on CUDA: "torch" = ``nf4_dequant_torch`` compiled by inductor into
# one fused kernel (falls back to bitsandbytes if compiling fails), "bnb" = bitsandbytes'
# dequantize_4bit (slower: a kernel per tensor, BENCHMARKS.md).
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


def _run_compiled(name: str, fn, *args, fallback: str):
    """``fn(*args)`` through ``torch.compile`` (static shapes, compiled once per name); None if
    compiling fails, with a warning naming ``fallback``, and None from then on.  Compiled because
    eagerly these index-arithmetic kernels would materialise int64 indices the size of the chunk
    (2 GiB at 2**28 weights)."""
    if _COMPILED.get(name + "_failed"):
        return None
    import torch._dynamo

    compiled = _COMPILED.get(name)
    if compiled is None:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
        compiled = _COMPILED[name] = torch.compile(fn, dynamic=False)
    try:  # errors must reach us (compile_layers turns suppress_errors on)
        with torch._dynamo.config.patch(suppress_errors=False):
            return compiled(*args)
    except Exception as e:  # no inductor/triton here
        warnings.warn(f"compiled {name} dequantization failed ({type(e).__name__}: {e}); using {fallback}")
        _COMPILED[name + "_failed"] = True
        return None


def _dequant_compiled(store: "NF4Store", i: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Chunk i through the compiled ``nf4_dequant_torch``; None (and bitsandbytes from then on)
    if compiling fails."""
    global DEQUANT_BACKEND
    m = store.meta[i]
    if not m["nested"] or m["quant_type"] != "nf4":
        return None
    w = _run_compiled("nf4", nf4_dequant_torch, getattr(store, f"q{i}"), getattr(store, f"absmax{i}"),
                      getattr(store, f"code{i}"), getattr(store, f"s2absmax{i}"), getattr(store, f"s2code{i}"),
                      getattr(store, f"offset{i}"), m["blocksize"], m["blocksize2"], m["numel"], dtype,
                      fallback="bitsandbytes' kernel")
    if w is None:  # bitsandbytes' kernel is always there
        DEQUANT_BACKEND = "bnb"
    return w


def _expert_ranges(shape: tuple[int, ...], chunk_elems: int | None = None) -> list[tuple[int, int]]:
    """(first, end) expert of each chunk: whole experts, at most ``chunk_elems`` weights (default
    2**28, 512 MiB in bf16) per chunk, at least one expert."""
    E = shape[0]
    step = max(1, min(E, (chunk_elems or _CHUNK_ELEMS) // math.prod(shape[1:])))
    return [(e0, min(E, e0 + step)) for e0 in range(0, E, step)]


def _expert_chunks(w, shape, device, random_std=None, generator=None, chunk_elems=None):
    """(e0, e1, the chunk's weights on ``device``) per chunk of a (E, ...) weight; ``w`` None or on
    meta: N(0, random_std) fp32 weights drawn chunk by chunk (the random-weights bench)."""
    for e0, e1 in _expert_ranges(shape, chunk_elems):
        if w is None or w.device.type == "meta":
            if random_std is None:
                raise ValueError("expert weight is on the meta device: give random_std to fill it")
            yield e0, e1, torch.randn((e1 - e0, *shape[1:]), device=device, dtype=torch.float32,
                                      generator=generator).mul_(random_std)
        else:
            yield e0, e1, w.detach()[e0:e1].to(device)


class PackedStore(nn.Module):
    """A frozen 3-D expert weight (E, in, out) held packed, in chunks of whole experts; a subclass
    says how a chunk is stored (``KIND``, per-chunk ``META`` ints and buffer names) and dequantized
    (``dequantize_chunk``).  ``dequantize(dtype)`` rebuilds the whole weight."""

    KIND = ""
    META: tuple[str, ...] = ()

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.meta: list[dict] = []  # per chunk: expert range, numel, the format's own fields

    @staticmethod
    def chunk_buffers(m: dict) -> tuple[str, ...]:
        raise NotImplementedError

    @classmethod
    def meta_to_ints(cls, m: dict) -> list[int]:
        """A chunk's layout as ints (what the compiled layers' custom op takes), ``META`` order."""
        return [int(m[k] or 0) for k in cls.META]

    @classmethod
    def meta_from_ints(cls, values: list[int]) -> dict:
        return {**dict(zip(cls.META, values)), "quant_type": cls.KIND}

    @property
    def logical_numel(self) -> int:
        return math.prod(self.shape)

    def chunk_ranges(self) -> list[tuple[int, int]]:
        """(first expert, end expert) of each packed chunk, in order; together they cover every expert."""
        return [(m["e0"], m["e1"]) for m in self.meta]

    def dequantize_chunk(self, i: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole (E, ...) weight in ``dtype`` (default bf16)."""
        dtype = dtype or torch.bfloat16
        out = torch.empty(self.shape, dtype=dtype, device=next(self.buffers()).device)
        for i, (e0, e1) in enumerate(self.chunk_ranges()):
            out[e0:e1] = self.dequantize_chunk(i, dtype)
        return out

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"shape={self.shape}, {self.KIND}, {len(self.meta)} chunk(s)"


class NF4Store(PackedStore):
    """NF4 chunks (bitsandbytes' double-quantized format)."""

    KIND = "nf4"
    META = ("e0", "e1", "nested", "blocksize", "blocksize2", "numel")

    @staticmethod
    def chunk_buffers(m: dict) -> tuple[str, ...]:
        return ("q", "code", "absmax") + (("offset", "s2absmax", "s2code") if m["nested"] else ())

    @classmethod
    def meta_from_ints(cls, values: list[int]) -> dict:
        m = super().meta_from_ints(values)
        m["nested"] = bool(m["nested"])
        m["blocksize2"] = m["blocksize2"] if m["nested"] else None
        return m

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

    def extra_repr(self) -> str:
        return f"shape={self.shape}, nf4 double-quant, {len(self.meta)} chunk(s)"


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


def mxfp4_dequant_torch(blocks: torch.Tensor, scales: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_mxfp4``'s maths as index arithmetic over the output elements, flat (no
    intermediate the size of the weight: inductor makes it one pointwise kernel).  Element i:
    nibble = low half of byte i//2 for even i, high half for odd i (e2m1: sign, 2 exponent bits,
    1 mantissa bit), times 2**(scales[i//32] - 127).  Every value is exact in bf16."""
    i = torch.arange(numel, device=blocks.device)
    byte = blocks.reshape(-1)[i // 2].to(torch.int32)
    nib = torch.where(i % 2 == 0, byte & 15, byte >> 4)
    e = (nib >> 1) & 3
    m = (nib & 1).to(torch.float32)
    mag = torch.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * torch.exp2((e - 1).to(torch.float32)))
    val = torch.where(nib >= 8, -mag, mag)
    return (val * torch.exp2((scales.reshape(-1)[i // 32].to(torch.int32) - 127).to(torch.float32))).to(dtype)


_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between the e2m1 magnitudes 0 .. 6


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) weights, K a multiple of 32 -> OpenAI's MXFP4 (blocks (..., K/32, 16) uint8,
    scales (..., K/32) uint8), the OCP MX rule: per 32 weights a power-of-two scale
    2**(floor(log2(amax)) - 2), each weight rounded to the nearest e2m1 value (saturating at 6).
    Lossy for arbitrary weights; values that came from MXFP4 come back bit for bit."""
    *prefix, K = w.shape
    if K % 32:
        raise ValueError(f"MXFP4 packs 32 weights per scale: the last dimension ({K}) is not a multiple of 32")
    x = w.detach().float().contiguous().reshape(*prefix, K // 32, 32)
    amax = x.abs().amax(-1, keepdim=True)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(2.0**-126))) - 2, torch.full_like(amax, -127))
    exp = exp.clamp(-127, 127)
    mag = (x.abs() * torch.exp2(-exp)).clamp(max=6.0)
    nib = torch.bucketize(mag, torch.tensor(_FP4_MIDPOINTS, device=x.device)).to(torch.uint8)
    nib = nib | ((x < 0) & (nib > 0)).to(torch.uint8) << 3
    blocks = nib[..., 0::2] | (nib[..., 1::2] << 4)
    return blocks.contiguous(), (exp.squeeze(-1) + 127).to(torch.uint8)


class MXFP4Store(PackedStore):
    """OpenAI's MXFP4 chunks, the format GPT-OSS checkpoints ship their experts in (4.25 bits per
    weight): kept as read, so an MXFP4 checkpoint trains on exactly its own weights at a quarter of
    bf16's memory.  Buffers hold the checkpoint's orientation, (e, out, in/32, 16) blocks and
    (e, out, in/32) scales; a chunk dequantizes to (e, out, in) and is handed out as its (e, in,
    out) transposed view (the grouped GEMM takes either layout, no copy)."""

    KIND = "mxfp4"
    META = ("e0", "e1", "numel")

    @staticmethod
    def chunk_buffers(m: dict) -> tuple[str, ...]:
        return ("blocks", "scales")

    def add_chunk(self, e0: int, e1: int, blocks: torch.Tensor, scales: torch.Tensor) -> None:
        i = len(self.meta)
        if tuple(blocks.shape) != (e1 - e0, self.shape[2], self.shape[1] // 32, 16):
            raise ValueError(f"MXFP4 blocks of experts {e0}:{e1} have shape {tuple(blocks.shape)}, expected "
                             f"{(e1 - e0, self.shape[2], self.shape[1] // 32, 16)}")
        self.register_buffer(f"blocks{i}", blocks.contiguous(), persistent=False)
        self.register_buffer(f"scales{i}", scales.contiguous(), persistent=False)
        self.meta.append({"e0": e0, "e1": e1, "numel": (e1 - e0) * self.shape[1] * self.shape[2],
                          "quant_type": "mxfp4"})

    def dequantize_chunk(self, i: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Chunk ``i``'s experts as a (e1 - e0, in, out) view of ``dtype`` (default bf16)."""
        dtype = dtype or torch.bfloat16
        m = self.meta[i]
        blocks, scales = getattr(self, f"blocks{i}"), getattr(self, f"scales{i}")
        w = (_run_compiled("mxfp4", mxfp4_dequant_torch, blocks, scales, m["numel"], dtype,
                           fallback="the eager LUT path") if blocks.is_cuda else None)
        if w is None:
            w = dequantize_mxfp4(blocks, scales, dtype)
        return w.view(m["e1"] - m["e0"], self.shape[2], self.shape[1]).transpose(1, 2)


def mxfp4_store(blocks: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...], *,
                chunk_elems: int | None = None) -> MXFP4Store:
    """An MXFP4Store of a (E, in, out) weight from its checkpoint tensors (E, out, in/32, 16) and
    (E, out, in/32), split into chunks of whole experts (``chunk_elems``: as quantize_tensor_nf4)."""
    store = MXFP4Store(shape)
    for e0, e1 in _expert_ranges(shape, chunk_elems or MXFP4_CHUNK_ELEMS):
        store.add_chunk(e0, e1, blocks[e0:e1], scales[e0:e1])
    return store


def quantize_tensor_mxfp4(w: torch.Tensor | None, shape: tuple[int, ...], *, device: torch.device,
                          random_std: float | None = None, generator: torch.Generator | None = None,
                          chunk_elems: int | None = None) -> MXFP4Store:
    """A (E, in, out) weight packed into an MXFP4Store (``quantize_mxfp4`` per expert chunk); ``w``
    None or on meta with ``random_std``: N(0, std) weights drawn chunk by chunk (random-weights bench)."""
    store = MXFP4Store(shape)
    for e0, e1, chunk in _expert_chunks(w, shape, device, random_std, generator, chunk_elems or MXFP4_CHUNK_ELEMS):
        blocks, scales = quantize_mxfp4(chunk.transpose(1, 2))
        store.add_chunk(e0, e1, blocks, scales)
        del chunk
    return store


STORE_KINDS: dict[str, type[PackedStore]] = {c.KIND: c for c in (NF4Store, MXFP4Store)}


def _placeholder(self, name: str) -> torch.Tensor:
    store: PackedStore = getattr(self, name + "_packed")
    ref = next(store.buffers())
    dtype = getattr(self, "_packed_compute_dtype", torch.bfloat16)
    # zero-stride view: shape/device/dtype for PEFT's ParamWrapper, no memory
    return torch.empty((), dtype=dtype, device=ref.device).expand(store.shape)


def _packed_named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
    """PEFT finds ``target_parameters`` by calling ``module.named_parameters(recurse=False)`` on
    each module.  For that direct, non-recursive call the packed experts answer with zero-memory
    placeholders in the original order (gate_up_proj, its bias, down_proj, its bias), so LoRA can
    go onto experts that were quantized first, and the adapter's layout (PEFT nests one wrapper
    per parameter, in this order) is the same as on a bf16 model.  Recursive walks from a parent
    (optimizers, ``model.parameters()``) and every other caller never see the placeholders."""
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


_PACKED_CLASSES: dict[type, type] = {}


def _packed_class(cls: type) -> type:
    if cls not in _PACKED_CLASSES:
        _PACKED_CLASSES[cls] = type(
            "Packed" + cls.__name__, (cls,),
            {
                **{w: property(lambda self, w=w: _placeholder(self, w)) for w in GPT_OSS_EXPERT_WEIGHTS},
                "_is_packed_experts": True,
                "named_parameters": _packed_named_parameters,
            },
        )
    return _PACKED_CLASSES[cls]


def pack_experts(ex: nn.Module, stores: dict, compute_dtype: torch.dtype) -> None:
    """Swap a GPT-OSS experts module's 3-D weights for packed stores (``<name>_packed``)."""
    for pname, store in stores.items():
        ex._parameters.pop(pname, None)
        setattr(ex, pname + "_packed", store)
    ex._packed_compute_dtype = compute_dtype
    ex.__class__ = _packed_class(type(ex))


def iter_experts(model: nn.Module):
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
    store = NF4Store(shape)
    for e0, e1, chunk in _expert_chunks(w, shape, device, random_std, generator, chunk_elems):
        chunk = chunk.to(compute_dtype).reshape(-1)
        packed, state = bnbf.quantize_4bit(
            chunk, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8
        )
        store.add_chunk(e0, e1, packed, state)
        del chunk
    return store


def default_compute_dtype(device: torch.device) -> torch.dtype:
    return torch_dtype(None, device)


def packed_stores(model: nn.Module) -> list[PackedStore]:
    return [m for m in model.modules() if isinstance(m, PackedStore)]


def memory_report(model: nn.Module) -> dict:
    """Bytes held by the model's weights, split into packed (NF4/MXFP4) experts and the rest."""
    stores = packed_stores(model)
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
        "expert_format": "+".join(sorted({s.KIND for s in stores})) or None,
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
    """Bytes of weights held per logical parameter (packed experts count their unpacked size)."""
    return memory_report(model)["bytes_per_param"]


def is_quantized(model: nn.Module) -> bool:
    return any(getattr(m, "_is_packed_experts", False) for m in model.modules())
