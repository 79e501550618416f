"""Where a batch's values are: the axes reduced, the shards pooled and K, for every normalization."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax.numpy as jnp

from jstep.normalization.checks import (
    FeatureAxis,
    _across,
    _check_axis_index_groups,
    _check_x,
    _EmptyBatchError,
    _feature_axes,
)
from jstep.normalization.collectives import Groups, VmapAxes, _pooled_shards, _vmap_axis_sizes


class _Layout(NamedTuple):
    """Where a batch's values are: the reduced axes, the shards pooled, K, per-feature shapes."""

    reduce_axes: tuple[int, ...]
    feature_shape: tuple[int, ...]  # shape of scale, offset, mean, var
    keep_shape: tuple[int, ...]  # the same, with 1 on the reduced axes (broadcasts against x)
    size: int  # K without a mask (the name `count` is tuple's method)
    shards: int  # the shards whose values make one batch: 1, axis_name's size or a group's
    groups: Groups | None  # axis_index_groups, as tuples; None: the whole of axis_name
    vmap_axes: VmapAxes  # the vmap axes of axis_name and their sizes (`_rebinding_vmap_axes`)


def _layout(x: Any, feature_axis: FeatureAxis, axis_name: Any, axis_index_groups: Any = None) -> _Layout:
    """The layout of `x`'s batch; K = (the values per feature in `x`) x (the shards pooled) >= 1."""
    _check_x(x)
    shape = jnp.shape(x)
    features = _feature_axes(len(shape), feature_axis)
    reduce_axes = tuple(a for a in range(len(shape)) if a not in features)
    keep_shape = tuple(1 if a in reduce_axes else n for a, n in enumerate(shape))
    feature_shape = tuple(shape[a] for a in features)
    groups = _check_axis_index_groups(axis_index_groups, axis_name)
    shards = _pooled_shards(axis_name, groups)
    size = math.prod(shape[a] for a in reduce_axes) * shards
    if size < 1:
        raise _EmptyBatchError(
            f"x of shape {tuple(shape)} gives K = 0 values per feature (axes {reduce_axes}"
            f"{_across(axis_name, groups)}); batch statistics need K >= 1 (one value gives sigma = 0, "
            "so Zhat = B)."
        )
    return _Layout(reduce_axes, feature_shape, keep_shape, size, shards, groups, _vmap_axis_sizes(axis_name))
