"""Checkpoints hold a state as named Orbax items, restore it (or some of its parts) exactly into a
template, name a layout that does not match, and verify a checksum of every array."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import checkpoint
from cifar_jax.checkpoint import Checkpoints, Snapshot


def _state(seed=0):
    """A small train-state-like tree: float32 arrays of several shapes, a scalar, int32 and bfloat16
    leaves."""
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "conv": {
                "kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
            },
            "fc": {"kernel": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)},
        },
        "batch_stats": {"mean": jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16)},
        "opt_state": {"count": jnp.asarray(7, jnp.int32), "scale": jnp.asarray(rng.normal(), jnp.float32)},
    }


def _zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _meta(epoch):
    return {"epoch": epoch, "phase": "all", "row": {"val_acc": 0.5}}


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_a_state_round_trips_as_named_items(tmp_path):
    state = _state()
    ckpts = Checkpoints(tmp_path)
    ckpts.save(1, state, _meta(1))
    ckpts.wait()
    assert {"params", "batch_stats", "opt_state", "layout", "meta"} <= {
        p.name for p in (tmp_path / "checkpoints" / "1").iterdir()
    }
    restored, meta = ckpts.restore(1, _zeros_like(state))
    _assert_trees_equal(restored, state)
    assert meta == _meta(1)
    template_sharding = jax.tree.leaves(_zeros_like(state))[0].sharding
    assert all(x.sharding == template_sharding for x in jax.tree.leaves(restored))
    # Some of the parts alone, as evaluation restores them (no optimizer state to build).
    weights, _ = ckpts.restore(
        1, {"params": _zeros_like(state["params"]), "batch_stats": _zeros_like(state["batch_stats"])}
    )
    _assert_trees_equal(weights, {"params": state["params"], "batch_stats": state["batch_stats"]})
    ckpts.close()


def test_a_snapshot_survives_the_state_being_donated(tmp_path):
    # Running ahead, the trainer copies an epoch's state and the next chunk then donates (deletes) it.
    state = _state()
    expected = jax.tree.map(np.asarray, state)
    snapshot = Snapshot.of(state)
    for x in jax.tree.leaves(state):
        x.delete()
    ckpts = Checkpoints(tmp_path)
    ckpts.save(1, snapshot, _meta(1))
    ckpts.wait()
    restored, _ = ckpts.restore(1, _zeros_like(_state()))
    _assert_trees_equal(restored, expected)
    ckpts.close()


def test_a_layout_that_does_not_match_is_named(tmp_path):
    ckpts = Checkpoints(tmp_path)
    ckpts.save(1, _state(), _meta(1))
    ckpts.wait()
    other = _zeros_like(_state())
    other["params"]["fc"]["kernel"] = jnp.zeros((4, 6))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "holds ['params']['fc']['kernel'] float32[4, 5] where the configured state has "
            "['params']['fc']['kernel'] float32[4, 6]"
        ),
    ):
        ckpts.restore(1, other)
    fewer = _zeros_like(_state())
    del fewer["opt_state"]["scale"]
    with pytest.raises(ValueError, match="the checkpoint holds 6 arrays, the configured state 5"):
        ckpts.restore(1, fewer)
    ckpts.close()


def test_the_interrupted_checkpoint_round_trips(tmp_path):
    tree = {"state": _state(), "sums": {"count": jnp.asarray(12, jnp.int32), "loss_sum": jnp.asarray(3.5)}}
    ckpts = Checkpoints(tmp_path)
    ckpts.mid_epoch.save(42, tree, {"epoch": 1, "next_step": 2, "phase": "all"})
    assert ckpts.mid_epoch.meta() == {"epoch": 1, "next_step": 2, "phase": "all"}
    _assert_trees_equal(ckpts.mid_epoch.restore(_zeros_like(tree)), tree)
    ckpts.close()


def _numpy_checksum(x) -> int:
    """The checksum's definition, computed with NumPy in Python integers: sum of words * (2 * 2654435761 * i
    + 1) mod 2**32."""
    raw = np.asarray(x).tobytes()
    width = {1: np.uint8, 2: np.uint16}.get(np.asarray(x).dtype.itemsize, np.uint32)
    words = np.frombuffer(raw, dtype=width).astype(np.uint64)
    weights = (np.arange(words.size, dtype=np.uint64) * (2 * 2654435761) + 1) % 2**32
    return int(sum(int(w) * int(v) for w, v in zip(words, weights)) % 2**32)


def test_checksums_equal_a_numpy_computation_and_see_every_flipped_bit():
    state = _state()
    sums = checkpoint.checksums(state)
    assert sums == {
        jax.tree_util.keystr(p): _numpy_checksum(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
    }
    assert Snapshot.of(state).checksums() == sums
    kernel = np.asarray(state["params"]["conv"]["kernel"])
    for index in (0, 17, kernel.size - 1):
        for bit in (0, 22, 31):  # mantissa, its top, the sign
            flipped = kernel.copy().reshape(-1).view(np.uint32)
            flipped[index] ^= np.uint32(1 << bit)
            changed = {
                **state,
                "params": {
                    **state["params"],
                    "conv": {
                        **state["params"]["conv"],
                        "kernel": jnp.asarray(flipped.view(np.float32).reshape(kernel.shape)),
                    },
                },
            }
            assert (
                checkpoint.checksums(changed)["['params']['conv']['kernel']"]
                != sums["['params']['conv']['kernel']"]
            )
    with pytest.raises(
        checkpoint.DamagedCheckpoint, match=r"where: \['opt_state'\]\['count'\] does not match"
    ):
        checkpoint.verify(
            state, {**sums, "['opt_state']['count']": sums["['opt_state']['count']"] + 1}, "where"
        )


@pytest.mark.slow
def test_the_readme_snippet_restores_a_trained_checkpoint_with_orbax_alone(tmp_path):
    """The README's snippet, run as written (no cifar_jax import) on a trained SimpleCNN's checkpoints."""
    import os
    import subprocess
    import sys

    from cifar_jax import trainer
    from tests.support.helpers import tiny_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    snippet = readme.split("### Restoring with Orbax alone")[1].split("```python\n")[1].split("```")[0]
    assert "cifar_jax" not in snippet
    trainer.train_and_evaluate(
        tiny_config(num_epochs=1), tmp_path / "checkpoints" / "quickstart", progress=False
    )
    out = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "(3, 3, 3, 32)"
