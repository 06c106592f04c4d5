#!/usr/bin/env bash
# Real-data training runs for RESULTS.md on one GPU: the study command with this call's budget.
# The real CIFAR-100 (167 MB) travels in three pieces of about 53 MiB, one per device call (a call
# carries at most 64 MiB); ignored files an earlier call left stay while the machine is warm, and
# every run resumes from its checkpoints, so consecutive calls go on where the last one stopped.
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
# Each call brings back $OUT/gpu_results.log and the study's records and report.md ($OUT/study):
# `python -m cifar_jax.study report --records <files_at>/study/records --out RESULTS.md` puts them in.
set -uo pipefail
deadline=$((SECONDS + ${1:-540}))
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/gpu_results}
data=/tmp/cifar100.npz
mkdir -p "$OUT"
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

# The study (python -m cifar_jax.study), the most valuable first: the ResNet-18 recipe, then part 2;
# at the deadline the run in progress saves where it is and the next call resumes it. Part 3 needs
# ImageNet weights, which cannot be downloaded there. The records and report come back in $OUT.
python3 -m cifar_jax.study --parts recipes,2 --seeds 0 --data "$data" --out /tmp/study \
  --budget $((deadline - SECONDS - 15)) 2>&1 | tee -a "$log"
mkdir -p "$OUT/study"
cp -r /tmp/study/records /tmp/study/report.md "$OUT/study/" 2>/dev/null
echo "$(date -u +%T) this call is done" | tee -a "$log"
