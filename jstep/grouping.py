"""Grouped leaves: run an elementwise transformation on a few flat buffers instead of many arrays.

Every rule in the notes acts on each weight j on its own (W_j, g_j, m_j, v_j, ...), so it
gives the same numbers whether the weights are stored as many arrays or as one long vector.
On a jitted step each array costs a fixed price besides its bytes (a kernel launch, a buffer
to allocate, donate and hand back), and on a tree of many small leaves that price dominates.
`grouped` packs the leaves with at most `max_leaf_size` elements into one flat buffer per
dtype, runs `transformation` on the packed tree, and unpacks its updates:

    packed = {"groups": {dtype name: concatenation of the small leaves},
              "large": (each larger leaf, as it is)}

    opt = jstep.grouped(jstep.adam(1e-3))   # the updates of jstep.adam(1e-3), leaf for leaf

The state is the inner transformation's state over the packed tree: Adam's m and v of all
small float32 leaves are one buffer each. Use it with transformations that treat each
element on its own (every jstep optimizer, Optax's scale_by_* and their aliases); one that
needs the params' tree structure (a mask, per-leaf norms) sees the packed tree instead.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jstep import _core


class Layout(NamedTuple):
    """Where each leaf of a tree goes in its packed form (static: shapes and dtypes only)."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    places: tuple[tuple[str, int], ...]  # ("large", index) or (dtype name, offset in its group)


def layout_of(tree: Any, max_leaf_size: int | None) -> Layout:
    """The packing of `tree`: leaves of at most `max_leaf_size` elements go to their dtype's group."""
    leaves, treedef = jax.tree.flatten(tree)
    shapes, places, ends, large = [], [], {}, 0
    for leaf in leaves:
        shape = tuple(np.shape(leaf))
        size = math.prod(shape)
        if max_leaf_size is None or size <= max_leaf_size:
            group = jnp.result_type(leaf).name
            offset = ends.get(group, 0)
            ends[group] = offset + size
            places.append((group, offset))
        else:
            places.append(("large", large))
            large += 1
        shapes.append(shape)
    return Layout(treedef, tuple(shapes), tuple(places))


def pack(tree: Any, layout: Layout) -> dict[str, Any]:
    """The packed form of `tree`: its small leaves concatenated per dtype, its large ones kept."""
    groups: dict[str, list[jax.Array]] = {}
    large = []
    for leaf, (group, _) in zip(jax.tree.leaves(tree), layout.places):
        if group == "large":
            large.append(leaf)
        else:
            groups.setdefault(group, []).append(jnp.ravel(leaf))
    flat = {name: parts[0] if len(parts) == 1 else jnp.concatenate(parts) for name, parts in groups.items()}
    return {"groups": flat, "large": tuple(large)}


def unpack(packed: dict[str, Any], layout: Layout) -> Any:
    """The tree that `pack` packed: slices of the groups reshaped, the large leaves as they are."""
    leaves = []
    for shape, (group, where) in zip(layout.shapes, layout.places):
        if group == "large":
            leaves.append(packed["large"][where])
        else:
            size = math.prod(shape)
            leaves.append(jax.lax.slice(packed["groups"][group], (where,), (where + size,)).reshape(shape))
    return jax.tree.unflatten(layout.treedef, leaves)


def check_max_leaf_size(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"max_leaf_size must be an int >= 0 or None (every leaf), got {value!r}")


def grouped(transformation: optax.GradientTransformation, *, max_leaf_size: int | None = 1 << 16) -> optax.GradientTransformation:
    """`transformation` run on the params' small leaves packed into one flat buffer per dtype.

    The updates are those of `transformation` on the unpacked tree for an elementwise rule
    such as every jstep optimizer (u_j depends on g_j and the state of j only), up to the
    last bits: XLA may compile the same arithmetic differently for arrays of other lengths.

    Args:
      transformation: an elementwise ``optax.GradientTransformation``.
      max_leaf_size: leaves with at most this many elements are grouped; larger leaves stay
        arrays of their own (concatenating them would copy many bytes to save one array).
        ``None`` groups every leaf.

    The state holds the same bytes as the plain transformation's; the step needs one scratch
    buffer the size of the grouped gradients (their packed copy).

    The leaves are grouped by the dtypes of the params given to ``init`` and ``update``; call
    ``update`` with ``params`` when the gradients' dtypes differ from the params'.

    Under a sharded ``jit`` the groups are concatenations of the leaves, so keep to the
    default where large leaves are sharded, or leave grouping out.
    """
    check_max_leaf_size(max_leaf_size)

    def init(params):
        _core.check_floating_leaves(params)
        return transformation.init(pack(params, layout_of(params, max_leaf_size)))

    def update(updates, state, params=None):
        # Grouped as at init: by the params' dtypes where given (gradients may differ from
        # them, e.g. float32 gradients of bfloat16 params); each update keeps its own dtype.
        layout = layout_of(updates if params is None else params, max_leaf_size)
        packed_params = None if params is None else pack(params, layout)
        packed_updates, state = transformation.update(pack(updates, layout), state, packed_params)
        return _core.cast_like(unpack(packed_updates, layout), updates), state

    return optax.GradientTransformation(init, update)
