"""This project's side of the benchmark: the trainer's jitted chunk of steps, evaluation's fused
batches, the whole epoch and the input pipeline's share."""

from __future__ import annotations

import statistics
import sys
import time
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

        self.config = config = jax_config(case, opts)
        self.mesh = sharding.make_mesh()
        self.sharding = sharding.batch_sharding(self.mesh)
        self.replicated = jax.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.preprocess = pipeline.Preprocess.from_config(config.data)
        self.steps_per_epoch = pipeline.steps_per_epoch(num_train, config.batch_size)
        self.steps_per_call = steps.steps_per_call(config, self.steps_per_epoch)
        phase = phases.phases(config)[0]
        graphdefs, _ = train_state.create_train_state(config, NUM_CLASSES, self.mesh)
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
        _, self.state = train_state.create_train_state(
            config, NUM_CLASSES, self.mesh, phase, self.step_cfg.tx
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

    def pipeline(self, opts, case):
        """What the input pipeline costs, measured two ways.

        Alone: run as the training step runs it, `steps_per_call` batches per jitted call. Each
        batch is summed so that XLA cannot drop it: a pass the step does not make, so its share is
        an upper bound. (One batch per call would time the call's dispatch instead, which on a GPU
        is longer than a whole SimpleCNN step.)
        In the step: the training chunk against the same chunk fed the chunk's batches prepared
        beforehand (`steps.update_step` on each in turn; one batch fed to every step would let XLA
        hoist the work that depends on the images alone out of the loop), in alternating rounds;
        the difference of their medians per step (`in_step_ms`, `in_step_share`) is what the
        pipeline adds to a step where it runs."""
        import functools

        import jax
        import jax.numpy as jnp

        from cifar_jax.data import pipeline

        k, b = self.steps_per_call, self.config.batch_size
        n = k * b
        x, y = (self.put(a) for a in random_uint8(n))
        draw = functools.partial(
            pipeline.train_batch, seed=0, batch_size=b, preprocess=self.preprocess, sharding=self.sharding
        )
        in_step = self._pipeline_in_step(opts, x, y, draw)

        @jax.jit
        def draws(x, y, order, epoch, first):
            def body(i, total):
                xb, yb = draw(x, y, order, epoch=epoch, step=first + i)
                return total + jnp.sum(xb, dtype=jnp.float32) + jnp.sum(yb)

            return body(0, jnp.float32(0)) if k == 1 else jax.lax.fori_loop(0, k, body, jnp.float32(0))

        order, epoch, first = jnp.arange(n), jnp.int32(0), jnp.int32(0)

        def window():
            return draws(x, y, order, epoch, first)

        windows = -(-opts.steps // k)
        first_s, times = timed_windows(window, jax.block_until_ready, opts.warmup, windows)
        return row(
            case,
            opts,
            "jax",
            "pipeline",
            f"on device, {k} batches/call",
            self.device,
            median_rate(n, times),
            first_s - statistics.median(times),
            step_ms=step_ms(times, k),
            **in_step,
        )

    def prepared_chunk(self, x, y, draw):
        """(chunk, batches): the training chunk on batches drawn beforehand, the `steps_per_call`
        batches that the chunk itself draws from `x`, `y` at epoch 0, step 0. Each step gets its
        own batch: one batch fed to every step would let XLA hoist the work that depends on the
        images alone out of the loop."""
        import functools

        import jax
        import jax.numpy as jnp

        from cifar_jax import steps

        k, cfg = self.steps_per_call, self.step_cfg
        order, epoch = jnp.arange(x.shape[0]), jnp.int32(0)
        batches = jax.jit(
            lambda x, y, order, epoch: jax.tree.map(
                lambda *b: jnp.stack(b), *(draw(x, y, order, epoch=epoch, step=i) for i in range(k))
            )
        )(x, y, order, epoch)

        @functools.partial(jax.jit, donate_argnums=0)
        def chunk(state, metrics, batches):
            def body(i, carry):
                xb, yb = (jax.lax.dynamic_index_in_dim(a, i, keepdims=False) for a in batches)
                if cfg.sharding is not None:
                    xb, yb = (jax.lax.with_sharding_constraint(a, cfg.sharding) for a in (xb, yb))
                return steps.update_step(cfg, *carry, xb, yb)

            return jax.lax.fori_loop(0, k, body, (state, metrics))

        return chunk, batches

    def _pipeline_in_step(self, opts, x, y, draw, rounds: int = 2) -> dict:
        """{in_step_ms, in_step_share}: the training chunk's median time per step against the same
        chunk fed its batches prepared beforehand, timed in `rounds` alternating rounds."""
        import jax
        import jax.numpy as jnp

        k = self.steps_per_call
        order, epoch, first = jnp.arange(x.shape[0]), jnp.int32(0), jnp.int32(0)
        prepared_chunk, prepared = self.prepared_chunk(x, y, draw)
        carry = [self.state, self.zero_metrics()]
        with_pipeline = _chunk_window(carry, self.train_chunk, x, y, order, epoch, first, self.no_stop)
        with_prepared_batches = _chunk_window(carry, prepared_chunk, prepared)
        windows = max(-(-opts.steps // k) // rounds, 1)
        times = {with_pipeline: [], with_prepared_batches: []}
        for _ in range(rounds):
            for window in times:
                times[window] += timed_windows(window, jax.block_until_ready, opts.warmup, windows)[1]
        self.state = carry[0]
        step_ms = {w: statistics.median(t) / k * 1e3 for w, t in times.items()}
        in_step = step_ms[with_pipeline] - step_ms[with_prepared_batches]
        return {
            "in_step_ms": round(in_step, 4),
            "in_step_share": round(in_step / step_ms[with_pipeline], 4),
            "step_ms_with_pipeline": round(step_ms[with_pipeline], 4),
            "step_ms_prepared_batches": round(step_ms[with_prepared_batches], 4),
        }

    def epoch(self, opts, case, images, labels):
        import jax
        import jax.numpy as jnp

        from cifar_jax.data import pipeline

        t0 = time.perf_counter()
        x, y = self.put(images), self.put(labels)
        jax.block_until_ready((x, y))
        placement_s = time.perf_counter() - t0
        metrics = self.zero_metrics()
        args = (x, y, pipeline.epoch_order(0, 0, len(images)), jnp.int32(0))
        t0 = time.perf_counter()
        run = self.train_chunk.lower(self.state, metrics, *args, jnp.int32(0), self.no_stop).compile()
        compile_s = time.perf_counter() - t0
        # One warm-up call outside the epoch, as PyTorch gets one warm-up step: a program's first
        # run can be slower (on a GPU its kernels load then; BENCHMARKS.md, H100 second run).
        state, metrics, _ = run(self.state, metrics, *args, jnp.int32(0), self.no_stop)
        jax.block_until_ready(state)

        t0 = time.perf_counter()
        args = (
            x,
            y,
            pipeline.epoch_order(0, 0, len(images)),
            jnp.int32(0),
        )  # the order is drawn inside the timed epoch
        for first in range(0, self.steps_per_epoch, self.steps_per_call):
            state, metrics, _ = run(state, metrics, *args, jnp.int32(first), self.no_stop)
        jax.block_until_ready((state, metrics))
        seconds = time.perf_counter() - t0
        self.state = state
        n = self.steps_per_epoch * self.config.batch_size
        return row(
            case,
            opts,
            "jax",
            "epoch",
            f"device-resident data, {self.steps_per_call} steps/call",
            self.device,
            n / seconds,
            compile_s,
            epoch_s=round(seconds, 2),
            images=n,
            data_placement_s=round(placement_s, 2),
        )


def run_jax(cases, modes, opts, epoch_data, log, record) -> None:
    import contextlib

    import jax

    from cifar_jax.models import layers

    cache_was_on = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # measure compilation, not a cache hit
    forced = contextlib.nullcontext() if opts.jax_layers == "auto" else layers.forced(opts.jax_layers)
    try:
        with forced:
            for case in cases:
                side = JaxSide(case, opts, num_train(modes, epoch_data))
                for mode in modes:
                    log(f"jax {mode} {case}")
                    result = (
                        side.epoch(opts, case, *epoch_data)
                        if mode == "epoch"
                        else getattr(side, mode)(opts, case)
                    )
                    if opts.jax_layers != "auto":
                        result["variant"] += f", {opts.jax_layers} layers"
                    record(result)
                del side
                jax.clear_caches()
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was_on)
