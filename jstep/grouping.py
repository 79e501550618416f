"""Grouped leaves: run an elementwise transformation on a few flat buffers instead of many arrays.

Every rule in the notes acts on each weight j on its own (W_j, g_j, m_j, v_j, ...), so it
gives the same numbers whether the weights are stored as many arrays or as one long vector.
On a jitted step each array costs a fixed price besides its bytes (a kernel launch, a buffer
to allocate, donate and hand back), and on a tree of many small leaves that price dominates.
`grouped` packs the leaves with at most `max_leaf_size` elements into one buffer per dtype
and sharding, runs `transformation` on the packed tree, and unpacks its updates:

    packed = {"groups": {group name: concatenation of the small leaves of that dtype and sharding},
              "large": (each larger leaf, and each leaf whose sharding a group cannot keep, as it is)}

    opt = jstep.grouped(jstep.adam(1e-3))   # the updates of jstep.adam(1e-3), leaf for leaf

The state is the inner transformation's state over the packed tree: Adam's m and v of all
small float32 leaves are one buffer each. Use it with transformations that treat each
element on its own (every jstep optimizer, Optax's scale_by_* and their aliases). The packed
tree (`Packed`) remembers the tree it packs: `update` checks the gradients against it, with
the plain optimizers' errors, and ``jstep.adamw``'s mask is resolved on it, so it decays the
weights it decays unwrapped. A transformation that reads the tree's structure otherwise (a
mask or labels of ``optax.masked``, ``optax.multi_transform``, ``optax.adamw``; per-leaf
norms) would see the packed tree: compose it the other way round,
``optax.masked(jstep.grouped(inner), mask)``. `init` refuses one whose state shows it.

Shardings. A leaf's sharding is read from its type, `jax.typeof(leaf).sharding`, which is
the same eagerly, under `jit` and for a `jax.ShapeDtypeStruct`, so `init` and `update` always
agree on the packing:

- On a mesh with explicit axes (`jax.make_mesh`'s default) the type names the mesh axes each
  dimension is split over. Replicated leaves share the group named by their dtype
  ("float32"), a flat concatenation, replicated too. Leaves split over mesh axes A along their
  first dimension only share the group "float32@A" (e.g. "float32@x"), a buffer of shape
  (shards, n) split over A along its rows: row k holds every leaf's k-th shard, so packing
  and unpacking move no data between devices. A leaf split in any other way (over a later
  dimension, or a first dimension the shards do not divide) stays an array of its own.
- On a mesh with auto axes (or one device) the type does not carry the sharding (under `jit`
  it is not known until XLA compiles the step), so the small leaves are grouped by dtype
  only, eagerly and under `jit` alike. Each update is then pinned to its gradient's sharding
  (`jax.experimental.shard_alike`), so no leaf's sharding changes, but a small sharded leaf
  in a group makes XLA gather it: keep sharded leaves above `max_leaf_size` there, or use
  explicit axes.
- Inside `shard_map` the type also says over which manual axes a value varies from device to
  device; leaves that vary over different axes go to different groups ("float32~x" varies
  over x), so an update that was the same on every device stays so.
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.shard_alike import shard_alike
from jax.experimental.xla_metadata import set_xla_metadata
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jstep import _core, quantization

# Per dimension of a leaf, the explicit mesh axes it is split over (() where it is not).
Spec = tuple[tuple[str, ...], ...]


class Placement(NamedTuple):
    """Where a leaf lives, as far as its type says (the same eagerly, under jit and for a ShapeDtypeStruct)."""

    typed: bool  # the type carries the sharding: the leaf is on a mesh with explicit axes
    spec: Spec
    varying: tuple[str, ...]  # inside shard_map: the manual axes over which the value differs


class Group(NamedTuple):
    """One packed buffer: leaves of one dtype and placement, the first dimension split over `axes`."""

    dtype: str
    axes: tuple[str, ...]  # () for replicated leaves (or, on auto axes, leaves of unknown sharding)
    shards: int  # product of the sizes of `axes`: the buffer is (shards, n), or flat (n,) for axes ()
    varying: tuple[str, ...]

    @property
    def name(self) -> str:
        split = f"@{','.join(self.axes)}" if self.axes else ""
        varying = f"~{','.join(self.varying)}" if self.varying else ""
        return self.dtype + split + varying


class Layout(NamedTuple):
    """Where each leaf of a tree goes in its packed form (static: shapes, dtypes and placements only)."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    placements: tuple[Placement, ...]
    places: tuple[tuple[str, int], ...]  # ("large", index) or (group name, offset in its rows)
    groups: dict[str, Group]


class Signature(NamedTuple):
    """The tree a packed form packs (static): its structure, its leaves' shapes and places."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    places: tuple[tuple[str, int], ...]


class _PackedFields(NamedTuple):
    groups: dict[str, Any]
    large: tuple[Any, ...]


class Packed(_PackedFields):
    """The packed form of a tree, ``{"groups": {name: buffer}, "large": (leaf, ...)}``, that
    remembers the tree it packs.

    Read like a dict (``packed["groups"]``). Its `signature` (the user's tree structure, leaf
    shapes and places) is static pytree data: every tree the inner transformation derives
    from it (Adam's m and v, its updates) carries it too, so `grouped` checks the updates
    against the tree `init` saw, as the plain optimizers check them against their state, and
    a structure-dependent rule (``jstep.adamw``'s mask) resolves itself on the user's tree
    (`unpacked_shapes`) and spreads the per-leaf result over the buffers (`spread`).

    A named tuple, so that ``flax.serialization`` writes and restores it as the dict
    ``{"groups": ..., "large": ...}`` it always wrote; restored so, it has no signature until
    the next update gives it one (`as_packed`).
    """

    signature: Signature | None

    def __new__(cls, groups: dict[str, Any], large: tuple[Any, ...], signature: Signature | None = None) -> Packed:
        packed = super().__new__(cls, groups, large)
        packed.signature = signature
        return packed

    def __getitem__(self, key: Any) -> Any:  # packed["groups"], as a dict
        return getattr(self, key) if isinstance(key, str) else super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        return key in self._fields

    def __repr__(self) -> str:
        return repr({"groups": self.groups, "large": self.large})

    def unpacked_shapes(self) -> Any:
        """The user's tree as ``jax.ShapeDtypeStruct`` leaves (shapes and dtypes, no values)."""
        assert self.signature is not None, "packed by grouped, so it has a signature"
        leaves = []
        for shape, (name, where) in zip(self.signature.shapes, self.signature.places, strict=True):
            buffer = self.large[where] if name == "large" else self.groups[name]
            leaves.append(jax.ShapeDtypeStruct(shape, jnp.result_type(buffer)))
        return jax.tree.unflatten(self.signature.treedef, leaves)

    def spread(self, per_leaf: Any) -> Packed:
        """`per_leaf` (a Python scalar per leaf of the user's tree) in the packed form: each
        group's buffer of the values of its members' elements (a scalar where they agree)."""
        assert self.signature is not None, "packed by grouped, so it has a signature"
        treedef: Any = self.signature.treedef  # PyTreeDef: its methods are untyped
        values = treedef.flatten_up_to(per_leaf)
        runs: dict[str, list[tuple[int, int, Any]]] = {name: [] for name in self.groups}
        large = []
        for value, shape, (name, where) in zip(values, self.signature.shapes, self.signature.places, strict=True):
            if name == "large":
                large.append(value)
            else:
                buffer = self.groups[name]
                runs[name].append((where, math.prod(shape) // (buffer.shape[0] if buffer.ndim == 2 else 1), value))
        groups = {name: _spread_runs(sorted(parts), self.groups[name]) for name, parts in runs.items()}
        return Packed(groups, tuple(large), self.signature)


def _spread_runs(parts: list[tuple[int, int, Any]], buffer: Any) -> Any:
    """The values of a group's members (offset, length per row, value) over its buffer's rows:
    one broadcast scalar per run of equal values, the value itself where all agree."""
    runs: list[tuple[int, Any]] = []
    for _, length, value in parts:
        if runs and runs[-1][1] == value:
            runs[-1] = (runs[-1][0] + length, value)
        else:
            runs.append((length, value))
    if len(runs) == 1:
        return runs[0][1]
    row = jnp.concatenate([jnp.full((length,), value) for length, value in runs])
    return row if buffer.ndim == 1 else row[None, :]


def _unflatten_packed(signature: Signature | None, children: Any) -> Packed:
    groups, large = children
    return Packed(groups, large, signature)


jax.tree_util.register_pytree_with_keys(
    Packed,
    lambda p: (
        ((jax.tree_util.DictKey("groups"), p.groups), (jax.tree_util.DictKey("large"), p.large)),
        p.signature,
    ),
    _unflatten_packed,
    flatten_func=lambda p: ((p.groups, p.large), p.signature),
)


def placement_of(leaf: Any) -> Placement:
    """The placement of `leaf` that its type carries (on auto axes: none, under jit as eagerly)."""
    aval = jax.typeof(leaf)
    mesh = aval.sharding.mesh
    explicit = {name for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True) if kind == AxisType.Explicit}
    entries = tuple(aval.sharding.spec) + (None,) * (np.ndim(leaf) - len(aval.sharding.spec))

    def axes(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        return tuple(name for name in names if name in explicit)

    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; `vma` before
    varying = manual.varying if manual is not None else getattr(aval, "vma", ())
    return Placement(bool(explicit), tuple(axes(entry) for entry in entries), tuple(sorted(varying)))


def partition_spec(spec: Spec) -> PartitionSpec:
    """`spec` written as the PartitionSpec users know, e.g. P('x', None)."""
    return PartitionSpec(*(None if not axes else axes[0] if len(axes) == 1 else axes for axes in spec))


def group_of(leaf: Any, placement: Placement, dtype: str) -> Group | None:
    """The group `leaf` joins, or None where a flat or (shards, n) buffer cannot keep its sharding."""
    spec, varying = placement.spec, placement.varying
    if not any(spec):
        return Group(dtype, (), 1, varying)
    first, rest = spec[0], spec[1:]
    if not first or any(rest):
        return None
    mesh = jax.typeof(leaf).sharding.mesh
    shards = math.prod(mesh.shape[name] for name in first)
    return Group(dtype, first, shards, varying) if np.shape(leaf)[0] % shards == 0 else None


def layout_of(tree: Any, max_leaf_size: int | None) -> Layout:
    """The packing of `tree`: leaves of at most `max_leaf_size` elements go to their dtype and sharding's group."""
    leaves, treedef = jax.tree.flatten(tree)
    shapes = tuple(tuple(np.shape(leaf)) for leaf in leaves)
    placements = tuple(placement_of(leaf) for leaf in leaves)
    groups: dict[str, Group] = {}
    ends: dict[str, int] = {}  # the next free place of each group, and of "large"
    places: list[tuple[str, int]] = []
    for leaf, shape, placement in zip(leaves, shapes, placements, strict=True):
        small = max_leaf_size is None or math.prod(shape) <= max_leaf_size
        group = group_of(leaf, placement, jnp.result_type(leaf).name) if small else None
        if group is None:
            name, length = "large", 1
        else:
            name, length = group.name, math.prod(shape) // group.shards
            groups[name] = group
        places.append((name, ends.get(name, 0)))
        ends[name] = places[-1][1] + length
    return Layout(treedef, shapes, placements, tuple(places), groups)


def as_rows(leaf: Any, group: Group) -> jax.Array:
    """`leaf` as its group stores it: flat, or (shards, n) with row k on the devices of shard k."""
    if not group.axes:
        return jnp.ravel(leaf)
    rows = NamedSharding(jax.typeof(leaf).sharding.mesh, PartitionSpec(group.axes, None))
    return jax.lax.reshape(leaf, (group.shards, np.size(leaf) // group.shards), out_sharding=rows)


def abstract_group(members: list[Any], group: Group) -> jax.ShapeDtypeStruct:
    """The packed buffer of `members` as a ShapeDtypeStruct: on the members' mesh where they share
    one, split as its group's leaves are (replicated for a group of axes ()), else with no sharding."""
    n = sum(math.prod(np.shape(m)) for m in members) // group.shards
    shape = (group.shards, n) if group.axes else (n,)
    meshes = {getattr(getattr(m, "sharding", None), "mesh", None) for m in members}
    mesh = meshes.pop() if len(meshes) == 1 else None
    sharding = (
        None if mesh is None else NamedSharding(mesh, PartitionSpec(group.axes or None, *([None] * (len(shape) - 1))))
    )
    return jax.ShapeDtypeStruct(shape, jnp.result_type(*members), sharding=sharding)


def join(members: list[Any], group: Group) -> Any:
    """One group's buffer: the members' rows concatenated (abstractly, if any member is a ShapeDtypeStruct)."""
    if any(isinstance(m, jax.ShapeDtypeStruct) for m in members):
        return abstract_group(members, group)
    rows = [as_rows(m, group) for m in members]
    return rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=-1)


def pack(tree: Any, layout: Layout) -> Packed:
    """The packed form of `tree`: its small leaves concatenated per group, its large ones kept."""
    members: dict[str, list[Any]] = {name: [] for name in layout.groups}
    large = []
    for leaf, (name, _) in zip(jax.tree.leaves(tree), layout.places, strict=True):
        if name == "large":
            large.append(leaf)
        else:
            members[name].append(leaf)
    groups = {name: join(parts, layout.groups[name]) for name, parts in members.items()}
    return Packed(groups, tuple(large), Signature(layout.treedef, layout.shapes, layout.places))


def unpack(packed: Packed, layout: Layout) -> Any:
    """The tree that `pack` packed: slices of the groups reshaped, the large leaves as they are."""
    leaves = []
    for shape, (name, where) in zip(layout.shapes, layout.places, strict=True):
        if name == "large":
            leaves.append(packed.large[where])
            continue
        group, buffer = layout.groups[name], packed.groups[name]
        n = math.prod(shape) // group.shards
        if not group.axes:
            leaves.append(jax.lax.slice(buffer, (where,), (where + n,)).reshape(shape))
            continue
        rows = jax.lax.slice(buffer, (0, where), (group.shards, where + n))
        sharding = NamedSharding(
            jax.typeof(buffer).sharding.mesh, PartitionSpec(group.axes, *([None] * (len(shape) - 1)))
        )
        leaves.append(jax.lax.reshape(rows, shape, out_sharding=sharding))
    return jax.tree.unflatten(layout.treedef, leaves)


def pin_to(updates: Any, gradients: Any, layout: Layout) -> Any:
    """Each grouped update given its gradient's sharding where the type does not carry it (auto axes)."""
    pinned = [
        u if name == "large" or placement_of(g).typed else _shard_alike(u, g)
        for u, g, (name, _) in zip(jax.tree.leaves(updates), jax.tree.leaves(gradients), layout.places, strict=True)
    ]
    return jax.tree.unflatten(layout.treedef, pinned)


_pins = itertools.count()  # numbers the `_shard_alike` calls


def _shard_alike(x: jax.Array, like: jax.Array) -> jax.Array:
    """`x` placed as `like` (``shard_alike``), in a sharding group of its own.

    JAX lowers equal equations once per trace and reuses the lowering, so two calls on arrays
    of one shape would share one sharding group, and XLA would give both leaves one sharding
    (a column-split update and a replicated one of the same shape both split, moving data at
    every step). Metadata with a number of its own makes each call an equation of its own,
    also across two grouped optimizers in one step.
    """
    with set_xla_metadata(jstep_pin=next(_pins)):
        return shard_alike(x, like)[0]


def check_same_placements(updates: Any, layout: Layout) -> None:
    """Raise ValueError naming the first update whose type places it otherwise than its param."""
    for (path, leaf), want in zip(jax.tree_util.tree_flatten_with_path(updates)[0], layout.placements, strict=True):
        got = placement_of(leaf)
        if got.typed and got.spec != want.spec:
            problem = f"is sharded as {partition_spec(got.spec)}, but its param as {partition_spec(want.spec)}"
            fix = "give the updates the params' shardings (jax.sharding.reshard)"
        elif got.varying != want.varying:
            problem = f"varies over the manual axes {got.varying}, but its param over {want.varying}"
            fix = "reduce the updates over those axes first (e.g. jax.lax.pmean inside shard_map)"
        else:
            continue
        raise ValueError(
            f"updates leaf {jax.tree_util.keystr(path) or '<root>'} {problem}: grouped packs each update "
            f"as its param and never changes a leaf's placement, so {fix}"
        )


def is_packed(x: Any) -> bool:
    return isinstance(x, Packed) or (isinstance(x, dict) and set(x) == {"groups", "large"})


def without_frozen(params: Any, updates: Any) -> Any:
    """`params` with None where `updates` has None: a leaf without gradient (a frozen part, in
    Equinox's ``optimizer.update(grads, state, eqx.filter(model, eqx.is_array))``) is not
    packed, as the plain optimizers ignore its param. Trees that do not line up are left for
    `check_same_tree` to report."""
    if params is None:
        return None
    try:
        return jax.tree.map(lambda u, p: None if u is None else p, updates, params, is_leaf=lambda u: u is None)
    except ValueError:
        return params


def check_same_tree(updates: Any, state: Any, params: Any) -> None:
    """Raise the plain optimizers' errors when `updates` (or `params`) is not the tree that
    `init` packed into `state`: another structure, or a leaf of another shape."""
    for part in jax.tree.leaves(state, is_leaf=is_packed):
        if isinstance(part, Packed) and part.signature is not None:
            signature = part.signature
            like = jax.tree.unflatten(
                signature.treedef, [jax.ShapeDtypeStruct(s, jnp.float32) for s in signature.shapes]
            )
            _core.check_same_shapes(updates, like)
            if params is not None:
                _core.check_same_shapes(params, like, name="params")
            return
    if params is not None:
        _core.check_same_shapes(updates, params, against="the params")


def as_packed(state: Any, signature: Signature | None) -> Any:
    """`state` with each packed part a `Packed` of `signature`: a state restored as plain dicts
    (e.g. by flax.serialization, which keeps no pytree node types of its own) steps as before."""

    def restore(part):
        restored = is_packed(part) and getattr(part, "signature", None) is None
        return Packed(part["groups"], part["large"], signature) if restored else part

    return jax.tree.map(restore, state, is_leaf=is_packed)


def check_state_matches(state: Any, packed: Packed) -> None:
    """Raise ValueError when `state` was built by init for another packing than `packed`."""
    expected = (sorted(packed.groups), len(packed.large))
    for part in jax.tree.leaves(state, is_leaf=is_packed):
        if is_packed(part) and (sorted(part["groups"]), len(part["large"])) != expected:
            raise ValueError(
                f"grouped: init packed the params into the groups {sorted(part['groups'])} and "
                f"{len(part['large'])} large leaves, but update packs them into {expected[0]} and "
                f"{expected[1]}. Leaves are grouped by dtype and sharding (on an explicit-axes mesh, "
                "the sharding is in the type; inside shard_map, so are the axes a value varies over), "
                "so call init with params of the dtypes and shardings given to update (a "
                "jax.ShapeDtypeStruct carries them in its sharding=)"
            )


def structure_dependent(problem: str) -> ValueError:
    """The error for a transformation that depends on the params' tree structure, with the fix."""
    return ValueError(
        "grouped runs its transformation on the packed tree ({'groups': {...}, 'large': (...)}), not "
        "on the params, and this transformation depends on the params' tree structure (a mask or "
        f"labels, as optax.masked and optax.multi_transform have): {problem}. Put grouped inside it "
        "instead, e.g. optax.masked(jstep.grouped(inner), mask) or "
        "optax.multi_transform({label: jstep.grouped(inner), ...}, labels). (jstep.adamw's mask works "
        "inside grouped: it is resolved on the params' tree.)"
    )


def _elements_by_dtype(state: Any) -> dict[str, int]:
    """The number of state values of each dtype; a `jstep.QuantizedArray` counts as the float32
    values it stands for (its codes and scales depend on how its elements are cut into blocks,
    and a leaf under the format's ``min_size`` is float32 on its own but quantized once packed)."""
    counts: dict[str, int] = {}
    for leaf in jax.tree.leaves(state, is_leaf=quantization.is_quantized):
        if quantization.is_quantized(leaf):
            dtype, size = "float32", leaf.size
        else:
            dtype, size = jnp.result_type(leaf).name, math.prod(np.shape(leaf))
        counts[dtype] = counts.get(dtype, 0) + size
    return counts


def check_leafwise(transformation: Any, params: Any, packed: Packed) -> None:
    """Refuse a `transformation` whose state shows that it depends on the params' tree structure.

    An elementwise rule keeps as many state elements of each dtype for the packed tree as for
    the params (packing moves elements, it neither adds nor drops any). ``optax.masked``
    keeps state only for the elements its mask selects, and a mask evaluated on the packed
    buffers selects others (a mask dict does not even apply to the packed tree); so does
    ``optax.multi_transform`` with its labels. Both states are compared abstractly
    (``jax.eval_shape``), at no cost at run time. A structure-dependent transformation whose
    state does not show it (a mask around a stateless rule) cannot be told apart here;
    `grouped`'s docstring says to put grouped inside it.
    """
    try:
        plain = jax.eval_shape(transformation.init, params)
    except Exception:  # the params themselves are refused: init's own call says why
        return
    try:
        packed_state = jax.eval_shape(transformation.init, packed)
    except (TypeError, ValueError) as error:
        problem = f"its init fails on the packed tree ({type(error).__name__}: {str(error).splitlines()[0]})"
        raise structure_dependent(problem) from error
    plain_counts, packed_counts = _elements_by_dtype(plain), _elements_by_dtype(packed_state)
    if plain_counts != packed_counts:
        problem = f"its state holds {plain_counts} elements for the params but {packed_counts} for the packed tree"
        raise structure_dependent(problem)


def check_max_leaf_size(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"max_leaf_size must be an int >= 0 or None (every leaf), got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"max_leaf_size must be an int >= 0 or None (every leaf), got {value!r}")


def check_transformation(value: Any) -> None:
    if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        raise TypeError(
            "transformation must be an optax.GradientTransformation (init and update), e.g. "
            f"jstep.adam(1e-3), got {type(value).__name__} {value!r}"
        )


def grouped(
    transformation: optax.GradientTransformation, *, max_leaf_size: int | None = 1 << 16
) -> optax.GradientTransformationExtraArgs:
    """`transformation` run on the params' small leaves packed into one buffer per dtype and sharding.

    The updates are those of `transformation` on the unpacked tree for an elementwise rule
    such as every jstep optimizer (u_j depends on g_j and the state of j only), up to the
    last bits: XLA may compile the same arithmetic differently for arrays of other lengths.
    An 8- or 4-bit state format (``jstep.blockwise``) is not elementwise: it quantizes the
    packed buffer as one array, with blocks that run across leaves (a bias shares its block's
    scale with its neighbours' weights) and the small leaves that ``min_size`` keeps in float32
    unwrapped quantized with the rest, so its updates and its bytes differ from the plain
    optimizer's.

    Args:
      transformation: an elementwise ``optax.GradientTransformation`` (extra keyword
        arguments of ``update``, such as ``value=loss``, are passed on to it; a plain
        ``GradientTransformation`` ignores them).
      max_leaf_size: leaves with at most this many elements (all shards together) are
        grouped; larger leaves stay arrays of their own (concatenating them would copy many
        bytes to save one array). ``None`` groups every leaf.

    The state holds the same bytes as the plain transformation's (with float or no state
    dtypes); the step needs one scratch buffer the size of the grouped gradients (their packed
    copy). ``init`` accepts ``jax.ShapeDtypeStruct`` leaves and gives the state
    ``jax.eval_shape(init, params)`` describes, each buffer placed by its group's sharding where
    the leaves carry one.

    The leaves are grouped by the dtypes and shardings of the params given to ``init`` and
    ``update``; call ``update`` with ``params`` when the gradients' dtypes differ from the
    params'. No leaf's sharding changes:

    - on an explicit-axes mesh, replicated leaves form one flat group per dtype, and leaves
      split over the same mesh axes along their first dimension only form a group of shape
      (shards, n) split the same way, so packing moves no data between devices; any other
      sharded leaf stays an array of its own;
    - on an auto-axes mesh the sharding of a traced array is unknown, so leaves are grouped
      by dtype only and each update is pinned to its gradient's sharding; a small sharded
      leaf is then gathered for its group, so keep sharded leaves above ``max_leaf_size``;
    - inside ``shard_map``, leaves that vary over different manual axes are grouped apart.

    A state that ``init`` built for another packing, or updates placed otherwise than their
    params, raise a ``ValueError`` that says so; so do updates (or params) of another tree
    structure or leaf shapes than ``init`` packed, with the plain optimizers' messages.

    Flax NNX. Params in NNX Variables (``nnx.Param``, as ``nnx.split`` gives them) are packed
    without them, so ``grouped`` works in ``nnx.Optimizer`` (which calls ``update`` on pure
    trees) and in a functional NNX loop alike; there the updates come back in the gradients'
    wrappers, and a mask of ``jstep.adamw`` inside is resolved on the params without them.

    Masks and labels. ``jstep.adamw``'s mask works inside: it is resolved on the params' tree
    (its leaves as ``jax.ShapeDtypeStruct``, as under ``jax.eval_shape``) and spread over the
    buffers. A transformation of another library that reads the tree's structure
    (``optax.masked``, ``optax.multi_transform``, ``optax.adamw(mask=...)``) must go outside:
    ``optax.masked(jstep.grouped(inner), mask)``, ``optax.multi_transform({label:
    jstep.grouped(inner)}, labels)``. ``init`` refuses one whose state (compared abstractly
    on the params and on the packed tree) shows it reads the structure, with that advice; one
    whose state does not (a mask around a stateless rule, as in ``optax.adamw``) it cannot
    tell apart.

    Example:
      The updates are Adam's; its m and v for the three small leaves live in one buffer each:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jstep
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2), "scale": jnp.ones(2)}
      >>> grads = {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.array([0.5, -1.0]), "scale": jnp.array([2.0, 0.1])}
      >>> plain, packed = jstep.adam(0.1), jstep.grouped(jstep.adam(0.1))
      >>> updates, _ = plain.update(grads, plain.init(params))
      >>> packed_updates, state = packed.update(grads, packed.init(params))
      >>> print(jax.tree.all(jax.tree.map(jnp.allclose, updates, packed_updates)))
      True
      >>> print(jax.tree.map(jnp.shape, state.mu))
      {'groups': {'float32': (10,)}, 'large': ()}
    """
    check_transformation(transformation)
    check_max_leaf_size(max_leaf_size)
    inner = optax.with_extra_args_support(transformation)

    def init(params):
        _core.check_floating_leaves(params)
        # Packed as update packs them: Flax NNX params without their Variables (nnx.Optimizer
        # calls update on pure trees, a functional loop on wrapped ones; update unwraps both).
        params = _core.without_variables(params)
        packed = pack(params, layout_of(params, max_leaf_size))
        check_leafwise(inner, params, packed)
        return inner.init(packed)

    @_core.sees_through_variables
    def update(updates, state, params=None, **extra_args):
        params = without_frozen(params, updates)
        check_same_tree(updates, state, params)
        # Grouped as at init: by the params' dtypes and shardings where given (gradients may
        # differ in dtype, e.g. float32 gradients of bfloat16 params); each update keeps its own.
        layout = layout_of(updates if params is None else params, max_leaf_size)
        if params is not None:
            check_same_placements(updates, layout)
        packed_updates = pack(updates, layout)
        check_state_matches(state, packed_updates)
        state = as_packed(state, packed_updates.signature)
        packed_params = None if params is None else pack(params, layout)
        packed_updates, state = inner.update(packed_updates, state, packed_params, **extra_args)
        return _core.cast_like(pin_to(unpack(packed_updates, layout), updates, layout), updates), state

    return optax.GradientTransformationExtraArgs(init, update)
