"""The JAX side's epoch and input-pipeline modes (`run_jax`), over a `JaxSide`."""

from __future__ import annotations

import statistics
import time

from cifar_jax.bench.cases import random_uint8
from cifar_jax.bench.jax_side import _chunk_window
from cifar_jax.bench.timing import median_rate, row, step_ms, timed_windows


def pipeline(side, opts, case):
    """What the input pipeline costs, measured two ways.

    Alone: run as the training step runs it, `steps_per_call` batches per jitted call. Each
    batch is summed so that XLA cannot drop it: a pass the step does not make, so its share is
    an upper bound. (One batch per call would time the call's dispatch instead, which on a GPU
    is longer than a whole SimpleCNN step.)
    In the step: the training chunk against the same chunk fed the chunk's batches prepared
    beforehand (`steps.run_steps` on them; one batch fed to every step would let XLA
    hoist the work that depends on the images alone out of the loop), in alternating rounds;
    the difference of their medians per step (`in_step_ms`, `in_step_share`) is what the
    pipeline adds to a step where it runs."""
    import functools

    from cifar_jax import steps
    from cifar_jax.data import pipeline

    k, b = side.steps_per_call, side.config.batch_size
    n = k * b
    x, y = (side.put(a) for a in random_uint8(n))
    draw = functools.partial(
        pipeline.train_batch, seed=0, batch_size=b, preprocess=side.preprocess, sharding=side.sharding
    )
    in_step = pipeline_in_step(side, opts, x, y, draw)

    def chunk_draws(epoch, first):  # as the training chunk draws them: every step's before its loop
        return steps.chunk_draws(side.step_cfg, epoch, first, k)["augment"]

    first_s, times = _draws_alone(opts, k, x, y, draw, chunk_draws)
    return row(
        case,
        opts,
        "jax",
        "pipeline",
        f"on device, {k} batches/call",
        side.device,
        median_rate(n, times),
        first_s - statistics.median(times),
        step_ms=step_ms(times, k),
        **in_step,
    )


def _draws_alone(opts, k, x, y, draw, chunk_draws):
    """(first window's seconds, timed windows) of `k` batches drawn per jitted call, their random
    numbers drawn before the loop (`chunk_draws(epoch, first)`), each batch summed so that XLA
    cannot drop it."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def draws(x, y, order, epoch, first):
        drawn = chunk_draws(epoch, first)

        def body(i, total):
            row_i = jax.tree.map(lambda d: d[i], drawn)
            xb, yb = draw(x, y, order, epoch=epoch, step=first + i, draws=row_i)
            return total + jnp.sum(xb, dtype=jnp.float32) + jnp.sum(yb)

        return body(0, jnp.float32(0)) if k == 1 else jax.lax.fori_loop(0, k, body, jnp.float32(0))

    order, epoch, first = jnp.arange(x.shape[0]), jnp.int32(0), jnp.int32(0)

    def window():
        return draws(x, y, order, epoch, first)

    return timed_windows(window, jax.block_until_ready, opts.warmup, -(-opts.steps // k))


def prepared_chunk(side, x, y, draw):
    """(chunk, batches): the training chunk on batches drawn beforehand, the `steps_per_call`
    batches that the chunk itself draws from `x`, `y` at epoch 0, step 0. Each step gets its
    own batch: one batch fed to every step would let XLA hoist the work that depends on the
    images alone out of the loop."""
    import functools

    import jax
    import jax.numpy as jnp

    from cifar_jax import steps

    k, cfg = side.steps_per_call, side.step_cfg
    order, epoch = jnp.arange(x.shape[0]), jnp.int32(0)
    batches = jax.jit(
        lambda x, y, order, epoch: jax.tree.map(
            lambda *b: jnp.stack(b), *(draw(x, y, order, epoch=epoch, step=i) for i in range(k))
        )
    )(x, y, order, epoch)

    @functools.partial(steps.jit, donate_argnums=0)
    def chunk(state, metrics, batches):
        def batch(i):
            xb, yb = (jax.lax.dynamic_index_in_dim(a, i, keepdims=False) for a in batches)
            if cfg.sharding is not None:
                xb, yb = (jax.lax.with_sharding_constraint(a, cfg.sharding) for a in (xb, yb))
            return xb, yb, None

        return steps.run_steps(cfg, state, metrics, k, batch)

    return chunk, batches


def pipeline_in_step(side, opts, x, y, draw, rounds: int = 2) -> dict:
    """{in_step_ms, in_step_share}: the training chunk's median time per step against the same
    chunk fed its batches prepared beforehand, timed in `rounds` alternating rounds."""
    import jax
    import jax.numpy as jnp

    k = side.steps_per_call
    order, epoch, first = jnp.arange(x.shape[0]), jnp.int32(0), jnp.int32(0)
    chunk_on_prepared, prepared = prepared_chunk(side, x, y, draw)
    carry = [side.state, side.zero_metrics()]
    with_pipeline = _chunk_window(carry, side.train_chunk, x, y, order, epoch, first, side.no_stop)
    with_prepared_batches = _chunk_window(carry, chunk_on_prepared, prepared)
    windows = max(-(-opts.steps // k) // rounds, 1)
    times = {with_pipeline: [], with_prepared_batches: []}
    for _ in range(rounds):
        for window in times:
            times[window] += timed_windows(window, jax.block_until_ready, opts.warmup, windows)[1]
    side.state = carry[0]
    step_ms = {w: statistics.median(t) / k * 1e3 for w, t in times.items()}
    in_step = step_ms[with_pipeline] - step_ms[with_prepared_batches]
    return {
        "in_step_ms": round(in_step, 4),
        "in_step_share": round(in_step / step_ms[with_pipeline], 4),
        "step_ms_with_pipeline": round(step_ms[with_pipeline], 4),
        "step_ms_prepared_batches": round(step_ms[with_prepared_batches], 4),
    }


def epoch(side, opts, case, images, labels):
    """One whole epoch of the trainer's chunks on real data (placed on the devices first)."""
    import jax
    import jax.numpy as jnp

    from cifar_jax.data import pipeline

    t0 = time.perf_counter()
    x, y = side.put(images), side.put(labels)
    jax.block_until_ready((x, y))
    placement_s = time.perf_counter() - t0
    metrics = side.zero_metrics()
    args = (x, y, pipeline.epoch_order(0, 0, len(images)), jnp.int32(0))
    t0 = time.perf_counter()
    run = side.train_chunk.lower(side.state, metrics, *args, jnp.int32(0), side.no_stop).compile()
    compile_s = time.perf_counter() - t0
    # One warm-up call outside the epoch, as PyTorch gets one warm-up step: a program's first
    # run can be slower (on a GPU its kernels load then; BENCHMARKS.md, H100 second run).
    state, metrics, _ = run(side.state, metrics, *args, jnp.int32(0), side.no_stop)
    jax.block_until_ready(state)

    t0 = time.perf_counter()
    args = (x, y, pipeline.epoch_order(0, 0, len(images)), jnp.int32(0))  # drawn inside the timed epoch
    for first in range(0, side.steps_per_epoch, side.steps_per_call):
        state, metrics, _ = run(state, metrics, *args, jnp.int32(first), side.no_stop)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - t0
    side.state = state
    n = side.steps_per_epoch * side.config.batch_size
    return row(
        case,
        opts,
        "jax",
        "epoch",
        f"device-resident data, {side.steps_per_call} steps/call",
        side.device,
        n / seconds,
        compile_s,
        epoch_s=round(seconds, 2),
        images=n,
        data_placement_s=round(placement_s, 2),
    )
