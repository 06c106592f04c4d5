"""What the benchmark measures: the cases (a model at an image size), the options' valid values,
and the images it trains on."""

from __future__ import annotations

import dataclasses

import numpy as np

MODELS = {  # bench name -> (architecture, stem)
    "simple_cnn": ("simple_cnn", None),
    "resnet18": ("resnet18", "cifar"),
    "resnet34": ("resnet34", "cifar"),
    "resnet50": ("resnet50", "imagenet"),
}
DEFAULT_CASES = "simple_cnn@32,resnet34@32,resnet50@32,resnet50@224"
MODES = ("train", "eval", "epoch", "pipeline")
FRAMEWORKS = ("jax", "torch")
TORCH_MODES = ("eager", "compile", "cudagraphs")
# auto: the CPU kernels on CPU, XLA's stock operations elsewhere.
JAX_LAYERS = ("auto", "stock", "cpu_kernels")
NUM_CLASSES = 100
NUM_TRAIN = 40_000  # CIFAR-100's training split after the validation split: sets the steps fused per call
NUM_EVAL = 10_000  # the validation split (and the test set): sets the eval batches fused per call
LR, WEIGHT_DECAY, LABEL_SMOOTHING, COLOR_JITTER = 1e-3, 5e-4, 0.1, (0.2, 0.2, 0.2)


class BenchError(ValueError):
    """Bad options, found before anything is measured."""


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    image_size: int

    @property
    def arch(self) -> str:
        return MODELS[self.model][0]

    @property
    def stem(self):
        return MODELS[self.model][1]

    @property
    def options(self) -> dict:
        """The model's options (`models.create`, `models.torch_twin`)."""
        return {"stem": self.stem} if self.stem else {}

    def __str__(self):
        return f"{self.model}{f' ({self.stem} stem)' if self.stem else ''} @{self.image_size}"


def parse_cases(cases: str, models: str | None, sizes: str | None) -> list[Case]:
    """`model@size` entries, kept where the model is in `models` and the size in `sizes` (if given)."""
    from cifar_jax import models as architectures

    out = []
    for entry in _split(cases):
        model, _, size = entry.partition("@")
        if model not in MODELS:
            raise BenchError(f"unknown model {model!r} in {entry!r}; valid: {', '.join(MODELS)}")
        arch = architectures.MODELS[MODELS[model][0]]
        if not size.isdigit():
            low = arch.min_image_size
            raise BenchError(f"case {entry!r} needs an image size of at least {low}, like {model}@{low}")
        if not arch.takes_image_size(int(size)):
            raise BenchError(f"case {entry!r}: {arch.name} takes {arch.image_sizes}")
        out.append(Case(model, int(size)))
    if models:
        wanted = _split(models)
        for m in wanted:
            if m not in MODELS:
                raise BenchError(f"--models: unknown model {m!r}; valid: {', '.join(MODELS)}")
        missing = [m for m in wanted if m not in {c.model for c in out}]
        out = [c for c in out if c.model in wanted] + [Case(m, 32) for m in missing]
    if sizes:
        wanted_sizes = {int(s) for s in _split(sizes)}
        out = [c for c in out if c.image_size in wanted_sizes]
    if not out:
        raise BenchError("no case left to measure: check --cases, --models and --sizes")
    return out


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def choices(flag: str, text: str, valid) -> list[str]:
    chosen = _split(text)
    for c in chosen:
        if c not in valid:
            raise BenchError(f"{flag}: unknown value {c!r}; valid: {', '.join(valid)}")
    return chosen


def random_uint8(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, NUM_CLASSES, n).astype(
        np.int32
    )


def num_train(modes, epoch_data) -> int:
    return len(epoch_data[0]) if "epoch" in modes else NUM_TRAIN


def load_epoch_data(opts):
    """(uint8 images, labels) of one training epoch: the real training split or random images."""
    if opts.data:
        from cifar_jax import config as config_lib
        from cifar_jax import data

        data_config = config_lib.base().data  # the training split train.py would use
        data_config.source, data_config.path = "npz", opts.data
        return data.load_splits(data_config).train
    return random_uint8(opts.epoch_images, seed=1)
