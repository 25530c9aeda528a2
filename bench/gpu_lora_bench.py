"""GPT-OSS LoRA training speed on one GPU: the project's path vs stock transformers+PEFT, same run.

Builds GPT-OSS-shaped models with random weights straight on the GPU (meta init, then the
weights are drawn on the device; NF4 experts are drawn and packed chunk by chunk so a 120b shape
never exists in bf16), puts LoRA r 8 on q/k/v/o (and on the experts), and times optimizer steps:

  stock   : transformers + PEFT as shipped: flex_attention, grouped_mm experts, PEFT's
            target_parameters for expert LoRA, model(..., labels=...).loss, full grad checkpointing
  project : training.fast_path.apply (flex_attention, project experts with fused expert LoRA),
            fast_path.compute_loss (chunked linear cross-entropy), recomputation as the row says

tokens/s is the median of >= 5 steps after warm-up; peak GiB is torch's max allocated over the
config; every row carries the memory split: weights held (experts, NF4 or bf16, and the bf16 rest),
``held_gib`` (allocated when the config starts: weights + LoRA) and ``act_gib`` = peak - held
(activations, transients, gradients and optimizer state); ``--mem-limit-gib`` marks each row
within/over the limit and skips larger batches of a config once one went over (or ran out); MFU = tokens/s x (6 x active params, 4 x when nothing is recomputed) / 989 TFLOP/s (H200
dense bf16 datasheet; ~790 measured).  Every row carries the first-step loss on the same batch
(LoRA reset to the same init before each config), so project and stock losses can be compared.

    python bench/gpu_lora_bench.py --name h200 --shapes 20b,120b --seqs 2048 --batches 1,2,4
    python bench/gpu_lora_bench.py --shapes 120b --loras attention --impls project --batches 4,8,2 \
        --recompute full+compile,full --compile-batches 4,8,2 --mem-limit-gib 65
Rows go to bench/results/<name>.json (appended/replaced by key), a table is printed at the end.
``--profile-dir D``: after each timed row one more step runs under torch.profiler; the row gets the
GPU time by kernel family (GEMMs, flex attention, inductor's fused kernels, copies) and its top
kernels, and D/<row>.txt the whole table.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch._dynamo  # configure() resets its cache per row

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from training import fast_path  # noqa: E402
from training import quant_experts as qe  # noqa: E402
from training import packed  # noqa: E402
from training.config import GPT_OSS_EXPERT_PARAMETERS, RunConfig  # noqa: E402

PEAK_FLOPS = 989e12
SHAPES = {
    "20b": dict(num_hidden_layers=24, num_local_experts=32),
    "120b": dict(num_hidden_layers=36, num_local_experts=128),
    "tiny": dict(num_hidden_layers=2, num_local_experts=4, sliding_window=8, hidden_size=64, intermediate_size=64,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1024),
}


def gpt_oss_config(shape: str, layers: int | None = None):
    from transformers import GptOssConfig

    kw = dict(hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8,
              head_dim=64, vocab_size=201088, num_experts_per_tok=4, sliding_window=128,
              max_position_embeddings=131072, tie_word_embeddings=False, router_aux_loss_coef=0.9,
              output_router_logits=False)
    kw.update(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = GptOssConfig(**kw)
    return cfg


def active_params(cfg) -> int:
    H, L = cfg.hidden_size, cfg.num_hidden_layers
    hd = cfg.head_dim
    attn = H * cfg.num_attention_heads * hd * 2 + H * cfg.num_key_value_heads * hd * 2
    experts = cfg.num_local_experts * (H * 2 * cfg.intermediate_size + cfg.intermediate_size * H)
    router = H * cfg.num_local_experts
    per_layer = attn + router + experts * cfg.num_experts_per_tok / cfg.num_local_experts
    return int(L * per_layer + cfg.vocab_size * H)  # + lm_head; embedding lookup has no FLOPs


@torch.no_grad()
def build_random(cfg, device, dtype=torch.bfloat16, quant: str = "bf16", seed: int = 0, std: float = 0.02):
    from transformers import GptOssForCausalLM

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = GptOssForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    if quant in packed.STORE_KINDS:  # nf4, mxfp4
        qe.quantize_experts(model, quant, compute_dtype=dtype, device=device, random_std=std, seed=seed)
    qe._materialize_meta_buffers(model, cfg, torch.device(device))
    for name, mod in model.named_modules():
        if any(p.device.type == "meta" for p in mod.parameters(recurse=False)):
            mod.to_empty(device=device, recurse=False)
            for pname, p in mod.named_parameters(recurse=False):
                if "norm" in name and pname == "weight":
                    p.fill_(1.0)
                elif pname.endswith("bias") and not name.endswith("router"):
                    p.zero_()
                else:  # linear/embedding weights, expert stacks, sinks, router weight and bias
                    p.normal_(0.0, std)
    model.train()
    return model


def lora_model(model, lora: str, r: int = 8):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    kw = {}
    if lora == "attention+experts":
        kw["target_parameters"] = list(GPT_OSS_EXPERT_PARAMETERS)
    lc = LoraConfig(r=r, lora_alpha=32, lora_dropout=0.0, target_modules=targets, **kw)
    pm = get_peft_model(model, lc)
    return pm


def lora_state(pm):
    return {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}


def load_lora_state(pm, st):
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if n in st:
                p.copy_(st[n])


def make_batch(bs, seq, vocab, device, seed=1234):
    g = torch.Generator(device="cpu").manual_seed(seed + bs * 7 + seq)
    ids = torch.randint(0, vocab, (bs, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def configure(pm, impl: str, recompute):
    lm = fast_path.base_causal_lm(pm)
    if impl == "stock":
        fast_path.uninstall_moe_forward(pm)
        on_cuda = fast_path._model_device(pm).type == "cuda"
        fast_path._set_attn(lm, "flex_attention" if on_cuda else "eager")
        applied = ["flex_attention"] if on_cuda else []
    rc = str(recompute)
    compile_on = rc.endswith("+compile")
    rc = rc.removesuffix("+compile")
    # Every row starts from an empty dynamo cache, as a training process does (no compiled code
    # or guards left by earlier rows; first_step_s then counts the row's own compilation).
    torch._dynamo.reset()
    if impl != "stock":
        applied = fast_path.apply(pm, RunConfig(compile_layers=compile_on))
    fast_path.compile_layers(pm, enable=compile_on)
    if compile_on and "compile_layers" not in applied:
        applied = applied + ["compile_layers"]
    fast_path.set_recompute(pm, rc if rc in ("full", "none") else int(rc))
    return applied + [f"attn={lm.config._attn_implementation}"]


def weights_split(model) -> dict:
    """GiB of weights held: experts (packed NF4/MXFP4 or bf16 3-D stacks) and everything else."""
    rep = packed.memory_report(model)
    dense_experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                        if n.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj") and p.dim() == 3)
    g = 2**30
    return {"weights_gib": round(rep["total_bytes"] / g, 2),
            "experts_gib": round((rep["expert_bytes"] + dense_experts) / g, 2),
            "experts_format": rep["expert_format"] or "bf16",
            "rest_gib": round((rep["other_bytes"] - dense_experts) / g, 2)}


def cuda_ok(params):
    return all(p.device.type == "cuda" for p in params)


def step_loss(pm, impl, batch):
    """The row's loss: stock as shipped (model(..., labels=...).loss), or the project's fused loss."""
    return pm(**batch).loss if impl == "stock" else fast_path.compute_loss(pm, batch)[0]


# Kernel families of a profiled step (name substrings, first match wins).
# Inductor names its template kernels triton_tem_*: in these graphs that is flex attention.
KERNEL_FAMILIES = (("flex_attention", ("flex_attention", "flex_decoding", "triton_tem")),
                   ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "grouped_mm", "sm90_", "cublas", "wgmma")),
                   ("inductor_fused", ("triton_",)),
                   ("nf4_dequant", ("dequant", "kDequantize")),
                   ("copy_cat_index", ("copy", "cat", "index", "gather", "scatter", "elementwise", "reduce")))


def profile_step(pm, impl, batch, out_path: Path, top: int = 40) -> dict:
    """One more step under torch.profiler: where the GPU time goes, by kernel family and the top
    kernels (on a CPU run: the CPU ops); the full table is written to ``out_path``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = batch["input_ids"].device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    params = [p for p in pm.parameters() if p.requires_grad]
    sync()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        loss = step_loss(pm, impl, batch)
        loss.backward()
        sync()
    wall = time.perf_counter() - t
    for p in params:
        p.grad = None
    kernels = []
    for ev in prof.key_averages():
        if cuda:
            on_device = "CUDA" in str(getattr(ev, "device_type", ""))
            ms = (getattr(ev, "self_device_time_total", None) or ev.self_cuda_time_total) / 1e3 if on_device else 0
        else:
            ms = ev.self_cpu_time_total / 1e3
        if ms:
            kernels.append((ev.key, ms, ev.count))
    kernels.sort(key=lambda k: -k[1])
    fam: dict[str, float] = {}
    for name, ms, _ in kernels:
        low = name.lower()
        f = next((f for f, keys in KERNEL_FAMILIES if any(k.lower() in low for k in keys)), "other")
        fam[f] = fam.get(f, 0.0) + ms
    busy = sum(fam.values())
    with open(out_path, "w") as fh:
        fh.write(f"wall {wall*1e3:.1f} ms (forward + backward, profiled), {'GPU kernels' if cuda else 'CPU ops'} "
                 f"{busy:.1f} ms\n")
        for f, ms in sorted(fam.items(), key=lambda kv: -kv[1]):
            fh.write(f"  {f:16} {ms:9.1f} ms {100*ms/max(busy, 1e-9):5.1f}%\n")
        fh.write("\n".join(f"{ms:9.2f} ms {n:6d}x  {name[:160]}" for name, ms, n in kernels[:top]) + "\n\n")
        fh.write(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                           row_limit=60))
    return {"wall_ms": round(wall * 1e3, 1), "busy_ms": round(busy, 1),
            "families_ms": {f: round(ms, 1) for f, ms in sorted(fam.items(), key=lambda kv: -kv[1])},
            "top": [[name[:120], round(ms, 2), n] for name, ms, n in kernels[:12]]}


def _alloc_label(ev: dict) -> str:
    """Where an allocation came from: the compiled graph's node when recorded, else the innermost
    frames outside torch itself."""
    ctx = ev.get("compile_context") or ""
    frames = [f for f in ev.get("frames", []) if "/torch/" not in f.get("filename", "")]
    where = " < ".join(f"{f.get('name')} {Path(f.get('filename', '?')).name}:{f.get('line')}" for f in frames[:2])
    return (f"[{ctx}] " if ctx and ctx != "N/A" else "") + (where or "torch internals")


def peak_live_allocations(trace: list[dict], top: int = 25) -> dict:
    """Replay a CUDA allocator trace (alloc / free events): the largest total of live allocations and
    what made it up, grouped by where each was allocated."""
    def replay(events):
        live, total, peak, peak_i = {}, 0, 0, -1
        for i, ev in enumerate(events):
            act = ev.get("action")
            if act == "alloc":
                live[ev["addr"]] = ev
                total += ev["size"]
            elif act in ("free_requested", "free_completed") and ev.get("addr") in live:
                total -= live.pop(ev["addr"])["size"]
            if total > peak:
                peak, peak_i = total, i
        return live, peak, peak_i

    _, peak, peak_i = replay(trace)
    live, _, _ = replay(trace[: peak_i + 1])
    groups: dict[str, list[int]] = {}
    for ev in live.values():
        g = groups.setdefault(_alloc_label(ev), [0, 0])
        g[0] += ev["size"]
        g[1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {"peak_gib": round(peak / 2**30, 3), "events": len(trace), "peak_at_event": peak_i,
            "top": [[label[:300], round(b / 2**20, 1), n] for label, (b, n) in ranked]}


def memory_peak_step(pm, impl, batch, out_path: Path) -> dict:
    """One more step with the CUDA allocator's history on: at the step's peak, which allocations were
    live (beyond what the step started with), by where they were made; written to ``out_path``."""
    from torch.cuda import memory as cm
    import inspect

    kw = {"stacks": "python", "max_entries": 2_000_000}
    if "compile_context" in inspect.signature(cm._record_memory_history).parameters:
        kw["compile_context"] = True
    params = [p for p in pm.parameters() if p.requires_grad]
    torch.cuda.synchronize()
    cm._record_memory_history(**kw)
    try:
        loss = step_loss(pm, impl, batch)
        loss.backward()
        torch.cuda.synchronize()
        snap = cm._snapshot()
    finally:
        cm._record_memory_history(enabled=None)
    for p in params:
        p.grad = None
    trace = [ev for dev in snap.get("device_traces", []) for ev in dev]
    res = peak_live_allocations(trace)
    with open(out_path, "w") as fh:
        fh.write(f"peak of the step's own allocations {res['peak_gib']} GiB at event {res['peak_at_event']} "
                 f"of {res['events']}\n")
        fh.write("\n".join(f"{mib:9.1f} MiB {n:5d}x  {label}" for label, mib, n in res["top"]) + "\n")
    res["top"] = res["top"][:10]
    return res


def time_config(pm, impl, batch, steps, warmup, init_state):
    load_lora_state(pm, init_state)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda_ok(params))
    cuda = batch["input_ids"].device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    gc.collect()
    held = 0.0
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated() / 2**30
    times, losses = [], []
    for i in range(warmup + steps):
        sync()
        t = time.perf_counter()
        loss = step_loss(pm, impl, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    del opt
    return times, losses, peak, held


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="h200")
    ap.add_argument("--shapes", default="20b")
    ap.add_argument("--layers", type=int, default=None, help="override layer count (smoke runs)")
    ap.add_argument("--seqs", default="2048")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--loras", default="attention,attention+experts")
    ap.add_argument("--impls", default="stock,project")
    ap.add_argument("--recompute", default="full", help="project recomputation modes: full,none,<k layers kept>")
    ap.add_argument("--compile-batches", default="", help="batch sizes at which '+compile' recompute modes run")
    ap.add_argument("--quant", default="bf16", help="expert storage for shapes other than 120b")
    ap.add_argument("--quant-120b", default="nf4")
    ap.add_argument("--stock-batches", default="1", help="batch sizes to run stock at")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip what would start after this")
    ap.add_argument("--mem-limit-gib", type=float, default=None,
                    help="mark rows within/over this peak; skip larger batches of a config once one went over")
    ap.add_argument("--nf4-dequant", default=None, choices=["torch", "bnb"],
                    help="NF4 dequantization on CUDA (training.packed.DEQUANT_BACKEND; default torch)")
    ap.add_argument("--nf4-keep-gib", type=float, default=None,
                    help="a recomputed layer keeps a dequantized expert tensor up to this size for its backward "
                         "(training.fast_path.PACKED_KEEP_MAX_BYTES; default 1.1; 0 never)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--memory-peak", action="store_true",
                    help="with --profile-dir on CUDA: one more step with the allocator's history on; what was live "
                         "at the step's peak, by where it was allocated, to <dir>/<row>.mem.txt")
    ap.add_argument("--profile-dir", default=None,
                    help="after each timed row, profile one more step (torch.profiler): kernel families and the "
                         "top kernels in the row, the full table to <dir>/<row>.txt")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args(argv)

    t_start = time.time()
    if a.nf4_dequant:
        packed.DEQUANT_BACKEND = a.nf4_dequant
    if a.nf4_keep_gib is not None:
        fast_path.PACKED_KEEP_MAX_BYTES = int(a.nf4_keep_gib * 2**30)
    device = torch.device(a.device)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(a.out) if a.out else REPO / "bench" / "results" / f"{a.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text()) if out.exists() else []
    date = time.strftime("%Y-%m-%d", time.gmtime())

    def save(row):
        key = lambda r: (r["shape"], r["seq"], r["batch"], r["lora"], r["impl"], r["quant"], str(r.get("recompute")),
                         r.get("variant"))
        nonlocal rows
        rows = [r for r in rows if key(r) != key(row)] + [row]
        out.write_text(json.dumps(rows, indent=1))
        print("ROW", json.dumps(row), flush=True)

    for shape in a.shapes.split(","):
        cfg = gpt_oss_config(shape, a.layers)
        quant = a.quant_120b if shape == "120b" else a.quant
        t0 = time.time()
        model = build_random(cfg, device, dtype=dtype, quant=quant)
        if device.type == "cuda":
            torch.cuda.synchronize()
        build_s = time.time() - t0
        rep = packed.memory_report(model)
        split = weights_split(model)
        def variant():  # read per row: a dequantization kernel that fails falls back for good
            return (f"dequant={packed.DEQUANT_BACKEND},keep={fast_path.PACKED_KEEP_MAX_BYTES / 2**30:g}GiB"
                    if quant in packed.STORE_KINDS else None)
        over: dict = {}  # (lora, impl, recompute, seq) -> smallest batch that went over --mem-limit-gib
        print(f"weights: {split}", flush=True)
        print(f"== {shape} ({cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts) {quant}: built in {build_s:.1f}s, "
              f"weights {rep['total_bytes']/2**30:.1f} GiB, {rep['bytes_per_param']:.3f} B/param, "
              f"allocated {torch.cuda.memory_allocated()/2**30 if device.type == 'cuda' else 0:.1f} GiB", flush=True)
        act = active_params(cfg)
        for lora in a.loras.split(","):
            pm = lora_model(model, lora)
            init = lora_state(pm)
            for seq in [int(s) for s in a.seqs.split(",")]:
                for bs in [int(b) for b in a.batches.split(",")]:
                    batch = make_batch(bs, seq, cfg.vocab_size, device)
                    for impl in a.impls.split(","):
                        if impl == "stock" and (quant != "bf16" or str(bs) not in a.stock_batches.split(",")):
                            continue
                        modes = ["full"] if impl == "stock" else [
                            m for m in a.recompute.split(",") if not m.endswith("+compile") or str(bs) in a.compile_batches.split(",")]
                        for rc in modes:
                            if time.time() - t_start > a.budget_s:
                                print(f"SKIP (budget) {shape} {lora} {seq} {bs} {impl} {rc}", flush=True)
                                continue
                            if bs >= over.get((lora, impl, rc, seq), math.inf):
                                print(f"SKIP (over {a.mem_limit_gib} GiB at a smaller batch) {shape} {lora} {seq} {bs} "
                                      f"{impl} {rc}", flush=True)
                                continue
                            row = dict(gpu=gpu, gpus=1, shape=shape, layers=cfg.num_hidden_layers, seq=seq, batch=bs,
                                       lora=lora, impl=impl, quant=quant, recompute=rc, date=date, **split)
                            try:
                                applied = configure(pm, impl, rc)
                                n_layers = cfg.num_hidden_layers
                                rcb = rc.removesuffix("+compile")
                                ck = n_layers if rcb == "full" else 0 if rcb == "none" else n_layers - int(rcb)
                                mult = 4 + 2 * ck / n_layers
                                times, losses, peak, held = time_config(pm, impl, batch, a.steps, a.warmup, init)
                                med = statistics.median(times[a.warmup:])
                                tps = bs * seq / med
                                if v := variant():  # after the row ran: the kernel it really used
                                    row["variant"] = v
                                row.update(tokens_per_s=round(tps, 1), peak_gib=round(peak, 2),
                                           held_gib=round(held, 2), act_gib=round(peak - held, 2),
                                           mfu=round(tps * mult * act / PEAK_FLOPS, 4), loss=round(losses[0], 5),
                                           step_s=round(med, 4), first_step_s=round(times[0], 2), applied=applied,
                                           flops_per_token=mult * act, active_params=act,
                                           losses=[round(x, 4) for x in losses])
                                if a.profile_dir:
                                    pdir = Path(a.profile_dir)
                                    pdir.mkdir(parents=True, exist_ok=True)
                                    tag = f"{shape}_{lora}_{impl}_{rc}_bs{bs}".replace("+", "_")
                                    try:  # a profiler failure must not lose the row's timing
                                        row["profile"] = profile_step(pm, impl, batch, pdir / f"{tag}.txt")
                                    except Exception as e:
                                        row["profile"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                                    if a.memory_peak and device.type == "cuda":
                                        try:
                                            row["memory_peak"] = memory_peak_step(pm, impl, batch, pdir / f"{tag}.mem.txt")
                                        except Exception as e:
                                            row["memory_peak"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                            except torch.OutOfMemoryError as e:
                                row.update(tokens_per_s=None, peak_gib=None, mfu=None, error="OOM: " + str(e)[:200])
                            except Exception as e:  # record and go on: one broken variant must not lose the run
                                traceback.print_exc()
                                row.update(tokens_per_s=None, peak_gib=None, mfu=None, error=f"{type(e).__name__}: {e}"[:400])
                            if a.mem_limit_gib is not None:
                                row["mem_limit_gib"] = a.mem_limit_gib
                                row["within_limit"] = row.get("peak_gib") is not None and row["peak_gib"] <= a.mem_limit_gib
                                if not row["within_limit"]:
                                    over[(lora, impl, rc, seq)] = min(bs, over.get((lora, impl, rc, seq), math.inf))
                            gc.collect()
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                            save(row)
            # drop this LoRA before the next kind
            fast_path.uninstall_moe_forward(pm)
            model = pm.unload()
            if packed.is_quantized(model):
                fast_path.install_moe_forward(model)
            del pm, init
            gc.collect()
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print_table(rows)
    return rows


def print_table(rows):
    hdr = (f"{'shape':5} {'quant':5} {'seq':>5} {'bs':>3} {'lora':18} {'impl':8} {'recomp':6} {'tok/s':>8} {'peakGiB':>8} "
           f"{'experts':>7} {'rest':>5} {'held':>5} {'act':>5} {'lim':>4} {'MFU':>6} {'loss':>8}")
    print(hdr)
    for r in rows:
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
        pk = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
        mfu = f"{r['mfu']*100:.1f}%" if r.get("mfu") else "-"
        loss = f"{r['loss']:.4f}" if r.get("loss") is not None else (r.get("error", "")[:30])
        f = lambda k: f"{r[k]:.1f}" if r.get(k) is not None else "-"
        lim = "" if "within_limit" not in r else ("ok" if r["within_limit"] else "OVER")
        print(f"{r['shape']:5} {r['quant']:5} {r['seq']:>5} {r['batch']:>3} {r['lora']:18} {r['impl']:8} "
              f"{str(r.get('recompute')):6} {tps:>8} {pk:>8} {f('experts_gib'):>7} {f('rest_gib'):>5} {f('held_gib'):>5} "
              f"{f('act_gib'):>5} {lim:>4} {mfu:>6} {loss:>8}")


if __name__ == "__main__":
    main()
