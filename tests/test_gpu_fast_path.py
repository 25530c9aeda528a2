"""The GPU fast path and NF4 experts compute what stock transformers+PEFT compute.

Runs on the best device present: on the H200 (bf16, flex_attention, grouped GEMMs) and in CI on
the CPU (fp32, eager attention, the looped GEMM fallback).  Each check compares the project's path
against stock on the same batch and the same LoRA weights.
"""
from __future__ import annotations

import copy

import pytest
import torch

from tests.bf16_judge import assert_grads_no_further, assert_loss_no_further, rel
from training import fast_path
from training import quant_experts as qe
from training import packed as pk
from training.config import GPT_OSS_EXPERT_PARAMETERS, RunConfig

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
# bf16 on the GPU rounds differently along the two paths; fp32 on the CPU agrees to ~1e-6
LOSS_TOL = 2e-2 if CUDA else 1e-5
GRAD_TOL = 6e-2 if CUDA else 1e-4


def tiny_gpt_oss(seed: int = 0, *, hidden: int = 64, experts: int = 4, layers: int = 2, vocab: int = 1024,
                 device: torch.device = DEVICE, dtype: torch.dtype = DTYPE, top_k: int = 2):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    cfg = GptOssConfig(
        hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16 if not CUDA else 64, num_local_experts=experts,
        vocab_size=vocab, sliding_window=8, max_position_embeddings=512, num_experts_per_tok=top_k,
    )
    cfg._attn_implementation = "eager"
    model = GptOssForCausalLM(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():  # weights large enough that experts matter to the loss
        for m in model.modules():
            if type(m).__name__ == "GptOssExperts":
                m.gate_up_proj.normal_(0, 0.2)
                m.down_proj.normal_(0, 0.2)
                m.gate_up_proj_bias.normal_(0, 0.05)
    return model


def batch_for(vocab: int, *, bs: int = 2, seq: int = 40, seed: int = 1, device: torch.device = DEVICE):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (bs, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in one row
    labels = ids.clone()
    labels[:, : seq // 3] = -100  # the prompt carries no loss
    labels[mask == 0] = -100
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def lora(model, experts: bool, target_parameters=None, r: int = 4):
    from peft import LoraConfig, get_peft_model

    kw = {}
    if experts:
        kw["target_parameters"] = list(target_parameters or GPT_OSS_EXPERT_PARAMETERS)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], **kw))
    with torch.no_grad():  # non-zero B so every LoRA factor gets a gradient
        g = torch.Generator().manual_seed(7)
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.05)
    return pm


def loss_and_grads(model, batch, fn):
    model.zero_grad(set_to_none=True)
    loss = fn(model, batch)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach().float()), grads


def stock(model, batch):
    return model(**batch).loss


def project(model, batch):
    return fast_path.compute_loss(model, batch, fused=True)[0]


def assert_same(l_ref, g_ref, l_new, g_new):
    assert abs(l_new - l_ref) <= LOSS_TOL * abs(l_ref), (l_ref, l_new)
    assert g_ref.keys() == g_new.keys() and g_ref
    worst = max((rel(g_new[k], g_ref[k]), k) for k in g_ref)
    assert worst[0] <= GRAD_TOL, worst


def test_compute_loss_equals_model_loss_and_counts_label_tokens():
    model = tiny_gpt_oss()
    batch = batch_for(model.config.vocab_size)
    plain, n_plain = fast_path.compute_loss(model, batch, fused=False)
    fused, n_fused = fast_path.compute_loss(model, batch, fused=True)
    expected_n = int((batch["labels"][:, 1:] != -100).sum())
    assert n_plain == n_fused == expected_n
    assert abs(float(plain.detach()) - float(model(**batch).loss.detach())) < 1e-5
    assert abs(float(fused) - float(plain)) <= LOSS_TOL * float(plain)
    # and with no label at all: zero loss, zero tokens, still differentiable
    empty = dict(batch, labels=torch.full_like(batch["labels"], -100))
    loss0, n0 = fast_path.compute_loss(model, empty, fused=True)
    assert n0 == 0 and float(loss0) == 0.0
    loss0.backward()


def test_compiled_loss_chunk_equals_the_eager_one_for_any_row_count():
    """The fused loss's per-chunk maths as CUDA runs it (compiled by inductor, rows dynamic: the last
    chunk and packed label counts vary) against the eager in-place form: the same loss sum and the
    same gradient w.r.t. the logits, with and without the gradient; one compiled graph per flag
    serves every row count (no recompiling as the label count changes from batch to batch)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fused = torch.compile(fast_path._ce_chunk_fusable, dynamic=True)
    g = torch.Generator().manual_seed(5)
    for rows in (7, 64, 33, 50):
        logits = (torch.randn(rows, 300, generator=g) * 3).to(DTYPE)
        tc = torch.randint(0, 300, (rows,), generator=g)
        for need in (True, False):
            l_ref, g_ref = fast_path._ce_chunk_eager(logits.clone(), tc, need)
            l_new, g_new = fused(logits, tc, need)
            assert abs(float(l_new) - float(l_ref)) <= 1e-5 * abs(float(l_ref))
            assert (g_new is None) == (not need)
            if need:
                assert g_new.dtype == logits.dtype
                torch.testing.assert_close(g_new.float(), g_ref.float(), atol=1e-6, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # with and without the gradient


def test_fast_path_loss_and_lora_grads_match_stock_attention_lora():
    pm = lora(tiny_gpt_oss(), experts=False)
    batch = batch_for(pm.config.vocab_size)
    l_ref, g_ref = loss_and_grads(pm, batch, stock)
    applied = fast_path.apply(pm, force=True)
    assert "project_experts" in applied
    if CUDA:
        assert {"flex_attention", "fused_ce"} <= set(applied)
    l_new, g_new = loss_and_grads(pm, batch, project)
    assert any("lora_A" in k for k in g_new)
    assert_same(l_ref, g_ref, l_new, g_new)


def fp32_stock_on_cpu(r: int):
    """Stock transformers+PEFT with attention and expert LoRA, fp32 on the CPU: the reference the
    bf16 paths are judged against (tiny_gpt_oss and lora are seeded, so the weights are the same)."""
    cpu = torch.device("cpu")
    ref = lora(tiny_gpt_oss(device=cpu, dtype=torch.float32), experts=True, r=r)
    return loss_and_grads(ref, batch_for(ref.config.vocab_size, device=cpu), stock)


def assert_no_further_than_stock(ref32, stock_run, new_run):
    """On the GPU, bf16 alone moves some LoRA grads of this tiny model by ~30% (stock bf16 against
    stock fp32), and two bf16 paths differ by as much from each other (PEFT's W + BA against the
    fused grouped GEMMs: 23% on one o_proj lora_A grad, H200): the project's path must be no
    further from fp32 than stock bf16 is (tests/bf16_judge.py).  On the CPU all three are fp32 and
    agree to GRAD_TOL."""
    (l32, g32), (l_ref, g_ref), (l_new, g_new) = ref32, stock_run, new_run
    assert_loss_no_further(l32, l_ref, l_new, LOSS_TOL)
    assert_grads_no_further(g32, g_ref, g_new, GRAD_TOL)


def test_fused_expert_lora_matches_peft_target_parameters():
    ref32 = fp32_stock_on_cpu(r=4)
    pm = lora(tiny_gpt_oss(), experts=True)
    batch = batch_for(pm.config.vocab_size)
    l_ref, g_ref = loss_and_grads(pm, batch, stock)  # PEFT's own W + BA path
    assert "fused_expert_lora" in fast_path.apply(pm, force=True)
    l_new, g_new = loss_and_grads(pm, batch, project)
    assert sum("experts" in k for k in g_new) == 2 * 2 * pm.config.num_hidden_layers  # A and B, 2 params/layer
    if not CUDA:  # fp32 both ways: the same numbers
        assert_same(l_ref, g_ref, l_new, g_new)
    assert_no_further_than_stock(ref32, (l_ref, g_ref), (l_new, g_new))


def test_compiled_layers_with_fused_expert_lora_match_stock():
    """On a GPU the decoder layers compile with the expert LoRA inside the grouped GEMMs (r 8 keeps
    the factors grouped_mm-aligned); on the CPU nothing compiles and the same numbers come out."""
    import torch._dynamo

    ref32 = fp32_stock_on_cpu(r=8)
    pm = lora(tiny_gpt_oss(), experts=True, r=8)
    batch = batch_for(pm.config.vocab_size)
    stock_run = loss_and_grads(pm, batch, stock)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    applied = fast_path.apply(pm, RunConfig(compile_layers=True), force=True)
    assert "fused_expert_lora" in applied
    assert ("compile_layers" in applied) == CUDA
    for _ in range(2):  # the second step runs the cached compiled code
        assert_no_further_than_stock(ref32, stock_run, loss_and_grads(pm, batch, project))
    if CUDA:  # compiled graphs ran (errors would have fallen back to eager silently)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    fast_path.compile_layers(pm, enable=False)


@pytest.mark.parametrize("storage", ["dense", "nf4"])
def test_expert_gemms_compile_whole_inside_activation_checkpointing(storage):
    """The experts' GEMMs compile without a graph break, inside torch.utils.checkpoint too.  When
    compiled layers traced transformers 5's checkpoint into their graph (before round 2d), one break
    in the experts ran the whole layer eager: the dense copy of PEFT's factors and the NF4 grouped
    GEMM were ``torch.compiler.disable``, and the 20b attention + expert LoRA row ran at 8.3k
    tokens/s, as uncompiled (H200).  The checkpoint is now eager around the compiled forward, where
    a break would only split the graph; this keeps the GEMMs whole either way.
    ``fullgraph=True`` fails on any break; outputs and gradients equal the eager path's (NF4: the
    eager path keeps nothing across recompute here, so the same GEMMs run). CPU-safe: the looped
    GEMM fallback and bitsandbytes' CPU dequantization."""
    import torch.utils.checkpoint as ck

    cpu = torch.device("cpu")
    pm = lora(tiny_gpt_oss(device=cpu, dtype=torch.float32), experts=True, r=8)
    if storage == "nf4":
        qe.quantize_experts(pm, "nf4", chunk_elems=64 * 64)  # two chunks per weight
    mlp = next(fast_path._gpt_oss_mlps(fast_path.base_causal_lm(pm)))
    experts, wrappers = fast_path._unwrap_experts(mlp.experts)
    counts = [2, 1, 0, 3]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    ids_sorted = torch.tensor([0, 0, 1, 3, 3, 3])

    def expert_mlp(x):
        lora_f = fast_path._lora_factors(wrappers)
        gu = fast_path._expert_linear(experts, "gate_up_proj", x, offs, counts, ids_sorted, lora_f)
        return fast_path._expert_linear(experts, "down_proj", gu[:, ::2], offs, counts, ids_sorted, lora_f)

    def run(fn):
        pm.zero_grad(set_to_none=True)
        x = torch.randn(6, pm.config.hidden_size, generator=torch.Generator().manual_seed(3), requires_grad=True)
        y = fn(x)
        y.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if "experts" in n and p.grad is not None}
        return y.detach(), x.grad, grads

    y_ref, dx_ref, g_ref = run(expert_mlp)
    compiled = torch.compile(lambda x: ck.checkpoint(expert_mlp, x, use_reentrant=False), fullgraph=True,
                             backend="aot_eager")
    y, dx, g = run(compiled)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
    assert g.keys() == g_ref.keys() and len(g) == 4  # lora_A and lora_B of gate_up_proj and down_proj
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k])


def test_apply_is_a_no_op_on_cpu_and_when_disabled():
    model = tiny_gpt_oss()
    if not CUDA:
        assert fast_path.apply(model) == []
    assert fast_path.apply(model, RunConfig(fast_path=False)) == []


def test_nf4_experts_are_really_quantized_and_close_to_full_precision():
    model = tiny_gpt_oss(hidden=128, experts=4)
    ex = model.model.layers[0].mlp.experts
    w_ref = ex.gate_up_proj.detach().float().clone()
    x = torch.randn(64, 128, device=DEVICE, dtype=DTYPE)
    idx = torch.randint(0, 4, (64, 2), device=DEVICE)
    wts = torch.softmax(torch.randn(64, 2, device=DEVICE), -1).to(DTYPE)
    y_ref = fast_path.moe_forward(ex, x, idx, wts).float()
    batch = batch_for(model.config.vocab_size)
    with torch.no_grad():
        logits_ref = model(**batch).logits.float()
    before = pk.bytes_per_param(model)

    rep = qe.quantize_experts(model, "nf4")

    # no 3-D expert weight is left as a parameter; packed uint8 storage instead
    assert not any(p.dim() == 3 for p in model.parameters())
    for m in model.modules():
        if type(m).__name__.endswith("GptOssExperts"):
            assert m.gate_up_proj_packed.q0.dtype == torch.uint8
            assert m.down_proj_packed.q0.dtype == torch.uint8
    assert rep["quantized_tensors"] == 2 * model.config.num_hidden_layers
    assert 0.5 < rep["expert_bytes_per_param"] < 0.6  # 4 bits + double-quantized scales
    assert rep["bytes_per_param"] == pytest.approx(pk.bytes_per_param(model))
    assert rep["bytes_per_param"] < before
    # NF4 error on Gaussian weights ~0.09 relative; the MoE output (two GEMMs) stays near it
    assert rel(ex.gate_up_proj_packed.dequantize(torch.float32), w_ref) < 0.12
    y = fast_path.moe_forward(ex, x, idx, wts).float()
    assert rel(y, y_ref) < 0.2
    with torch.no_grad():
        logits = model(**batch).logits.float()
    assert torch.isfinite(logits).all()
    assert rel(logits, logits_ref) < 0.5


def _train(pm, batch, steps=8, lr=1e-2):
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = fast_path.compute_loss(pm, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def test_nf4_experts_with_attention_lora_train():
    model = tiny_gpt_oss()
    qe.quantize_experts(model, "nf4")
    pm = lora(model, experts=False)
    batch = batch_for(pm.config.vocab_size)
    losses = _train(pm, batch)
    assert losses[-1] < losses[0] - 0.05, losses
    assert not any("experts" in n for n, p in pm.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("order", ["quantize_then_lora", "lora_then_quantize"])
def test_nf4_experts_with_expert_lora_train_and_save(order, tmp_path):
    from peft import PeftModel

    model = tiny_gpt_oss()
    if order == "quantize_then_lora":
        qe.quantize_experts(model, "nf4")
        pm = lora(model, experts=True, target_parameters=GPT_OSS_EXPERT_PARAMETERS)
    else:
        pm = lora(model, experts=True)
        qe.quantize_experts(pm, "nf4")
    batch = batch_for(pm.config.vocab_size)
    losses = _train(pm, batch)
    assert losses[-1] < losses[0] - 0.05, losses
    trained = [n for n, p in pm.named_parameters() if p.requires_grad and "experts" in n]
    assert len(trained) == 2 * 2 * pm.config.num_hidden_layers
    # the adapter is PEFT's own: it reloads onto a full-precision model of the same shape
    pm.save_pretrained(tmp_path / "adapter")
    fresh = tiny_gpt_oss()
    again = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    sd = {n: p for n, p in again.named_parameters() if "lora" in n and "experts" in n}
    assert len(sd) == len(trained)


def test_project_experts_without_lora_match_transformers_grouped_experts():
    model = tiny_gpt_oss()
    ex = model.model.layers[1].mlp.experts
    x = torch.randn(50, model.config.hidden_size, device=DEVICE, dtype=DTYPE, requires_grad=True)
    idx = torch.randint(0, 4, (50, 2), device=DEVICE)
    wts = torch.softmax(torch.randn(50, 2, device=DEVICE), -1).to(DTYPE).requires_grad_()
    y_ref = ex(x, idx, wts)  # transformers' configured experts implementation
    (gx_ref, gw_ref) = torch.autograd.grad(y_ref.float().square().sum(), (x, wts))
    y = fast_path.moe_forward(ex, x, idx, wts)
    (gx, gw) = torch.autograd.grad(y.float().square().sum(), (x, wts))
    tol = 2e-2 if CUDA else 1e-5
    assert rel(y.float(), y_ref.float()) < tol
    assert rel(gx.float(), gx_ref.float()) < 3 * tol
    assert rel(gw.float(), gw_ref.float()) < 3 * tol


def test_set_recompute_modes():
    model = tiny_gpt_oss(layers=3)
    assert fast_path.set_recompute(model, "full") == 3
    assert fast_path.set_recompute(model, 1) == 2
    assert [bool(layer.gradient_checkpointing) for layer in model.model.layers] == [True, True, False]
    assert fast_path.set_recompute(model, "none") == 0
    batch = batch_for(model.config.vocab_size)
    fast_path.set_recompute(model, 1)
    model.train()
    loss, _ = fast_path.compute_loss(model, batch, fused=True)
    loss.backward()
    assert all(p.grad is not None for p in model.model.layers[0].self_attn.q_proj.parameters())


def test_expert_lora_layout_is_the_same_whether_experts_were_quantized_first():
    a = tiny_gpt_oss()
    qe.quantize_experts(a, "nf4")
    pa = lora(a, experts=True, target_parameters=GPT_OSS_EXPERT_PARAMETERS)
    pb = lora(tiny_gpt_oss(), experts=True)
    ka = sorted(n for n, p in pa.named_parameters() if p.requires_grad)
    kb = sorted(n for n, p in pb.named_parameters() if p.requires_grad)
    assert ka == kb
    assert [tuple(p.shape) for n, p in sorted(pa.named_parameters()) if p.requires_grad] == \
        [tuple(p.shape) for n, p in sorted(pb.named_parameters()) if p.requires_grad]


# --------------------------------------------------------------------------------------------
# NF4 experts: dequantization kernel, chunked grouped GEMMs, compiled layers
# --------------------------------------------------------------------------------------------
def test_nf4_dequantization_in_torch_is_bitsandbytes_bit_for_bit():
    """The torch-written dequantization (compiled on CUDA) gives exactly bitsandbytes' weights,
    chunk by chunk, including sizes that are not a multiple of the 64-weight block."""
    for shape, chunk in (((6, 64, 96), 64 * 96 * 2), ((3, 10, 7), None)):
        w = torch.randn(shape, device=DEVICE, dtype=DTYPE)
        store = pk.quantize_tensor_nf4(w, shape, device=DEVICE, compute_dtype=DTYPE, chunk_elems=chunk)
        assert len(store.chunk_ranges()) == (3 if chunk else 1)
        for i, (e0, e1) in enumerate(store.chunk_ranges()):
            ref = store._dequantize_chunk_bnb(i, DTYPE)
            assert torch.equal(store.dequantize_chunk_torch(i, DTYPE), ref)
            assert torch.equal(store.dequantize_chunk(i, DTYPE).reshape(-1), ref)  # compiled on CUDA
        assert rel(store.dequantize(DTYPE).float(), w.float()) < 0.12
    if CUDA:  # the compiled kernel ran (a failed compile falls back to bitsandbytes for good)
        assert pk.DEQUANT_BACKEND == "torch" and "nf4" in pk._COMPILED


def _packed_and_dense_twin(fmt: str = "nf4", chunk_elems: int | None = 64 * 128, **kw):
    """(model with experts packed as ``fmt`` in several chunks per weight (``chunk_elems`` None: the
    format's own chunking), a plain model whose experts are exactly those packed weights
    dequantized): the dense reference for the chunked path."""
    dense = tiny_gpt_oss(**kw)
    packed = copy.deepcopy(dense)
    qe.quantize_experts(packed, fmt, chunk_elems=chunk_elems)
    with torch.no_grad():
        for (_, a), (_, b) in zip(pk.iter_experts(dense), pk.iter_experts(packed)):
            for name in ("gate_up_proj", "down_proj"):
                getattr(a, name).copy_(getattr(b, name + "_packed").dequantize(DTYPE))
    return packed, dense


def test_mxfp4_packing_round_trips_and_both_dequantizations_agree():
    """MXFP4 (GPT-OSS's checkpoint format): values that came from MXFP4 pack back to themselves,
    so an MXFP4 checkpoint dequantized on load and packed again is the checkpoint; the
    index-arithmetic dequantization (compiled on CUDA) equals the LUT one bit for bit, including
    negative values, zeros and the extreme scales; arbitrary weights land within MXFP4's rounding."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 64, 96, generator=g) * torch.logspace(-6, 1, 96)  # (E, in, out), wide ranges
    store = pk.quantize_tensor_mxfp4(w, tuple(w.shape), device=DEVICE, chunk_elems=64 * 96 * 2)
    assert len(store.chunk_ranges()) == 2 and store.nbytes() == 3 * 96 * (64 // 2 + 64 // 32)
    back = store.dequantize(torch.float32)
    assert rel(back.cpu(), w) < 0.15
    for i, (e0, e1) in enumerate(store.chunk_ranges()):
        b, sc = getattr(store, f"blocks{i}"), getattr(store, f"scales{i}")
        lut = pk.dequantize_mxfp4(b, sc, torch.float32)
        assert torch.equal(pk.mxfp4_dequant_torch(b, sc, lut.numel(), torch.float32), lut.reshape(-1))
        assert torch.equal(store.dequantize_chunk(i, torch.float32), lut.transpose(1, 2))  # (e, in, out)
        assert torch.equal(pk.mxfp4_dequant_torch(b, sc, lut.numel(), torch.bfloat16).float(), lut.reshape(-1))
    again = pk.quantize_tensor_mxfp4(back, tuple(w.shape), device=DEVICE)
    assert torch.equal(again.dequantize(torch.float32), back)
    # any byte at typical scales, on the device in fp32 and bf16 (load_gpt_oss dequantizes an MXFP4
    # checkpoint to bf16 on the GPU with the LUT path; training uses the compiled kernel), against
    # the CPU in fp32: every value is exact in bf16.  (H200, 2026-12-03: a timing script found the
    # compiled bf16 kernel's output unequal to the LUT path's on random bytes; not yet localised.)
    rb = torch.randint(0, 256, (4, 64, 9, 16), dtype=torch.uint8, generator=g)
    rs = torch.randint(110, 135, (4, 64, 9), dtype=torch.uint8, generator=g)
    cpu32 = pk.dequantize_mxfp4(rb, rs, torch.float32).reshape(-1)
    rstore = pk.mxfp4_store(rb.to(DEVICE), rs.to(DEVICE), (4, 9 * 32, 64))
    for dt in (torch.float32, torch.bfloat16):
        b, sc = rb.to(DEVICE), rs.to(DEVICE)
        assert torch.equal(pk.dequantize_mxfp4(b, sc, dt).reshape(-1).float().cpu(), cpu32), ("LUT", dt)
        assert torch.equal(pk.mxfp4_dequant_torch(b, sc, cpu32.numel(), dt).float().cpu(), cpu32), ("eager", dt)
        assert torch.equal(rstore.dequantize_chunk(0, dt).transpose(1, 2).reshape(-1).float().cpu(), cpu32), dt
    # every nibble and the scale extremes
    blocks = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    for e in (0, 1, 120, 127, 134, 254):
        scales = torch.full((1, 16), e, dtype=torch.uint8)
        lut = pk.dequantize_mxfp4(blocks, scales, torch.float32)
        assert torch.equal(pk.mxfp4_dequant_torch(blocks, scales, lut.numel(), torch.float32), lut.reshape(-1))


def _experts_outputs_and_grads(experts, *, rows: int, routed: int) -> list[torch.Tensor]:
    """moe_forward of one experts module on fixed random rows, each routed to 2 of the first
    ``routed`` experts: its output and the grads of its input and routing weights, in fp32."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, experts.hidden_size, generator=g).to(DEVICE, DTYPE).requires_grad_()
    idx = torch.randint(0, routed, (rows, 2), generator=g).to(DEVICE)
    wts = torch.softmax(torch.randn(rows, 2, generator=g), -1).to(DEVICE, DTYPE).requires_grad_()
    y = fast_path.moe_forward(experts, x, idx, wts)
    return [y.float(), *(t.float() for t in torch.autograd.grad(y.float().square().sum(), (x, wts)))]


def test_one_chunk_packed_experts_never_wait_for_the_host(monkeypatch):
    """An MXFP4 weight small enough to be one chunk (the 20b shape's, pk.MXFP4_CHUNK_ELEMS)
    is one grouped GEMM whose offsets stay on the device, forward and backward, eager and in
    compiled layers: no host read of the routed row counts, which stalled the GPU once per expert
    GEMM (96 times a 20b step).  Checked by making that read fail; the experts equal the dense
    reference, and the compiled model's loss and grads equal the eager model's (fp32, CPU)."""
    import torch._dynamo

    if not CUDA:  # CPU grouped GEMMs in fp32 (the product keeps the looped fallback on the CPU)
        monkeypatch.setattr(fast_path, "_gmm_ok", lambda x, w: x.dtype == w.dtype and fast_path._gmm_aligned(x, w))
    packed, dense = _packed_and_dense_twin("mxfp4", chunk_elems=None)
    ex, ex_ref = packed.model.layers[0].mlp.experts, dense.model.layers[0].mlp.experts
    assert len(ex.gate_up_proj_packed.chunk_ranges()) == 1 and len(ex.down_proj_packed.chunk_ranges()) == 1
    ref = _experts_outputs_and_grads(ex_ref, rows=64, routed=4)

    def no_host_read(offs):
        raise AssertionError("host read of the routed row counts")

    monkeypatch.setattr(fast_path, "_row_bounds", no_host_read)
    for a, b in zip(ref, _experts_outputs_and_grads(ex, rows=64, routed=4)):
        assert rel(b, a) < (2e-2 if CUDA else 1e-5)
    pm = lora(packed, experts=False)
    fast_path.set_recompute(pm, "none")
    pm.train()
    batch = batch_for(pm.config.vocab_size)
    eager = loss_and_grads(pm, batch, project)
    torch._dynamo.reset()
    try:  # compiled per decoder layer, as the product compiles
        assert fast_path.compile_layers(pm)
        compiled = loss_and_grads(pm, batch, project)
    finally:
        fast_path.compile_layers(pm, enable=False)
        torch._dynamo.reset()
    assert set(compiled[1]) == set(eager[1]) and abs(compiled[0] - eager[0]) <= LOSS_TOL * abs(eager[0])
    if not CUDA:  # fp32: the same numbers; bf16 on the GPU is judged against fp32 by
        assert_same(*eager, *compiled)  # test_compiled_layers_with_packed_experts_match_compiled_dense_experts


@pytest.mark.parametrize("fmt", ["nf4", "mxfp4"])
def test_chunked_packed_experts_match_the_dense_reference_outputs_and_grads(fmt, monkeypatch):
    nf4, dense = _packed_and_dense_twin(fmt)
    ex, ex_ref = nf4.model.layers[0].mlp.experts, dense.model.layers[0].mlp.experts
    assert len(ex.gate_up_proj_packed.chunk_ranges()) == 4 and len(ex.down_proj_packed.chunk_ranges()) == 2
    ref = _experts_outputs_and_grads(ex_ref, rows=60, routed=3)
    host_reads = []
    monkeypatch.setattr(fast_path, "_row_bounds", lambda offs, read=fast_path._row_bounds: host_reads.append(1) or read(offs))
    # experts 0..2 only: the last gate_up chunk gets no rows (skipped, its rows' grads still right)
    for a, b in zip(ref, _experts_outputs_and_grads(ex, rows=60, routed=3)):
        assert rel(b, a) < (2e-2 if CUDA else 1e-5)
    # the routed row counts are read on the host once per packed weight, its backward reusing them
    assert len(host_reads) == 2


@pytest.mark.parametrize("fmt,keep", [("nf4", 0), ("nf4", 1 << 40), ("mxfp4", 0)],
                         ids=["nf4_dequantize_again", "nf4_keep_for_backward", "mxfp4"])
def test_chunked_packed_model_with_recompute_matches_dense_reference(fmt, keep, monkeypatch):
    """Whole model, full recomputation, expert and attention LoRA: the chunked packed path's loss
    and every LoRA gradient equal the dense model's (same weights), whether a recomputed layer
    keeps its dequantized experts for backward or dequantizes them again."""
    monkeypatch.setattr(fast_path, "PACKED_KEEP_MAX_BYTES", keep)
    nf4, dense = _packed_and_dense_twin(fmt)
    pm = lora(nf4, experts=True, target_parameters=GPT_OSS_EXPERT_PARAMETERS)
    ref = lora(dense, experts=True)
    with torch.no_grad():
        own = dict(pm.named_parameters())
        for n, p in ref.named_parameters():
            if p.requires_grad:
                p.copy_(own[n])
    batch = batch_for(pm.config.vocab_size)
    results = []
    for m in (ref, pm):
        fast_path.apply(m, force=True)
        fast_path.set_recompute(m, "full")
        m.train()
        results.append(loss_and_grads(m, batch, project))
    (l_ref, g_ref), (l_new, g_new) = results
    assert sum("experts" in k for k in g_new) == 2 * 2 * pm.config.num_hidden_layers
    assert_same(l_ref, g_ref, l_new, g_new)


def test_swiglu_in_row_chunks_equals_whole_and_autograd(monkeypatch):
    """The SwiGLU-with-clamp function, with and without the routing-weight scale it folds in:
    chunked equals whole, and its hand-written backward equals autograd through the plain maths
    (stock's order: the scale applied after)."""
    g = torch.Generator().manual_seed(5)
    gu0 = (torch.randn(37, 2 * 24, generator=g) * 5).to(DEVICE, DTYPE)  # some values past the clamp
    dy = torch.randn(37, 24, generator=g).to(DEVICE, DTYPE)
    w0 = torch.rand(37, 1, generator=g).to(DEVICE, DTYPE)
    for scaled in (False, True):
        outs = []
        for chunk in (1 << 30, 100):  # whole, then 4 rows at a time
            monkeypatch.setattr(fast_path, "SWIGLU_CHUNK_ELEMS", chunk)
            gu, w = gu0.clone().requires_grad_(), w0.clone().requires_grad_()
            y = fast_path._SwiGLUClamp.apply(gu, 1.702, 7.0, w if scaled else None)
            outs.append((y, *torch.autograd.grad(y, (gu, w) if scaled else (gu,), dy)))
        # same maths per element; only vectorised vs scalar tails of the elementwise kernels may differ
        for a, b in zip(outs[1], outs[0]):
            torch.testing.assert_close(a, b)
        gu, w = gu0.float().clone().requires_grad_(), w0.float().clone().requires_grad_()
        y = fast_path._swiglu_rows(gu, 1.702, 7.0) * (w if scaled else 1.0)
        ref = (y, *torch.autograd.grad(y, (gu, w) if scaled else (gu,), dy.float()))
        for a, b in zip(outs[0], ref):
            assert rel(a.float(), b) < (1e-2 if CUDA else 1e-6)


def eager_run_then_fresh_dynamo(pm, batch, recompute: str = "full"):
    """The project path with eager layers and ``recompute``: (loss, grads); then an empty dynamo
    cache and counters, for the compiled run that follows (which keeps ``recompute``)."""
    import torch._dynamo

    fast_path.apply(pm, RunConfig(compile_layers=False), force=True)
    fast_path.set_recompute(pm, recompute)
    pm.train()
    run = loss_and_grads(pm, batch, project)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return run


def _fp32_twin_of(model, top_k: int):
    """An fp32 CPU copy of a (possibly packed) tiny model: packed experts dequantized."""
    ref32 = tiny_gpt_oss(device=torch.device("cpu"), dtype=torch.float32, top_k=top_k)
    with torch.no_grad():
        for (_, a), (_, b) in zip(pk.iter_experts(ref32), pk.iter_experts(model)):
            for name in ("gate_up_proj", "down_proj"):
                src = getattr(b, name + "_packed").dequantize(DTYPE) if hasattr(b, name + "_packed") else getattr(b, name)
                getattr(a, name).copy_(src.float().cpu())
    return ref32


def fp32_copy_of(model, top_k: int):
    """An fp32 CPU twin of an unpacked, not yet LoRA-wrapped tiny model: every parameter its value."""
    ref32 = tiny_gpt_oss(device=torch.device("cpu"), dtype=torch.float32, top_k=top_k)
    with torch.no_grad():
        for (_, p), (_, q) in zip(ref32.named_parameters(), model.named_parameters()):
            p.copy_(q.float().cpu())
    return ref32


def _same_lora(dst, src):
    with torch.no_grad():
        own = dict(src.named_parameters())
        for n, p in dst.named_parameters():
            if p.requires_grad:
                p.copy_(own[n].to(p))


def _compiled_run(pm, batch, steps: int = 2):
    """(loss, grads) of the project path with compiled layers, after ``steps`` steps (the second
    runs the cached code); checks that graphs compiled on a GPU; leaves the layers uncompiled."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    applied = fast_path.apply(pm, RunConfig(compile_layers=True), force=True)
    assert ("compile_layers" in applied) == CUDA
    runs = [loss_and_grads(pm, batch, project) for _ in range(steps)]
    if CUDA:  # compiled graphs ran (errors would have fallen back to eager silently)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    fast_path.compile_layers(pm, enable=False)
    torch._dynamo.reset()
    return runs


@pytest.mark.parametrize("fmt,experts", [("nf4", False), ("nf4", True), ("mxfp4", False)],
                         ids=["nf4_attention_lora", "nf4_expert_lora", "mxfp4_attention_lora"])
def test_compiled_layers_with_packed_experts_match_compiled_dense_experts(fmt, experts):
    """On a GPU apply() compiles the decoder layers with the packed grouped GEMM as a custom op
    inside.  Reference: the same layers compiled with bf16 experts holding exactly the packed
    weights dequantized, so the only difference is the custom op (judged against fp32 on the CPU).
    Every token goes to every expert (top-k = all 4): with top-2 a few tokens' 2nd and 3rd router
    logits lie within 1% of a logit s.d., and bf16 can route them differently per path.
    (Compiled against eager layers, bf16 experts or packed alike, is the next test's question.)
    On the CPU nothing compiles and the same numbers come out."""
    packed, dense = _packed_and_dense_twin(fmt, top_k=4)
    ref32 = _fp32_twin_of(packed, top_k=4)
    tp = GPT_OSS_EXPERT_PARAMETERS if experts else None
    pm = lora(packed, experts=experts, target_parameters=tp, r=8)
    pd = lora(dense, experts=experts, r=8)
    ref = lora(ref32, experts=experts, r=8)
    _same_lora(pd, pm)
    _same_lora(ref, pm)
    l32, g32 = loss_and_grads(ref, batch_for(ref.config.vocab_size, device=torch.device("cpu")), stock)
    batch = batch_for(pm.config.vocab_size)
    for m in (pd, pm):
        fast_path.set_recompute(m, "full")
        m.train()
    dense_runs = _compiled_run(pd, batch)
    for dense_run, packed_run in zip(dense_runs, _compiled_run(pm, batch)):
        assert_no_further_than_stock((l32, g32), dense_run, packed_run)


@pytest.mark.parametrize("recompute", ["full", "none"])
def test_compiled_layers_are_no_further_from_fp32_than_eager_layers(recompute):
    """Compiled decoder layers in bf16 must be no further from fp32 than the same layers run
    eager, with every layer recomputed and with none.  Every expert routed (top-4 of 4), attention
    LoRA.  Found on the H200 (torch 2.11): a whole layer compiled as one graph under recomputation
    was off by 0.01 in the loss and 26% in the LoRA grads (eager 1.7%), with bf16, NF4 or MXFP4
    experts, padded or not; without recomputation as close as eager (1.8%).  transformers 5
    checkpoints inside the layer's forward, so compiling the layer traced torch.utils.checkpoint
    into the graph; fast_path now compiles the forward inside and checkpoints around it in eager
    (bench/compiled_gap.py shows both).  With top-2 routing stock bf16 is itself ~30% away and the
    gap would hide."""
    model = tiny_gpt_oss(top_k=4)
    ref32 = fp32_copy_of(model, top_k=4)  # the bf16 model's values
    pm = lora(model, experts=False, r=8)
    ref = lora(ref32, experts=False, r=8)
    _same_lora(ref, pm)
    l32, g32 = loss_and_grads(ref, batch_for(ref.config.vocab_size, device=torch.device("cpu")), stock)
    batch = batch_for(pm.config.vocab_size)
    eager = eager_run_then_fresh_dynamo(pm, batch, recompute)
    for run in _compiled_run(pm, batch):
        assert_no_further_than_stock((l32, g32), eager, run)


@pytest.mark.skipif(CUDA, reason="the CPU check of the GPU code path; on a GPU the bf16 test above runs it")
@pytest.mark.parametrize("fmt", ["nf4", "mxfp4"])
def test_compiled_packed_layers_equal_eager_on_the_grouped_gemm_path(fmt, monkeypatch):
    """What apply() compiles on a GPU, checked in fp32 on the CPU: the grouped-GEMM expert path
    (grouped_mm runs on the CPU in fp32; only the device and dtype guard is lifted) with NF4 or
    MXFP4 experts and attention LoRA, each layer compiled by inductor with the packed GEMM as the
    custom op, under full recomputation: one graph for both layers, no graph break, the same loss and
    LoRA grads as eager (bf16 on the GPU rounds differently; that comparison is the test above).
    Expert LoRA adds plain grouped_mm calls, which torch traces for bf16 only: that graph is
    test_expert_gemms_compile_whole_inside_activation_checkpointing's."""
    import torch._dynamo

    # fast_path._gmm_ok without its CUDA/bf16 guard: the same alignment rule, any device and float dtype
    monkeypatch.setattr(fast_path, "_gmm_ok", lambda x, w: x.dtype == w.dtype and fast_path._gmm_aligned(x, w))
    nf4, _ = _packed_and_dense_twin(fmt)
    pm = lora(nf4, experts=False, r=8)
    batch = batch_for(pm.config.vocab_size)
    l_eager, g_eager = eager_run_then_fresh_dynamo(pm, batch)
    assert fast_path.compile_layers(pm)
    # the checkpoint stays outside the compiled graph (test_compiled_layers_are_no_further_...):
    # transformers' checkpointing wrapper was recognised and each layer calls ours
    assert all("forward" in layer.__dict__ for layer in fast_path.base_causal_lm(pm).model.layers)
    try:
        l_new, g_new = loss_and_grads(pm, batch, project)
    finally:
        fast_path.compile_layers(pm, enable=False)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert_same(l_eager, g_eager, l_new, g_new)


def test_compute_loss_passes_position_ids_on_both_paths():
    """Packed rows carry position_ids (restarting per example): the plain and the fused loss both
    hand them to the model, so both equal model(**batch).loss with those positions."""
    model = tiny_gpt_oss()
    batch = batch_for(model.config.vocab_size)
    batch["attention_mask"] = None
    pos = torch.arange(batch["input_ids"].shape[1], device=DEVICE).repeat(2, 1)
    pos[:, 20:] -= 20  # a second example starts at column 20
    batch["position_ids"] = pos
    with torch.no_grad():
        want = float(model(**batch).loss)
        without = float(model(**{k: v for k, v in batch.items() if k != "position_ids"}).loss)
        plain = float(fast_path.compute_loss(model, batch, fused=False)[0])
        fused = float(fast_path.compute_loss(model, batch, fused=True)[0])
    if CUDA:  # bf16: the paths agree to rounding
        assert abs(plain - want) <= LOSS_TOL * abs(want) and abs(fused - want) <= LOSS_TOL * abs(want)
    else:  # fp32: agreement ~1e-7, ten times tighter than what the positions change (~5e-5)
        assert abs(want - without) > 2e-5
        assert abs(plain - want) <= 2e-6 and abs(fused - want) <= 2e-6, (want, plain, fused, without)


@pytest.mark.skipif(not CUDA, reason="TF32 is a CUDA setting")
def test_tf32_for_the_lora_matmuls_only_on_a_half_precision_base():
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert "tf32_lora" not in fast_path.apply(tiny_gpt_oss(dtype=torch.float32))
        assert not torch.backends.cuda.matmul.allow_tf32  # an fp32 run keeps fp32 matmuls
        assert "tf32_lora" in fast_path.apply(tiny_gpt_oss())
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_experts_keep_only_their_gate_up_output_for_backward(compiled, monkeypatch):
    """What a layer that is not recomputed holds for its experts' backward: the gate/up GEMM's
    output (routed rows x 2I) and row-sized indices and weights, nothing of (routed rows x hidden):
    not the gathered input, not the down projection's output (the routing weight scales its input
    instead), not the gathered down bias (each was 4 x hidden values a token a layer, the 20b
    shape's biggest share after gate/up).  Counted through autograd's saved-tensor hooks around a
    whole model without recomputation, eager and with compiled layers (the compiled graph's
    partitioner picks its own set; CPU, fp32, grouped GEMMs).  Compiled as the product compiles,
    per decoder layer: compiling the MLP alone on the CPU with fp32 grouped GEMMs corrupts the
    heap now and then in this torch build (torch 2.13 CPU, an internal assert in backward)."""
    import torch._dynamo

    monkeypatch.setattr(fast_path, "_gmm_ok", lambda x, w: x.dtype == w.dtype and fast_path._gmm_aligned(x, w))
    cpu = torch.device("cpu")
    model = tiny_gpt_oss(device=cpu, dtype=torch.float32, top_k=2)
    qe.quantize_experts(model, "mxfp4")
    pm = lora(model, experts=False, r=8)
    fast_path.set_recompute(pm, "none")
    pm.train()
    batch = batch_for(pm.config.vocab_size, device=cpu)
    rows = batch["input_ids"].numel() * pm.config.num_experts_per_tok
    torch._dynamo.reset()
    if compiled:
        assert fast_path.compile_layers(pm)
    saved = {}

    def pack(t):
        if t.is_floating_point() and t.dim() >= 2 and t.shape[0] == rows:
            saved[t.untyped_storage().data_ptr()] = tuple(t.shape)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = project(pm, batch)
        loss.backward()
    finally:
        fast_path.compile_layers(pm, enable=False)
        torch._dynamo.reset()
    assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)
    big = [s for s in saved.values() if s[-1] > 1]
    # per layer one storage of (rows, 2I): gate/up (the compiled graph may keep it as its gate and up halves)
    assert len(big) == pm.config.num_hidden_layers, saved
    assert all(s[-1] in (2 * pm.config.intermediate_size, pm.config.intermediate_size) for s in big), saved
