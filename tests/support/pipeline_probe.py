"""Run as a subprocess (device count set by XLA_FLAGS): draw batches on a mesh of all devices, save them."""

import sys

import jax
import numpy as np

from cifar_jax import data, sharding
from cifar_jax.data import pipeline


def main(out_path):
    arrays = data.load("fake", num_train=40, num_test=13, num_classes=5)
    mesh = sharding.make_mesh()
    images, labels = sharding.replicate(arrays.x_train, mesh), sharding.replicate(arrays.y_train, mesh)
    pre = pipeline.Preprocess(crop_padding=4, flip=True, brightness=0.2, contrast=0.2, saturation=0.2)
    batches = sharding.batch_sharding(mesh)

    @jax.jit
    def draw(epoch, step):
        order = pipeline.epoch_order(0, epoch, images.shape[0])
        return pipeline.train_batch(
            images, labels, order, 0, epoch, step, batch_size=8, preprocess=pre, sharding=batches
        )

    x, y = draw(1, 2)
    assert len(x.sharding.device_set) == jax.device_count()
    np.savez(out_path, x=np.asarray(x), y=np.asarray(y), devices=jax.device_count())


if __name__ == "__main__":
    main(sys.argv[1])
