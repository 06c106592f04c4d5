"""Part 3 of the study: ResNet-50 from torchvision's ImageNet weights, fine-tuned on CIFAR-100 in two phases.

Phase 1 (epochs 1-10): only the new 100-class head trains, AdamW lr 1e-3; the backbone gets no
gradient at all (no backward pass through it), and its BatchNorm uses the pretrained running
statistics (eval mode) so the backbone stays exactly the ImageNet network: the head learns on
stable features, and phase 1 leaves every backbone tensor bit-identical.
Phase 2 (epochs 11-110): all layers, AdamW lr 1e-4, BatchNorm in train mode (batch statistics,
running statistics updated). Both phases: weight decay 5e-4, label smoothing 0.1, cosine over the
phase, batch 128, crop+flip+jitter, ImageNet normalization; the best checkpoint by val accuracy.

First convert the weights once (where torchvision can download, or from a local .pth):

    python -m cifar_jax.convert --arch resnet50 --weights IMAGENET1K_V2 --out checkpoints/resnet50_imagenet
    python train.py --config configs/resnet50_ft.py
"""

from cifar_jax.config import base


def get_config():
    c = base()
    c.model.name = "resnet50"
    c.model.stem = "imagenet"
    c.model.pretrained = "checkpoints/resnet50_imagenet"
    c.head_only_epochs = 10
    c.head_only_lr = 1e-3
    c.num_epochs = 110  # 10 head-only + 100 all layers
    c.batch_size = 128
    c.label_smoothing = 0.1
    c.data.source = "tfds"
    c.data.normalization = "imagenet"
    c.data.augment.crop_padding = 4
    c.data.augment.flip = True
    c.data.augment.color_jitter = (0.2, 0.2, 0.2)
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 5e-4
    c.schedule.name = "cosine"
    c.schedule.per = "epoch"
    return c
