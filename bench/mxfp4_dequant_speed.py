"""MXFP4 -> bf16 dequantization speed on CUDA: the compiled torch kernel against the Triton one, on
one 20b-shaped gate_up weight (32 experts x 5760 x 2880, one chunk), results checked bit for bit.
Prints one JSON line per kernel (ms per call, TB/s counting the bytes read and written) and, last,
``BEST <backend>``: what ``gpu_lora_bench.py --mxfp4-dequant`` should get.

    python bench/mxfp4_dequant_speed.py [--experts 32 --out-features 5760 --in-features 2880]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training import quant_experts as qe  # noqa: E402


def time_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--out-features", type=int, default=5760)
    ap.add_argument("--in-features", type=int, default=2880)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 2
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (a.experts, a.out_features, a.in_features // 32)
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, device="cuda", generator=g)
    scales = torch.randint(110, 135, shape, dtype=torch.uint8, device="cuda", generator=g)
    numel = blocks.numel() * 2
    moved = blocks.numel() + scales.numel() + numel * 2  # bytes read + bf16 written
    kernels = {
        "torch": lambda: qe._run_compiled("mxfp4", qe.mxfp4_dequant_torch, blocks, scales, numel, torch.bfloat16,
                                          fallback="none"),
        "triton": lambda: qe.mxfp4_dequant_triton(blocks, scales, numel, torch.bfloat16),
    }
    ref = qe.dequantize_mxfp4(blocks, scales, torch.bfloat16).reshape(-1)
    best = None
    for name, fn in kernels.items():
        same = bool(torch.equal(fn().view(torch.int16), ref.view(torch.int16)))
        ms = time_ms(fn, a.reps)
        print(json.dumps({"kernel": name, "ms": round(ms, 3), "tb_s": round(moved / ms / 1e9, 2),
                          "bit_equal": same, "weights": numel, "gpu": torch.cuda.get_device_name(0)}), flush=True)
        if same and (best is None or ms < best[1]):
            best = (name, ms)
    print("BEST", best[0] if best else "torch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
