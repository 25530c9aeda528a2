"""Time loading a GPT-OSS checkpoint folder to ready-to-train on one GPU: the project's loader
(``training.quant_experts.load_gpt_oss``: meta init, tensors straight to the GPU, MXFP4 experts
dequantized on the GPU, optionally packed to NF4 on the fly) vs stock
``AutoModelForCausalLM.from_pretrained(..., device_map="cuda")`` (MXFP4 dequantized to bf16).
"Ready to train" = loaded + LoRA r 8 on q/k/v/o + fast path applied + one optimizer step done.
Each mode runs in its own fresh process (page cache dropped first); the imports every trainer
process makes (`imports_s`) and CUDA start-up (`cuda_init_s`) are timed apart from the load;
`first_step_s` = LoRA + fast path + the first optimizer step (compilation included); `inductor_cache` says whether flex_attention's compiled kernels were already on
disk (cold = the first run ever on the machine; a second run of the same mode shows warm).

    python bench/make_twin_checkpoint.py --shape 20b --out /root/twin-20b
    python bench/gpu_load_bench.py /root/twin-20b --name h200_load --modes project-bf16,project-bf16,project-nf4,stock
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from training import fast_path  # noqa: E402
from training import quant_experts as qe  # noqa: E402
from training import packed  # noqa: E402


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except Exception:
        return False


def ready(model, seq=512):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0,
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    fast_path.apply(pm)
    fast_path.set_recompute(pm, "full")
    ids = torch.randint(0, model.config.vocab_size, (1, seq), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    loss, _ = fast_path.compute_loss(pm, batch)
    loss.backward()
    opt.step()
    torch.cuda.synchronize()
    return float(loss)


def measure(path: Path, mode: str, shape: str) -> dict:
    """One mode, in this (fresh) process: CUDA start-up timed apart from the load."""
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    cache = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or f"/tmp/torchinductor_{os.environ.get('USER', 'root')}")
    row = {"gpu": None, "gpus": 1, "shape": shape, "mode": mode,
           "checkpoint_gb": round(size / 1e9, 2), "page_cache_dropped": drop_page_cache(),
           "inductor_cache": "warm" if cache.exists() and any(cache.iterdir()) else "cold",
           "date": time.strftime("%Y-%m-%d", time.gmtime())}
    try:
        t = time.perf_counter()  # what any trainer process imports before it loads (one-time, per process)
        import transformers.models.gpt_oss.modeling_gpt_oss  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401
        import peft  # noqa: F401
        if mode.endswith("nf4"):
            import bitsandbytes  # noqa: F401
        row["imports_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        torch.empty(1, device="cuda")
        torch.cuda.synchronize()
        row["gpu"] = torch.cuda.get_device_name(0)
        row["cuda_init_s"] = round(time.perf_counter() - t, 2)
        t0 = time.perf_counter()
        if mode.startswith("project"):
            model, info = qe.load_gpt_oss(path, device="cuda", dtype=torch.bfloat16,
                                          quantization="nf4" if mode.endswith("nf4") else "none")
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, device_map="cuda",
                                                         attn_implementation="eager")
        torch.cuda.synchronize()
        t_load = time.perf_counter() - t0
        loss = ready(model)
        t_ready = time.perf_counter() - t0
        row.update(load_s=round(t_load, 2), ready_s=round(t_ready, 2), first_step_s=round(t_ready - t_load, 2), s_per_gb=round(t_load / (size / 1e9), 3),
                   first_loss=round(loss, 4), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   bytes_per_param=round(packed.bytes_per_param(model), 4))
    except Exception as e:  # record and go on
        row["error"] = f"{type(e).__name__}: {e}"[:400]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--name", default="h200_load")
    ap.add_argument("--modes", default="project-bf16,project-nf4,stock",
                    help="each runs in its own fresh process, in this order (a mode may repeat)")
    ap.add_argument("--shape", default="20b")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    path = Path(a.path)
    if a.child:
        print("ROW", json.dumps(measure(path, a.modes, a.shape)), flush=True)
        return
    out = REPO / "bench" / "results" / f"{a.name}.json"
    rows = json.loads(out.read_text()) if out.exists() else []
    for mode in a.modes.split(","):
        proc = subprocess.run([sys.executable, __file__, str(path), "--modes", mode, "--shape", a.shape, "--child"],
                              capture_output=True, text=True)
        got = [ln[4:] for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
        row = json.loads(got[-1]) if got else {"shape": a.shape, "mode": mode,
                                                "error": f"exit {proc.returncode}: {proc.stderr[-400:]}"}
        print("ROW", json.dumps(row), flush=True)
        key = lambda r: (r.get("shape"), r.get("mode"), r.get("inductor_cache"))  # noqa: E731
        rows = [r for r in rows if key(r) != key(row)] + [row]
        out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
