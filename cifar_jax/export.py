"""A trained run as the PyTorch model it mirrors, loadable without cifar_jax:

    python -m cifar_jax.export --workdir DIR [--step best|latest|N] [--ema] --out model.pth
    python -m cifar_jax.export --workdir DIR --out model.safetensors

The state_dict is that of `cifar_jax.models.torch_twin(name, num_classes, **options)`:
torchvision's ResNet (with the CIFAR stem: `conv1` a 3x3/1 convolution, `maxpool` an Identity)
or the study's `nn.Sequential` SimpleCNN. Layouts go back as `convert` brought them in (HWIO ->
OIHW, Linear (in, out) -> (out, in)); BatchNorm's `num_batches_tracked`, which PyTorch uses only
when its momentum is None, is 0. The file is written to a temporary name and renamed: whole or
not at all. `.pth` needs torch; `.safetensors` needs only safetensors.
"""

from __future__ import annotations

from cifar_jax import interrupts

if __name__ == "__main__":  # a Ctrl-C during the imports below is acted on once they are done (cli.run)
    interrupts.defer()

import argparse
from pathlib import Path

import numpy as np
from flax import nnx

from cifar_jax import cli, evaluate, models, staging
from cifar_jax.data import augment
from cifar_jax.errors import write_failure
from cifar_jax.pretrained import require

SUFFIXES = (".pth", ".pt", ".safetensors")


def _to_torch_layout(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 4:  # conv: HWIO -> OIHW
        return arr.transpose(3, 2, 0, 1)
    if arr.ndim == 2:  # linear: (in, out) -> (out, in)
        return arr.T
    return arr


def state_dict(model: nnx.Module, name: str) -> dict[str, np.ndarray]:
    """The PyTorch state_dict (float32 arrays, torch layout) of our `model` of architecture `name`."""
    key = models.architecture(name).torch_key
    out = {
        key(path): np.ascontiguousarray(_to_torch_layout(np.array(var[...], np.float32)))
        for path, var in nnx.to_flat_state(nnx.state(model))
    }
    for running_mean in [k for k in out if k.endswith("running_mean")]:
        out[running_mean.removesuffix("running_mean") + "num_batches_tracked"] = np.zeros((), np.int64)
    return out


def write(tensors: dict[str, np.ndarray], out: Path) -> None:
    """`tensors` as a .pth (torch.save of a dict of tensors) or .safetensors file, whole or not at all."""
    if out.suffix == ".safetensors":
        save_file = require("safetensors.numpy", "torch").save_file
        staging.write_file(out, lambda tmp: save_file(tensors, str(tmp)))
    else:
        torch = require("torch", "torch")
        staging.write_file(
            out, lambda tmp: torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp)
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar_jax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="run directory written by train.py")
    parser.add_argument(
        "--step",
        type=cli.checkpoint_step,
        default="best",
        help=cli.STEP_HELP,
    )
    parser.add_argument(
        "--ema", action="store_true", help="the weight average kept in training (ema_decay > 0)"
    )
    parser.add_argument(
        "--out", required=True, help="the file to write: .pth/.pt (needs torch) or .safetensors"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    cli.setup_logging()  # Orbax's chatter (a read-only checkpoint directory is expected here) stays out

    out = Path(args.out).absolute()
    try:
        staging.check_out_file(out, SUFFIXES, args.overwrite)
        restored = evaluate.restore(args.workdir, args.step, ema=args.ema)
        model = nnx.merge(restored.graphdef, restored.params, restored.batch_stats)
        config = restored.config
        write(state_dict(model, config.model.name), out)
    except (ValueError, ImportError) as e:  # ConversionError and EvalError are ValueErrors
        cli.fail(str(e))
    except OSError as e:
        cli.fail(write_failure(f"--out {out}", e, "--out"))
    options = "".join(f", {k}={v!r}" for k, v in models.options_of(config.model).items())
    mean, std = augment.NORMALIZATIONS[config.data.normalization]
    print(
        f"exported {config.model.name}{options} ({config.model.num_classes} classes), epoch {restored.epoch}"
        f"{', weight average' if args.ema else ''} -> {out}"
    )
    print(
        f"  PyTorch: cifar_jax.models.torch_twin({config.model.name!r}, {config.model.num_classes}{options}) "
        "or the README's "
        f"lines, then load_state_dict; inputs: ToTensor(), Normalize({mean}, {std}), "
        f"{config.data.image_size}x{config.data.image_size}"
    )
    return 0


if __name__ == "__main__":
    cli.run(main, "during export: --out is written whole or not at all", absl_flags=False)
