"""`python -m cifar_jax.bench`: options, their checks, and the run (PyTorch first, then JAX)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cifar_jax.bench as package
from cifar_jax.bench.cases import (
    DEFAULT_CASES,
    FRAMEWORKS,
    JAX_LAYERS,
    MODELS,
    MODES,
    TORCH_MODES,
    BenchError,
    choices,
    load_epoch_data,
    parse_cases,
)
from cifar_jax.bench.jax_side import run_jax
from cifar_jax.bench.report import table, versions
from cifar_jax.bench.torch_side import run_torch


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m cifar_jax.bench",
        description=package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cases", default=DEFAULT_CASES, help="model@size list (default: %(default)s)")
    p.add_argument(
        "--models", help=f"only these models ({', '.join(MODELS)}); a model not in --cases runs at 32"
    )
    p.add_argument("--sizes", help="only these image sizes, e.g. 32")
    p.add_argument("--modes", default="train,eval", help=f"of {', '.join(MODES)} (default: %(default)s)")
    p.add_argument("--frameworks", default="jax,torch", help="jax, torch or both (default: %(default)s)")
    p.add_argument(
        "--torch_modes",
        default=None,
        help="of eager, compile, cudagraphs (GPU only) (default: all three on GPU, eager on CPU)",
    )
    p.add_argument("--batch_size", type=int, default=128, help="global training batch (default: %(default)s)")
    p.add_argument("--eval_batch_size", type=int, default=500, help="evaluation batch (default: %(default)s)")
    p.add_argument(
        "--steps", type=int, default=20, help="timed training steps or eval batches (default: %(default)s)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed windows first, including compilation (default: %(default)s)",
    )
    p.add_argument(
        "--steps_per_call", type=int, default=0, help="JAX steps per jitted call (0: the trainer's choice)"
    )
    p.add_argument(
        "--eval_batches_per_call",
        type=int,
        default=0,
        help="JAX eval batches per jitted call (0: the trainer's choice for a 10,000-image split)",
    )
    _add_output_args(p)
    return p.parse_args(argv)


def _add_output_args(p) -> None:
    """What runs on which device, the data, and where the results go."""
    p.add_argument(
        "--jax_layers",
        default="auto",
        help="JAX model layers: auto (the CPU kernels on CPU, XLA's stock "
        "operations elsewhere), stock or cpu_kernels on any device (default: %(default)s)",
    )
    p.add_argument("--data", help="CIFAR-100 npz for --modes epoch (its 40,000-image training split)")
    p.add_argument("--epoch_images", type=int, default=10_000, help="random images per epoch without --data")
    p.add_argument(
        "--workers", type=int, default=-1, help="PyTorch DataLoader workers (default: the number of cores)"
    )
    p.add_argument("--out", help="write the measurements as a JSON list here")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="trace two more JAX training and evaluation windows into DIR; print how "
        "busy the device was and its top kernels (also in the train and eval rows' 'profile')",
    )


def check(opts):
    """Validate everything before measuring; returns (cases, modes, frameworks)."""
    cases = parse_cases(opts.cases, opts.models, opts.sizes)
    modes = choices("--modes", opts.modes, MODES)
    frameworks = choices("--frameworks", opts.frameworks, FRAMEWORKS)
    choices("--jax_layers", opts.jax_layers, JAX_LAYERS)
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
            raise BenchError(
                "PyTorch is not installed: pip install -e '.[torch]', or pass --frameworks jax"
            ) from None
        default = ",".join(TORCH_MODES) if torch.cuda.is_available() else "eager"
        opts.torch_modes = choices("--torch_modes", opts.torch_modes or default, TORCH_MODES)
        if "cudagraphs" in opts.torch_modes and not torch.cuda.is_available():
            raise BenchError(
                "--torch_modes cudagraphs needs a CUDA GPU (CUDA graphs); on this machine use eager or "
                "compile"
            )
    if opts.profile and ("jax" not in frameworks or not {"train", "eval"} & set(modes)):
        raise BenchError(
            "--profile traces JAX training and evaluation: keep jax in --frameworks and train or eval in "
            "--modes"
        )
    if "epoch" in modes:
        if opts.data and not Path(opts.data).is_file():
            raise BenchError(f"--data {opts.data}: no such file (the CIFAR-100 npz, see README)")
        if opts.epoch_images < opts.batch_size:
            raise BenchError(
                f"--epoch_images={opts.epoch_images} must be at least --batch_size={opts.batch_size}"
            )
    if opts.out and not Path(opts.out).absolute().parent.is_dir():
        raise BenchError(f"--out {opts.out}: the directory {Path(opts.out).absolute().parent} does not exist")
    return cases, modes, frameworks


def main(argv=None) -> list[dict]:
    from cifar_jax import cli, staging

    # Before JAX starts: allocate GPU memory as needed (not 75% up front), so PyTorch and JAX can
    # share the device; and the CPU settings train.py runs with.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cli.tune_xla_cpu()
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cases, modes, frameworks = check(opts)
        epoch_data = load_epoch_data(opts) if "epoch" in modes else None
    except ValueError as e:  # BenchError, DataError
        cli.fail(str(e))

    def log(message):
        print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)

    rows = []

    def record(row):
        """Keep a measurement; --out is rewritten after each one, so a run cut short keeps what it
        measured."""
        rows.append(row)
        log(f"  {row['img_per_s']:.1f} img/s")
        if opts.out:  # whole or not at all, even if the process is killed while writing
            staging.write_text(Path(opts.out), json.dumps(rows, indent=1) + "\n")

    with cli.without_compilation_cache():  # compile times are compilations, not cache reads
        if "torch" in frameworks:
            run_torch(cases, modes, opts, epoch_data, log, record)
        if "jax" in frameworks:
            run_jax(cases, modes, opts, epoch_data, log, record)
    print(json.dumps(versions()))
    print(table(rows))
    if opts.out:
        print(f"measurements: {opts.out}")
    return rows
