"""Turn one `python -m training run` (its metrics.jsonl + train.log, and the device call's log)
into a row of bench/results/*.json, in the format of bench/results/h200.json.

    python bench/launcher_results.py --dir FOLDER_WITH_FILES --out bench/results/h200_launcher_1gpu.json \
        --command "the exact device command" [--layers 24]

tokens/s: median over the optimizer steps after the first (the first compiles the layers); the
trainer counts real tokens only, never padding (packed or not);
packing: the trainer's "packing: ..." line (rows, width, padding packed and unpacked), or None;
peak memory: the last step's `peak_mem_gib` (torch.cuda.max_memory_allocated of rank 0);
model load: the trainer's "loaded in X s" line (tokenizer + weights onto the GPU + encoding).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

PEAK_BF16_FLOPS = 989e12  # the H200 spec figure h200.json's "mfu" uses


def build_row(folder: Path, command: str, layers: int) -> dict:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    log = (folder / "train.log").read_text(errors="replace")
    cfg = json.loads((folder / "config.json").read_text())
    m = re.search(r"loaded in ([0-9.]+)s", log)
    load_s = float(m.group(1)) if m else None
    m = re.search(r"fast path: (.*)", log)
    applied = [a.strip() for a in m.group(1).split(",")] if m else []
    m = re.search(r"packing: ([\d,]+) examples into ([\d,]+) rows of (\d+) tokens.*?, (\d+)% padding "
                  r"\(unpacked: (\d+)%\)", log)
    packing = None if not m else {
        "examples": int(m.group(1).replace(",", "")), "rows": int(m.group(2).replace(",", "")),
        "width": int(m.group(3)), "padding": int(m.group(4)) / 100, "unpacked_padding": int(m.group(5)) / 100}
    tps = [r["tokens_per_s"] for r in train]
    steady = tps[1:] or tps
    elapsed = [r["elapsed_s"] for r in train]
    step_s = [b - a for a, b in zip(elapsed, elapsed[1:])]
    active = 3_607_142_400 * layers / 24  # gpt-oss-20b active parameters, scaled by layer count
    fpt = 6 * active  # LoRA with full activation recompute (as h200.json counts it)
    tok_s = round(statistics.median(steady), 1) if steady else None
    twin = {}
    call_log = folder / "log"
    if call_log.exists():
        for line in call_log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"write_s"' in line:
                twin = json.loads(line)
    return {
        "gpu": "NVIDIA H200", "gpus": 1, "shape": "20b", "layers": layers,
        "seq": (f"rows of {packing['width']} packed with real examples" if packing else
                f"<= {cfg['max_length']} (real submissions, padded per micro-batch)"),
        "packing": packing,
        "batch": cfg["per_device_batch_size"], "grad_accum": cfg["gradient_accumulation_steps"],
        "lora": "attention" + ("+experts" if cfg.get("lora_experts") else ""),
        "impl": "project-launcher", "quant": cfg["quantization"] if cfg["quantization"] != "none" else "bf16",
        "recompute": "full" if cfg["gradient_checkpointing"] else "none",
        "zero_stage": cfg["zero_stage"], "date": time.strftime("%Y-%m-%d"),
        "tokens_per_s": tok_s, "tokens_per_s_per_step": tps,
        "peak_gib": max((r["peak_mem_gib"] for r in train), default=None),
        "mfu": round(tok_s * fpt / PEAK_BF16_FLOPS, 4) if tok_s else None,
        "loss": train[-1]["loss"] if train else None,
        "losses": [round(r["loss"], 4) for r in train],
        "step_s": round(statistics.median(step_s), 3) if step_s else None,
        "first_step_s": train[0]["elapsed_s"] if train else None,
        "model_load_s": load_s, "twin_write_s": twin.get("total_s"),
        "steps": len(train), "total_steps": train[-1]["total_steps"] if train else None,
        "applied": applied, "flops_per_token": fpt, "active_params": int(active),
        "command": command,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--command", default="")
    ap.add_argument("--layers", type=int, default=24)
    a = ap.parse_args(argv)
    row = build_row(Path(a.dir), a.command, a.layers)
    Path(a.out).write_text(json.dumps([row], indent=1) + "\n")
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
