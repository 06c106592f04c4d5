"""Fingerprints of the compiled CPU programs: a refactor that must not change what runs proves it.

    python scripts/program_fingerprint.py --out /tmp/before   # on the old tree
    python scripts/program_fingerprint.py --out /tmp/after    # on the new tree
    diff /tmp/before/fingerprints.txt /tmp/after/fingerprints.txt

For each case (the benchmark's configs: SimpleCNN, ResNet-18 with the CIFAR stem, ResNet-50 with the
ImageNet stem, at 32x32) it compiles the trainer's training chunk and the fused evaluation for this
machine's CPU, as `train.py` builds them, writes each optimized program with its metadata and
instruction ids stripped (`<case>.<mode>.hlo`) and one line of sha256 per program. Minutes on 2
cores (ResNet-50's training chunk is the longest).
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import re

import jax

from cifar_jax import sharding, steps
from cifar_jax.bench import cases, gpu_program
from cifar_jax.bench.jax_side import jax_config
from cifar_jax.data import pipeline

CASES = "simple_cnn@32,resnet18@32,resnet50@32"
_METADATA = re.compile(r",? ?metadata=\{[^}]*\}")
_IDS = re.compile(r"(?<=[\w-])\.\d+\b")  # fusion.12, param_0.3: numbering, not structure


def stripped(hlo: str) -> str:
    """`hlo`'s computations without metadata (source lines, op names) and without the numbers XLA
    appends to names; the tables of source files and stack frames before them go too."""
    lines = hlo.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(("%", "ENTRY")))
    return "\n".join(_IDS.sub("", _METADATA.sub("", line)) for line in lines[first:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="directory for the programs")
    parser.add_argument("--cases", default=CASES, help=f"model@size, comma-separated (default: {CASES})")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(jax.devices("cpu")[:1])
    opts = gpu_program.bench_options()
    lines = []
    for case in cases.parse_cases(args.cases, None, None):
        config = jax_config(case, opts)
        config.model.dtype = "float32"  # what `auto` resolves to on the CPU
        config.steps_per_call = steps.steps_per_call(
            config, pipeline.steps_per_epoch(gpu_program.NUM_TRAIN, config.batch_size), backend="cpu"
        )
        for mode, lowered in gpu_program.lowered_programs(config, mesh).items():
            text = stripped(lowered.compile().as_text())
            name = f"{case.model}@{case.image_size}.{mode}"
            (args.out / f"{name}.hlo").write_text(text)
            lines.append(f"{hashlib.sha256(text.encode()).hexdigest()}  {name}")
            print(lines[-1], flush=True)
    (args.out / "fingerprints.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
