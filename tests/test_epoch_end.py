"""The pure rules of an epoch's end, each tested alone in milliseconds: whether and why it ends with
a checkpoint (`epoch_end.checkpoint_reason`, recorded in each checkpoint's meta), early stopping,
the metrics row, the phase of an epoch, what a change on resume does."""

import pytest

from cifar_jax import phases, resume, trainer
from cifar_jax.checkpoint import Checkpoints
from cifar_jax.early_stop import EarlyStop
from cifar_jax.epoch_end import checkpoint_reason, epoch_row
from tests.support.helpers import tiny_config


@pytest.mark.parametrize(
    "epoch,every,resumed_mid_epoch,ended,stop,reason",
    [
        (1, 2, False, None, False, "every 2 epoch(s)"),
        (0, 2, False, None, False, None),
        (4, 3, False, None, False, "the last epoch"),  # epoch 5 of 5
        (0, 3, True, None, False, "the epoch resumed mid-way"),
        (2, 2, False, "no val_acc gain for 2 epochs", False, "early stopping: no val_acc gain for 2 epochs"),
        (2, 2, False, None, True, "a stop signal"),
        (3, 2, False, "x", True, "every 2 epoch(s)"),  # on schedule first: the reason it would have anyway
    ],
)
def test_the_checkpoint_rule(epoch, every, resumed_mid_epoch, ended, stop, reason):
    kwargs = dict(every=every, num_epochs=5, resumed_mid_epoch=resumed_mid_epoch, ended=ended, stop=stop)
    assert checkpoint_reason(epoch, **kwargs) == reason


@pytest.mark.slow
def test_each_checkpoint_records_why_it_was_saved(tmp_path):
    config = tiny_config(num_epochs=3, **{"checkpoint.every_epochs": 2, "checkpoint.keep": 5})
    trainer.train_and_evaluate(config, tmp_path, progress=False)
    ckpts = Checkpoints(tmp_path, read_only=True)
    assert {e: ckpts.meta(e)["saved_because"] for e in ckpts.epochs()} == {
        2: "every 2 epoch(s)",
        3: "the last epoch",
    }


def test_early_stopping_counts_epochs_without_a_gain_above_min_delta_and_resumes_its_count():
    early = EarlyStop(patience=2, min_delta=0.01)
    assert [early.update(e, acc) is not None for e, acc in enumerate([0.5, 0.505, 0.52, 0.52])] == [False] * 4
    assert (early.best, early.best_epoch, early.bad) == (0.52, 3, 1)  # 0.505 was no gain over 0.5 + 0.01
    assert early.may_end_at_next_validation()
    assert early.update(4, None) is None and early.bad == 1  # an epoch without validation counts nothing
    why = early.update(5, 0.529)
    assert why == (
        "early stop: val_acc has not risen above 0.5200 (epoch 3) by more than 0.01 for 2 epochs "
        "(early_stop.patience=2)"
    )
    again = EarlyStop(patience=3, min_delta=0.01)  # a resumed run whose patience was raised
    again.restore(early.record())
    assert again.ended is None  # 2 epochs without a gain of 3 allowed: it goes on, counting from 2
    assert again.update(6, 0.5) == again.ended and "for 3 epochs (early_stop.patience=3)" in again.ended
    off = EarlyStop(patience=0, min_delta=0.0)
    assert off.update(0, 0.1) is None and off.record() is None and not off.may_end_at_next_validation()


def test_the_metrics_row_is_the_sums_means_validation_first_then_the_weight_average():
    phase = phases.Phase("all", 0, 3, 0.1)
    train = {"loss_sum": 6.0, "correct": 3, "count": 4, "nonfinite_steps": 0}
    val = {
        "ema_val": {"loss_sum": 1.0, "correct": 2, "count": 2},
        "val": {"loss_sum": 3.0, "correct": 1, "count": 2},
    }
    row = epoch_row(1, phase, train, val, 0.05, 12.3456, 99.96, 0.5, None, 0.25)
    assert list(row)[:8] == [
        "epoch",
        "phase",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "ema_val_loss",
        "ema_val_acc",
    ]
    assert row == {
        "epoch": 2,
        "phase": "all",
        "train_loss": 1.5,
        "train_acc": 0.75,
        "val_loss": 1.5,
        "val_acc": 0.5,
        "ema_val_loss": 0.5,
        "ema_val_acc": 1.0,
        "lr": 0.05,
        "epoch_time_s": 12.346,
        "train_img_per_s": 100.0,
        "val_s": 0.5,
        "host_s": None,
        "checkpoint_s": 0.25,
    }
    unvalidated = epoch_row(0, phase, train, None, 0.1, 1.0, 1.0, None, None, None)
    assert unvalidated["val_loss"] is None and unvalidated["val_acc"] is None


def test_the_phase_of_an_epoch_and_after_a_checkpoint():
    config = tiny_config(num_epochs=5, head_only_epochs=2, head_only_lr=0.01)
    assert [(p.name, p.first_epoch, p.end_epoch, p.lr) for p in phases.phases(config)] == [
        ("head_only", 0, 2, 0.01),
        ("all", 2, 5, 0.001),
    ]
    assert [phases.phase_of(config, e).name for e in range(5)] == ["head_only"] * 2 + ["all"] * 3
    # A checkpoint after 0-2 epochs holds the head-only optimizer state; after more, the full one's.
    assert [phases.phase_after(config, done).name for done in (0, 2, 3, 9)] == [
        "head_only",
        "head_only",
        "all",
        "all",
    ]
    assert [p.name for p in phases.phases(tiny_config())] == ["all"]


def test_what_a_change_on_resume_does():
    config = tiny_config(num_epochs=6, **{"schedule.name": "cosine"})
    phase = phases.phases(config)[0]
    start = resume.Start(epoch=2, step=0, phase=phase, state={}, sums=None, row={"epoch": 2, "lr": 0.002})
    lr_at = {(phase, 2): 0.0015}.get

    def effect(key, old, new, at=start):
        return resume.change_effect(config, at, key, old, new, lambda p, e: lr_at((p, e)))

    assert effect("num_epochs", 4, 6) == (
        "num_epochs 4 -> 6: the cosine schedule now spans 6 epochs; epoch 3 trains at lr 0.0015 "
        "(epoch 2 trained at lr 0.002)"
    )
    done = resume.Start(epoch=6, step=0, phase=phase, state={}, sums=None, row=None)
    assert effect("num_epochs", 8, 6, done) == "num_epochs 8 -> 6: nothing left to train"
    assert effect("early_stop.patience", 0, 3) == (
        "early_stop.patience 0 -> 3: the run may end at another epoch; the epochs trained stay as they are"
    )
    assert effect("checkpoint.keep", 2, 5) == "checkpoint.keep 2 -> 5: what is computed stays the same"
