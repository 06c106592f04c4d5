"""Split the CIFAR-100 npz into pieces small enough for one device call each, and join them again.

    python scripts/cifar_pieces.py split ../shared/data/cifar100/cifar100.npz .data/cifar100 --pieces 3   #
    p0/ p1/ p2/
    python scripts/cifar_pieces.py join .data/cifar100 /tmp/cifar100.npz

A device call carries at most 64 MiB (the repository included); the npz is 167 MB. Each piece is
a compressed npz of consecutive rows of every array (`label_names` rides in the first), and
`join` checks that the pieces are all there and rebuilds arrays equal to the original.
"""

import argparse
from pathlib import Path

import numpy as np

SPLITS = ("x_train", "y_train", "x_test", "y_test")


def split(src, out_dir, pieces: int) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with np.load(src) as f:
        arrays = {k: f[k] for k in f.files}
    written = []
    for i in range(pieces):
        part = {k: np.array_split(arrays[k], pieces)[i] for k in SPLITS}
        if i == 0 and "label_names" in arrays:
            part["label_names"] = arrays["label_names"]
        path = out_dir / f"p{i}" / f"piece{i}of{pieces}.npz"  # a folder each: one `carry` path per call
        path.parent.mkdir(exist_ok=True)
        np.savez_compressed(path, **part)
        written.append(path)
    return written


def join(pieces_dir, out) -> Path:
    """Rebuild the npz from pieces found anywhere under `pieces_dir`."""
    paths = sorted(Path(pieces_dir).rglob("piece*of*.npz"))
    if not paths:
        raise SystemExit(f"error: no piece*of*.npz under {pieces_dir}")
    total = int(paths[0].stem.split("of")[1])
    found = sorted(int(p.stem[len("piece") :].split("of")[0]) for p in paths)
    if found != list(range(total)):
        raise SystemExit(f"error: pieces {found} of {total} under {pieces_dir}: carry the missing ones first")
    parts = [np.load(p) for p in sorted(paths, key=lambda p: int(p.stem[len("piece") :].split("of")[0]))]
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in SPLITS}
    if "label_names" in parts[0].files:
        arrays["label_names"] = parts[0]["label_names"]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    return Path(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split")
    s.add_argument("src")
    s.add_argument("out_dir")
    s.add_argument("--pieces", type=int, default=3)
    j = sub.add_parser("join")
    j.add_argument("pieces_dir")
    j.add_argument("out")
    args = parser.parse_args()
    if args.command == "split":
        for path in split(args.src, args.out_dir, args.pieces):
            print(f"{path} {path.stat().st_size / 2**20:.1f} MiB")
    else:
        print(join(args.pieces_dir, args.out))
