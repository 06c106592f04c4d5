"""Common CIFAR-C-style corruptions, computed without downloads, at severities 0..5.

Severity 0 returns the input unchanged; 1..5 use parameters in the spirit of Hendrycks &
Dietterich's CIFAR-10-C (noise levels, blur sigmas, contrast factors, pixelation scales and JPEG
qualities from its CIFAR code; pixelation scales spread wider; brightness and saturation simplified to RGB
operations so they are
monotone and run on device). Every corruption maps uint8 (N, H, W, 3) images to uint8 images and is
deterministic given `seed`. All but JPEG run in JAX; JPEG uses Pillow on the host.
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np

SEVERITIES = (1, 2, 3, 4, 5)

_PARAMS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std, image in [0, 1]
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity (fewer = noisier)
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of salt-and-pepper pixels
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in pixels
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to every channel
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor towards the image mean
    "saturation": (0.8, 0.6, 0.4, 0.2, 0.0),  # factor towards the gray image
    "pixelate": (
        0.9,
        0.8,
        0.7,
        0.6,
        0.5,
    ),  # scale of the downsampled image (wider than CIFAR-C: 0.95 vs 0.9 aliased alike)
    "jpeg": (80, 65, 58, 50, 40),  # JPEG quality
}
NAMES = tuple(_PARAMS)


def _gaussian_noise(key, x, std):
    return x + std * jax.random.normal(key, x.shape)


def _shot_noise(key, x, photons):
    return jax.random.poisson(key, x * photons, x.shape).astype(jnp.float32) / photons


def _impulse_noise(key, x, amount):
    k_where, k_value = jax.random.split(key)
    hit = jax.random.uniform(k_where, x.shape) < amount
    salt = jax.random.bernoulli(k_value, 0.5, x.shape).astype(jnp.float32)
    return jnp.where(hit, salt, x)


def _gaussian_blur(_key, x, sigma):
    radius = int(np.ceil(3 * sigma))
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    k = jnp.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    channels = x.shape[-1]
    padded = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="reflect")
    kh = jnp.tile(k.reshape(-1, 1, 1, 1), (1, 1, 1, channels))  # (K, 1, 1, C) depthwise
    kw = jnp.tile(k.reshape(1, -1, 1, 1), (1, 1, 1, channels))
    dn = ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(
        padded, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=channels
    )
    return jax.lax.conv_general_dilated(
        y, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=channels
    )


def _brightness(_key, x, delta):
    return x + delta


def _contrast(_key, x, factor):
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - mean) * factor + mean


def _saturation(_key, x, factor):
    gray = (0.2989 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]
    return (x - gray) * factor + gray


def _pixelate(_key, x, scale):
    n, h, w, c = x.shape
    small = jax.image.resize(x, (n, int(h * scale), int(w * scale), c), method="linear", antialias=True)
    return jax.image.resize(small, x.shape, method="nearest")


_FUNCTIONS = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur,
    "brightness": _brightness,
    "contrast": _contrast,
    "saturation": _saturation,
    "pixelate": _pixelate,
}


def _jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    out = np.empty_like(images)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        out[i] = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """`images` (uint8 NHWC) with corruption `name` at `severity` (0 = unchanged, 1..5)."""
    if name not in _PARAMS:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(NAMES)}")
    if severity not in (0, *SEVERITIES):
        raise ValueError(f"severity must be 0..5, got {severity}")
    if severity == 0:
        return images
    param = _PARAMS[name][severity - 1]
    if name == "jpeg":
        return _jpeg(np.asarray(images), param)
    key = jax.random.fold_in(jax.random.key(seed), NAMES.index(name) * 10 + severity)
    x = jnp.asarray(images, jnp.float32) / 255.0
    y = _FUNCTIONS[name](key, x, param)
    return np.asarray(jnp.round(jnp.clip(y, 0.0, 1.0) * 255.0).astype(jnp.uint8))
