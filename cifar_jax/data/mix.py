"""MixUp and CutMix on a batch, with `torchvision.transforms.v2.MixUp`/`CutMix` semantics, under jit.

Each image is mixed with its neighbour in the batch (`roll(1, 0)`, as torchvision pairs them), with
one `lam ~ Beta(alpha, alpha)` for the whole batch:
    MixUp:  x = lam * x + (1 - lam) * roll(x),  targets likewise from one-hot labels;
    CutMix: a box of the rolled batch pasted in, its centre uniform over the image, its half-sides
            int(0.5 * sqrt(1 - lam) * size), clipped at the borders; lam becomes 1 - box area / image area.
With both alphas set, each batch takes one of the two with probability 1/2 (torchvision's
`RandomChoice([CutMix, MixUp])`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cifar_jax.optim import is_off


def mixup(x, targets, lam):
    """(images, targets) mixed with the batch rolled by one, by weight `lam`."""
    mix = lambda a: lam * a + (1.0 - lam) * jnp.roll(a, 1, axis=0)
    return mix(x).astype(x.dtype), mix(targets)


def cutmix_box(key, lam, height: int, width: int):
    """(y1, y2, x1, x2, lam_adjusted) of torchvision's CutMix box for `lam`, its centre drawn from `key`."""
    k_x, k_y = jax.random.split(key)
    return box_at(
        jax.random.randint(k_y, (), 0, height), jax.random.randint(k_x, (), 0, width), lam, height, width
    )


def box_at(r_y, r_x, lam, height: int, width: int):
    """(y1, y2, x1, x2, lam_adjusted) of the CutMix box centred at (r_y, r_x)."""
    r = 0.5 * jnp.sqrt(1.0 - lam)
    # int() truncates, as in torchvision.
    half_w, half_h = (r * width).astype(jnp.int32), (r * height).astype(jnp.int32)
    x1, x2 = jnp.maximum(r_x - half_w, 0), jnp.minimum(r_x + half_w, width)
    y1, y2 = jnp.maximum(r_y - half_h, 0), jnp.minimum(r_y + half_h, height)
    return y1, y2, x1, x2, 1.0 - ((x2 - x1) * (y2 - y1)) / (width * height)


def cutmix(x, targets, box):
    """(images NHWC, targets) with `box` (y1, y2, x1, x2, lam) of the batch rolled by one pasted in."""
    y1, y2, x1, x2, lam = box
    rows, cols = jnp.arange(x.shape[1])[:, None], jnp.arange(x.shape[2])[None, :]
    inside = ((rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2))[None, :, :, None]
    return jnp.where(inside, jnp.roll(x, 1, axis=0), x), lam * targets + (1.0 - lam) * jnp.roll(
        targets, 1, axis=0
    )


def beta_lam(key, alpha):
    """lam ~ Beta(alpha, alpha); 1 (nothing mixed in) where a traced alpha is 0, a population's
    member that has this mix off."""
    drawable = jnp.where(alpha > 0, alpha, 1.0)
    return jnp.where(alpha > 0, jax.random.beta(key, drawable, drawable), 1.0)


def mix_draws(key, mixup_alpha, cutmix_alpha, height: int, width: int) -> dict:
    """Every random number of one batch's mix (`mix_batch` applies them): MixUp's lam, CutMix's box
    in images of `height` x `width`, and with both, whether CutMix is the one. An alpha that is a
    Python 0 leaves its mix out of the program; a traced one (each member of a population its own)
    keeps it, and its 0 mixes nothing in, so that member trains as it would alone."""
    k_choice, k_mixup, k_cutmix, k_box = jax.random.split(key, 4)
    use_mixup, use_cutmix = not is_off(mixup_alpha), not is_off(cutmix_alpha)
    draws = {}
    if use_mixup:
        draws["mixup_lam"] = beta_lam(k_mixup, mixup_alpha)
    if use_cutmix:
        draws["cutmix_box"] = cutmix_box(k_box, beta_lam(k_cutmix, cutmix_alpha), height, width)
    if use_mixup and use_cutmix:
        # One of the two per batch; a member with one alpha 0 always takes the other.
        choice = jax.random.bernoulli(k_choice)
        draws["cutmix_chosen"] = jnp.where(
            mixup_alpha == 0, True, jnp.where(cutmix_alpha == 0, False, choice)
        )
    return draws


def mix_batch(draws: dict, x, labels, num_classes: int):
    """(images, soft targets (N, num_classes)) after MixUp or CutMix, with `mix_draws`' numbers."""
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if "mixup_lam" in draws:
        mixed_up = mixup(x, targets, draws["mixup_lam"])
    if "cutmix_box" in draws:
        cut = cutmix(x, targets, draws["cutmix_box"])
    if "cutmix_chosen" in draws:
        return tuple(jnp.where(draws["cutmix_chosen"], c, m) for c, m in zip(cut, mixed_up))
    return cut if "cutmix_box" in draws else mixed_up
