#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md (issue 6): JAX and PyTorch in the same run, on one GPU.
#
# Prepare here (the GPU image has jax, flax, optax, orbax, torch, torchvision, but no ml_collections;
# .whl/ is git-ignored, so it travels only when named in carry):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl ml_collections==1.1.0
# Then two device calls, back to back while the machine is warm; the second argument is the part's
# budget in seconds (default 540), to fit the call's timeout_s and the device time left:
#   run(command="bash scripts/gpu_bench.sh table 540", carry=[".whl"], timeout_s=560)
#   run(command="bash scripts/gpu_bench.sh epoch 300", carry=[".whl"], timeout_s=320)
# Each command runs under a cap and the part's deadline, the last one with all the time left, and
# writes its own JSON into $OUT, so a command cut off loses only itself.
# Random images stand in for CIFAR-100 in the epoch mode: throughput does not depend on pixel
# values, and the real npz (167 MB) exceeds what one call can carry.
set -uo pipefail
part=${1:?usage: gpu_bench.sh table|epoch [budget_s]}
deadline=$((SECONDS + ${2:-540}))
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
log="$OUT/gpu_$part.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
# The code needs flax >= 0.12 (nnx.List); an older image flax would have to travel as a wheel too.
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())" 2>&1 | tee -a "$log"
# capped CAP CMD...: run CMD for at most CAP seconds and never past the deadline
capped() {
  local left=$((deadline - SECONDS))
  if [ "$left" -le 5 ]; then echo "skipped (no time left): ${*:2}" | tee -a "$log"; return; fi
  timeout "$(( $1 < left ? $1 : left ))" "${@:2}" 2>&1 | tee -a "$log"
}
bench() { capped "$1" python3 -m cifar_jax.bench "${@:2}"; }
if [ "$part" = table ]; then
  # train and eval, PyTorch eager and torch.compile, one case per process
  # ResNet-50 at 224 (two torch.compile runs at 224) is the heaviest: last, with all the time left
  for case in simple_cnn@32:90 resnet34@32:120 resnet50@32:130 resnet50@224:600; do
    name=${case%:*}
    bench "${case#*:}" --cases "$name" --modes train,eval,pipeline --steps 64 --warmup 5 --out "$OUT/gpu_${name/@/_}.json"
  done
else
  # whole 40,000-image epochs with the input pipeline, ours against the DataLoader (workers = cores)
  bench 180 --cases simple_cnn@32,resnet50@32 --modes epoch --epoch_images 40000 --torch_modes eager --out "$OUT/gpu_epoch.json"
  # dispatch: one step per jitted call against the default fusion of several
  bench 60 --cases resnet50@32 --modes train --frameworks jax --steps_per_call 1 --steps 64 --out "$OUT/gpu_one_step_per_call.json"
  # the real trainer on the part-3 config (random weights and CIFAR-sized random data: no download
  # there): compile, first step, epoch time and img/s of both phases in metrics.jsonl
  capped 600 python3 train.py --config configs/resnet50_ft.py --config.model.pretrained= \
      --config.data.source=fake --config.data.fake.num_train=50000 --config.data.fake.num_test=10000 \
      --config.num_epochs=3 --config.head_only_epochs=1 --workdir /tmp/ft --noprogress
  [ -f /tmp/ft/metrics.jsonl ] && cp /tmp/ft/metrics.jsonl "$OUT/gpu_train_ft_metrics.jsonl"
fi
