"""torchvision ResNet weights -> Flax NNX models (`from_torchvision`), and saving/loading the result.

The Flax models use torchvision's names, so conversion is a rename plus layout changes:
conv OIHW -> HWIO, Linear (out, in) -> (in, out), BatchNorm weight/bias/running_mean/running_var
-> scale/bias/mean/var. Conversion is strict: every source tensor is used (except BatchNorm's
`num_batches_tracked` counters) and every model parameter filled, with shapes checked.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cifar_jax import models
from cifar_jax import staging as stage
from cifar_jax.errors import one_line, read_json_object
from cifar_jax.models import resnet

ARCHS = tuple(name for name, arch in models.MODELS.items() if arch.torchvision_weights)
_HEAD = ("fc.weight", "fc.bias")


class ConversionError(ValueError):
    """The source weights do not fit the requested architecture."""


def require(module: str, extra: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise ImportError(
            f"{module} is needed for this; install it with `pip install 'cifar_jax[{extra}]'`"
        ) from e


def _to_numpy(value) -> np.ndarray:
    """A copy: `Tensor.numpy()` shares the tensor's memory, and so can a CPU jax.Array made from it,
    which the torch model would then change in place (its BatchNorm buffers, on a forward pass)."""
    if hasattr(value, "detach"):  # a torch.Tensor; .float() because NumPy has no bfloat16
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        return value.numpy().copy()
    return np.array(value)


def _clean(sd: Mapping) -> dict[str, np.ndarray]:
    """Unwrap `{'state_dict': ...}`/`{'model': ...}` training checkpoints and DataParallel's 'module.'."""
    for wrapper in ("state_dict", "model"):
        if wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
    return {k.removeprefix("module."): _to_numpy(v) for k, v in sd.items()}


def load_state_dict(source, arch: str | None = None) -> dict[str, np.ndarray]:
    """A torchvision state_dict as NumPy arrays, from a mapping, a .pth/.pt file, a .safetensors
    file, or a torchvision weights name such as 'IMAGENET1K_V2' (downloaded by torchvision)."""
    if isinstance(source, Mapping):
        return _clean(source)
    source = os.fspath(source)
    path = Path(source)
    if path.suffix in (".safetensors", ".pth", ".pt", ".bin"):
        if not path.is_file():
            raise FileNotFoundError(f"no such weights file: {source}")
        return _clean(_read_weights_file(path))
    if path.exists() or os.sep in source:
        raise ConversionError(f"cannot read weights from {source!r}: use a .pth/.pt or .safetensors file")
    if arch is None:
        raise ConversionError(f"the torchvision weights name {source!r} needs an architecture (arch=...)")
    return _clean(_torchvision_weights(source, arch))


def _read_weights_file(path: Path):
    """The mapping in a .safetensors or PyTorch file; a ConversionError for one that does not read."""
    if path.suffix == ".safetensors":
        try:
            return require("safetensors.numpy", "torch").load_file(str(path))
        except ImportError:
            raise
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types for a damaged file)
            raise ConversionError(
                f"{path} is not a readable .safetensors file ({one_line(e, 120)})"
            ) from None
    torch = require("torch", "torch")
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle, zip and torch errors for a file that is no state_dict)
        raise ConversionError(f"{path} is not a readable PyTorch state_dict ({one_line(e, 120)})") from None
    if not isinstance(loaded, Mapping):
        raise ConversionError(
            f"{path} holds a {type(loaded).__name__}, not a state_dict (a mapping of names to tensors)"
        )
    return loaded


def _torchvision_weights(name: str, arch: str):
    """torchvision's `arch` weights `name`, downloaded (or from torchvision's cache)."""
    torchvision = require("torchvision", "torch")
    try:
        weights = torchvision.models.get_model_weights(arch)[name]
    except KeyError:
        names = [w.name for w in torchvision.models.get_model_weights(arch)]
        raise ConversionError(
            f"unknown torchvision weights {name!r} for {arch}; valid names: {', '.join(names)}"
        ) from None
    try:
        return weights.get_state_dict(progress=True)
    except OSError as e:  # URLError included: no network
        raise OSError(
            f"could not download torchvision {arch} {name} ({e}); download {weights.url} where the "
            f"internet is reachable and pass the file instead (--state-dict PATH)"
        ) from None


def _to_flax_layout(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 4:  # conv: OIHW -> HWIO
        return arr.transpose(2, 3, 1, 0)
    if arr.ndim == 2:  # linear: (out, in) -> (in, out)
        return arr.T
    return arr


def _torch_shape(flax_shape: tuple) -> tuple:
    if len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    return tuple(reversed(flax_shape)) if len(flax_shape) == 2 else tuple(flax_shape)


def load_into(model: nnx.Module, state_dict: Mapping[str, np.ndarray], arch: str, *, skip=()) -> None:
    """Copy a torchvision state_dict into `model` in place, strictly (see module docstring).
    Keys in `skip` are neither required nor copied (used to replace the classifier head)."""
    unused = {k for k in state_dict if not k.endswith("num_batches_tracked")} - set(skip)
    updates = []
    torch_key = models.MODELS[arch].torch_key
    for path, var in nnx.to_flat_state(nnx.state(model)):
        key = torch_key(path)
        if key in skip:
            continue
        if key not in state_dict:
            raise ConversionError(
                f"key {key!r} missing from the source weights (needed for {arch}); "
                f"pass weights of a torchvision {arch}, or the matching --arch"
            )
        src = np.asarray(state_dict[key])
        if not np.issubdtype(src.dtype, np.floating):
            raise ConversionError(
                f"source tensor {key!r} is {src.dtype}, not floating point: the file holds no trained {arch} "
                "weights "
                f"(was it written with .long() or .bool()?); pass a state_dict of float tensors"
            )
        expected = var.get_value().shape  # the value may be abstract (from_torchvision)
        if _to_flax_layout(src).shape != expected:
            raise ConversionError(
                f"shape mismatch for {key!r}: source {tuple(src.shape)}, {arch} expects "
                f"{_torch_shape(expected)} "
                "(torch layout); check --arch, num_classes and stem (pretrained weights need "
                "stem='imagenet')"
            )
        updates.append((var, _to_flax_layout(src)))
        unused.discard(key)
    if unused:
        extra = sorted(unused)
        raise ConversionError(
            f"{len(extra)} source tensor(s) not used by {arch}, e.g. {', '.join(map(repr, extra[:3]))}; "
            f"the weights are not a torchvision {arch} (wrong --arch?)"
        )
    for var, arr in updates:
        var.set_value(jnp.asarray(arr, dtype=var.get_value().dtype))


def from_torchvision(arch: str, source, num_classes: int | None = None, **options) -> nnx.Module:
    """A Flax `arch` carrying torchvision weights from `source` (see `load_state_dict`).

    `num_classes` different from the source's head gives a freshly initialised `fc` and converts
    everything else. `options` go to `models.create` (e.g. `dtype='bfloat16'`, `seed=`).
    """
    if arch not in ARCHS:
        raise ConversionError(
            f"no torchvision weights for {arch!r}; convertible architectures: {', '.join(ARCHS)}"
        )
    state_dict = load_state_dict(source, arch)
    if "fc.weight" not in state_dict:
        raise ConversionError(
            f"key 'fc.weight' missing from the source weights; pass weights of a torchvision {arch}"
        )
    source_classes = state_dict["fc.weight"].shape[0]
    num_classes = num_classes or source_classes
    model, head = _uninitialised(arch, num_classes, options, new_head=num_classes != source_classes)
    load_into(model, state_dict, arch, skip=_HEAD if head else ())
    if head:
        nnx.update(getattr(model, model.head), head)
    return model


def _uninitialised(arch: str, num_classes: int, options: dict, *, new_head: bool):
    """(`arch` with abstract weights, to be filled from converted ones; with `new_head`, the state of
    the classifier head as `models.create` initialises it, else None). Eagerly, the initialisation of
    a ResNet-50 compiles 57 programs (12 s on a CPU) for weights that are overwritten; under `jit`,
    XLA computes only the head's: the same numbers (bit-identical on the CPU: tests/test_pretrained.py)."""
    create = lambda: models.create(arch, num_classes, **options)
    model = nnx.eval_shape(create)
    head = jax.jit(lambda: nnx.state(getattr(create(), model.head)))() if new_head else None
    return model, head


def read_meta(weights_dir) -> dict:
    """The checked `meta.json` of a converted-weights directory: FileNotFoundError when there is
    none, ConversionError (one line naming the file) when it is not what `convert` writes."""
    path = Path(weights_dir).absolute() / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.parent} holds no converted weights (no meta.json); "
            f"write them with `python -m cifar_jax.convert --arch ARCH --weights NAME --out {path.parent}`"
        )
    redo = "convert the weights again with `python -m cifar_jax.convert`"
    meta = read_json_object(path, redo, ConversionError)
    missing = [key for key in ("arch", "num_classes", "stem") if key not in meta]
    if missing:
        raise ConversionError(f"{path} lacks {', '.join(missing)}; {redo}")
    if meta["arch"] not in ARCHS or meta["stem"] not in resnet.STEMS:
        raise ConversionError(
            f"{path}: arch={meta['arch']!r}, stem={meta['stem']!r} is no converted torchvision model; {redo}"
        )
    if not isinstance(meta["num_classes"], int) or meta["num_classes"] <= 0:
        raise ConversionError(
            f"{path}: num_classes={meta['num_classes']!r} is not a positive integer; {redo}"
        )
    return meta


def holds_converted_weights(path) -> bool:
    """Whether `path` is a directory that `save` wrote: its meta.json and state, nothing else."""
    path = Path(path)
    return (
        path.is_dir()
        and {p.name for p in path.iterdir()} == {"meta.json", "state"}
        and (path / "meta.json").is_file()
    )


def save(model: nnx.Module, out_dir, meta: dict) -> Path:
    """Write `model`'s variables (Orbax) and `meta.json` (arch, num_classes, stem, ...) to `out_dir`,
    whole or not at all. An existing `out_dir` is replaced only if it holds converted weights."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    if out.exists() and not (holds_converted_weights(out) or (out.is_dir() and not any(out.iterdir()))):
        raise ConversionError(
            f"{out} holds other files than converted weights (a meta.json and state); "
            f"it is never replaced: pass another --out"
        )
    staging = stage.new(out)
    try:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(staging / "state", nnx.to_pure_dict(nnx.state(model)))
        ckpt.wait_until_finished()
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    stage.publish(staging, out)
    return out


def load(weights_dir, num_classes: int | None = None, **options) -> nnx.Module:
    """A model from a directory written by `save` (or `python -m cifar_jax.convert`). A different
    `num_classes` keeps everything but the classifier head, which is freshly initialised."""
    import orbax.checkpoint as ocp

    weights_dir = Path(weights_dir).absolute()
    meta = read_meta(weights_dir)
    arch, saved_classes = meta["arch"], meta["num_classes"]
    options.setdefault("stem", meta["stem"])
    saved = nnx.eval_shape(lambda: models.create(arch, saved_classes, stem=options["stem"]))
    restored = ocp.StandardCheckpointer().restore(weights_dir / "state", nnx.to_pure_dict(nnx.state(saved)))
    num_classes = num_classes or saved_classes
    model, head = _uninitialised(arch, num_classes, options, new_head=num_classes != saved_classes)
    if head:
        restored[model.head] = nnx.to_pure_dict(head)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model
