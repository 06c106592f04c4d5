"""The configuration every experiment shares (`base()`), and its validation (`validate`).

Config files in `configs/` start from `base()` and change what their experiment needs. ConfigDict
rejects unknown keys, so a typo in `--config.KEY=VALUE` fails at once. `validate` checks values
before any data is loaded or anything compiled, and says in one line what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_collections

from cifar_jax import models, population
from cifar_jax.data import SOURCES, augment
from cifar_jax.errors import read_json_object
from cifar_jax.models import resnet

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
    # Train on the first N images of the training split, once validation's are taken (0: all of them):
    # quick checks, and the study's smoke scale.
    c.data.train_examples = 0
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

    # A population (population.py): members trained side by side in one program, one per seed ('0,1,2')
    # and combination of values ('optimizer.lr=0.05,0.1;label_smoothing=0,0.1': a grid), each an
    # ordinary run in <workdir>/member_<k>/. Both empty: one run.
    c.population = ml_collections.ConfigDict(dict(seeds="", sweep=""))
    return c


def _fail(key: str, value, requirement: str):
    raise ValueError(f"config: {key}={value!r} {requirement}")


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one key's value must be: `holds(value)`, and `says`, the requirement as the error states it."""

    holds: Callable[[Any], bool]
    says: str


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A finite int or float: a range check alone lets NaN through (every comparison with it is False)."""
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def integer(low: int, high: int | None = None, says: str | None = None) -> Rule:
    """An int in [low, high]."""
    default = "must be a positive integer" if low == 1 and high is None else f"must be an integer >= {low}"
    return Rule(lambda v: _is_int(v) and low <= v and (high is None or v <= high), says or default)


def number(low: float, high: float | None = None, *, open_low=False, open_high=False, says=None) -> Rule:
    """A finite number in the interval from `low` to `high` (closed ends unless `open_*`)."""
    if high is None:
        default = f"must be a finite number {'>' if open_low else '>='} {low:g}"
    else:
        default = f"must be in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    return Rule(
        lambda v: (
            _is_number(v)
            and (v > low if open_low else v >= low)
            and (high is None or (v < high if open_high else v <= high))
        ),
        says or default,
    )


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, f"is not one of: {', '.join(choices)}")


BOOL = Rule(lambda v: isinstance(v, bool), "must be True or False")
TEXT = Rule(lambda v: isinstance(v, str), "must be a string")
FRACTION = number(0, 1, open_high=True)  # [0, 1)
COLOR_JITTER = Rule(
    lambda v: isinstance(v, (tuple, list)) and len(v) == 3 and all(_is_number(x) and x >= 0 for x in v),
    "must be 3 numbers >= 0: (brightness, contrast, saturation), e.g. (0.4,0.4,0.4)",
)

# Every key of `base()` and what its value must be, by type and range; `validate` refuses a key
# without a rule, so a new key cannot be added without one. Rules that relate keys are in `RELATIONS`.
RULES: dict[str, Rule | tuple[Rule, ...]] = {
    "seed": integer(0),
    "num_epochs": (integer(1), integer(1, MAX_EPOCHS, f"is past any schedule; use at most {MAX_EPOCHS:,}")),
    "batch_size": integer(1),
    "eval_batch_size": integer(1),
    "label_smoothing": FRACTION,
    "ema_decay": number(0, 1, open_high=True, says="must be in [0, 1) (0 = no weight average)"),
    "steps_per_call": integer(0, says="must be >= 0 (0 = automatic)"),
    "eval_batches_per_call": integer(0, says="must be >= 0 (0 = automatic)"),
    "run_ahead_chunks": integer(0, says="must be >= 0 (0 = off)"),
    "distributed": BOOL,
    "model.name": Rule(lambda v: v in models.MODELS, f"is not one of: {', '.join(models.MODELS)}"),
    "model.num_classes": integer(1),
    "model.stem": one_of(*resnet.STEMS),
    "model.dtype": one_of(*DTYPES),
    "model.pretrained": TEXT,
    "head_only_epochs": integer(0),
    "head_only_lr": number(0, open_low=True, says="must be positive and finite"),
    "head_only_batchnorm": one_of("frozen", "train"),
    "data.source": Rule(lambda v: v in SOURCES, f"is not one of: {', '.join(SOURCES)}"),
    "data.path": TEXT,
    "data.image_size": integer(1),
    "data.val_fraction": FRACTION,
    "data.split_seed": integer(0),
    "data.train_examples": integer(0),
    "data.normalization": Rule(
        lambda v: v in augment.NORMALIZATIONS, f"is not one of: {', '.join(augment.NORMALIZATIONS)}"
    ),
    "data.augment.crop_padding": Rule(_is_int, "must be an integer"),  # its range: in `_relations`
    "data.augment.flip": BOOL,
    "data.augment.color_jitter": COLOR_JITTER,
    "data.augment.mixup_alpha": number(0, says="must be a finite number >= 0 (0 = off)"),
    "data.augment.cutmix_alpha": number(0, says="must be a finite number >= 0 (0 = off)"),
    "data.fake.num_train": integer(1),
    "data.fake.num_test": integer(1),
    "data.fake.num_classes": integer(1),
    "data.fake.image_size": integer(1),
    "optimizer.name": one_of(*OPTIMIZERS),
    "optimizer.lr": number(0, open_low=True, says="must be positive and finite"),
    "optimizer.weight_decay": number(0),
    "optimizer.b1": FRACTION,
    "optimizer.b2": FRACTION,
    "optimizer.eps": number(0),
    "optimizer.momentum": FRACTION,
    "optimizer.nesterov": BOOL,
    "optimizer.decay_norm_and_bias": BOOL,
    "optimizer.clip_norm": number(0, says="must be >= 0 (0 = no clipping)"),
    "optimizer.accumulate_steps": integer(1),
    "schedule.name": one_of(*SCHEDULES),
    "schedule.per": one_of("epoch", "step"),
    "schedule.step_size": integer(1),
    "schedule.gamma": number(0, 1, open_low=True),
    "schedule.warmup_epochs": integer(0),
    "schedule.warmup_start_factor": number(0, 1, open_low=True),
    "schedule.min_lr": number(0),
    "checkpoint.keep": integer(1),
    "checkpoint.every_epochs": integer(1),
    "early_stop.patience": integer(0, says="must be an integer >= 0 (0 = off)"),
    "early_stop.min_delta": number(0),
    "profile.epoch": integer(0),
    "profile.steps": integer(1, says="must be a positive integer (training steps traced)"),
    "wandb.mode": one_of("online", "offline", "disabled"),
    "wandb.project": TEXT,
    "wandb.entity": TEXT,
    "wandb.name": TEXT,
    "population.seeds": TEXT,  # its form and the members' settings: in `_relations`
    "population.sweep": TEXT,
}


def _relations(c) -> Iterator[tuple[str, Any, str]]:
    """(key, value, requirement) for each rule between keys that `c` breaks."""
    if not 0 <= c.data.augment.crop_padding < c.data.image_size:
        yield (
            "data.augment.crop_padding",
            c.data.augment.crop_padding,
            f"must be an integer in [0, data.image_size={c.data.image_size}) (0 = no crop)",
        )
    if c.batch_size % c.optimizer.accumulate_steps:
        yield (
            "optimizer.accumulate_steps",
            c.optimizer.accumulate_steps,
            f"must be a positive integer that divides batch_size={c.batch_size}",
        )
    if c.schedule.min_lr > c.optimizer.lr:
        yield "schedule.min_lr", c.schedule.min_lr, f"must be in [0, optimizer.lr={c.optimizer.lr:g}]"
    if c.early_stop.patience and not c.data.val_fraction:
        yield "early_stop.patience", c.early_stop.patience, "needs a validation split (data.val_fraction > 0)"
    if c.profile.epoch > c.num_epochs:
        yield (
            "profile.epoch",
            c.profile.epoch,
            f"must be an epoch in [1, num_epochs={c.num_epochs}], or 0 (off)",
        )
    if c.head_only_epochs >= c.num_epochs:
        yield "head_only_epochs", c.head_only_epochs, f"must be in [0, num_epochs={c.num_epochs})"
    if c.schedule.warmup_epochs >= c.num_epochs - c.head_only_epochs:
        yield (
            "schedule.warmup_epochs",
            c.schedule.warmup_epochs,
            "must be >= 0 and shorter than the (last) phase",
        )
    arch = models.MODELS[c.model.name]
    if not arch.takes_image_size(c.data.image_size):
        yield "data.image_size", c.data.image_size, f"cannot feed {arch.name}, which takes {arch.image_sizes}"
    if c.head_only_epochs and not arch.torchvision_weights:
        yield (
            "head_only_epochs",
            c.head_only_epochs,
            f"needs a pretrained backbone (model.pretrained); {arch.name} has none",
        )
    yield from population.problems(c)


def _leaves(c, prefix: str = "") -> dict:
    """{dotted key: value} of a ConfigDict, values as they are (tuples stay tuples)."""
    out = {}
    for key, value in c.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def validate(c: ml_collections.ConfigDict) -> None:
    """A ValueError of one line for the first key whose value breaks its rule (`RULES`), then for
    the first rule between keys it breaks (`_relations`): before any data is loaded or anything
    compiled."""
    for key, value, requirement in problems(c):
        _fail(key, value, requirement)


def problems(c: ml_collections.ConfigDict) -> Iterator[tuple[str, Any, str]]:
    """(key, value, requirement) for each key that breaks its rule, then for each rule between keys
    that `c` breaks (after the first broken rule of a key, its relations are not checked)."""
    values = _leaves(c)
    unruled = sorted(set(values) - set(RULES))
    if unruled:  # a key added to base() without its rule: the code's fault, not the user's
        raise AssertionError(f"config keys without a rule in config.RULES: {', '.join(unruled)}")
    broken = False
    for key, rules in RULES.items():
        for rule in rules if isinstance(rules, tuple) else (rules,):
            if key in values and not rule.holds(values[key]):
                broken = True
                yield key, values[key], rule.says
                break
    if not broken:
        yield from _relations(c)


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


def set_key(c: ml_collections.ConfigDict, key: str, value) -> None:
    """`c`'s dotted `key` ('optimizer.lr') set to `value`; a KeyError if `c` has no such key."""
    *sections, leaf = key.split(".")
    for part in sections:
        c = c[part]
    if leaf not in c:
        raise KeyError(key)
    c[leaf] = value


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


REDO = "restore it from a copy, or train in another --workdir"


def from_json(path) -> ml_collections.ConfigDict:
    """A run's saved config.json, over `base()` (a key it lacks takes base's value), validated.
    A ValueError of one line naming the file for anything that is not such a config."""
    path = Path(path)
    return from_values(read_json_object(path, REDO), path)


def from_values(tree: dict, path, redo: str = REDO) -> ml_collections.ConfigDict:
    """A config from `tree` (as `ConfigDict.to_json` writes it: a saved config.json, or the config a
    checkpoint records), over `base()`, validated; a ValueError naming `path` otherwise."""
    values = flat(tree)
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
        try:
            set_key(config, key, tuple(value) if isinstance(known[key], list) else value)
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
