"""Batched image augmentation under jit, with torchvision's semantics.

Each random augmentation is two functions: one draws its random numbers from a PRNG key (every
image its own), the other applies them to a batch (N, H, W, C). Drawn apart from the images, a
training chunk draws every step's numbers before its loop (`steps.step_draws`). Pixel values are
uint8-range floats (0..255) until `normalize`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZATIONS = {
    "cifar": (CIFAR_MEAN, CIFAR_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}  # Normalize((0.5,)*3, (0.5,)*3): [-1, 1]


def crop_offsets(key, n: int, padding: int):
    """`RandomCrop`'s offsets: (n, 2), each uniform in [0, 2 * padding]."""
    return jax.random.randint(key, (n, 2), 0, 2 * padding + 1)


def crop(x, offsets, padding: int):
    """`RandomCrop(size, padding)`: zero-pad every side, then crop the original size at each image's
    offset, i.e. a shift of up to +-padding pixels with zero fill."""
    _, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    crop_one = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
    return jax.vmap(crop_one)(padded, offsets)


def flips(key, n: int, p: float = 0.5):
    """`RandomHorizontalFlip(p)`'s choices: (n, 1, 1, 1), True for an image to flip."""
    return jax.random.bernoulli(key, p, (n, 1, 1, 1))


def flip(x, flipped):
    """The images where `flipped` is True mirrored left to right."""
    return jnp.where(flipped, x[:, :, ::-1, :], x)


def _gray(x):
    # torchvision's rgb_to_grayscale weights.
    return (0.2989 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]


def _blend(x, other, factor):
    return jnp.clip(factor * x + (1 - factor) * other, 0.0, 255.0)


def jitter_factors(key, n, strength: float):
    """Factors uniform in [max(0, 1 - s), 1 + s], one per image, shaped to broadcast over (H, W, C)."""
    return jax.random.uniform(key, (n, 1, 1, 1), minval=max(0.0, 1.0 - strength), maxval=1.0 + strength)


def jitter_draws(key, n: int, brightness: float, contrast: float, saturation: float) -> dict:
    """`ColorJitter(brightness, contrast, saturation)`'s random numbers: each image's three factors
    and the order (n, 3) in which it applies the three adjustments."""
    k_b, k_c, k_s, k_order = jax.random.split(key, 4)
    factors = tuple(
        jitter_factors(k, n, s) for k, s in ((k_b, brightness), (k_c, contrast), (k_s, saturation))
    )
    order = jax.vmap(lambda k: jax.random.permutation(k, 3))(jax.random.split(k_order, n))
    return {"factors": factors, "order": order}


def color_jitter(x, draws: dict):
    """`ColorJitter` on float images in 0..255, with `jitter_draws`'s numbers.

    As in torchvision, each image applies the three adjustments in its own order: brightness
    scales, contrast blends with the image's mean gray level, saturation blends with the per-pixel
    gray image; results are clipped to the valid range. Factors of 1 leave the image unchanged.
    """
    n = x.shape[0]
    fb, fc, fs = draws["factors"]
    ops = (
        lambda y: jnp.clip(fb * y, 0.0, 255.0),
        lambda y: _blend(y, _gray(y).mean(axis=(1, 2, 3), keepdims=True), fc),
        lambda y: _blend(y, _gray(y), fs),
    )
    for position in range(3):
        op_index = draws["order"][:, position].reshape(n, 1, 1, 1)
        candidates = [op(x) for op in ops]
        x = jnp.where(op_index == 0, candidates[0], jnp.where(op_index == 1, candidates[1], candidates[2]))
    return x


def normalize(x, mean, std):
    """`ToTensor()` then `Normalize(mean, std)`: x in 0..255 -> (x / 255 - mean) / std."""
    mean = jnp.asarray(mean, jnp.float32) * 255.0
    std = jnp.asarray(std, jnp.float32) * 255.0
    return (x.astype(jnp.float32) - mean) / std


def resize(x, size: int):
    """Bilinear resize to size x size (antialiased when shrinking)."""
    if x.shape[1:3] == (size, size):
        return x
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), method="bilinear")
