"""Whether and why an epoch ends with a checkpoint: one pure rule (`epoch_end.checkpoint_reason`),
recorded in each checkpoint's meta."""

import pytest

from cifar_jax import trainer
from cifar_jax.checkpoint import Checkpoints
from cifar_jax.epoch_end import checkpoint_reason
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


def test_each_checkpoint_records_why_it_was_saved(tmp_path):
    config = tiny_config(num_epochs=3, **{"checkpoint.every_epochs": 2, "checkpoint.keep": 5})
    trainer.train_and_evaluate(config, tmp_path, progress=False)
    ckpts = Checkpoints(tmp_path, read_only=True)
    assert {e: ckpts.meta(e)["saved_because"] for e in ckpts.epochs()} == {
        2: "every 2 epoch(s)",
        3: "the last epoch",
    }
