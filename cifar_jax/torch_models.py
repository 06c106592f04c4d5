"""The PyTorch counterparts of our models, for benchmarks and parity tests (needs the `torch` extra).

`simple_cnn` is the study's nn.Sequential SimpleCNN; the ResNets are torchvision's, with the
CIFAR stem (3x3/1 conv, no max-pool) built the way our `stem='cifar'` is.
"""

from __future__ import annotations


def simple_cnn(num_classes: int = 100):
    """The study's SimpleCNN (nn.Sequential, so state_dict keys are indices)."""
    import torch.nn as nn

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        *block(3, 32),
        *block(32, 64),
        *block(64, 128),
        *block(128, 256),
        nn.Flatten(),
        nn.Linear(1024, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def create(name: str, num_classes: int = 100, *, stem: str = "imagenet"):
    """The PyTorch model matching `cifar_jax.models.create(name, num_classes, stem=stem)`."""
    if name == "simple_cnn":
        return simple_cnn(num_classes)
    import torch.nn as nn
    import torchvision

    model = getattr(torchvision.models, name)(num_classes=num_classes)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model
