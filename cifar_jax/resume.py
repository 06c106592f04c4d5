"""Where a run starts (`resume`), and what a resume with changed settings records (`save_config`)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from cifar_jax import config as config_lib
from cifar_jax import staging
from cifar_jax.checkpoint import Checkpoints
from cifar_jax.phases import Phase, phase_after, phase_of

log = logging.getLogger("cifar_jax")


@dataclasses.dataclass
class Start:
    """Where a run starts: the first epoch and step, its phase, the train state, the epoch's
    metrics sums so far (a mid-epoch start) and the last metrics row written."""

    epoch: int
    step: int
    phase: Phase
    state: dict
    sums: dict | None
    row: dict | None
    early_stop: dict | None = None  # the restored checkpoint's early-stopping record


def resume(config, ckpts: Checkpoints, fresh_state, zero_sums) -> Start:
    """Where to start: the newest checkpoint that restores (an epoch's end, or the mid-epoch one a
    stop signal wrote), else the beginning. `fresh_state(phase)` is a new state of `phase`'s
    structure, the restore's template."""
    latest = ckpts.latest_epoch()
    epoch, state, row, early = 0, fresh_state(phase_after(config, latest or 0)), None, None
    if latest is not None:
        epoch, state, meta = ckpts.restore_latest_good(state)
        row, early = meta["row"], meta.get("early_stop")  # absent when saved without early stopping
        val_acc = row.get("val_acc")
        log.info("resumed from %s (epoch %d, val_acc %s)", ckpts.directory / str(epoch), epoch, _fmt(val_acc))
    interrupted = ckpts.mid_epoch.meta()
    if interrupted is not None and interrupted["epoch"] >= epoch:
        phase = phase_of(config, interrupted["epoch"])
        restored = ckpts.mid_epoch.restore({"state": fresh_state(phase), "sums": zero_sums()})
        if restored is not None:
            at, step = interrupted["epoch"], interrupted["next_step"]
            log.info("resumed the interrupted epoch %d at step %d", at + 1, step)
            return Start(at, step, phase, restored["state"], restored["sums"], row, early)
    return Start(epoch, 0, phase_after(config, epoch), state, None, row, early)


def save_config(config, workdir: Path, start: Start, changed: dict, lr_at) -> None:
    """Write config.json, and record what a resume changed in it (`config.record_change`).
    `lr_at(phase, epoch)`: the learning rate an epoch trains at."""
    staging.write_text(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")
    if changed:
        effect = "; ".join(
            change_effect(config, start, key, *values, lr_at) for key, values in changed.items()
        )
        record = config_lib.record_change(workdir, start.epoch + 1, start.step, changed, effect)
        log.info("resumed with changed settings from epoch %d: %s", record["from_epoch"], effect)


def change_effect(config, start: Start, key: str, old, new, lr_at) -> str:
    """What changing `key` on resume does, in a few words."""
    if key.startswith("early_stop."):
        return (
            f"{key} {old!r} -> {new!r}: the run may end at another epoch; the epochs trained stay as they are"
        )
    if key != "num_epochs":
        return f"{key} {old!r} -> {new!r}: what is computed stays the same"
    if start.epoch >= config.num_epochs:
        return f"num_epochs {old} -> {new}: nothing left to train"
    lr = lr_at(start.phase, start.epoch)
    before = f" (epoch {start.row['epoch']} trained at lr {start.row['lr']:.3g})" if start.row else ""
    return (
        f"num_epochs {old} -> {new}: the {config.schedule.name} schedule now spans {new} epochs; "
        f"epoch {start.epoch + 1} trains at lr {lr:.3g}{before}"
    )


def _fmt(x):
    return "n/a" if x is None else f"{x:.4f}"
