"""PyTorch's side of the benchmark: torchvision's models at their best on the device (channels_last;
on GPUs bf16 autocast, fused AdamW, eager, torch.compile and CUDA graphs), and the study's
DataLoader loop for a whole epoch."""

from __future__ import annotations

import os
import statistics
import time

from cifar_jax.bench.cases import (
    COLOR_JITTER,
    LABEL_SMOOTHING,
    LR,
    NUM_CLASSES,
    WEIGHT_DECAY,
    Case,
    num_train,
)
from cifar_jax.bench.jax_side import eval_window, jax_config
from cifar_jax.bench.timing import median_rate, row, step_ms, timed_windows


class TorchSide:
    """torchvision's model for one case, at its best on the device: eager, torch.compile'd, or
    torch.compile'd with CUDA graphs ("cudagraphs", GPU only)."""

    def __init__(self, case: Case, opts, mode: str):
        import torch

        from cifar_jax import models

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.dev = torch.device("cuda" if self.cuda else "cpu")
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(0)
        model = models.torch_twin(case.arch, NUM_CLASSES, **case.options)
        self.model = model.to(self.dev, memory_format=torch.channels_last)
        self.compiled = mode != "eager"
        if self.compiled:
            import torch._inductor.config

            torch._inductor.config.force_disable_caches = (
                True  # measure compilation, not a cache hit (as for JAX)
            )
            self.forward = torch.compile(
                self.model, mode="reduce-overhead" if mode == "cudagraphs" else "default"
            )
        else:
            self.forward = self.model
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=self.cuda
        )
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
        self.mode = mode
        self.variant = f"{mode}, channels_last" + (", bf16 autocast" if self.cuda else ", float32")
        self.device = (
            torch.cuda.get_device_name() if self.cuda else f"cpu ({torch.get_num_threads()} threads)"
        )

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
        x = (
            torch.randn(n, 3, size, size, generator=g)
            .to(self.dev)
            .contiguous(memory_format=torch.channels_last)
        )
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
        return row(
            case,
            opts,
            "torch",
            "train",
            self.variant,
            self.device,
            median_rate(window_steps * opts.batch_size, times),
            first_s - statistics.median(times) if self.compiled else None,
            step_ms=step_ms(times, window_steps),
        )

    def eval(self, opts, case, window_batches):
        torch = self.torch
        x, _ = self.batch(opts.eval_batch_size, case.image_size)
        self.model.eval()

        def window():
            for _ in range(window_batches):
                if self.mode == "cudagraphs":
                    torch.compiler.cudagraph_mark_step_begin()
                with (
                    torch.inference_mode(),
                    torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.cuda),
                ):
                    self.forward(x)
            return self.mark()

        windows = -(-opts.steps // window_batches)
        first_s, times = timed_windows(window, self.wait, opts.warmup, windows, overlap=self.cuda)
        return row(
            case,
            opts,
            "torch",
            "eval",
            self.variant,
            self.device,
            median_rate(window_batches * opts.eval_batch_size, times),
            first_s - statistics.median(times) if self.compiled else None,
            batch_size=opts.eval_batch_size,
            step_ms=step_ms(times, window_batches),
        )


def epoch(side: TorchSide, opts, case, images, labels):
    """One epoch of the study's loop: a DataLoader of torchvision transforms on PIL images."""
    from torchvision import transforms as T

    from cifar_jax.bench.reference import PilImages
    from cifar_jax.data import augment

    torch = side.torch

    mean, std = augment.NORMALIZATIONS["imagenet" if case.stem == "imagenet" else "cifar"]
    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ColorJitter(*COLOR_JITTER)]
    if case.image_size != 32:
        steps.append(T.Resize(case.image_size))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    workers = opts.workers if opts.workers >= 0 else (os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(
        PilImages(images, labels, T.Compose(steps)),
        batch_size=opts.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=side.cuda,
    )
    side.model.train()
    t0 = time.perf_counter()
    side.step(*side.batch(opts.batch_size, case.image_size))  # warm-up (and compilation) outside the epoch
    side.sync()
    compile_s = time.perf_counter() - t0 if side.compiled else None

    t0 = time.perf_counter()
    n = 0
    for x, y in loader:
        x = x.to(side.dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
        side.step(x, y.to(side.dev, non_blocking=True))
        n += len(y)
    side.sync()
    seconds = time.perf_counter() - t0
    return row(
        case,
        opts,
        "torch",
        "epoch",
        f"{side.variant}, DataLoader {workers} workers",
        side.device,
        n / seconds,
        compile_s,
        epoch_s=round(seconds, 2),
        images=n,
    )


def run_torch(cases, modes, opts, epoch_data, log, record) -> None:
    import torch

    from cifar_jax import steps

    backend = "gpu" if torch.cuda.is_available() else "cpu"
    for case in cases:
        # Time PyTorch in windows as long as one of JAX's jitted calls (the trainer's rules, decided
        # without starting JAX's runtime yet).
        config = jax_config(case, opts)
        window_steps = steps.steps_per_call(config, num_train(modes, epoch_data) // opts.batch_size, backend)
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
                    record(epoch(side, opts, case, *epoch_data))
            del side
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            torch._dynamo.reset()
