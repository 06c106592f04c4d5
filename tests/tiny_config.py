"""A config file for subprocess tests: python train.py --config tests/tiny_config.py

SimpleCNN on 800 fake images, batch 16: 49 short steps per epoch, so a signal lands mid-epoch.
"""

from tests.helpers import tiny_config


def get_config():
    c = tiny_config(num_epochs=4)
    c.data.fake.num_train = 800
    c.data.val_fraction = 0.02
    return c
