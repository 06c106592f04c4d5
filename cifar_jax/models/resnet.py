"""ResNet-18/34/50 with torchvision's topology and parameter names (NHWC), and their PyTorch twins.

Names mirror torchvision (`conv1`, `bn1`, `layer1[0].conv2`, `downsample`, `fc`) so that
converting ImageNet weights is a rename plus layout transposes (see `cifar_jax.pretrained`).
`downsample` is an `nnx.Sequential(conv, bn)`: torchvision's `downsample.0` / `downsample.1`
are `downsample.layers[0]` / `downsample.layers[1]` here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cifar_jax.models import layers
from cifar_jax.models.architecture import Architecture

STEMS = ("imagenet", "cifar")


def conv(make: layers.LayerMaker, in_ch, out_ch, kernel, stride=1):
    """torchvision's ResNet convolution: no bias, padding kernel // 2, kaiming_normal(fan_out)."""
    return make.conv(
        in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, kernel_init=layers.kaiming_fan_out_init
    )


def downsample(make: layers.LayerMaker, in_ch, out_ch, stride):
    """The shortcut's 1x1 convolution and BatchNorm, where a block changes the shape."""
    return nnx.Sequential(conv(make, in_ch, out_ch, 1, stride), make.norm(out_ch))


def _downsample_pair(shortcut) -> list:
    return [] if shortcut is None else [(shortcut.layers[0], shortcut.layers[1])]


class BasicBlock(nnx.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, make: layers.LayerMaker):
        self.conv1 = conv(make, inplanes, planes, 3, stride)
        self.bn1 = make.norm(planes)
        self.conv2 = conv(make, planes, planes, 3)
        self.bn2 = make.norm(planes)
        needs_ds = stride != 1 or inplanes != planes * self.expansion
        self.downsample = downsample(make, inplanes, planes, stride) if needs_ds else nnx.data(None)
        # Materialised: the next block's 3x3 convolution takes this output's gradient (on CPU a
        # fusion of the merge into that gradient's copies was slow; `cpu_kernels.materialize`).
        self.add_relu = make.add_relu(materialized=True)

    def conv_bn_pairs(self):
        """Each convolution with the BatchNorm after it (`layers.fold_batchnorm`)."""
        return [(self.conv1, self.bn1), (self.conv2, self.bn2), *_downsample_pair(self.downsample)]

    def __call__(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.add_relu(out, identity)


class Bottleneck(nnx.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv, as in torchvision."""

    expansion = 4

    def __init__(self, inplanes, planes, stride, make: layers.LayerMaker):
        out = planes * self.expansion
        self.conv1 = conv(make, inplanes, planes, 1)
        self.bn1 = make.norm(planes)
        self.conv2 = conv(make, planes, planes, 3, stride)
        self.bn2 = make.norm(planes)
        self.conv3 = conv(make, planes, out, 1)
        self.bn3 = make.norm(out)
        needs_ds = stride != 1 or inplanes != out
        self.downsample = downsample(make, inplanes, out, stride) if needs_ds else nnx.data(None)
        # Not materialised: the next block starts with a 1x1 convolution (a matmul on CPU).
        self.add_relu = make.add_relu(materialized=False)

    def conv_bn_pairs(self):
        """Each convolution with the BatchNorm after it (`layers.fold_batchnorm`)."""
        pairs = [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]
        return pairs + _downsample_pair(self.downsample)

    def __call__(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.add_relu(out, identity)


class ResNet(nnx.Module):
    """torchvision's ResNet. `stem='imagenet'`: 7x7/2 conv + 3x3/2 max-pool (for pretrained
    weights and large images); `stem='cifar'`: 3x3/1 conv and no max-pool (for 32x32 from scratch)."""

    head = "fc"  # the classifier, replaced when fine-tuning to other classes

    def __init__(
        self,
        block,
        layers_per_stage,
        num_classes=1000,
        *,
        stem="imagenet",
        dtype=jnp.float32,
        ops=layers.PER_PLATFORM,
        rngs: nnx.Rngs,
    ):
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; valid stems: {', '.join(STEMS)}")
        make = layers.LayerMaker(dtype, rngs, ops)
        self.conv1 = conv(make, 3, 64, *((7, 2) if stem == "imagenet" else (3, 1)))
        self.bn1 = make.norm(64)
        self.maxpool = make.max_pool(3, 2, padding=1) if stem == "imagenet" else layers.Identity()
        inplanes = 64
        stages = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers_per_stage)):
            stage = []
            for j in range(blocks):
                stage.append(block(inplanes, planes, 2 if i > 0 and j == 0 else 1, make))
                inplanes = planes * block.expansion
            stages.append(nnx.List(stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = make.linear(inplanes, num_classes)

    def conv_bn_pairs(self):
        """Each convolution with the BatchNorm after it (`layers.fold_batchnorm`), stem first."""
        blocks = [blk for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for blk in stage]
        return [(self.conv1, self.bn1), *(pair for blk in blocks for pair in blk.conv_bn_pairs())]

    def __call__(self, x):
        x = self.maxpool(jax.nn.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for blk in stage:
                x = blk(x)
        x = x.mean(axis=(1, 2))
        return self.fc(x).astype(layers.stats_dtype(x.dtype))


def resnet18(num_classes=1000, **kw):
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, **kw)


def resnet34(num_classes=1000, **kw):
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, **kw)


def resnet50(num_classes=1000, **kw):
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, **kw)


def torch_resnet(name: str):
    """(num_classes, stem) -> torchvision's `name`, its CIFAR stem built the way ours is."""

    def build(num_classes=1000, *, stem="imagenet"):
        import torch.nn as nn
        import torchvision

        model = getattr(torchvision.models, name)(num_classes=num_classes)
        if stem == "cifar":
            model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        return model

    return build


def torch_key(path: tuple) -> str:
    """('layer1', 0, 'downsample', 'layers', 1, 'mean') -> 'layer1.0.downsample.1.running_mean'."""
    parts = [str(p) for p in path[:-1] if p != "layers"]  # nnx.Sequential keeps its modules in .layers
    return ".".join([*parts, layers.TORCH_LEAF[path[-1]]])


ARCHITECTURES = tuple(
    Architecture(
        build.__name__,
        build,
        torch_resnet(build.__name__),
        torch_key,
        options=("stem",),
        min_image_size=32,  # five halvings at the ImageNet stem leave 1x1
        torchvision_weights=True,
    )
    for build in (resnet18, resnet34, resnet50)
)
