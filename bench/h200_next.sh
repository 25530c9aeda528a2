#!/usr/bin/env bash
# What the next H200 session runs first (issue #15 item 5 and the rows this stop could not measure),
# in one device call (~9 min). cwd = repo root; the wheels installed into /tmp/site (see
# BENCHMARKS.md's device notes): transformers 5.24, bitsandbytes 0.50.2, pydantic, deepspeed,
# sqlite-utils, openai-harmony, quicktok-v1, xgrammar + apache-tvm-ffi. Logs and rows go to $OUT.
set -u -o pipefail
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# 1. GPU tests of the packed and NF4 paths, verbose so a cut run still says which test it was in.
timeout 200 python3 -m pytest -v -p no:cacheprovider tests/test_gpu_packing.py 2>&1 | tee "$OUT/test_gpu_packing.log" | tail -5
timeout 200 python3 -m pytest -v -p no:cacheprovider tests/test_gpu_fast_path.py 2>&1 | tee "$OUT/test_gpu_fast_path.log" | tail -5
# 2. 20b bf16 toward 24k tokens/s at <= 44 GiB (same-run stock row), compiled, batches 4 and 8.
timeout 150 python3 bench/gpu_lora_bench.py --name h200_round2 --out "$OUT/h200_20b.json" --shapes 20b --seqs 2048 \
  --loras attention,attention+experts --impls stock,project --stock-batches 4 --batches 4,8 \
  --recompute full+compile --compile-batches 4,8 --mem-limit-gib 44 --steps 4 --warmup 2 --budget-s 130 2>&1 | tail -12
# 3. GPT-OSS-20b-shaped whole grades, constrained, 64 at once (was 259/min; scoring pass since batched).
timeout 120 python3 bench/grading_speed.py --gpt-oss-20b-shaped --skip-model --unit submission --constrained \
  --n 64 --batch-sizes 64 --max-new-tokens 256 --out "$OUT" 2>&1 | tail -6
