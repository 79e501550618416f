"""Virtual batches (ghost batch norm): the batch axis split into consecutive groups.

With ``virtual_batch_size=V`` the batch axis of ``x`` (its first axis that is not a feature
axis) of length N is split into N/V consecutive groups of V examples, and each group is a
batch of its own. That is a layout: reshaping the batch axis to (N/V, V) and treating the
group axis as one more feature axis gives each group its own mu and sigma^2, and batch norm's
forward, hand-derived backward and forward mode then act per group unchanged (the
per-feature sums of the derivatives are per group too). G and B are shared by the groups:
they are broadcast along the group axis, whose transpose sums their gradients over the groups.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jstep.normalization.checks import FeatureAxis, _EmptyBatchError, _feature_axes


def _check_virtual_batch_size(virtual_batch_size: Any) -> int | None:
    """None, or a positive int (a static setting: it shapes the computation)."""
    if virtual_batch_size is None:
        return None
    if (
        isinstance(virtual_batch_size, bool)
        or not isinstance(virtual_batch_size, numbers.Integral)
        or virtual_batch_size < 1
    ):
        raise ValueError(
            f"virtual_batch_size={virtual_batch_size!r}: allowed is None (the whole batch) or a "
            "positive int, the number of consecutive examples normalized together"
        )
    return int(virtual_batch_size)


def _check_virtual_batches(virtual_batch_size: Any, axis_index_groups: Any) -> int | None:
    """`_check_virtual_batch_size`, with no `axis_index_groups` beside a size: a virtual batch
    is a group of one shard's examples, so device groups have no statistics to share."""
    size = _check_virtual_batch_size(virtual_batch_size)
    if size is not None and axis_index_groups is not None:
        raise ValueError(
            f"virtual_batch_size={virtual_batch_size} with axis_index_groups={axis_index_groups!r}: a virtual "
            "batch is a group of one shard's examples, so device groups have no statistics to share; give "
            "one of the two"
        )
    return size


class _VirtualBatches(NamedTuple):
    """How `x` is split: the grouped shape, its feature axes, where the group axis sits."""

    shape: tuple[int, ...]  # x's shape
    grouped_shape: tuple[int, ...]  # the batch axis N as (N/V, V)
    feature_axis: tuple[int, ...]  # of the grouped x: x's feature axes and the group axis
    batch_axis: int  # in x
    group_position: int  # the group axis's place among the grouped feature axes

    def group(self, x: jax.Array) -> jax.Array:
        return jnp.reshape(x, self.grouped_shape)

    def ungroup(self, y: jax.Array) -> jax.Array:
        return jnp.reshape(y, self.shape)

    def group_mask(self, mask: Any) -> Any:
        """A mask broadcastable to x, made broadcastable to the grouped x (no copy of x's size
        where the mask broadcasts along the batch axis)."""
        if mask is None:
            return None
        mask = jnp.asarray(mask)
        mask = jnp.reshape(mask, (1,) * (len(self.shape) - mask.ndim) + mask.shape)
        b = self.batch_axis
        if mask.shape[b] == 1:
            return jnp.reshape(mask, (*mask.shape[:b], 1, 1, *mask.shape[b + 1 :]))
        mask = jnp.broadcast_to(mask, (*mask.shape[:b], self.shape[b], *mask.shape[b + 1 :]))
        return jnp.reshape(mask, mask.shape[:b] + self.grouped_shape[b : b + 2] + mask.shape[b + 1 :])

    def per_group(self, value: jax.Array) -> jax.Array:
        """A per-feature value (scale, offset) shared by every group: broadcast along the groups."""
        groups = self.grouped_shape[self.batch_axis]
        value = jnp.expand_dims(value, self.group_position)
        shape = (*value.shape[: self.group_position], groups, *value.shape[self.group_position + 1 :])
        return jnp.broadcast_to(value, shape)

    def groups_first(self, statistic: jax.Array) -> jax.Array:
        """A per-(group, feature) statistic with the groups on its first axis."""
        return jnp.moveaxis(statistic, self.group_position, 0)


def _virtual_batches(shape: tuple[int, ...], feature_axis: FeatureAxis, virtual_batch_size: int) -> _VirtualBatches:
    """The split of x's batch axis into groups of `virtual_batch_size`; ValueError when x has
    no batch axis or the size does not divide it."""
    features = _feature_axes(len(shape), feature_axis)
    batch_axes = [a for a in range(len(shape)) if a not in features]
    if not batch_axes:
        raise ValueError(
            f"virtual_batch_size={virtual_batch_size} needs a batch axis to split, but every axis of x "
            f"of shape {tuple(shape)} is a feature axis (feature_axis={feature_axis!r})"
        )
    b = batch_axes[0]
    if shape[b] % virtual_batch_size:
        raise ValueError(
            f"virtual_batch_size={virtual_batch_size} does not divide the batch axis {b} of x of shape "
            f"{tuple(shape)} (length {shape[b]}): the virtual batches are consecutive groups of equal "
            f"size; use a size that divides {shape[b]}"
        )
    grouped_shape = (*shape[:b], shape[b] // virtual_batch_size, virtual_batch_size, *shape[b + 1 :])
    grouped_features = tuple(sorted([b] + [a + (a > b) for a in features]))
    return _VirtualBatches(tuple(shape), grouped_shape, grouped_features, b, grouped_features.index(b))


def _check_virtual_mask(mask: Any, split: _VirtualBatches) -> None:
    """Raise `_EmptyBatchError` naming the virtual batch and the feature for which `mask` (when
    known now) leaves no value: each virtual batch takes its statistics from its own examples."""
    if mask is None or isinstance(mask, jax.core.Tracer):
        return
    grouped = np.broadcast_to(np.asarray(mask), split.shape).reshape(split.grouped_shape)
    reduced = tuple(a for a in range(len(split.grouped_shape)) if a not in split.feature_axis)
    counts = grouped.sum(axis=reduced)
    if counts.min() >= 1:
        return
    where = [int(i) for i in np.unravel_index(np.argmin(counts), counts.shape)]
    group = where.pop(split.group_position)
    size = split.grouped_shape[split.batch_axis + 1]
    raise _EmptyBatchError(
        f"mask leaves no masked-in value for feature {tuple(where)} in virtual batch {group} (examples "
        f"{group * size} to {(group + 1) * size - 1} along axis {split.batch_axis} of x of shape {split.shape}, "
        f"virtual_batch_size={size}); each virtual batch takes its statistics from its own examples and "
        "needs K >= 1 masked-in value per feature: give every virtual batch one, or a larger virtual_batch_size."
    )
