"""The training loop's flat parameters: the state it carries holds the train state exactly, and a
step on the vectors is the step on the trees (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cifar_jax import config as config_lib
from cifar_jax import flat, models, optim, steps
from cifar_jax.data import pipeline


def _optimizer(name: str, **kw):
    c = config_lib.base().optimizer
    c.update(name=name, lr=0.1, weight_decay=0.1, momentum=0.9, **kw)
    return optim.make_optimizer(c, 0.05)


def _state(model, tx, train_only=None, seed=0):
    """A train state whose optimizer moments are not zero (random), so that misplacing them shows."""
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    trainable, _ = steps.partition(params, train_only)
    rng = np.random.default_rng(seed)
    opt_state = jax.tree.map(
        lambda a: jnp.asarray(np.abs(rng.normal(size=a.shape)), a.dtype) if a.ndim else a,
        tx.init(trainable),
    )
    return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}


@pytest.mark.parametrize("train_only", [None, "fc"])
def test_the_loop_form_holds_the_train_state_exactly(train_only):
    model = models.create("resnet18", 10, stem="cifar")
    tx = _optimizer("adamw", decay_norm_and_bias=False)
    state = _state(model, tx, train_only)
    loop = steps.to_loop(state, train_only)
    vectors, frozen = loop["params"]
    trainable, expected_frozen = steps.partition(state["params"], train_only)
    leaves = jax.tree.leaves(trainable)
    # The kernels in the first vector (convolutions as OHWI), the rest in the second, in leaf order.
    kernels = [a.transpose(3, 0, 1, 2) if a.ndim == 4 else a for a in leaves if a.ndim > 1]
    np.testing.assert_array_equal(vectors.vectors[0], np.concatenate([np.ravel(a) for a in kernels]))
    np.testing.assert_array_equal(
        vectors.vectors[1], np.concatenate([np.ravel(a) for a in leaves if a.ndim == 1])
    )
    assert jax.tree.structure(frozen) == jax.tree.structure(expected_frozen)
    adam = loop["opt_state"][0]
    assert isinstance(adam.mu, flat.Flat) and isinstance(adam.nu, flat.Flat)
    back = steps.from_loop(loop)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


def _tree_step(cfg: steps.StepConfig, state, x, y):
    """The step computed on the trees (optax over each parameter array): the reference."""
    trainable, frozen = steps.partition(state["params"], cfg.train_only)

    def loss_fn(trainable):
        model = nnx.merge(cfg.graphdef, nnx.merge_state(trainable, frozen), state["batch_stats"], copy=True)
        return steps.cross_entropy(model(x), y, cfg.num_classes, cfg.label_smoothing).mean()

    updates, opt_state = cfg.tx.update(jax.grad(loss_fn)(trainable), state["opt_state"], trainable)
    return nnx.merge_state(optax.apply_updates(trainable, updates), frozen), opt_state


@pytest.mark.parametrize(
    "name,options,train_only",
    [
        ("adamw", {"decay_norm_and_bias": False, "clip_norm": 0.5}, None),
        ("adam", {}, "fc2"),
        ("sgd", {"nesterov": True, "decay_norm_and_bias": False}, None),
    ],
)
@pytest.mark.slow
def test_a_step_on_the_vectors_is_the_step_on_the_trees(name, options, train_only, x64):
    model = models.create("simple_cnn", 10, dtype="float64")
    nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float64), nnx.state(model)))
    graphdef = nnx.graphdef(model)
    tx = _optimizer(name, **options)
    cfg = steps.StepConfig(graphdef, tx, train_only, pipeline.Preprocess(), 8, 10, 0.1, seed=0)
    state = _state(model, tx, train_only)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(8, 32, 32, 3)))
    y = jnp.asarray(rng.integers(0, 10, 8))
    new, _ = jax.jit(lambda s: steps.update_step(cfg, s, steps.zero_metrics(), x, y))(state)
    params, opt_state = jax.jit(lambda s: _tree_step(cfg, s, x, y))(state)
    moved = 0
    for got, want, before in zip(
        jax.tree.leaves(new["params"]), jax.tree.leaves(params), jax.tree.leaves(state["params"]), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
        moved += not np.array_equal(want, before)
    assert moved == len(jax.tree.leaves(steps.partition(state["params"], train_only)[0]))
    for got, want in zip(jax.tree.leaves(new["opt_state"]), jax.tree.leaves(opt_state), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
