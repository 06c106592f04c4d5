"""A ResNet trained from scratch past the study's part 2 (ResNet-34, val 52.8%): ResNet-18 with the
CIFAR stem (3x3/1 conv, no max-pool), aiming at test accuracy 0.80 or more in under 10 minutes on
one H100/H200. Not yet measured on a GPU: RESULTS.md says where it stands.

The recipe: SGD+Nesterov at lr 0.2 for batch 256 with a 5-epoch warmup and a per-step cosine
decay over 200 epochs; weight decay 5e-4 on kernels only; label smoothing 0.1; crop+flip and
CutMix (alpha 1); a weight average (ema_decay 0.9995) evaluated with eval.py --ema; all 50,000
training images (data.val_fraction=0: the last checkpoint is the model, the test split is never
used to choose). ResNet-34 with the CIFAR stem trained at 25,472 img/s on an H100 (BENCHMARKS.md):
ResNet-18 takes about half its compute, so 200 epochs fit the 10 minutes.

    python train.py --config configs/resnet18_recipe.py --config.data.source=npz
    --config.data.path=cifar100.npz
    python eval.py --workdir checkpoints/resnet18_recipe --ema
"""

from cifar_jax.config import base


def get_config():
    c = base()
    c.model.name = "resnet18"
    c.model.stem = "cifar"
    c.num_epochs = 200
    c.batch_size = 256
    c.label_smoothing = 0.1
    c.ema_decay = 0.9995
    c.data.source = "tfds"
    c.data.val_fraction = 0.0
    c.data.normalization = "cifar"
    c.data.augment.crop_padding = 4
    c.data.augment.flip = True
    c.data.augment.cutmix_alpha = 1.0
    c.optimizer.name = "sgd"
    c.optimizer.nesterov = True
    c.optimizer.momentum = 0.9
    c.optimizer.lr = 0.2
    c.optimizer.weight_decay = 5e-4
    c.optimizer.decay_norm_and_bias = False
    c.schedule.name = "cosine"
    c.schedule.per = "step"
    c.schedule.warmup_epochs = 5
    c.checkpoint.every_epochs = 20
    return c
