"""A config file for subprocess tests: python train.py --config tests/tiny_config.py

SimpleCNN on 1,000 fake images, batch 16: 61 short steps per epoch, so a signal lands mid-epoch.
"""

from tests.helpers import tiny_config


def get_config():
    c = tiny_config(num_epochs=3)
    c.data.fake.num_train = 1000
    c.data.val_fraction = 0.02
    return c
