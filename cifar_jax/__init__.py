"""cifar_jax: CIFAR-scale image classifiers in JAX/Flax NNX."""

__version__ = "0.1.0"
