"""A config file for subprocess tests: python train.py --config tests/support/tiny_config.py

SimpleCNN on 640 fake images, batch 16: 32 steps per epoch in 8 calls of 4, so a stop asked for
early in an epoch (tests/support/stop_probe.py) lands mid-epoch even with 4 calls run ahead.
"""

from tests.support.helpers import tiny_config


def get_config():
    return tiny_config(num_epochs=4, **{"data.fake.num_train": 640})
