"""Sharded jit on 8 CPU devices: state and updates keep the params' NamedSharding, values match one device.

`grouped` is run with its sharded leaf kept large: its updates keep the sharding, its values match.
It is also run with small leaves of every sharding (GROUPED_SPECS) on a mesh with explicit axes
(jax.make_mesh's default) and on one with auto axes, initialized under jit, eagerly and from
ShapeDtypeStructs, which proves:

- no update's sharding changes, and the updates equal the plain optimizer's on one device;
- on explicit axes, leaves are grouped by dtype and sharding: the replicated ones in one flat
  replicated buffer, the ones split along their first dimension in one (shards, n) buffer split
  the same way, and a leaf split along another dimension stays an array of its own; packing
  and unpacking compile to no collective at all;
- abstract init gives the state jax.eval_shape(init, params) describes, shardings included;
- inside shard_map, a leaf that varies over the devices and one that does not are grouped
  apart, so the invariant one's update stays invariant, as the plain optimizer's;
- an init that saw other shardings than update, updates sharded unlike their params, or
  un-reduced gradients of invariant params inside shard_map raise errors that say so.

The 8 devices come from XLA_FLAGS, which must be set before jax is imported, so the check
runs in a subprocess; the rest of the suite keeps its single device.
"""

import json
import math

import pytest

from harness import run_on_eight_devices, tagged_json

# Every factory (the README: state and updates keep the parameters' sharding), and grouped.
NAMES = [
    "sgd",
    "momentum",
    "ema_momentum",
    "rmsprop",
    "rmsprop_centered",
    "adagrad",
    "adadelta",
    "adam",
    "grouped_adam",
]

# Small leaves of every kind, on a 1-d mesh of 8 devices named "x": split along the first
# dimension (w, v), replicated (b, s, r), and split along a later dimension (c). r is shaped as
# c but placed otherwise: on auto axes each must keep its own sharding.
GROUPED_SHAPES = {"w": [16, 4], "v": [24], "b": [5], "s": [], "c": [3, 8], "r": [3, 8]}
GROUPED_SPECS = {"w": ["x", None], "v": ["x"], "b": [], "s": [], "c": [None, "x"], "r": []}
GROUPED_RUNS = ["explicit jit", "explicit eager", "explicit abstract", "auto jit", "auto abstract"]
GROUPED_CONFIG = {"shapes": GROUPED_SHAPES, "specs": GROUPED_SPECS, "runs": GROUPED_RUNS}

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jstep

assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("x",))
shardings = {"w": NamedSharding(mesh, P("x", None)), "b": NamedSharding(mesh, P())}
rng = np.random.default_rng(0)
params = {"w": rng.normal(size=(64, 16)).astype(np.float32), "b": rng.normal(size=(16,)).astype(np.float32)}
grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(3)]
make = {
    "sgd": lambda: jstep.sgd(0.05),
    "adam": lambda: jstep.adam(0.01),
    "momentum": lambda: jstep.momentum(0.05, 0.9),
    "rmsprop_centered": lambda: jstep.rmsprop(0.01, centered=True, momentum=0.9),
    "rmsprop": lambda: jstep.rmsprop(0.01),
    "adagrad": lambda: jstep.adagrad(0.1),
    "adadelta": lambda: jstep.adadelta(),
    "ema_momentum": lambda: jstep.ema_momentum(0.5),
    # The sharded w (1024 values) stays an array of its own, the replicated b is grouped; the
    # packed state is not shaped like the params, so only the updates' shardings are checked.
    "grouped_adam": lambda: jstep.grouped(jstep.adam(0.01), max_leaf_size=100),
}

def put(tree, sharded):
    if sharded:
        return jax.tree.map(jax.device_put, tree, shardings)
    return jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), tree)

def param_shaped_fields(state):
    # Every tree in the state shaped like the params (a state may be a tuple of states: a chain).
    is_dict = lambda t: isinstance(t, dict)
    return {str(i): t for i, t in enumerate(t for t in jax.tree.leaves(state, is_leaf=is_dict) if is_dict(t))}

def check(tree, where, problems):
    def one(path, leaf):
        want = shardings[path[0].key]
        if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
            problems.append(f"{where}{jax.tree_util.keystr(path)}: {leaf.sharding} (params: {want})")
    jax.tree_util.tree_map_with_path(one, tree)

def trajectory(opt, sharded, problems, state_like_params):
    fields = param_shaped_fields if state_like_params else lambda state: {}
    state = jax.jit(opt.init)(put(params, sharded))
    if sharded:
        for f, tree in fields(state).items():
            check(tree, f"init state.{f}", problems)
    update = jax.jit(opt.update)
    out = []
    for t, g in enumerate(grads):
        updates, state = update(put(g, sharded), state)
        if sharded:
            check(updates, f"step {t} updates", problems)
            for f, tree in fields(state).items():
                check(tree, f"step {t} state.{f}", problems)
        out.append(jax.device_get((updates, fields(state) if state_like_params else state)))
    return out

report = {}
for name in sys.argv[2:]:
    problems = []
    like = not name.startswith("grouped")
    sharded = trajectory(make[name](), True, problems, like)
    single = trajectory(make[name](), False, [], like)
    diff = max(
        float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
        for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single))
    )
    report[name] = {"problems": problems, "max_relative_difference": diff}

# ------------------------------------------------------ grouped with small sharded leaves
from jax.sharding import AxisType
config = json.loads(sys.argv[1])
SHAPES, SPECS = config["shapes"], {k: P(*v) for k, v in config["specs"].items()}
explicit = jax.make_mesh((8,), ("x",))
auto = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
host_params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
host_grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), host_params) for _ in range(3)]

def mesh_put(tree, mesh):
    return {k: jax.device_put(x, NamedSharding(mesh, SPECS[k])) for k, x in tree.items()}

def abstract(mesh, sharded=True):
    return {k: jax.ShapeDtypeStruct(SHAPES[k], jnp.float32, sharding=NamedSharding(mesh, SPECS[k]) if sharded else None)
            for k in SHAPES}

def spec_of(sharding, ndim):
    # The sharding's spec padded to ndim, or None for no sharding or one device.
    if not isinstance(sharding, NamedSharding) or not sharding.mesh.axis_names:
        return None
    return list(tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec)))

def packed_layout(state):
    # Adam's packed moments: path -> [shape, spec].
    return {f"{field}{jax.tree_util.keystr(path)}": [list(leaf.shape), spec_of(leaf.sharding, leaf.ndim)]
            for field in ("mu", "nu") for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(state, field))[0]}

def one_device_updates():
    opt = jstep.adam(0.01)
    state, update, out = opt.init(host_params), jax.jit(opt.update), []
    for g in host_grads:
        updates, state = update(g, state, host_params)
        out.append(jax.device_get(updates))
    return out

def grouped_run(mesh, init, jitted):
    opt = jstep.grouped(jstep.adam(0.01))
    params = mesh_put(host_params, mesh)
    state = {"jit": jax.jit(opt.init), "eager": opt.init, "abstract": lambda p: opt.init(abstract(mesh))}[init](params)
    layout = packed_layout(state)
    update = jax.jit(opt.update) if jitted else opt.update
    problems, out = [], []
    for t, g in enumerate(host_grads):
        updates, state = update(mesh_put(g, mesh), state, params)
        problems += [f"step {t} update {k}: {u.sharding.spec} (param: {params[k].sharding.spec})"
                     for k, u in updates.items() if not u.sharding.is_equivalent_to(params[k].sharding, u.ndim)]
        out.append(jax.device_get(updates))
    diff = max(float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
               for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(one_device_updates()), strict=True))
    return {"problems": problems, "max_relative_difference": diff, "layout": layout}

def collectives(opt, mesh):
    # How many collectives the compiled jitted update has (packing should need none).
    params = mesh_put(host_params, mesh)
    text = jax.jit(opt.update).lower(params, jax.jit(opt.init)(params), params).compile().as_text()
    ops = ("all-gather", "all-to-all", "all-reduce", "collective-permute", "reduce-scatter")
    return sum(text.count(op) for op in ops)

def error_of(call):
    try:
        call()
    except ValueError as e:
        return str(e)
    return None

grouped_report = {"make_mesh_axis_types": [t.name for t in explicit.axis_types]}
for name in config["runs"]:
    kind, init = name.split()
    grouped_report[name] = grouped_run(explicit if kind == "explicit" else auto, init, init != "eager")
for kind, mesh in [("explicit", explicit), ("auto", auto)]:
    opt = jstep.grouped(jstep.adam(0.01))
    described, built = jax.eval_shape(opt.init, abstract(mesh)), opt.init(abstract(mesh))
    grouped_report[f"{kind} eval_shape"] = {
        "same_structure": jax.tree.structure(described) == jax.tree.structure(built),
        "same_shapes_and_dtypes": [(d.shape, d.dtype) for d in jax.tree.leaves(described)]
        == [(b.shape, b.dtype) for b in jax.tree.leaves(built)],
        "described": packed_layout(described),
    }
grouped_report["collectives"] = {
    "grouped": collectives(jstep.grouped(jstep.adam(0.01)), explicit),
    "plain": collectives(jstep.adam(0.01), explicit),
}
opt = jstep.grouped(jstep.adam(0.01))
params = mesh_put(host_params, explicit)
grouped_report["errors"] = {
    "init_without_shardings": error_of(
        lambda: jax.jit(opt.update)(params, opt.init(abstract(explicit, sharded=False)), params)),
    "updates_replicated": error_of(
        lambda: jax.jit(opt.update)(jax.device_put(host_params, NamedSharding(explicit, P())), opt.init(params), params)
    ),
}

# Inside shard_map: a (varying, per-device) and b (invariant) take one Adam step there.
def shard_map_step(make, reduced=True):
    groups = []
    def step(a, b, ga, gb):
        params, grads = {"a": a, "b": b}, {"a": ga, "b": gb if reduced else jax.lax.pcast(gb, "x", to="varying")}
        opt = make()
        state = opt.init(params)
        groups.append(sorted(state.mu["groups"]) if "groups" in state.mu else None)
        updates, _ = opt.update(grads, state, params)
        return updates["a"], updates["b"]
    mapped = jax.shard_map(step, mesh=explicit, in_specs=(P("x"), P(), P("x"), P()), out_specs=(P("x"), P()))
    values = (host_params["w"], host_params["b"], host_grads[0]["w"], host_grads[0]["b"])
    args = [jax.device_put(x, NamedSharding(explicit, spec)) for x, spec in zip(values, (P("x"), P(), P("x"), P()))]
    return jax.device_get(jax.jit(mapped)(*args)), groups

(grouped_a, grouped_b), groups = shard_map_step(lambda: jstep.grouped(jstep.adam(0.01)))
(plain_a, plain_b), _ = shard_map_step(lambda: jstep.adam(0.01))
grouped_report["shard_map"] = {
    "groups": groups[0],
    "max_relative_difference": max(
        float(np.max(np.abs(g - p)) / np.max(np.abs(p))) for g, p in [(grouped_a, plain_a), (grouped_b, plain_b)]
    ),
}
grouped_report["errors"]["varying_updates"] = error_of(
    lambda: shard_map_step(lambda: jstep.grouped(jstep.adam(0.01)), reduced=False))
report["grouped"] = grouped_report
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def report():
    return tagged_json(run_on_eight_devices(SCRIPT, json.dumps(GROUPED_CONFIG), *NAMES), "REPORT")


@pytest.mark.parametrize("name", NAMES)
def test_state_and_updates_keep_the_params_sharding(report, name):
    assert report[name]["problems"] == []


@pytest.mark.parametrize("name", NAMES)
def test_sharded_values_equal_the_single_device_run(report, name):
    assert report[name]["max_relative_difference"] <= 1e-6


# ------------------------------------------------------ grouped with small sharded leaves


def padded_spec(name):
    """GROUPED_SPECS[name] with one entry per dimension (None: not split)."""
    return GROUPED_SPECS[name] + [None] * (len(GROUPED_SHAPES[name]) - len(GROUPED_SPECS[name]))


def size(name):
    return math.prod(GROUPED_SHAPES[name])


def expected_explicit_layout():
    """Adam's packed moments on explicit axes, derived from GROUPED_SHAPES and GROUPED_SPECS."""
    names = sorted(GROUPED_SPECS)  # the order of the leaves in the flattened dict
    replicated = [k for k in names if all(e is None for e in padded_spec(k))]
    first_only = [k for k in names if padded_spec(k)[:1] == ["x"] and all(e is None for e in padded_spec(k)[1:])]
    others = [k for k in names if k not in replicated + first_only]
    layout = {}
    for field in ("mu", "nu"):
        layout[f"{field}['groups']['float32']"] = [[sum(map(size, replicated))], [None]]
        layout[f"{field}['groups']['float32@x']"] = [[8, sum(map(size, first_only)) // 8], ["x", None]]
        for i, k in enumerate(others):
            layout[f"{field}['large'][{i}]"] = [GROUPED_SHAPES[k], padded_spec(k)]
    return layout


def test_make_mesh_defaults_to_explicit_axes(report):
    """So the explicit runs below are what a user of jax.make_mesh gets by default."""
    assert report["grouped"]["make_mesh_axis_types"] == ["Explicit"]


@pytest.mark.parametrize("run", GROUPED_RUNS)
def test_grouped_updates_keep_every_leaf_sharding(report, run):
    assert report["grouped"][run]["problems"] == []


@pytest.mark.parametrize("run", GROUPED_RUNS)
def test_grouped_sharded_updates_equal_the_plain_optimizer_on_one_device(report, run):
    assert report["grouped"][run]["max_relative_difference"] <= 1e-6


@pytest.mark.parametrize("run", ["explicit jit", "explicit eager", "explicit abstract"])
def test_grouped_by_dtype_and_sharding_on_explicit_axes(report, run):
    assert report["grouped"][run]["layout"] == expected_explicit_layout()


@pytest.mark.parametrize("run", ["auto jit", "auto abstract"])
def test_grouped_by_dtype_only_on_auto_axes(report, run):
    """Under jit the type of an array on auto axes has no sharding: one group per dtype."""
    layout = report["grouped"][run]["layout"]
    assert sorted(layout) == ["mu['groups']['float32']", "nu['groups']['float32']"]
    assert all(shape == [sum(map(size, GROUPED_SHAPES))] for shape, _ in layout.values())
    if run == "auto abstract":  # the leaves share a mesh: the group is placed on it, replicated
        assert all(spec == [None] for _, spec in layout.values())


def test_grouped_abstract_init_is_what_eval_shape_describes(report):
    for kind in ("explicit", "auto"):
        checks = report["grouped"][f"{kind} eval_shape"]
        assert checks["same_structure"] and checks["same_shapes_and_dtypes"], kind
    # On explicit axes eval_shape describes the shardings too, and init builds them.
    assert report["grouped"]["explicit eval_shape"]["described"] == expected_explicit_layout()


def test_grouped_packing_moves_no_data_between_devices(report):
    assert report["grouped"]["collectives"] == {"grouped": 0, "plain": 0}


def test_grouped_init_of_other_shardings_is_refused(report):
    message = report["grouped"]["errors"]["init_without_shardings"]
    assert message is not None and "init packed the params into the groups ['float32']" in message
    assert "['float32', 'float32@x']" in message and "dtypes and shardings" in message


def test_grouped_updates_sharded_unlike_their_params_are_refused(report):
    message = report["grouped"]["errors"]["updates_replicated"]
    first = next(k for k in sorted(GROUPED_SPECS) if any(padded_spec(k)))  # the first leaf checked that differs
    spec = ", ".join(repr(e) for e in padded_spec(first))
    assert message is not None and f"updates leaf ['{first}'] is sharded as P(" in message
    assert f"but its param as P({spec})" in message and "jax.sharding.reshard" in message


def test_grouped_inside_shard_map_keeps_invariant_leaves_invariant(report):
    """A leaf that varies over the devices and one that does not go to separate groups, so the
    invariant one's update can leave shard_map replicated (out_specs P()), as the plain step's."""
    assert report["grouped"]["shard_map"]["groups"] == ["float32", "float32~x"]
    assert report["grouped"]["shard_map"]["max_relative_difference"] <= 1e-6


def test_grouped_unreduced_gradients_of_invariant_params_are_refused(report):
    message = report["grouped"]["errors"]["varying_updates"]
    assert message is not None and "updates leaf ['b'] varies over the manual axes ('x',)" in message
    assert "jax.lax.pmean" in message
