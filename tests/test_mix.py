"""MixUp and CutMix against torchvision.transforms.v2 itself, given the same random draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import steps
from cifar_jax.data import mix

torch = pytest.importorskip("torch")
v2 = pytest.importorskip("torchvision.transforms.v2")

N, H, W, K = 6, 8, 10, 5


def _batch():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, H, W, 3)).astype(np.float32), rng.integers(0, K, N)


def _mixed(key, x, y, mixup_alpha, cutmix_alpha):
    draws = mix.mix_draws(key, mixup_alpha, cutmix_alpha, H, W)
    return mix.mix_batch(draws, jnp.asarray(x), jnp.asarray(y), K)


def _torch_mix(transform, x, y):
    out_x, out_y = transform(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y))
    return out_x.numpy().transpose(0, 2, 3, 1), out_y.numpy()


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.9])
def test_mixup_equals_torchvision(lam, monkeypatch):
    x, y = _batch()
    transform = v2.MixUp(alpha=1.0, num_classes=K)
    monkeypatch.setattr(transform._dist, "sample", lambda shape=(): torch.tensor(lam))
    want_x, want_y = _torch_mix(transform, x, y)
    got_x, got_y = mix.mixup(jnp.asarray(x), jax.nn.one_hot(y, K), lam)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("lam,r_y,r_x", [(0.5, 4, 5), (0.2, 0, 9), (0.7, 7, 0), (0.999, 3, 3), (0.0, 2, 6)])
def test_cutmix_equals_torchvision(lam, r_y, r_x, monkeypatch):
    x, y = _batch()
    transform = v2.CutMix(alpha=1.0, num_classes=K)
    monkeypatch.setattr(transform._dist, "sample", lambda shape=(): torch.tensor(lam))
    centre = iter([torch.tensor([r_x]), torch.tensor([r_y])])  # torchvision draws r_x, then r_y
    monkeypatch.setattr(torch, "randint", lambda *args, **kwargs: next(centre))
    want_x, want_y = _torch_mix(transform, x, y)
    box = mix.box_at(jnp.int32(r_y), jnp.int32(r_x), jnp.float32(lam), H, W)
    got_x, got_y = mix.cutmix(jnp.asarray(x), jax.nn.one_hot(y, K), box)
    np.testing.assert_array_equal(got_x, want_x)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mixup_alpha,cutmix_alpha", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_a_mixed_batch_under_jit_keeps_targets_that_sum_to_one(mixup_alpha, cutmix_alpha):
    x, y = _batch()
    run = jax.jit(lambda key: _mixed(key, x, y, mixup_alpha, cutmix_alpha))
    seen_changed = False
    for i in range(8):
        got_x, targets = run(jax.random.key(i))
        np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)
        # Every pixel comes from the image or its neighbour, mixed with the targets' weights.
        lam = np.asarray(targets)[np.arange(N), y] if not np.any(y == np.roll(y, 1)) else None
        if lam is not None and not cutmix_alpha:
            np.testing.assert_allclose(
                got_x,
                lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * np.roll(x, 1, 0),
                rtol=1e-5,
                atol=1e-5,
            )
        seen_changed |= not np.allclose(got_x, x)
    assert seen_changed


@pytest.mark.parametrize("mixup_alpha,cutmix_alpha", [(0.0, 0.0), (0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_traced_alphas_mix_as_the_same_constants_and_zero_mixes_nothing(mixup_alpha, cutmix_alpha):
    """A population's member carries its alphas as traced values, both mixes in the program: it
    mixes as a run with those alphas as constants, and with both 0 leaves the batch exactly as it is.
    XLA folds a constant alpha into the Beta sampler's arithmetic and cannot fold a traced one: in
    float32 the draws then differ in their last bits (seen: 2.4e-7 on pixels of about 1); in float64
    a member and its run alone agree to 1e-10 (test_population)."""
    x, y = _batch()
    traced = jax.jit(lambda key, a, b: _mixed(key, x, y, a, b))
    alone = jax.jit(
        lambda key: (
            _mixed(key, x, y, mixup_alpha, cutmix_alpha)
            if mixup_alpha or cutmix_alpha
            else (jnp.asarray(x), jax.nn.one_hot(y, K))
        )
    )
    for i in range(6):
        key = jax.random.key(i)
        got, want = traced(key, mixup_alpha, cutmix_alpha), alone(key)
        for a, b in zip(got, want, strict=True):
            if mixup_alpha or cutmix_alpha:
                np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6)
            else:
                np.testing.assert_array_equal(a, b)


def test_soft_target_loss_equals_torch_cross_entropy_with_probabilities():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(8, K)).astype(np.float32) * 3
    targets = rng.dirichlet(np.ones(K), size=8).astype(np.float32)
    for smoothing in (0.0, 0.1):
        want = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)(
            torch.from_numpy(logits), torch.from_numpy(targets)
        ).item()
        got = float(
            steps.cross_entropy(jnp.asarray(logits), None, K, smoothing, targets=jnp.asarray(targets)).mean()
        )
        assert got == pytest.approx(want, rel=1e-6)
