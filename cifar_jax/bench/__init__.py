"""Throughput of this project against PyTorch, on the same machine, in the same run:

    python -m cifar_jax.bench [--models simple_cnn,resnet34] [--sizes 32] [--modes train,eval]
                              [--frameworks jax,torch] [--batch_size 128] [--steps 20] [--out FILE]

Cases are a model at an image size (default: SimpleCNN, ResNet-34 with the CIFAR stem and
ResNet-50 with the ImageNet stem at 32x32, and ResNet-50 at 224x224). For each case and mode:

  train     training steps. JAX: the trainer's jitted step, which also draws, augments (crop,
            flip, colour jitter) and resizes its batch on the device; PyTorch: the torchvision
            model's step on a batch already on the device. Same global batch, AdamW, label-smoothed
            cross-entropy on both sides.
  eval      forward passes in eval mode, batches of `--eval_batch_size`: as many per jitted call
            as the trainer fuses for a 10,000-image split (all 20 at batch 500), at most `--steps`.
  epoch     one whole training epoch including the input pipeline: ours on the device against
            PyTorch's DataLoader (workers = cores) with torchvision transforms on PIL images, as
            in the study's starter loop. `--data` takes the CIFAR-100 npz (its 40,000-image
            training split); without it, `--epoch_images` random images.
  pipeline  (JAX only) our input pipeline's share of a training step: timed alone (an upper
            bound), and in the step (the step against the same step fed batches prepared beforehand).

`--profile DIR` traces two more JAX training windows and two more evaluation windows (of the modes
run) with jax.profiler and prints how much of the traced time the device was busy and which
kernels took it (cifar_jax/profiling.py).

Throughput is the median over timed windows after warm-up (JAX: one window is one jitted call of
`steps_per_call` steps, or of the eval batches fused per call; PyTorch: the same number of steps
or batches). Where the work runs asynchronously
(JAX; PyTorch on a GPU) each timed window starts before the previous one is waited for, as in a
training loop without host syncs, and lasts from the end of the one before to its own end.
Compile time is reported apart: the first window's time minus a steady one. PyTorch runs at its best on the
device: channels_last; on GPU also bf16 autocast, cudnn.benchmark, fused AdamW, and three modes:
eager, torch.compile, and torch.compile(mode="reduce-overhead"), which replays CUDA graphs and so
removes the per-kernel launch cost that bounds small models (`--torch_modes`; the table's ratio
uses the fastest). JAX computes in bf16 on GPUs as the trainer does.

All PyTorch measurements run first, then all JAX ones: DataLoader workers are forked before
JAX starts its threads, and GPU memory held by PyTorch is released before JAX allocates.
"""

import importlib

# Each public name and its module, imported when first used: `python -m cifar_jax.bench` imports this
# package before its __main__, whose first line defers a Ctrl-C during the heavy imports that follow.
_EXPORTS = {
    "DEFAULT_CASES": "cases",
    "BenchError": "cases",
    "Case": "cases",
    "parse_cases": "cases",
    "random_uint8": "cases",
    "main": "cli",
    "parse_args": "cli",
    "JaxSide": "jax_side",
    "table": "report",
    "row": "timing",
    "timed_windows": "timing",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
