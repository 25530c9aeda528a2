"""The GPU speed path for LoRA training (GPT-OSS first, any causal LM where it is safe).

Two entry points the training engine calls:

* ``apply(model, cfg=None) -> list[str]``: switches a model (plain or PEFT-wrapped) onto the fast
  kernels when it sits on a CUDA device and returns the names of what it applied; on CPU it
  changes nothing and returns ``[]``.  Its two knobs are ``RunConfig`` fields: ``fast_path``
  (all of it) and ``compile_layers``.  What it can apply:

  - ``flex_attention``: GPT-OSS attention (sinks + sliding window) through transformers'
    flex_attention integration instead of eager attention (``sdpa`` is refused for GPT-OSS).
  - ``project_experts``: our own MoE expert path (``moe_forward`` below): one sort by expert,
    grouped GEMMs (``torch.nn.functional.grouped_mm``), a SwiGLU-with-clamp autograd function that
    keeps only the gate/up output for backward, and **fused expert LoRA**: when PEFT put LoRA on
    ``mlp.experts.gate_up_proj``/``down_proj`` (``target_parameters``) we read PEFT's own A/B
    factors and add ``(x @ A_e) @ B_e * scale`` with two more grouped GEMMs instead of
    materialising ``W + B A`` for every expert on every forward (what PEFT does).  Adapters stay
    PEFT's, so saving and ``PeftModel.from_pretrained`` are unchanged.  Packed experts (NF4 or
    the checkpoint's MXFP4, ``training.packed``) go through the same path, dequantized inside the GEMM's autograd
    function one packed chunk of experts at a time (NF4 <= 512 MiB in bf16, MXFP4 <= 1.1 GiB;
    chunks nobody was routed to skipped), forward and backward, so a 120b layer's bf16 experts
    (~6 GB) never exist whole; a one-chunk weight (the 20b's in MXFP4) is one grouped GEMM with
    the routed offsets on the device, no host sync.
    A recomputed layer keeps its dequantized experts for its backward only when they fit
    ``PACKED_KEEP_MAX_BYTES``.  On CUDA the dequantization is a compiled torch kernel
    (``packed.nf4_dequant_torch``, bit-for-bit bitsandbytes' maths, unless
    ``packed.DEQUANT_BACKEND = "bnb"``; ``mxfp4_dequant_torch``).
  - ``compile_layers``: ``torch.compile`` of every decoder layer when ``cfg.compile_layers`` (the
    default); errors fall back to eager.  With packed experts their grouped GEMM is one opaque custom
    op in the layer's graph (it reads the routed row counts on the host and calls its own kernels).
    The biggest single win of the fast path (BENCHMARKS.md, "Training speed, round 2"): a graph
    break inside a layer's activation checkpointing (transformers 5.24) ran the whole "compiled"
    layer eager, so no op of a layer may break its graph.
  - ``tf32_lora``: TF32 tensor cores for the fp32 LoRA matmuls when the base model is bf16/fp16.
  - ``fused_ce``: ``compute_loss`` computes the loss from the last hidden state in token chunks
    with a hand-written backward, so the (tokens x 201k) logits never exist in full, and only the
    positions that carry labels are projected at all; with ``compile_layers`` each chunk's softmax
    and gradient are one compiled kernel pair (no fp32 copy of the chunk).

* ``compute_loss(model, batch) -> (mean loss over label tokens, n_label_tokens)``: the same value
  as ``model(**batch).loss`` (causal shift, ``-100`` ignored, mean over label tokens).  On CUDA it
  takes the fused path when the model allows it; on CPU the plain ``model(...)`` path (``fused=True``
  forces the fused path anywhere, which is how the CPU tests prove the two agree).

Everything here is importable and runs without a GPU; nothing here needs bitsandbytes unless
experts are NF4-quantized.
"""
from __future__ import annotations

import math
import types
import warnings

import torch
import torch.nn.functional as F

from training import packed
from training.config import RunConfig

# Models whose causal-LM head is a plain ``lm_head`` over ``model.model``'s last hidden state, with
# nothing between them (no logit soft-capping or scaling): the fused loss is exact for these.
_FUSED_CE_MODEL_TYPES = {
    "gpt_oss", "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma3_text", "gemma", "phi3", "olmo2",
}


# --------------------------------------------------------------------------------------------
# model plumbing
# --------------------------------------------------------------------------------------------
from scoring.head import base_causal_lm  # noqa: E402 (one home: the trainer's score head uses it too)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _half_precision_base(lm: torch.nn.Module) -> bool:
    emb = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    return w is not None and w.dtype in (torch.bfloat16, torch.float16)


def _model_type(model: torch.nn.Module) -> str | None:
    cfg = getattr(base_causal_lm(model), "config", None)
    return getattr(cfg, "model_type", None)


def apply(model: torch.nn.Module, cfg: RunConfig | None = None, *, force: bool = False) -> list[str]:
    """Turn on the GPU speedups for ``model``; returns what was applied ([] on CPU or when
    ``cfg.fast_path`` is False).  ``cfg`` None: RunConfig's defaults.  ``force=True`` installs the
    device-independent parts (project experts) on CPU too; the tests use it."""
    cfg = cfg or RunConfig()
    if not cfg.fast_path:
        return []
    device = _model_device(model)
    on_cuda = device.type == "cuda"
    if not on_cuda and not force:
        return []
    applied: list[str] = []
    lm = base_causal_lm(model)
    mtype = _model_type(model)
    if on_cuda and mtype == "gpt_oss" and _set_attn(lm, "flex_attention"):
        applied.append("flex_attention")
    if mtype == "gpt_oss" and install_moe_forward(lm):
        applied.append("project_experts")
        if any(_lora_factors(_unwrap_experts(m.experts)[1]) for m in _gpt_oss_mlps(lm)):
            applied.append("fused_expert_lora")
    if on_cuda and fused_ce_supported(model):
        applied.append("fused_ce")
        _CE_COMPILED["enabled"] = bool(cfg.compile_layers)  # compile_layers=false: nothing compiles
    if on_cuda and _half_precision_base(lm):
        # The LoRA factors train in fp32, so PEFT runs their matmuls in fp32, which without TF32
        # are slow SIMT kernels (a visible share of a step's GPU time in the profiles).
        # Their inputs are bf16 activations (exact in TF32); TF32 rounds the factors to 10 bits,
        # finer than the bf16 base path's own rounding.  Only when the base weights are half
        # precision: an fp32 run keeps fp32 matmuls.
        torch.backends.cuda.matmul.allow_tf32 = True
        applied.append("tf32_lora")
    # Compiled: bf16 and packed experts, attention and expert LoRA (the first step compiles).
    if on_cuda and mtype == "gpt_oss" and cfg.compile_layers:
        if compile_layers(lm):
            applied.append("compile_layers")
    return applied


def compile_layers(model: torch.nn.Module, enable: bool = True) -> bool:
    """torch.compile each decoder layer in place (fuses norms, RoPE, routing, SwiGLU, residuals
    around flex_attention and the grouped GEMMs).
    Compilation errors fall back to eager (dynamo suppress_errors) instead of failing a run.
    Each new sequence length compiles once more (first steps slower); pad to a few fixed lengths."""
    layers = getattr(getattr(base_causal_lm(model), "model", None), "layers", None)
    if layers is None:
        return False
    if enable:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
        # room for one entry per layer (120b: 36; frames that guard on the layer's modules may
        # compile per layer) and a few shapes
        for name, least in (("cache_size_limit", 128), ("accumulated_cache_size_limit", 1024)):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), least))
    for layer in layers:
        layer.__dict__.pop("forward", None)
        layer._compiled_call_impl = None
        if not enable:
            continue
        inner = _checkpointing_wrapped(type(layer).forward)
        if inner is None:
            layer.compile()
        else:
            layer.forward = _checkpoint_around(layer, torch.compile(types.MethodType(inner, layer)))
    return True


def _checkpointing_wrapped(forward):
    """The forward that transformers' GradientCheckpointingLayer wraps (functools.wraps), or None."""
    code = getattr(forward, "__code__", None)
    if code is not None and code.co_name == "forward_with_checkpointing":
        return getattr(forward, "__wrapped__", None)
    return None


def _checkpoint_around(layer: torch.nn.Module, compiled):
    """A recomputed layer's call: torch.utils.checkpoint in eager around the compiled forward.
    transformers 5 checkpoints inside ``forward``, so compiling the layer traced the checkpoint into
    the graph, which put the LoRA grads far from fp32 on the GPU
    (test_compiled_layers_are_no_further_from_fp32_than_eager_layers)."""
    from torch.utils.checkpoint import checkpoint

    def forward(*args, **kwargs):
        if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
            # as transformers' wrapper does: the recompute must not write a KV cache twice
            for key in ("past_key_values", "cache", "layer_past"):
                if key in kwargs:
                    kwargs[key] = None
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            return checkpoint(compiled, *args, use_reentrant=False, **kwargs)
        return compiled(*args, **kwargs)

    return forward


def _set_attn(lm: torch.nn.Module, impl: str) -> bool:
    try:
        if hasattr(lm, "set_attn_implementation"):
            lm.set_attn_implementation(impl)
        else:  # older transformers
            lm.config._attn_implementation = impl
        return True
    except Exception:  # kernel unavailable: keep what the model had
        return False


# --------------------------------------------------------------------------------------------
# fused, chunked cross-entropy from the last hidden state
# --------------------------------------------------------------------------------------------
class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(h @ W^T, target), computed chunk by chunk; the gradient w.r.t. h (and
    W if it trains) is formed in the forward pass so no logits are kept for backward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int):
        n = h.shape[0]
        need_h = h.requires_grad
        need_w = weight.requires_grad
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            hc = h[s : s + chunk]
            tc = target[s : s + chunk]
            loss, g = _ce_chunk(hc @ weight.t(), tc, need_h or need_w)
            total += loss
            if g is not None:
                if need_h:
                    grad_h[s : s + chunk] = g @ weight
                if need_w:
                    grad_w += (g.t() @ hc).float()
                del g
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.need = (need_h, need_w)
        ctx.wdtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.need
        gh = None
        gw = None
        if need_h:
            t = saved.pop(0)
            gh = t * grad_out.to(t.dtype)
        if need_w:
            t = saved.pop(0)
            gw = (t * grad_out).to(ctx.wdtype)
        return gh, gw, None, None


def _ce_sum(logits: torch.Tensor, tc: torch.Tensor):
    """(fp32 logits, their logsumexp per row, the chunk's summed CE)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    return x, lse, (lse - x.gather(1, tc[:, None]).squeeze(1)).sum()


def _ce_chunk_eager(logits: torch.Tensor, tc: torch.Tensor, need_grad: bool):
    """(sum of CE over the chunk's rows, d(sum)/d(logits) in the logits' dtype or None), from bf16
    logits computed in fp32 (the stock loss's rounding: lm_head, then .float()); in place, so one
    fp32 copy of the chunk exists."""
    x, lse, loss = _ce_sum(logits, tc)
    if not need_grad:
        return loss, None
    probs = x.sub_(lse[:, None]).exp_()  # softmax
    probs[torch.arange(tc.shape[0], device=tc.device), tc] -= 1.0
    return loss, probs.to(logits.dtype)


def _ce_chunk_fusable(logits: torch.Tensor, tc: torch.Tensor, need_grad: bool):
    """The same maths written for inductor: one reduction pass and one pointwise pass over the bf16
    logits, no fp32 copy of the chunk (eager, the comparison below would be a (rows x vocab) mask)."""
    x, lse, loss = _ce_sum(logits, tc)
    if not need_grad:
        return loss, None
    hit = torch.arange(x.shape[1], device=x.device)[None, :] == tc[:, None]
    return loss, ((x - lse[:, None]).exp() - hit.to(x.dtype)).to(logits.dtype)


_CE_COMPILED: dict = {}


def _ce_chunk(logits: torch.Tensor, tc: torch.Tensor, need_grad: bool):
    """One chunk of the fused loss: compiled on CUDA (the eager elementwise passes over fp32 logits
    are a share of a step worth fusing), eager elsewhere, with ``compile_layers`` off, or if
    compiling fails."""
    if not logits.is_cuda or _CE_COMPILED.get("failed") or not _CE_COMPILED.get("enabled", True):
        return _ce_chunk_eager(logits, tc, need_grad)
    import torch._dynamo

    fn = _CE_COMPILED.get("fn")
    if fn is None:  # rows vary (the last chunk, packed label counts): one dynamic graph
        fn = _CE_COMPILED["fn"] = torch.compile(_ce_chunk_fusable, dynamic=True)
    try:  # errors must reach us (compile_layers turns suppress_errors on): eager, the fusable
        # form would build a (rows x vocab) mask
        with torch._dynamo.config.patch(suppress_errors=False):
            return fn(logits, tc, need_grad)
    except Exception as e:
        warnings.warn(f"compiled loss chunk failed ({type(e).__name__}: {e}); using the eager one")
        _CE_COMPILED["failed"] = True
        return _ce_chunk_eager(logits, tc, need_grad)


def linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                             chunk: int | None = None) -> torch.Tensor:
    """Sum of token cross-entropies of ``h @ weight.T`` against ``target`` (fp32 scalar), ``chunk``
    tokens at a time (None: as many as keep one fp32 logits chunk near 1 GiB, 1024 for a 201k vocab)."""
    if not chunk:
        chunk = 1 << max(8, min(13, int(math.log2(max(1, (1 << 28) // weight.shape[0])))))
    return _LinearCrossEntropy.apply(h, weight, target, int(chunk))


def fused_ce_supported(model: torch.nn.Module) -> bool:
    lm = base_causal_lm(model)
    cfg = getattr(lm, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _FUSED_CE_MODEL_TYPES:
        return False
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logits_scaling", None):
        return False
    if getattr(cfg, "output_router_logits", False):  # stock adds the router aux loss: keep stock
        return False
    head = getattr(lm, "lm_head", None)
    inner = getattr(lm, "model", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or inner is None:
        return False  # a LoRA-wrapped or biased head: use the plain path
    return True


def _label_count(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != -100).sum().item())


def compute_loss(model: torch.nn.Module, batch: dict, *, fused: bool | None = None) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy over label tokens, number of label tokens) for a causal-LM batch with
    ``input_ids``, ``attention_mask``, ``labels`` (-100 = no loss) and optionally ``position_ids``
    (packed rows: positions restarting per example; both paths pass them to the model, and
    ``attention_mask`` may then be None or transformers' prepared mask mapping).  Equal to ``model(**batch).loss``
    (next-token shift).  ``fused=None``: fused on CUDA when supported, plain elsewhere."""
    input_ids = batch["input_ids"]
    labels = batch["labels"]
    attention_mask = batch.get("attention_mask")
    if fused is None:
        fused = input_ids.device.type == "cuda" and fused_ce_supported(model)
    elif fused and not fused_ce_supported(model):
        fused = False
    extra = {"position_ids": batch["position_ids"]} if batch.get("position_ids") is not None else {}
    if not fused:
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra)
        return out.loss, _label_count(labels)

    lm = base_causal_lm(model)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
    hidden = lm.model(**kwargs).last_hidden_state  # LoRA layers live inside: they run here too
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    n = int(mask.sum().item())
    if n == 0:
        return hidden.sum() * 0.0, 0
    h = hidden[:, :-1][mask]
    tgt = shift_labels[mask]
    total = linear_cross_entropy_sum(h, lm.lm_head.weight, tgt)
    return total / n, n


# --------------------------------------------------------------------------------------------
# GPT-OSS experts: grouped GEMMs, fused expert LoRA, packed (NF4/MXFP4) weights
# --------------------------------------------------------------------------------------------
def _gpt_oss_mlps(lm: torch.nn.Module):
    for m in lm.modules():
        if type(m).__name__ == "GptOssMLP" and hasattr(m, "router") and hasattr(m, "experts"):
            yield m


def _unwrap_experts(experts: torch.nn.Module):
    """(base GptOssExperts, [PEFT ParamWrapper, ...]) for a possibly PEFT-wrapped experts module."""
    wrappers = []
    m = experts
    while hasattr(m, "base_layer") and hasattr(m, "parameter_name"):
        wrappers.append(m)
        m = m.base_layer
    return m, wrappers


def _lora_factors(wrappers) -> dict:
    """{param_name: (lhs (E,in,r), rhs (E,r,out), scale)} from PEFT ParamWrappers, active adapters only."""
    out: dict = {}
    for w in wrappers:
        if getattr(w, "disable_adapters", False) or getattr(w, "merged", False):
            continue
        active = [a for a in getattr(w, "active_adapters", []) if a in w.lora_A]
        if not active:
            continue
        if len(active) > 1:
            raise NotImplementedError("project experts path: one active LoRA adapter on experts at a time")
        a = active[0]
        if getattr(w, "_did_swap_in_out_features", False):
            raise NotImplementedError("project experts path expects GPT-OSS (experts, in, out) weights")
        E = w.num_experts
        A = w.lora_A[a].weight  # (r*E, in)
        B = w.lora_B[a].weight  # (out, r*E)
        lhs = A.reshape(E, -1, A.shape[-1]).transpose(-2, -1)  # (E, in, r)
        rhs = B.reshape(B.shape[0], -1, E).permute(2, 1, 0)  # (E, r, out)
        out[w.parameter_name] = (lhs, rhs, float(w.scaling[a]))
    return out


def _gmm_aligned(x: torch.Tensor, w: torch.Tensor) -> bool:
    """grouped_mm's layout rule: the rows of x and both matrix dims of w in 16-byte multiples."""
    es = x.element_size()
    return all((d * es) % 16 == 0 for d in (x.shape[-1], w.shape[-1], w.shape[-2]))


def _gmm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if x.device.type != "cuda" or not hasattr(F, "grouped_mm"):
        return False
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return False
    return _gmm_aligned(x, w)


def gmm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
    """Grouped matmul: rows offs[e-1]:offs[e] of x (S, K) times w[e] (K, N) -> (S, N)."""
    if _gmm_ok(x, w):
        if not w.is_contiguous() and not w.transpose(-2, -1).is_contiguous():
            w = w.contiguous()
        return F.grouped_mm(x, w, offs=offs)
    if counts is None:
        counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    outs = []
    s = 0
    for e, c in enumerate(counts):
        if c:
            outs.append(x[s : s + c] @ w[e].to(x.dtype))
        s += c
    if not outs:
        return x.new_zeros((0, w.shape[-1]))
    return torch.cat(outs, 0)


# Eager SwiGLU works this many elements of its (rows, 2I) input at a time, so its fp32
# temporaries stay ~100 MiB (120b shape, batch 4: the whole input is 32k rows x 5760, and the
# unchunked backward made ~6 fp32 copies of half of it, several GiB).  Compiled layers fuse the
# whole thing into one kernel and do not chunk.
SWIGLU_CHUNK_ELEMS = 1 << 24


def _swiglu_rows(gu, alpha, limit):
    gate = gu[..., ::2].clamp(max=limit)
    up = gu[..., 1::2].clamp(min=-limit, max=limit)
    glu = gate * torch.sigmoid(gate * alpha)
    return (up + 1) * glu


def _swiglu_grad_rows(gu, dy, alpha, limit, scale=None):
    """(d gu, d scale or None) for y = swiglu(gu) * scale (scale None: 1)."""
    g_raw = gu[..., ::2].float()
    u_raw = gu[..., 1::2].float()
    gate = g_raw.clamp(max=limit)
    up = u_raw.clamp(min=-limit, max=limit)
    sig = torch.sigmoid(gate * alpha)
    glu = gate * sig
    dyf = dy.float()
    dscale = None
    if scale is not None:
        dscale = (dyf * ((up + 1) * glu)).sum(-1, keepdim=True).to(scale.dtype)
        dyf = dyf * scale.float()
    dgate = dyf * (up + 1) * (sig + gate * alpha * sig * (1 - sig))
    dgate = dgate * (g_raw <= limit)
    dup = dyf * glu * ((u_raw >= -limit) & (u_raw <= limit))
    return torch.stack((dgate, dup), dim=-1).reshape(gu.shape).to(gu.dtype), dscale


def _row_chunks(t: torch.Tensor):
    if torch.compiler.is_compiling() or t.dim() != 2 or t.numel() <= SWIGLU_CHUNK_ELEMS:
        return [slice(None)]
    step = max(1, SWIGLU_CHUNK_ELEMS // max(1, t.shape[-1]))
    return [slice(s, s + step) for s in range(0, t.shape[0], step)]


class _SwiGLUClamp(torch.autograd.Function):
    """GPT-OSS activation on interleaved gate/up, times a per-row ``scale`` (the token's routing
    weight for that expert, or None); saves only its inputs for backward.  Scaling here, before the
    down projection, instead of after it (stock: (act @ W + b) * w; here (act * w) @ W + b * w,
    the same maths) means backward never needs the down projection's output: the routing weight's
    gradient is <dy, act>, act rebuilt from gu.  That output (4 x 2880 values a token per layer in
    the 20b shape) would otherwise be kept for every layer that is not recomputed."""

    @staticmethod
    def forward(ctx, gu: torch.Tensor, alpha: float, limit: float, scale: torch.Tensor | None = None):
        ctx.save_for_backward(gu, scale)
        ctx.alpha, ctx.limit = alpha, limit
        chunks = _row_chunks(gu)

        def rows(sl):
            y = _swiglu_rows(gu[sl], alpha, limit)
            return y if scale is None else y * scale[sl]

        if len(chunks) == 1:
            return rows(slice(None))
        out = gu.new_empty((*gu.shape[:-1], gu.shape[-1] // 2))
        for sl in chunks:
            out[sl] = rows(sl)
        return out

    @staticmethod
    def backward(ctx, dy):
        gu, scale = ctx.saved_tensors
        alpha, limit = ctx.alpha, ctx.limit
        chunks = _row_chunks(gu)
        if len(chunks) == 1:
            dgu, dscale = _swiglu_grad_rows(gu, dy, alpha, limit, scale)
            return dgu, None, None, dscale
        dgu = torch.empty_like(gu)
        dscale = torch.empty_like(scale) if scale is not None else None
        for sl in chunks:
            dgu[sl], ds = _swiglu_grad_rows(gu[sl], dy[sl], alpha, limit, None if scale is None else scale[sl])
            if ds is not None:
                dscale[sl] = ds
        return dgu, None, None, dscale


def _in_backward() -> bool:
    try:
        return torch._C._current_graph_task_id() != -1
    except Exception:  # pragma: no cover - private API moved
        return False


# A recomputed layer (activation checkpointing) runs its backward right after: its dequantized
# expert weight is kept for that backward instead of being dequantized again, when the whole
# tensor (all experts, compute dtype) is at most this many bytes: the 20b shape's weights fit, the
# 120b's do not (a layer's bf16 experts are several GB on top of a model that fills most of one
# GPU).  0: never keep.
PACKED_KEEP_MAX_BYTES = int(1.1 * 2**30)


def _row_bounds(offs: torch.Tensor) -> list[int]:
    return [0] + [int(v) for v in offs.tolist()]  # host row boundaries: one sync per GEMM


def _counts(bounds: list[int], e0: int, e1: int) -> list[int]:
    return [bounds[e + 1] - bounds[e] for e in range(e0, e1)]


def _packed_chunked_gmm(x, store, offs, dtype, *, transposed=False, kept=None, keep=False, bounds=None):
    """x @ W_e (W_e^T when ``transposed``) with W dequantized from its packed store (NF4 or MXFP4)
    one chunk of experts at a time.  A one-chunk store on the grouped-GEMM path is one GEMM over all
    rows with the offsets on the device; otherwise the host reads the row ranges (one sync) and
    chunks no row was routed to are not dequantized at all.  A chunk's weight comes from ``kept``
    when given (emptied as used), else is dequantized and dropped after its GEMM unless ``keep``.
    ``bounds``: the host row boundaries if already read.  Returns (output, the per-chunk weights
    kept or None, the row boundaries it read or was given: None when it needed none)."""
    ranges = store.chunk_ranges()
    if len(ranges) == 1:
        w = kept[0] if kept is not None else store.dequantize_chunk(0, dtype)
        wt = w.transpose(-2, -1) if transposed else w
        if _gmm_ok(x, wt):  # no host sync: the GPU never waits for the CPU here
            return gmm(x, wt, offs), ([w] if keep else None), None
        kept = [w]
    if bounds is None:
        bounds = _row_bounds(offs)
    y = x.new_empty((x.shape[0], store.shape[-2] if transposed else store.shape[-1]))  # chunks cover every row
    out_kept = [] if keep else None
    for ci, (e0, e1) in enumerate(ranges):
        r0, r1 = bounds[e0], bounds[e1]
        w = None
        if r1 > r0:
            w = kept[ci] if kept is not None else store.dequantize_chunk(ci, dtype)
            if kept is not None:
                kept[ci] = None
            y[r0:r1] = gmm(x[r0:r1], w.transpose(-2, -1) if transposed else w, offs[e0:e1] - r0,
                           _counts(bounds, e0, e1))
        if keep:
            out_kept.append(w)
        del w
    return y, out_kept, bounds


class _FrozenPackedGMM(torch.autograd.Function):
    """x @ W_e with W dequantized from its packed store one chunk of experts at a time (NF4 chunks:
    <= 2**28 weights, 512 MiB in bf16; MXFP4: packed.MXFP4_CHUNK_ELEMS), forward and
    backward, so at most one chunk's bf16 copy exists (plus the kept weight, see
    PACKED_KEEP_MAX_BYTES)."""

    @staticmethod
    def forward(ctx, x, store, offs, dtype):
        keep = (_in_backward() and PACKED_KEEP_MAX_BYTES > 0
                and store.logical_numel * torch.empty((), dtype=dtype).element_size() <= PACKED_KEEP_MAX_BYTES)
        # the row boundaries, if forward read them on the host, serve backward too (one sync)
        y, ctx.kept, ctx.bounds = _packed_chunked_gmm(x, store, offs, dtype, keep=keep)
        ctx.store, ctx.dtype = store, dtype
        ctx.save_for_backward(offs)
        return y

    @staticmethod
    def backward(ctx, dy):
        (offs,) = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None
        dx, _, _ = _packed_chunked_gmm(dy.contiguous(), ctx.store, offs, ctx.dtype, transposed=True, kept=kept,
                                       bounds=ctx.bounds)
        return dx, None, None, None


@torch.compiler.disable
def _packed_gmm_eager(x, store, offs, dtype):
    return _FrozenPackedGMM.apply(x, store, offs, dtype)


# Inside a compiled layer the packed grouped GEMM is one custom op, opaque to dynamo and inductor
# (it reads the routed row counts on the host and calls its own dequantization kernel): a graph
# break there (torch.compiler.disable) sits inside the layer's activation checkpointing since
# transformers 5.24 and runs the whole layer eager.  The store goes in as its buffers (graph
# inputs, the same for every layer of a shape, so one compiled graph serves them all) plus its
# format and chunk layout as ints: [format index, then the format's META ints per chunk].
_KINDS = tuple(packed.STORE_KINDS)


class _StoreView:
    """A packed store rebuilt from the custom op's arguments: its class's dequantization methods
    run on it (they read only ``shape``, ``meta`` and the chunk buffers)."""

    def __init__(self, cls, bufs, meta, shape):
        self.cls, self.shape = cls, tuple(shape)
        self.meta, it = [], iter(bufs)
        per = len(cls.META)
        for c in range(len(meta) // per):
            m = cls.meta_from_ints(meta[c * per:(c + 1) * per])
            for n in cls.chunk_buffers(m):
                setattr(self, f"{n}{c}", next(it))
            self.meta.append(m)

    def __getattr__(self, name):  # chunk_ranges, dequantize_chunk, ... bound to this view
        fn = getattr(self.__dict__["cls"], name)
        return types.MethodType(fn, self)


def _store_args(store):
    bufs, meta = [], [_KINDS.index(store.KIND)]
    for c, m in enumerate(store.meta):
        if m["quant_type"] != store.KIND:  # e.g. an fp4 (not nf4) bitsandbytes chunk
            return None
        bufs += [getattr(store, f"{n}{c}") for n in store.chunk_buffers(m)]
        meta += store.meta_to_ints(m)
    return bufs, meta, list(store.shape)


@torch.library.custom_op("grader::packed_gmm", mutates_args=())
def _packed_gmm_op(x: torch.Tensor, offs: torch.Tensor, bufs: list[torch.Tensor], meta: list[int],
                   shape: list[int], dtype: torch.dtype, transposed: bool) -> torch.Tensor:
    """x @ W_e (transposed: x @ W_e^T, the backward's GEMM), chunk by chunk as _FrozenPackedGMM."""
    store = _StoreView(packed.STORE_KINDS[_KINDS[meta[0]]], bufs, meta[1:], shape)
    return _packed_chunked_gmm(x.contiguous(), store, offs, dtype, transposed=transposed)[0]


@_packed_gmm_op.register_fake
def _(x, offs, bufs, meta, shape, dtype, transposed):
    return x.new_empty((x.shape[0], shape[-2] if transposed else shape[-1]))


def _packed_gmm_setup(ctx, inputs, output):
    x, offs, bufs, meta, shape, dtype, transposed = inputs
    ctx.save_for_backward(offs, *bufs)
    ctx.meta, ctx.shape, ctx.dtype, ctx.transposed = meta, shape, dtype, transposed


def _packed_gmm_backward(ctx, dy):
    offs, *bufs = ctx.saved_tensors
    dx = _packed_gmm_op(dy.contiguous(), offs, bufs, ctx.meta, ctx.shape, ctx.dtype, not ctx.transposed)
    return dx, None, [None] * len(bufs), None, None, None, None


_packed_gmm_op.register_autograd(_packed_gmm_backward, setup_context=_packed_gmm_setup)


def _packed_gmm(x, store, offs, dtype):
    """The packed grouped GEMM: eager, _FrozenPackedGMM (it keeps a recomputed layer's dequantized
    weight for that layer's backward, see PACKED_KEEP_MAX_BYTES); inside a compiled layer, the
    custom op (dequantizes again in backward: nothing is kept across the graph)."""
    if torch.compiler.is_compiling():
        args = _store_args(store)
        if args is not None:
            return _packed_gmm_op(x, offs, *args, dtype, False)
    return _packed_gmm_eager(x, store, offs, dtype)


class _RoutedBias(torch.autograd.Function):
    """``bias[ids] * scale``: each routed row's expert output bias times its routing weight, without
    keeping the gathered (rows, H) bias for backward (stock's ``(y + b) * w`` keeps ``y + b``;
    ``b * w`` kept ``b``, top-k x hidden values a token per layer, a large share of what a kept
    layer saves): the routing weight's gradient
    is read off ``dy @ bias^T`` (rows x experts, a small GEMM against the parameter) at each row's
    expert.  Not ``bias[ids]`` again: the compiled joint graph merges that with the forward's gather
    and keeps it."""

    @staticmethod
    def forward(ctx, bias: torch.Tensor, ids: torch.Tensor, scale: torch.Tensor):
        ctx.save_for_backward(bias, ids, scale)
        return bias[ids].to(scale.dtype) * scale

    @staticmethod
    def backward(ctx, dy):
        bias, ids, scale = ctx.saved_tensors
        dbias = dscale = None
        if ctx.needs_input_grad[2]:
            # in dy's dtype (the GEMM accumulates in fp32): an fp32 copy of dy cost more than the GEMM
            dscale = (dy @ bias.t().to(dy.dtype)).gather(1, ids[:, None]).to(scale.dtype)
        if ctx.needs_input_grad[0]:
            dbias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            dbias = dbias.index_add_(0, ids, (dy.float() * scale.float())).to(bias.dtype)
        return dbias, None, dscale


def _expert_linear(experts, name: str, x, offs, counts, ids_sorted, lora: dict, bias_scale=None):
    store = getattr(experts, name + "_packed", None)
    if store is not None:
        y = _packed_gmm(x, store, offs, x.dtype)
    else:
        y = gmm(x, getattr(experts, name), offs, counts)
    bias = getattr(experts, name + "_bias", None)
    if bias is not None:
        y = y + (bias[ids_sorted].to(y.dtype) if bias_scale is None else _RoutedBias.apply(bias, ids_sorted, bias_scale))
    if name in lora:
        lhs, rhs, scale = lora[name]
        xa = gmm(x, _dense_factor(lhs, x.dtype), offs, counts)
        y = y + gmm(xa, _dense_factor(rhs, x.dtype), offs, counts) * scale
    return y


@torch.library.custom_op("grader::dense_factor", mutates_args=())
def _dense_factor(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A LoRA factor copied to a new dense (E, K, N) tensor for grouped_mm.  A custom op, opaque to
    inductor: inside a compiled layer inductor dropped a plain ``.contiguous()`` copy and handed
    grouped_mm the permuted view of PEFT's lora_B, which grouped_mm rejects ("Invalid
    strides/sizes").  Not ``torch.compiler.disable``: since transformers 5.24 checkpoints a
    layer's ``forward`` inside the compiled call, a graph break there runs the whole recomputed
    layer eager (the dynamo log names the break inside ``torch.utils.checkpoint``)."""
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


@_dense_factor.register_fake
def _(t, dtype):
    return torch.empty(t.shape, dtype=dtype, device=t.device)


def _dense_factor_setup(ctx, inputs, output):
    ctx.in_dtype = inputs[0].dtype


def _dense_factor_backward(ctx, grad):
    return grad.to(ctx.in_dtype), None


_dense_factor.register_autograd(_dense_factor_backward, setup_context=_dense_factor_setup)


def moe_forward(experts_module, hidden_states, router_indices, routing_weights):
    """Project experts forward: same maths as transformers' grouped_mm experts, plus fused LoRA
    and packed experts.  hidden_states (T, H), router_indices/routing_weights (T, k) -> (T, H)."""
    experts, wrappers = _unwrap_experts(experts_module)
    lora = _lora_factors(wrappers)
    T, k = router_indices.shape
    E = experts.num_experts
    flat = router_indices.reshape(-1)
    ids_sorted, perm = torch.sort(flat)
    x = hidden_states[perm // k]
    if _gmm_ok(x, x.new_empty((1, 16, 16))):  # grouped GEMMs: offsets stay on the device, no sync
        # histc, not bincount: a fixed output shape, so compiled layers keep it in their graph
        # (histc has no integer kernel on the CPU)
        cnt = torch.histc(ids_sorted.int() if ids_sorted.is_cuda else ids_sorted.float(), bins=E, min=0, max=E - 1)
        offs = torch.cumsum(cnt, 0, dtype=torch.int32)
        counts = None
    else:  # a matmul per expert: the host needs the counts
        cnt = torch.bincount(ids_sorted, minlength=E)
        counts = cnt.tolist()
        offs = torch.cumsum(cnt, 0).to(torch.int32)
    gu = _expert_linear(experts, "gate_up_proj", x, offs, counts, ids_sorted, lora)
    w = routing_weights.reshape(-1)[perm].unsqueeze(-1).to(gu.dtype)
    # the routing weight scales the down projection's input (and bias), see _SwiGLUClamp
    act = _SwiGLUClamp.apply(gu, float(experts.alpha), float(experts.limit), w)
    out = _expert_linear(experts, "down_proj", act, offs, counts, ids_sorted, lora, bias_scale=w)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    res = out[inv].view(T, k, -1).sum(dim=1)
    return res.to(hidden_states.dtype)


def _mlp_forward(self, hidden_states):
    b, s, h = hidden_states.shape
    flat = hidden_states.reshape(-1, h)
    _, router_scores, router_indices = self.router(flat)
    out = moe_forward(self.experts, flat, router_indices, router_scores)
    return out.reshape(b, s, h), router_scores


def install_moe_forward(model: torch.nn.Module) -> int:
    """Route every GPT-OSS MLP of ``model`` through ``moe_forward``; returns how many."""
    n = 0
    for mlp in _gpt_oss_mlps(base_causal_lm(model)):
        mlp.forward = types.MethodType(_mlp_forward, mlp)
        n += 1
    return n


def uninstall_moe_forward(model: torch.nn.Module) -> int:
    n = 0
    for mlp in _gpt_oss_mlps(base_causal_lm(model)):
        if "forward" in mlp.__dict__:
            del mlp.__dict__["forward"]
            n += 1
    return n


def set_recompute(model: torch.nn.Module, mode: str | int = "full") -> int:
    """Activation recomputation per decoder layer: "full" (every layer checkpointed), "none", or an
    int k: the last k layers keep their activations (selective), the rest are checkpointed.
    Returns the number of checkpointed layers."""
    lm = base_causal_lm(model)
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None:
        return 0
    if mode == "none":
        if getattr(lm, "is_gradient_checkpointing", False):
            lm.gradient_checkpointing_disable()
        return 0
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    keep = 0 if mode == "full" else int(mode)
    n = 0
    for i, layer in enumerate(layers):
        on = i < len(layers) - keep
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = on
        n += int(on)
    return n

