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

# A convolution kernel (HWIO, flax's order) lies in its vector as OHWI, the order cuDNN reads and
# its filter gradient comes in: row-major HWIO there would cost a transpose per kernel and step.
TO_STORED = {4: (3, 0, 1, 2)}
FROM_STORED = {4: (1, 2, 3, 0)}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each array of a tree lies in the vectors: its group and shape, in the tree's leaf order
    (static: hashed into the jitted program)."""

    treedef: jax.tree_util.PyTreeDef
    shapes: tuple[tuple[int, ...], ...]
    groups: tuple[int, ...]  # 0: a kernel (more than one dimension), 1: the rest

    @classmethod
    def of(cls, tree) -> Layout:
        leaves, treedef = jax.tree.flatten(tree)
        shapes = tuple(tuple(leaf.shape) for leaf in leaves)
        return cls(treedef, shapes, tuple(0 if len(s) > 1 else 1 for s in shapes))

    def ravel(self, tree) -> Flat:
        leaves = [_stored(leaf) for leaf in jax.tree.leaves(tree)]
        return Flat(
            tuple(
                jnp.concatenate([leaf.reshape(-1) for leaf, g in zip(leaves, self.groups) if g == group])
                if group in self.groups
                else jnp.zeros((0,), leaves[0].dtype)
                for group in (0, 1)
            ),
            self,
        )

    def unravel(self, flat: Flat):
        # One split per vector: its gradient is one concatenation (a slice's is a padded copy, and
        # the sum of one per array costs the whole vector per array).
        pieces = [
            iter(jax.lax.split(v, [math.prod(s) for s, g in zip(self.shapes, self.groups) if g == group]))
            for group, v in enumerate(flat.vectors)
        ]
        leaves = []
        for shape, group in zip(self.shapes, self.groups):
            stored = next(pieces[group])
            if len(shape) in FROM_STORED:
                stored_shape = tuple(shape[i] for i in TO_STORED[len(shape)])
                leaves.append(stored.reshape(stored_shape).transpose(FROM_STORED[len(shape)]))
            else:
                leaves.append(stored.reshape(shape))
        return self.treedef.unflatten(leaves)


def _stored(leaf):
    return leaf.transpose(TO_STORED[leaf.ndim]) if leaf.ndim in TO_STORED else leaf


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
