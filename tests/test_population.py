"""Populations: members trained side by side in one program are the runs they stand for."""

import json
import os
import re
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cifar_jax import config as config_lib
from cifar_jax import data, models, phases, population, sharding, steps, trainer
from cifar_jax.checkpoint import Checkpoints
from cifar_jax.data import pipeline
from cifar_jax.train_state import GraphDefs
from cifar_jax.trainer import train_and_evaluate
from tests.support.helpers import checkpoint_arrays, tiny_config, without_timing

# Every number that may vary, each with a value that turns its part off where that is allowed
# (weight decay 0, label smoothing 0, MixUp and CutMix 0), whose random draws come from the
# member's seed too.
SWEEP = (
    "optimizer.lr=0.02,0.05;optimizer.weight_decay=0,0.001;label_smoothing=0,0.1;ema_decay=0.9,0.99;"
    "data.augment.mixup_alpha=0,0.4;data.augment.cutmix_alpha=0,1"
)
STEPS_PER_CALL = 2


def _float64_config():
    return tiny_config(
        **{
            "optimizer.name": "sgd",
            "optimizer.momentum": 0.9,
            "optimizer.nesterov": True,
            "ema_decay": 0.9,
            "population.seeds": "0,1",
            "population.sweep": SWEEP,
        }
    )


def _float64_state(config, tx):
    """(GraphDefs, train state) of the member's SimpleCNN (its seed's initialisation), in float64."""
    model = models.create("simple_cnn", 5, dtype="float64", seed=config.seed)
    nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float64), nnx.state(model)))
    graphdef_train = nnx.graphdef(model)
    model.eval()
    graphdef_eval, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params)}
    state["ema"] = jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})
    return GraphDefs(graphdef_train, graphdef_eval, type(model).head), state


def _train(chunk, state, metrics, images, labels, orders, numbers, spe):
    """Two epochs of `spe` steps, `STEPS_PER_CALL` a call; each epoch's orders from `orders(epoch)`."""
    votes = jnp.zeros((1,), jnp.int32)
    for epoch in range(2):
        for first in range(0, spe, STEPS_PER_CALL):
            args = (images, labels, orders(epoch), jnp.int32(epoch), jnp.int32(first), votes, numbers)
            state, metrics, _ = chunk(state, metrics, *args)
    return state, metrics


@pytest.mark.slow
def test_a_member_trains_as_its_config_alone_in_float64(x64):
    """Member k of a population (its numbers traced; all members in each operation as on a GPU,
    and one after another as on the CPU) and member k's own config trained
    alone (its numbers constants of the program) agree to 1e-10 in float64 after two epochs: the
    same seed's initialisation, data order, augmentation and MixUp, the same lr, weight decay
    (0 in some members), Nesterov momentum, label smoothing and weight average."""
    config = _float64_config()
    grid = population.members(config)
    assert len(grid) == 128
    # Each value of each key and both seeds among them, and every pairing of the two alphas:
    # neither mix (the member alone has none in its program), MixUp, CutMix, both.
    picks = ["0000000", "1111011", "0101100", "1010111"]  # a member's index in binary, seed last
    members = [grid[int(bits, 2)] for bits in picks]
    alphas = {(m.values["data.augment.mixup_alpha"], m.values["data.augment.cutmix_alpha"]) for m in members}
    assert len(alphas) == 4 and len({m.seed for m in members}) == 2
    splits = data.load_splits(config.data)
    images, labels = (jnp.asarray(a) for a in splits.train)
    spe = pipeline.steps_per_epoch(len(images), config.batch_size)
    options = dict(
        preprocess=pipeline.Preprocess.from_config(config.data),
        num_classes=5,
        steps_per_epoch=spe,
        sharding=None,
    )

    def alone(member):  # (StepConfig, initial state) of the member's config as a run alone
        phase = phases.phase_of(member.config, 0)
        graphdefs, state = _float64_state(member.config, phases.make_tx(member.config, phase, spe)[1])
        return phases.step_config(member.config, phase, graphdefs, **options)[0], state

    wanted = []  # each member trained alone: (final state, metric sums)
    for m in members:
        cfg, state = alone(m)
        initial_params = jax.tree.map(jnp.copy, state["params"])  # the state is donated
        want, want_sums = _train(
            steps.make_train_chunk(cfg, STEPS_PER_CALL),
            state,
            steps.zero_metrics(),
            images,
            labels,
            lambda epoch, seed=m.seed: pipeline.epoch_order(seed, epoch, len(images)),
            None,
            spe,
        )
        moved = [
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(initial_params), jax.tree.leaves(want["params"]))
            if a.ndim > 1
        ]
        assert min(moved) > 1e-4, moved  # every kernel moved far beyond the tolerance
        wanted.append((want, want_sums))

    base, _ = alone(members[0])
    member_cfg = phases.member_step_config(members[0].config, phases.phase_of(config, 0), base, spe, members)
    mesh = sharding.make_mesh(jax.devices()[:1])
    numbers = population.stacked([population.numbers(m.config, m.config.optimizer.lr) for m in members], mesh)
    seeds = jnp.asarray([m.seed for m in members], jnp.int32)
    for vectorize in (True, False):
        together, sums = _train(
            steps.make_train_chunk(base, STEPS_PER_CALL, member_cfg, vectorize),
            population.stack([alone(m)[1] for m in members], mesh),
            population.stack([steps.zero_metrics()] * len(members), mesh),
            images,
            labels,
            lambda epoch: jax.vmap(lambda s: pipeline.epoch_order(s, epoch, len(images)))(seeds),
            numbers,
            spe,
        )
        for k, (m, (want, want_sums)) in enumerate(zip(members, wanted)):
            got = jax.tree.map(lambda a, k=k: a[k], together)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=f"{m.label()} {vectorize=}")
            np.testing.assert_allclose(sums["loss_sum"][k], want_sums["loss_sum"], rtol=1e-10)
            assert int(sums["correct"][k]) == int(want_sums["correct"])
        # Their numbers matter: members 0 and 2 share seed 0, and end apart.
        w = jax.tree.leaves(together["params"])[-1]
        assert float(jnp.max(jnp.abs(w[0] - w[2]))) > 1e-4


def test_population_keys_that_are_wrong_are_one_line_before_anything_runs():
    def problem(**overrides):
        with pytest.raises(ValueError) as e:
            config_lib.validate(tiny_config(**overrides))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "population.seeds" in problem(**{"population.seeds": "0,x"})
    assert "distinct" in problem(**{"population.seeds": "0,0"})
    message = problem(**{"population.sweep": "batch_size=16,32"})
    assert "batch_size" in message and "optimizer.lr" in message  # what may vary instead
    assert "KEY=V1,V2" in problem(**{"population.sweep": "optimizer.lr"})
    assert "ema_decay must be 0 in every member or in none" in problem(
        **{"population.seeds": "0,1", "population.sweep": "ema_decay=0,0.9"}
    )
    assert "member 1" in problem(**{"population.sweep": "optimizer.lr=0.1,-0.1"})


@pytest.mark.slow
def test_a_population_is_one_ordinary_run_per_member(tmp_path):
    """Each member's workdir is a run alone: its config.json (its seed and values, no population),
    metrics.jsonl at its learning rate, checkpoints that eval.py restores; population.md tabulates
    them, with the mean and sample sd over seeds."""
    config = tiny_config(**{"population.seeds": "3,4", "population.sweep": "optimizer.lr=0.001,0.003"})
    rows = train_and_evaluate(config, tmp_path, progress=False)
    assert [len(r) for r in rows] == [2, 2, 2, 2]
    table = json.loads((tmp_path / "population.json").read_text())
    for k, (seed, lr) in enumerate([(3, 0.001), (4, 0.001), (3, 0.003), (4, 0.003)]):
        member = config_lib.from_json(tmp_path / f"member_{k}" / "config.json")
        assert (member.seed, member.optimizer.lr) == (seed, lr)
        assert (member.population.seeds, member.population.sweep) == ("", "")
        logged = [
            json.loads(line) for line in (tmp_path / f"member_{k}" / "metrics.jsonl").read_text().splitlines()
        ]
        assert logged == rows[k] and logged[0]["lr"] == lr > logged[1]["lr"]  # its own schedule
        assert table["members"][k]["last_val_acc"] == logged[-1]["val_acc"]
    for group in table["by_values"]:
        accs = [e["last_val_acc"] for e in table["members"] if e["values"] == group["values"]]
        assert group["last_val_acc_mean"] == pytest.approx(np.mean(accs))
        assert group["last_val_acc_sd"] == pytest.approx(np.std(accs, ddof=1))
    assert "| 3 | 4 | optimizer.lr=0.003 |" in (tmp_path / "population.md").read_text()
    assert (tmp_path / "population.png").read_bytes()[:4] == b"\x89PNG"

    import eval as eval_cli

    assert eval_cli.main(["--workdir", str(tmp_path), "--member", "2", "--split", "val"]) in (0, None)
    report = json.loads((tmp_path / "member_2" / "eval" / "report.json").read_text())
    best = max(rows[2], key=lambda r: r["val_acc"])
    assert report["top1_acc"] == pytest.approx(best["val_acc"])


@pytest.mark.parametrize(
    "member, message",
    [
        (None, "holds a population of 4 members (population.md); pass --member K (0..3)"),
        (7, "has no member_7/ (its members are 0..3)"),
    ],
)
def test_eval_of_a_population_names_the_member_to_pass(tmp_path, member, message):
    for k in range(4):
        (tmp_path / f"member_{k}").mkdir()
    (tmp_path / "population.json").write_text("{}")
    with pytest.raises(ValueError, match=re.escape(message)):
        population.member_workdir(tmp_path, member)


def _rows(workdir):
    return without_timing(json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines())


@pytest.mark.slow
@pytest.mark.parametrize(
    "steps_per_call, where, saved",
    [(1, "epoch 2, step 3 of 4", [1]), (4, "the end of epoch 2", [1, 2])],
)
def test_a_stopped_population_saves_every_member_and_resumes_bit_identical(
    tmp_path, monkeypatch, steps_per_call, where, saved
):
    """SIGTERM mid-epoch (run ahead: the stop is read two calls later) or at an epoch's end: every
    member saves where the program stopped, and the rerun equals a population never stopped."""
    config = tiny_config(
        num_epochs=3,
        run_ahead_chunks=2 if steps_per_call == 1 else 0,
        steps_per_call=steps_per_call,
        **{"population.seeds": "0,1", "population.sweep": "label_smoothing=0,0.1"},
    )
    real = pipeline.epoch_order

    def epoch_order(seed, epoch, n):  # the signal as epoch 2 starts
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(seed, epoch, n)

    monkeypatch.setattr(pipeline, "epoch_order", epoch_order)
    with pytest.raises(trainer.Interrupted, match=f"stopped by SIGTERM at {where}"):
        train_and_evaluate(config, tmp_path / "run", progress=False)
    monkeypatch.undo()
    for k in range(4):
        member = tmp_path / "run" / f"member_{k}"
        assert Checkpoints(member, read_only=True).epochs() == saved
        assert (member / "interrupted").is_dir() == (steps_per_call == 1)
    train_and_evaluate(config, tmp_path / "run", progress=False)
    train_and_evaluate(config, tmp_path / "straight", progress=False)
    for k in range(4):
        a, b = tmp_path / "run" / f"member_{k}", tmp_path / "straight" / f"member_{k}"
        assert _rows(a) == _rows(b) and len(_rows(a)) == 3
        for x, y in zip(checkpoint_arrays(a), checkpoint_arrays(b), strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_members_saved_at_different_epochs_resume_from_the_epoch_all_have(tmp_path):
    """A kill between the members' checkpoints of one epoch: the members ahead go back, and the
    population trains on as one, each member as it would have."""
    config = tiny_config(num_epochs=3, **{"population.seeds": "0,1"})
    train_and_evaluate(config, tmp_path / "straight", progress=False)
    shutil.copytree(tmp_path / "straight", tmp_path / "run")  # the same run, not trained twice
    # As if killed after member 0 saved epoch 3 and before member 1 did.
    Checkpoints(tmp_path / "run" / "member_1").manager.delete(3)
    train_and_evaluate(config, tmp_path / "run", progress=False)
    for k in range(2):
        a, b = tmp_path / "run" / f"member_{k}", tmp_path / "straight" / f"member_{k}"
        assert _rows(a) == _rows(b)
        for x, y in zip(checkpoint_arrays(a), checkpoint_arrays(b), strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_a_member_that_diverges_ends_there_and_one_that_stops_early_ends_there(tmp_path, caplog):
    """Member 1's lr warms up towards 1e30 and diverges in epoch 2: its row says so, it keeps its
    checkpoint of epoch 1, and member 0 goes on until early stopping ends it at epoch 3 of 6 (no
    accuracy can rise by min_delta 1.0); then the program has nothing left to train."""
    config = tiny_config(
        num_epochs=6,
        **{
            "schedule.name": "constant",
            "schedule.warmup_epochs": 2,
            "schedule.warmup_start_factor": 1e-33,
            "early_stop.patience": 2,
            "early_stop.min_delta": 1.0,
            "population.sweep": "optimizer.lr=1e30,0.001",
        },
    )
    caplog.set_level("WARNING", logger="cifar_jax")
    diverging, stopping = train_and_evaluate(config, tmp_path, progress=False)
    assert [r["epoch"] for r in diverging] == [1, 2]
    assert diverging[-1]["ended"].startswith("diverged: loss became NaN/Inf in epoch 2, steps")
    assert "member 0 (seed 0, optimizer.lr=1e+30): loss became NaN/Inf in epoch 2" in caplog.text
    assert Checkpoints(tmp_path / "member_0", read_only=True).epochs() == [1]
    assert [r["epoch"] for r in stopping] == [1, 2, 3] and stopping[-1]["ended"].startswith("early stop")
    assert 3 in Checkpoints(tmp_path / "member_1", read_only=True).epochs()
    ended = [m["ended"] for m in json.loads((tmp_path / "population.json").read_text())["members"]]
    assert ended == [diverging[-1]["ended"], stopping[-1]["ended"]]
    # The rerun trains nothing, and both members stay as they ended.
    rerun = train_and_evaluate(config, tmp_path, progress=False)
    assert json.dumps(rerun) == json.dumps([diverging, stopping])  # as text: its NaN losses too
