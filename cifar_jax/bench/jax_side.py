"""This project's side of the benchmark: the trainer's jitted chunk of steps and evaluation's fused
batches (`JaxSide`); the whole epoch and the input pipeline's share are in `jax_modes`."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

from cifar_jax.bench.cases import (
    COLOR_JITTER,
    LABEL_SMOOTHING,
    LR,
    NUM_CLASSES,
    NUM_EVAL,
    WEIGHT_DECAY,
    Case,
    num_train,
    random_uint8,
)
from cifar_jax.bench.timing import median_rate, row, step_ms, timed_windows


def jax_config(case: Case, opts):
    """The training config a user would run for `case` (AdamW, label smoothing, crop+flip+jitter)."""
    from cifar_jax import config as config_lib

    c = config_lib.base()
    c.model.name, c.model.num_classes = case.arch, NUM_CLASSES
    if case.stem:
        c.model.stem = case.stem
    c.batch_size, c.eval_batch_size = opts.batch_size, opts.eval_batch_size
    c.data.image_size = case.image_size
    c.data.augment.color_jitter = COLOR_JITTER
    c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay = "adamw", LR, WEIGHT_DECAY
    c.label_smoothing = LABEL_SMOOTHING
    c.schedule.per = "step"
    c.steps_per_call = opts.steps_per_call
    c.eval_batches_per_call = opts.eval_batches_per_call
    config_lib.validate(c)
    return c


def eval_window(config, timed_batches: int) -> int:
    """Eval batches per timed window, on both sides: what the trainer fuses into one jitted call
    for a NUM_EVAL-image split, but no more than the batches to time (`--steps`)."""
    from cifar_jax import steps

    wanted = min(steps.eval_batches_per_call(config), timed_batches)
    return steps.eval_calls(-(-NUM_EVAL // config.eval_batch_size), wanted)[0]


def _chunk_window(carry: list, chunk, *args):
    """A timed window: one call of the training `chunk` on `carry` = [state, metrics], which it
    updates (the state is donated to the next window); returns the window's metrics to wait on."""

    def window():
        carry[:] = chunk(carry[0], carry[1], *args)[:2]  # the trainer's chunk also returns the stop vote
        return carry[1]

    return window


class JaxSide:
    """This project's own jitted code for one case: the trainer's step, evaluate's forward pass."""

    def __init__(self, case: Case, opts, num_train: int):
        import jax

        from cifar_jax import phases, sharding, steps, train_state
        from cifar_jax.data import pipeline
        from cifar_jax.models import layers

        self.config = config = jax_config(case, opts)
        self.mesh = sharding.make_mesh()
        self.sharding = sharding.batch_sharding(self.mesh)
        self.replicated = jax.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.preprocess = pipeline.Preprocess.from_config(config.data)
        self.steps_per_epoch = pipeline.steps_per_epoch(num_train, config.batch_size)
        self.steps_per_call = steps.steps_per_call(config, self.steps_per_epoch)
        phase = phases.phases(config)[0]
        ops = layers.OPS[opts.jax_layers]  # which implementation of the operations runs
        graphdefs, self.state = train_state.create_train_state(config, NUM_CLASSES, self.mesh, ops=ops)
        self.step_cfg, _ = phases.step_config(
            config,
            phase,
            graphdefs,
            preprocess=self.preprocess,
            num_classes=NUM_CLASSES,
            steps_per_epoch=self.steps_per_epoch,
            sharding=self.sharding,
        )
        self.graphdef_eval = graphdefs.eval
        self.state["opt_state"] = train_state.init_opt_state(
            self.step_cfg.tx, self.state["params"], graphdefs, phase, self.mesh
        )
        self.train_chunk = steps.make_train_chunk(self.step_cfg, self.steps_per_call)
        self.no_stop = steps.stop_votes(None, self.sharding)
        self.device = f"{jax.devices()[0].device_kind} x{jax.device_count()}"
        self.dtype = train_state.compute_dtype(config)

    def put(self, x):
        from cifar_jax import sharding

        return sharding.replicate(x, self.mesh)

    def zero_metrics(self):
        import jax

        from cifar_jax import steps

        return jax.device_put(steps.zero_metrics(), self.replicated)

    def train(self, opts, case):
        import jax
        import jax.numpy as jnp

        n = self.steps_per_call * self.config.batch_size
        x, y = (self.put(a) for a in random_uint8(n))
        order, epoch, first = jnp.arange(n), jnp.int32(0), jnp.int32(0)
        carry = [self.state, self.zero_metrics()]
        window = _chunk_window(carry, self.train_chunk, x, y, order, epoch, first, self.no_stop)
        windows = -(-opts.steps // self.steps_per_call)
        first_s, times = timed_windows(window, jax.block_until_ready, opts.warmup, windows)
        extra = {"profile": self._profile(window, opts, case, "train")} if opts.profile else {}
        self.state = carry[0]
        return row(
            case,
            opts,
            "jax",
            "train",
            f"{self.dtype}, {self.steps_per_call} steps/call",
            self.device,
            median_rate(n, times),
            first_s - statistics.median(times),
            step_ms=step_ms(times, self.steps_per_call),
            **extra,
        )

    def _profile(self, window, opts, case, mode: str) -> dict:
        """Two more windows of `mode` (after the timed ones) under jax.profiler; the trace's device
        summary."""
        import jax

        from cifar_jax import profiling

        directory = Path(opts.profile) / f"{case.model}_{case.image_size}_{mode}"
        with jax.profiler.trace(str(directory), create_perfetto_trace=True):
            window()
            jax.block_until_ready(window())
        summary = profiling.trace_summary(profiling.latest_trace(directory))
        print(profiling.format_summary(summary), file=sys.stderr, flush=True)
        return summary

    def eval(self, opts, case):
        import jax
        import jax.numpy as jnp

        from cifar_jax import steps

        per_call = eval_window(self.config, opts.steps)
        batch_logits = steps.make_batch_logits(
            self.graphdef_eval,
            preprocess=self.preprocess,
            batch_size=opts.eval_batch_size,
            sharding=self.sharding,
        )
        x, _ = random_uint8(per_call * opts.eval_batch_size)
        x = self.put(x)
        first = jnp.int32(0)

        def window():
            return batch_logits(self.state["params"], self.state["batch_stats"], x, first, per_call=per_call)

        windows = -(-opts.steps // per_call)
        first_s, times = timed_windows(window, jax.block_until_ready, opts.warmup, windows)
        extra = {"profile": self._profile(window, opts, case, "eval")} if opts.profile else {}
        return row(
            case,
            opts,
            "jax",
            "eval",
            f"{self.dtype}, {per_call} batches/call",
            self.device,
            median_rate(per_call * opts.eval_batch_size, times),
            first_s - statistics.median(times),
            batch_size=opts.eval_batch_size,
            step_ms=step_ms(times, per_call),
            **extra,
        )


def run_jax(cases, modes, opts, epoch_data, log, record) -> None:
    import jax

    from cifar_jax.bench import jax_modes

    for case in cases:
        side = JaxSide(case, opts, num_train(modes, epoch_data))  # its model runs opts.jax_layers
        for mode in modes:
            log(f"jax {mode} {case}")
            if mode == "epoch":
                result = jax_modes.epoch(side, opts, case, *epoch_data)
            elif mode == "pipeline":
                result = jax_modes.pipeline(side, opts, case)
            else:
                result = getattr(side, mode)(opts, case)
            if opts.jax_layers != "auto":
                result["variant"] += f", {opts.jax_layers} layers"
            if os.environ.get("XLA_FLAGS"):  # what XLA compiled with, where it was told more
                result["xla_flags"] = os.environ["XLA_FLAGS"]
            record(result)
        del side
        jax.clear_caches()
