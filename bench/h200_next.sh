#!/usr/bin/env bash
# Device calls, scripted beforehand (one H200, 30 min a session; calls back to back, the machine
# goes back after ~30 s idle; it can be taken back mid-call: call again). cwd = repo root.
#   bash bench/h200_next.sh grading   # carry .whl/a: the 20b-shaped grading row (#14), profiled
#   bash bench/h200_next.sh tests     # carry .whl/c: GPU tests of the packed, compiled and NF4 paths
#   bash bench/h200_next.sh train20   # 20b bf16 rows: expert LoRA compiled since its graph break went
#   bash bench/h200_next.sh train120  # 120b NF4 rows, eager vs compiled (the NF4 GEMM a custom op now)
#   bash bench/h200_next.sh launcher20 # carry .whl/e: the h200-20b preset through the launcher, 24-layer twin
#   bash bench/h200_next.sh train20mx # carry .whl/c: 20b with MXFP4 experts (the checkpoint's format), less recompute
#   bash bench/h200_next.sh launcher120 # carry .whl/f: the h200-120b preset through the launcher, reduced 120b twin (TWIN_LAYERS, default 6)
#   bash bench/h200_next.sh items     # carry .whl/e: item grading (#29): the GPU grading test, then the 20b shape's variants, profiled
#   bash bench/h200_next.sh items120  # carry .whl/e: item grading with a reduced-layer 120b twin, experts packed (TWIN_LAYERS, default 12)
# Wheels (made by bench/device_wheels.sh; a call carries 64 MiB at most): .whl/a = transformers 5.24,
# pydantic (+core, annotated-types, typing-inspection), sqlite-utils (+sqlite-fts4,
# click-default-group), openai-harmony, quicktok-v1, xgrammar, apache-tvm-ffi; .whl/b =
# bitsandbytes 0.50.2, deepspeed 0.19.8, hjson; .whl/c = .whl/b without deepspeed and hjson, plus
# transformers, pydantic, sqlite-utils and openai-harmony (what the GPU tests and benches need);
# .whl/d = xgrammar, apache-tvm-ffi, quicktok-v1 (with c: grading); .whl/e = .whl/c without
# bitsandbytes, plus deepspeed, hjson and quicktok-v1 (the launcher with a bf16 model, 25 MiB); .whl/f =
# .whl/e plus bitsandbytes repacked with only its CUDA 13 and CPU libraries (28 MiB; the full wheel
# would take the carry past 64 MiB). Carried wheels are stashed in
# /root/stash (kept while the machine is warm) and installed again each call.
set -u -o pipefail
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
case "${1:-}" in grading|items|items120|tests|train20|train120|launcher20|train20mx|launcher120) ;; *) echo "usage: $0 grading|items|items120|tests|train20|train120|launcher20|train20mx|launcher120"; exit 2;; esac
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /root/stash
for d in .whl/a .whl/b .whl/c .whl/d .whl/e .whl/f; do [ -d "$d" ] && cp "$d"/*.whl /root/stash/; done
python3 -m pip install -q --no-deps --target /tmp/site --upgrade /root/stash/*.whl 2>&1 | grep -v -i warning | tail -3
echo "## $(date -u +%T) installed: $(ls /root/stash | wc -l) wheels"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader

case "${1:-}" in
tests)
  # The whole fast-path file first (FAST_K narrows it; the custom ops, TF32 and the compiled loss
  # chunk on the GPU), then packed and compiled paths' loss and gradients against the reference
  # (issue 15 item 5), verbose so a cut run still says which test it was in, with each test's time.
  # FAST_S / PACK_S = 0 skips that file (timeout 0 would mean no limit at all)
  [ "${FAST_S:-260}" != 0 ] && timeout ${FAST_S:-260} python3 -m pytest -v --tb=short -p no:cacheprovider tests/test_gpu_fast_path.py \
    -k "${FAST_K:-}" 2>&1 | tee "$OUT/test_gpu_fast_path.log" | grep -E "PASS|FAIL|ERROR|passed|failed|^E " | tail -40
  echo "## $(date -u +%T) fast path done"
  [ "${PACK_S:-300}" != 0 ] && timeout ${PACK_S:-300} python3 -m pytest -v --tb=short --durations=0 -p no:cacheprovider tests/test_gpu_packing.py 2>&1 \
    | tee "$OUT/test_gpu_packing.log" | grep -E "PASS|FAIL|ERROR|passed|failed|Error|^[0-9.]+s " | tail -20
  echo "## $(date -u +%T) packing done"
  ;;
grading)
  # GPT-OSS-20b-shaped whole grades, constrained, 64 at once (issue 14: >= 400/min), under cProfile
  # so the CPU side of each decoding step (grammar, masks, tokenizer) shows.
  timeout 200 python3 -m cProfile -o "$OUT/grading_20b.prof" bench/grading_speed.py --gpt-oss-20b-shaped \
    --skip-model --unit submission --decoding constrained --n 64 --batch-sizes 64 --max-new-tokens 256 --out "$OUT" \
    2>&1 | tee "$OUT/grading_20b.log" | tail -8
  python3 -c "import pstats; s=pstats.Stats('$OUT/grading_20b.prof'); s.sort_stats('tottime').print_stats(25); s.sort_stats('cumtime').print_stats(40)" \
    > "$OUT/grading_20b_profile.txt" 2>&1; head -c 5000 "$OUT/grading_20b_profile.txt" | tail -c 3500
  echo "## $(date -u +%T) grading done"
  ;;
items)
  # #29: batched + shared-prefix item grades equal the unbatched, unshared reference on the GPU
  # (eager and fused sink attention, fp32), then the 20b shape's forward-pass variants
  # (ITEM_VARIANTS) at ITEM_BATCHES, profiled (the last variant's table).
  timeout ${TEST_S:-120} python3 -m pytest -q -p no:cacheprovider tests/test_gpu_grading.py 2>&1 | tail -4
  echo "## $(date -u +%T) grading test done"
  timeout ${ITEM_S:-300} python3 bench/grading_speed.py --gpt-oss-20b-shaped --skip-model --unit item --n 256 \
    --batch-sizes ${ITEM_BATCHES:-256,512} --variants ${ITEM_VARIANTS:-eager,fused_sinks} --profile --out "$OUT" \
    2>&1 | tee "$OUT/items.log" | grep -E '^\{|Error' | cut -c1-150,250-560
  echo "## $(date -u +%T) items done"
  ;;
items120)
  # #29: the 120b's grading path (MXFP4 experts kept packed, as the engine loads a 120b on one card)
  # on a TWIN_LAYERS-layer 120b-layout twin (the device disk cannot hold all 36); model time scales
  # with the layers, so items/min at 36 layers ~ questions / (encode + model x 36 / TWIN_LAYERS).
  timeout ${TWIN_S:-150} python3 bench/launcher_twin.py --shape 120b --layers ${TWIN_LAYERS:-12} --out /root/twin120 2>&1 | tail -1
  echo "## $(date -u +%T) twin"
  timeout ${ITEM_S:-300} python3 bench/grading_speed.py --packed-twin /root/twin120 --skip-model --unit item --n 256 \
    --batch-sizes ${ITEM_BATCHES:-256,512} --variants ${ITEM_VARIANTS:-eager,fused_sinks} --out "$OUT" \
    2>&1 | tee "$OUT/items120.log" | grep -E '^\{|Error' | cut -c1-150,250-560
  nvidia-smi --query-gpu=memory.used --format=csv,noheader
  echo "## $(date -u +%T) items120 done"
  ;;
train20)
  # 20b bf16 toward 24k tokens/s at <= 44 GiB (attention) and 18k (attention + experts), same-run
  # stock row; the expert rows ran eager inside their compiled layers until 9dc229f (8.3k).
  timeout 330 python3 bench/gpu_lora_bench.py --name h200_round2b --out "$OUT/h200_20b.json" --shapes 20b --seqs 2048 \
    --loras attention+experts,attention --impls stock,project --stock-batches 4 --batches 4,8 \
    --recompute full+compile --compile-batches 4,8 --mem-limit-gib 44 --steps 4 --warmup 2 --budget-s 280 \
    --profile-dir "$OUT/profiles" --memory-peak \
    2>&1 | tee "$OUT/bench_20b.log" | grep -E "^ROW|Error" | cut -c1-420
  head -12 "$OUT"/profiles/*.txt 2>/dev/null | cut -c1-200
  echo "## $(date -u +%T) bench done"
  ;;
train120)
  # 120b NF4 experts within 65 GiB (>= 8k tokens/s wanted): compiled layers with the NF4 GEMM as a
  # custom op (93aa8ff) against eager, batch 4 and 6.
  timeout 360 python3 bench/gpu_lora_bench.py --name h200_nf4b --out "$OUT/h200_120b.json" --shapes 120b --seqs 2048 \
    --loras attention --impls project --batches 4,6 --recompute full+compile,full --compile-batches 4,6 \
    --mem-limit-gib 65 --steps 4 --warmup 2 --budget-s 310 --profile-dir "$OUT/profiles" 2>&1 | tee "$OUT/bench_120b.log" | grep -E "^ROW|Error" | cut -c1-420
  head -12 "$OUT"/profiles/*.txt 2>/dev/null | cut -c1-200
  echo "## $(date -u +%T) bench done"
  ;;
train20mx)
  # 20b toward 24k tokens/s at <= 44 GiB. bf16 experts hold 35.6 of the 39 GiB of weights, so
  # every layer is recomputed (6 x active params a token); experts in MXFP4, the checkpoint's own
  # format (8.9 GiB), leave room to keep activations (4 x when nothing is recomputed). The bf16
  # rows (TF32 LoRA matmuls, compiled loss chunk; same-run stock row) unless MX_ONLY=1; then MXFP4
  # rows, one bench call per line of MX_ROWS ("loras batches recompute"; a row's first step
  # compiles for ~90 s without recomputation); MX_PROFILE=1: each row's GPU time by kernel family.
  if [ -z "${MX_ONLY:-}" ]; then
  timeout 200 python3 bench/gpu_lora_bench.py --name h200_round2c --out "$OUT/h200_20b.json" --shapes 20b --seqs 2048 \
    --loras attention,attention+experts --impls stock,project --stock-batches 4 --batches 4 \
    --recompute full+compile --compile-batches 4 --mem-limit-gib 44 --steps 4 --warmup 2 --budget-s 170 \
    2>&1 | tee "$OUT/bench_20b.log" | grep -E "^ROW|Error|^weights" | cut -c1-420
  echo "## $(date -u +%T) bf16 done"
  fi
  n=0
  while read -r loras batches rc; do
    [ -z "$loras" ] && continue
    n=$((n+1))
    timeout ${MX_S:-330} python3 bench/gpu_lora_bench.py --name h200_round2c --out "$OUT/h200_20b_mx$n.json" --shapes 20b \
      --seqs 2048 --quant mxfp4 --loras $loras --impls project --batches $batches --recompute $rc --compile-batches $batches \
      --mem-limit-gib 44 --steps 4 --warmup 2 --budget-s ${MX_BUDGET:-290} ${MX_PROFILE:+--profile-dir "$OUT/profiles"} \
      2>&1 | tee "$OUT/bench_20b_mx$n.log" \
      | grep -E "^ROW|Error|^weights|SKIP" | cut -c1-420 | sed -E 's/"(gpu|gpus|shape|layers|seq|date|weights_gib|experts_gib|experts_format|rest_gib|variant)": [^,]*, //g'
    [ -n "${MX_PROFILE:-}" ] && head -14 "$OUT"/profiles/*.txt 2>/dev/null | cut -c1-200
    echo "## $(date -u +%T) mxfp4 $loras $batches $rc done"
  done <<< "${MX_ROWS:-attention 4,8 none+compile,12+compile}"
  ;;
launcher20)
  # What users run (#15 item 4, >= 20,000 real tokens/s): the h200-20b preset through the real
  # deepspeed launcher on the full 24-layer 20b-layout twin (13.8 GB MXFP4, written here, ~27 s).
  timeout 60 python3 bench/launcher_twin.py --shape 20b --out /root/twin24 2>&1 | tail -1
  echo "## $(date -u +%T) twin"
  export GRADER_CHECKPOINTS=/root/ckpt
  # the preset as shipped (MXFP4 experts, no recomputation, micro-batch 8 x accumulation 2);
  # LAUNCH_MB=8x2,4x4 tries other splits of the same 16 rows a step
  for mb in $(echo "${LAUNCH_MB:-8x2}" | tr ',' ' '); do
    set -- ${mb/x/ }; tag="mb$1"
    timeout ${LAUNCH_S:-330} python3 -m training run --preset h200-20b --set model=/root/twin24 --set max_steps=8 \
      --set save_every_steps=8 --set eval_fraction=0 --set per_device_batch_size=$1 \
      --set gradient_accumulation_steps=$2 > "$OUT/launcher20_$tag.log" 2>&1; echo "## $tag rc=$?"
    grep -E "loaded in|fast path|packing|step [0-9]+/|Error|error" "$OUT/launcher20_$tag.log" | cut -c1-300 | tail -14
    f=$(ls -t /root/ckpt/*/train.log 2>/dev/null | head -1); [ -n "$f" ] && cp "$f" "$OUT/launcher20_${tag}_train.log"
  done
  echo "## $(date -u +%T) launcher done"
  ;;
launcher120)
  # #15 item 4, the 120b: the h200-120b preset (NF4 experts packed while loading, recomputation,
  # 6 x 2 rows a step) through the real launcher on a reduced-layer 120b-layout twin (the device
  # disk is 64 GiB; 6 layers = 12.8 GB MXFP4), projected to 36 layers by the layer count.
  timeout ${TWIN_S:-120} python3 bench/launcher_twin.py --shape 120b --layers ${TWIN_LAYERS:-6} --out /root/twin120 2>&1 | tail -1
  echo "## $(date -u +%T) twin"
  export GRADER_CHECKPOINTS=/root/ckpt
  timeout ${LAUNCH_S:-330} python3 -m training run --preset h200-120b --set model=/root/twin120 --set max_steps=8 \
    --set save_every_steps=8 --set eval_fraction=0 > "$OUT/launcher120.log" 2>&1; echo "## rc=$?"
  grep -E "loaded in|memory held|fast path|packing|step [0-9]+/|Error|error" "$OUT/launcher120.log" | cut -c1-300 | tail -14
  f=$(ls -t /root/ckpt/*/train.log 2>/dev/null | head -1); [ -n "$f" ] && cp "$f" "$OUT/launcher120_train.log"
  # each step's peak GPU memory is in metrics.jsonl (peak_mem_gib), not in train.log
  [ -n "$f" ] && cp "$(dirname "$f")/metrics.jsonl" "$OUT/launcher120_metrics.jsonl" && grep -o '"peak_mem_gib": [0-9.]*' "$OUT/launcher120_metrics.jsonl" | tail -2
  echo "## $(date -u +%T) launcher done"
  ;;
*) echo "usage: $0 grading|tests|train20|train120|launcher20|train20mx|launcher120"; exit 2;;
esac
