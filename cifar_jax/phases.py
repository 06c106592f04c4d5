"""The phases of a run and what each one trains with.

A run has one phase ('all') or, for a fine-tune, two: 'head_only' (`head_only_epochs`, only the
classifier trains) and then 'all'. Each phase has its own optimizer state and schedule, like
creating a new PyTorch optimizer for phase 2; `PhaseSteps` is what a phase's training needs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cifar_jax import config as config_lib
from cifar_jax import optim, population, steps


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str  # 'head_only' or 'all'
    first_epoch: int  # 0-based, inclusive
    end_epoch: int  # exclusive
    lr: float

    @property
    def head_only(self) -> bool:
        return self.name == "head_only"

    @property
    def num_epochs(self) -> int:
        return self.end_epoch - self.first_epoch


def phases(config) -> list[Phase]:
    """Phase 1 trains only the head (`head_only_epochs`), phase 2 everything."""
    out = []
    if config.head_only_epochs:
        out.append(Phase("head_only", 0, config.head_only_epochs, config.head_only_lr))
    out.append(Phase("all", config.head_only_epochs, config.num_epochs, config.optimizer.lr))
    return out


def phase_of(config, epoch: int) -> Phase:
    return next(p for p in phases(config) if p.first_epoch <= epoch < p.end_epoch)


def phase_after(config, epochs_done: int) -> Phase:
    """The phase whose optimizer state a checkpoint after `epochs_done` epochs holds."""
    return phase_of(config, max(min(epochs_done, config.num_epochs) - 1, 0))


def make_tx(config, phase: Phase, steps_per_epoch: int):
    """(schedule, optax transformation) of a phase."""
    schedule = optim.make_schedule(config.schedule, phase.lr, phase.num_epochs, steps_per_epoch)
    return schedule, optim.make_optimizer(config.optimizer, schedule)


def epoch_lrs(schedule, phase: Phase, steps_per_epoch: int) -> list[float]:
    """The learning rate at the first step of each epoch of `phase`, for the metrics rows, each the
    shortest decimal of the optimizer's value (0.001, not 0.0010000000474974513 for a float32).
    Computed once per phase, so the host never waits for the device to read one."""
    values = np.asarray(jax.vmap(schedule)(jnp.arange(phase.num_epochs) * steps_per_epoch))
    return [float(str(v)) for v in values]


@dataclasses.dataclass(frozen=True)
class PhaseSteps:
    """What training a phase needs: its step configuration (model, optimizer, batch) and the
    learning rate of each of its epochs (for the metrics rows)."""

    phase: Phase
    step: steps.StepConfig
    epoch_lrs: list[float]

    def lr(self, epoch: int) -> float:
        return self.epoch_lrs[epoch - self.phase.first_epoch]


def phase_steps(config, phase: Phase, graphdefs, **step_options) -> PhaseSteps:
    """`PhaseSteps` of `phase`; `step_options` as for `step_config`."""
    cfg, schedule = step_config(config, phase, graphdefs, **step_options)
    return PhaseSteps(phase, cfg, epoch_lrs(schedule, phase, step_options["steps_per_epoch"]))


def member_step_config(config, phase: Phase, base: steps.StepConfig, steps_per_epoch: int, members: list):
    """For a population of `members` (population.Member), member k's StepConfig from its traced
    numbers (population.numbers): `base` (`config`'s, the members' shared structure) with the
    member's seed, learning rate, weight decay, momentum, label smoothing, weight average and
    MixUp/CutMix alphas. A part that every member turns off (a Python 0) stays out of the program,
    as in a run alone."""

    flat = [config_lib.flat(m.config) for m in members]
    # Any member's non-zero keeps a part in the program (the lr is always in it).
    on = {key: any(f[key] for f in flat) for key in population.VARIES if key != "optimizer.lr"}

    def member(numbers: dict) -> steps.StepConfig:
        schedule = optim.make_schedule(config.schedule, numbers["lr"], phase.num_epochs, steps_per_epoch)
        tx = optim.make_optimizer(
            config.optimizer,
            schedule,
            weight_decay=numbers["weight_decay"] if on["optimizer.weight_decay"] else 0.0,
            momentum=numbers["momentum"] if on["optimizer.momentum"] else 0.0,
        )
        return dataclasses.replace(
            base,
            tx=tx,
            seed=numbers["seed"],
            label_smoothing=numbers["label_smoothing"] if on["label_smoothing"] else 0.0,
            ema_decay=numbers["ema_decay"] if on["ema_decay"] else 0.0,
            mixup_alpha=numbers["mixup_alpha"] if on["data.augment.mixup_alpha"] else 0.0,
            cutmix_alpha=numbers["cutmix_alpha"] if on["data.augment.cutmix_alpha"] else 0.0,
        )

    return member


def step_config(
    config,
    phase: Phase,
    graphdefs,
    *,
    preprocess,
    num_classes: int,
    steps_per_epoch: int,
    sharding,
):
    """(StepConfig, schedule) of `phase`. A frozen backbone (phase 1) runs in eval mode, its
    BatchNorm using (and keeping) the pretrained running statistics, unless
    `head_only_batchnorm='train'`: then batch statistics, and the running ones updated."""
    schedule, tx = make_tx(config, phase, steps_per_epoch)
    frozen_bn = phase.head_only and config.head_only_batchnorm == "frozen"
    cfg = steps.StepConfig(
        graphdef=graphdefs.eval if frozen_bn else graphdefs.train,
        tx=tx,
        train_only=graphdefs.head if phase.head_only else None,
        preprocess=preprocess,
        batch_size=config.batch_size,
        num_classes=num_classes,
        label_smoothing=config.label_smoothing,
        seed=config.seed,
        sharding=sharding,
        ema_decay=config.ema_decay,
        mixup_alpha=config.data.augment.mixup_alpha,
        cutmix_alpha=config.data.augment.cutmix_alpha,
        accumulate_steps=config.optimizer.accumulate_steps,
    )
    return cfg, schedule
