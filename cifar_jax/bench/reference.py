"""The PyTorch twin of `train.py`: a config of this project trained by a plain PyTorch loop, the
reference that whole runs here are compared with (`cifar_jax.bench.compare`).

The same model (`models.torch_twin`), optimizer, schedule, loss, augmentation semantics, train/val
split, batch and epochs, on the same data source; the order of examples and the random draws are
PyTorch's own, seeded by `config.seed`. Two input paths:

    fast        augmentation vectorized on uint8 tensors, a batch at a time (as airbench does)
    dataloader  the study's loop: torchvision transforms on PIL images in a DataLoader

It writes the rows of `metrics.jsonl` that train.py writes (same keys), `config.json`, and
`report.json` with the test accuracy of the last epoch's model.

    python -m cifar_jax.bench.reference --config configs/simple_cnn.py --workdir runs/torch_simple_cnn \\
        --config.data.source=npz --config.data.path=../shared/data/cifar100/cifar100.npz [--input dataloader]
"""

from __future__ import annotations

from cifar_jax import interrupts

if __name__ == "__main__":  # a Ctrl-C during the imports below is acted on once they are done (cli.run)
    interrupts.defer()

import copy
import json
import logging
import math
import os
import time
from pathlib import Path

log = logging.getLogger("cifar_jax")

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def unsupported(config) -> str | None:
    """Why the reference loop cannot train `config` (None when it can)."""
    if config.head_only_epochs:
        return "head_only_epochs > 0 (a two-phase fine-tune); set --config.head_only_epochs=0"
    if config.model.pretrained:
        return "model.pretrained (converted ImageNet weights); set --config.model.pretrained=''"
    return None


def parameter_groups(model, optimizer_config) -> list[dict]:
    """All parameters in one group, or (`decay_norm_and_bias=False`) kernels with weight decay and
    every one-dimensional parameter (BatchNorm scales, biases) without, as `optim.decayed` splits."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer_config.decay_norm_and_bias:
        return [{"params": params}]
    return [
        {"params": [p for p in params if p.ndim > 1]},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def make_optimizer(model, optimizer_config):
    import torch

    c, groups = optimizer_config, parameter_groups(model, optimizer_config)
    if c.name == "adam":
        return torch.optim.Adam(groups, lr=c.lr, betas=(c.b1, c.b2), eps=c.eps, weight_decay=c.weight_decay)
    if c.name == "adamw":
        return torch.optim.AdamW(groups, lr=c.lr, betas=(c.b1, c.b2), eps=c.eps, weight_decay=c.weight_decay)
    return torch.optim.SGD(
        groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay
    )


def make_scheduler(optimizer, config, steps_per_epoch: int):
    """torch.optim.lr_scheduler's twin of `optim.make_schedule`: stepped after every optimizer step
    when `schedule.per='step'` (lengths in steps), else after every epoch."""
    from torch.optim import lr_scheduler as S

    s, lr = config.schedule, config.optimizer.lr
    scale = steps_per_epoch if s.per == "step" else 1
    length, warmup = config.num_epochs * scale, s.warmup_epochs * scale
    rest = max(length - warmup, 1)
    if s.name == "constant":
        main = S.LambdaLR(optimizer, lambda _: 1.0)
    elif s.name == "step":
        main = S.StepLR(optimizer, step_size=s.step_size * scale, gamma=s.gamma)
    elif s.name == "linear":
        main = S.LinearLR(optimizer, start_factor=1.0, end_factor=s.min_lr / lr, total_iters=rest)
    else:
        main = S.CosineAnnealingLR(optimizer, T_max=rest, eta_min=s.min_lr)
    if not warmup:
        return main
    ramp = S.LinearLR(optimizer, start_factor=s.warmup_start_factor, end_factor=1.0, total_iters=warmup)
    return S.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


class FastAugment:
    """The training transforms of `pipeline.Preprocess` on a batch of uint8 NHWC tensors at once,
    every image with its own draws from `generator`: RandomCrop (zero fill), RandomHorizontalFlip,
    ColorJitter (the three adjustments in a random order per image, clamped), Normalize, and a
    bilinear resize when `data.image_size` is not the images' size. Returns float NCHW."""

    def __init__(self, data_config, generator):
        from cifar_jax.data import augment

        a = data_config.augment
        self.padding, self.flip, self.jitter = a.crop_padding, a.flip, tuple(a.color_jitter)
        self.mean, self.std = augment.NORMALIZATIONS[data_config.normalization]
        self.image_size, self.g = data_config.image_size, generator

    def crop(self, x):
        import torch

        n, h, w, _ = x.shape
        p = self.padding
        padded = torch.nn.functional.pad(x, (0, 0, p, p, p, p))
        dy, dx = (torch.randint(0, 2 * p + 1, (n, 1), generator=self.g) for _ in range(2))
        rows, cols = dy + torch.arange(h), dx + torch.arange(w)
        return padded[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]

    def color_jitter(self, x):
        import torch

        n = x.shape[0]
        factors = torch.stack(
            [torch.empty(n).uniform_(max(0.0, 1 - s), 1 + s, generator=self.g) for s in self.jitter], 1
        )
        order = torch.argsort(torch.rand(n, 3, generator=self.g), dim=1)  # a random order per image
        return jitter(x, factors, order)

    def __call__(self, x):
        import torch

        if self.padding:
            x = self.crop(x)
        if self.flip:
            flipped = torch.rand(x.shape[0], generator=self.g) < 0.5
            x = torch.where(flipped[:, None, None, None], x.flip(2), x)
        x = x.float()
        if any(self.jitter):
            x = self.color_jitter(x)
        return normalize(x, self.mean, self.std, self.image_size)


def jitter(x, factors, order):
    """ColorJitter's adjustments of float NHWC images in 0..255: image i scaled in brightness by
    factors[i, 0], blended with its mean gray level by factors[i, 1] (contrast) and with its gray
    image by factors[i, 2] (saturation), each result clamped, in the order order[i] (0, 1, 2 =
    brightness, contrast, saturation). A factor of 1 leaves the image as it is."""
    import torch

    n, gray = x.shape[0], torch.tensor(GRAY, dtype=x.dtype)
    fb, fc, fs = (factors[:, i].reshape(n, 1, 1, 1).to(x.dtype) for i in range(3))
    ops = (
        lambda y: (fb * y).clamp(0, 255),
        lambda y: (fc * y + (1 - fc) * (y @ gray).mean(dim=(1, 2))[:, None, None, None]).clamp(0, 255),
        lambda y: (fs * y + (1 - fs) * (y @ gray)[..., None]).clamp(0, 255),
    )
    for position in range(3):
        outs = torch.stack([op(x) for op in ops])  # (3, N, H, W, C)
        x = outs[order[:, position], torch.arange(n)]
    return x


def normalize(x, mean, std, image_size: int):
    """uint8-range NHWC -> `ToTensor()`, `Normalize(mean, std)`, resized: float NCHW (channels_last)."""
    import torch

    x = ((x.float() / 255.0 - torch.tensor(mean)) / torch.tensor(std)).permute(0, 3, 1, 2)
    if x.shape[-1] != image_size:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
    return x.contiguous(memory_format=torch.channels_last)


class PilImages:
    """A map-style dataset of uint8 HWC images through torchvision transforms on PIL images, like
    torchvision's CIFAR100 dataset in the study's loop."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def pil_transform(data_config):
    """The study's torchvision pipeline for the configured augmentation."""
    from torchvision import transforms as T

    from cifar_jax.data import augment

    a, steps = data_config.augment, []
    if a.crop_padding:
        steps.append(T.RandomCrop(32, padding=a.crop_padding))
    if a.flip:
        steps.append(T.RandomHorizontalFlip())
    if any(a.color_jitter):
        steps.append(T.ColorJitter(*a.color_jitter))
    if data_config.image_size != 32:
        steps.append(T.Resize(data_config.image_size))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(*augment.NORMALIZATIONS[data_config.normalization])])


class ReferenceTrainer:
    """One run of `config` in PyTorch on the CPU (or the first GPU): `train_epoch`, `evaluate`, and
    `run` to train every epoch and write the run's files."""

    def __init__(
        self,
        config,
        splits,
        *,
        input_path: str = "fast",
        workers: int = 0,
        device: str | None = None,
        t_start: float | None = None,
    ):
        import torch

        from cifar_jax import models

        self.torch, self.config, self.input_path, self.workers = torch, config, input_path, workers
        self.t_start = time.perf_counter() if t_start is None else t_start
        self.first_step_s = None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(config.seed)
        self.g = torch.Generator().manual_seed(config.seed)
        model = models.torch_twin(
            config.model.name, config.model.num_classes, **models.options_of(config.model)
        )
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).eval() if config.ema_decay else None
        self.train_x, self.train_y = splits.train
        self.val, self.test = splits.val, splits.test
        # The partial last batch is dropped, as here.
        self.steps_per_epoch = len(self.train_x) // config.batch_size
        self.opt = make_optimizer(self.model, config.optimizer)
        self.scheduler = make_scheduler(self.opt, config, self.steps_per_epoch)
        self.per_step = config.schedule.per == "step"
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.mix = make_mix(config.data.augment, config.model.num_classes)
        self.augment = FastAugment(config.data, self.g)
        self.autocast = self.device.type == "cuda" and config.model.dtype != "float32"

    def batches(self):
        """This epoch's training batches: (float NCHW images on the device, int64 labels)."""
        torch, c = self.torch, self.config
        if self.input_path == "dataloader":
            loader = torch.utils.data.DataLoader(
                PilImages(self.train_x, self.train_y, pil_transform(c.data)),
                batch_size=c.batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=self.workers,
                generator=self.g,
                pin_memory=self.device.type == "cuda",
            )
            for x, y in loader:
                yield x.to(self.device).contiguous(memory_format=torch.channels_last), y.to(self.device)
            return
        images, labels = torch.from_numpy(self.train_x), torch.from_numpy(self.train_y).long()
        order = torch.randperm(len(images), generator=self.g)
        for s in range(self.steps_per_epoch):
            idx = order[s * c.batch_size : (s + 1) * c.batch_size]
            yield self.augment(images[idx]).to(self.device), labels[idx].to(self.device)

    def step(self, x, y) -> tuple[float, int]:
        """One optimizer step (k micro-batches with `accumulate_steps`): (loss sum, correct)."""
        torch, k = self.torch, self.config.optimizer.accumulate_steps
        targets = self.mix(x, y) if self.mix else (x, y)
        self.opt.zero_grad(set_to_none=True)
        loss_sum, correct = 0.0, 0
        for xs, ts, ys in zip(targets[0].chunk(k), targets[1].chunk(k), y.chunk(k)):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(xs)
                loss = self.loss_fn(_at_least_float32(logits), ts)
            (loss / k).backward()
            loss_sum += loss.item() * len(ys)
            correct += int((logits.argmax(-1) == ys).sum())
        if self.config.optimizer.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optimizer.clip_norm)
        self.opt.step()
        if self.ema is not None:
            update_ema(self.ema, self.model, self.config.ema_decay)
        if self.per_step:
            self.scheduler.step()
        return loss_sum, correct

    def train_epoch(self) -> dict:
        self.model.train()
        sums = {"loss_sum": 0.0, "correct": 0, "count": 0}
        for x, y in self.batches():
            loss_sum, correct = self.step(x, y)
            if self.first_step_s is None:
                self.first_step_s = round(time.perf_counter() - self.t_start, 2)
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"loss became NaN/Inf (lr {self.lr():g}); lower optimizer.lr")
            sums = {
                "loss_sum": sums["loss_sum"] + loss_sum,
                "correct": sums["correct"] + correct,
                "count": sums["count"] + len(y),
            }
        if not self.per_step:
            self.scheduler.step()
        return sums

    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def evaluate(self, images, labels, model=None) -> dict:
        """{loss_sum, correct, count} of `model` (the trained one by default) over a split."""
        torch, c = self.torch, self.config
        model = self.model if model is None else model
        model.eval()
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=c.label_smoothing, reduction="sum")
        sums = {"loss_sum": 0.0, "correct": 0, "count": len(labels)}
        from cifar_jax.data import augment

        mean, std = augment.NORMALIZATIONS[c.data.normalization]
        with torch.inference_mode():
            for i in range(0, len(labels), c.eval_batch_size):
                x = normalize(
                    torch.from_numpy(images[i : i + c.eval_batch_size]), mean, std, c.data.image_size
                ).to(self.device)
                y = torch.from_numpy(labels[i : i + c.eval_batch_size]).long().to(self.device)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    logits = _at_least_float32(model(x))
                sums["loss_sum"] += float(loss_fn(logits, y))
                sums["correct"] += int((logits.argmax(-1) == y).sum())
        return sums


def epoch_row(trainer: ReferenceTrainer, epoch: int) -> dict:
    """Train one epoch and validate: the row train.py writes for it."""
    lr, t0 = trainer.lr(), time.perf_counter()
    train = trainer.train_epoch()
    t_val = time.perf_counter()
    row = {"epoch": epoch + 1, "phase": "all", **_means("train", train)}
    has_val = len(trainer.val[1]) > 0
    row.update(_means("val", trainer.evaluate(*trainer.val) if has_val else None))
    if trainer.ema is not None:
        row.update(_means("ema_val", trainer.evaluate(*trainer.val, model=trainer.ema) if has_val else None))
    t_end = time.perf_counter()
    row.update(
        lr=lr, epoch_time_s=round(t_end - t0, 3), train_img_per_s=round(train["count"] / (t_val - t0), 1)
    )
    row.update(val_s=round(t_end - t_val, 3) if has_val else None, host_s=None, checkpoint_s=None)
    if epoch == 0:  # eager PyTorch compiles nothing; the first step comes after imports, data and model
        row.update(compile_s=None, first_step_s=trainer.first_step_s)
    return row


def test_report(trainer: ReferenceTrainer) -> dict:
    """The last epoch's model (and weight average) on the test split, and how the run ran."""
    torch, test = trainer.torch, trainer.evaluate(*trainer.test)
    n = max(test["count"], 1)
    report = {
        "framework": "torch",
        "input": trainer.input_path,
        "split": "test",
        "step": trainer.config.num_epochs,
        "n_examples": test["count"],
        "top1_acc": test["correct"] / n,
        "loss": test["loss_sum"] / n,
    }
    if trainer.ema is not None:
        ema = trainer.evaluate(*trainer.test, model=trainer.ema)
        report.update(ema_top1_acc=ema["correct"] / n, ema_loss=ema["loss_sum"] / n)
    workers = trainer.workers if trainer.input_path == "dataloader" else None
    report.update(
        wall_s=round(time.perf_counter() - trainer.t_start, 2),
        torch=torch.__version__,
        device=trainer.device.type,
        threads=torch.get_num_threads(),
        workers=workers,
    )
    return report


def run(trainer: ReferenceTrainer, workdir: Path) -> dict:
    """Train every epoch, writing `metrics.jsonl` row by row, then `report.json` (test split)."""
    config = trainer.config
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    with open(workdir / "metrics.jsonl", "w") as f:
        for epoch in range(config.num_epochs):
            row = epoch_row(trainer, epoch)
            f.write(json.dumps(row) + "\n")
            f.flush()
            log.info(
                "epoch %d/%d  train loss %.4f acc %.4f | val loss %s acc %s | lr %.3g | %.1f s",
                epoch + 1,
                config.num_epochs,
                row["train_loss"],
                row["train_acc"],
                _fmt(row["val_loss"]),
                _fmt(row["val_acc"]),
                row["lr"],
                row["epoch_time_s"],
            )
    report = test_report(trainer)
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info(
        "test top1_acc %.4f (%d images); %.1f s from the start",
        report["top1_acc"],
        report["n_examples"],
        report["wall_s"],
    )
    return report


def make_mix(augment_config, num_classes: int):
    """torchvision.transforms.v2's MixUp / CutMix (both: one of them per batch), or None."""
    mixup, cutmix = augment_config.mixup_alpha, augment_config.cutmix_alpha
    if not (mixup or cutmix):
        return None
    from torchvision.transforms import v2

    mixes = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup else []) + (
        [v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix else []
    )
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def update_ema(ema, model, decay: float) -> None:
    """timm's ModelEmaV2 as `steps.update_ema`: every floating parameter and buffer averaged."""
    import torch

    with torch.no_grad():
        current = model.state_dict()
        for name, value in ema.state_dict().items():
            if value.is_floating_point():
                value.mul_(decay).add_(current[name], alpha=1 - decay)


def _at_least_float32(logits):
    """bf16 autocast's logits in float32 for the loss, as here; float32 and float64 as they are."""
    import torch

    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _means(prefix: str, sums: dict | None) -> dict:
    if sums is None:
        return {f"{prefix}_loss": None, f"{prefix}_acc": None}
    n = max(sums["count"], 1)
    return {f"{prefix}_loss": sums["loss_sum"] / n, f"{prefix}_acc": sums["correct"] / n}


def _fmt(x):
    return "n/a" if x is None else f"{x:.4f}"


def main(config, workdir: str, *, input_path: str, workers: int, threads: int) -> dict:
    """Check the config, load its data and train it (the command line's work)."""
    t_start = time.perf_counter()
    from cifar_jax import config as config_lib
    from cifar_jax import data

    config_lib.validate(config)
    reason = unsupported(config)
    if reason:
        raise ValueError(f"the PyTorch reference does not train {reason}")
    import torch

    if threads:
        torch.set_num_threads(threads)
    splits = data.load_splits(config.data)
    trainer = ReferenceTrainer(config, splits, input_path=input_path, workers=workers, t_start=t_start)
    log.info(
        "PyTorch %s, %s input, %d threads%s: %d steps per epoch",
        torch.__version__,
        input_path,
        torch.get_num_threads(),
        f", {workers} DataLoader workers" if input_path == "dataloader" else "",
        trainer.steps_per_epoch,
    )
    return run(trainer, Path(workdir))


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from cifar_jax import cli

    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "configs/NAME.py: the experiment", lock_config=True
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "run directory: config.json, metrics.jsonl, report.json")
    _INPUT = flags.DEFINE_enum(
        "input", "fast", ["fast", "dataloader"], "augmentation on batched tensors, or the study's DataLoader"
    )
    _WORKERS = flags.DEFINE_integer(
        "workers", os.cpu_count() or 1, "DataLoader worker processes (--input dataloader)"
    )
    _THREADS = flags.DEFINE_integer("threads", 0, "torch.set_num_threads (0: PyTorch's default)")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(argv):
        cli.start("", argv)
        from cifar_jax.data import DataError

        try:
            main(
                cli.loaded_config(_CONFIG),
                _WORKDIR.value,
                input_path=_INPUT.value,
                workers=_WORKERS.value,
                threads=_THREADS.value,
            )
        except (ValueError, DataError, FloatingPointError, ImportError) as e:
            cli.fail(str(e))

    cli.run(_main, "in the PyTorch reference run")
