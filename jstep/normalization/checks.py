"""The checks of a normalization's arguments, with errors that name the argument and what is allowed."""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jstep import _core
from jstep.normalization.collectives import Groups

if TYPE_CHECKING:
    from jstep.normalization.layout import _Layout

FeatureAxis = int | Sequence[int]


class _EmptyBatchError(ValueError):
    """A feature has no value to take batch statistics from (K = 0).

    The message ends with the switch to the running statistics; a framework's layer names its
    own (``use_running_average=True``, ``inference=True``) with `naming`.
    """

    def __init__(self, problem: str, switch: str = "BatchNorm.apply(..., training=False)"):
        self.problem = problem
        super().__init__(f"{problem} Give a non-empty batch, or normalize with the running statistics ({switch}).")

    def naming(self, switch: str) -> _EmptyBatchError:
        """The same error, naming `switch` as the way to the running statistics."""
        return _EmptyBatchError(self.problem, switch)


def _feature_axes(ndim: int, feature_axis: FeatureAxis) -> tuple[int, ...]:
    """`feature_axis` as a sorted tuple of non-negative axes; ValueError when out of range."""
    if isinstance(feature_axis, numbers.Integral):
        axes: tuple[Any, ...] = (feature_axis,)
    else:
        axes = tuple(feature_axis)  # type: ignore[arg-type]  # mypy does not narrow int by Integral
    for axis in axes:
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -ndim <= int(axis) < ndim:
            raise ValueError(
                f"feature_axis {feature_axis!r} is out of range for x with {ndim} dimensions; "
                f"allowed: integers in [{-ndim}, {ndim})"
            )
    normalised = tuple(sorted(int(axis) % ndim for axis in axes))
    if len(set(normalised)) != len(normalised):
        raise ValueError(f"feature_axis {feature_axis!r} names the same axis twice")
    return normalised


def _check_x(x: Any) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"x has dtype {dtype}; batch normalization needs a real floating x "
            "(float16, bfloat16, float32, float64): cast it first, e.g. x.astype(jnp.float32)"
        )


def _check_eps(eps: Any) -> float:
    """eps: a Python or NumPy real number >= 0 (static: it is fixed when traced), as a float."""
    return _core.check_static_number("eps", eps, low=0.0)


def _check_features(name: str, value: Any, feature_shape: tuple[int, ...], x_shape, features) -> None:
    shape = jnp.shape(value)
    if shape != feature_shape:
        raise ValueError(
            f"{name} has shape {shape}, but x of shape {tuple(x_shape)} has feature axes {features} "
            f"of sizes {feature_shape}: {name} must have shape {feature_shape}"
        )
    dtype = jnp.result_type(value)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} has dtype {dtype}; it must be a real floating array")


def _check_axis_name(axis_name: Any) -> Any:
    """`axis_name` as a hashable static setting: None, one axis name, or a tuple of names.

    Takes what ``jax.lax.psum`` takes: one name (any hashable, typically a str), or a tuple or
    list of names; a list becomes a tuple (the setting is a static argument of a jit, which
    must be hashable), and an empty one None (no axis: this device's values only).
    """
    if axis_name is None:
        return None
    names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
    for name in names:
        if name is None or isinstance(name, (tuple, list)) or not isinstance(name, Hashable):
            raise TypeError(
                f"axis_name={axis_name!r}: allowed is None, one axis name (a str, or another hashable "
                "non-tuple value, as jax.lax.psum takes), or a tuple or list of them, e.g. "
                "('devices', 'examples')"
            )
    if not isinstance(axis_name, (tuple, list)):
        return axis_name
    return names or None


def _check_axis_index_groups(axis_index_groups: Any, axis_name: Any) -> Groups | None:
    """`axis_index_groups` as a tuple of tuples, after the checks that need no mapped axis.

    As ``jax.lax.psum`` wants them: given with an `axis_name`, a list of lists of ints (indices
    along `axis_name`) holding each of 0..n-1 exactly once, in groups of equal size.
    """
    if axis_index_groups is None:
        return None
    given = f"axis_index_groups={axis_index_groups!r}"
    if axis_name is None:
        raise ValueError(
            f"{given} was given without axis_name: the groups are subsets of the indices along "
            "axis_name (jax.lax.axis_index); give axis_name too, or drop axis_index_groups"
        )
    if not _is_list_of_int_lists(axis_index_groups):
        raise TypeError(
            f"{given}: allowed is a list of non-empty lists of ints, the indices along axis_name of "
            "each group's devices, e.g. [[0, 1, 2, 3], [4, 5, 6, 7]]"
        )
    groups = tuple(tuple(int(i) for i in group) for group in axis_index_groups)
    sizes = sorted({len(group) for group in groups})
    if len(sizes) > 1:
        raise ValueError(
            f"{given} has groups of sizes {sizes}; jax.lax.psum needs groups of equal size (JAX "
            "takes the first group's size as every group's, and TPUs refuse unequal groups): "
            "split the axis into groups of one size"
        )
    indices = sorted(i for group in groups for i in group)
    if indices != list(range(len(indices))):
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        missing = sorted(set(range(len(indices))) - set(indices))
        raise ValueError(
            f"{given} must hold each index 0..{len(indices) - 1} exactly once, as jax.lax.psum "
            f"requires; repeated: {repeated}, missing: {missing}"
        )
    return groups


def _is_list_of_int_lists(value: Any) -> bool:
    """Whether `value` is a non-empty sequence of non-empty sequences of ints (not bools)."""

    def is_sequence(v):
        return isinstance(v, (Sequence, np.ndarray)) and not isinstance(v, (str, bytes))

    def is_index(i):
        return isinstance(i, numbers.Integral) and not isinstance(i, bool)

    return (
        is_sequence(value)
        and len(value) > 0
        and all(is_sequence(group) and len(group) > 0 and all(map(is_index, group)) for group in value)
    )


def _across(axis_name: Any, groups: Groups | None) -> str:
    """Where a batch's values come from, for error messages."""
    if axis_name is None:
        return ""
    within = "" if groups is None else f" within index groups of {len(groups[0])}"
    return f" across axis {axis_name!r}{within}"


def _check_mask(mask: Any, x_shape: tuple[int, ...], layout: _Layout, axis_name: Any) -> Any:
    """`mask` as an array, after checking it: booleans broadcastable to x, and, where its values
    are known at trace time, K_i >= 1 masked-in value for every feature."""
    if mask is None:
        return None
    dtype = jnp.result_type(mask)
    if dtype != jnp.bool_:
        raise TypeError(
            f"mask has dtype {dtype}; it must be a boolean array, True where a value counts in the "
            "statistics (e.g. mask = positions < lengths[:, None]), as in Flax"
        )
    shape = tuple(jnp.shape(mask))
    try:
        broadcast = jnp.broadcast_shapes(shape, tuple(x_shape))
    except ValueError:
        broadcast = None
    if broadcast != tuple(x_shape):
        raise ValueError(
            f"mask has shape {shape}, which does not broadcast to x's shape {tuple(x_shape)}; "
            "allowed: a shape broadcastable to x's, e.g. (N, 1, 1, 1) or x's own"
        )
    if not isinstance(mask, jax.core.Tracer):  # known now, and the same on every device/example
        counts = np.sum(np.broadcast_to(np.asarray(mask), x_shape), axis=layout.reduce_axes) * layout.shards
        if counts.min() < 1:
            feature = tuple(int(i) for i in np.unravel_index(np.argmin(counts), counts.shape))
            raise _EmptyBatchError(
                f"mask leaves K = 0 masked-in values for feature {feature} of x of shape "
                f"{tuple(x_shape)}{_across(axis_name, layout.groups)}; batch statistics need K >= 1 "
                "masked-in value per feature (one gives sigma = 0, so Zhat = B)."
            )
    return jnp.asarray(mask)
