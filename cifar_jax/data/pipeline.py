"""The device-resident input pipeline.

The uint8 dataset is placed once, replicated, on every device of the mesh (`cifar_jax.sharding`). Inside the
jitted step a batch is drawn by index, augmented and normalised on device, and constrained to be
sharded over 'data'. The host sends only the epoch's order and a step number: no per-step
transfer, no host data loader.

Everything random is a pure function of (seed, epoch, step), and JAX's partitionable threefry
makes the values independent of how many devices share the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from cifar_jax.data import augment


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """What happens to a uint8 batch before the model: augmentation (training only), then
    `Normalize(mean, std)`, then an optional resize to `image_size`."""

    crop_padding: int = 0
    flip: bool = False
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    normalization: str = "cifar"
    image_size: int = 32

    def __post_init__(self):
        if self.normalization not in augment.NORMALIZATIONS:
            valid = ", ".join(augment.NORMALIZATIONS)
            raise ValueError(f"data.normalization={self.normalization!r} is unknown; valid: {valid}")

    @classmethod
    def from_config(cls, data_config) -> "Preprocess":
        aug = data_config.augment
        b, c, s = aug.color_jitter
        return cls(aug.crop_padding, aug.flip, b, c, s, data_config.normalization, data_config.image_size)

    def _finish(self, x):
        x = augment.normalize(x, *augment.NORMALIZATIONS[self.normalization])
        return augment.resize(x, self.image_size)

    def draw(self, key, n: int) -> dict:
        """Every random number of the augmentation of a batch of `n` (`train` applies them)."""
        k_crop, k_flip, k_jitter = jax.random.split(key, 3)
        draws = {}
        if self.crop_padding:
            draws["crop"] = augment.crop_offsets(k_crop, n, self.crop_padding)
        if self.flip:
            draws["flip"] = augment.flips(k_flip, n)
        if self.brightness or self.contrast or self.saturation:
            draws["jitter"] = augment.jitter_draws(
                k_jitter, n, self.brightness, self.contrast, self.saturation
            )
        return draws

    def train(self, draws: dict, images_uint8):
        """The uint8 batch augmented with `draws` (`draw`'s), normalised and resized."""
        x = images_uint8
        if "crop" in draws:
            x = augment.crop(x, draws["crop"], self.crop_padding)
        if "flip" in draws:
            x = augment.flip(x, draws["flip"])
        x = x.astype(jnp.float32)
        if "jitter" in draws:
            x = augment.color_jitter(x, draws["jitter"])
        return self._finish(x)

    def eval(self, images_uint8):
        return self._finish(images_uint8.astype(jnp.float32))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Training drops the partial last batch (every step has the same static shape)."""
    return num_examples // batch_size


def eval_batch_size(wanted: int, num_examples: int, num_devices: int) -> int:
    """`wanted` (config.eval_batch_size), or less for a split that it exceeds: the split padded to a
    multiple of the devices, one batch (a larger one is only padding, and may not fit in memory)."""
    return max(min(wanted, -(-num_examples // num_devices) * num_devices), num_devices)


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """Evaluation pads the last batch and masks it: every example is counted exactly once."""
    return -(-num_examples // batch_size)


def epoch_order(seed: int, epoch, num_examples: int) -> jax.Array:
    """The permutation of training indices for `epoch`: a pure function of (seed, epoch)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0), epoch)
    return jax.random.permutation(key, num_examples)


def step_key(seed: int, epoch, step) -> jax.Array:
    """The augmentation key of one training step."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch), step)


def train_indices(order: jax.Array, step, batch_size: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(order, step * batch_size, batch_size)


def eval_indices(batch: int, batch_size: int, num_examples: int) -> tuple[jax.Array, jax.Array]:
    """Indices of eval batch `batch` (padding points at the last example) and the mask of real ones."""
    idx = batch * batch_size + jnp.arange(batch_size)
    mask = idx < num_examples
    return jnp.minimum(idx, num_examples - 1), mask


def gather(images: jax.Array, labels: jax.Array, idx: jax.Array, sharding: NamedSharding | None):
    """This batch's uint8 images and labels, sharded over the batch axis (inside jit)."""
    x, y = images[idx], labels[idx]
    if sharding is not None:
        x = jax.lax.with_sharding_constraint(x, sharding)
        y = jax.lax.with_sharding_constraint(y, sharding)
    return x, y


def train_batch(
    images,
    labels,
    order,
    seed: int,
    epoch,
    step,
    *,
    batch_size: int,
    preprocess: Preprocess,
    sharding=None,
    draws: dict | None = None,
):
    """Training step `step` of `epoch`: gather, augment and normalise on device (call inside jit).
    `draws`: the step's augmentation numbers if drawn beforehand, else drawn here; either way
    `preprocess.draw(step_key(seed, epoch, step), batch_size)`."""
    if draws is None:
        draws = preprocess.draw(step_key(seed, epoch, step), batch_size)
    x, y = gather(images, labels, train_indices(order, step, batch_size), sharding)
    return preprocess.train(draws, x), y


def eval_batch(images, labels, batch, *, batch_size: int, preprocess: Preprocess, sharding=None):
    """Evaluation batch `batch`: (normalised images, labels, mask of real examples)."""
    idx, mask = eval_indices(batch, batch_size, images.shape[0])
    x, y = gather(images, labels, idx, sharding)
    if sharding is not None:
        mask = jax.lax.with_sharding_constraint(mask, sharding)
    return preprocess.eval(x), y, mask
