"""A config file for subprocess tests: python train.py --config tests/support/tiny_config.py

SimpleCNN on 3,200 fake images, batch 16: 196 short steps per epoch (about 3 s on 2 cores), so a
signal sent when an epoch's metrics row appears lands early in the next epoch.
"""

from tests.support.helpers import tiny_config


def get_config():
    c = tiny_config(num_epochs=4)
    c.data.fake.num_train = 3200
    c.data.val_fraction = 0.02
    return c
