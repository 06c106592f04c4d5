"""Data: sources (host arrays), the train/val/test split, and the device pipeline.

`load_splits(config.data)` returns host arrays; `pipeline` puts them on the device mesh and draws
augmented batches inside jit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cifar_jax.data.sources import PATH_FLAG, SOURCES, Arrays, DataError, load


@dataclasses.dataclass(frozen=True)
class Splits:
    """Host arrays for training, validation (carved out of the train set) and test."""

    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    label_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def split_train_val(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int = 0):
    """A deterministic (by seed) random split of the train set: ((x_train, y_train), (x_val, y_val))."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = int(round(len(x) * val_fraction))
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    return (x[train], y[train]), (x[val], y[val])


def load_splits(data_config, path_flag: str = PATH_FLAG) -> Splits:
    """Load `data_config.source` and split it: train/val by `val_fraction` and `split_seed`, test as given;
    then the first `train_examples` of the training split, if set. `path_flag`: how the user sets
    data.path, named when it is missing (`sources.load`)."""
    options = dict(data_config.fake) if data_config.source == "fake" else {}
    arrays = load(data_config.source, data_config.path, path_flag=path_flag, **options)
    train, val = split_train_val(
        arrays.x_train, arrays.y_train, data_config.val_fraction, data_config.split_seed
    )
    if data_config.train_examples:
        train = tuple(a[: data_config.train_examples] for a in train)
    return Splits(train, val, (arrays.x_test, arrays.y_test), arrays.label_names)


__all__ = ["SOURCES", "Arrays", "DataError", "Splits", "load", "load_splits", "split_train_val"]
