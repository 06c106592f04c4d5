"""Convert torchvision ResNet weights into a directory that training can start from.

    python -m cifar_jax.convert --arch resnet50 --weights IMAGENET1K_V2 --out checkpoints/resnet50_imagenet
    python -m cifar_jax.convert --arch resnet50 --state-dict resnet50.pth --out DIR [--num_classes 100]

`--weights` downloads through torchvision (needs the internet and the `torch` extra);
`--state-dict` reads a local .pth/.pt (needs torch) or .safetensors (needs only safetensors).
"""

from __future__ import annotations

from cifar_jax import interrupts

if __name__ == "__main__":  # a Ctrl-C during the imports below is acted on once they are done (cli.run)
    interrupts.defer()

import argparse
from pathlib import Path

from cifar_jax import cli, models, pretrained


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, choices=pretrained.ARCHS)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="torchvision weights name, e.g. IMAGENET1K_V2")
    src.add_argument("--state-dict", help="path to a torchvision state_dict (.pth, .pt or .safetensors)")
    parser.add_argument(
        "--num_classes", type=int, default=None, help="replace the head (default: keep the source's)"
    )
    parser.add_argument("--out", required=True, help="output directory (new, or replaced with --overwrite)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the converted weights already in --out (never other files)",
    )
    args = parser.parse_args(argv)

    source = args.weights or args.state_dict
    out = Path(args.out).absolute()
    try:
        if args.num_classes is not None and args.num_classes <= 0:
            raise pretrained.ConversionError(f"--num_classes={args.num_classes} must be a positive integer")
        if out.exists() and not out.is_dir():
            raise pretrained.ConversionError(f"--out {out} is a file; pass a directory")
        if out.is_dir() and any(out.iterdir()):
            if not pretrained.holds_converted_weights(out):
                raise pretrained.ConversionError(
                    f"--out {out} holds other files than converted weights; it is never replaced: "
                    f"pass another --out"
                )
            if not args.overwrite:
                raise pretrained.ConversionError(
                    f"--out {out} holds converted weights; pass --overwrite to replace them, or another --out"
                )
        model = pretrained.from_torchvision(args.arch, source, args.num_classes)
        num_classes = model.fc.kernel.shape[-1]
        meta = {"arch": args.arch, "num_classes": num_classes, "stem": "imagenet", "source": str(source)}
        out = pretrained.save(model, out, meta)
    except (pretrained.ConversionError, OSError, ImportError) as e:
        cli.fail(str(e))
    print(
        f"converted {args.arch} ({models.count_params(model):,} parameters, {num_classes} classes) from "
        f"{source} -> {out}"
    )
    return 0


if __name__ == "__main__":
    cli.run(main, "during convert: --out is written whole or not at all", absl_flags=False)
