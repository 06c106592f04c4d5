"""What each run of a training program keeps: its checkpoints, early stopping, metrics rows and
config.json. A program trains one run, in its workdir, or a population (population.py), whose
member k is a run of its own in `<workdir>/member_<k>/`.

`Records` resumes each run from its own checkpoints and gives the trainer one start (for a
population: the members' states stacked), then splits each epoch's end, stop and mid-epoch
checkpoint among the runs, so the trainer's loop is the same for one run and for many.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import jax
import numpy as np

from cifar_jax import population, sharding
from cifar_jax.checkpoint import Checkpoints, Snapshot, write_or_fail
from cifar_jax.early_stop import EarlyStop
from cifar_jax.epoch_end import EpochEnd, EpochRecorder
from cifar_jax.errors import TrainingError
from cifar_jax.phases import phase_after
from cifar_jax.resume import Start, resume, save_config
from cifar_jax.runguard import Interrupted

log = logging.getLogger("cifar_jax")


@dataclasses.dataclass
class Run:
    """One run's keeping: a run alone (`member` None) or a population's member."""

    member: population.Member | None
    config: object
    workdir: Path
    ckpts: Checkpoints
    early: EarlyStop
    start: Start
    recorder: EpochRecorder | None = None

    def describe(self) -> str:
        return "" if self.member is None else f"member {self.member.index} ({self.member.label()})"


class Records:
    def __init__(self, config, workdir: Path, is_main: bool, setup, changed: dict):
        self.config, self.workdir, self.setup = config, workdir, setup
        self.members = setup.members
        if not self.members:
            self.runs = [self._resume(None, config, workdir, setup.fresh_state)]
            self.start = self.runs[0].start
        else:
            templates = {}  # phase name -> each member's fresh state (a restore's template)

            def fresh(k):
                def member_state(phase):
                    if phase.name not in templates:
                        templates[phase.name] = population.unstack(setup.fresh_state(phase))
                    return templates[phase.name][k]

                return member_state

            self.runs = [self._resume(m, m.config, workdir / m.name, fresh(m.index)) for m in self.members]
            self._align()
            self.start = self._stacked_start()
        if is_main:  # the state matches the config: now it describes the run(s)
            save_config(config, workdir, self.start, changed, setup.lr_at)
            for run in self.runs if self.members else ():
                lr_at = lambda phase, epoch, k=run.member.index: setup.member_lrs(phase, epoch)[k]
                save_config(run.config, run.workdir, run.start, changed, lr_at)
        for run in self.runs:
            run.recorder = EpochRecorder(
                run.config,
                run.workdir,
                is_main,
                run.ckpts,
                run.early,
                run.start,
                start_times=setup.start_times,
                name=f"member {run.member.index}: " if run.member else "",
            )
        self.is_main = is_main

    def _resume(self, member, config, workdir: Path, fresh_state) -> Run:
        workdir.mkdir(parents=True, exist_ok=True)
        ckpts = Checkpoints(workdir, keep=config.checkpoint.keep, config=config)
        early = EarlyStop(config.early_stop.patience, config.early_stop.min_delta)
        start = resume(config, ckpts, fresh_state, self._zero_member_sums)
        early.restore(start.early_stop)
        return Run(member, config, workdir, ckpts, early, start)

    def _zero_member_sums(self):
        from cifar_jax import steps

        return jax.device_put(steps.zero_metrics(), sharding.replicated(self.setup.mesh))

    def _align(self) -> None:
        """Members that resumed at different points (a run killed while it saved them one after
        another) go back to the earliest epoch end they all have: what they saved after it is
        trained again, bit for bit as before."""
        points = {(run.start.epoch, run.start.step) for run in self.runs}
        if len(points) == 1:
            return
        epoch, step = min(points)
        if step:
            raise ValueError(
                f"the members in {self.workdir} were stopped at different steps ({sorted(points)}); "
                "move their mid_epoch checkpoints aside to resume from their last epoch ends"
            )
        for run in self.runs:
            if (run.start.epoch, run.start.step) == (epoch, 0):
                continue
            run.ckpts.mid_epoch.clear()
            for later in [e for e in run.ckpts.epochs() if e > epoch]:
                run.ckpts.manager.delete(later)
            phase = phase_after(run.config, epoch)
            if epoch == 0:
                state = population.unstack(self.setup.fresh_state(phase))[run.member.index]
                run.start = Start(0, 0, phase, state, None, None)
            else:
                state, meta = run.ckpts.restore(epoch, run.start.state)
                run.start = Start(epoch, 0, phase, state, None, meta["row"], meta.get("early_stop"))
            run.early = EarlyStop(run.config.early_stop.patience, run.config.early_stop.min_delta)
            run.early.restore(run.start.early_stop)
            log.info("%s goes back to epoch %d, where every member resumes", run.describe(), epoch)

    def _stacked_start(self) -> Start:
        first = self.runs[0].start
        mesh = self.setup.mesh
        state = population.stack([run.start.state for run in self.runs], mesh)
        sums = population.stack([run.start.sums for run in self.runs], mesh) if first.step else None
        return Start(first.epoch, first.step, first.phase, state, sums, first.row)

    # What the trainer asks of its runs.

    @property
    def ended(self) -> str | None:
        """Why the program has nothing more to train: every run ended early."""
        reasons = [run.early.ended for run in self.runs]
        return reasons[0] if all(reasons) else None

    def may_end_at_next_validation(self) -> bool:
        return any(run.early.may_end_at_next_validation() for run in self.runs)

    def checkpoint_due(self, epoch: int) -> bool:
        return self.runs[0].recorder.checkpoint_due(epoch)  # the same schedule for every member

    def kept_checkpoints(self, epoch: int) -> str:
        kept = self.runs[0].recorder.kept_checkpoints(epoch)
        return kept if not self.members else f"{kept[:-1]} (and each member's in its own workdir)."

    def check(self) -> None:
        """A failed background write of any run stops the program at once."""
        for run in self.runs:
            write_or_fail(run.ckpts.check, run.ckpts)

    def wait(self) -> None:
        for run in self.runs:
            write_or_fail(run.ckpts.wait, run.ckpts)

    def diverged(self, host_sums: dict, epoch: int, where: str, lr: float) -> TrainingError | None:
        """The error for a chunk of `epoch` whose loss was not finite (in which members), else None."""
        nonfinite = np.atleast_1d(host_sums["nonfinite_steps"])
        if not nonfinite.any():
            return None
        kept = self.kept_checkpoints(epoch)
        if not self.members:
            return TrainingError(f"loss became NaN/Inf in {where} (lr {lr:g}); {kept} Lower optimizer.lr?")
        which = ", ".join(self.runs[k].describe() for k in np.flatnonzero(nonfinite))
        return TrainingError(
            f"loss became NaN/Inf in {which}, {where}; {kept} Lower its optimizer.lr or leave it out of "
            "population.sweep?"
        )

    def record(self, end: EpochEnd) -> None:
        """End `end`'s epoch in every run (its row, its checkpoint when due); a population's table."""
        if not self.members:
            self.runs[0].recorder.record(end)
            return
        val = sharding.to_host(end.val_sums) if end.val_sums is not None else None
        end.clock.mark("end")
        states = self._member_states(end.state)
        lrs = self.setup.member_lrs(end.phase, end.epoch)
        end.member_ends = []
        for k, run in enumerate(self.runs):
            member_end = dataclasses.replace(
                end,
                lr=lrs[k],
                clock=copy.deepcopy(end.clock),
                train_sums=population.take(end.train_sums, k),
                val_sums=population.take(val, k) if val is not None else None,
                state=states[k],
                images=end.images // len(self.runs),
            )
            run.recorder.record(member_end)
            end.member_ends.append(member_end)
        end.clock.at.update(end.member_ends[-1].clock.at)  # "done": when the last member's end was
        end.meta = {"saved": all(e.meta["saved"] for e in end.member_ends)}
        if self.is_main:
            population.write_table(self.workdir, self.members, [run.recorder.rows for run in self.runs])

    def _member_states(self, state) -> list:
        if state is None:
            return [None] * len(self.runs)
        return population.unstack(state.tree if isinstance(state, Snapshot) else state)

    def stop_here(self, signum: int, end: EpochEnd, state) -> None:
        """A stop agreed in `end`'s epoch: every run's checkpoint written and waited for, then Interrupted."""
        if not self.members:
            self.runs[0].recorder.save_at_stop(end, state)
        else:
            for run, member_end, member_state in zip(self.runs, end.member_ends, population.unstack(state)):
                run.recorder.save_at_stop(member_end, member_state)
        self.wait()
        raise Interrupted(signum, f"the end of epoch {end.epoch + 1}", self.workdir)

    def save_mid_epoch(self, global_step: int, state, sums, meta: dict) -> None:
        """Each run's state and metric sums after the last dispatched chunk."""
        if not self.members:
            trees = [{"state": state, "sums": sums}]
        else:
            trees = [
                {"state": s, "sums": m} for s, m in zip(population.unstack(state), population.unstack(sums))
            ]
        for run, tree in zip(self.runs, trees):
            write_or_fail(lambda: run.ckpts.mid_epoch.save(global_step, tree, meta), run.ckpts)

    def close(self) -> None:
        for run in self.runs:
            try:
                run.ckpts.wait()
            except Exception:  # noqa: BLE001  (reported by write_or_fail where it matters)
                pass
            run.ckpts.close()
            run.recorder.close()

    def summary(self) -> list:
        """The run's rows (process 0; [] elsewhere); for a population, each member's."""
        if not self.members:
            return self.runs[0].recorder.summary()
        return [run.recorder.summary() for run in self.runs]

    def epochs_done(self) -> int:
        return len(self.runs[0].recorder.rows)
