"""The configuration every experiment shares (`base()`), and its validation (`validate`).

Config files in `configs/` start from `base()` and change what their experiment needs. ConfigDict
rejects unknown keys, so a typo in `--config.KEY=VALUE` fails at once. `validate` checks values
before any data is loaded or anything compiled, and says in one line what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from cifar_jax import models
from cifar_jax.data import SOURCES, augment
from cifar_jax.errors import read_json_object

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "step", "cosine", "linear")
DTYPES = ("auto", "float32", "bfloat16")
MAX_EPOCHS = 100_000


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_epochs = 10  # all phases together
    c.batch_size = 128  # global, over all devices
    c.eval_batch_size = 500
    c.label_smoothing = 0.0
    # > 0: keep an exponential moving average of the weights and BatchNorm statistics (e.g. 0.999)
    c.ema_decay = 0.0
    # training steps per jitted call (lax.fori_loop); 0 = automatic (up to 4 on CPU, 16 on GPU)
    c.steps_per_call = 0
    c.eval_batches_per_call = 0  # evaluation batches per jitted call; 0 = automatic (a whole split)
    # calls the host lets run ahead of it (chunks, and an epoch end while the next epoch runs); 0 = none
    c.run_ahead_chunks = 4
    c.distributed = False  # jax.distributed.initialize() for multi-process runs

    c.model = ml_collections.ConfigDict()
    c.model.name = "simple_cnn"
    c.model.num_classes = 100
    c.model.stem = "cifar"  # ResNets only: 'imagenet' or 'cifar'
    c.model.dtype = "auto"  # compute dtype: 'auto' = bfloat16 on GPU/TPU, float32 on CPU
    c.model.pretrained = ""  # directory written by `python -m cifar_jax.convert`

    # Phase 1 of a two-phase fine-tune: only the classifier head trains, for this many epochs.
    c.head_only_epochs = 0
    c.head_only_lr = 1e-3
    # How the frozen backbone's BatchNorm runs in phase 1: 'frozen' (eval mode: the pretrained running
    # statistics, left unchanged) or 'train' (batch statistics, running statistics updated: what
    # PyTorch does with requires_grad=False under model.train(), as the study did).
    c.head_only_batchnorm = "frozen"

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"
    c.data.path = ""
    c.data.image_size = 32
    c.data.val_fraction = 0.2
    c.data.split_seed = 0
    c.data.normalization = "cifar"
    # mixup_alpha / cutmix_alpha > 0: torchvision.transforms.v2 MixUp / CutMix on each batch (both: one of
    # them per batch).
    c.data.augment = ml_collections.ConfigDict(
        dict(crop_padding=4, flip=True, color_jitter=(0.0, 0.0, 0.0), mixup_alpha=0.0, cutmix_alpha=0.0)
    )
    c.data.fake = ml_collections.ConfigDict(dict(num_train=512, num_test=128, num_classes=100, image_size=32))

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.momentum = 0.9  # sgd only
    c.optimizer.nesterov = False  # sgd only
    c.optimizer.decay_norm_and_bias = True  # False: no weight decay on BatchNorm scales/biases and biases
    c.optimizer.clip_norm = 0.0  # > 0: clip the gradients' global norm first (torch.nn.utils.clip_grad_norm_)
    c.optimizer.accumulate_steps = 1  # > 1: batch_size in this many micro-batches, one update (less memory)

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "cosine"
    c.schedule.per = "epoch"  # step the schedule once per 'epoch' (PyTorch's usual) or every 'step'
    c.schedule.step_size = 30  # StepLR: epochs (or steps) between decays
    c.schedule.gamma = 0.1  # StepLR decay factor
    c.schedule.warmup_epochs = 0  # linear warmup (LinearLR) before the schedule
    c.schedule.warmup_start_factor = 0.1
    c.schedule.min_lr = 0.0  # CosineAnnealingLR's eta_min; the end of the linear decay

    # Orbax checkpoints: one every `every_epochs` epochs and at the end (the last `keep` of them kept,
    # plus the best by validation accuracy among those saved); a stop by signal saves where it is.
    c.checkpoint = ml_collections.ConfigDict(dict(keep=3, every_epochs=1))

    # Early stopping: end the run after `patience` epochs without val_acc rising above its best by more than
    # `min_delta`.
    c.early_stop = ml_collections.ConfigDict(dict(patience=0, min_delta=0.0))  # patience 0: off

    # A jax.profiler trace of a real run: the first `steps` steps of epoch `epoch` (1-based; 0: off) and its
    # validation, in <workdir>/profile/, each with a summary of how busy the device was in the log.
    c.profile = ml_collections.ConfigDict(dict(epoch=0, steps=10))

    c.wandb = ml_collections.ConfigDict(dict(mode="disabled", project="cifar_jax", entity="", name=""))
    return c


def _fail(key: str, value, requirement: str):
    raise ValueError(f"config: {key}={value!r} {requirement}")


def _choice(key, value, choices):
    if value not in choices:
        _fail(key, value, f"is not one of: {', '.join(choices)}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Check values that would otherwise fail late (after data loading or compilation)."""
    _check_choices(c)
    _check_counts(c)
    _check_augment(c)
    _check_optimizer(c)
    _check_run_options(c)
    _check_regularization(c)
    _check_schedule(c)
    _check_execution(c)


def _check_choices(c) -> None:
    """The named choices."""
    if c.model.name not in models.MODELS:
        _fail("model.name", c.model.name, f"is not one of: {', '.join(models.MODELS)}")
    _choice("model.stem", c.model.stem, ("imagenet", "cifar"))
    _choice("model.dtype", c.model.dtype, DTYPES)
    _choice("data.source", c.data.source, tuple(SOURCES))
    _choice("data.normalization", c.data.normalization, tuple(augment.NORMALIZATIONS))
    _choice("optimizer.name", c.optimizer.name, OPTIMIZERS)
    _choice("schedule.name", c.schedule.name, SCHEDULES)
    _choice("schedule.per", c.schedule.per, ("epoch", "step"))
    _choice("wandb.mode", c.wandb.mode, ("online", "offline", "disabled"))
    _choice("head_only_batchnorm", c.head_only_batchnorm, ("frozen", "train"))


def _check_counts(c) -> None:
    """Sizes and counts."""
    for key in (
        "num_epochs",
        "batch_size",
        "eval_batch_size",
        "model.num_classes",
        "data.image_size",
        "checkpoint.keep",
        "checkpoint.every_epochs",
    ):
        value = c[key] if "." not in key else c[key.split(".")[0]][key.split(".")[1]]
        if not isinstance(value, int) or value <= 0:
            _fail(key, value, "must be a positive integer")
    if c.num_epochs > MAX_EPOCHS:
        _fail("num_epochs", c.num_epochs, f"is past any schedule; use at most {MAX_EPOCHS:,}")


def _check_augment(c) -> None:
    """The augmentation."""
    if (
        not isinstance(c.data.augment.crop_padding, int)
        or not 0 <= c.data.augment.crop_padding < c.data.image_size
    ):
        _fail(
            "data.augment.crop_padding",
            c.data.augment.crop_padding,
            f"must be an integer in [0, data.image_size={c.data.image_size}) (0 = no crop)",
        )
    jitter = c.data.augment.color_jitter
    if not (
        isinstance(jitter, (tuple, list))
        and len(jitter) == 3
        and all(isinstance(v, (int, float)) and v >= 0 for v in jitter)
    ):
        _fail(
            "data.augment.color_jitter",
            jitter,
            "must be 3 numbers >= 0: (brightness, contrast, saturation), e.g. (0.4,0.4,0.4)",
        )


def _check_optimizer(c) -> None:
    """The optimizer's numbers."""
    if not c.optimizer.lr > 0:
        _fail("optimizer.lr", c.optimizer.lr, "must be positive")
    k = c.optimizer.accumulate_steps
    if not isinstance(k, int) or k < 1 or c.batch_size % k:
        _fail(
            "optimizer.accumulate_steps",
            k,
            f"must be a positive integer that divides batch_size={c.batch_size}",
        )


def _check_run_options(c) -> None:
    """Early stopping and profiling."""
    if not isinstance(c.early_stop.patience, int) or c.early_stop.patience < 0:
        _fail("early_stop.patience", c.early_stop.patience, "must be an integer >= 0 (0 = off)")
    if not c.early_stop.min_delta >= 0:
        _fail("early_stop.min_delta", c.early_stop.min_delta, "must be >= 0")
    if c.early_stop.patience and not c.data.val_fraction:
        _fail(
            "early_stop.patience", c.early_stop.patience, "needs a validation split (data.val_fraction > 0)"
        )
    if not (isinstance(c.profile.epoch, int) and 0 <= c.profile.epoch <= c.num_epochs):
        _fail(
            "profile.epoch",
            c.profile.epoch,
            f"must be an epoch in [1, num_epochs={c.num_epochs}], or 0 (off)",
        )
    if not (isinstance(c.profile.steps, int) and c.profile.steps > 0):
        _fail("profile.steps", c.profile.steps, "must be a positive integer (training steps traced)")


def _check_regularization(c) -> None:
    """Regularisation and averaging."""
    if not c.optimizer.clip_norm >= 0:
        _fail("optimizer.clip_norm", c.optimizer.clip_norm, "must be >= 0 (0 = no clipping)")
    if c.optimizer.weight_decay < 0:
        _fail("optimizer.weight_decay", c.optimizer.weight_decay, "must be >= 0")
    for key in ("mixup_alpha", "cutmix_alpha"):
        if c.data.augment[key] < 0:
            _fail(f"data.augment.{key}", c.data.augment[key], "must be >= 0 (0 = off)")
    if not 0 <= c.ema_decay < 1:
        _fail("ema_decay", c.ema_decay, "must be in [0, 1) (0 = no weight average)")
    if not 0 <= c.label_smoothing < 1:
        _fail("label_smoothing", c.label_smoothing, "must be in [0, 1)")


def _check_schedule(c) -> None:
    """Phases and the schedule."""
    if not 0 <= c.head_only_epochs < c.num_epochs:
        _fail("head_only_epochs", c.head_only_epochs, f"must be in [0, num_epochs={c.num_epochs})")
    if c.head_only_epochs and not c.head_only_lr > 0:
        _fail("head_only_lr", c.head_only_lr, "must be positive")
    if c.schedule.name == "step" and (c.schedule.step_size <= 0 or not 0 < c.schedule.gamma <= 1):
        _fail(
            "schedule.step_size/gamma",
            (c.schedule.step_size, c.schedule.gamma),
            "need step_size > 0 and 0 < gamma <= 1",
        )
    if c.schedule.warmup_epochs < 0 or c.schedule.warmup_epochs >= c.num_epochs - c.head_only_epochs:
        _fail(
            "schedule.warmup_epochs",
            c.schedule.warmup_epochs,
            "must be >= 0 and shorter than the (last) phase",
        )


def _check_execution(c) -> None:
    """How steps run, and what the model takes."""
    if c.steps_per_call < 0:
        _fail("steps_per_call", c.steps_per_call, "must be >= 0 (0 = automatic)")
    if c.eval_batches_per_call < 0:
        _fail("eval_batches_per_call", c.eval_batches_per_call, "must be >= 0 (0 = automatic)")
    if c.run_ahead_chunks < 0:
        _fail("run_ahead_chunks", c.run_ahead_chunks, "must be >= 0 (0 = off)")
    if c.model.name == "simple_cnn" and c.data.image_size != 32:
        _fail(
            "data.image_size",
            c.data.image_size,
            "cannot feed simple_cnn, whose FC layer takes 32x32 inputs; use 32 or a ResNet",
        )
    if c.model.name != "simple_cnn" and c.data.image_size < 32:
        _fail("data.image_size", c.data.image_size, "is too small for a ResNet (at least 32)")
    if c.head_only_epochs and c.model.name == "simple_cnn":
        _fail("head_only_epochs", c.head_only_epochs, "needs a pretrained ResNet backbone (model.pretrained)")


# What a run's saved config.json must name: without them it describes no model and no data.
REQUIRED_SAVED = ("model.name", "model.num_classes", "data.source", "num_epochs")
# Keys a resumed run may change: how a run is executed, kept and reported, and when it ends early;
# not what an epoch computes.
FREE_ON_RESUME = (
    "checkpoint.keep",
    "checkpoint.every_epochs",
    "run_ahead_chunks",
    "steps_per_call",
    "eval_batches_per_call",
    "eval_batch_size",
    "distributed",
    "wandb.mode",
    "wandb.project",
    "wandb.entity",
    "wandb.name",
    "early_stop.patience",
    "early_stop.min_delta",
    "profile.epoch",
    "profile.steps",
)


def flat(config) -> dict:
    """{dotted key: value} of a ConfigDict (or dict), values as JSON has them (tuples as lists)."""
    tree = json.loads(config.to_json()) if isinstance(config, ml_collections.ConfigDict) else config
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in flat(value).items()})
        else:
            out[key] = value
    return out


def from_json(path) -> ml_collections.ConfigDict:
    """A run's saved config.json, over `base()` (a key it lacks takes base's value), validated.
    A ValueError of one line naming the file for anything that is not such a config."""
    path = Path(path)
    redo = "restore it from a copy, or train in another --workdir"
    values = flat(read_json_object(path, redo))
    missing = [key for key in REQUIRED_SAVED if key not in values]
    if missing:
        raise ValueError(
            f"{path} lacks {', '.join(missing)}: it is not a config.json that train.py wrote; {redo}"
        )
    config = base()
    known = flat(config)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{path} has keys this version does not know ({', '.join(unknown[:3])}); {redo}")
    for key, value in values.items():
        *sections, leaf = key.split(".")
        target = config
        for part in sections:
            target = target[part]
        try:
            target[leaf] = tuple(value) if isinstance(known[key], list) else value
        except TypeError:
            raise ValueError(
                f"{path}: {key}={value!r} is not a {type(known[key]).__name__}; {redo}"
            ) from None
    try:
        validate(config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return config


def changes(saved, config) -> dict[str, tuple]:
    """{dotted key: (saved value, new value)} of every key whose value differs."""
    old, new = flat(saved), flat(config)
    return {key: (old.get(key), new[key]) for key in new if old.get(key) != new[key]}


CONFIG_HISTORY = "config_history.jsonl"  # in a run's workdir: the settings that resumes changed


def record_change(workdir, from_epoch: int, from_step: int, changed: dict, effect: str) -> dict:
    """Append to `<workdir>/config_history.jsonl` that the run goes on from `from_epoch` (1-based;
    `from_step` within it) with `changed` ({key: (old, new)}); returns the record."""
    import time

    record = {
        "from_epoch": from_epoch,
        "from_step": from_step,
        "changed": {k: list(v) for k, v in changed.items()},
        "effect": effect,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with open(Path(workdir) / CONFIG_HISTORY, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return record


def read_history(workdir) -> list[dict]:
    """The records of `record_change` in `workdir` (none: []); a ValueError naming the file if one does not
    read."""
    path = Path(workdir) / CONFIG_HISTORY
    if not path.exists():
        return []
    records = []
    for i, line in enumerate(path.read_bytes().splitlines()):
        try:
            record = json.loads(line.decode("utf-8"))
            if not {"from_epoch", "changed", "effect"} <= set(record):
                raise ValueError("lacks from_epoch, changed or effect")
        except (UnicodeDecodeError, ValueError, TypeError) as e:
            raise ValueError(
                f"{path} line {i + 1} is not a record of a config change ({str(e)[:60]}); move the file aside"
            ) from None
        records.append(record)
    return records
