"""jstep.optax against Optax 0.2.8: signatures, numbers over many steps, state trees, checkpoints.

Swapping ``optax.X(...)`` for ``jstep.optax.X(...)`` must change nothing a program can see: the
same arguments, the same updates (to float32 rounding), the same state tree (NamedTuple classes,
nesting, field names, shapes and dtypes), and checkpoints that restore across the two with
`flax.serialization` and orbax and then continue as an uninterrupted run.
"""

import inspect
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jstep
import jstep.optax

from harness import flax_round_trip, orbax_round_trip

ALIASES = ["sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta"]

SCHEDULE = optax.piecewise_constant_schedule(0.05, {30: 0.2, 60: 0.1})  # drops the rate twice
DECAY_SCHEDULE = optax.linear_schedule(1e-2, 0.0, 80)


def no_bias_decay(params):
    return {"w": True, "b": False}


# (alias, positional args, keyword args): every option of each alias, mostly under a schedule.
CONFIGS = [
    ("sgd", (0.1,), {}),
    ("sgd", (SCHEDULE,), {}),
    ("sgd", (SCHEDULE, 0.9), {}),
    ("sgd", (SCHEDULE,), {"momentum": 0.9, "nesterov": True}),
    ("sgd", (0.1, 0.0), {}),
    ("adam", (0.01,), {}),
    ("adam", (SCHEDULE,), {"nesterov": True}),
    ("adam", (SCHEDULE, 0.8, 0.99, 1e-6, 1e-8), {}),
    ("adamw", (SCHEDULE,), {"weight_decay": DECAY_SCHEDULE, "mask": no_bias_decay}),
    ("adamw", (0.01,), {"weight_decay": 0.1, "mask": {"w": True, "b": False}}),
    ("adamw", (0.01,), {"weight_decay": 0.1, "nesterov": True}),
    ("rmsprop", (SCHEDULE,), {}),
    ("rmsprop", (SCHEDULE,), {"eps_in_sqrt": False, "initial_scale": 0.5}),
    ("rmsprop", (SCHEDULE,), {"centered": True}),
    ("rmsprop", (SCHEDULE,), {"momentum": 0.9, "nesterov": True}),
    ("rmsprop", (SCHEDULE,), {"bias_correction": True, "momentum": 0.5}),
    ("rmsprop", (SCHEDULE,), {"centered": True, "bias_correction": True}),
    ("adagrad", (SCHEDULE,), {}),
    ("adagrad", (0.1, 0.0, 1e-10), {}),
    ("adadelta", (), {}),
    ("adadelta", (SCHEDULE,), {"weight_decay": 0.01, "weight_decay_mask": no_bias_decay}),
]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CONFIGS)]

STEPS = 100
# Per step and per leaf, |jstep - Optax| <= RTOL * max |Optax| (updates and state); measured
# at most 2e-7: where the two round differently (rsqrt against 1 / sqrt, the order of a
# product) they differ by an ulp. The parameters' displacement after STEPS jitted steps agrees
# within DISPLACEMENT_RTOL (measured at most 9e-7; the README's figure for Adam is 4e-6).
RTOL = 1e-6
DISPLACEMENT_RTOL = 4e-6


def build(name, args, kwargs, module):
    return getattr(module, name)(*args, **kwargs)


def problem(dtype=jnp.float32, steps=STEPS):
    """Params {"w": (3, 4), "b": (4,)} and `steps` gradients whose size ranges over 1e-4..1,
    so that eps, the schedule's drops and the momentum all show in the steps."""
    rng = np.random.default_rng(0)
    scales = 10.0 ** rng.uniform(-4, 0, size=(steps, 1, 1))
    grads = {
        "w": jnp.asarray(rng.normal(size=(steps, 3, 4)) * scales, dtype),
        "b": jnp.asarray(rng.normal(size=(steps, 4)) * scales[:, 0], dtype),
    }
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), dtype), "b": jnp.zeros(4, dtype)}
    return params, grads


def run(optimizer, params, grads, state=None):
    """(params, state, updates of every step) after the steps, compiled as one scan."""

    def body(carry, g):
        p, s = carry
        u, s = optimizer.update(g, s, p)
        return (optax.apply_updates(p, u), s), u

    start = optimizer.init(params) if state is None else state
    (p, s), us = jax.jit(lambda p, s, gs: jax.lax.scan(body, (p, s), gs))(params, start, grads)
    return p, s, us


def assert_same_tree(ours, theirs):
    """Same classes, nesting and field names (the PyTreeDef), and leaves of the same shapes and dtypes."""
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert (jnp.shape(a), jnp.result_type(a)) == (jnp.shape(b), jnp.result_type(b))


def wide(leaf):
    """A leaf in float64, or complex128 for a complex leaf."""
    leaf = np.asarray(leaf)
    return leaf.astype(np.complex128 if np.iscomplexobj(leaf) else np.float64)


def assert_close_per_leaf(ours, theirs, rtol, axis=None):
    """|ours - theirs| <= rtol * max |theirs|, leaf by leaf (per step with axis=0)."""
    for ours_leaf, theirs_leaf in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        a, b = wide(ours_leaf), wide(theirs_leaf)
        reduce = tuple(range(1, b.ndim)) if axis == 0 else None
        scale = np.max(np.abs(b), axis=reduce, keepdims=True)
        error, bound = np.abs(a - b), rtol * scale + np.finfo(np.float32).tiny
        assert np.all(error <= bound), f"worst |difference| / bound: {np.max(error / bound):.3g}"


def test_signatures_are_optax():
    """Every parameter name, kind (positional / keyword-only) and default of Optax 0.2.8's alias."""
    assert optax.__version__ == "0.2.8"
    for name in ALIASES:
        theirs = inspect.signature(getattr(optax, name)).parameters.values()
        ours = inspect.signature(getattr(jstep.optax, name)).parameters.values()
        assert [(p.name, p.kind, p.default) for p in ours] == [(p.name, p.kind, p.default) for p in theirs], name


@pytest.mark.parametrize(("name", "args", "kwargs"), CONFIGS, ids=IDS)
def test_same_numbers_and_state_over_many_steps(name, args, kwargs):
    """100 jitted steps (the schedules drop the rate at steps 30 and 60): every update and the
    final state within float32 rounding of Optax's, the same state tree, the same trajectory."""
    params, grads = problem()
    p_theirs, s_theirs, u_theirs = run(build(name, args, kwargs, optax), params, grads)
    p_ours, s_ours, u_ours = run(build(name, args, kwargs, jstep.optax), params, grads)
    assert_same_tree(s_ours, s_theirs)
    assert_close_per_leaf(u_ours, u_theirs, RTOL, axis=0)
    assert_close_per_leaf(s_ours, s_theirs, RTOL)
    displacement = lambda p: jax.tree.map(jnp.subtract, p, params)  # noqa: E731
    assert_close_per_leaf(displacement(p_ours), displacement(p_theirs), DISPLACEMENT_RTOL)


def test_sgd_steps_by_the_rate_times_the_whole_trace():
    """Under a schedule the rate multiplies Optax's whole trace (jstep.momentum keeps it inside V):
    rate 1 then 0.1 from step 3, gradient 1: T = 1, 1.9, 2.71, so steps -1, -1.9, -0.271."""
    schedule = optax.piecewise_constant_schedule(1.0, {2: 0.1})
    optimizer = jstep.optax.sgd(schedule, momentum=0.9)
    state, steps = optimizer.init(jnp.zeros(())), []
    for _ in range(3):
        update, state = optimizer.update(jnp.ones(()), state)
        steps.append(float(update))
    np.testing.assert_allclose(steps, [-1.0, -1.9, -0.271], rtol=1e-6)
    trace, rate = state
    assert isinstance(trace, optax.TraceState) and isinstance(rate, optax.ScaleByScheduleState)
    np.testing.assert_allclose(trace.trace, 2.71, rtol=1e-6)
    assert int(rate.count) == 3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.complex64])
@pytest.mark.parametrize(("name", "args", "kwargs"), CONFIGS, ids=IDS)
def test_init_state_is_optax_state(name, args, kwargs, dtype):
    """The state `init` builds: Optax's tree with Optax's shapes and dtypes for 16-bit params
    too, but for one rule: with float16 params the states built from squared gradients (Adam's
    nu, RMSprop's nu and its centered mu, adagrad's sum_of_squares, adadelta's e_g and e_x) are
    float32, where Optax's are float16 and lose gradients below 8e-3 (jstep's float16 rule).
    For complex params (adadelta refuses them, as Optax's tests do), Optax stores the real
    second moments in complex arrays and jstep in real ones; the tree is the same."""
    if name == "adadelta" and dtype == jnp.complex64:
        pytest.skip("Optax's adadelta does not support complex parameters")
    params, _ = problem(dtype, steps=1)
    ours = build(name, args, kwargs, jstep.optax).init(params)
    theirs = build(name, args, kwargs, optax).init(params)
    if dtype == jnp.complex64:
        assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    elif dtype == jnp.float16:
        assert jax.tree.structure(ours) == jax.tree.structure(theirs)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs), strict=True):
            squares = _built_from_squares(path, ours)
            expected = jnp.float32 if squares and b.dtype == jnp.float16 else b.dtype
            assert (a.shape, a.dtype) == (b.shape, expected), jax.tree_util.keystr(path)
    else:
        assert_same_tree(ours, theirs)


def _built_from_squares(path, state) -> bool:
    """Whether the state leaf at `path` is one of those float16's rule keeps in float32."""
    fields = [key.name for key in path if isinstance(key, jax.tree_util.GetAttrKey)]
    if any(field in ("nu", "sum_of_squares", "e_g", "e_x") for field in fields):
        return True
    # RMSprop's centered mean shares its state with nu; Adam's mu is a first moment.
    owner = state[path[0].idx] if isinstance(path[0], jax.tree_util.SequenceKey) else state
    return "mu" in fields and not isinstance(owner, optax.ScaleByAdamState)


def test_updates_keep_16_bit_dtypes_and_agree_to_their_precision():
    """bfloat16 params: jstep's arithmetic runs in float32, Optax's in bfloat16, so from the
    same state the updates agree to bfloat16's precision, not bit for bit: within 2^-5 of the
    leaf's largest update (four bfloat16 ulps; measured: up to 2.1 for Adam, whose m, v and
    quotient Optax rounds to bfloat16 in turn).
    Each step starts from Optax's state (jstep's update takes it as it is)."""
    params, grads = problem(jnp.bfloat16, steps=10)
    for name, args, kwargs in [("adam", (0.01,), {}), ("sgd", (0.1, 0.9), {}), ("rmsprop", (0.01,), {})]:
        theirs, ours = build(name, args, kwargs, optax), build(name, args, kwargs, jstep.optax)
        state = theirs.init(params)
        for t in range(10):
            g = jax.tree.map(lambda x: x[t], grads)  # noqa: B023
            u_theirs, next_state = jax.jit(theirs.update)(g, state, params)
            u_ours, s_ours = jax.jit(ours.update)(g, state, params)
            assert_same_tree(s_ours, next_state)
            assert_same_tree(u_ours, u_theirs)
            assert_close_per_leaf(u_ours, u_theirs, 2.0**-5)
            state = next_state


@pytest.mark.parametrize(
    ("name", "args", "kwargs"),
    [
        ("adam", (0.01,), {"mu_dtype": jnp.bfloat16}),
        ("adamw", (0.01,), {"mu_dtype": jnp.bfloat16}),
        ("sgd", (0.1, 0.9), {"accumulator_dtype": jnp.bfloat16}),
        ("sgd", (0.1, 0.9), {"accumulator_dtype": jnp.bfloat16, "nesterov": True}),
    ],
)
def test_narrow_state_dtype_agrees_to_its_precision(name, args, kwargs):
    """float32 params with a bfloat16 `mu_dtype` / `accumulator_dtype`: Optax forms
    decay * state in bfloat16, jstep in float32 and rounds once when it stores, so from the same
    state the updates agree to bfloat16's precision, not bit for bit: within 2^-7 of the leaf's
    largest update (one bfloat16 ulp of the state; measured: about 2^-9, where a momentum 1% off
    gives 1.2e-2), with the state's
    dtype kept. Over many steps the two trajectories drift apart by such roundings (measured
    over 50 steps from the same start: 3-5% of a step), as any two bfloat16 programs do."""
    params, grads = problem(jnp.float32, steps=10)
    theirs, ours = build(name, args, kwargs, optax), build(name, args, kwargs, jstep.optax)
    state = theirs.init(params)
    for t in range(10):
        g = jax.tree.map(lambda x: x[t], grads)  # noqa: B023
        u_theirs, next_state = jax.jit(theirs.update)(g, state, params)
        u_ours, s_ours = jax.jit(ours.update)(g, state, params)
        assert_same_tree(s_ours, next_state)
        assert_close_per_leaf(u_ours, u_theirs, 2.0**-7)
        state = next_state


def checkpoint_cases():
    return [
        ("sgd", (SCHEDULE, 0.9), {"nesterov": True}),
        ("adam", (SCHEDULE,), {}),
        ("adamw", (SCHEDULE,), {"weight_decay": DECAY_SCHEDULE, "mask": no_bias_decay}),
        ("rmsprop", (SCHEDULE,), {"centered": True, "momentum": 0.9}),
        ("adagrad", (SCHEDULE,), {}),
        ("adadelta", (SCHEDULE,), {"weight_decay": 0.01}),
    ]


def checkpoint_params():
    """flax.serialization for every alias, orbax (slower to save) for the two deepest trees."""
    cases = [(c, flax_round_trip) for c in checkpoint_cases()]
    cases += [(c, orbax_round_trip) for c in checkpoint_cases() if c[0] in ("sgd", "adamw")]
    return [
        pytest.param(*case, round_trip, save_with, id=f"{case[0]}-{round_trip.__name__[:5]}-saved-by-{save_with}")
        for case, round_trip in cases
        for save_with in ["optax", "jstep"]
    ]


@pytest.mark.parametrize(("name", "args", "kwargs", "round_trip", "save_with"), checkpoint_params())
def test_checkpoints_move_both_ways(name, args, kwargs, round_trip, save_with, tmp_path):
    """Save the state after 40 steps with one library, restore it into the other's `init` state
    (Flax's ``restore_checkpoint(target=...)`` pattern), run 20 more steps: the restored state
    is the saved one leaf for leaf (count and momentum kept, not reset), and the run continues
    as the saving library's uninterrupted run does."""
    params, grads = problem(steps=60)
    modules = {"optax": optax, "jstep": jstep.optax}
    saver = build(name, args, kwargs, modules[save_with])
    loader = build(name, args, kwargs, modules["jstep" if save_with == "optax" else "optax"])
    p_mid, s_mid, _ = run(saver, params, jax.tree.map(lambda g: g[:40], grads))
    _, s_end, u_end = run(saver, p_mid, jax.tree.map(lambda g: g[40:], grads), s_mid)

    restored = round_trip(s_mid, loader.init(params), tmp_path)
    assert jax.tree.structure(restored) == jax.tree.structure(s_mid)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(s_mid), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(restored))

    _, s_resumed, u_resumed = run(loader, p_mid, jax.tree.map(lambda g: g[40:], grads), restored)
    assert_close_per_leaf(u_resumed, u_end, RTOL, axis=0)
    assert_close_per_leaf(s_resumed, s_end, RTOL)


@pytest.mark.parametrize("name", ["adam", "rmsprop", "adagrad"])
def test_complex_checkpoints_move_both_ways(name):
    """Complex params: Optax stores the second moment in a complex array, jstep in a real one.
    A state saved by either restores into the other (flax.serialization) and continues with
    the saving library's numbers."""
    from flax import serialization

    params, grads = problem(jnp.complex64, steps=20)
    grads = jax.tree.map(lambda g: g * (1 - 0.5j), grads)
    first, rest = jax.tree.map(lambda g: g[:10], grads), jax.tree.map(lambda g: g[10:], grads)
    for saver_module, loader_module in [(optax, jstep.optax), (jstep.optax, optax)]:
        saver, loader = getattr(saver_module, name)(0.01), getattr(loader_module, name)(0.01)
        p_mid, s_mid, _ = run(saver, params, first)
        _, _, u_end = run(saver, p_mid, rest, s_mid)
        restored = serialization.from_bytes(loader.init(params), serialization.to_bytes(s_mid))
        _, _, u_resumed = run(loader, p_mid, rest, restored)
        assert_close_per_leaf(u_resumed, u_end, RTOL, axis=0)


def test_arguments_are_checked_under_their_optax_names():
    with pytest.raises(ValueError, match="decay"):
        jstep.optax.rmsprop(0.1, decay=1.5)
    with pytest.raises(ValueError, match="momentum"):
        jstep.optax.sgd(0.1, momentum=-0.5)
    with pytest.raises(ValueError, match="nesterov=True needs a momentum"):
        jstep.optax.sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match="learning_rate"):
        jstep.optax.adam(-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        jstep.optax.adamw(0.1, weight_decay=-1.0)
    with pytest.raises(ValueError, match="rho"):
        jstep.optax.adadelta(rho=2.0)


def test_the_module_is_reachable_and_shadows_no_optax():
    """`import jstep` gives `jstep.optax`; jstep's own modules still import the optax package."""
    assert jstep.optax is sys.modules["jstep.optax"]
    for module in ["jstep.adam", "jstep.momentum", "jstep.adaptive", "jstep.optax", "jstep._core"]:
        assert sys.modules[module].optax is optax
    assert "optax" not in jstep.__all__  # `from jstep import *` leaves the user's `optax` alone
