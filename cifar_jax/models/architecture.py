"""What the rest of the package knows about a model, declared beside the model's code: how to
build it, the options it takes, the image sizes it takes, its PyTorch twin and that twin's
state_dict keys. `cifar_jax.models.MODELS` holds one per model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    # (num_classes, *, dtype, ops, rngs, **options) -> the nnx.Module, initialised as PyTorch's.
    build: Callable
    # (num_classes, **options) -> its PyTorch twin (imports torch), whose state_dict `export` writes.
    torch_twin: Callable
    # A variable's path in the nnx state -> the twin's state_dict key, e.g.
    # ('layer1', 0, 'bn1', 'mean') -> 'layer1.0.bn1.running_mean'.
    torch_key: Callable[[tuple], str]
    options: tuple[str, ...] = ()  # keys of config.model that `build` and `torch_twin` take
    min_image_size: int = 32
    max_image_size: int | None = None  # None: any size from min_image_size up
    torchvision_weights: bool = False  # torchvision publishes ImageNet weights for it (`convert`)

    def takes_image_size(self, size: int) -> bool:
        return self.min_image_size <= size and (self.max_image_size is None or size <= self.max_image_size)

    @property
    def image_sizes(self) -> str:
        """The image sizes it takes, in words: '32x32 images only', 'images of 32x32 or larger'."""
        low, high = self.min_image_size, self.max_image_size
        if low == high:
            return f"{low}x{low} images only"
        return f"images of {low}x{low} " + (f"to {high}x{high}" if high else "or larger")
