import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax.data import augment


def _index_image(n=1, size=32):
    """Pixel (i, j) holds value 1 + i * size + j in channel 0, so any shift is recoverable."""
    img = np.zeros((size, size, 3), np.float32)
    img[..., 0] = 1 + np.arange(size)[:, None] * size + np.arange(size)[None, :]
    return jnp.asarray(np.repeat(img[None], n, axis=0))


def _jitter(key, x, brightness=0.0, contrast=0.0, saturation=0.0):
    return augment.color_jitter(x, augment.jitter_draws(key, x.shape[0], brightness, contrast, saturation))


def test_crop_is_a_shift_within_padding_with_zero_fill():
    x = _index_image(n=64)
    out = np.asarray(augment.crop(x, augment.crop_offsets(jax.random.key(0), 64, padding=4), padding=4))
    shifts = set()
    for img in out:
        # The top-left real pixel tells the shift; everything else must follow from it.
        nz = np.argwhere(img[..., 0] > 0)
        i0, j0 = nz.min(axis=0)
        first = img[i0, j0, 0] - 1
        di, dj = int(first // 32) - i0, int(first % 32) - j0  # source = output + (di, dj)
        assert -4 <= di <= 4 and -4 <= dj <= 4
        expected = np.zeros((32, 32))
        for i in range(32):
            for j in range(32):
                si, sj = i + di, j + dj
                if 0 <= si < 32 and 0 <= sj < 32:
                    expected[i, j] = 1 + si * 32 + sj
        np.testing.assert_array_equal(img[..., 0], expected)
        shifts.add((di, dj))
    assert len(shifts) > 20  # offsets really vary per image


def test_flip_frequency_and_content():
    x = _index_image(n=4000, size=4)
    out = np.asarray(augment.flip(x, augment.flips(jax.random.key(1), 4000)))
    flipped = np.all(out == np.asarray(x)[:, :, ::-1], axis=(1, 2, 3))
    same = np.all(out == np.asarray(x), axis=(1, 2, 3))
    assert np.all(flipped ^ same)
    assert abs(flipped.mean() - 0.5) < 0.03


def test_jitter_of_strength_zero_is_identity():
    x = jax.random.uniform(jax.random.key(2), (8, 32, 32, 3)) * 255
    np.testing.assert_array_equal(_jitter(jax.random.key(3), x, 0.0, 0.0, 0.0), x)


@pytest.mark.parametrize("strength", [0.2, 0.5, 1.5])
def test_jitter_factors_stay_in_range(strength):
    f = np.asarray(augment.jitter_factors(jax.random.key(4), 5000, strength))
    lo, hi = max(0.0, 1 - strength), 1 + strength
    assert f.min() >= lo and f.max() <= hi
    assert f.min() < lo + 0.05 * (hi - lo) and f.max() > hi - 0.05 * (hi - lo)  # the whole range is used


def test_brightness_alone_scales_each_image_and_clips():
    x = jnp.full((300, 2, 2, 3), 100.0)
    out = np.asarray(_jitter(jax.random.key(5), x, brightness=0.5))
    factors = out[:, 0, 0, 0] / 100.0
    assert np.allclose(out, factors[:, None, None, None] * 100.0)
    assert factors.min() >= 0.5 and factors.max() <= 1.5 and factors.std() > 0.2
    bright = np.asarray(_jitter(jax.random.key(5), jnp.full((300, 2, 2, 3), 250.0), brightness=0.5))
    assert bright.max() == 255.0


def test_saturation_alone_keeps_gray_images_gray():
    # torchvision's gray weights sum to 0.9999, hence the 1e-4 slack.
    gray = jnp.full((16, 4, 4, 3), 80.0)
    np.testing.assert_allclose(_jitter(jax.random.key(6), gray, saturation=0.9), gray, rtol=2e-4)
    color = jnp.broadcast_to(jnp.array([200.0, 50.0, 10.0]), (16, 4, 4, 3))
    assert not np.allclose(_jitter(jax.random.key(6), color, saturation=0.9), color)


def test_normalize_equals_torchvision():
    torch = pytest.importorskip("torch")
    from torchvision.transforms import v2

    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    for mean, std in augment.NORMALIZATIONS.values():
        t = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
        expected = t(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(
            augment.normalize(jnp.asarray(x), mean, std), expected, rtol=1e-5, atol=1e-5
        )


def test_resize_changes_size_and_keeps_constants():
    x = jnp.full((2, 32, 32, 3), 0.3)
    out = augment.resize(x, 224)
    assert out.shape == (2, 224, 224, 3)
    np.testing.assert_allclose(out, 0.3, rtol=1e-6)
