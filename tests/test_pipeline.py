import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import data, sharding, steps
from cifar_jax.data import pipeline
from tests.support.helpers import ROOT, probe_env


def test_epoch_covers_every_index_once_and_drops_partial_batch():
    n, bs = 103, 16
    order = np.asarray(pipeline.epoch_order(0, 0, n))
    steps = pipeline.steps_per_epoch(n, bs)
    assert steps == 6
    seen = np.concatenate(
        [np.asarray(pipeline.train_indices(jnp.asarray(order), s, bs)) for s in range(steps)]
    )
    assert len(seen) == len(set(seen.tolist())) == 96  # no repeats; the last 7 wait for another epoch
    assert sorted(order.tolist()) == list(range(n))


def test_orders_differ_across_epochs_and_repeat_across_runs():
    a0, a1 = pipeline.epoch_order(3, 0, 500), pipeline.epoch_order(3, 1, 500)
    assert not np.array_equal(a0, a1)
    np.testing.assert_array_equal(a0, pipeline.epoch_order(3, 0, 500))
    assert not np.array_equal(a0, pipeline.epoch_order(4, 0, 500))


@pytest.mark.parametrize("n,bs", [(10, 4), (13, 5), (8, 8), (3, 16)])
def test_eval_batches_count_every_example_once(n, bs):
    labels = jnp.arange(n, dtype=jnp.int32)
    images = jnp.zeros((n, 32, 32, 3), jnp.uint8)
    pre = pipeline.Preprocess()
    counts = np.zeros(n, int)
    for b in range(pipeline.num_eval_batches(n, bs)):
        x, y, mask = pipeline.eval_batch(images, labels, b, batch_size=bs, preprocess=pre)
        assert x.shape == (bs, 32, 32, 3) and mask.shape == (bs,)
        np.add.at(counts, np.asarray(y)[np.asarray(mask)], 1)
    np.testing.assert_array_equal(counts, np.ones(n, int))


def test_train_batch_is_augmented_normalised_and_resized():
    arrays = data.load("fake", num_train=32, num_test=4, num_classes=3)
    mesh = sharding.make_mesh()
    images, labels = sharding.replicate(arrays.x_train, mesh), sharding.replicate(arrays.y_train, mesh)
    pre = pipeline.Preprocess(crop_padding=4, flip=True, normalization="imagenet", image_size=64)
    order = pipeline.epoch_order(0, 0, 32)
    x, y = jax.jit(
        lambda s: pipeline.train_batch(images, labels, order, 0, 0, s, batch_size=8, preprocess=pre)
    )(1)
    assert x.shape == (8, 64, 64, 3) and x.dtype == jnp.float32
    np.testing.assert_array_equal(y, arrays.y_train[np.asarray(order)[8:16]])
    plain = pre.eval(jnp.asarray(arrays.x_train[np.asarray(order)[8:16]]))
    assert not np.allclose(x, plain)  # augmentation did something
    assert abs(float(plain.mean())) < 1.0  # normalised scale


@pytest.mark.parametrize("population", [False, True])
@pytest.mark.slow
def test_a_chunk_draws_before_its_loop_the_numbers_each_step_would_draw(population):
    # A training chunk draws every step's random numbers at once (`steps.chunk_draws`); each step's
    # must be those it would draw alone: crops, flips, jitter factors and orders, CutMix's box and
    # the choice between the mixes bit for bit. Beta's lam comes from a sampler of logs and powers
    # that XLA fuses differently when batched: to float32 rounding (measured: 9e-7 relative, on a
    # lam of 8e-6; Beta(0.2, 0.2) raises a uniform to the power 5). A population's members carry
    # their alphas as arguments of the program.
    pre = pipeline.Preprocess(crop_padding=4, flip=True, brightness=0.2, contrast=0.3, saturation=0.4)

    def cfg(mixup_alpha, cutmix_alpha):
        return steps.StepConfig(
            graphdef=None,
            tx=None,
            train_only=None,
            preprocess=pre,
            batch_size=8,
            num_classes=5,
            label_smoothing=0.0,
            seed=3,
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
        )

    epoch, first, k = 2, 5, 4
    if population:
        chunk = jax.jit(lambda a, b, e, f: steps.chunk_draws(cfg(a, b), e, f, k))(0.2, 1.0, epoch, first)
        step = jax.jit(lambda a, b, e, s: steps.step_draws(cfg(a, b), e, s))
        alone_of = lambda s: step(0.2, 1.0, epoch, s)
    else:
        chunk = jax.jit(lambda e, f: steps.chunk_draws(cfg(0.2, 1.0), e, f, k))(epoch, first)
        alone_of = functools.partial(jax.jit(lambda e, s: steps.step_draws(cfg(0.2, 1.0), e, s)), epoch)
    assert set(chunk) == {"augment", "mix"} and set(chunk["augment"]) == {"crop", "flip", "jitter"}
    assert set(chunk["mix"]) == {"mixup_lam", "cutmix_box", "cutmix_chosen"}
    for i in range(k):
        alone = jax.tree_util.tree_leaves_with_path(alone_of(first + i))
        drawn = jax.tree_util.tree_leaves_with_path(jax.tree.map(lambda d: d[i], chunk))
        assert [path for path, _ in drawn] == [path for path, _ in alone]
        for (path, a), (_, b) in zip(drawn, alone):
            if jax.tree_util.keystr(path) == "['mix']['mixup_lam']":
                np.testing.assert_allclose(a, b, rtol=1e-5)
            else:
                np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    crops = np.asarray(chunk["augment"]["crop"])
    assert len({c.tobytes() for c in crops}) == k  # each step its own numbers


def _probe(tmp_path, devices):
    env = probe_env(devices)
    out = tmp_path / f"probe{devices}.npz"
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "support", "pipeline_probe.py"), str(out)],
        check=True,
        env=env,
        cwd=ROOT,
    )
    return np.load(out)


@pytest.mark.slow
def test_batches_do_not_depend_on_device_count(tmp_path):
    one, eight = _probe(tmp_path, 1), _probe(tmp_path, 8)
    assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
    np.testing.assert_array_equal(one["y"], eight["y"])
    np.testing.assert_allclose(one["x"], eight["x"], rtol=0, atol=1e-6)


def test_unknown_normalization_is_refused():
    with pytest.raises(ValueError, match="valid: cifar, imagenet"):
        pipeline.Preprocess(normalization="mnist")
