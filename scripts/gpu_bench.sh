#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one device call (issue 6), JAX and PyTorch in the same run.
#
# Prepare here (the GPU image has jax, flax, optax, orbax, torch, torchvision, but no ml_collections):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl ml_collections==1.1.0
# Then: run(command="bash scripts/gpu_bench.sh", carry=[".whl"], timeout_s=540)
# Results come back in $OUT (gpu_*.json, gpu_bench.log). Random images stand in for CIFAR-100 in
# the epoch mode: throughput does not depend on pixel values, and the real npz exceeds a call's carry.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
log="$OUT/gpu_bench.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
# The code needs flax >= 0.12 (nnx.List); an older image flax would have to travel as a wheel too.
python3 -c "import jax, flax, optax, orbax.checkpoint as o, torch, torchvision; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())" 2>&1 | tee -a "$log"
bench() { timeout "$1" python3 -m cifar_jax.bench "${@:2}" 2>&1 | tee -a "$log"; }
# 1. the table: train and eval for every default case, PyTorch eager and torch.compile
bench 300 --modes train,eval,pipeline --steps 64 --warmup 5 --out "$OUT/gpu_table.json"
# 2. whole epochs with the input pipeline (40,000 images at 32x32), ours against the DataLoader
bench 150 --cases simple_cnn@32,resnet50@32 --modes epoch --epoch_images 40000 --torch_modes eager --out "$OUT/gpu_epoch.json"
# 3. dispatch: one step per jitted call against the default fusion of several
bench 60 --cases resnet50@32 --modes train --frameworks jax --steps_per_call 1 --steps 64 --out "$OUT/gpu_one_step_per_call.json"
