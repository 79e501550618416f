"""The sums across mapped axes that every normalization's statistics and derivatives share.

A batch may be split across devices (``shard_map``/``pmap`` axes) and across vmapped examples
(``jax.vmap(..., axis_name=...)`` axes); `_all_reduce` sums a per-feature value over all of
them (within ``axis_index_groups`` where given), so each shard sees the whole batch's sums.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax

Groups = tuple[tuple[int, ...], ...]


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
    `scale`'s per-example gradients are summed by vmap's transpose of its broadcast.
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
    """psum of `value` (a pytree) over every axis in `axis_name`: the mesh axes, within each of
    `groups` (then `axis_name` holds mesh axes only: see `_pooled_shards`), then the vmap axes.

    In that order the sums transpose (reverse mode transposes the tangent maps that call this):
    the vmap axes' untyped sum (`_sum_over_vmap_axes`) then takes and gives values that vary
    over no mesh axis, where, taken first, it would drop the "varying over the mesh" type of
    its operand, and its transpose would give a cotangent without it.
    """
    mesh_axes, vmap_axes = _split_axis_name(axis_name)
    if mesh_axes:
        value = _psum_within(_per_device(value, mesh_axes), mesh_axes, groups)
    if vmap_axes:
        value = _sum_over_vmap_axes(value, vmap_axes)
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
    batch dimension. Its transpose is the same sum (psum is transposed as psum + broadcast),
    which is the sum over the examples' losses that reverse mode wants.
    """
    if not jax.sharding.get_abstract_mesh().manual_axes:
        return jax.lax.psum(value, vmap_axes)
    from jax._src.lax.parallel import psum_p  # no public untyped psum (see above)

    return jax.tree.map(lambda leaf: psum_p.bind(leaf, axes=vmap_axes, axis_index_groups=None), value)


VmapAxes = tuple[tuple[Any, int], ...]


def _vmap_axis_sizes(axis_name: Any) -> VmapAxes:
    """The vmap axes of `axis_name` with their sizes, read where the call is traced (inside the vmap)."""
    if axis_name is None:
        return ()
    _, vmap_axes = _split_axis_name(axis_name)
    return tuple((name, jax.lax.axis_size(name)) for name in vmap_axes)


@contextlib.contextmanager
def _vmap_axes_bound(vmap_axes: VmapAxes) -> Iterator[None]:
    """Within, the names of `vmap_axes` are bound, as inside their ``jax.vmap``.

    JAX (0.10) traces a ``custom_jvp`` rule lazily, when a transformation outside a ``jit``,
    ``scan``, ``cond`` or ``checkpoint`` (``jax.grad(jax.jit(f))``) asks for the derivative, and
    by then the vmap has returned: the rule runs on the vmap's batched values but its axis
    names are unbound (NameError: unbound axis name), so its sums over them would fail. The
    names are bound again here, with the sizes read at the call (`_vmap_axis_sizes`).
    """
    from jax._src import core  # no public way to bind an axis name (see above)

    bound = getattr(core, "get_axis_env", None)
    missing = [(name, size) for name, size in vmap_axes if bound is not None and not bound().axis_exists(name)]
    if not missing:  # none, or a JAX without these internals: the rule runs as it is
        yield
        return
    with core.extend_axis_env_nd(missing):
        yield


def _rebinding_vmap_axes(rule: Callable[..., Any]) -> Callable[..., Any]:
    """A ``custom_jvp`` rule whose first argument has ``.vmap_axes``, run with those axes bound
    (`_vmap_axes_bound`), so that its sums across vmapped examples also work when JAX traces it
    after the vmap has returned."""

    @functools.wraps(rule)
    def bound(settings: Any, *rest: Any) -> Any:
        with _vmap_axes_bound(settings.vmap_axes):
            return rule(settings, *rest)

    return bound


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
