"""Evaluation several batches per jitted call (the default: a whole split) against one per call."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from cifar_jax import config as config_lib
from cifar_jax import models, steps
from cifar_jax.data import pipeline
from tests.support.helpers import run_probe, tiny_config


@pytest.mark.parametrize(
    "num_batches,wanted", [(20, 16), (20, 2**31 - 1), (7, 3), (7, 1), (1, 5), (21, 16), (13, 4)]
)
def test_eval_calls_are_equal_cover_every_batch_and_waste_less_than_a_call(num_batches, wanted):
    per_call, calls = steps.eval_calls(num_batches, wanted)
    assert 1 <= per_call <= min(wanted, num_batches)
    assert calls == -(-num_batches // min(wanted, num_batches))  # as few calls as `wanted` allows
    assert per_call * calls >= num_batches > per_call * (calls - 1)  # the padding fits in the last call


def test_automatic_eval_fuses_a_whole_split_and_a_config_can_cap_it(tmp_path):
    assert steps.eval_calls(20, steps.eval_batches_per_call(tiny_config())) == (20, 1)
    assert steps.eval_calls(20, steps.eval_batches_per_call(tiny_config(eval_batches_per_call=8))) == (7, 3)
    # A config.json saved before the key existed: loading merges it over base(), once.
    saved = json.loads(tiny_config().to_json())
    del saved["eval_batches_per_call"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    old = config_lib.from_json(tmp_path / "config.json")
    assert steps.eval_batches_per_call(old) == steps.eval_batches_per_call(tiny_config())


@pytest.fixture(scope="module")
def eval_model():
    model = models.create("simple_cnn", 10, seed=3)
    model.eval()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (23, 32, 32, 3), dtype=np.uint8)  # 6 batches of 4, the last one padded
    labels = rng.integers(0, 10, 23).astype(np.int32)
    return model, graphdef, params, batch_stats, images, labels


@pytest.mark.parametrize("per_call", [2, 4, 100])
def test_fused_eval_predicts_and_sums_like_one_batch_per_call(eval_model, per_call):
    model, graphdef, params, batch_stats, images, labels = eval_model
    pre = pipeline.Preprocess()
    predict = {
        k: steps.make_predict(graphdef, preprocess=pre, batch_size=4, batches_per_call=k)
        for k in (1, per_call)
    }
    logits = {k: np.asarray(f(params, batch_stats, images)) for k, f in predict.items()}
    assert logits[per_call].shape == (23, 10)
    np.testing.assert_allclose(logits[per_call], logits[1], rtol=1e-5, atol=1e-5)
    # Every row is its own image's logits, in order (not a padded or repeated batch).
    np.testing.assert_allclose(logits[per_call], np.asarray(model(pre.eval(images))), rtol=1e-4, atol=1e-4)

    sums = {
        k: jax.device_get(
            steps.make_eval_sums(
                graphdef,
                preprocess=pre,
                batch_size=4,
                num_classes=10,
                label_smoothing=0.1,
                batches_per_call=k,
            )(params, batch_stats, images, labels)
        )
        for k in (1, per_call)
    }
    assert sums[per_call]["count"] == sums[1]["count"] == 23
    assert sums[per_call]["correct"] == sums[1]["correct"] == (logits[1].argmax(-1) == labels).sum()
    expected_loss = np.asarray(steps.cross_entropy(logits[1], labels, 10, 0.1)).sum()
    np.testing.assert_allclose(sums[per_call]["loss_sum"], sums[1]["loss_sum"], rtol=1e-5)
    np.testing.assert_allclose(sums[per_call]["loss_sum"], expected_loss, rtol=1e-4)


@pytest.mark.slow
def test_fused_eval_over_8_devices_equals_one_device():
    """Each batch sharded over the mesh, two batches per call (the last call padded). One process of
    8 devices evaluates over a mesh of 1 device and of 8."""
    got = run_probe("eval_probe.py", 8, "1", "8")
    one, eight = got["1"], got["8"]
    assert got["devices"] == 8 and one["mesh"] == 1 and eight["mesh"] == 8
    np.testing.assert_allclose(eight["logits"], one["logits"], rtol=1e-5, atol=1e-5)
    assert np.asarray(one["logits"]).shape == (23, 10)
    assert (
        eight["sums"]["count"] == one["sums"]["count"] == 23
        and eight["sums"]["correct"] == one["sums"]["correct"]
    )
    assert eight["sums"]["loss_sum"] == pytest.approx(one["sums"]["loss_sum"], rel=1e-5)
