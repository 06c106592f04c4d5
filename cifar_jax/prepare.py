"""Prepare CIFAR-100 once, where the internet is, as one file to carry to machines without it:

    python -m cifar_jax.prepare --out cifar100.npz                                    # through TFDS
    python -m cifar_jax.prepare --from cifar_python --path ~/data --out cifar100.npz  # torchvision's copy

The file is what `data.source=npz` reads (`--config.data.source=npz --config.data.path=cifar100.npz`);
placed at `<TFDS data dir>/cifar100_uint8.npz` it is also what `data.source=tfds` reads, so the
study's configs run unchanged. Written to a temporary name and renamed: whole or not at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cifar_jax.data import sources


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar_jax.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", choices=("tfds", "cifar_python"), default="tfds",
                        help="tfds: download and prepare through tensorflow-datasets (needs the internet and the tfds "
                             "extra); cifar_python: a cifar-100-python directory (default: %(default)s)")
    parser.add_argument("--path", default=None, help="tfds: its data dir (default ~/tensorflow_datasets); cifar_python: the directory")
    parser.add_argument("--out", required=True, help="the .npz file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)

    out = Path(args.out).expanduser().absolute()
    try:
        if out.suffix != ".npz":
            raise sources.DataError(f"--out {out} must end in .npz")
        if out.is_dir() or (out.exists() and not args.overwrite):
            raise sources.DataError(f"--out {out} exists; pass --overwrite to replace that file, or another --out")
        if not out.parent.is_dir():
            raise sources.DataError(f"--out {out}: {out.parent} is not a directory")
        arrays = sources.load(args.source, args.path)
        sources.save_npz(arrays, out)
    except sources.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write --out {out} ({e.strerror or e}); pass a writable path", file=sys.stderr)
        return 2
    print(f"wrote {out}: {len(arrays.y_train):,} train and {len(arrays.y_test):,} test images, {arrays.num_classes} classes\n"
          f"  train with --config.data.source=npz --config.data.path={out}, or copy it to "
          f"<TFDS data dir>/cifar100_uint8.npz for data.source=tfds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
