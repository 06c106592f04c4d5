"""Quickstart: SimpleCNN on scikit-learn's bundled handwritten digits (real, offline), CPU, about 20 s.

python train.py --config configs/quickstart.py          # or: make quickstart
"""

from cifar_jax.config import base


def get_config():
    c = base()
    c.model.name = "simple_cnn"
    c.model.num_classes = 10
    c.data.source = "digits"
    c.data.augment.crop_padding = 2
    c.data.augment.flip = False  # a flipped digit is another glyph
    c.num_epochs = 5
    c.batch_size = 64
    c.eval_batch_size = 256
    c.optimizer.name = "adam"
    c.optimizer.lr = 2e-3
    c.schedule.name = "cosine"
    return c
