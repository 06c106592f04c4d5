"""Throughput of this project against PyTorch, on the same machine, in the same run:

    python -m cifar_jax.bench [--models simple_cnn,resnet34] [--sizes 32] [--modes train,eval]
                              [--frameworks jax,torch] [--batch_size 128] [--steps 20] [--out FILE]

Cases are a model at an image size (default: SimpleCNN, ResNet-34 with the CIFAR stem and
ResNet-50 with the ImageNet stem at 32x32, and ResNet-50 at 224x224). For each case and mode:

  train     training steps. JAX: the trainer's jitted step, which also draws, augments (crop,
            flip, colour jitter) and resizes its batch on the device; PyTorch: the torchvision
            model's step on a batch already on the device. Same global batch, AdamW, label-smoothed
            cross-entropy on both sides.
  eval      forward passes in eval mode, batches of `--eval_batch_size`: as many per jitted call
            as the trainer fuses for a 10,000-image split (all 20 at batch 500), at most `--steps`.
  epoch     one whole training epoch including the input pipeline: ours on the device against
            PyTorch's DataLoader (workers = cores) with torchvision transforms on PIL images, as
            in the study's starter loop. `--data` takes the CIFAR-100 npz (its 40,000-image
            training split); without it, `--epoch_images` random images.
  pipeline  (JAX only) our input pipeline's share of a training step: timed alone (an upper
            bound), and in the step (the step against the same step fed batches prepared beforehand).

`--profile DIR` traces two more JAX training windows and two more evaluation windows (of the modes
run) with jax.profiler and prints how much of the traced time the device was busy and which
kernels took it (cifar_jax/profiling.py).

Throughput is the median over timed windows after warm-up (JAX: one window is one jitted call of
`steps_per_call` steps, or of the eval batches fused per call; PyTorch: the same number of steps
or batches). Where the work runs asynchronously
(JAX; PyTorch on a GPU) each timed window starts before the previous one is waited for, as in a
training loop without host syncs, and lasts from the end of the one before to its own end.
Compile time is reported apart: the first window's time minus a steady one. PyTorch runs at its best on the
device: channels_last; on GPU also bf16 autocast, cudnn.benchmark, fused AdamW, and three modes:
eager, torch.compile, and torch.compile(mode="reduce-overhead"), which replays CUDA graphs and so
removes the per-kernel launch cost that bounds small models (`--torch_modes`; the table's ratio
uses the fastest). JAX computes in bf16 on GPUs as the trainer does.

All PyTorch measurements run first, then all JAX ones: DataLoader workers are forked before
JAX starts its threads, and GPU memory held by PyTorch is released before JAX allocates.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

MODELS = {  # bench name -> (architecture, stem)
    "simple_cnn": ("simple_cnn", None),
    "resnet18": ("resnet18", "cifar"),
    "resnet34": ("resnet34", "cifar"),
    "resnet50": ("resnet50", "imagenet"),
}
DEFAULT_CASES = "simple_cnn@32,resnet34@32,resnet50@32,resnet50@224"
MODES = ("train", "eval", "epoch", "pipeline")
FRAMEWORKS = ("jax", "torch")
TORCH_MODES = ("eager", "compile", "cudagraphs")
NUM_CLASSES = 100
NUM_TRAIN = 40_000  # CIFAR-100's training split after the validation split: sets the steps fused per call
NUM_EVAL = 10_000  # the validation split (and the test set): sets the eval batches fused per call
LR, WEIGHT_DECAY, LABEL_SMOOTHING, COLOR_JITTER = 1e-3, 5e-4, 0.1, (0.2, 0.2, 0.2)


class BenchError(ValueError):
    """Bad options, found before anything is measured."""


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    image_size: int

    @property
    def arch(self) -> str:
        return MODELS[self.model][0]

    @property
    def stem(self):
        return MODELS[self.model][1]

    def __str__(self):
        return f"{self.model}{f' ({self.stem} stem)' if self.stem else ''} @{self.image_size}"


def parse_cases(cases: str, models: str | None, sizes: str | None) -> list[Case]:
    """`model@size` entries, kept where the model is in `models` and the size in `sizes` (if given)."""
    out = []
    for entry in _split(cases):
        model, _, size = entry.partition("@")
        if model not in MODELS:
            raise BenchError(f"unknown model {model!r} in {entry!r}; valid: {', '.join(MODELS)}")
        if not size.isdigit() or int(size) < 32:
            raise BenchError(f"case {entry!r} needs an image size of at least 32, like {model}@32")
        if model == "simple_cnn" and int(size) != 32:
            raise BenchError(f"case {entry!r}: SimpleCNN takes 32x32 images only")
        out.append(Case(model, int(size)))
    if models:
        wanted = _split(models)
        for m in wanted:
            if m not in MODELS:
                raise BenchError(f"--models: unknown model {m!r}; valid: {', '.join(MODELS)}")
        missing = [m for m in wanted if m not in {c.model for c in out}]
        out = [c for c in out if c.model in wanted] + [Case(m, 32) for m in missing]
    if sizes:
        wanted_sizes = {int(s) for s in _split(sizes)}
        out = [c for c in out if c.image_size in wanted_sizes]
    if not out:
        raise BenchError("no case left to measure: check --cases, --models and --sizes")
    return out


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _choices(flag: str, text: str, valid) -> list[str]:
    chosen = _split(text)
    for c in chosen:
        if c not in valid:
            raise BenchError(f"{flag}: unknown value {c!r}; valid: {', '.join(valid)}")
    return chosen


def _median_rate(images_per_window: int, times: list[float]) -> float:
    return images_per_window / statistics.median(times)


def timed_windows(run_window, wait, warmup: int, windows: int, overlap: bool = True):
    """(seconds of the first window, seconds of each timed window).

    `run_window()` starts one window and returns a handle; `wait(handle)` blocks until that window
    is done. The first window (compilation) and the rest of the `warmup` windows run alone, waited
    for one by one. With `overlap` (for work that runs asynchronously: JAX, PyTorch on a GPU) the
    timed windows run as a training loop without host syncs runs them: each starts before the one
    before it is waited for, and its time is the interval between the two windows' ends. So the
    host's work to start a call (about 9 ms for ResNet-50's 591 state arrays) overlaps the
    device's work for the previous call, as in the trainer, instead of leaving a GPU idle in every
    window. (The first interval also holds its own start; the median sets it aside.) Without
    `overlap`, each window is timed alone.
    """
    t0 = time.perf_counter()
    wait(run_window())
    first = time.perf_counter() - t0
    for _ in range(max(warmup, 1) - 1):
        wait(run_window())
    times = []
    if not overlap:
        for _ in range(windows):
            t0 = time.perf_counter()
            wait(run_window())
            times.append(time.perf_counter() - t0)
        return first, times
    last = time.perf_counter()
    pending = run_window()
    for i in range(windows):
        following = run_window() if i + 1 < windows else None
        wait(pending)
        now = time.perf_counter()
        times.append(now - last)
        last, pending = now, following
    return first, times


def _row(case, opts, framework, mode, variant, device, img_per_s, compile_s, batch_size=None, **extra):
    return {
        "model": case.model, "arch": case.arch, "stem": case.stem, "image_size": case.image_size,
        "batch_size": batch_size or opts.batch_size, "framework": framework, "mode": mode, "variant": variant,
        "device": device, "img_per_s": round(img_per_s, 1),
        "compile_s": None if compile_s is None else round(max(compile_s, 0.0), 2), **extra,
    }


def _random_uint8(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, NUM_CLASSES, n).astype(np.int32)


def _num_train(modes, epoch_data) -> int:
    return len(epoch_data[0]) if "epoch" in modes else NUM_TRAIN


def _epoch_data(opts):
    """(uint8 images, labels) of one training epoch: the real training split or random images."""
    if opts.data:
        from cifar_jax import config as config_lib
        from cifar_jax import data

        data_config = config_lib.base().data  # the training split train.py would use
        data_config.source, data_config.path = "npz", opts.data
        return data.load_splits(data_config).train
    return _random_uint8(opts.epoch_images, seed=1)


# ---------------------------------------------------------------- JAX (this project)


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

        from cifar_jax import steps, train_state
        from cifar_jax.data import pipeline

        self.config = config = jax_config(case, opts)
        self.mesh = pipeline.make_mesh()
        self.sharding = pipeline.batch_sharding(self.mesh)
        self.replicated = jax.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.preprocess = pipeline.Preprocess.from_config(config.data)
        self.steps_per_epoch = pipeline.steps_per_epoch(num_train, config.batch_size)
        self.steps_per_call = steps.steps_per_call(config, self.steps_per_epoch)
        phase = train_state.phases(config)[0]
        graphdefs, _ = train_state.create_train_state(config, NUM_CLASSES, self.mesh)
        self.step_cfg, _ = train_state.step_config(
            config, phase, graphdefs, preprocess=self.preprocess,
            num_classes=NUM_CLASSES, steps_per_epoch=self.steps_per_epoch, sharding=self.sharding,
        )
        self.graphdef_eval = graphdefs.eval
        _, self.state = train_state.create_train_state(config, NUM_CLASSES, self.mesh, phase, self.step_cfg.tx)
        self.train_chunk = steps.make_train_chunk(self.step_cfg, self.steps_per_call)
        self.no_stop = steps.stop_votes(None, self.sharding)
        self.device = f"{jax.devices()[0].device_kind} x{jax.device_count()}"
        self.dtype = train_state.compute_dtype(config)

    def put(self, x):
        from cifar_jax.data import pipeline

        return pipeline.replicate(x, self.mesh)

    def zero_metrics(self):
        import jax

        from cifar_jax import steps

        return jax.device_put(steps.zero_metrics(), self.replicated)

    def train(self, opts, case):
        import jax
        import jax.numpy as jnp

        n = self.steps_per_call * self.config.batch_size
        x, y = (self.put(a) for a in _random_uint8(n))
        order, epoch, first = jnp.arange(n), jnp.int32(0), jnp.int32(0)
        carry = [self.state, self.zero_metrics()]
        window = _chunk_window(carry, self.train_chunk, x, y, order, epoch, first, self.no_stop)
        windows = -(-opts.steps // self.steps_per_call)
        first_s, times = timed_windows(window, jax.block_until_ready, opts.warmup, windows)
        extra = {"profile": self._profile(window, opts, case, "train")} if opts.profile else {}
        self.state = carry[0]
        return _row(case, opts, "jax", "train", f"{self.dtype}, {self.steps_per_call} steps/call", self.device,
                    _median_rate(n, times), first_s - statistics.median(times), step_ms=_ms(times, self.steps_per_call), **extra)

    def _profile(self, window, opts, case, mode: str) -> dict:
        """Two more windows of `mode` (after the timed ones) under jax.profiler; the trace's device summary."""
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
        batch_logits = steps.make_batch_logits(self.graphdef_eval, preprocess=self.preprocess,
                                               batch_size=opts.eval_batch_size, sharding=self.sharding)
        x, _ = _random_uint8(per_call * opts.eval_batch_size)
        x = self.put(x)
        first = jnp.int32(0)

        def window():
            return batch_logits(self.state["params"], self.state["batch_stats"], x, first, per_call=per_call)

        windows = -(-opts.steps // per_call)
        first_s, times = timed_windows(window, jax.block_until_ready, opts.warmup, windows)
        extra = {"profile": self._profile(window, opts, case, "eval")} if opts.profile else {}
        return _row(case, opts, "jax", "eval", f"{self.dtype}, {per_call} batches/call", self.device,
                    _median_rate(per_call * opts.eval_batch_size, times), first_s - statistics.median(times),
                    batch_size=opts.eval_batch_size, step_ms=_ms(times, per_call), **extra)

    def pipeline(self, opts, case):
        """What the input pipeline costs, measured two ways.

        Alone: run as the training step runs it, `steps_per_call` batches per jitted call. Each
        batch is summed so that XLA cannot drop it: a pass the step does not make, so its share is
        an upper bound. (One batch per call would time the call's dispatch instead: on an H100 it
        took 0.9-1.4 ms whatever the image size, more than a whole SimpleCNN step.)
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
        x, y = (self.put(a) for a in _random_uint8(n))
        draw = functools.partial(pipeline.train_batch, seed=0, batch_size=b, preprocess=self.preprocess, sharding=self.sharding)
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
        return _row(case, opts, "jax", "pipeline", f"on device, {k} batches/call", self.device, _median_rate(n, times),
                    first_s - statistics.median(times), step_ms=_ms(times, k), **in_step)

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
        batches = jax.jit(lambda x, y, order, epoch: jax.tree.map(
            lambda *b: jnp.stack(b), *(draw(x, y, order, epoch=epoch, step=i) for i in range(k))))(x, y, order, epoch)

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
        return {"in_step_ms": round(in_step, 4), "in_step_share": round(in_step / step_ms[with_pipeline], 4),
                "step_ms_with_pipeline": round(step_ms[with_pipeline], 4), "step_ms_prepared_batches": round(step_ms[with_prepared_batches], 4)}

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
        # one warm-up call outside the epoch, as PyTorch gets one warm-up step: a program's first run
        # can be slower (on a GPU its kernels load then). Without it an H100 epoch of ResNet-50 @32
        # took 1.99 s against 1.37 s from the steady steps; how much of that is the first run is unmeasured.
        state, metrics, _ = run(self.state, metrics, *args, jnp.int32(0), self.no_stop)
        jax.block_until_ready(state)

        t0 = time.perf_counter()
        args = (x, y, pipeline.epoch_order(0, 0, len(images)), jnp.int32(0))  # the order is drawn inside the timed epoch
        for first in range(0, self.steps_per_epoch, self.steps_per_call):
            state, metrics, _ = run(state, metrics, *args, jnp.int32(first), self.no_stop)
        jax.block_until_ready((state, metrics))
        seconds = time.perf_counter() - t0
        self.state = state
        n = self.steps_per_epoch * self.config.batch_size
        return _row(case, opts, "jax", "epoch", f"device-resident data, {self.steps_per_call} steps/call", self.device, n / seconds,
                    compile_s, epoch_s=round(seconds, 2), images=n, data_placement_s=round(placement_s, 2))


def _ms(times, steps_per_window) -> float:
    return round(1000 * statistics.median(times) / steps_per_window, 3)


def run_jax(cases, modes, opts, epoch_data, log, record) -> None:
    import jax

    cache_was_on = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # measure compilation, not a cache hit
    try:
        for case in cases:
            side = JaxSide(case, opts, _num_train(modes, epoch_data))
            for mode in modes:
                log(f"jax {mode} {case}")
                record(side.epoch(opts, case, *epoch_data) if mode == "epoch" else getattr(side, mode)(opts, case))
            del side
            jax.clear_caches()
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was_on)


# ---------------------------------------------------------------- PyTorch


class TorchImages:
    """A map-style dataset of uint8 HWC images through torchvision transforms on PIL images, like
    torchvision's CIFAR100 dataset in the study's starter loop."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class TorchSide:
    """torchvision's model for one case, at its best on the device: eager, torch.compile'd, or
    torch.compile'd with CUDA graphs ("cudagraphs", GPU only)."""

    def __init__(self, case: Case, opts, mode: str):
        import torch

        from cifar_jax import torch_models

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.dev = torch.device("cuda" if self.cuda else "cpu")
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(0)
        model = torch_models.create(case.arch, NUM_CLASSES, stem=case.stem or "imagenet")
        self.model = model.to(self.dev, memory_format=torch.channels_last)
        self.compiled = mode != "eager"
        if self.compiled:
            import torch._inductor.config

            torch._inductor.config.force_disable_caches = True  # measure compilation, not a cache hit (as for JAX)
            self.forward = torch.compile(self.model, mode="reduce-overhead" if mode == "cudagraphs" else "default")
        else:
            self.forward = self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=self.cuda)
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
        self.mode = mode
        self.variant = f"{mode}, channels_last" + (", bf16 autocast" if self.cuda else ", float32")
        self.device = torch.cuda.get_device_name() if self.cuda else f"cpu ({torch.get_num_threads()} threads)"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def mark(self):
        """A handle on the work started so far (a CUDA event), for `wait`; None on the CPU, where
        PyTorch's work is done when its call returns."""
        if not self.cuda:
            return None
        event = self.torch.cuda.Event()
        event.record()
        return event

    @staticmethod
    def wait(event):
        if event is not None:
            event.synchronize()

    def step(self, x, y):
        torch = self.torch
        if self.mode == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are no longer read
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.cuda):
            loss = self.loss_fn(self.forward(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def batch(self, n, size):
        torch = self.torch
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 3, size, size, generator=g).to(self.dev).contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, NUM_CLASSES, (n,), generator=g).to(self.dev)

    def train(self, opts, case, window_steps):
        x, y = self.batch(opts.batch_size, case.image_size)
        self.model.train()

        def window():
            for _ in range(window_steps):
                self.step(x, y)
            return self.mark()

        windows = -(-opts.steps // window_steps)
        first_s, times = timed_windows(window, self.wait, opts.warmup, windows, overlap=self.cuda)
        return _row(case, opts, "torch", "train", self.variant, self.device, _median_rate(window_steps * opts.batch_size, times),
                    first_s - statistics.median(times) if self.compiled else None, step_ms=_ms(times, window_steps))

    def eval(self, opts, case, window_batches):
        torch = self.torch
        x, _ = self.batch(opts.eval_batch_size, case.image_size)
        self.model.eval()

        def window():
            for _ in range(window_batches):
                if self.mode == "cudagraphs":
                    torch.compiler.cudagraph_mark_step_begin()
                with torch.inference_mode(), torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.cuda):
                    self.forward(x)
            return self.mark()

        windows = -(-opts.steps // window_batches)
        first_s, times = timed_windows(window, self.wait, opts.warmup, windows, overlap=self.cuda)
        return _row(case, opts, "torch", "eval", self.variant, self.device, _median_rate(window_batches * opts.eval_batch_size, times),
                    first_s - statistics.median(times) if self.compiled else None,
                    batch_size=opts.eval_batch_size, step_ms=_ms(times, window_batches))

    def epoch(self, opts, case, images, labels):
        torch = self.torch
        from torchvision import transforms as T

        from cifar_jax.data import augment

        mean, std = augment.NORMALIZATIONS["imagenet" if case.stem == "imagenet" else "cifar"]
        steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ColorJitter(*COLOR_JITTER)]
        if case.image_size != 32:
            steps.append(T.Resize(case.image_size))
        steps += [T.ToTensor(), T.Normalize(mean, std)]
        workers = opts.workers if opts.workers >= 0 else (os.cpu_count() or 1)
        loader = torch.utils.data.DataLoader(
            TorchImages(images, labels, T.Compose(steps)), batch_size=opts.batch_size, shuffle=True, drop_last=True,
            num_workers=workers, pin_memory=self.cuda,
        )
        self.model.train()
        t0 = time.perf_counter()
        self.step(*self.batch(opts.batch_size, case.image_size))  # warm-up (and compilation) outside the epoch
        self.sync()
        compile_s = time.perf_counter() - t0 if self.compiled else None

        t0 = time.perf_counter()
        n = 0
        for x, y in loader:
            x = x.to(self.dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            self.step(x, y.to(self.dev, non_blocking=True))
            n += len(y)
        self.sync()
        seconds = time.perf_counter() - t0
        return _row(case, opts, "torch", "epoch", f"{self.variant}, DataLoader {workers} workers", self.device, n / seconds,
                    compile_s, epoch_s=round(seconds, 2), images=n)


def run_torch(cases, modes, opts, epoch_data, log, record) -> None:
    import torch

    from cifar_jax import steps

    backend = "gpu" if torch.cuda.is_available() else "cpu"
    for case in cases:
        # Time PyTorch in windows as long as one of JAX's jitted calls (the trainer's rules, decided
        # without starting JAX's runtime yet).
        config = jax_config(case, opts)
        window_steps = steps.steps_per_call(config, _num_train(modes, epoch_data) // opts.batch_size, backend)
        window_batches = eval_window(config, opts.steps)
        for torch_mode in opts.torch_modes:
            side = TorchSide(case, opts, torch_mode)
            for mode in (m for m in modes if m != "pipeline"):
                log(f"torch {torch_mode} {mode} {case}")
                if mode == "train":
                    record(side.train(opts, case, window_steps))
                elif mode == "eval":
                    record(side.eval(opts, case, window_batches))
                else:
                    record(side.epoch(opts, case, *epoch_data))
            del side
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            torch._dynamo.reset()


# ---------------------------------------------------------------- report


def table(rows: list[dict]) -> str:
    """Markdown table: per case and mode, JAX against the faster PyTorch variant."""
    lines = [
        "| model | size | batch | mode | JAX img/s | PyTorch img/s (variant) | JAX / PyTorch | JAX compile s | PyTorch compile s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    cases = list(dict.fromkeys((r["model"], r["image_size"]) for r in rows))  # in the order measured
    keys = sorted({(r["model"], r["image_size"], r["mode"]) for r in rows}, key=lambda k: (cases.index(k[:2]), MODES.index(k[2])))
    for key in keys:
        group = [r for r in rows if (r["model"], r["image_size"], r["mode"]) == key]
        jax_row = next((r for r in group if r["framework"] == "jax"), None)
        torch_rows = [r for r in group if r["framework"] == "torch"]
        best = max(torch_rows, key=lambda r: r["img_per_s"], default=None)
        stem = MODELS[key[0]][1]
        ref = jax_row or best
        cells = [
            f"{key[0]}{f' ({stem})' if stem else ''}", str(key[1]), str(ref["batch_size"]), key[2],
            f"{jax_row['img_per_s']:,.1f}" if jax_row else "-",
            f"{best['img_per_s']:,.1f} ({best['variant'].split(',')[0]})" if best else "-",
            f"{jax_row['img_per_s'] / best['img_per_s']:.2f}x" if jax_row and best else "-",
            _fmt_s(jax_row["compile_s"]) if jax_row else "-",
            ", ".join(f"{r['variant'].split(',')[0]} {_fmt_s(r['compile_s'])}" for r in torch_rows if r["compile_s"] is not None) or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for (model, size), (alone, in_step) in pipeline_shares(rows).items():
        parts = [] if alone is None else [f"{alone:.2%} alone (an upper bound)"]
        if in_step is not None:
            p = next(r for r in rows if r["mode"] == "pipeline" and (r["model"], r["image_size"]) == (model, size))
            parts.append(f"{in_step:.2%} in the step (median {p['step_ms_with_pipeline']:.3f} ms a step with it, "
                         f"{p['step_ms_prepared_batches']:.3f} ms fed prepared batches)")
        lines.append(f"\nInput pipeline share of a JAX training step, {model} @{size}: {'; '.join(parts)}")
    return "\n".join(lines)


def pipeline_shares(rows) -> dict:
    """(model, size) -> (the on-device input pipeline's time alone / the training step's time, or
    None without a train row; the pipeline's measured cost within the step / the step, or None)."""
    out = {}
    for p in (r for r in rows if r["framework"] == "jax" and r["mode"] == "pipeline"):
        t = next((r for r in rows if r["framework"] == "jax" and r["mode"] == "train"
                  and (r["model"], r["image_size"]) == (p["model"], p["image_size"])), None)
        alone = t["img_per_s"] / p["img_per_s"] if t else None
        if alone is not None or p.get("in_step_share") is not None:
            out[p["model"], p["image_size"]] = (alone, p.get("in_step_share"))
    return out


def _fmt_s(x):
    return "-" if x is None else f"{x:.1f}"


def versions() -> dict:
    out = {"date": datetime.date.today().isoformat(), "python": platform.python_version(), "machine": platform.machine(),
           "cpus": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "torchvision"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m cifar_jax.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES, help="model@size list (default: %(default)s)")
    p.add_argument("--models", help=f"only these models ({', '.join(MODELS)}); a model not in --cases runs at 32")
    p.add_argument("--sizes", help="only these image sizes, e.g. 32")
    p.add_argument("--modes", default="train,eval", help=f"of {', '.join(MODES)} (default: %(default)s)")
    p.add_argument("--frameworks", default="jax,torch", help="jax, torch or both (default: %(default)s)")
    p.add_argument("--torch_modes", default=None, help="of eager, compile, cudagraphs (GPU only) (default: all three on GPU, eager on CPU)")
    p.add_argument("--batch_size", type=int, default=128, help="global training batch (default: %(default)s)")
    p.add_argument("--eval_batch_size", type=int, default=500, help="evaluation batch (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps or eval batches (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed windows first, including compilation (default: %(default)s)")
    p.add_argument("--steps_per_call", type=int, default=0, help="JAX steps per jitted call (0: the trainer's choice)")
    p.add_argument("--eval_batches_per_call", type=int, default=0,
                   help="JAX eval batches per jitted call (0: the trainer's choice for a 10,000-image split)")
    p.add_argument("--data", help="CIFAR-100 npz for --modes epoch (its 40,000-image training split)")
    p.add_argument("--epoch_images", type=int, default=10_000, help="random images per epoch without --data")
    p.add_argument("--workers", type=int, default=-1, help="PyTorch DataLoader workers (default: the number of cores)")
    p.add_argument("--out", help="write the measurements as a JSON list here")
    p.add_argument("--profile", metavar="DIR", help="trace two more JAX training and evaluation windows into DIR; print how "
                   "busy the device was and its top kernels (also in the train and eval rows' 'profile')")
    return p.parse_args(argv)


def check(opts):
    """Validate everything before measuring; returns (cases, modes, frameworks)."""
    cases = parse_cases(opts.cases, opts.models, opts.sizes)
    modes = _choices("--modes", opts.modes, MODES)
    frameworks = _choices("--frameworks", opts.frameworks, FRAMEWORKS)
    for name in ("batch_size", "eval_batch_size", "steps"):
        if getattr(opts, name) < 1:
            raise BenchError(f"--{name}={getattr(opts, name)} must be at least 1")
    for name in ("steps_per_call", "eval_batches_per_call"):
        if getattr(opts, name) < 0:
            raise BenchError(f"--{name}={getattr(opts, name)} must be at least 0 (0: the trainer's choice)")
    if opts.warmup < 1:
        raise BenchError(f"--warmup={opts.warmup} must be at least 1 (the first call compiles)")
    if "torch" in frameworks:
        try:
            import torch
            import torchvision  # noqa: F401
        except ImportError:
            raise BenchError("PyTorch is not installed: pip install -e '.[torch]', or pass --frameworks jax") from None
        default = ",".join(TORCH_MODES) if torch.cuda.is_available() else "eager"
        opts.torch_modes = _choices("--torch_modes", opts.torch_modes or default, TORCH_MODES)
        if "cudagraphs" in opts.torch_modes and not torch.cuda.is_available():
            raise BenchError("--torch_modes cudagraphs needs a CUDA GPU (CUDA graphs); on this machine use eager or compile")
    if opts.profile and ("jax" not in frameworks or not {"train", "eval"} & set(modes)):
        raise BenchError("--profile traces JAX training and evaluation: keep jax in --frameworks and train or eval in --modes")
    if "epoch" in modes:
        if opts.data and not Path(opts.data).is_file():
            raise BenchError(f"--data {opts.data}: no such file (the CIFAR-100 npz, see README)")
        if opts.epoch_images < opts.batch_size:
            raise BenchError(f"--epoch_images={opts.epoch_images} must be at least --batch_size={opts.batch_size}")
    if opts.out and not Path(opts.out).absolute().parent.is_dir():
        raise BenchError(f"--out {opts.out}: the directory {Path(opts.out).absolute().parent} does not exist")
    return cases, modes, frameworks


def main(argv=None) -> list[dict]:
    from cifar_jax import cli

    # Before JAX starts: allocate GPU memory as needed (not 75% up front), so PyTorch and JAX can
    # share the device; and the CPU settings train.py runs with.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cli.tune_xla_cpu()
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cases, modes, frameworks = check(opts)
        epoch_data = _epoch_data(opts) if "epoch" in modes else None
    except ValueError as e:  # BenchError, DataError
        cli.fail(str(e))

    def log(message):
        print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)

    rows = []

    def record(row):
        """Keep a measurement; --out is rewritten after each one, so a run cut short keeps what it measured."""
        rows.append(row)
        log(f"  {row['img_per_s']:.1f} img/s")
        if opts.out:  # whole or not at all, even if the process is killed while writing
            tmp = Path(f"{opts.out}.tmp")
            tmp.write_text(json.dumps(rows, indent=1) + "\n")
            tmp.replace(opts.out)

    if "torch" in frameworks:
        run_torch(cases, modes, opts, epoch_data, log, record)
    if "jax" in frameworks:
        run_jax(cases, modes, opts, epoch_data, log, record)
    print(json.dumps(versions()))
    print(table(rows))
    if opts.out:
        print(f"measurements: {opts.out}")
    return rows


if __name__ == "__main__":
    main()
