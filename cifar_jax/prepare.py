"""Prepare CIFAR-100 once, where the internet is, as one file to carry to machines without it:

    python -m cifar_jax.prepare --out cifar100.npz                                    # through TFDS
    python -m cifar_jax.prepare --from cifar_python --path ~/data --out cifar100.npz  # torchvision's copy

The file is what `data.source=npz` reads (`--config.data.source=npz --config.data.path=cifar100.npz`);
placed at `<TFDS data dir>/cifar100_uint8.npz` it is also what `data.source=tfds` reads, so the
study's configs run unchanged. Written to a temporary name and renamed: whole or not at all.
"""

from __future__ import annotations

from cifar_jax import interrupts

if __name__ == "__main__":  # a Ctrl-C during the imports below is acted on once they are done (cli.run)
    interrupts.defer()

import argparse
from pathlib import Path

from cifar_jax import cli, staging
from cifar_jax.data import sources
from cifar_jax.errors import write_failure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar_jax.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--from",
        dest="source",
        choices=("tfds", "cifar_python"),
        default="tfds",
        help="tfds: download and prepare through tensorflow-datasets (needs the internet and the tfds "
        "extra); cifar_python: a cifar-100-python directory (default: %(default)s)",
    )
    parser.add_argument(
        "--path",
        default=None,
        help="tfds: its data dir (default ~/tensorflow_datasets); cifar_python: the directory",
    )
    parser.add_argument("--out", required=True, help="the .npz file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)

    out = Path(args.out).expanduser().absolute()
    try:
        staging.check_out_file(out, (".npz",), args.overwrite)
        arrays = sources.load(args.source, args.path, path_flag="--path")
        sources.save_npz(arrays, out)
    except ValueError as e:  # DataError is one
        cli.fail(str(e))
    except OSError as e:
        cli.fail(write_failure(f"--out {out}", e, "--out"))
    print(
        f"wrote {out}: {len(arrays.y_train):,} train and {len(arrays.y_test):,} test images, "
        f"{arrays.num_classes} classes\n"
        f"  train with --config.data.source=npz --config.data.path={out}, or copy it to "
        f"<TFDS data dir>/cifar100_uint8.npz for data.source=tfds"
    )
    return 0


if __name__ == "__main__":
    cli.run(main, "during prepare: --out is written whole or not at all", absl_flags=False)
