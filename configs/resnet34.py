"""Part 2 of the study: ResNet-34 from scratch on CIFAR-100, 100 epochs, cosine schedule.

Keeps torchvision's ImageNet stem (7x7/2 conv + max-pool), as the study did; at 32x32 that leaves
8x8 feature maps after the stem and costs accuracy: see resnet34_cifar.py for the usual fix.

    python train.py --config configs/resnet34.py
"""

from cifar_jax.config import base


def get_config():
    c = base()
    c.model.name = "resnet34"
    c.model.stem = "imagenet"
    c.num_epochs = 100
    c.batch_size = 128
    c.data.source = "tfds"
    c.data.normalization = "cifar"
    c.data.augment.crop_padding = 4
    c.data.augment.flip = True
    c.data.augment.color_jitter = (0.2, 0.2, 0.2)
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 5e-4
    c.schedule.name = "cosine"
    c.schedule.per = "epoch"
    return c
