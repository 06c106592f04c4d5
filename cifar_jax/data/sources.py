"""Data sources: each returns the whole dataset as uint8 NHWC images and int32 labels in host memory.

    source        path                                  needs
    tfds          TFDS data_dir (default ~/tensorflow_datasets)   the `tfds` extra (first preparation only)
    cifar_python  a torchvision `cifar-100-python` directory      -
    npz           a .npz with x_train, y_train, x_test, y_test    -
    digits        -  (scikit-learn's bundled 8x8 digits, 32x32x3)  scikit-learn
    fake          -  (random images, any size)                    -

Every source fails with one line saying what is wrong and how to fix it (`DataError`).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """The data source or its files cannot be used; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Arrays:
    """A dataset in host memory: uint8 images (N, H, W, 3) and int32 labels (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    label_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def _checked(arrays: Arrays, where: str) -> Arrays:
    for split in ("train", "test"):
        x, y = getattr(arrays, f"x_{split}"), getattr(arrays, f"y_{split}")
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise DataError(f"{where}: x_{split} must be uint8 images (N, H, W, 3), got {x.dtype} {x.shape}")
        if y.shape != (len(x),):
            raise DataError(
                f"{where}: y_{split} has shape {y.shape}, expected ({len(x)},) to match x_{split}"
            )
        if len(y) and (y.min() < 0 or y.max() >= arrays.num_classes):
            raise DataError(
                f"{where}: y_{split} has labels outside [0, {arrays.num_classes}) (label_names has "
                f"{arrays.num_classes})"
            )
    return arrays


class MissingPath(DataError):
    """A source's path is empty or names nothing; `load` says how to set it in the caller's terms."""

    def __init__(self, path, what: str, hint: str):
        self.path, self.what, self.hint = path, what, hint
        super().__init__(self.advice(PATH_FLAG))

    def advice(self, path_flag: str) -> str:
        if not self.path:
            return f"{path_flag} is empty: set it to {self.what}"
        return f"{self.path} does not exist: set {path_flag} to {self.what} ({self.hint})"


PATH_FLAG = "--config.data.path"  # how train.py sets a source's path


def _require_path(path, what: str, hint: str) -> Path:
    p = Path(os.path.expanduser(str(path))) if path else None
    if p is None or not p.exists():
        raise MissingPath(p, what, hint)
    return p


def _labels(y, where: str) -> np.ndarray:
    """Integer class labels as int32; a DataError for any other dtype (floats would be truncated)."""
    y = np.asarray(y)
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{where} holds {y.dtype} values; class labels must be integers (e.g. y.astype(np.int32))"
        )
    out_of_range = np.flatnonzero((y < 0) | (y > np.iinfo(np.int32).max)) if y.size else ()
    if len(out_of_range):  # checked before the cast, which would wrap such a label onto a valid class
        i = int(out_of_range[0])
        raise DataError(
            f"{where} has label {y.flat[i]} at index {i} ({len(out_of_range)} such label(s)); class labels "
            "are "
            f"0..num_classes-1"
        )
    return y.astype(np.int32)


def load_npz(path) -> Arrays:
    """A NumPy archive with x_train, y_train, x_test, y_test (uint8 NHWC, int labels), optional
    label_names."""
    p = _require_path(
        path, "a .npz file with x_train, y_train, x_test, y_test", "e.g. ../shared/data/cifar100/cifar100.npz"
    )
    try:
        with np.load(p, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise DataError(
                    f"{p} lacks {', '.join(missing)} (it has {', '.join(f.files) or 'nothing'}); the npz "
                    "source needs x_train, y_train, x_test, y_test"
                )
            x_train, y_train, x_test, y_test = (f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
            names = f["label_names"] if "label_names" in f.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(
            f"{p} is not a readable .npz archive ({e or type(e).__name__}); write one with np.savez(path, "
            "x_train=..., ...)"
        ) from None
    y_train, y_test = _labels(y_train, f"{p}: y_train"), _labels(y_test, f"{p}: y_test")
    num_classes = (
        len(names) if names is not None else int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    )
    names = tuple(str(n) for n in names) if names is not None else tuple(str(i) for i in range(num_classes))
    return _checked(Arrays(x_train, y_train, x_test, y_test, names), str(p))


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise DataError(
            f"{path} is missing: a cifar-100-python directory holds train, test and meta"
        ) from None
    except Exception as e:  # noqa: BLE001  (pickle raises many kinds)
        raise DataError(
            f"{path} is not a CIFAR-100 python pickle ({type(e).__name__}: {e}); re-extract "
            "cifar-100-python.tar.gz"
        ) from None


def load_cifar_python(path) -> Arrays:
    """torchvision's CIFAR100 layout: `cifar-100-python/{train,test,meta}` pickles (path: that directory or
    its parent)."""
    p = _require_path(
        path, "a cifar-100-python directory", "torchvision.datasets.CIFAR100(root, download=True) makes one"
    )
    if not (p / "meta").exists() and (p / "cifar-100-python").is_dir():
        p = p / "cifar-100-python"
    splits = {}
    for split in ("train", "test"):
        d = _unpickle(p / split)
        if "data" not in d or "fine_labels" not in d:
            raise DataError(
                f"{p / split} has no 'data'/'fine_labels': not a CIFAR-100 python pickle (CIFAR-10 uses "
                "'labels')"
            )
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        splits[split] = (np.ascontiguousarray(x), _labels(d["fine_labels"], f"{p / split}: fine_labels"))
    meta = _unpickle(p / "meta")
    if "fine_label_names" not in meta:
        raise DataError(
            f"{p / 'meta'} has no 'fine_label_names' (it has {', '.join(map(str, meta)) or 'nothing'}): "
            f"not CIFAR-100's meta; re-extract cifar-100-python.tar.gz"
        )
    names = tuple(meta["fine_label_names"])
    return _checked(Arrays(*splits["train"], *splits["test"], names), str(p))


def load_digits(path=None) -> Arrays:
    """scikit-learn's 1,797 real 8x8 handwritten digits, upsampled to 32x32 RGB; a fixed 80/20 train/test
    split."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DataError("the digits source needs scikit-learn: pip install 'cifar_jax[digits]'") from None
    d = sk_load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    x = np.repeat(np.repeat(x, 4, axis=1), 4, axis=2)  # 8x8 -> 32x32, nearest
    x = np.repeat(x[..., None], 3, axis=-1)
    y = _labels(d.target, "digits")
    order = np.random.default_rng(0).permutation(len(x))
    n_test = len(x) // 5
    test, train = order[:n_test], order[n_test:]
    return _checked(Arrays(x[train], y[train], x[test], y[test], tuple(str(i) for i in range(10))), "digits")


def load_fake(path=None, *, num_train=256, num_test=64, num_classes=10, image_size=32, seed=0) -> Arrays:
    """Random uint8 images and labels, for tests and benchmarks."""
    rng = np.random.default_rng(seed)

    def split(n):
        return rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8), rng.integers(
            0, num_classes, n, dtype=np.int32
        )

    return Arrays(*split(num_train), *split(num_test), tuple(str(i) for i in range(num_classes)))


def load_tfds(path=None) -> Arrays:
    """CIFAR-100 through tensorflow-datasets. Reading uses `tfds.data_source` (no TensorFlow import);
    preparing the dataset the first time needs TensorFlow (the `tfds` extra). The decoded arrays are
    cached in `<data_dir>/cifar100_uint8.npz` so that later starts take seconds."""
    data_dir = Path(os.path.expanduser(str(path or "~/tensorflow_datasets")))
    cache = data_dir / "cifar100_uint8.npz"
    if cache.exists():
        return load_npz(cache)
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "the tfds source needs tensorflow-datasets: pip install 'cifar_jax[tfds]' (or use "
            "data.source=npz / cifar_python)"
        ) from None
    builder = tfds.builder("cifar100", data_dir=str(data_dir), file_format="array_record")
    if not builder.is_prepared():
        _require_download_host(getattr(getattr(builder, "_cifar_info", None), "url", None), data_dir)
        try:
            builder.download_and_prepare()
        except ImportError as e:
            raise DataError(
                f"preparing tfds cifar100 the first time needs TensorFlow ({e}): pip install "
                "'cifar_jax[tfds]'"
            ) from None
        except Exception as e:  # noqa: BLE001  (download and parsing errors come in many types)
            raise DataError(
                f"could not prepare tfds cifar100 in {data_dir} ({type(e).__name__}: {e}); check the network "
                "or the archive"
            ) from None
    splits = {}
    for split in ("train", "test"):
        src = tfds.data_source("cifar100", split=split, data_dir=str(data_dir))
        records = src.__getitems__(list(range(len(src))))
        x = np.stack([r["image"] for r in records]).astype(np.uint8)
        splits[split] = (x, _labels([r["label"] for r in records], f"tfds cifar100 {split}"))
    names = tuple(builder.info.features["label"].names)
    arrays = _checked(Arrays(*splits["train"], *splits["test"], names), f"tfds cifar100 in {data_dir}")
    save_npz(arrays, cache)
    return arrays


def save_npz(arrays: Arrays, path) -> Path:
    """`arrays` as the npz that `load_npz` (and the tfds source's cache) reads, written atomically:
    a killed write never leaves a half-written file."""
    from cifar_jax import staging

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the partial's name
            np.savez(
                f,
                x_train=arrays.x_train,
                y_train=arrays.y_train,
                x_test=arrays.x_test,
                y_test=arrays.y_test,
                label_names=np.array(arrays.label_names),
            )

    path = Path(path)
    staging.write_file(path, write)
    return path


def _require_download_host(url: str | None, data_dir: Path) -> None:
    """A DataError in seconds when the host TFDS downloads CIFAR-100 from cannot be reached (a
    compute node without internet), instead of TFDS's minutes of retries."""
    import socket
    from urllib.parse import urlparse

    if not url:
        return
    host = urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        raise DataError(
            f"tfds cifar100 is not prepared in {data_dir} and its download host {host} cannot be reached "
            f"({e.strerror or e}); on a machine with internet run `python -m cifar_jax.prepare --out "
            "cifar100.npz`, "
            f"copy the file here and pass --config.data.source=npz --config.data.path=cifar100.npz "
            f"(or put it at {data_dir / 'cifar100_uint8.npz'})"
        ) from None


SOURCES = {
    "tfds": load_tfds,
    "cifar_python": load_cifar_python,
    "npz": load_npz,
    "digits": load_digits,
    "fake": load_fake,
}


def load(source: str, path=None, *, path_flag: str = PATH_FLAG, **options) -> Arrays:
    """Load dataset `source` (see the module docstring); `options` go to the source (e.g. fake sizes).
    `path_flag`: how the caller's user sets `path` ('--path' for prepare), named when it is missing."""
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; valid sources: {', '.join(SOURCES)}")
    try:
        return SOURCES[source](path, **options)
    except MissingPath as e:
        raise DataError(e.advice(path_flag)) from None
