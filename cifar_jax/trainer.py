"""`train_and_evaluate(config, workdir)`: the whole training run, resumable.

Order of work: check everything cheap (`preflight`) -> put the data and the model on the devices
(`RunSetup`) -> `resume` where the workdir left off -> per epoch: dispatch its chunks of training
steps, queue its validation, and end it (`EpochRecorder.record`: read validation, log, checkpoint when
due).

The host stays up to `run_ahead_chunks` calls behind the device (`InFlight`): every dispatched
call is queued with what it ends (a chunk: nothing; an epoch's validation: the epoch), and the
host processes the oldest entries while more calls than that are in flight. So the device does
not wait for the host within an epoch, nor between epochs, where the next epoch's first chunks
run while the host logs and checkpoints the last one (a device copy of its state). A stop signal
(SIGTERM, SIGINT) rides with the chunks (`steps.make_train_chunk`): every process stops at the
same step.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import signal
import time
from pathlib import Path

import jax

from cifar_jax import preflight, sharding
from cifar_jax.checkpoint import Snapshot
from cifar_jax.epoch_end import Clock, EpochEnd
from cifar_jax.errors import TrainingError, one_line
from cifar_jax.phases import Phase, PhaseSteps, phase_of
from cifar_jax.profiling import EpochProfile
from cifar_jax.provenance import Sessions
from cifar_jax.records import Records
from cifar_jax.run_setup import RunSetup
from cifar_jax.runguard import Interrupted, StopSignals, WorkdirLock

__all__ = ["Interrupted", "TrainingError", "train_and_evaluate"]

log = logging.getLogger("cifar_jax")


def train_and_evaluate(config, workdir, *, progress: bool = True, cluster: dict | None = None) -> list[dict]:
    """Train `config` in `workdir` (resuming from its latest checkpoint); returns the metrics rows.
    `cluster` (coordinator_address, num_processes, process_id) joins a multi-process run
    explicitly; `config.distributed` alone relies on jax.distributed's auto-detection (SLURM, ...)."""
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
        return Trainer(config, workdir, is_main, progress, t_start, changed).train()
    with WorkdirLock(workdir):
        return Trainer(config, workdir, is_main, progress, t_start, changed).train()


@dataclasses.dataclass
class Epoch:
    """An epoch in training: what its chunks share, and where its dispatch and reading stand."""

    index: int
    steps: PhaseSteps
    args: tuple  # the dataset, the epoch's order and number: every chunk's arguments
    next_step: int  # the first step not yet dispatched
    size: int  # steps per call
    end: EpochEnd  # its end, queued once its last chunk is dispatched
    seen_before: int = 0  # images trained before a mid-epoch resume
    dispatched: int = 0
    bar: object = None

    @property
    def phase(self) -> Phase:
        return self.steps.phase


@dataclasses.dataclass
class Chunk:
    """A dispatched call of `size` training steps from `first_step`: its metrics sums (the epoch's
    so far) and its stop vote, on the device until read."""

    epoch: Epoch
    first_step: int
    sums: dict
    vote: jax.Array


class InFlight:
    """The calls dispatched and not yet processed, oldest first: chunks, and epoch ends (an
    epoch's validation, queued behind its last chunk). Processing reads a chunk (its metrics, a
    non-finite loss, the stop vote) or ends an epoch (`Records.record`); each entry is processed
    once, in order, whatever happens while it is processed."""

    def __init__(self, setup: RunSetup, records: Records):
        self.setup, self.records = setup, records
        self.entries = collections.deque()
        self.stop_signum = None  # the stop every process agreed on, read from a chunk's votes
        self.current: Epoch | None = None  # the epoch being dispatched
        self.last_end_at = None  # when the last epoch end was processed: the next epoch's start
        self.failed_epoch = None  # the epoch of the first entry whose processing raised

    def push(self, entry) -> None:
        self.entries.append(entry)

    def drain(self, keep: int = 0) -> None:
        """Process the oldest entries until `keep` remain."""
        while len(self.entries) > keep:
            entry = self.entries.popleft()
            try:
                self.process(entry)
            except BaseException:
                self.failed_epoch = _epoch_of(entry)
                raise

    def process(self, entry: Chunk | EpochEnd) -> None:
        if isinstance(entry, Chunk):
            self.read(entry)
        else:
            self.record(entry)

    def salvage(self) -> None:
        """After an error: end every epoch queued before the one whose entry failed (all of them
        when the error came from elsewhere); an error here is one line, the first is the one raised."""
        while self.entries:
            entry = self.entries.popleft()
            if self.failed_epoch is not None and _epoch_of(entry) >= self.failed_epoch:
                break
            try:
                self.process(entry)
            except BaseException as e:  # noqa: BLE001
                log.warning(
                    "after the error that stopped the run, epoch %d could not end too (%s)",
                    _epoch_of(entry) + 1,
                    one_line(e),
                )
                break
        self.entries.clear()

    def begin(self, epoch: int, phase: Phase, first_step: int, sums, show_bar: bool) -> Epoch:
        """The epoch about to be dispatched (from `first_step`, the sums so far `sums`), now `current`."""
        steps, clock = self.setup.phase_steps(phase), Clock()
        clock.mark("epoch", self.last_end_at)
        end = EpochEnd(epoch, phase, steps.lr(epoch), clock, val_sums=None, state=None)
        ep = Epoch(
            epoch, steps, self.setup.epoch_args(epoch), first_step, self.setup.chunk_size(first_step), end
        )
        # Images trained before a resume (all members'): the bar and the rows count this session's.
        ep.seen_before = int(sharding.to_host(sums)["count"].sum()) if first_step else 0
        if show_bar:
            desc = f"epoch {epoch + 1}/{self.setup.config.num_epochs}"
            ep.bar = _progress(self.setup.steps_per_epoch, desc, first_step)
        self.current = ep
        return ep

    def stop_mid_epoch(self, ep: Epoch, state, sums):
        """Save the state and sums after the last dispatched chunk, then raise Interrupted."""
        self.drain()
        epoch, step, spe = ep.index, ep.next_step, self.setup.steps_per_epoch
        meta = {
            "epoch": epoch,
            "next_step": step,
            "phase": ep.phase.name,
            "saved_because": "a stop signal mid-epoch",
        }
        self.records.save_mid_epoch(epoch * spe + step, state, sums, meta)
        raise Interrupted(self.stop_signum, f"epoch {epoch + 1}, step {step} of {spe}", self.records.workdir)

    def read(self, chunk: Chunk) -> None:
        epoch, spe = chunk.epoch, self.setup.steps_per_epoch
        host, vote = sharding.to_host((chunk.sums, chunk.vote))
        self.records.check()  # a failed background write stops the run at once
        self.stop_signum = self.stop_signum or int(vote) or None
        last = chunk.first_step + epoch.size
        where = f"epoch {epoch.index + 1}, steps {chunk.first_step + 1}-{last} of {spe}"
        error = self.records.diverged(host, epoch.index, where, epoch.end.lr)
        if error is not None:
            raise error
        count = int(host["count"].sum())  # all members'
        if epoch.bar is not None:
            rate = (count - epoch.seen_before) / (time.perf_counter() - epoch.end.clock.at["train"])
            epoch.bar.update(epoch.size)
            loss, acc = host["loss_sum"].sum() / count, host["correct"].sum() / count
            epoch.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.4f}", img_s=f"{rate:.0f}")
        if last >= spe:  # the epoch's training is done (its validation runs on the device)
            epoch.end.clock.mark("val")
            epoch.end.train_sums, epoch.end.images = host, count - epoch.seen_before
            if epoch.bar is not None:
                epoch.bar.close()

    def record(self, end: EpochEnd) -> None:
        self.records.record(end)
        self.last_end_at = end.clock.at["end"]
        if self.current is not None and self.current.index == end.epoch + 1:  # it ran ahead of this end:
            self.current.end.clock.mark("epoch", self.last_end_at)  # the device went on from that validation
            self.current.end.clock.mark("train", self.last_end_at)


def _epoch_of(entry: Chunk | EpochEnd) -> int:
    return entry.epoch.index if isinstance(entry, Chunk) else entry.epoch


class Trainer:
    """One training run: the epoch loop (`train`) over what `RunSetup` put on the devices."""

    def __init__(self, config, workdir: Path, is_main: bool, progress: bool, t_start: float, changed: dict):
        self.config, self.workdir, self.is_main, self.progress = config, workdir, is_main, progress
        self.t_start = t_start
        self.setup = RunSetup(config)
        workdir.mkdir(parents=True, exist_ok=True)
        self.stop = StopSignals()
        self.profile = EpochProfile(config.profile, workdir, is_main)
        self.records = Records(config, workdir, is_main, self.setup, changed)  # resumes each run
        self.start = self.records.start
        self.in_flight = InFlight(self.setup, self.records)
        self.sessions = Sessions(workdir) if is_main else None  # where and with what it trains
        if self.sessions is not None:
            self.sessions.start(self.t_start, self.start.epoch, self.start.step)

    def train(self) -> list[dict]:
        """Train the epochs left (`_epochs`); whatever ends it, each finished epoch keeps its row and
        checkpoint, and sessions.json says how it ended."""
        ended = self.records.ended
        last_epoch = self.start.epoch if ended else self.config.num_epochs
        if ended:
            log.info(
                "the run in %s ended at epoch %d (%s); nothing to train",
                self.workdir,
                self.start.epoch,
                ended,
            )
        elif self.start.epoch >= self.config.num_epochs:
            log.info("workdir %s already holds all %d epochs; nothing to train", self.workdir, last_epoch)
        gc.freeze()  # what exists now lives to the end: out of the collector's way, checkpoints block less
        status = "finished"
        try:
            # The handlers stay until the last checkpoint is written: a stop then waits for it.
            with self.stop:  # raises KeyboardInterrupt for a Ctrl-C that start-up swallowed
                try:
                    self._epochs(last_epoch)
                except BaseException:
                    self.in_flight.salvage()
                    raise
                finally:
                    self.close()
        except BaseException as e:
            status = _how_it_ended(e)
            raise
        finally:
            gc.unfreeze()
            if self.sessions is not None:
                self.sessions.end(status, epochs_done=self.records.epochs_done())
        return self.records.summary()

    def _epochs(self, last_epoch: int) -> None:
        """From where the run starts to `last_epoch` (or an early stop), then the last checkpoints."""
        state, phase = self.start.state, self.start.phase
        for epoch in range(self.start.epoch, last_epoch):
            if phase_of(self.config, epoch) != phase:  # a new phase: a new optimizer and schedule
                phase = phase_of(self.config, epoch)
                state["opt_state"] = self.setup.opt_state(phase, state["params"])
                log.info("epoch %d: phase %r starts (lr %g)", epoch + 1, phase.name, phase.lr)
            state, end = self.train_epoch(epoch, phase, state)
            if not self.end_epoch(end, state):
                break
        self.in_flight.drain()
        self.records.wait()  # the last checkpoints, written in the background
        if self.stop.requested:
            name = signal.Signals(self.stop.signum).name
            log.info(
                "%s arrived after the last epoch: its checkpoint was written first; the run is complete", name
            )

    def train_epoch(self, epoch: int, phase: Phase, state):
        """Dispatch `epoch`'s chunks from where the run starts, the host processing the oldest
        calls while more than `run_ahead_chunks` are in flight; queue its validation and its end.
        Returns (the state after the epoch, its EpochEnd). A stop agreed mid-epoch saves and raises."""
        first_step = self.start.step if epoch == self.start.epoch else 0
        sums = self.start.sums if first_step else self.setup.zero_sums()
        ep = self.in_flight.begin(epoch, phase, first_step, sums, show_bar=self.progress and self.is_main)
        spe = self.setup.steps_per_epoch
        if self.profile.covers(epoch):
            self.profile.start("train")
        while ep.next_step < spe:
            run_chunk = self.setup.compiled_chunk(phase, ep.size, state, sums, ep.args)
            if not ep.dispatched:
                ep.end.clock.mark("train")
            state, sums, vote = run_chunk(
                state,
                sums,
                *ep.args,
                jax.numpy.int32(ep.next_step),
                self.setup.stop_votes(self.stop.signum),
                self.setup.numbers(phase),
            )
            self.in_flight.push(Chunk(ep, ep.next_step, sums, vote))
            ep.next_step, ep.dispatched = ep.next_step + ep.size, ep.dispatched + 1
            if self.profile.tracing and (
                ep.next_step - first_step >= self.config.profile.steps or ep.next_step >= spe
            ):
                self.profile.stop(sums)
            self.setup.note_first_step(sums, self.t_start)
            if ep.next_step < spe:  # after the last chunk, validation is queued first: then the host reads
                self.in_flight.drain(keep=self.config.run_ahead_chunks)
                if self.in_flight.stop_signum:
                    self.in_flight.stop_mid_epoch(ep, state, sums)
        ep.end.val_sums, ep.end.state = self.validate(epoch, state), state
        self.in_flight.push(ep.end)
        return state, ep.end

    def validate(self, epoch: int, state):
        """Queue validation of `state` on the device (traced alone in the profiled epoch)."""
        if self.profile.covers(epoch):
            return self.profile.traced("val", self.setup.validate, state)
        return self.setup.validate(state)

    def end_epoch(self, end: EpochEnd, state) -> bool:
        """Read the epoch's chunks (its stop votes known), then end it now, or once the next epoch's
        first chunks run (`can_run_ahead`: its checkpoint then from a device copy of `state`).
        False when the run ends here (early stopping); a stop agreed here saves and raises."""
        self.in_flight.drain(keep=1)  # everything but this end
        if self.can_run_ahead(end):
            t_copy = time.perf_counter()
            # The next epoch's first chunk takes `state` (donated): checkpoint a copy.
            end.state = Snapshot.of(state) if self.records.checkpoint_due(end.epoch) else None
            end.copy_s = time.perf_counter() - t_copy
            return True
        self.in_flight.drain()
        if self.records.ended:
            return False
        signum = self.in_flight.stop_signum
        if signum and end.epoch + 1 < self.config.num_epochs:
            self.records.stop_here(signum, end, state)
        return True

    def can_run_ahead(self, end: EpochEnd) -> bool:
        """Whether the next epoch may start before `end` is processed: same phase, its chunk already
        compiled, no stop agreed, no early stop possible at this validation, not profiled."""
        config, epoch = self.config, end.epoch
        return bool(
            config.run_ahead_chunks
            and epoch + 1 < config.num_epochs
            and not self.in_flight.stop_signum
            and not self.records.may_end_at_next_validation()
            and not self.profile.covers(epoch)
            and phase_of(config, epoch + 1) == end.phase
            and self.setup.is_compiled(end.phase, self.setup.chunk)
        )

    def close(self) -> None:
        self.profile.abandon()  # after an error inside the traced window
        self.records.close()


def _how_it_ended(e: BaseException) -> str:
    """A session's status in sessions.json for the exception that ended it."""
    if isinstance(e, Interrupted):
        return f"stopped by {signal.Signals(e.signum).name}"
    if isinstance(e, KeyboardInterrupt):  # a Ctrl-C before training (in training it is `Interrupted`)
        return "stopped by SIGINT"
    return f"failed: {one_line(e, 300)}"


def _progress(total: int, desc: str, initial: int = 0):
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs stay clean).
    return tqdm(
        total=total, initial=initial, desc=desc, unit="step", leave=False, dynamic_ncols=True, disable=None
    )
