"""train_and_evaluate end to end on tiny data: metrics, fused steps per call, bfloat16, best checkpoint,
two-phase fine-tuning."""

import functools
import json

import jax
import numpy as np
import pytest
from flax import nnx

from cifar_jax import evaluate, optim, phases, pretrained, sharding, steps, train_state, trainer
from cifar_jax.checkpoint import Checkpoints
from tests.support.helpers import checkpoint_arrays, tiny_config, without_timing

# Resuming (2 epochs, a stop, 2 more == 4 straight, bit for bit) is tested in test_reliability.py.


def test_metrics_rows_are_complete_and_accuracies_are_fractions(tmp_path):
    # Two steps per jitted call: the fori_loop path (the default on accelerators) runs here too.
    rows = trainer.train_and_evaluate(tiny_config(num_epochs=1, steps_per_call=2), tmp_path, progress=False)
    row = rows[0]
    for key in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "compile_s"):
        assert row[key] is not None, key
    assert 0 <= row["train_acc"] <= 1 and 0 <= row["val_acc"] <= 1
    assert row["train_loss"] > 0
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "config.json").read_text())["model"]["name"] == "simple_cnn"
    # Where and with what it trained (test_reliability: the sessions of a stopped or failed run).
    (session,) = json.loads((tmp_path / "sessions.json").read_text())
    assert session["status"] == "finished" and session["epochs_done"] == 1 and session["from_epoch"] == 1
    assert session["versions"]["jax"] == jax.__version__ and session["devices"] == jax.device_count()
    assert (
        session["backend"] == "cpu" and 0 < session["wall_s"] < 600 and session["ended"] >= session["started"]
    )


@pytest.mark.slow
def test_several_steps_per_call_train_like_one_step_per_call(tmp_path):
    # Accelerators fuse up to 16 steps into one call (a fori_loop), CPUs run one: both must give the
    # same training. 4 steps per epoch, 2 epochs: one call per epoch against four. SGD, because a
    # conv bias before a train-mode BatchNorm has a zero gradient but for rounding, which Adam would
    # scale up to full-size steps that differ with the order of summation.
    config = functools.partial(tiny_config, num_epochs=2, **{"optimizer.name": "sgd", "optimizer.lr": 0.05})
    runs = {
        k: trainer.train_and_evaluate(config(steps_per_call=k), tmp_path / str(k), progress=False)
        for k in (1, 4)
    }
    for one, fused in zip(runs[1], runs[4]):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert fused[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    for a, b in zip(checkpoint_arrays(tmp_path / "1"), checkpoint_arrays(tmp_path / "4")):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_running_ahead_trains_and_checkpoints_like_a_run_that_does_not(tmp_path):
    # By default the next epoch's first chunks are queued before the host reads validation, logs
    # and checkpoints an epoch, which then saves a device copy of the epoch's state (the next chunk
    # has taken the state over). Every checkpoint must still hold its own epoch's state.
    runs = {
        k: trainer.train_and_evaluate(
            tiny_config(num_epochs=3, run_ahead_chunks=k), tmp_path / str(k), progress=False
        )
        for k in (0, 2)
    }
    assert without_timing(runs[2]) == without_timing(runs[0])
    assert Checkpoints(tmp_path / "2", read_only=True).epochs() == [1, 2, 3]
    for epoch in (1, 2, 3):
        for a, b in zip(checkpoint_arrays(tmp_path / "2", epoch), checkpoint_arrays(tmp_path / "0", epoch)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_checkpoints_every_n_epochs_and_the_last_with_or_without_running_ahead(tmp_path):
    # checkpoint.every_epochs=2 over 5 epochs saves epochs 2, 4 and 5 (the last), each holding its
    # own epoch's state, whether or not the next epoch runs ahead of the host's end-of-epoch work.
    every = {"checkpoint.every_epochs": 2, "checkpoint.keep": 5}
    runs = {
        k: trainer.train_and_evaluate(
            tiny_config(num_epochs=5, run_ahead_chunks=k, **every), tmp_path / str(k), progress=False
        )
        for k in (0, 2)
    }
    trainer.train_and_evaluate(
        tiny_config(num_epochs=5, **{"checkpoint.keep": 5}), tmp_path / "all", progress=False
    )
    assert Checkpoints(tmp_path / "all", read_only=True).epochs() == [1, 2, 3, 4, 5]
    for k, rows in runs.items():
        assert Checkpoints(tmp_path / str(k), read_only=True).epochs() == [2, 4, 5]
        for epoch in (2, 4, 5):
            for a, b in zip(
                checkpoint_arrays(tmp_path / str(k), epoch), checkpoint_arrays(tmp_path / "all", epoch)
            ):
                np.testing.assert_array_equal(a, b)
        # Each row times the previous epoch's host work (logging, checkpoint), done within its own
        # time: none before the first epoch, and a checkpoint only after the epochs that saved one.
        assert rows[0]["host_s"] is None and all(r["host_s"] >= 0 for r in rows[1:])
        assert [r["checkpoint_s"] is not None for r in rows] == [False, False, True, False, True]
        # Rounded to milliseconds: a validation already finished when the host reads it (running
        # ahead) can take 0.000 s; it is never longer than its epoch.
        assert all(r["val_s"] is not None and 0 <= r["val_s"] <= r["epoch_time_s"] for r in rows)


def test_the_host_waits_for_no_device_value_between_an_epochs_last_chunk_and_its_validation(
    tmp_path, monkeypatch
):
    # An epoch boundary must not leave the device idle while the host catches up: validation is
    # queued behind the last chunk before the host reads that chunk's metrics, and the logged lr
    # comes from a table made at the phase's start, not from the schedule evaluated on the device
    # (and read back) as each epoch starts. One chunk per epoch, no running ahead: per epoch the
    # host queues validation, then reads the chunk's metrics, then validation's.
    events = []
    to_host = sharding.to_host  # every read of device values by the trainer
    monkeypatch.setattr(sharding, "to_host", lambda tree: events.append("read") or to_host(tree))
    make_eval_sums = steps.make_eval_sums

    def recording_eval_sums(*args, **kwargs):
        run = make_eval_sums(*args, **kwargs)
        return lambda *a: events.append("validate") or run(*a)

    monkeypatch.setattr(steps, "make_eval_sums", recording_eval_sums)
    make_schedule = optim.make_schedule

    def recording_schedule(*args, **kwargs):
        schedule = make_schedule(*args, **kwargs)

        def evaluated(count):
            if not isinstance(count, jax.core.Tracer):  # computed on the device now, for the host to read
                events.append("schedule")
            return schedule(count)

        return evaluated

    monkeypatch.setattr(optim, "make_schedule", recording_schedule)
    trainer.train_and_evaluate(
        tiny_config(num_epochs=3, steps_per_call=4, run_ahead_chunks=0), tmp_path, progress=False
    )
    assert events == ["validate", "read", "read"] * 3


@pytest.mark.parametrize("per", ["epoch", "step"])
def test_logged_learning_rates_are_the_schedules_at_each_epochs_first_step(per):
    config = tiny_config(
        num_epochs=7,
        **{
            "schedule.name": "step",
            "schedule.step_size": 2,
            "schedule.gamma": 0.5,
            "schedule.warmup_epochs": 2,
            "schedule.per": per,
        },
    )
    phase = phases.phases(config)[0]
    schedule, _ = phases.make_tx(config, phase, steps_per_epoch=5)
    lrs = phases.epoch_lrs(schedule, phase, steps_per_epoch=5)
    expected = np.array([schedule(e * 5) for e in range(7)], np.float32)  # what the optimizer uses
    np.testing.assert_array_equal(np.array(lrs, np.float32), expected)
    assert len(set(lrs)) > 3  # warmup, then decays: a table of one value would not pass
    assert (
        phases.epoch_lrs(lambda count: 1e-3 + 0 * count, phase, 5)[0] == 0.001
    )  # logged as 0.001, not 0.0010000000474974513


@pytest.mark.slow
def test_bfloat16_compute_trains_like_float32(tmp_path):
    # bfloat16 is the compute dtype on accelerators (float32 parameters, optimizer and statistics).
    # Measured here: val acc 0.83 for both after 3 epochs of digits, train loss 0.542 vs 0.545.
    rows = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(
            num_epochs=3,
            **{
                "model.dtype": dtype,
                "model.num_classes": 10,
                "data.source": "digits",
                "batch_size": 64,
                "eval_batch_size": 100,
            },
        )
        rows[dtype] = trainer.train_and_evaluate(config, tmp_path / dtype, progress=False)
    assert rows["bfloat16"][0]["train_loss"] != rows["float32"][0]["train_loss"]  # bfloat16 did compute
    assert rows["bfloat16"][-1]["val_acc"] > 0.7  # chance: 0.1
    assert rows["bfloat16"][-1]["val_acc"] == pytest.approx(rows["float32"][-1]["val_acc"], abs=0.05)
    for low, full in zip(rows["bfloat16"], rows["float32"]):
        assert low["train_loss"] == pytest.approx(full["train_loss"], rel=0.05)


@pytest.mark.slow
def test_best_checkpoint_is_the_best_epoch_and_restores_its_val_acc(tmp_path):
    config = tiny_config(
        num_epochs=4,
        **{"model.num_classes": 10, "data.source": "digits", "batch_size": 64, "eval_batch_size": 100},
    )
    config.checkpoint.keep = 1  # only the latest and the best survive
    rows = trainer.train_and_evaluate(config, tmp_path, progress=False)
    best_row = max(rows, key=lambda r: (r["val_acc"], -r["epoch"]))
    ckpts = Checkpoints(tmp_path, read_only=True)
    assert ckpts.by_preference("best")[0] == best_row["epoch"]
    assert set(ckpts.epochs()) == {best_row["epoch"], 4}
    restored = evaluate.restore(tmp_path, "best")
    from cifar_jax import data

    val_x, val_y = data.load_splits(restored.config.data).val
    report = evaluate.metrics(evaluate.predict(restored, val_x), val_y)
    assert report["n_examples"] == len(val_y) == 288  # 20% of 1,438, not a multiple of the batch of 100
    assert report["top1_acc"] == pytest.approx(best_row["val_acc"], abs=1e-9)
    assert report["loss"] == pytest.approx(best_row["val_loss"], rel=1e-4)


@pytest.fixture
def converted_resnet18(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = pretrained.from_torchvision("resnet18", torchvision.models.resnet18(num_classes=7).state_dict())
    return pretrained.save(
        model, tmp_path / "weights", {"arch": "resnet18", "num_classes": 7, "stem": "imagenet"}
    )


@pytest.mark.slow
def test_head_only_phase_keeps_backbone_bit_identical_then_all_layers_train(tmp_path, converted_resnet18):
    config = tiny_config(
        num_epochs=2,
        head_only_epochs=1,
        **{"model.name": "resnet18", "model.stem": "imagenet", "model.pretrained": str(converted_resnet18)},
    )
    trainer.train_and_evaluate(config, tmp_path / "run", progress=False)
    start = pretrained.load(converted_resnet18, num_classes=5)
    start_params = nnx.to_flat_state(nnx.state(start, nnx.Param))
    start_stats = nnx.to_flat_state(nnx.state(start, nnx.BatchStat))
    ckpts = Checkpoints(tmp_path / "run", read_only=True)

    def epoch_state(epoch):
        restored = evaluate.restore(tmp_path / "run", epoch)
        return nnx.to_flat_state(restored.params), nnx.to_flat_state(restored.batch_stats)

    assert ckpts.epochs() == [1, 2]
    params1, stats1 = epoch_state(1)
    for (path, before), (_, after) in zip(start_params, params1):
        if path[0] == "fc":
            assert not np.array_equal(before[...], after[...]), path
        else:
            np.testing.assert_array_equal(before[...], after[...], err_msg=str(path))
    for (path, before), (_, after) in zip(start_stats, stats1):
        np.testing.assert_array_equal(before[...], after[...], err_msg=str(path))
    params2, _ = epoch_state(2)
    for (path, before), (_, after) in zip(params1, params2):
        assert not np.array_equal(before[...], after[...]), f"{path} did not train in phase 2"


@pytest.mark.slow
def test_quickstart_config_learns_digits(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart", "configs/quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trainer.train_and_evaluate(module.get_config(), tmp_path, progress=False)
    restored = evaluate.restore(tmp_path)
    from cifar_jax import data

    x, y = data.load_splits(restored.config.data).test
    assert evaluate.metrics(evaluate.predict(restored, x), y)["top1_acc"] >= 0.95


@pytest.mark.parametrize("batchnorm", ["train", "frozen"])
def test_head_only_batchnorm_modes_match_pytorch(batchnorm, highest_precision):
    """Phase 1 as the study ran it (PyTorch: requires_grad=False on the backbone under
    model.train(): batch statistics, running statistics updated, only the head stepped) or with the
    backbone's BatchNorm frozen (model.eval() on the backbone): one Adam step on the same batch."""
    import jax.numpy as jnp
    import torch
    import torchvision

    from cifar_jax import steps
    from cifar_jax.data import pipeline

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=5)
    model = pretrained.from_torchvision("resnet18", ref.state_dict())
    config = tiny_config(
        num_epochs=2,
        head_only_epochs=1,
        head_only_batchnorm=batchnorm,
        **{"model.name": "resnet18", "model.stem": "imagenet", "optimizer.name": "adam"},
    )
    graphdef_train = nnx.graphdef(model)
    model.eval()
    graphdef_eval, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    phase = phases.phases(config)[0]
    cfg, _ = phases.step_config(
        config,
        phase,
        train_state.GraphDefs(graphdef_train, graphdef_eval, "fc"),
        preprocess=pipeline.Preprocess(image_size=32),
        num_classes=5,
        steps_per_epoch=1,
        sharding=None,
    )
    state = {
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": cfg.tx.init(steps.partition(params, "fc")[0]),
    }
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 32, 32, 3)).astype(np.float32), rng.integers(0, 5, 8)
    new_state, _ = jax.jit(functools.partial(steps.update_step, cfg))(
        state, steps.zero_metrics(), jnp.asarray(x), jnp.asarray(y)
    )

    ref.train()
    if batchnorm == "frozen":
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
    for p in ref.parameters():
        p.requires_grad = False
    for p in ref.fc.parameters():
        p.requires_grad = True
    opt = torch.optim.Adam(
        ref.fc.parameters(), lr=config.head_only_lr, weight_decay=config.optimizer.weight_decay
    )
    loss = torch.nn.CrossEntropyLoss()(
        ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())), torch.from_numpy(y)
    )
    loss.backward()
    opt.step()

    ours_params, ours_stats = (
        nnx.to_pure_dict(new_state["params"]),
        nnx.to_pure_dict(new_state["batch_stats"]),
    )
    np.testing.assert_allclose(
        ours_params["fc"]["kernel"], ref.fc.weight.detach().numpy().T, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(
        ours_params["layer4"][1]["conv2"]["kernel"], nnx.to_pure_dict(params)["layer4"][1]["conv2"]["kernel"]
    )
    for ours, theirs in ((ours_stats["bn1"], ref.bn1), (ours_stats["layer4"][1]["bn2"], ref.layer4[1].bn2)):
        np.testing.assert_allclose(ours["mean"], theirs.running_mean.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ours["var"], theirs.running_var.numpy(), rtol=1e-4, atol=1e-6)
    moved = not np.array_equal(ours_stats["bn1"]["mean"], nnx.to_pure_dict(batch_stats)["bn1"]["mean"])
    assert moved == (batchnorm == "train")


@pytest.mark.slow
def test_the_weight_average_is_the_numpy_recurrence_over_the_steps(x64):
    """state['ema'] after each step equals decay * previous + (1 - decay) * (params, batch_stats),
    computed here in NumPy from the weights each step produced, starting from the initial model."""
    import jax.numpy as jnp

    from cifar_jax import data, models, optim, steps
    from cifar_jax.data import pipeline

    decay = 0.75
    model = models.create("simple_cnn", 10, dtype="float64")
    nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float64), nnx.state(model)))
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = optim.make_optimizer(tiny_config().optimizer, 1e-3)
    cfg = steps.StepConfig(
        graphdef, tx, None, pipeline.Preprocess(image_size=32), 8, 10, 0.0, seed=0, ema_decay=decay
    )
    digits = data.load("digits")
    images, labels = jnp.asarray(digits.x_train[:32]), jnp.asarray(digits.y_train[:32])
    order = pipeline.epoch_order(0, 0, 32)
    state = {
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": tx.init(params),
        "ema": jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats}),
    }
    expected = [np.asarray(x) for x in jax.tree.leaves(state["ema"])]
    metrics = steps.zero_metrics()
    step = jax.jit(functools.partial(steps.train_step, cfg))
    for s in range(4):
        state, metrics = step(state, metrics, images, labels, order, 0, s)
        current = [
            np.asarray(x)
            for x in jax.tree.leaves({"params": state["params"], "batch_stats": state["batch_stats"]})
        ]
        expected = [decay * e + (1 - decay) * c for e, c in zip(expected, current)]
    got = [np.asarray(x) for x in jax.tree.leaves(state["ema"])]
    for g, e, c in zip(got, expected, current, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-14)
    assert any(not np.allclose(g, c) for g, c in zip(got, current))  # an average, not the last weights


@pytest.mark.slow
def test_the_weight_average_is_validated_checkpointed_and_evaluated(tmp_path):
    from cifar_jax import data

    rows = trainer.train_and_evaluate(tiny_config(num_epochs=2, ema_decay=0.5), tmp_path, progress=False)
    assert all({"ema_val_loss", "ema_val_acc"} <= set(r) for r in rows)
    ours = evaluate.restore(tmp_path, 2, ema=True)
    trained = evaluate.restore(tmp_path, 2)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(trained.params))
    )
    splits = data.load_splits(ours.config.data)
    for restored, key in ((ours, "ema_val_loss"), (trained, "val_loss")):
        report = evaluate.metrics(
            evaluate.predict(restored, splits.val[0]), splits.val[1], restored.config.label_smoothing
        )
        assert report["loss"] == pytest.approx(rows[1][key], rel=1e-4)
    trainer.train_and_evaluate(tiny_config(num_epochs=1), tmp_path / "plain", progress=False)
    with pytest.raises(evaluate.EvalError, match="trained without a weight average"):
        evaluate.restore(tmp_path / "plain", 1, ema=True)


@pytest.mark.slow
def test_mixup_and_cutmix_run_inside_the_jitted_step(tmp_path):
    mixed = trainer.train_and_evaluate(
        tiny_config(num_epochs=1, **{"data.augment.mixup_alpha": 0.2, "data.augment.cutmix_alpha": 1.0}),
        tmp_path / "mixed",
        progress=False,
    )
    plain = trainer.train_and_evaluate(tiny_config(num_epochs=1), tmp_path / "plain", progress=False)
    assert np.isfinite(mixed[0]["train_loss"]) and mixed[0]["train_loss"] != plain[0]["train_loss"]


@pytest.mark.slow
def test_accumulated_micro_batches_run_inside_the_jitted_step(tmp_path):
    """The maths is tested against PyTorch (test_trajectory); here the trainer's chunks with it."""
    accumulated = trainer.train_and_evaluate(
        tiny_config(num_epochs=1, **{"optimizer.accumulate_steps": 4}), tmp_path / "acc", progress=False
    )
    plain = trainer.train_and_evaluate(tiny_config(num_epochs=1), tmp_path / "plain", progress=False)
    assert (
        np.isfinite(accumulated[0]["train_loss"]) and accumulated[0]["train_loss"] != plain[0]["train_loss"]
    )
    assert accumulated[0]["lr"] == plain[0]["lr"]  # one schedule step per update, as without accumulation


@pytest.mark.parametrize("run_ahead", [0, 4])
def test_early_stopping_ends_the_run_checkpoints_that_epoch_and_says_why(tmp_path, run_ahead):
    # min_delta 1.0: no accuracy can rise by that much, so epochs 2 and 3 count as no gain and the
    # run ends at epoch 3 of 6, whatever the trajectory.
    config = tiny_config(
        num_epochs=6,
        run_ahead_chunks=run_ahead,
        **{"early_stop.patience": 2, "early_stop.min_delta": 1.0, "checkpoint.every_epochs": 5},
    )
    rows = trainer.train_and_evaluate(config, tmp_path, progress=False)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["ended"] == (
        f"early stop: val_acc has not risen above {rows[0]['val_acc']:.4f} (epoch 1) by more than 1 "
        f"for 2 epochs (early_stop.patience=2)"
    )
    assert all("ended" not in r for r in rows[:-1])
    assert (
        3 in Checkpoints(tmp_path, read_only=True).epochs()
    )  # the epoch it ended at, though not due on schedule
    assert (
        trainer.train_and_evaluate(config, tmp_path, progress=False) == rows
    )  # rerun: nothing more to train


def test_a_resumed_run_goes_on_counting_epochs_without_gain(tmp_path):
    early = {"early_stop.patience": 3, "early_stop.min_delta": 1.0}
    trainer.train_and_evaluate(
        tiny_config(num_epochs=2, **early), tmp_path, progress=False
    )  # epoch 2: one without gain
    rows = trainer.train_and_evaluate(tiny_config(num_epochs=6, **early), tmp_path, progress=False)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]  # counting afresh would have ended at epoch 6
    assert "for 3 epochs" in rows[-1]["ended"]
