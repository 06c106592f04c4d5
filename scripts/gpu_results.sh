#!/usr/bin/env bash
# Real-data training runs for RESULTS.md (issue 20) on one GPU: the ResNet recipe, the study's part 2,
# and part 3's epoch time. The real CIFAR-100 (167 MB) travels in three pieces of about 53 MiB,
# one per device call (a call carries at most 64 MiB); ignored files an earlier call left stay
# while the machine is warm, and every run resumes from its checkpoints, so consecutive calls go
# on where the last one stopped.
#
# Prepare here (git-ignored folders; the GPU image has no ml_collections):
#   python scripts/cifar_pieces.py split ../shared/data/cifar100/cifar100.npz .data/cifar100 --pieces 3
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl ml_collections==1.1.0
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl/flax flax==0.12.8
# Then, back to back while the machine is warm (the first argument: this call's budget in seconds):
#   run(command="bash scripts/gpu_results.sh 20", carry=[".whl", ".data/cifar100/p0"], timeout_s=60)
#   run(command="bash scripts/gpu_results.sh 20", carry=[".data/cifar100/p1"], timeout_s=60)
#   run(command="bash scripts/gpu_results.sh <budget_left_s - 60>", carry=[".data/cifar100/p2"], timeout_s=<that + 30>)
#   run(command="bash scripts/gpu_results.sh <budget_left_s - 60>", timeout_s=<that + 30>)   # if time is left
# Each call brings back $OUT/gpu_results.log and, per finished or interrupted run, its metrics.jsonl,
# curves.png and the eval report of its checkpoint.
set -uo pipefail
deadline=$((SECONDS + ${1:-540}))
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/gpu_results}
runs=/tmp/gpu_runs data=/tmp/cifar100.npz
mkdir -p "$OUT" "$runs"
log="$OUT/gpu_results.log"
if [ ! -e /tmp/site/ml_collections ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  if ! python3 -c "import flax, sys; sys.exit(tuple(map(int, flax.__version__.split('.')[:2])) < (0, 12))"; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/flax/*.whl || exit 1
  fi
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } | tee -a "$log"
if [ ! -e "$data" ]; then
  python3 scripts/cifar_pieces.py join .data/cifar100 "$data" 2>&1 | tee -a "$log"
  [ -e "$data" ] || { echo "$(date -u +%T) waiting for the other pieces" | tee -a "$log"; exit 0; }
fi

# train NAME MIN_S CONFIG [OVERRIDES...]: train (or resume) on the real data until done or the
# deadline (SIGTERM: train.py saves where it is), then evaluate its checkpoint on the test split.
train() {
  local name=$1 min=$2 config=$3 left=$((deadline - SECONDS))
  shift 3
  [ -e "$runs/$name.done" ] && return 0
  if [ "$left" -lt "$min" ]; then echo "$(date -u +%T) ${left}s left: $name and the rest go to the next call" | tee -a "$log"; exit 0; fi
  echo "$(date -u +%T) $name: $config $*" | tee -a "$log"
  timeout -s TERM "$((left - 20))" python3 train.py --config "$config" --config.data.source=npz --config.data.path="$data" \
    --workdir "$runs/$name" --noprogress "$@" 2>&1 | grep -v "^\s*$" | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "$(date -u +%T) $name: train exit $rc" | tee -a "$log"
  mkdir -p "$OUT/$name"
  cp "$runs/$name"/metrics.jsonl "$runs/$name"/curves.png "$runs/$name"/config.json "$OUT/$name/" 2>/dev/null
  case "$rc" in
    0) ;;
    124|143) exit 0 ;;  # stopped by the deadline: the next call resumes it
    *) echo "$(date -u +%T) $name FAILED (exit $rc); going on with the next run" | tee -a "$log"; touch "$runs/$name.done"; return 0 ;;
  esac
  touch "$runs/$name.done"
  local ema=()  # a run that kept a weight average is evaluated with it
  python3 -c "import json, sys; sys.exit(not json.load(open(sys.argv[1])).get('ema_decay'))" "$runs/$name/config.json" && ema=(--ema)
  python3 eval.py --workdir "$runs/$name" --split test "${ema[@]}" --out "$runs/$name/eval" 2>&1 | tee -a "$log"
  cp "$runs/$name/eval/report.json" "$OUT/$name/" 2>/dev/null
}

train resnet18_recipe 120 configs/resnet18_recipe.py
train part2_resnet34 120 configs/resnet34.py
# part 3's epoch time with random weights (no ImageNet weights there): 2 head-only + 3 all-layer epochs
train part3_timing 60 configs/resnet50_ft.py --config.model.pretrained= --config.num_epochs=5 --config.head_only_epochs=2
train part3_recipe_timing 60 configs/resnet50_ft_recipe.py --config.model.pretrained= --config.num_epochs=3
echo "$(date -u +%T) all done" | tee -a "$log"
