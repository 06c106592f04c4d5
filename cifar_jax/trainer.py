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
import errno
import gc
import logging
import os
import re
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cifar_jax import data, preflight, steps
from cifar_jax.checkpoint import Checkpoints, Snapshot
from cifar_jax.data import pipeline
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
    preflight.check_before_start(config, workdir)
    is_main = jax.process_index() == 0
    if not is_main:  # one lock per run: process 0 holds it for all
        return _train(config, workdir, is_main, progress, t_start)
    with WorkdirLock(workdir):
        return _train(config, workdir, is_main, progress, t_start)


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


def phase_after(config, epochs_done: int) -> Phase:
    """The phase whose optimizer state a checkpoint after `epochs_done` epochs holds."""
    return phase_of(config, max(min(epochs_done, config.num_epochs) - 1, 0))


def resume(config, ckpts: Checkpoints, fresh_state, zero_sums) -> Start:
    """Where to start: the newest checkpoint that restores (an epoch's end, or the mid-epoch one a
    stop signal wrote), else the beginning. `fresh_state(phase)` is a new state of `phase`'s
    structure, the restore's template."""
    latest = ckpts.latest_epoch()
    epoch, state, row = 0, fresh_state(phase_after(config, latest or 0)), None
    if latest is not None:
        epoch, state, meta = ckpts.restore_latest_good(state)
        row = meta["row"]
        log.info("resumed from %s (epoch %d, val_acc %s)", ckpts.directory / str(epoch), epoch, _fmt(row.get("val_acc")))
    interrupted = ckpts.interrupted_meta()
    if interrupted is not None and interrupted["epoch"] >= epoch:
        phase = phase_of(config, interrupted["epoch"])
        restored = ckpts.restore_interrupted({"state": fresh_state(phase), "sums": zero_sums()})
        if restored is not None:
            log.info("resumed the interrupted epoch %d at step %d", interrupted["epoch"] + 1, interrupted["next_step"])
            return Start(interrupted["epoch"], interrupted["next_step"], phase, restored["state"], restored["sums"], row)
    return Start(epoch, 0, phase_after(config, epoch), state, None, row)


class Clock:
    """One clock for the timing columns: named moments (time.perf_counter) of the epoch at hand."""

    def __init__(self):
        self.at: dict[str, float] = {}

    def mark(self, name: str, t: float | None = None) -> float:
        self.at[name] = time.perf_counter() if t is None else t
        return self.at[name]

    def span(self, start: str, end: str) -> float:
        return self.at[end] - self.at[start]


class ChunksInFlight:
    """An epoch's training chunks on their way through the device. The host dispatches a chunk,
    then reads the ones before it while it runs (`read(keep=1)`), so the device never waits for
    the host. Reading a chunk checks its metrics (`on_read`: NaN, progress bar) and learns the stop
    signal that all processes voted on when it was dispatched (`stop_signum`)."""

    def __init__(self, run_chunk, size: int, first_step: int, steps_per_epoch: int, stop: StopSignals, votes_sharding, on_read):
        self.run_chunk, self.size, self.steps_per_epoch = run_chunk, size, steps_per_epoch
        self.next_step = first_step
        self.dispatched = 0
        self.stop_signum: int | None = None  # the same in every process
        self._stop, self._votes_sharding, self._on_read = stop, votes_sharding, on_read
        self._pending = collections.deque()  # (metrics, stop vote, first step) of unread chunks

    @property
    def done(self) -> bool:
        return self.next_step >= self.steps_per_epoch

    def dispatch(self, state, sums, args):
        votes = steps.stop_votes(self._stop.signum, self._votes_sharding)
        state, sums, vote = self.run_chunk(state, sums, *args, jnp.int32(self.next_step), votes)
        self._pending.append((sums, vote, self.next_step))
        self.next_step += self.size
        self.dispatched += 1
        return state, sums

    def read(self, keep: int = 0) -> dict | None:
        """Read every chunk but the newest `keep`; the host copy of the last one's sums."""
        host = None
        while len(self._pending) > keep:
            sums, vote, first = self._pending.popleft()
            host = _to_host(sums)
            self.stop_signum = self.stop_signum or int(vote) or None
            self._on_read(host, first)
        return host


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


def _train(config, workdir: Path, is_main: bool, progress: bool, t_start: float) -> list[dict]:
    splits = data.load_splits(config.data)
    if splits.num_classes != config.model.num_classes:
        raise ValueError(preflight.class_count_mismatch(config, splits))
    n_train = len(splits.train[0])
    if n_train < config.batch_size:
        raise ValueError(f"config: batch_size={config.batch_size} exceeds the {n_train} training examples")

    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    mesh = pipeline.make_mesh()
    sharding = pipeline.batch_sharding(mesh)
    replicated = jax.NamedSharding(mesh, jax.sharding.PartitionSpec())
    train_x, train_y = (pipeline.replicate(a, mesh) for a in splits.train)
    val_x, val_y = (pipeline.replicate(a, mesh) for a in splits.val) if len(splits.val[0]) else (None, None)
    preprocess = pipeline.Preprocess.from_config(config.data)
    steps_per_epoch = pipeline.steps_per_epoch(n_train, config.batch_size)
    chunk = steps.steps_per_call(config, steps_per_epoch)
    num_classes = splits.num_classes

    graphdefs, initial = create_train_state(config, num_classes, mesh)
    eval_sums = steps.make_eval_sums(
        graphdefs.eval, preprocess=preprocess, batch_size=config.eval_batch_size, num_classes=num_classes,
        label_smoothing=config.label_smoothing, batches_per_call=steps.eval_batches_per_call(config), sharding=sharding,
    )
    phase_steps = {}  # phase name -> (StepConfig, each epoch's lr)

    def setup(phase: Phase):
        if phase.name not in phase_steps:
            cfg, schedule = step_config(config, phase, graphdefs, preprocess=preprocess, num_classes=num_classes,
                                        steps_per_epoch=steps_per_epoch, sharding=sharding)
            phase_steps[phase.name] = cfg, epoch_lrs(schedule, phase, steps_per_epoch)
        return phase_steps[phase.name]

    def fresh_state(phase: Phase) -> dict:
        state = {"params": initial["params"], "batch_stats": initial["batch_stats"],
                 "opt_state": init_opt_state(setup(phase)[0].tx, initial["params"], graphdefs, phase, mesh)}
        return {**state, "ema": initial["ema"]} if "ema" in initial else state

    def zero_sums():
        return jax.device_put(steps.zero_metrics(), replicated)

    ckpts = Checkpoints(workdir, keep=config.checkpoint.keep)
    start = resume(config, ckpts, fresh_state, zero_sums)
    resumed_epoch = ckpts.latest_epoch()  # the newest checkpoint that restored (damaged ones were moved aside)
    state, phase = start.state, start.phase
    if start.epoch >= config.num_epochs:
        log.info("workdir %s already holds all %d epochs; nothing to train", workdir, config.num_epochs)

    metrics_log = MetricsLog(workdir, resume_epoch=start.epoch, resume_row=start.row) if is_main else None
    tracker = Wandb(config, workdir, resume=resumed_epoch is not None) if is_main else None
    plotter = CurvesPlotter(workdir / "curves.png") if is_main else None
    compiled = {}  # (phase name, steps per call) -> compiled chunk
    start_times = {}  # compile_s and first_step_s, reported in the first epoch's row
    previous_costs = {"host_s": None, "checkpoint_s": None}  # the host's work after the previous epoch
    ahead = config.run_ahead_chunks
    stop = StopSignals()

    def checkpoint_due(epoch) -> bool:
        """Whether `epoch` ends with a checkpoint on schedule: every `checkpoint.every_epochs`, the
        last epoch, and the epoch a mid-epoch checkpoint resumed (which that one makes obsolete)."""
        return ((epoch + 1) % config.checkpoint.every_epochs == 0 or epoch + 1 == config.num_epochs
                or (epoch == start.epoch and start.step > 0))

    def kept_checkpoints(epoch) -> str:
        """What an error in `epoch` leaves: the checkpoints of the epochs before it that were due."""
        last = max([e + 1 for e in range(start.epoch, epoch) if checkpoint_due(e)] + [resumed_epoch or 0])
        return f"checkpoints up to epoch {last} are kept in {ckpts.directory}." if last else "no checkpoint was saved yet."

    def end_epoch(end: EpochEnd) -> dict:
        """The one policy for an epoch's end: read validation, log the row, checkpoint if due.
        Returns the checkpoint's meta (the row), saved or not."""
        val = _to_host(end.val_sums) if end.val_sums is not None else None
        end.clock.mark("end")
        row = _epoch_row(end.epoch, end.phase, end.train_sums, val, end.lr, end.clock.span("epoch", "end"),
                         end.images / end.clock.span("train", "val"),
                         val_s=end.clock.span("val", "end") if val is not None else None, **previous_costs)
        if end.epoch == start.epoch:
            row.update(start_times)
        if is_main:
            metrics_log.append(row)
            plotter.update(metrics_log.rows)
            tracker.log(row)
            log.info(
                "epoch %d/%d  train loss %.4f acc %.4f | val loss %s acc %s | lr %.3g | %.1f s, %.0f img/s",
                end.epoch + 1, config.num_epochs, row["train_loss"], row["train_acc"],
                _fmt(row["val_loss"]), _fmt(row["val_acc"]), end.lr, row["epoch_time_s"], row["train_img_per_s"],
            )
        meta = {"epoch": end.epoch + 1, "phase": end.phase.name, "row": row}
        save = end.state is not None and checkpoint_due(end.epoch)
        if save:
            _save_or_fail(lambda: ckpts.save(end.epoch + 1, end.state, meta), ckpts)
            if end.epoch == start.epoch and start.step:
                _save_or_fail(ckpts.wait, ckpts)  # the epoch checkpoint is complete: the mid-epoch one is obsolete
                ckpts.clear_interrupted()
        end.clock.mark("done")
        previous_costs.update(host_s=end.copy_s + end.clock.span("end", "done"),
                              checkpoint_s=end.copy_s + end.clock.span("end", "done") if save else None)
        meta["saved"] = save
        return meta

    ending = None  # the previous epoch's EpochEnd while the next epoch's first chunks run ahead
    epoch_started = None  # when the previous epoch ended: the next one starts
    # Everything built so far lives until the end of the run: out of the collector's way, a
    # checkpoint's save() blocks less (BENCHMARKS.md, "Things measured while building").
    gc.freeze()
    try:
        with stop:
            for epoch in range(start.epoch, config.num_epochs):
                if phase_of(config, epoch) != phase:  # a new phase: a new optimizer and schedule
                    phase = phase_of(config, epoch)
                    state["opt_state"] = init_opt_state(setup(phase)[0].tx, state["params"], graphdefs, phase, mesh)
                    log.info("epoch %d: phase %r starts (lr %g)", epoch + 1, phase.name, phase.lr)
                step_cfg, lrs = setup(phase)
                lr = lrs[epoch - phase.first_epoch]
                clock = Clock()
                clock.mark("epoch", epoch_started)
                first_step = start.step if epoch == start.epoch else 0
                sums = start.sums if first_step else zero_sums()
                seen_before = int(_to_host(sums)["count"]) if first_step else 0
                size = chunk if first_step % chunk == 0 else 1
                args = (train_x, train_y, pipeline.epoch_order(config.seed, epoch, n_train), jnp.int32(epoch))
                if (phase.name, size) not in compiled:
                    t0 = time.perf_counter()
                    fn = steps.make_train_chunk(step_cfg, size)
                    compiled[phase.name, size] = fn.lower(state, sums, *args, jnp.int32(0), steps.stop_votes(None, sharding)).compile()
                    start_times["compile_s"] = round(time.perf_counter() - t0, 2)
                    log.info("compiled the %s train step (%d steps per call) in %.1f s", phase.name, size, start_times["compile_s"])
                bar = _progress(progress and is_main, steps_per_epoch, f"epoch {epoch + 1}/{config.num_epochs}", first_step)

                def on_read(host_sums, first):  # a chunk read: NaN check, progress bar
                    if host_sums["nonfinite_steps"]:
                        raise TrainingError(
                            f"loss became NaN/Inf in epoch {epoch + 1}, steps {first + 1}-{first + size} of {steps_per_epoch} "
                            f"(lr {lr:g}); {kept_checkpoints(epoch)} Lower optimizer.lr?"
                        )
                    if bar is not None:
                        count = host_sums["count"]
                        bar.update(size)
                        bar.set_postfix(loss=f"{host_sums['loss_sum'] / count:.4f}", acc=f"{host_sums['correct'] / count:.4f}",
                                        img_s=f"{(count - seen_before) / (time.perf_counter() - clock.at['train']):.0f}")

                chunks = ChunksInFlight(compiled[phase.name, size], size, first_step, steps_per_epoch, stop, sharding, on_read)
                clock.mark("train")
                while not chunks.done:
                    state, sums = chunks.dispatch(state, sums, args)
                    if "first_step_s" not in start_times:  # one wait, once per run: how long until training really runs
                        jax.block_until_ready(sums)
                        start_times["first_step_s"] = round(time.perf_counter() - t_start, 2)
                        log.info("first training step done %.1f s after the start (data, model, compilation)", start_times["first_step_s"])
                    if ending is not None and (chunks.dispatched == ahead or chunks.done):
                        end_epoch(ending)  # the device went on from that validation to this epoch's chunks
                        clock.mark("epoch", ending.clock.at["end"])
                        clock.mark("train", ending.clock.at["end"])
                        ending = None
                    if ending is None:
                        chunks.read(keep=1)
                    if chunks.stop_signum and not chunks.done:
                        chunks.read()
                        _save_or_fail(lambda: ckpts.save_interrupted(
                            epoch * steps_per_epoch + chunks.next_step, {"state": state, "sums": sums},
                            {"epoch": epoch, "next_step": chunks.next_step, "phase": phase.name}), ckpts)
                        raise Interrupted(chunks.stop_signum, f"epoch {epoch + 1}, step {chunks.next_step} of {steps_per_epoch}", workdir)
                # Validation is queued behind the last chunk before the host waits for that chunk: the
                # device goes on from one to the other without waiting for the host.
                val_sums = None
                if val_x is not None:
                    val_sums = {"val": eval_sums(state["params"], state["batch_stats"], val_x, val_y)}
                    if "ema" in state:
                        val_sums["ema_val"] = eval_sums(state["ema"]["params"], state["ema"]["batch_stats"], val_x, val_y)
                train_sums = chunks.read()
                clock.mark("val")  # training is done: validation runs from here
                if bar is not None:
                    bar.close()
                end = EpochEnd(epoch, phase, train_sums, val_sums, lr, int(train_sums["count"]) - seen_before, clock, state)
                # Run ahead: queue the next epoch's first chunks before this epoch's end, which then
                # checkpoints a device copy of the state (the next chunk takes `state` over), if one is due.
                if (ahead and epoch + 1 < config.num_epochs and not chunks.stop_signum
                        and phase_of(config, epoch + 1) == phase and (phase.name, chunk) in compiled):
                    t_copy = time.perf_counter()
                    end.state = Snapshot.of(state) if checkpoint_due(epoch) else None  # a stop next epoch saves mid-epoch
                    end.copy_s = time.perf_counter() - t_copy  # on a CPU the copy is made during the call
                    ending, epoch_started = end, None
                    continue
                meta = end_epoch(end)
                epoch_started = clock.at["end"]
                if chunks.stop_signum and epoch + 1 < config.num_epochs:
                    if not meta.pop("saved"):  # not on the checkpoint schedule: saved for the rerun
                        _save_or_fail(lambda: ckpts.save(epoch + 1, state, meta), ckpts)
                    _save_or_fail(ckpts.wait, ckpts)
                    raise Interrupted(chunks.stop_signum, f"the end of epoch {epoch + 1}", workdir)
        _save_or_fail(ckpts.wait, ckpts)  # the last checkpoints are written in the background: a run ends when they are
    except BaseException:
        if ending is not None:  # keep the finished epoch: write its checkpoint before giving up
            try:
                end_epoch(ending)
            except Exception:  # noqa: BLE001  (the first error is the one to report)
                log.exception("could not log and checkpoint epoch %d after the error below", ending.epoch + 1)
        raise
    finally:
        gc.unfreeze()
        try:
            ckpts.wait()
        except Exception:  # noqa: BLE001  (reported by _save_or_fail where it matters)
            pass
        ckpts.close()
        if plotter is not None:
            plotter.close()
        if tracker is not None:
            tracker.finish()
    rows = metrics_log.rows if metrics_log is not None else []
    if is_main and rows:
        best = max((r for r in rows if r["val_acc"] is not None), key=lambda r: r["val_acc"], default=rows[-1])
        log.info("best epoch %d (val_acc %s); checkpoints in %s; curves %s; metrics %s",
                 best["epoch"], _fmt(best["val_acc"]), ckpts.directory, workdir / "curves.png", workdir / "metrics.jsonl")
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
        super().__init__(f"stopped by {name} at {where}; checkpoint saved in {workdir}; rerun the same command to resume")


_WRITE_ADVICE = {
    errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (disk quota)",
    errno.EACCES: "make it writable", errno.EPERM: "make it writable", errno.EROFS: "use a writable --workdir",
    errno.ENAMETOOLONG: "use a shorter --workdir",
}


def write_errno(e: BaseException) -> int | None:
    """The OS error number behind a failed write: an OSError anywhere in the chain, or the
    `[os_error_code='N']` of TensorStore's messages (how Orbax reports a full disk)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        found = re.search(r"os_error_code='?(\d+)", str(e))
        if found:
            return int(found.group(1))
        e = e.__cause__ or e.__context__
    return None


def _save_or_fail(save, ckpts: Checkpoints) -> None:
    """Run a checkpoint write (or wait for the background ones); turn an OS failure (a full disk, a
    read-only directory, ...) into one clear TrainingError."""
    try:
        save()
    except Exception as e:  # noqa: BLE001  (Orbax raises ValueError around TensorStore's OS errors)
        code = write_errno(e)
        if code is None:
            raise
        raise TrainingError(
            f"could not write a checkpoint in {ckpts.directory} ({os.strerror(code)}); earlier checkpoints there are intact. "
            f"{_WRITE_ADVICE.get(code, 'fix that').capitalize()} and rerun to resume"
        ) from None


def _fmt(x):
    return "n/a" if x is None else f"{x:.4f}"


def _progress(enabled: bool, total: int, desc: str, initial: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs stay clean).
    return tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False, dynamic_ncols=True, disable=None)
