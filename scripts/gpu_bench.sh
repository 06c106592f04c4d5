#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md (issue 6): JAX and PyTorch in the same device call, on one GPU.
#
# Prepare here (the GPU image has jax, flax, optax, orbax, torch, torchvision, but no ml_collections;
# flax travels too, installed there only if the image's is older than the 0.12 this code needs;
# .whl/ is git-ignored, so it travels only when named in carry):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl ml_collections==1.1.0
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl/flax flax==0.12.8
# Then device calls back to back while the machine is warm; the first argument is the call's budget
# in seconds, to fit its timeout_s and the device time left; further arguments, if any, name the
# only items to run (see the list at the end):
#   run(command="bash scripts/gpu_bench.sh 535", carry=[".whl"], timeout_s=565)
#   run(command="bash scripts/gpu_bench.sh <budget_left_s - 60>", carry=[".whl"], timeout_s=<that + 25>)
# (On 2026-11-27 a 15-minute lease left 334 s after the first call; the second ran 275 s.)
# The measurements run in order of importance. Each runs under its own cap and never past the
# call's deadline; one that would not get its minimum time waits for the next call, which goes on
# where this one stopped (markers in /tmp survive while the machine stays warm). Each command
# writes its JSON after every measurement, so a command cut off keeps what it measured; all rows
# so far come back as $OUT/gpu_rows.json (a call returns at most 8 files).
# JAX and each PyTorch mode run in separate processes, so none holds GPU memory another needs.
# Random images stand in for CIFAR-100: throughput does not depend on pixel values, and the real
# npz (167 MB) exceeds what one call can carry.
set -uo pipefail
deadline=$((SECONDS + ${1:-540}))
only=" ${*:2} "
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/gpu_bench}
done_dir=/tmp/gpu_bench_done json_dir=/tmp/gpu_bench_json
mkdir -p "$OUT" "$done_dir" "$json_dir"
log="$OUT/gpu.log"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
if ! python3 -c "import flax, sys; sys.exit(tuple(map(int, flax.__version__.split('.')[:2])) < (0, 12))"; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/flax/*.whl || exit 1
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } | tee -a "$log"
python3 -c "import jax, flax, optax, torch, torchvision; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__, jax.devices())" 2>&1 | tee -a "$log"

# item NAME MIN_S CAP_S CMD...: run CMD once (across calls) for at most CAP_S seconds, never past the
# deadline; with less than MIN_S left, stop this call and leave it and the rest to the next.
item() {
  local name=$1 min=$2 cap=$3 left=$((deadline - SECONDS))
  shift 3
  [ -e "$done_dir/$name" ] && return 0
  [ "$only" != "  " ] && [[ "$only" != *" $name "* ]] && return 0
  if [ "$left" -lt "$min" ]; then echo "$(date -u +%T) stopping with ${left}s left: $name and the rest go to the next call" | tee -a "$log"; exit 0; fi
  echo "$(date -u +%T) $name: $*" | tee -a "$log"
  timeout "$(( cap < left ? cap : left ))" "$@" 2>&1 | tee -a "$log"
  local rc=$?
  echo "$(date -u +%T) $name: exit $rc" | tee -a "$log"
  # cut off by the deadline rather than its own cap: the next call runs it again with more time
  if [ "$rc" = 124 ] && [ $((deadline - SECONDS)) -le 1 ] && [ "$cap" -gt "$left" ]; then exit 0; fi
  touch "$done_dir/$name"
}
# every row measured so far, over all calls, into one file
collect() { python3 -c "import glob, json, sys; json.dump([r for f in sorted(glob.glob(sys.argv[1] + '/*.json')) for r in json.load(open(f))], open(sys.argv[2], 'w'), indent=1)" "$json_dir" "$OUT/gpu_rows.json"; }
trap collect EXIT
table=(python3 -m cifar_jax.bench --steps 64 --warmup 3)

# The table: train, eval and the input pipeline; PyTorch eager, with CUDA graphs, and torch.compile
# (last: CUDA graphs are torch.compile plus graph replay, so rarely slower). 32x32 first, ResNet-50
# (the part-3 model) and the real trainer on its config right after SimpleCNN.
case_items() {  # case_items CASE ITEM...: ITEM is jax or a PyTorch mode
  local case=$1 n=${1/@/_} side
  for side in "${@:2}"; do
    if [ "$side" = jax ]; then
      # the pipeline's share: SimpleCNN only (10% alone on 2026-11-27, the ResNets 0.75-1.00%); its
      # in-step measurement compiles the training chunk a second time (fed prepared batches)
      local modes=train,eval
      [ "$case" = simple_cnn@32 ] && modes=train,eval,pipeline
      item "jax_$n" 40 200 "${table[@]}" --modes "$modes" --cases "$case" --frameworks jax --out "$json_dir/jax_$n.json"
    else
      item "${side}_$n" 30 200 "${table[@]}" --modes train,eval --cases "$case" --frameworks torch --torch_modes "$side" --out "$json_dir/${side}_$n.json"
    fi
  done
}
# issue 33: the launches and the estimate of the programs measured below, compiled for this GPU
# (python -m cifar_jax.bench.gpu_program; its rows carry "launches" and "estimate_ms")
target=h100; nvidia-smi --query-gpu=name --format=csv,noheader | grep -qi h200 && target=h200
item gpu_program 30 150 python3 -m cifar_jax.bench.gpu_program --target "$target" --cases simple_cnn@32,resnet34@32,resnet50@32 --modes train,eval --json "$json_dir/gpu_program.json"
case_items simple_cnn@32 jax eager cudagraphs
# issue 34: populations of 1, 8 and 32 members in the real trainer, SimpleCNN (the tuned recipe) and
# ResNet-18 @32 (the recipe), 2 epochs of 50,000 random images; a row per run with each member's
# images/s in epoch 2 (metrics.jsonl's train_img_per_s, the same in every member)
population() {  # population CONFIG MEMBERS
  local seeds name; seeds=$(python3 -c "print(','.join(map(str, range($2))))"); name=$(basename "$1" .py)
  rm -rf /tmp/pop && python3 train.py --config "$1" --config.data.source=fake \
    --config.data.fake.num_train=50000 --config.data.fake.num_test=10000 --config.num_epochs=2 \
    --config.schedule.warmup_epochs=0 --config.population.seeds="$seeds" --workdir /tmp/pop --noprogress \
    && python3 -c "import json, sys; rows = [json.loads(l) for l in open('/tmp/pop/member_0/metrics.jsonl')]; json.dump([{'case': sys.argv[1], 'mode': 'population', 'population': int(sys.argv[2]), 'img_per_s_per_member': rows[-1]['train_img_per_s'], 'epoch_time_s': rows[-1]['epoch_time_s'], 'compile_s': rows[0].get('compile_s')}], open(sys.argv[3], 'w'))" \
      "$name" "$2" "$json_dir/population_${name}_$2.json"
}
export -f population
export json_dir
for members in 1 8 32; do
  item "population_simple_cnn_$members" 40 120 bash -c "population configs/simple_cnn_tuned.py $members"
  item "population_resnet18_$members" 60 200 bash -c "population configs/resnet18_recipe.py $members"
done
case_items resnet50@32 jax eager cudagraphs
# issue 33: the device programs ask XLA for CUDA graphs of runs of 2 or more kernels
# (steps.xla_options; XLA's default is 5): ResNet-50 @32 again with XLA's default, to time the choice
item jax_resnet50_32_graphs_of_5 40 200 env XLA_FLAGS=--xla_gpu_graph_min_graph_size=5 "${table[@]}" --modes train,eval --cases resnet50@32 --frameworks jax --out "$json_dir/jax_resnet50_32_graphs_of_5.json"
# issue 33: XLA replays runs of kernels as CUDA graphs, but its cuDNN convolutions end each run, and
# an evaluation batch holds no graph at all; as cuDNN fusions (experimental) the convolutions join
# the graph: each whole step and batch is one graph, with more kernels (bias and ReLU leave them).
# The same measurement with that flag; its rows carry it in "xla_flags".
item jax_resnet50_32_conv_fusion 40 200 env XLA_FLAGS=--xla_gpu_experimental_enable_conv_fusion=true "${table[@]}" --modes train,eval --cases resnet50@32 --frameworks jax --out "$json_dir/jax_resnet50_32_conv_fusion.json"
# issue 33: evaluation's GEMMs on cuBLAS, which fuses their bias and ReLU (after Triton each is one
# more kernel), in batches of 512 (a multiple of 8: cuBLAS pads no copy of each batch): on the H100
# target ResNet-50 @32 goes from 76 to 68 kernels a batch, but SimpleCNN's one graph breaks (host
# launches 9 -> 15). Not adopted until timed: both batches of 512, Triton's then cuBLAS's.
item jax_eval_512 30 120 "${table[@]}" --modes eval --cases simple_cnn@32,resnet50@32 --frameworks jax --eval_batch_size 512 --out "$json_dir/jax_eval_512.json"
item jax_eval_512_cublas 30 120 env XLA_FLAGS=--xla_gpu_enable_triton_gemm=false "${table[@]}" --modes eval --cases simple_cnn@32,resnet50@32 --frameworks jax --eval_batch_size 512 --out "$json_dir/jax_eval_512_cublas.json"
# issue 19: the ResNets' layers as XLA's stock operations (what GPUs run) against the CPU kernels
# (custom gradients, matmul forms), in one process each, right after each other
item layers_stock 40 150 "${table[@]}" --modes train,eval --cases resnet34@32,resnet50@32,resnet50@224 --frameworks jax --jax_layers stock --out "$json_dir/layers_stock.json"
item layers_cpu_kernels 40 150 "${table[@]}" --modes train,eval --cases resnet34@32,resnet50@32,resnet50@224 --frameworks jax --jax_layers cpu_kernels --out "$json_dir/layers_cpu_kernels.json"
# the real trainer on the part-3 config (random weights and CIFAR-sized random data: no download
# there): compile, epoch times and img/s of both phases, checkpoints every epoch, and where each
# epoch's time went (val_s, host_s, checkpoint_s) in metrics.jsonl; then the same run (compilation
# cached) with the host's end-of-epoch work not overlapped (run_ahead_chunks=0), with a whole epoch
# run ahead (24 calls of 13 steps), and with a checkpoint every 5 epochs only (what saving costs)
train_ft() {  # train_ft NAME RUN_AHEAD_CHUNKS CHECKPOINT_EVERY_EPOCHS
  rm -rf /tmp/ft && python3 train.py --config configs/resnet50_ft.py --config.model.pretrained= \
    --config.data.source=fake --config.data.fake.num_train=50000 --config.data.fake.num_test=10000 \
    --config.num_epochs=8 --config.head_only_epochs=1 --config.run_ahead_chunks="$2" \
    --config.checkpoint.every_epochs="$3" --workdir /tmp/ft --noprogress \
    && cp /tmp/ft/metrics.jsonl "$OUT/gpu_$1_metrics.jsonl"
}
export -f train_ft
export OUT
item train_ft 90 400 bash -c "train_ft train_ft 4 1"
item train_ft_no_run_ahead 30 150 bash -c "train_ft train_ft_no_run_ahead 0 1"
item train_ft_run_ahead_epoch 30 150 bash -c "train_ft train_ft_run_ahead_epoch 24 1"
item train_ft_checkpoint_every_5 30 150 bash -c "train_ft train_ft_checkpoint_every_5 4 5"
case_items resnet34@32 jax eager cudagraphs
case_items resnet50@224 jax eager cudagraphs
# whole 40,000-image epochs with the input pipeline, ours against the DataLoader (workers = cores)
item epoch_resnet50_32 60 150 python3 -m cifar_jax.bench --cases resnet50@32 --modes epoch --epoch_images 40000 --torch_modes eager --out "$json_dir/epoch_resnet50_32.json"
# where the device's time goes in ResNet-50's training step and evaluation (at 32 half PyTorch's
# speed with CUDA graphs on 2026-11-27): busy share and top kernels (jax.profiler)
for case in resnet50@32 resnet50@224; do
  item "profile_${case/@/_}" 30 150 python3 -m cifar_jax.bench --cases "$case" --modes train,eval --frameworks jax --steps 13 --warmup 2 --profile /tmp/gpu_profile --out "$json_dir/profile_${case/@/_}.json"
done
for case in simple_cnn@32 resnet50@32 resnet34@32 resnet50@224; do case_items "$case" compile; done
# dispatch: one step per jitted call against the default fusion of several
item one_step_per_call 40 90 python3 -m cifar_jax.bench --cases resnet50@32 --modes train --frameworks jax --steps_per_call 1 --steps 64 --out "$json_dir/one_step_per_call.json"
# and one eval batch per call against a whole 10,000-image split per call (the default)
item one_eval_batch_per_call 30 90 python3 -m cifar_jax.bench --cases simple_cnn@32,resnet50@32 --modes eval --frameworks jax --eval_batches_per_call 1 --steps 64 --out "$json_dir/one_eval_batch_per_call.json"
item epoch_simple_cnn_32 40 90 python3 -m cifar_jax.bench --cases simple_cnn@32 --modes epoch --epoch_images 40000 --torch_modes eager --out "$json_dir/epoch_simple_cnn_32.json"
echo "$(date -u +%T) all done" | tee -a "$log"
