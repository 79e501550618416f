"""B.0.2 Batch normalization, with the notes' hand-derived gradient.

For each feature i, over the K values Z_i1..Z_iK it takes in a batch (every axis of ``x``
except the feature axes; across devices and vmapped examples too under ``axis_name``)::

    mu_i      = (1/K) sum_j Z_ij
    sigma_i^2 = (1/K) sum_j (Z_ij - mu_i)^2                (population variance, two passes)
    Zbar_ij   = (Z_ij - mu_i) / s_i
    Zhat_ij   = G_i Zbar_ij + B_i

with ``s_i = sqrt(sigma_i^2 + eps)`` (``eps_in_sqrt=True``, Ioffe & Szegedy, Flax, PyTorch)
or the notes' ``s_i = sigma_i + eps`` (``eps_in_sqrt=False``).

The backward pass is the notes' derivation, vectorised and made exact for eps > 0. With
dZhat = dL/dZhat, the gradients of the weights are the two per-feature reductions

    dL/dB_i = sum_j dZhat_ij
    dL/dG_i = sum_j dZhat_ij Zbar_ij

and, from d mu_i/dZ_ij = 1/K, d sigma_i/dZ_ij = (Z_ij - mu_i)/(K sigma_i) and
dZbar_ik/dZ_ij = (delta_jk - 1/K)/s_i - (Zbar_ik/s_i) ds_i/dZ_ij with ds_i/dZ_ij = c_i Zbar_ij/K,

    dL/dZ_ij = (G_i / s_i) (dZhat_ij - (1/K) dL/dB_i - c_i Zbar_ij (1/K) dL/dG_i)

where

    c_i = 1                 for s_i = sqrt(sigma_i^2 + eps)   (ds_i/dZ_ij = (Z_ij - mu_i)/(K s_i))
    c_i = s_i / sigma_i     for s_i = sigma_i + eps           (ds_i/dZ_ij = (Z_ij - mu_i)/(K sigma_i))
        = 1 + eps/sigma_i

With eps = 0 both are the notes' closing formula,
dL/dZ_ij = sum_k dZhat_ik G_i/(K sigma_i) (delta_jk K - 1 - (Z_ik-mu_i)(Z_ij-mu_i)/sigma_i^2).
So the backward is two per-feature reductions and one elementwise pass. It keeps one
activation-sized array from the forward pass, the input Z itself (nothing is written out for
the backward), plus per-feature vectors, and it is written with differentiable jnp
operations, so second derivatives (grad of grad, Hessian-vector products) are exact too.
The centred values are taken with mu held as an unevaluated sum of fl(mu) and what its
rounding left off (`low`), Z - mu = (Z - fl(mu)) - low: in the forward pass for sigma^2 and
Zhat, in the backward for the input gradient and for

    sum_j dZhat_ij Zbar_ij = sum_j dZhat_ij (Z_ij - mu_i) / s_i

And mu itself is summed about a value of the batch, c_i (this device's first value of the
feature, averaged over the shards pooled): mu_i = c_i + (1/K) sum_j (Z_ij - c_i).
Rounding: where |mu_i| >> sigma_i, Z_ij - c_i and Z_ij - fl(mu_i) are exact (Sterbenz), so
no term loses a factor |mu_i|/sigma_i: with float32 at |mu|/sigma = 1e4 the gradients keep
about 1e-7 of their size, where the one-pass sum_j dZhat_ij Z_ij - mu_i sum_j dZhat_ij (and
autodiff through Z - fl(mu)) lose 1e-4 to 1e-2. Every subtraction is fused into the pass
that reads Z, so no centred copy of Z is written. (Under a sharded ``jit`` whose mesh splits
the batch axes with explicit axes, JAX cannot take one value of Z: there c = 0, and Z - fl(mu)
loses that factor in Zhat and dL/dZ, as autodiff does; dL/dG stays two-pass.)

With a mask (``mask=``, booleans broadcastable to Z; m_ij = 1 where Z_ij is masked in, else 0)
the statistics are those of the masked-in values, and every value is normalized with them:

    K_i       = sum_j m_ij                                 (per feature; summed across axis_name)
    mu_i      = (1/K_i) sum_j m_ij Z_ij
    sigma_i^2 = (1/K_i) sum_j m_ij (Z_ij - mu_i)^2

Then d mu_i/dZ_ij = m_ij/K_i and ds_i/dZ_ij = c_i m_ij Zbar_ij/K_i, and the same derivation
gives the input gradient with its two correction terms masked,

    dL/dZ_ij = (G_i / s_i) (dZhat_ij - m_ij (1/K_i) dL/dB_i - c_i m_ij Zbar_ij (1/K_i) dL/dG_i)

while dL/dB_i and dL/dG_i still sum over every j (every Zhat_ij depends on G_i and B_i): a
masked-out value, which moves no statistic, gets only the direct term (G_i/s_i) dZhat_ij.
A feature needs K_i >= 1. A mask whose values are known when `batch_norm` is traced is
checked (a clear error for K_i = 0); a traced mask cannot be, and there K_i = 0 gives
mu_i = sigma_i = 0/0, so that feature's outputs and gradients are NaN. K_i = 1 gives
sigma_i = 0, so the one masked-in value becomes B_i and the others G_i (Z_ij - mu_i)/s_i + B_i
with s_i = sqrt(eps) or eps (with eps = 0, see below).

One value per feature (K = 1, e.g. a batch of one example of a dense layer): the value is its
own mean, sigma = 0 and Zhat = B, as in Flax (PyTorch refuses a training call with one value
per channel). Zhat does not depend on Z at all then, so dL/dZ = 0 and
dL/dG = 0 exactly, eps = 0 included; dL/dB = dZhat.

With ``axis_index_groups`` (under ``pmap``, or ``shard_map(..., check_vma=False)``) the
devices along ``axis_name`` are split into groups of equal size, and each group is a batch of
its own: the sums behind mu_i, sigma_i^2 and K_i, and the backward's two reductions, are
all-reduced within the group only (``jax.lax.psum(..., axis_index_groups=...)``), so without a
mask K = (the values per device) x (the group size).

Degenerate features (every value of the feature equal, sigma_i = 0):
  * eps > 0: Zbar = 0 and the output is B_i. Both forms are differentiable there; for
    ``s = sigma + eps`` the term c_i Zbar_ij is 0/0, and its limit is 0 (Zbar_ij = O(|Z-mu|)
    while c_i = O(1/|Z-mu|) multiplies sum_k dZhat_ik (Z_ik-mu_i) = O(|Z-mu|)), so
    dL/dZ_ij = (G_i/eps)(dZhat_ij - mean_k dZhat_ik) exactly, with no NaN.
  * eps = 0: the forward gives Zbar = 0, the eps -> 0+ limit, so the output is B_i and the
    gradients of G and B are finite. The input gradient of that feature is not finite
    (inf or NaN): an arbitrarily small change of Z moves Zbar by O(1), so no derivative
    exists. Use eps > 0 when constant features can occur.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jstep import _core
from jstep.averages import running_average_update

FeatureAxis = int | Sequence[int]


# ------------------------------------------------------------------------- validation


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
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a Python number (it is a static setting), got {eps!r}")
    _core.check_number("eps", eps, low=0.0)
    return float(eps)


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


Groups = tuple[tuple[int, ...], ...]


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


def _pooled_shards(axis_name: Any, groups: Groups | None) -> int:
    """How many shards' values make one batch: 1, the size of `axis_name`, or that of one group.

    Checked at trace time, inside the map: the groups must index the whole of `axis_name`, and
    it must be a ``pmap``/``shard_map`` axis (``jax.lax.psum`` takes no groups over a vmap axis).
    """
    if axis_name is None:
        return 1
    size = jax.lax.axis_size(axis_name)
    if groups is None:
        return size
    _, vmap_axes = _split_axis_name(axis_name)
    if vmap_axes:
        raise NotImplementedError(
            f"axis_index_groups={_as_lists(groups)} with axis_name={axis_name!r}: jax.lax.psum takes index "
            f"groups over pmap and shard_map axes only, and {vmap_axes} is a jax.vmap axis (JAX raises "
            "NotImplementedError for groups in vmap collectives). Drop axis_index_groups, or map "
            "the batch over devices with pmap or shard_map"
        )
    indices = sum(len(group) for group in groups)
    if indices != size:
        raise ValueError(
            f"axis_index_groups={_as_lists(groups)} holds the indices 0..{indices - 1}, but axis_name "
            f"{axis_name!r} has size {size}: the groups must hold each index 0..{size - 1} exactly once"
        )
    return len(groups[0])


def _as_lists(groups: Groups) -> list[list[int]]:
    """The groups as the user writes them, for error messages."""
    return [list(group) for group in groups]


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


class _Layout(NamedTuple):
    """Where a batch's values are: the reduced axes, the shards pooled, K, per-feature shapes."""

    reduce_axes: tuple[int, ...]
    feature_shape: tuple[int, ...]  # shape of scale, offset, mean, var
    keep_shape: tuple[int, ...]  # the same, with 1 on the reduced axes (broadcasts against x)
    size: int  # K without a mask (the name `count` is tuple's method)
    shards: int  # the shards whose values make one batch: 1, axis_name's size or a group's
    groups: Groups | None  # axis_index_groups, as tuples; None: the whole of axis_name


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
    return _Layout(reduce_axes, feature_shape, keep_shape, size, shards, groups)


# ------------------------------------------------------------------ across mapped axes


def _split_axis_name(axis_name: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The names in `axis_name` split into (mesh axes of ``shard_map``/``pmap``, ``vmap`` axes).

    The two kinds reduce differently: a mesh axis is typed (a value is varying or invariant over
    it, and ``psum`` wants it varying), while a vmap axis is a batch dimension of the traced
    values, with no such typing. ``pmap`` runs as a ``shard_map``, so its axis is a mesh axis.
    """
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    manual = jax.sharding.get_abstract_mesh().manual_axes
    return tuple(n for n in names if n in manual), tuple(n for n in names if n not in manual)


def _per_device(value: Any, axis_name: Any) -> Any:
    """`value` (a pytree) typed as varying over the mesh axes of `axis_name`.

    Under ``shard_map`` a replicated `scale` is cast to varying here, so its gradient is this
    device's share; the transpose of that cast sums the per-device gradients, exactly as for a
    parameter used by ordinary jnp code. The vmap axes are left alone: there an unbatched
    `scale`'s per-example gradients are summed by vmap's own rule for ``custom_vjp``.
    """
    if axis_name is None:
        return value
    mesh_axes, _ = _split_axis_name(axis_name)

    def varying(leaf):
        aval = jax.typeof(leaf)
        already = aval.vma if hasattr(aval, "vma") else aval.manual_axis_type.varying
        missing = tuple(name for name in mesh_axes if name not in already)
        return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree.map(varying, value)


def _all_reduce(value: Any, axis_name: Any, groups: Groups | None = None) -> Any:
    """psum of `value` (a pytree) over every axis in `axis_name`: the vmap axes, then the mesh
    axes, within each of `groups` (then `axis_name` holds mesh axes only: see `_pooled_shards`)."""
    mesh_axes, vmap_axes = _split_axis_name(axis_name)
    if vmap_axes:
        value = _sum_over_vmap_axes(value, vmap_axes)
    if mesh_axes:
        value = _psum_within(_per_device(value, mesh_axes), mesh_axes, groups)
    return value


def _psum_within(value: Any, mesh_axes: tuple[Any, ...], groups: Groups | None) -> Any:
    """``jax.lax.psum`` over `mesh_axes`, within each of `groups` (None: over all of them).

    In jax 0.10 a ``shard_map`` that checks its values' types (``check_vma=True``, the default)
    refuses index groups with a bare NotImplementedError; it is re-raised saying what to do.
    """
    try:
        return jax.lax.psum(value, mesh_axes, axis_index_groups=groups)
    except NotImplementedError as error:
        if groups is None:
            raise
        names = mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes
        raise NotImplementedError(
            f"axis_index_groups={_as_lists(groups)} over axis {names!r}: jax.lax.psum takes no index "
            "groups inside a jax.shard_map with check_vma=True (the default). Use "
            "jax.shard_map(..., check_vma=False) or jax.pmap, or instead of groups give the mesh a "
            "second axis and name only the axis whose devices form one group in axis_name"
        ) from error


def _sum_over_vmap_axes(value: Any, vmap_axes: tuple[Any, ...]) -> Any:
    """psum over vmap axes, also when the vmap runs inside ``shard_map``/``pmap``.

    There (jax 0.10), ``jax.lax.psum`` over a vmap axis fails with a bare AssertionError: it
    first casts the value to varying over every named axis, and a vmap axis is no mesh axis.
    The sum itself needs no such cast, so it is bound as the untyped all-reduce that ``psum``
    uses when ``shard_map`` runs with ``check_vma=False``; vmap turns it into a sum over the
    batch dimension. (Only the backward of `_normalize` is ever differentiated through it.)
    """
    if not jax.sharding.get_abstract_mesh().manual_axes:
        return jax.lax.psum(value, vmap_axes)
    from jax._src.lax.parallel import psum_p  # no public untyped psum (see above)

    return jax.tree.map(lambda leaf: psum_p.bind(leaf, axes=vmap_axes, axis_index_groups=None), value)


# ----------------------------------------------------------------------------- numerics


def _total(values: jax.Array, layout: _Layout, axis_name: Any) -> jax.Array:
    """sum over the batch axes (keeping them as size 1), all-reduced across `axis_name`."""
    local = jnp.sum(values, axis=layout.reduce_axes, keepdims=True)
    return local if axis_name is None else _all_reduce(local, axis_name, layout.groups)


def _masked(values: Any, mask: Any) -> Any:
    """m values: `values` where `mask` is True, 0 elsewhere (just `values` without a mask)."""
    return values if mask is None else jnp.where(mask, values, 0)


class _Centre(NamedTuple):
    """mu_i as the unevaluated sum `high` + `low`: `high` = fl(mu_i), `low` what rounding left off.

    Z - mu is computed as (Z - high) - low. Where |mu| >> sigma, Z - high is exact (the two are
    within a factor 2 of each other), so the centred values keep their relative precision,
    where Z - fl(mu) alone would lose a factor |mu|/sigma to fl(mu)'s rounding.
    """

    high: jax.Array
    low: jax.Array

    @classmethod
    def about(cls, shift: jax.Array, offset: jax.Array) -> _Centre:
        """mu = shift + offset, split exactly (Knuth's TwoSum)."""
        high = shift + offset
        back = high - shift
        return cls(high, (shift - (high - back)) + (offset - back))

    def of(self, values: jax.Array) -> jax.Array:
        """Z - mu, as (Z - high) - low."""
        return (values - self.high) - self.low


def _shift(xc: jax.Array, layout: _Layout, axis_name: Any) -> jax.Array:
    """c: per feature, the first value on this device, averaged over the shards pooled (so that
    every shard has the same c; keepdims). Summed about c, x - c is exact where |mu| >> sigma.
    Any c gives the same mu; one near the values (not, say, a masked-out padding value) keeps
    the precision.

    Where `x` is split over its batch axes by explicit mesh axes (a sharded ``jit`` on a mesh of
    ``AxisType.Explicit``), JAX cannot take one value of it, and c = 0: mu is then fl(mu) alone.
    """
    spec = tuple(getattr(jax.typeof(xc).sharding, "spec", None) or ())
    if any(a < len(spec) and spec[a] is not None for a in layout.reduce_axes):
        return jnp.zeros(layout.keep_shape, xc.dtype)
    first = xc[tuple(slice(0, 1) if a in layout.reduce_axes else slice(None) for a in range(xc.ndim))]
    return first if axis_name is None else _all_reduce(first, axis_name, layout.groups) / layout.shards


def _moments(x: jax.Array, layout: _Layout, axis_name: Any, mask: Any = None) -> tuple[_Centre, jax.Array, Any]:
    """mu (as a `_Centre`), sigma^2 (keepdims) and K: two reads of x, in at least float32.

    The first pass sums x - c, the second (x - mu)^2: no E[x^2] - E[x]^2 cancellation, and with
    the shift c (a value of the batch, see `_shift`) no loss when |mu| >> sigma either. The
    subtractions are fused into the reductions, so x - c and x - mu are never written out. The
    optimization barriers give each reduction its own copy of c and mu: were their broadcasts
    shared with the caller's elementwise uses of them (Zhat, the input gradient), XLA:CPU would
    materialise x - mu as an activation-sized array and read it back.
    With a `mask`, both sums take the masked-in values only and K is their count per feature
    (an int32 sum, all-reduced too, then in the compute dtype); without one K is a number.
    """
    xc = x.astype(_core.compute_dtype(x.dtype))
    count: Any = layout.size
    if mask is not None:
        in_batch = jnp.broadcast_to(mask, x.shape).astype(jnp.int32)
        count = _total(in_batch, layout, axis_name).astype(xc.dtype)
    shift = _shift(xc, layout, axis_name)
    centre = _Centre.about(shift, _total(_masked(xc - shift, mask), layout, axis_name) / count)
    own = jax.lax.optimization_barrier(centre)  # the same values; see above
    var = _total(_masked(jnp.square(own.of(xc)), mask), layout, axis_name) / count
    return centre, var, count


def _safe_inverse(s: jax.Array) -> jax.Array:
    """1/s, and 0 where s = 0 (with a gradient that stays finite there)."""
    positive = s > 0
    return jnp.where(positive, 1 / jnp.where(positive, s, 1), 0)


def _denominator(var: jax.Array, eps: float, eps_in_sqrt: bool) -> tuple[Any, jax.Array]:
    """(sigma, s): s = sqrt(sigma^2 + eps) or the notes' s = sigma + eps."""
    if eps_in_sqrt:
        return None, jnp.sqrt(var + eps)
    sigma = jnp.sqrt(var)
    return sigma, sigma + eps


# ------------------------------------------------------------- the custom-gradient core


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _normalize(x, scale, offset, mask, layout: _Layout, eps: float, eps_in_sqrt: bool, axis_name: Any):
    """(Zhat, mu, sigma^2): the forward pass, statistics shaped like `scale`; `mask` None or booleans."""
    return _forward(x, scale, offset, mask, layout, eps, eps_in_sqrt, axis_name)[0]


def _forward(x, scale, offset, mask, layout, eps, eps_in_sqrt, axis_name):
    """((Zhat, mu, sigma^2), (mu as a `_Centre`, sigma^2, K)), the last three shaped to broadcast against x."""
    centre, var, count = _moments(x, layout, axis_name, mask)
    _, s = _denominator(var, eps, eps_in_sqrt)
    gain = scale.reshape(layout.keep_shape).astype(var.dtype) * _safe_inverse(s)  # G/s
    y = centre.of(x.astype(var.dtype)) * gain + offset.reshape(layout.keep_shape).astype(var.dtype)
    outputs = (y.astype(x.dtype), centre.high.reshape(layout.feature_shape), var.reshape(layout.feature_shape))
    return outputs, (centre, var, count)


def _normalize_fwd(x, scale, offset, mask, layout, eps, eps_in_sqrt, axis_name):
    x, scale, offset = x.value, scale.value, offset.value  # symbolic_zeros wraps the primals
    mask = None if mask is None else mask.value
    outputs, (centre, var, count) = _forward(x, scale, offset, mask, layout, eps, eps_in_sqrt, axis_name)
    # The one activation-sized residual is x itself (nothing new is written for the backward);
    # with a mask, the mask (the caller's) and the per-feature counts K too.
    masking = None if mask is None else (mask, count)
    return outputs, (x, scale, offset, centre, var, masking)


def _normalize_bwd(layout, eps, eps_in_sqrt, axis_name, residuals, cotangents):
    x, scale, offset, centre, var, masking = residuals
    dy, dmean, dvar = cotangents
    axes = layout.reduce_axes
    mask, count = (None, layout.size) if masking is None else masking
    sigma, s = _denominator(var, eps, eps_in_sqrt)
    xc = x.astype(var.dtype)
    inverse_s = _safe_inverse(s)
    g = scale.reshape(layout.keep_shape).astype(var.dtype)

    if isinstance(dy, SymbolicZero):
        dx = jnp.zeros_like(xc)
        dscale = doffset = jnp.zeros(layout.keep_shape, var.dtype)
    else:
        dy = dy.astype(var.dtype)
        # dL/dB and dL/dG, this device's shares: sum dy, and sum dy Zbar = sum dy (Z - mu) / s, with
        # the centred Z of the forward pass (`_Centre`: no cancellation when |mu| >> sigma). The
        # barrier gives that reduction its own copy of mu, as in `_moments` (tied to dL/dB so
        # that it is not merged with the forward's barrier), so x - mu is never written out.
        doffset = jnp.sum(dy, axis=axes, keepdims=True)
        own, _ = jax.lax.optimization_barrier((centre, doffset))
        dscale = jnp.sum(dy * own.of(xc), axis=axes, keepdims=True) * inverse_s
        sum_dy, sum_dy_xhat = (
            (doffset, dscale) if axis_name is None else _all_reduce((doffset, dscale), axis_name, layout.groups)
        )
        # c = 1, or (sigma + eps)/sigma for the notes' form (0 at sigma = 0: the term's limit)
        c = 1 if eps_in_sqrt else jnp.where(sigma > 0, s * _safe_inverse(sigma), 0)
        # Through mu and s only the masked-in values move the statistics (m = 0 or 1).
        # With K = 1 the one value is its own mean: Zhat = B whatever Z is, the bracket is exactly
        # 0, and so is dL/dZ, also where eps = 0 makes s = 0 (hence 1/s as 0 there).
        gain = g * inverse_s if layout.size == 1 and mask is None else g / s
        dx = gain * (
            dy - _masked(sum_dy / count, mask) - _masked(centre.of(xc) * (inverse_s * c * sum_dy_xhat / count), mask)
        )

    # Gradients through the returned statistics: d mu/dZ_ij = m_ij/K, d sigma^2/dZ_ij = 2 m_ij (Z_ij - mu)/K.
    if not isinstance(dmean, SymbolicZero):
        dx = dx + _masked(dmean.reshape(layout.keep_shape).astype(var.dtype) / count, mask)
    if not isinstance(dvar, SymbolicZero):
        dx = dx + _masked(dvar.reshape(layout.keep_shape).astype(var.dtype) * (2 / count) * centre.of(xc), mask)

    def like(grad, primal):
        return grad.reshape(primal.shape).astype(primal.dtype)

    return like(dx, x), like(dscale, scale), like(doffset, offset), None


_normalize.defvjp(_normalize_fwd, _normalize_bwd, symbolic_zeros=True)


# Staged as one jitted call (inlined into an enclosing jit): JAX 0.10 cannot run a custom_vjp
# with symbolic zeros op by op under an eager shard_map, but runs it staged.
_normalize_staged = jax.jit(_normalize, static_argnums=(4, 5, 6, 7))


def _normalize_checked(x, scale, offset, feature_axis, eps, eps_in_sqrt, axis_name, mask=None, axis_index_groups=None):
    axis_name = _check_axis_name(axis_name)
    layout = _layout(x, feature_axis, axis_name, axis_index_groups)
    features = tuple(a for a in range(jnp.ndim(x)) if a not in layout.reduce_axes)
    _check_features("scale", scale, layout.feature_shape, jnp.shape(x), features)
    _check_features("offset", offset, layout.feature_shape, jnp.shape(x), features)
    mask = _check_mask(mask, jnp.shape(x), layout, axis_name)
    scale, offset = _per_device(scale, axis_name), _per_device(offset, axis_name)
    return _normalize_staged(x, scale, offset, mask, layout, _check_eps(eps), bool(eps_in_sqrt), axis_name)


# --------------------------------------------------------------------------- public API


def batch_norm(
    x: jax.Array,
    scale: jax.Array,
    offset: jax.Array,
    *,
    feature_axis: FeatureAxis = -1,
    eps: float = 1e-5,
    eps_in_sqrt: bool = True,
    axis_name: Any = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Batch-normalize `x` with its own statistics: Zhat = G (Z - mu) / s + B.

    ``s = sqrt(sigma^2 + eps)`` by default; ``eps_in_sqrt=False`` is the notes' literal
    ``s = sigma + eps``, and ``feature_axis=0`` their n x K layout. The gradient is the notes'
    derivation made exact for eps > 0 (see the module docstring for the formulas and for what a
    constant feature gives):

        dL/dZ = (G/s) (dZhat - mean(dZhat) - c Zbar mean(dZhat Zbar)),
        c = 1 (eps inside the root) or c = (sigma + eps)/sigma (the notes' form).

    Args:
      x: floating array; bfloat16/float16 are normalized in float32 and returned in their dtype.
      scale: G, shaped like the feature axes of `x` (e.g. ``(C,)`` for NHWC).
      offset: B, the same shape.
      feature_axis: the axis or axes that index features (-1 for NHWC, 1 for NCHW, 0 for the
        notes' n x K); statistics are taken over every other axis.
      eps: eps >= 0, a Python number. eps = 0 is the notes' derivation.
      eps_in_sqrt: True for sqrt(sigma^2 + eps), False for sigma + eps.
      axis_name: the mapped axis, or a tuple of them, over which the batch is split: a
        ``shard_map``/``pmap`` axis (devices), a ``jax.vmap(..., axis_name=...)`` axis (e.g. one
        example per call, as in Equinox, ``nnx.vmap`` or Linen's ``nn.vmap``), or both, e.g.
        ``("devices", "examples")`` for a vmap inside a shard_map. The statistics and the
        backward pass's two reductions are all-reduced over it, so the output and the input
        gradient equal those of one device holding the whole batch. The gradients of `scale`
        and `offset` taken inside the map stay this device's (or example's) contribution: sum
        them over the axis, as for any parameter under data parallelism. Taken outside the
        map, they are already summed (shard_map's transpose does that for a replicated
        `scale`, vmap's for an unbatched one).
      axis_index_groups: None, or a list of equal-sized lists of indices along `axis_name`
        holding each index once, e.g. ``[[0, 1, 2, 3], [4, 5, 6, 7]]``: each group of devices
        is a batch of its own (statistics, K and the backward's reductions all-reduced within
        the group), as ``jax.lax.psum(..., axis_index_groups=...)``. Where ``psum`` takes no
        groups (a ``jax.vmap`` axis in `axis_name`, a ``shard_map`` with ``check_vma=True``,
        its default in jax 0.10) a NotImplementedError says so; ``pmap`` and
        ``shard_map(..., check_vma=False)`` take them.
      mask: None, or booleans broadcastable to `x` (as in Flax): the statistics are taken over
        the True values only, K_i being their count per feature (summed across `axis_name`,
        so devices may hold different numbers of them), and every value is normalized with
        them. In the gradient a masked-out value gets only the direct term (G/s) dZhat (see
        the module docstring). A feature needs K_i >= 1: a mask known when traced (not a
        traced argument) is checked; for a traced one, K_i = 0 gives NaN for that feature's
        values and gradients. K_i = 1 gives sigma = 0 (a constant feature).

    Returns:
      Zhat, with the shape and dtype of `x`.

    Example:
      With G = 1 and B = 0 each feature (column) comes out with mean 0 and variance
      sigma^2 / (sigma^2 + eps), just under 1:

      >>> import jax.numpy as jnp
      >>> import jstep
      >>> x = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 60.0], [6.0, 30.0]])
      >>> y = jstep.batch_norm(x, jnp.ones(2), jnp.zeros(2))
      >>> print(y.shape, jnp.allclose(y.mean(axis=0), 0, atol=1e-6), y.var(axis=0).round(4))
      (4, 2) True [1. 1.]
    """
    return _normalize_checked(x, scale, offset, feature_axis, eps, eps_in_sqrt, axis_name, mask, axis_index_groups)[0]


def batch_stats(
    x: jax.Array,
    *,
    feature_axis: FeatureAxis = -1,
    axis_name: Any = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(mu, sigma^2) of each feature: mu = (1/K) sum_j Z_j, sigma^2 = (1/K) sum_j (Z_j - mu)^2.

    Two passes over `x` (mean first, then the centred squares), in at least float32, shaped like
    the feature axes; under `axis_name` the sums are all-reduced so every device gets the
    statistics of the whole batch (with `axis_index_groups`, those of its group's batch). With
    `mask` (booleans broadcastable to `x`) the sums take the True values only, and K is their
    count per feature (see `batch_norm`).

    Example:
      >>> import jax.numpy as jnp
      >>> import jstep
      >>> x = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 60.0], [6.0, 30.0]])
      >>> mean, var = jstep.batch_stats(x)  # per column; var = (1/K) sum (Z - mu)^2
      >>> print(mean, var)
      [ 3. 30.] [  3.5 350. ]
    """
    axis_name = _check_axis_name(axis_name)
    layout = _layout(x, feature_axis, axis_name, axis_index_groups)
    mask = _check_mask(mask, jnp.shape(x), layout, axis_name)
    centre, var, _ = _moments(jnp.asarray(x), layout, axis_name, mask)
    return centre.high.reshape(layout.feature_shape), var.reshape(layout.feature_shape)


class BatchNormParams(NamedTuple):
    """The learned weights: G (`scale`, starts at 1) and B (`offset`, starts at 0)."""

    scale: jax.Array
    offset: jax.Array


class BatchNormState(NamedTuple):
    """The running statistics used at evaluation: `mean` starts at 0, `var` at 1."""

    mean: jax.Array
    var: jax.Array


@dataclasses.dataclass(frozen=True)
class BatchNorm:
    """A batch-norm layer as a pure pair: ``params, state = bn.init(x)``;
    ``y, state = bn.apply(params, state, x, training=True)``.

    Training normalizes with the batch statistics (`batch_norm`, whose forward pass also returns
    mu and sigma^2, so they are computed once) and updates the running statistics with the
    notes' running average, C_t = momentum C_{t-1} + (1 - momentum) c_t
    (`running_average_update`); the running variance is the population variance, as in the
    notes and Flax (PyTorch keeps K/(K-1) times it). Evaluation (``training=False``) uses the
    running statistics and leaves the state unchanged.

    Args:
      momentum: the running average's gamma, in [0, 1).
      eps, eps_in_sqrt, feature_axis, axis_name, axis_index_groups: as in `batch_norm` (with
        groups, each group's devices keep the running statistics of their group's batches).

    Example:
      One training step moves the running statistics from (0, 1) towards the batch's
      (mu, sigma^2) = ([3, 30], [3.5, 350]); momentum 0.5 takes them half way:

      >>> import jax.numpy as jnp
      >>> import jstep
      >>> x = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 60.0], [6.0, 30.0]])
      >>> bn = jstep.BatchNorm(momentum=0.5)
      >>> params, state = bn.init(x)
      >>> y, state = bn.apply(params, state, x, training=True)
      >>> print(state.mean, state.var)
      [ 1.5 15. ] [  2.25 175.5 ]
      >>> y_eval, same_state = bn.apply(params, state, x, training=False)  # uses the running ones
      >>> print(y_eval.shape, same_state is state)
      (4, 2) True
    """

    momentum: Any = 0.9
    eps: float = 1e-5
    eps_in_sqrt: bool = True
    feature_axis: FeatureAxis = -1
    axis_name: Any = None
    axis_index_groups: Any = None

    def __post_init__(self):
        _core.check_decay("momentum", self.momentum)
        _check_eps(self.eps)
        object.__setattr__(self, "axis_name", _check_axis_name(self.axis_name))  # a list becomes a tuple
        _check_axis_index_groups(self.axis_index_groups, self.axis_name)

    def init(self, x: jax.Array) -> tuple[BatchNormParams, BatchNormState]:
        """Weights and running statistics for inputs shaped like `x` (float32 for low precision)."""
        _check_x(x)
        features = _feature_axes(jnp.ndim(x), self.feature_axis)
        shape = tuple(jnp.shape(x)[a] for a in features)
        dtype = _core.compute_dtype(jnp.result_type(x))
        zeros, ones = jnp.zeros(shape, dtype), jnp.ones(shape, dtype)
        return BatchNormParams(ones, zeros), BatchNormState(zeros, ones)

    def apply(
        self,
        params: BatchNormParams,
        state: BatchNormState,
        x: jax.Array,
        *,
        training: bool = True,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, BatchNormState]:
        """(Zhat, new state). `training` is a Python bool (it selects the computation).

        `mask` (booleans broadcastable to `x`) selects the values whose batch statistics are
        used and averaged into the running ones, as in `batch_norm`; evaluation ignores it, as
        Flax does (the running statistics are used for every value).
        """
        if training:
            y, mean, var = _normalize_checked(
                x,
                params.scale,
                params.offset,
                self.feature_axis,
                self.eps,
                self.eps_in_sqrt,
                self.axis_name,
                mask,
                self.axis_index_groups,
            )
            batch = BatchNormState(jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var))
            return y, running_average_update(state, batch, self.momentum)
        return self._evaluate(params, state, x), state

    def _evaluate(self, params, state, x):
        """Zhat = G (Z - mu_run) / s(sigma_run^2) + B, plain jnp (autodiff is exact here)."""
        _check_x(x)
        features = _feature_axes(jnp.ndim(x), self.feature_axis)
        keep_shape = tuple(n if a in features else 1 for a, n in enumerate(jnp.shape(x)))
        feature_shape = tuple(jnp.shape(x)[a] for a in features)
        named = {"scale": params.scale, "offset": params.offset, "state.mean": state.mean, "state.var": state.var}
        for name, value in named.items():
            _check_features(name, value, feature_shape, jnp.shape(x), features)
        dtype = _core.compute_dtype(jnp.result_type(x))

        def per_feature(v):
            return v.reshape(keep_shape).astype(dtype)

        _, s = _denominator(per_feature(state.var), _check_eps(self.eps), self.eps_in_sqrt)
        gain = per_feature(params.scale) * _safe_inverse(s)
        y = (x.astype(dtype) - per_feature(state.mean)) * gain + per_feature(params.offset)
        return y.astype(x.dtype)
