"""ResNet-34 with the CIFAR stem (3x3/1 conv, no max-pool): what to try after resnet34.py.

At 32x32 the ImageNet stem throws away 15/16 of the pixels before the first block; the CIFAR stem
keeps 32x32 maps into layer1 (16x the compute) and usually gains many points of accuracy. Per-step
cosine with a short warmup, since the larger activations make the first steps touchier.

    python train.py --config configs/resnet34_cifar.py
"""

from configs import resnet34


def get_config():
    c = resnet34.get_config()
    c.model.stem = "cifar"
    c.schedule.per = "step"
    c.schedule.warmup_epochs = 2
    return c
