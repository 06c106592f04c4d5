"""An epoch's end, the one place it happens: read its validation, log its metrics row, checkpoint
when due (`EpochRecorder.record`); and what ends a run at an epoch's end (a stop signal, early stopping).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from cifar_jax import sharding
from cifar_jax.checkpoint import Checkpoints, write_or_fail
from cifar_jax.early_stop import EarlyStop
from cifar_jax.phases import Phase
from cifar_jax.tracking import CurvesPlotter, MetricsLog, Wandb

log = logging.getLogger("cifar_jax")


class Clock:
    """Named moments (time.perf_counter) of one epoch, for the timing columns of its row."""

    def __init__(self):
        self.at: dict[str, float] = {}

    def mark(self, name: str, t: float | None = None) -> float:
        self.at[name] = time.perf_counter() if t is None else t
        return self.at[name]

    def span(self, start: str, end: str) -> float:
        return self.at[end] - self.at[start]


@dataclasses.dataclass
class EpochEnd:
    """An epoch whose training is dispatched: its validation (queued on the device behind it) and
    the state to checkpoint (the live state, a `Snapshot` when the next epoch already runs, or None
    when no checkpoint is due). `train_sums` and `images` are set once its last chunk is read."""

    epoch: int
    phase: Phase
    lr: float
    clock: Clock
    val_sums: dict | None
    state: object
    train_sums: dict | None = None
    images: int = 0  # trained by this run in this epoch
    copy_s: float = 0.0  # making the Snapshot, part of the checkpoint's cost
    meta: dict | None = None  # what `EpochRecorder.record` saved (or would have), once ended
    member_ends: list | None = None  # a population's: each member's end, once ended (records.py)


class EpochRecorder:
    """Records each epoch's end (`record`: its row, its checkpoint when due) of a run starting at
    `start_epoch` (`start_step` > 0: mid-epoch), and what ends the run there. Only process
    0 (`is_main`) writes rows, curves and wandb; every process checkpoints."""

    def __init__(
        self,
        config,
        workdir: Path,
        is_main: bool,
        ckpts: Checkpoints,
        early: EarlyStop,
        start,
        start_times: dict,
        name: str = "",
        group: str | None = None,
    ):
        self.config, self.workdir, self.is_main, self.ckpts, self.early = (
            config,
            workdir,
            is_main,
            ckpts,
            early,
        )
        self.start_epoch, self.start_step, self.start_row = start.epoch, start.step, start.row
        self.resumed_epoch = ckpts.latest_epoch()  # the newest that restored (damaged ones were moved aside)
        # compile_s and first_step_s, filled in by the set-up as the first chunk runs: the first
        # epoch's row reports them.
        self.start_times = start_times
        self.name = name  # a population member's, before each line it logs
        self.previous_costs = {"host_s": None, "checkpoint_s": None}  # the host's work after the last epoch
        self.metrics_log = (
            MetricsLog(workdir, resume_epoch=start.epoch, resume_row=start.row) if is_main else None
        )
        self.tracker = (
            Wandb(config, workdir, resume=self.resumed_epoch is not None, group=group) if is_main else None
        )
        self.plotter = CurvesPlotter(workdir / "curves.png") if is_main else None

    def checkpoint_reason(self, epoch: int, ended: str | None = None, stop: bool = False) -> str | None:
        """`checkpoint_reason` for `epoch` of this run."""
        return checkpoint_reason(
            epoch,
            every=self.config.checkpoint.every_epochs,
            num_epochs=self.config.num_epochs,
            resumed_mid_epoch=epoch == self.start_epoch and self.start_step > 0,
            ended=ended,
            stop=stop,
        )

    def checkpoint_due(self, epoch: int) -> bool:
        """Whether `epoch` ends with a checkpoint on schedule (whatever else happens at its end)."""
        return self.checkpoint_reason(epoch) is not None

    def kept_checkpoints(self, epoch: int) -> str:
        """What an error in `epoch` leaves (a clause): the checkpoints due in the epochs before it."""
        due = [e + 1 for e in range(self.start_epoch, epoch) if self.checkpoint_due(e)]
        last = max(due + [self.resumed_epoch or 0])
        if not last:
            return "no checkpoint was saved yet"
        return f"checkpoints up to epoch {last} are kept in {self.ckpts.directory}"

    def record(self, end: EpochEnd, diverged: str | None = None) -> None:
        """Read validation, log the row, checkpoint if due (or if the run ends here); `end.meta`
        says what was saved. A population's member that `diverged` in this epoch: its row says so,
        and nothing is saved (its weights are not finite)."""
        row = self._row(end)
        ended = diverged or self.early.update(end.epoch, row["val_acc"])
        if ended:
            row["ended"] = ended
        if self.is_main:
            self._log(end, row)
        end.meta = {
            "epoch": end.epoch + 1,
            "phase": end.phase.name,
            "row": row,
            "early_stop": self.early.record(),
        }
        if ended and self.is_main:
            log.info("%sepoch %d ends the run: %s", self.name, end.epoch + 1, ended)
        end.clock.mark("save")
        reason = self.checkpoint_reason(end.epoch, ended) if end.state is not None and not diverged else None
        save = reason is not None
        if save:
            meta = {**end.meta, "saved_because": reason}
            write_or_fail(lambda: self.ckpts.save(end.epoch + 1, end.state, meta), self.ckpts)
            if end.epoch == self.start_epoch and self.start_step:
                # The epoch is saved: the mid-epoch one is obsolete.
                write_or_fail(self.ckpts.wait, self.ckpts)
                self.ckpts.mid_epoch.clear()
        end.meta["saved"] = save
        end.clock.mark("done")
        host_s = end.copy_s + end.clock.span("end", "done")
        checkpoint_s = end.copy_s + end.clock.span("save", "done") if save else None
        self.previous_costs.update(host_s=host_s, checkpoint_s=checkpoint_s)

    def _row(self, end: EpochEnd) -> dict:
        val = sharding.to_host(end.val_sums) if end.val_sums is not None else None
        if "end" not in end.clock.at:  # a population's members share the moment it ended
            end.clock.mark("end")
        row = epoch_row(
            end.epoch,
            end.phase,
            end.train_sums,
            val,
            end.lr,
            end.clock.span("epoch", "end"),
            end.images / end.clock.span("train", "val"),
            val_s=end.clock.span("val", "end") if val is not None else None,
            **self.previous_costs,
        )
        if end.epoch == self.start_epoch:
            row.update(self.start_times)
        return row

    def _log(self, end: EpochEnd, row: dict) -> None:
        self.metrics_log.append(row)
        self.plotter.update(self.metrics_log.rows)
        self.tracker.log(row)
        log.info(
            "%sepoch %d/%d  train loss %.4f acc %.4f | val loss %s acc %s | lr %.3g | %.1f s, %.0f img/s",
            self.name,
            end.epoch + 1,
            self.config.num_epochs,
            row["train_loss"],
            row["train_acc"],
            fmt(row["val_loss"]),
            fmt(row["val_acc"]),
            end.lr,
            row["epoch_time_s"],
            row["train_img_per_s"],
        )

    def save_at_stop(self, end: EpochEnd, state) -> None:
        """A stop agreed in `end`'s epoch: its checkpoint, if the schedule did not save it (written
        in the background: the caller waits for it)."""
        meta = {k: v for k, v in end.meta.items() if k != "saved"}
        if not end.meta["saved"]:
            meta["saved_because"] = self.checkpoint_reason(end.epoch, stop=True)
            write_or_fail(lambda: self.ckpts.save(end.epoch + 1, state, meta), self.ckpts)

    def close(self) -> None:
        if self.plotter is not None:
            self.plotter.close()
        if self.tracker is not None:
            self.tracker.finish()

    @property
    def rows(self) -> list[dict]:
        """The run's metrics rows so far (process 0; [] elsewhere)."""
        return self.metrics_log.rows if self.metrics_log is not None else []

    def summary(self) -> list[dict]:
        """The run's rows (process 0; [] elsewhere), after logging where its results are."""
        rows = self.rows
        if self.is_main and rows:
            scored = [r for r in rows if r["val_acc"] is not None]
            best = max(scored, key=lambda r: r["val_acc"], default=rows[-1])
            log.info(
                "%sbest epoch %d (val_acc %s); checkpoints in %s; curves %s; metrics %s",
                self.name,
                *(best["epoch"], fmt(best["val_acc"]), self.ckpts.directory),
                *(self.workdir / "curves.png", self.workdir / "metrics.jsonl"),
            )
        return rows


def checkpoint_reason(
    epoch: int, *, every: int, num_epochs: int, resumed_mid_epoch: bool, ended: str | None, stop: bool
) -> str | None:
    """Why epoch `epoch` (0-based) ends with a checkpoint, or None: the one rule, recorded in the
    checkpoint's meta (`saved_because`). On schedule: every `every` epochs, the last epoch, and the
    epoch that a mid-epoch checkpoint resumed (whose checkpoint that one then makes obsolete); and
    off schedule: early stopping ended the run here (`ended`), or a stop signal agreed at its end
    (`stop`; one agreed mid-epoch saves `checkpoint.MidEpochCheckpoint` instead)."""
    if (epoch + 1) % every == 0:
        return f"every {every} epoch(s)"
    if epoch + 1 == num_epochs:
        return "the last epoch"
    if resumed_mid_epoch:
        return "the epoch resumed mid-way"
    if ended:
        return f"early stopping: {ended}"
    if stop:
        return "a stop signal"
    return None


def epoch_row(epoch, phase, train_sums, val_sums, lr, epoch_time, img_per_s, val_s, host_s, checkpoint_s):
    """The metrics row of an epoch from its host sums and timings (None: not measured)."""

    def mean(sums, key):
        return float(sums[key]) / max(int(sums["count"]), 1)

    def seconds(t):
        return None if t is None else round(t, 3)

    validation = {}  # val_loss, val_acc, and ema_val_loss, ema_val_acc for the weight average
    for prefix, sums in sorted((val_sums or {"val": None}).items(), key=lambda kv: kv[0] != "val"):
        validation[f"{prefix}_loss"] = mean(sums, "loss_sum") if sums is not None else None
        validation[f"{prefix}_acc"] = mean(sums, "correct") if sums is not None else None
    return {
        "epoch": epoch + 1,
        "phase": phase.name,
        "train_loss": mean(train_sums, "loss_sum"),
        "train_acc": mean(train_sums, "correct"),
        **validation,
        "lr": lr,
        "epoch_time_s": round(epoch_time, 3),
        "train_img_per_s": round(img_per_s, 1),
        "val_s": seconds(val_s),
        "host_s": seconds(host_s),
        "checkpoint_s": seconds(checkpoint_s),
    }


def fmt(x):
    return "n/a" if x is None else f"{x:.4f}"
