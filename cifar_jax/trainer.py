"""`train_and_evaluate(config, workdir)`: the whole training run, resumable.

Order of work: check everything cheap (`preflight`) -> load the data and put it on the devices ->
create the train state and `resume` where the workdir left off -> per epoch: train in jitted
chunks of steps (`ChunksInFlight`), queue validation, and end the epoch (`EpochEnd`: read
validation, log, checkpoint when due).

The host stays ahead of the device: it reads a chunk's metrics while the next chunk runs, queues
validation before it reads the epoch's last chunk, and queues the next epoch's first
`run_ahead_chunks` chunks before it ends the epoch (checkpointing a device copy of its state),
so that the device does not wait for the host between epochs. A stop signal (SIGTERM, SIGINT)
rides with the chunks (`steps.make_train_chunk`): every process stops at the same step.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cifar_jax import config as config_lib
from cifar_jax import data, errors, preflight, staging, steps
from cifar_jax.checkpoint import Checkpoints, Snapshot
from cifar_jax.data import pipeline
from cifar_jax.early_stop import EarlyStop
from cifar_jax.profiling import EpochProfile
from cifar_jax.runguard import StopSignals, WorkdirLock
from cifar_jax.tracking import CurvesPlotter, MetricsLog, Wandb
from cifar_jax.train_state import Phase, create_train_state, epoch_lrs, init_opt_state, phase_of, step_config

log = logging.getLogger("cifar_jax")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, ...); earlier checkpoints are kept."""


def train_and_evaluate(config, workdir, *, progress: bool = True, cluster: dict | None = None) -> list[dict]:
    """Train `config` in `workdir` (resuming from its latest checkpoint); returns the metrics rows.
    `cluster` (coordinator_address, num_processes, process_id) joins a multi-process run explicitly;
    `config.distributed` alone relies on jax.distributed's auto-detection (SLURM, TPU pods, ...)."""
    t_start = time.perf_counter()
    workdir = Path(workdir).absolute()
    config = config.copy_and_resolve_references()
    for section, key in (("data", "path"), ("model", "pretrained")):
        if config[section][key]:  # saved absolute, so that eval.py works from any directory
            config[section][key] = str(Path(config[section][key]).expanduser().absolute())
    preflight.check_cluster(cluster)
    if cluster or config.distributed:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes' collectives
        jax.distributed.initialize(**(cluster or {}))  # without `cluster`: auto-detection
    changed = preflight.check_before_start(config, workdir)
    is_main = jax.process_index() == 0
    if not is_main:  # one lock per run: process 0 holds it for all
        return Run(config, workdir, is_main, progress, t_start, changed).train()
    with WorkdirLock(workdir):
        return Run(config, workdir, is_main, progress, t_start, changed).train()


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


def phase_after(config, epochs_done: int) -> Phase:
    """The phase whose optimizer state a checkpoint after `epochs_done` epochs holds."""
    return phase_of(config, max(min(epochs_done, config.num_epochs) - 1, 0))


def resume(config, ckpts: Checkpoints, fresh_state, zero_sums) -> Start:
    """Where to start: the newest checkpoint that restores (an epoch's end, or the mid-epoch one a
    stop signal wrote), else the beginning. `fresh_state(phase)` is a new state of `phase`'s
    structure, the restore's template."""
    latest = ckpts.latest_epoch()
    epoch, state, row, early = 0, fresh_state(phase_after(config, latest or 0)), None, None
    if latest is not None:
        epoch, state, meta = ckpts.restore_latest_good(state)
        row, early = meta["row"], meta.get("early_stop")  # absent when saved without early stopping
        log.info(
            "resumed from %s (epoch %d, val_acc %s)",
            ckpts.directory / str(epoch),
            epoch,
            _fmt(row.get("val_acc")),
        )
    interrupted = ckpts.interrupted_meta()
    if interrupted is not None and interrupted["epoch"] >= epoch:
        phase = phase_of(config, interrupted["epoch"])
        restored = ckpts.restore_interrupted({"state": fresh_state(phase), "sums": zero_sums()})
        if restored is not None:
            log.info(
                "resumed the interrupted epoch %d at step %d",
                interrupted["epoch"] + 1,
                interrupted["next_step"],
            )
            return Start(
                interrupted["epoch"],
                interrupted["next_step"],
                phase,
                restored["state"],
                restored["sums"],
                row,
                early,
            )
    return Start(epoch, 0, phase_after(config, epoch), state, None, row, early)


class Clock:
    """One clock for the timing columns: named moments (time.perf_counter) of the epoch at hand."""

    def __init__(self):
        self.at: dict[str, float] = {}

    def mark(self, name: str, t: float | None = None) -> float:
        self.at[name] = time.perf_counter() if t is None else t
        return self.at[name]

    def span(self, start: str, end: str) -> float:
        return self.at[end] - self.at[start]


@dataclasses.dataclass
class EpochEnd:
    """An epoch whose last chunk has been read: what is left is reading its validation (queued on
    the device), logging its row and, when due, checkpointing `state` (a `Snapshot` when the next
    epoch already runs; None when no checkpoint is due)."""

    epoch: int
    phase: Phase
    train_sums: dict
    val_sums: dict | None
    lr: float
    images: int  # trained by this run in this epoch
    clock: Clock
    state: object
    copy_s: float = 0.0  # making the Snapshot, part of the checkpoint's cost


class ChunksInFlight:
    """An epoch's training, chunk by chunk. The host dispatches a chunk, then reads the ones before
    it while it runs (`read(keep=1)`), so the device never waits for the host. Reading a chunk
    checks for a non-finite loss, moves the progress bar, and learns the stop signal that all
    processes voted on when it was dispatched (`stop_signum`, the same in every process)."""

    def __init__(self, run: "Run", epoch: int, phase: Phase, first_step: int, sums):
        self.run, self.epoch, self.phase = run, epoch, phase
        self.size = run.chunk if first_step % run.chunk == 0 else 1  # a resumed epoch may start mid-chunk
        self.lr = run.phase_steps(phase)[1][epoch - phase.first_epoch]
        self.args = (
            run.train_x,
            run.train_y,
            pipeline.epoch_order(run.config.seed, epoch, run.n_train),
            jnp.int32(epoch),
        )
        self.next_step, self.dispatched, self.stop_signum = first_step, 0, None
        self.seen_before = int(_to_host(sums)["count"]) if first_step else 0  # trained before a resume
        self.clock = Clock()
        self.bar = _progress(
            run.progress and run.is_main,
            run.steps_per_epoch,
            f"epoch {epoch + 1}/{run.config.num_epochs}",
            first_step,
        )
        self._pending = collections.deque()  # (metrics, stop vote, first step) of unread chunks

    @property
    def done(self) -> bool:
        return self.next_step >= self.run.steps_per_epoch

    def starts_at(self, t: float) -> None:
        """The epoch's time and its training time count from `t` (the previous epoch's end, read
        after this epoch's first chunks were queued)."""
        self.clock.mark("epoch", t)
        self.clock.mark("train", t)

    def dispatch(self, state, sums):
        run_chunk = self.run.compiled_chunk(self.phase, self.size, state, sums, self.args)
        if not self.dispatched:
            self.clock.mark("train")
        state, sums, vote = run_chunk(
            state, sums, *self.args, jnp.int32(self.next_step), self.run.votes(self.run.stop.signum)
        )
        self._pending.append((sums, vote, self.next_step))
        self.next_step += self.size
        self.dispatched += 1
        return state, sums

    def read(self, keep: int = 0) -> dict | None:
        """Read every chunk but the newest `keep`; the host copy of the last one's sums."""
        host = None
        while len(self._pending) > keep:
            sums, vote, first = self._pending.popleft()
            host, vote = _to_host((sums, vote))
            _save_or_fail(
                self.run.ckpts.check, self.run.ckpts
            )  # a failed background write stops the run at once
            self.stop_signum = self.stop_signum or int(vote) or None
            if host["nonfinite_steps"]:
                raise TrainingError(
                    f"loss became NaN/Inf in epoch {self.epoch + 1}, steps {first + 1}-{first + self.size} "
                    f"of {self.run.steps_per_epoch} (lr {self.lr:g}); "
                    f"{self.run.kept_checkpoints(self.epoch)} Lower optimizer.lr?"
                )
            if self.bar is not None:
                count = host["count"]
                rate = (count - self.seen_before) / (time.perf_counter() - self.clock.at["train"])
                self.bar.update(self.size)
                self.bar.set_postfix(
                    loss=f"{host['loss_sum'] / count:.4f}",
                    acc=f"{host['correct'] / count:.4f}",
                    img_s=f"{rate:.0f}",
                )
        return host

    def finish(self, state, val_sums) -> EpochEnd:
        """Read the last chunk (validation is already queued behind it): the epoch's training is done."""
        train_sums = self.read()
        self.clock.mark("val")
        if self.bar is not None:
            self.bar.close()
        images = int(train_sums["count"]) - self.seen_before
        return EpochEnd(self.epoch, self.phase, train_sums, val_sums, self.lr, images, self.clock, state)


class Run:
    """One training run: the data and the model on the devices, and what the epoch loop (`train`)
    uses: compiled chunks, validation, checkpoints and logs."""

    def __init__(self, config, workdir: Path, is_main: bool, progress: bool, t_start: float, changed: dict):
        self.config, self.workdir, self.is_main, self.progress, self.t_start = (
            config,
            workdir,
            is_main,
            progress,
            t_start,
        )
        splits = data.load_splits(config.data)
        if splits.num_classes != config.model.num_classes:
            raise ValueError(preflight.class_count_mismatch(config, splits))
        self.n_train = len(splits.train[0])
        if self.n_train < config.batch_size:
            raise ValueError(
                f"config: batch_size={config.batch_size} exceeds the {self.n_train} training examples"
            )
        workdir.mkdir(parents=True, exist_ok=True)

        self.mesh = pipeline.make_mesh()
        self.sharding = pipeline.batch_sharding(self.mesh)
        self.train_x, self.train_y = (pipeline.replicate(a, self.mesh) for a in splits.train)
        self.val = tuple(pipeline.replicate(a, self.mesh) for a in splits.val) if len(splits.val[0]) else None
        self.preprocess = pipeline.Preprocess.from_config(config.data)
        self.steps_per_epoch = pipeline.steps_per_epoch(self.n_train, config.batch_size)
        if config.num_epochs * self.steps_per_epoch >= 2**31:  # the optimizer's step count is int32
            raise ValueError(
                f"config: num_epochs={config.num_epochs} makes {config.num_epochs * self.steps_per_epoch:,} "
                "steps of "
                f"batch {config.batch_size}, past the 2**31 a schedule counts; use fewer epochs"
            )
        self.chunk = steps.steps_per_call(config, self.steps_per_epoch)
        self.num_classes = splits.num_classes
        self.graphdefs, self.initial = create_train_state(config, self.num_classes, self.mesh)
        self.eval_sums = steps.make_eval_sums(
            self.graphdefs.eval,
            preprocess=self.preprocess,
            num_classes=self.num_classes,
            batch_size=pipeline.eval_batch_size(
                config.eval_batch_size, len(splits.val[0]), jax.device_count()
            ),
            label_smoothing=config.label_smoothing,
            batches_per_call=steps.eval_batches_per_call(config),
            sharding=self.sharding,
        )
        self._phase_steps = {}  # phase name -> (StepConfig, each epoch's lr)
        self._compiled = {}  # (phase name, steps per call) -> compiled chunk
        self._votes = {}  # signal number or None -> this process's stop votes on the devices
        self.start_times = {}  # compile_s and first_step_s, reported in the first epoch's row
        self.previous_costs = {
            "host_s": None,
            "checkpoint_s": None,
        }  # the host's work after the previous epoch
        self.stop = StopSignals()
        self.early = EarlyStop(config.early_stop.patience, config.early_stop.min_delta)
        self.profile = EpochProfile(config.profile, workdir, is_main)

        self.ckpts = Checkpoints(workdir, keep=config.checkpoint.keep)
        self.start = resume(config, self.ckpts, self.fresh_state, self.zero_sums)
        self.resumed_epoch = (
            self.ckpts.latest_epoch()
        )  # the newest that restored (damaged ones were moved aside)
        self.early.restore(self.start.early_stop)
        if is_main:  # the state matches the config: now it describes the run
            self.save_config(changed)
        self.metrics_log = (
            MetricsLog(workdir, resume_epoch=self.start.epoch, resume_row=self.start.row) if is_main else None
        )
        self.tracker = Wandb(config, workdir, resume=self.resumed_epoch is not None) if is_main else None
        self.plotter = CurvesPlotter(workdir / "curves.png") if is_main else None

    def save_config(self, changed: dict) -> None:
        """Write config.json, and record what a resume changed in it (`config.record_change`)."""
        staging.write_text(self.workdir / "config.json", self.config.to_json_best_effort(indent=2) + "\n")
        if changed:
            effect = "; ".join(self.change_effect(key, old, new) for key, (old, new) in changed.items())
            record = config_lib.record_change(
                self.workdir, self.start.epoch + 1, self.start.step, changed, effect
            )
            log.info("resumed with changed settings from epoch %d: %s", record["from_epoch"], effect)

    def change_effect(self, key: str, old, new) -> str:
        """What changing `key` on resume does, in a few words."""
        if key.startswith("early_stop."):
            return f"{key} {old!r} -> {new!r}: the run may end at another epoch; the epochs trained stay"
        if key != "num_epochs":
            return f"{key} {old!r} -> {new!r}: what is computed stays the same"
        start, schedule = self.start, self.config.schedule.name
        if start.epoch >= self.config.num_epochs:
            return f"num_epochs {old} -> {new}: nothing left to train"
        lr = self.phase_steps(start.phase)[1][start.epoch - start.phase.first_epoch]
        before = f" (epoch {start.row['epoch']} trained at lr {start.row['lr']:.3g})" if start.row else ""
        return (
            f"num_epochs {old} -> {new}: the {schedule} schedule now spans {new} epochs; epoch "
            f"{start.epoch + 1} "
            f"trains at lr {lr:.3g}{before}"
        )

    # The train state and its phases.

    def phase_steps(self, phase: Phase) -> tuple[steps.StepConfig, list[float]]:
        """The step configuration of `phase` and the learning rate of each of its epochs, made once."""
        if phase.name not in self._phase_steps:
            cfg, schedule = step_config(
                self.config,
                phase,
                self.graphdefs,
                preprocess=self.preprocess,
                num_classes=self.num_classes,
                steps_per_epoch=self.steps_per_epoch,
                sharding=self.sharding,
            )
            self._phase_steps[phase.name] = cfg, epoch_lrs(schedule, phase, self.steps_per_epoch)
        return self._phase_steps[phase.name]

    def opt_state(self, phase: Phase, params):
        return init_opt_state(self.phase_steps(phase)[0].tx, params, self.graphdefs, phase, self.mesh)

    def fresh_state(self, phase: Phase) -> dict:
        state = {
            "params": self.initial["params"],
            "batch_stats": self.initial["batch_stats"],
            "opt_state": self.opt_state(phase, self.initial["params"]),
        }
        return {**state, "ema": self.initial["ema"]} if "ema" in self.initial else state

    def zero_sums(self):
        return jax.device_put(
            steps.zero_metrics(), jax.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        )

    # The device's work.

    def votes(self, signum: int | None):
        """This process's stop vote for the chunks, put on the devices once per value."""
        if signum not in self._votes:
            self._votes[signum] = steps.stop_votes(signum, self.sharding)
        return self._votes[signum]

    def compiled_chunk(self, phase: Phase, size: int, state, sums, args):
        """The jitted chunk of `size` steps of `phase`, compiled on first use (its time is logged)."""
        if (phase.name, size) not in self._compiled:
            t0 = time.perf_counter()
            fn = steps.make_train_chunk(self.phase_steps(phase)[0], size)
            self._compiled[phase.name, size] = fn.lower(
                state, sums, *args, jnp.int32(0), self.votes(None)
            ).compile()
            self.start_times["compile_s"] = round(time.perf_counter() - t0, 2)
            log.info(
                "compiled the %s train step (%d steps per call) in %.1f s",
                phase.name,
                size,
                self.start_times["compile_s"],
            )
        return self._compiled[phase.name, size]

    def note_first_step(self, sums) -> None:
        """One wait, once per run: how long until training really runs (data, model, compilation)."""
        if "first_step_s" not in self.start_times:
            jax.block_until_ready(sums)
            self.start_times["first_step_s"] = round(time.perf_counter() - self.t_start, 2)
            log.info(
                "first training step done %.1f s after the start (data, model, compilation)",
                self.start_times["first_step_s"],
            )

    def validate(self, state) -> dict | None:
        """Queue validation of `state` (and of its weight average): device sums, read at the epoch's end."""
        if self.val is None:
            return None
        sums = {"val": self.eval_sums(state["params"], state["batch_stats"], *self.val)}
        if "ema" in state:
            sums["ema_val"] = self.eval_sums(state["ema"]["params"], state["ema"]["batch_stats"], *self.val)
        return sums

    def can_run_ahead(self, epoch: int, phase: Phase, chunks: ChunksInFlight) -> bool:
        """Whether the next epoch's first chunks can be queued before `epoch` ends: same phase, its
        chunk already compiled, no stop agreed, and no early stop possible at `epoch`'s validation."""
        config = self.config
        return bool(
            config.run_ahead_chunks
            and epoch + 1 < config.num_epochs
            and not chunks.stop_signum
            and not self.early.may_end_at_next_validation()
            and not self.profile.covers(epoch)
            and phase_of(config, epoch + 1) == phase
            and (phase.name, self.chunk) in self._compiled
        )

    # An epoch's end, and stops.

    def checkpoint_due(self, epoch: int) -> bool:
        """Whether `epoch` ends with a checkpoint on schedule: every `checkpoint.every_epochs`, the
        last epoch, and the epoch a mid-epoch checkpoint resumed (which that one makes obsolete)."""
        return (
            (epoch + 1) % self.config.checkpoint.every_epochs == 0
            or epoch + 1 == self.config.num_epochs
            or (epoch == self.start.epoch and self.start.step > 0)
        )

    def kept_checkpoints(self, epoch: int) -> str:
        """What an error in `epoch` leaves: the checkpoints of the epochs before it that were due."""
        last = max(
            [e + 1 for e in range(self.start.epoch, epoch) if self.checkpoint_due(e)]
            + [self.resumed_epoch or 0]
        )
        return (
            f"checkpoints up to epoch {last} are kept in {self.ckpts.directory}."
            if last
            else "no checkpoint was saved yet."
        )

    def end_epoch(self, end: EpochEnd) -> dict:
        """The one policy for an epoch's end: read validation, log the row, checkpoint if due.
        Returns the checkpoint's meta, with `saved` saying whether it was written."""
        val = _to_host(end.val_sums) if end.val_sums is not None else None
        end.clock.mark("end")
        row = _epoch_row(
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
        if end.epoch == self.start.epoch:
            row.update(self.start_times)
        ended = self.early.update(end.epoch, row["val_acc"])
        if ended:
            row["ended"] = ended
        if self.is_main:
            self.metrics_log.append(row)
            self.plotter.update(self.metrics_log.rows)
            self.tracker.log(row)
            log.info(
                "epoch %d/%d  train loss %.4f acc %.4f | val loss %s acc %s | lr %.3g | %.1f s, %.0f img/s",
                end.epoch + 1,
                self.config.num_epochs,
                row["train_loss"],
                row["train_acc"],
                _fmt(row["val_loss"]),
                _fmt(row["val_acc"]),
                end.lr,
                row["epoch_time_s"],
                row["train_img_per_s"],
            )
        meta = {
            "epoch": end.epoch + 1,
            "phase": end.phase.name,
            "row": row,
            "early_stop": self.early.record(),
        }
        if ended and self.is_main:
            log.info("epoch %d ends the run: %s", end.epoch + 1, ended)
        end.clock.mark("save")
        save = end.state is not None and (self.checkpoint_due(end.epoch) or bool(ended))
        if save:
            _save_or_fail(lambda: self.ckpts.save(end.epoch + 1, end.state, meta), self.ckpts)
            if end.epoch == self.start.epoch and self.start.step:
                _save_or_fail(
                    self.ckpts.wait, self.ckpts
                )  # the epoch checkpoint is complete: the mid-epoch one is obsolete
                self.ckpts.clear_interrupted()
        end.clock.mark("done")
        self.previous_costs.update(
            host_s=end.copy_s + end.clock.span("end", "done"),
            checkpoint_s=end.copy_s + end.clock.span("save", "done") if save else None,
        )
        return {**meta, "saved": save}

    def stop_mid_epoch(self, chunks: ChunksInFlight, state, sums):
        """Save the state and sums after the last dispatched chunk, then raise Interrupted."""
        chunks.read()
        epoch, step = chunks.epoch, chunks.next_step
        _save_or_fail(
            lambda: self.ckpts.save_interrupted(
                epoch * self.steps_per_epoch + step,
                {"state": state, "sums": sums},
                {"epoch": epoch, "next_step": step, "phase": chunks.phase.name},
            ),
            self.ckpts,
        )
        raise Interrupted(
            chunks.stop_signum, f"epoch {epoch + 1}, step {step} of {self.steps_per_epoch}", self.workdir
        )

    def stop_at_epoch_end(self, signum: int, epoch: int, state, meta: dict):
        """Save the epoch's checkpoint (if the schedule did not), wait for it, then raise Interrupted."""
        if not meta.pop("saved"):
            _save_or_fail(lambda: self.ckpts.save(epoch + 1, state, meta), self.ckpts)
        _save_or_fail(self.ckpts.wait, self.ckpts)
        raise Interrupted(signum, f"the end of epoch {epoch + 1}", self.workdir)

    # The epoch loop.

    def train(self) -> list[dict]:
        config, start = self.config, self.start
        state, phase = start.state, start.phase
        last_epoch = start.epoch if self.early.ended else config.num_epochs
        if self.early.ended:
            log.info(
                "the run in %s ended at epoch %d (%s); nothing to train",
                self.workdir,
                start.epoch,
                self.early.ended,
            )
        elif start.epoch >= config.num_epochs:
            log.info(
                "workdir %s already holds all %d epochs; nothing to train", self.workdir, config.num_epochs
            )
        ending = None  # the previous epoch's end while the next epoch's first chunks run ahead of it
        epoch_started = None  # when the previous epoch ended: the next one starts
        gc.freeze()  # what exists now lives to the end: out of the collector's way, checkpoints block less
        try:
            with (
                self.stop
            ):  # the handlers stay until the last checkpoint is written: a stop then waits for it
                try:
                    for epoch in range(start.epoch, last_epoch):
                        if phase_of(config, epoch) != phase:  # a new phase: a new optimizer and schedule
                            phase = phase_of(config, epoch)
                            state["opt_state"] = self.opt_state(phase, state["params"])
                            log.info("epoch %d: phase %r starts (lr %g)", epoch + 1, phase.name, phase.lr)
                        first_step = start.step if epoch == start.epoch else 0
                        sums = start.sums if first_step else self.zero_sums()
                        chunks = ChunksInFlight(self, epoch, phase, first_step, sums)
                        chunks.clock.mark("epoch", epoch_started)
                        if self.profile.covers(epoch):
                            self.profile.start("train")
                        while not chunks.done:
                            state, sums = chunks.dispatch(state, sums)
                            if self.profile.tracing and (
                                chunks.next_step - first_step >= config.profile.steps or chunks.done
                            ):
                                self.profile.stop(sums)
                            self.note_first_step(sums)
                            if ending is not None and (
                                chunks.dispatched == config.run_ahead_chunks or chunks.done
                            ):
                                finished, ending = ending, None  # ended once, whatever happens in end_epoch
                                self.end_epoch(finished)
                                chunks.starts_at(
                                    finished.clock.at["end"]
                                )  # the device went on from that validation
                            if ending is None:
                                chunks.read(keep=1)
                            if chunks.stop_signum and not chunks.done:
                                self.stop_mid_epoch(chunks, state, sums)
                        if self.profile.covers(epoch):
                            self.profile.start("val")
                            jax.block_until_ready(state)  # the trace holds the validation alone
                            val_sums = self.validate(state)
                            self.profile.stop(val_sums)
                        else:
                            val_sums = self.validate(state)
                        end = chunks.finish(state, val_sums)  # validation queued behind the last chunk
                        if self.can_run_ahead(
                            epoch, phase, chunks
                        ):  # end the epoch once the next one's first chunks run
                            t_copy = time.perf_counter()
                            end.state = (
                                Snapshot.of(state) if self.checkpoint_due(epoch) else None
                            )  # the next chunk takes `state`
                            end.copy_s = time.perf_counter() - t_copy
                            ending, epoch_started = end, None
                            continue
                        meta = self.end_epoch(end)
                        epoch_started = end.clock.at["end"]
                        if self.early.ended:
                            break
                        if chunks.stop_signum and epoch + 1 < config.num_epochs:
                            self.stop_at_epoch_end(chunks.stop_signum, epoch, state, meta)
                    _save_or_fail(
                        self.ckpts.wait, self.ckpts
                    )  # the last checkpoints are written in the background
                    if self.stop.requested:
                        log.info(
                            "%s arrived after the last epoch: its checkpoint was written first; the run is "
                            "complete",
                            signal.Signals(self.stop.signum).name,
                        )
                except BaseException:
                    if ending is not None:  # keep the finished epoch: write its checkpoint before giving up
                        finished, ending = ending, None
                        try:
                            self.end_epoch(finished)
                            self.ckpts.wait()
                        except Exception:  # noqa: BLE001  (the first error is the one to report)
                            log.exception(
                                "could not log and checkpoint epoch %d after the error below",
                                finished.epoch + 1,
                            )
                    raise
                finally:
                    self.close()
        finally:
            gc.unfreeze()
        return self.summary()

    def close(self) -> None:
        if self.profile.tracing:  # an error inside the traced window
            jax.profiler.stop_trace()
        try:
            self.ckpts.wait()
        except Exception:  # noqa: BLE001  (reported by _save_or_fail where it matters)
            pass
        self.ckpts.close()
        if self.plotter is not None:
            self.plotter.close()
        if self.tracker is not None:
            self.tracker.finish()

    def summary(self) -> list[dict]:
        rows = self.metrics_log.rows if self.metrics_log is not None else []
        if self.is_main and rows:
            best = max(
                (r for r in rows if r["val_acc"] is not None), key=lambda r: r["val_acc"], default=rows[-1]
            )
            log.info(
                "best epoch %d (val_acc %s); checkpoints in %s; curves %s; metrics %s",
                best["epoch"],
                _fmt(best["val_acc"]),
                self.ckpts.directory,
                self.workdir / "curves.png",
                self.workdir / "metrics.jsonl",
            )
        return rows


def _to_host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _epoch_row(epoch, phase, train_sums, val_sums, lr, epoch_time, img_per_s, val_s, host_s, checkpoint_s):
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


class Interrupted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint; rerunning resumes."""

    def __init__(self, signum: int, where: str, workdir):
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} at {where}; checkpoint saved in {workdir}; rerun the same command to resume"
        )


def _save_or_fail(save, ckpts: Checkpoints) -> None:
    """Run a checkpoint write (or wait for, or check on, the background ones); turn an OS failure (a
    full disk, a read-only directory, ...) into one TrainingError that says which checkpoints remain."""
    try:
        save()
    except Exception as e:  # noqa: BLE001  (Orbax raises ValueError around TensorStore's OS errors)
        code = errors.write_errno(e)
        if code is None:
            raise
        kept = ckpts.on_disk()
        remain = (
            "no checkpoint remains there"
            if not kept
            else f"the checkpoint of epoch {kept[0]} remains there"
            if len(kept) == 1
            else f"the checkpoints of epochs {', '.join(map(str, kept))} remain there"
        )
        raise TrainingError(
            f"could not write a checkpoint in {ckpts.directory} ({os.strerror(code)}); {remain}. "
            f"{errors.write_advice(code).capitalize()} and rerun to resume"
        ) from None


def _fmt(x):
    return "n/a" if x is None else f"{x:.4f}"


def _progress(enabled: bool, total: int, desc: str, initial: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs stay clean).
    return tqdm(
        total=total, initial=initial, desc=desc, unit="step", leave=False, dynamic_ncols=True, disable=None
    )
