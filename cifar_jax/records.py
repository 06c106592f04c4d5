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
import functools
import json
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
from cifar_jax.tracking import CurvesPlotter

log = logging.getLogger("cifar_jax")

DIVERGED = "diverged: loss became NaN/Inf"  # how a member's last row says it diverged


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
    diverged: str | None = None  # a member's loss that was not finite, and where
    diverged_epoch: int | None = None  # the epoch it diverged in (0-based; its row says so)

    def describe(self) -> str:
        return "" if self.member is None else f"member {self.member.index} ({self.member.label()})"

    @property
    def ended(self) -> str | None:
        return self.diverged or self.early.ended

    def ended_before(self, epoch: int) -> bool:
        """Whether the run ended before `epoch` (0-based): it records nothing more."""
        if self.diverged is not None:
            return self.diverged_epoch < epoch
        if not self.early.ended:
            return False
        ended_rows = [r["epoch"] for r in self.recorder.rows if r.get("ended")]
        ended_at = ended_rows[-1] - 1 if ended_rows else self.start.epoch - 1  # restored ended
        return ended_at < epoch


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
                group=(config.wandb.name or workdir.name) if run.member else None,
            )
        self.is_main = is_main
        self.population_plot = (
            CurvesPlotter(
                workdir / "population.png", draw=functools.partial(population.plot_members, self.members)
            )
            if self.members and is_main
            else None
        )

    def _resume(self, member, config, workdir: Path, fresh_state) -> Run:
        workdir.mkdir(parents=True, exist_ok=True)
        ckpts = Checkpoints(workdir, keep=config.checkpoint.keep, config=config)
        early = EarlyStop(config.early_stop.patience, config.early_stop.min_delta)
        start = resume(config, ckpts, fresh_state, self._zero_member_sums)
        early.restore(start.early_stop)
        run = Run(member, config, workdir, ckpts, early, start)
        if member is not None:  # a member that diverged in an earlier session stays ended
            last = _last_row(workdir)
            if last is not None and str(last.get("ended", "")).startswith(DIVERGED):
                run.diverged, run.diverged_epoch = last["ended"], last["epoch"] - 1
                # Its rows end with that epoch's; its slot in the program holds a fresh state.
                phase = phase_after(config, last["epoch"])
                run.start = Start(last["epoch"], 0, phase, fresh_state(phase), None, last)
        return run

    def _zero_member_sums(self):
        from cifar_jax import steps

        return jax.device_put(steps.zero_metrics(), sharding.replicated(self.setup.mesh))

    def _align(self) -> None:
        """Members that resumed at different points (a run killed while it saved them one after
        another) go back to the earliest epoch end they all have: what they saved after it is
        trained again, bit for bit as before."""
        going = [run for run in self.runs if not run.ended]
        if not going:
            return
        points = {(run.start.epoch, run.start.step) for run in going}
        target = min(points)
        for run in self.runs:  # an ended member trains no more: its slot holds a fresh state
            if run.ended and (run.start.epoch, run.start.step) != target:
                phase = phase_after(run.config, target[0])
                state = population.unstack(self.setup.fresh_state(phase))[run.member.index]
                sums = self._zero_member_sums() if target[1] else None
                run.start = dataclasses.replace(
                    run.start, epoch=target[0], step=target[1], phase=phase, state=state, sums=sums
                )
        if len(points) == 1:
            return
        epoch, step = min(points)
        if step:
            raise ValueError(
                f"the members in {self.workdir} were stopped at different steps ({sorted(points)}); "
                "move their mid_epoch checkpoints aside to resume from their last epoch ends"
            )
        for run in going:
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
        """Why the program has nothing more to train: every run ended (early, or diverged)."""
        reasons = [run.ended for run in self.runs]
        return reasons[0] if all(reasons) else None

    def may_end_at_next_validation(self) -> bool:
        return any(run.early.may_end_at_next_validation() for run in self.runs if not run.ended)

    def checkpoint_due(self, epoch: int) -> bool:
        return self.runs[0].recorder.checkpoint_due(epoch)  # the same schedule for every member

    def kept_checkpoints(self, epoch: int) -> str:
        """What an error in `epoch` leaves, as a sentence."""
        kept = self.runs[0].recorder.kept_checkpoints(epoch)
        return f"{kept}." if not self.members else f"{kept} (and each member's in its own workdir)."

    def check(self) -> None:
        """A failed background write of any run stops the program at once."""
        for run in self.runs:
            write_or_fail(run.ckpts.check, run.ckpts)

    def wait(self) -> None:
        for run in self.runs:
            write_or_fail(run.ckpts.wait, run.ckpts)

    def diverged(self, host_sums: dict, epoch: int, where: str, lr: float) -> TrainingError | None:
        """After a chunk of `epoch`: the error if its loss was not finite in a run alone, or in the
        last members still training; a population's member that diverged alone ends there (its
        row says so) and the others go on."""
        nonfinite = np.atleast_1d(host_sums["nonfinite_steps"])
        if not nonfinite.any():
            return None
        kept = self.kept_checkpoints(epoch)
        if not self.members:
            return TrainingError(f"loss became NaN/Inf in {where} (lr {lr:g}); {kept} Lower optimizer.lr?")
        new = [self.runs[k] for k in np.flatnonzero(nonfinite) if not self.runs[k].ended]
        for run in new:
            run.diverged, run.diverged_epoch = f"{DIVERGED} in {where}", epoch
            log.warning(
                "%s: loss became NaN/Inf in %s; it stops there (its checkpoints stay in %s), the others "
                "go on",
                run.describe(),
                where,
                run.ckpts.directory,
            )
        if new and all(run.ended for run in self.runs):
            which = ", ".join(run.describe() for run in new)
            return TrainingError(
                f"loss became NaN/Inf in {which}, {where}, and no member is left training; {kept} "
                "Lower optimizer.lr or leave the largest out of population.sweep?"
            )
        return None

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
            if run.ended_before(end.epoch):
                continue
            member_end = dataclasses.replace(
                end,
                lr=lrs[k],
                clock=copy.deepcopy(end.clock),
                train_sums=population.take(end.train_sums, k),
                val_sums=population.take(val, k) if val is not None else None,
                state=states[k],
                images=end.images // len(self.runs),
            )
            diverged = run.diverged if run.diverged_epoch == end.epoch else None
            run.recorder.record(member_end, diverged=diverged)
            end.member_ends.append((run, member_end, k))
        if end.member_ends:  # "done": when the last member's end was
            end.clock.at.update(end.member_ends[-1][1].clock.at)
        end.meta = {"saved": all(e.meta["saved"] for _, e, _ in end.member_ends)}
        if self.is_main:
            rows_of = [run.recorder.rows for run in self.runs]
            population.write_table(self.workdir, self.members, rows_of)
            self.population_plot.update(rows_of)

    def _member_states(self, state) -> list:
        if state is None:
            return [None] * len(self.runs)
        return population.unstack(state.tree if isinstance(state, Snapshot) else state)

    def stop_here(self, signum: int, end: EpochEnd, state) -> None:
        """A stop agreed in `end`'s epoch: every run's checkpoint written and waited for, then Interrupted."""
        if not self.members:
            self.runs[0].recorder.save_at_stop(end, state)
        else:
            states = population.unstack(state)
            for run, member_end, k in end.member_ends:
                if not run.ended:
                    run.recorder.save_at_stop(member_end, states[k])
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
            if not run.ended:
                write_or_fail(lambda: run.ckpts.mid_epoch.save(global_step, tree, meta), run.ckpts)

    def close(self) -> None:
        for run in self.runs:
            try:
                run.ckpts.wait()
            except Exception:  # noqa: BLE001  (reported by write_or_fail where it matters)
                pass
            run.ckpts.close()
            run.recorder.close()
        if self.population_plot is not None:
            self.population_plot.close()

    def summary(self) -> list:
        """The run's rows (process 0; [] elsewhere); for a population, each member's."""
        if not self.members:
            return self.runs[0].recorder.summary()
        return [run.recorder.summary() for run in self.runs]

    def epochs_done(self) -> int:
        return max(len(run.recorder.rows) for run in self.runs)


def _last_row(workdir: Path) -> dict | None:
    """The last complete row of `workdir`'s metrics.jsonl, or None."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return None
    for line in reversed(path.read_bytes().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None
