"""A run's data and train state on the devices, and the compiled programs that use them.

`RunSetup(config)` loads the splits and replicates them on the mesh, creates the initial train
state, and compiles, on first use, each phase's chunk of training steps (`run_chunk`) and the
validation (`validate`). Everything here is the same in every process of a multi-process run.

A population (population.py): the train state, the metric sums and each epoch's order have a
leading member axis, and each phase's members' numbers (`numbers`) ride with every chunk.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp

from cifar_jax import data, phases, population, preflight, sharding, steps
from cifar_jax.data import pipeline
from cifar_jax.phases import Phase, PhaseSteps, phase_steps
from cifar_jax.train_state import create_train_state, init_opt_state

log = logging.getLogger("cifar_jax")


class RunSetup:
    def __init__(self, config):
        # A population's members share one structure: member 0's config describes it.
        self.members = population.members(config) if population.is_population(config) else None
        config = self.members[0].config if self.members else config
        self.config = config
        # A population's members in each operation at once on accelerators; one after another on
        # the CPU, where the vmapped program ran 1.6x slower than the members' runs in turn.
        self.vectorize = jax.default_backend() != "cpu"
        splits = data.load_splits(config.data)
        if splits.num_classes != config.model.num_classes:
            raise ValueError(preflight.class_count_mismatch(config, splits))
        self.n_train, self.num_classes = len(splits.train[0]), splits.num_classes
        if self.n_train < config.batch_size:
            raise ValueError(
                f"config: batch_size={config.batch_size} exceeds the {self.n_train} training examples"
            )
        self.steps_per_epoch = pipeline.steps_per_epoch(self.n_train, config.batch_size)
        total_steps = config.num_epochs * self.steps_per_epoch
        if total_steps >= 2**31:  # the optimizer's step count is int32
            raise ValueError(
                f"config: num_epochs={config.num_epochs} makes {total_steps:,} steps of batch "
                f"{config.batch_size}, past the 2**31 a schedule counts; use fewer epochs"
            )
        self.mesh = sharding.make_mesh()
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.train_x, self.train_y = (sharding.replicate(a, self.mesh) for a in splits.train)
        self.val = tuple(sharding.replicate(a, self.mesh) for a in splits.val) if len(splits.val[0]) else None
        self.preprocess = pipeline.Preprocess.from_config(config.data)
        self.chunk = steps.steps_per_call(config, self.steps_per_epoch)
        self.graphdefs, self.initial = self._initial_state()
        eval_batch = pipeline.eval_batch_size(config.eval_batch_size, len(splits.val[0]), jax.device_count())
        self.eval_sums = steps.make_eval_sums(
            self.graphdefs.eval,
            preprocess=self.preprocess,
            num_classes=self.num_classes,
            batch_size=eval_batch,
            label_smoothing=(
                [m.config.label_smoothing for m in self.members] if self.members else config.label_smoothing
            ),
            batches_per_call=steps.eval_batches_per_call(config),
            sharding=self.batch_sharding,
            members=len(self.members) if self.members else None,
            vectorize=self.vectorize,
        )
        self.start_times = {}  # compile_s and first_step_s, reported in the first epoch's row
        self._phase_steps: dict[str, PhaseSteps] = {}
        self._compiled = {}  # (phase name, steps per call) -> compiled chunk
        self._votes = {}  # signal number or None -> this process's stop votes on the devices
        self._numbers = {}  # phase name -> a population's numbers on the devices
        self._member_lrs = {}  # phase name -> each member's lr in each epoch of the phase

    def _initial_state(self):
        """(GraphDefs, the initial train state): a population's members each from their own seed."""
        if not self.members:
            return create_train_state(self.config, self.num_classes, self.mesh)
        made = [create_train_state(m.config, self.num_classes, self.mesh) for m in self.members]
        return made[0][0], population.stack([state for _, state in made], self.mesh)

    def numbers(self, phase: Phase) -> dict | None:
        """A population's numbers in `phase` (population.numbers), on the devices; None for one run."""
        if not self.members:
            return None
        if phase.name not in self._numbers:
            per_member = [
                population.numbers(m.config, phases.phase_of(m.config, phase.first_epoch).lr)
                for m in self.members
            ]
            self._numbers[phase.name] = population.stacked(per_member, self.mesh)
        return self._numbers[phase.name]

    def member_lrs(self, phase: Phase, epoch: int) -> list[float]:
        """Each member's learning rate in `epoch` of `phase` (for its metrics row)."""
        if phase.name not in self._member_lrs:
            self._member_lrs[phase.name] = [
                phases.epoch_lrs(
                    phases.make_tx(
                        m.config, phases.phase_of(m.config, phase.first_epoch), self.steps_per_epoch
                    )[0],
                    phase,
                    self.steps_per_epoch,
                )
                for m in self.members
            ]
        return [lrs[epoch - phase.first_epoch] for lrs in self._member_lrs[phase.name]]

    def phase_steps(self, phase: Phase) -> PhaseSteps:
        """What training `phase` needs (step configuration, each epoch's lr), made once."""
        if phase.name not in self._phase_steps:
            self._phase_steps[phase.name] = phase_steps(
                self.config,
                phase,
                self.graphdefs,
                preprocess=self.preprocess,
                num_classes=self.num_classes,
                steps_per_epoch=self.steps_per_epoch,
                sharding=self.batch_sharding,
            )
        return self._phase_steps[phase.name]

    def lr_at(self, phase: Phase, epoch: int) -> float:
        return self.phase_steps(phase).lr(epoch)

    def opt_state(self, phase: Phase, params):
        tx = self.phase_steps(phase).step.tx
        return init_opt_state(tx, params, self.graphdefs, phase, self.mesh, members=bool(self.members))

    def fresh_state(self, phase: Phase) -> dict:
        """The initial train state with `phase`'s optimizer state (a restore's template, too)."""
        params, batch_stats = self.initial["params"], self.initial["batch_stats"]
        state = {"params": params, "batch_stats": batch_stats, "opt_state": self.opt_state(phase, params)}
        return {**state, "ema": self.initial["ema"]} if "ema" in self.initial else state

    def zero_sums(self):
        sums = steps.zero_metrics()
        if self.members:
            sums = {k: jnp.zeros((len(self.members),), v.dtype) for k, v in sums.items()}
        return jax.device_put(sums, sharding.replicated(self.mesh))

    def chunk_size(self, first_step: int) -> int:
        """Steps per call from `first_step`: a resumed epoch may start mid-chunk, then one at a time."""
        return self.chunk if first_step % self.chunk == 0 else 1

    def is_compiled(self, phase: Phase, size: int) -> bool:
        return (phase.name, size) in self._compiled

    def epoch_args(self, epoch: int) -> tuple:
        """The arguments every chunk of `epoch` shares: the dataset, the epoch's order (each
        member's), the epoch."""
        if self.members:
            seeds = jnp.asarray([m.seed for m in self.members], jnp.int32)
            order = jax.vmap(lambda seed: pipeline.epoch_order(seed, epoch, self.n_train))(seeds)
        else:
            order = pipeline.epoch_order(self.config.seed, epoch, self.n_train)
        return self.train_x, self.train_y, order, jnp.int32(epoch)

    def compiled_chunk(self, phase: Phase, size: int, state, sums, args):
        """The jitted chunk of `size` steps of `phase`, compiled on first use (its time is logged):
        (state, sums, *args, first step, stop votes, numbers) -> (state, sums, agreed stop)."""
        if not self.is_compiled(phase, size):
            t0 = time.perf_counter()
            member_cfg = None
            if self.members:
                member_cfg = phases.member_step_config(
                    self.config, phase, self.phase_steps(phase).step, self.steps_per_epoch, self.members
                )
            fn = steps.make_train_chunk(self.phase_steps(phase).step, size, member_cfg, self.vectorize)
            lowered = fn.lower(state, sums, *args, jnp.int32(0), self.stop_votes(None), self.numbers(phase))
            self._compiled[phase.name, size] = lowered.compile()
            self.start_times["compile_s"] = round(time.perf_counter() - t0, 2)
            log.info(
                "compiled the %s train step (%d steps per call) in %.1f s",
                *(phase.name, size, self.start_times["compile_s"]),
            )
        return self._compiled[phase.name, size]

    def stop_votes(self, signum: int | None):
        """This process's stop vote for the chunks, put on the devices once per value."""
        if signum not in self._votes:
            self._votes[signum] = steps.stop_votes(signum, self.batch_sharding)
        return self._votes[signum]

    def note_first_step(self, sums, t_start: float) -> None:
        """One wait, once per run: how long until training really runs (data, model, compilation)."""
        if "first_step_s" not in self.start_times:
            jax.block_until_ready(sums)
            self.start_times["first_step_s"] = round(time.perf_counter() - t_start, 2)
            log.info(
                "first training step done %.1f s after the start (data, model, compilation)",
                self.start_times["first_step_s"],
            )

    def validate(self, state) -> dict | None:
        """Queue validation of `state` (and of its weight average): device sums, read later."""
        if self.val is None:
            return None
        sums = {"val": self.eval_sums(state["params"], state["batch_stats"], *self.val)}
        if "ema" in state:
            sums["ema_val"] = self.eval_sums(state["ema"]["params"], state["ema"]["batch_stats"], *self.val)
        return sums
