"""Part 1 of the study: SimpleCNN on CIFAR-100, 5 epochs, PyTorch `Adam(lr=1e-3, weight_decay=5e-4)`
(coupled L2) with `StepLR(step_size=2, gamma=0.1)` stepped per epoch, batch 128,
crop+flip+ColorJitter(0.2, 0.2, 0.2), CIFAR normalization.

    python train.py --config configs/simple_cnn.py
    python train.py --config configs/simple_cnn.py --config.data.source=npz --config.data.path=../shared/data/cifar100/cifar100.npz
"""

from cifar_jax.config import base


def get_config():
    c = base()
    c.model.name = "simple_cnn"
    c.num_epochs = 5
    c.batch_size = 128
    c.data.source = "tfds"
    c.data.normalization = "cifar"
    c.data.augment.crop_padding = 4
    c.data.augment.flip = True
    c.data.augment.color_jitter = (0.2, 0.2, 0.2)
    c.optimizer.name = "adam"
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 5e-4
    c.schedule.name = "step"
    c.schedule.per = "epoch"
    c.schedule.step_size = 2
    c.schedule.gamma = 0.1
    return c
