"""A recipe past the study's part 1 on the same SimpleCNN and the same 5 epochs: SGD with Nesterov
momentum (lr 0.1, batch 128, weight decay 5e-4), a one-epoch linear warmup and a per-step cosine
decay to zero, label smoothing 0.1, and horizontal flips alone (in 5 epochs the network underfits
rather than overfits: random crops and colour jitter cost more than they give). Test accuracy and
wall time beside the starter's settings: RESULTS.md.

    python train.py --config configs/simple_cnn_tuned.py --config.data.source=npz --config.data.path=../shared/data/cifar100/cifar100.npz
"""

from configs import simple_cnn


def get_config():
    c = simple_cnn.get_config()
    c.data.normalization = "cifar"
    c.data.augment.crop_padding = 0
    c.data.augment.color_jitter = (0.0, 0.0, 0.0)
    c.label_smoothing = 0.1
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = 5e-4
    c.schedule.name = "cosine"
    c.schedule.per = "step"
    c.schedule.warmup_epochs = 1
    return c
