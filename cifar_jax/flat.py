"""The trainable parameters as the training loop carries them: one vector per parameter group.

At CIFAR sizes a GPU step is bound by its kernel launches, and an optimizer updating ResNet-50's
161 parameter arrays one by one launches a kernel or more for each. Over a few long vectors its
update is a few kernels, whatever the model. The groups are PyTorch's usual two: the kernels
(arrays of more than one dimension), which weight decay may apply to alone, and the rest
(BatchNorm's scales and every bias); `optim.decayed` masks the group. The model reads its weights
as slices of the vectors, the gradients arrive as vectors, and an optimizer state that holds a
tree like the parameters (Adam's moments, SGD's momentum) holds vectors like them.

Checkpoints and everything outside the jitted step keep the trees: `steps.to_loop` and
`steps.from_loop` convert the train state around the loop, once per call.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# A convolution kernel (HWIO, flax's order) lies in its vector as OHWI, the order cuDNN reads and
# its filter gradient comes in: row-major HWIO there would cost a transpose per kernel and step.
HWIO_TO_OHWI = (3, 0, 1, 2)
OHWI_TO_HWIO = tuple(int(i) for i in np.argsort(HWIO_TO_OHWI))
KERNELS, REST = 0, 1  # the groups: arrays of more than one dimension, and the others


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each array of a tree lies in the vectors: its shape, in the tree's leaf order, and so
    its group (static: hashed into the jitted program)."""

    treedef: jax.tree_util.PyTreeDef
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, tree) -> Layout:
        leaves, treedef = jax.tree.flatten(tree)
        return cls(treedef, tuple(tuple(leaf.shape) for leaf in leaves))

    @property
    def groups(self) -> tuple[int, ...]:
        return tuple(KERNELS if len(shape) > 1 else REST for shape in self.shapes)

    def ravel(self, tree) -> Flat:
        leaves = [leaf.transpose(HWIO_TO_OHWI) if leaf.ndim == 4 else leaf for leaf in jax.tree.leaves(tree)]
        in_group = [
            [leaf.reshape(-1) for leaf, g in zip(leaves, self.groups) if g == group]
            for group in (KERNELS, REST)
        ]
        return Flat(
            tuple(jnp.concatenate(v) if v else jnp.zeros((0,), leaves[0].dtype) for v in in_group), self
        )

    def unravel(self, flat: Flat):
        # One split per vector: its gradient is one concatenation (a slice's is a padded copy of the
        # whole vector, and the sum of one per array costs the vector once per array).
        pieces = [
            iter(
                jax.lax.split(vector, [math.prod(s) for s, g in zip(self.shapes, self.groups) if g == group])
            )
            for group, vector in enumerate(flat.vectors)
        ]
        leaves = []
        for shape, group in zip(self.shapes, self.groups):
            piece = next(pieces[group])
            if len(shape) == 4:
                piece = piece.reshape([shape[i] for i in HWIO_TO_OHWI]).transpose(OHWI_TO_HWIO)
            leaves.append(piece.reshape(shape))
        return self.treedef.unflatten(leaves)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Flat:
    """A tree of parameters (or of their gradients, or of an optimizer's moments) as one vector per
    group: (kernels, the rest), and its `layout`."""

    vectors: tuple
    layout: Layout

    def tree_flatten(self):
        return self.vectors, self.layout

    @classmethod
    def tree_unflatten(cls, layout, vectors):
        return cls(tuple(vectors), layout)

    def unravel(self):
        return self.layout.unravel(self)
