"""The jitted computations: training steps (several per call) and evaluation.

Everything here is a pure function over `nnx.split` state, so `jax.jit` compiles it once and the
same code runs on one device or data-parallel over a mesh: the dataset is replicated, each batch
is sharded over 'data', parameters are replicated, and XLA inserts the gradient all-reduce.

The train state is a dict pytree: `params` (nnx.State of all parameters), `batch_stats`
(BatchNorm running statistics), `opt_state` (optax state of the *trainable* parameters only) and,
with a weight average, `ema` ({params, batch_stats} averaged over the steps). Inside a training
chunk's loop the trainable parameters and the optimizer's moments are vectors (`to_loop`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cifar_jax import flat, models
from cifar_jax.data import mix, pipeline
from cifar_jax.optim import is_off


def jit(fn: Callable, **kwargs) -> Callable:
    """`jax.jit` with the compiler options of this project's device programs (`xla_options`)."""
    return jax.jit(fn, compiler_options=xla_options(), **kwargs)


def xla_options() -> dict:
    """XLA replays the kernels between two of its cuDNN convolutions (which it launches alone) as
    a CUDA graph, one host launch, when they are at least 5; at CIFAR sizes most runs are shorter,
    each of their kernels a launch of its own. Runs of 2 or more as graphs: ResNet-50 @32's
    training step 380 -> 223 host launches on the H100 (BENCHMARKS.md, "The GPU program").
    Options of other backends are ignored; the option in $XLA_FLAGS wins (a measurement of XLA's
    default sets it there)."""
    if "xla_gpu_graph_min_graph_size" in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {"xla_gpu_graph_min_graph_size": 2}


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0, targets=None):
    """Per-example `nn.CrossEntropyLoss(label_smoothing=...)` (targets (1-a) one-hot + a/K), in float32;
    `targets` (N, K) replaces the one-hot labels (MixUp/CutMix's class probabilities)."""
    if targets is None:
        targets = jax.nn.one_hot(labels, num_classes)
    if not is_off(label_smoothing):
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), targets)


def partition(params: nnx.State, train_only: str | None):
    """(trainable, frozen) parameters: the top-level module `train_only` (the model's `head`, in
    phase 1 of a fine-tune) and the rest, or everything and nothing when `train_only` is None."""
    if train_only is not None:
        return nnx.split_state(params, lambda path, _: path[0] == train_only, ...)
    return params, nnx.State({})


def to_loop(state: dict, train_only: str | None) -> dict:
    """The train state as the loop carries it: `params` as (the trainable ones as `flat.Flat`, the frozen
    tree), and each subtree of `opt_state` shaped like the trainable parameters as a `flat.Flat`."""
    trainable, frozen = partition(state["params"], train_only)
    layout = flat.Layout.of(trainable)

    def like_params(subtree):
        return jax.tree.structure(subtree) == layout.treedef

    opt_state = jax.tree.map(
        lambda s: layout.ravel(s) if like_params(s) else s, state["opt_state"], is_leaf=like_params
    )
    return {**state, "params": (layout.ravel(trainable), frozen), "opt_state": opt_state}


def from_loop(state: dict) -> dict:
    """The train state as checkpoints hold it: `to_loop` undone."""
    trainable, frozen = state["params"]
    opt_state = jax.tree.map(
        lambda s: s.unravel() if isinstance(s, flat.Flat) else s,
        state["opt_state"],
        is_leaf=lambda s: isinstance(s, flat.Flat),
    )
    return {**state, "params": nnx.merge_state(trainable.unravel(), frozen), "opt_state": opt_state}


def zero_metrics():
    """A split's metric sums before its first batch (`batch_sums`), and, in training, the count of
    steps whose loss was not finite. `epoch_end.epoch_row` turns them into the epoch's metrics."""
    return {
        "loss_sum": jnp.zeros(()),  # the default float: float32, or float64 under jax_enable_x64
        "correct": jnp.zeros((), jnp.int32),
        "count": jnp.zeros((), jnp.int32),
        "nonfinite_steps": jnp.zeros((), jnp.int32),
    }


def batch_sums(loss_sum, logits, y, mask=None) -> dict:
    """One batch's share of a split's metric sums: the loss summed over its examples (`loss_sum`),
    the examples whose top-1 prediction is right, the examples (those in `mask`, if given)."""
    right = jnp.argmax(logits, -1) == y
    if mask is not None:
        right = right & mask
    count = y.shape[0] if mask is None else jnp.sum(mask).astype(jnp.int32)
    return {"loss_sum": loss_sum, "correct": jnp.sum(right).astype(jnp.int32), "count": count}


def _added(sums: dict, more: dict) -> dict:
    return {key: sums[key] + more[key] for key in sums}


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static (compile-time) settings of the training computation."""

    graphdef: Any  # nnx.GraphDef of the model in train mode (phase 2) or eval mode (frozen backbone)
    tx: optax.GradientTransformation
    train_only: str | None  # a top-level module that alone trains (the model's head), or None: all
    preprocess: pipeline.Preprocess
    batch_size: int
    num_classes: int
    label_smoothing: float
    seed: int
    sharding: Any = None  # NamedSharding of a batch over the mesh, or None
    ema_decay: float = (
        0.0  # > 0: state['ema'] = decay * ema + (1 - decay) * (params, batch_stats) after each step
    )
    mixup_alpha: float = 0.0  # > 0: MixUp (data/mix.py) with lam ~ Beta(alpha, alpha)
    cutmix_alpha: float = 0.0  # > 0: CutMix; with both, one of the two per batch
    accumulate_steps: int = (
        1  # > 1: the batch in this many micro-batches, their gradients averaged into one update
    )


def train_step(cfg: StepConfig, state, metrics, images, labels, order, epoch, step):
    """One optimizer step on batch `step` of `epoch`: `train_batch`, then `update_step`."""
    return update_step(cfg, state, metrics, *train_batch(cfg, images, labels, order, epoch, step))


def step_draws(cfg: StepConfig, epoch, step) -> dict:
    """Every random number of training step `step` of `epoch`, a pure function of (seed, epoch,
    step): the augmentation's and, if configured, MixUp's / CutMix's. A training chunk draws all
    its steps' at once, before its loop: drawn in the loop they were about 20 small GPU kernels a
    step (BENCHMARKS.md, "The GPU program")."""
    key = pipeline.step_key(cfg.seed, epoch, step)
    draws = {"augment": cfg.preprocess.draw(key, cfg.batch_size)}
    if not (is_off(cfg.mixup_alpha) and is_off(cfg.cutmix_alpha)):
        size = cfg.preprocess.image_size
        mix_key = jax.random.fold_in(key, 1)  # not the augmentation's key
        draws["mix"] = mix.mix_draws(mix_key, cfg.mixup_alpha, cfg.cutmix_alpha, size, size)
    return draws


def chunk_draws(cfg: StepConfig, epoch, first_step, num_steps: int) -> dict:
    """`step_draws` of steps first_step .. first_step + num_steps - 1, stacked on a leading axis."""
    return jax.vmap(lambda i: step_draws(cfg, epoch, first_step + i))(jnp.arange(num_steps))


def train_batch(cfg: StepConfig, images, labels, order, epoch, step, draws: dict | None = None):
    """(normalised images, labels, soft targets or None) of batch `step` of `epoch`: the input
    pipeline, then MixUp / CutMix if configured, with the step's `draws` (`step_draws`; drawn here
    if not given)."""
    if draws is None:
        draws = step_draws(cfg, epoch, step)
    x, y = pipeline.train_batch(
        images,
        labels,
        order,
        cfg.seed,
        epoch,
        step,
        batch_size=cfg.batch_size,
        preprocess=cfg.preprocess,
        sharding=cfg.sharding,
        draws=draws["augment"],
    )
    targets = None
    if "mix" in draws:
        x, targets = mix.mix_batch(draws["mix"], x, y, cfg.num_classes)
    return x, y, targets


def update_step(cfg: StepConfig, state, metrics, x, y, targets=None):
    """One optimizer step on a prepared batch (normalised images `x`, labels `y`, and the soft
    `targets` of a mixed batch; accuracy is counted against `y`, each image's own label), on the
    train state as checkpoints hold it: `loop_update_step` between `to_loop` and `from_loop`."""
    new, metrics = loop_update_step(cfg, to_loop(state, cfg.train_only), metrics, x, y, targets)
    return from_loop(new), metrics


def loop_update_step(cfg: StepConfig, state, metrics, x, y, targets=None):
    """`update_step` on the train state as the loop carries it (`to_loop`: the trainable
    parameters, their gradients and the optimizer's moments as vectors). With `accumulate_steps`
    k > 1 the batch is k micro-batches, as in PyTorch's accumulation loop: each a forward in train
    mode (BatchNorm's statistics of that micro-batch, the running ones updated in turn) and the
    gradient of its mean loss / k, summed into one update."""
    trainable, frozen = state["params"]

    def gradients(batch_stats, x, y, targets):
        def loss_fn(trainable):
            # Only `trainable` is differentiated: with a frozen backbone nothing flows back through it.
            params = nnx.merge_state(trainable.unravel(), frozen)
            model = nnx.merge(cfg.graphdef, params, batch_stats, copy=True)
            logits = model(x)
            loss = cross_entropy(logits, y, cfg.num_classes, cfg.label_smoothing, targets).mean()
            return loss, (logits, nnx.state(model, nnx.BatchStat))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        return grads, batch_stats, (loss, logits, y)

    if cfg.accumulate_steps == 1:
        grads, batch_stats, seen = gradients(state["batch_stats"], x, y, targets)
        metrics = _add_metrics(metrics, *seen)
    else:
        grads, batch_stats, metrics = _accumulate(
            cfg, gradients, trainable, state["batch_stats"], metrics, x, y, targets
        )
    updates, opt_state = cfg.tx.update(grads, state["opt_state"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    new = {"params": (trainable, frozen), "batch_stats": batch_stats, "opt_state": opt_state}
    if not is_off(cfg.ema_decay):
        params = nnx.merge_state(trainable.unravel(), frozen)
        new["ema"] = update_ema(state["ema"], {"params": params, "batch_stats": batch_stats}, cfg.ema_decay)
    return new, metrics


def _add_metrics(metrics, loss, logits, y):
    """`metrics` with a training batch's sums added: `loss` is the batch's mean."""
    nonfinite = (~jnp.isfinite(loss)).astype(jnp.int32)
    return _added(metrics, {**batch_sums(loss * y.shape[0], logits, y), "nonfinite_steps": nonfinite})


def _accumulate(cfg: StepConfig, gradients, trainable, batch_stats, metrics, x, y, targets):
    """(gradients averaged over the micro-batches, BatchNorm statistics after the last, metrics)."""
    k = cfg.accumulate_steps

    def micro_batches(a):  # (B, ...) -> (k, B / k, ...), each micro-batch sharded like a batch
        a = a.reshape(k, a.shape[0] // k, *a.shape[1:])
        if cfg.sharding is None:
            return a
        return jax.lax.with_sharding_constraint(
            a, jax.NamedSharding(cfg.sharding.mesh, jax.sharding.PartitionSpec(None, "data"))
        )

    def add_micro_batch(carry, batch):
        total, batch_stats, metrics = carry
        grads, batch_stats, seen = gradients(batch_stats, *batch)
        total = jax.tree.map(lambda t, g: t + g / k, total, grads)
        return (total, batch_stats, _add_metrics(metrics, *seen)), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    batches = (micro_batches(x), micro_batches(y), None if targets is None else micro_batches(targets))
    (grads, batch_stats, metrics), _ = jax.lax.scan(add_micro_batch, (zeros, batch_stats, metrics), batches)
    return grads, batch_stats, metrics


def update_ema(ema, current, decay: float):
    """An exponential moving average of the weights and BatchNorm statistics (timm's ModelEmaV2:
    started from the initial model, updated after every step)."""
    return jax.tree.map(lambda e, x: (decay * e + (1 - decay) * x).astype(e.dtype), ema, current)


def over_members(fn: Callable, in_axes: tuple, vectorize: bool) -> Callable:
    """`fn` over a population's member axis (the arguments whose `in_axes` is 0; the others
    shared): all members in each operation (`jax.vmap`: a GPU's launches do every member's work at
    once) when `vectorize`, else one member after another inside the program (`lax.map`: each runs
    the operations of a run alone, which on the CPU are its own kernels; vmapped they batch into
    slower forms)."""
    if vectorize:
        return jax.vmap(fn, in_axes=in_axes)

    def each(*args):
        mapped = [a for a, axis in zip(args, in_axes) if axis == 0]

        def one(member_args):
            it = iter(member_args)
            return fn(*(next(it) if axis == 0 else a for a, axis in zip(args, in_axes)))

        return jax.lax.map(one, mapped)

    return each


def run_steps(cfg: StepConfig, state, metrics, num_steps: int, batch: Callable):
    """`num_steps` optimizer steps (a fori_loop), step i on `batch(i)` = (x, y, targets): the state
    as checkpoints hold it in and out, as `to_loop` makes it inside the loop (converted once each
    way, not per step)."""

    def body(i, carry):
        return loop_update_step(cfg, *carry, *batch(i))

    carry = (to_loop(state, cfg.train_only), metrics)
    state, metrics = body(0, carry) if num_steps == 1 else jax.lax.fori_loop(0, num_steps, body, carry)
    return from_loop(state), metrics


def make_train_chunk(
    cfg: StepConfig, num_steps: int, member_cfg: Callable | None = None, vectorize: bool = True
) -> Callable:
    """jit(state, metrics, images, labels, order, epoch, first_step, stop_votes, numbers=None) ->
    (state, metrics, stop) after `num_steps` steps in one call (a fori_loop), every step's random
    numbers drawn before the loop (`chunk_draws`). The state is donated; the metrics (four scalars)
    are not, so the host can read one chunk's metrics while the next chunk runs.

    A population (`member_cfg`): `state`, `metrics` and `order` have a leading member axis, and
    `numbers` holds each member's numbers (population.numbers); member k trains with
    `member_cfg(its numbers)`, all members in one program (`over_members`, `vectorize`).

    `stop_votes` holds one signal number (0: none) per device, each process filling its own; `stop`
    is their maximum. Every process reads the same value from the same chunk, so all of them stop
    at the same step when any one of them is signalled."""

    def chunk_steps(state, metrics, images, labels, order, epoch, first_step, numbers):
        step_cfg = cfg if member_cfg is None else member_cfg(numbers)

        draws = chunk_draws(step_cfg, epoch, first_step, num_steps)

        def batch(i):
            drawn = jax.tree.map(lambda d: d[i], draws)
            return train_batch(step_cfg, images, labels, order, epoch, first_step + i, drawn)

        return run_steps(step_cfg, state, metrics, num_steps, batch)

    if member_cfg is not None:
        chunk_steps = over_members(chunk_steps, (0, 0, None, None, 0, None, None, 0), vectorize)

    def chunk(state, metrics, images, labels, order, epoch, first_step, stop_votes, numbers=None):
        state, metrics = chunk_steps(state, metrics, images, labels, order, epoch, first_step, numbers)
        # The votes' all-reduce follows the steps' collectives (reading the loop's count orders it):
        # every process must issue collectives in one order (tests/test_data_parallel.py).
        votes_after_steps = jnp.where(jnp.sum(metrics["count"]) > 0, stop_votes, 0)
        return state, metrics, jnp.max(votes_after_steps)

    return jit(chunk, donate_argnums=0)


def stop_votes(signum: int | None, sharding) -> jax.Array:
    """This process's vote for `make_train_chunk` (`signum`, or 0 for none) on each of its devices,
    as one array over all processes' devices (`sharding`: NamedSharding over 'data')."""
    local = np.full(len(sharding.addressable_devices), signum or 0, np.int32)
    return jax.make_array_from_process_local_data(sharding, local, (sharding.mesh.size,))


def steps_per_call(config, steps_per_epoch: int, backend: str | None = None) -> int:
    """Training steps fused into one jitted call, as configured or automatically: the largest
    divisor of an epoch (every call the same program) up to 16 on accelerators, to hide dispatch
    latency, and up to 4 on CPU, where more ran no faster (BENCHMARKS.md, "Things measured while building").
    The cap
    keeps a call short enough for a stop signal to be honoured soon."""
    wanted = config.steps_per_call or (4 if (backend or jax.default_backend()) == "cpu" else 16)
    return max(d for d in range(1, min(wanted, steps_per_epoch) + 1) if steps_per_epoch % d == 0)


def eval_batches_per_call(config) -> int:
    """Evaluation batches fused into one jitted call, as configured or automatically: a whole split
    (`eval_calls` makes the calls equal), which ran faster than one batch a call even on CPU."""
    return config.eval_batches_per_call or 2**31 - 1


def eval_calls(num_batches: int, batches_per_call: int) -> tuple[int, int]:
    """(batches per call, calls) for `num_batches` eval batches, at most `batches_per_call` a call:
    the calls are of equal size (one program), the last one padded with whole masked batches."""
    calls = -(-num_batches // max(min(batches_per_call, num_batches), 1))
    return -(-num_batches // calls), calls


def make_eval_sums(
    graphdef_eval,
    *,
    preprocess,
    batch_size: int,
    num_classes: int,
    label_smoothing: float,
    batches_per_call: int = 1,
    sharding=None,
    members: int | None = None,
    vectorize: bool = True,
):
    """(params, batch_stats, images, labels) -> {loss_sum, correct, count} over a whole split, in
    padded, masked batches (every example counted once), up to `batches_per_call` batches per
    jitted call (a fori_loop), summed on device: no host sync until the caller reads the result.

    A population of `members`: params and batch_stats have a leading member axis, as do the sums,
    and `label_smoothing` is each member's (an array); `vectorize` as in `over_members`."""

    def add_member_batches(params, batch_stats, images, labels, first, sums, smoothing, per_call):
        model = models.for_evaluation(
            nnx.merge(graphdef_eval, params, batch_stats, copy=True), preprocess.image_size
        )

        def add_batch(b, sums):
            x, y, mask = pipeline.eval_batch(
                images, labels, b, batch_size=batch_size, preprocess=preprocess, sharding=sharding
            )
            logits = model(x)
            loss = cross_entropy(logits, y, num_classes, smoothing)
            return _added(sums, batch_sums(jnp.sum(jnp.where(mask, loss, 0.0)), logits, y, mask))

        return jax.lax.fori_loop(0, per_call, lambda i, s: add_batch(first + i, s), sums)

    @functools.partial(jit, static_argnames="per_call")
    def add_batches(params, batch_stats, images, labels, first, sums, smoothing, per_call):
        if members is None:
            return add_member_batches(
                params, batch_stats, images, labels, first, sums, label_smoothing, per_call
            )
        one = functools.partial(add_member_batches, per_call=per_call)
        return over_members(one, (0, 0, None, None, None, 0, 0), vectorize)(
            params, batch_stats, images, labels, first, sums, smoothing
        )

    def run(params, batch_stats, images, labels):
        per_call, calls = eval_calls(pipeline.num_eval_batches(images.shape[0], batch_size), batches_per_call)
        sums = {k: v for k, v in zero_metrics().items() if k != "nonfinite_steps"}
        if members is not None:
            sums = {k: jnp.zeros((members,), v.dtype) for k, v in sums.items()}
        smoothing = None if members is None else jnp.asarray(label_smoothing)
        for c in range(calls):
            sums = add_batches(
                params,
                batch_stats,
                images,
                labels,
                jnp.int32(c * per_call),
                sums,
                smoothing,
                per_call=per_call,
            )
        return sums

    return run


def make_batch_logits(graphdef_eval, *, preprocess, batch_size: int, sharding=None):
    """jit(params, batch_stats, images, first, per_call=1) -> logits of the `per_call` eval batches
    from batch `first` of `images` (padded), shaped (per_call, batch_size, classes)."""

    @functools.partial(jit, static_argnames="per_call")
    def batch_logits(params, batch_stats, images, first, per_call=1):
        model = models.for_evaluation(
            nnx.merge(graphdef_eval, params, batch_stats, copy=True), preprocess.image_size
        )
        labels = jnp.zeros((images.shape[0],), jnp.int32)

        def logits_of(b):
            x, _, _ = pipeline.eval_batch(
                images, labels, b, batch_size=batch_size, preprocess=preprocess, sharding=sharding
            )
            return model(x)

        return jax.lax.map(logits_of, first + jnp.arange(per_call))

    return batch_logits


def make_predict(graphdef_eval, *, preprocess, batch_size: int, batches_per_call: int = 1, sharding=None):
    """(params, batch_stats, images) -> logits of every example (padding removed), up to
    `batches_per_call` batches per jitted call."""
    batch_logits = make_batch_logits(
        graphdef_eval, preprocess=preprocess, batch_size=batch_size, sharding=sharding
    )

    def run(params, batch_stats, images):
        n = images.shape[0]
        per_call, calls = eval_calls(pipeline.num_eval_batches(n, batch_size), batches_per_call)
        logits = [
            batch_logits(params, batch_stats, images, jnp.int32(c * per_call), per_call=per_call)
            for c in range(calls)
        ]
        return jnp.concatenate(logits).reshape(-1, logits[0].shape[-1])[:n]

    return run
