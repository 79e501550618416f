"""Dtype policy (bf16, mu/nu/accumulator dtypes, stable state types), bad input, counts, complex params."""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jstep

import reference as ref
from harness import (
    FLOAT32_RTOL,
    OPTIMIZER_NAMES,
    REFERENCE_RUNS,
    RTOL64,
    as_leaves,
    assert_close_runs,
    gradient_sequence,
    leaves64,
    max_relative_error,
    optimizers,
    params_like,
    run,
    stack,
)

AVERAGES = {
    "moving_average": lambda: jstep.moving_average(0.9, debias=True),
    "cumulative_average": jstep.cumulative_average,
}


def all_transformations():
    return {**optimizers(), **{name: make() for name, make in AVERAGES.items()}}


ALL_NAMES = OPTIMIZER_NAMES + list(AVERAGES)


def types(tree):
    """(shape, dtype, weak_type) of every leaf: what lax.scan and lax.cond require to match."""
    return [jax.typeof(x) for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------------------------ dtypes


# bfloat16 params, state and updates against the float64 reference on the same bfloat16 gradients,
# normwise per leaf over 6 steps: about 1.3 times the worst of three seeds (40, 41, 42).
BFLOAT16_RTOL = {
    # -eta g, with eta rounded to bfloat16 as a weakly typed scalar, and the product rounded: two
    # roundings of 2^-9 (measured 3.9e-3 to 4.5e-3).
    "sgd": 6e-3,
    # The state is rounded to bfloat16 every step and the update once more (measured 3.8e-3 to 7.7e-3).
    "momentum": 1e-2,
    "ema_momentum": 1e-2,
    "rmsprop": 1e-2,
    "adagrad": 1e-2,
    "adadelta": 1e-2,
    "adam": 1e-2,
    # Wider: Nesterov's step gamma V_t + eta g_t adds two terms of opposite sign where the gradient
    # turns, so V's rounding (2^-9 of |V|) is large against their small sum (measured 5e-3 to 2.7e-2).
    "momentum_nesterov": 3.5e-2,
}


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_bfloat16_params_keep_bfloat16_updates_and_state(name):
    """bf16 in, bf16 out; the moments follow the params' dtype (arithmetic in float32), and
    the updates agree with the float64 reference on the same bf16 gradients to bf16 precision."""
    opt = optimizers()[name]
    grads = gradient_sequence(40, 6, jnp.bfloat16)
    got, state = run(opt, grads, jnp.bfloat16, jit=False)
    initial = opt.init(params_like(grads, jnp.bfloat16))
    assert types(state) == types(initial)
    for leaf in jax.tree.leaves(state)[1:]:  # after the count
        assert leaf.dtype == jnp.bfloat16
    updates, _ = opt.update(grads[0], initial)
    assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(jnp.bfloat16)}
    assert max_relative_error(got, REFERENCE_RUNS[name](as_leaves(grads))) <= BFLOAT16_RTOL[name]


@pytest.mark.parametrize(
    ("make", "field", "stored"),
    [
        pytest.param(lambda: jstep.adam(0.01, mu_dtype=jnp.bfloat16), "mu", jnp.bfloat16, id="adam_mu_bf16"),
        pytest.param(lambda: jstep.adam(0.01, nu_dtype=jnp.bfloat16), "nu", jnp.bfloat16, id="adam_nu_bf16"),
        pytest.param(
            lambda: jstep.momentum(0.05, accumulator_dtype=jnp.bfloat16),
            "velocity",
            jnp.bfloat16,
            id="momentum",
        ),
        pytest.param(
            lambda: jstep.ema_momentum(0.5, accumulator_dtype=jnp.bfloat16),
            "average",
            jnp.bfloat16,
            id="ema_momentum",
        ),
        pytest.param(
            lambda: jstep.moving_average(0.9, accumulator_dtype=jnp.bfloat16),
            "average",
            jnp.bfloat16,
            id="moving_average",
        ),
    ],
)
def test_low_precision_state_for_float32_params(make, field, stored):
    """A bf16 moment for float32 params: the state is stored in bf16, the updates stay float32."""
    opt = make()
    grads = gradient_sequence(41, 5, np.float32)
    _, state = run(opt, grads, np.float32, jit=False)
    assert {x.dtype for x in jax.tree.leaves(getattr(state, field))} == {jnp.dtype(stored)}
    updates, _ = opt.update(grads[0], state)
    assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
    assert types(state) == types(opt.init(params_like(grads, np.float32)))


def test_float32_moments_for_bfloat16_params_track_the_reference_closely():
    """mu_dtype = nu_dtype = float32 for bf16 params: float32 statistics, so only bf16
    rounding remains, with no accumulated moment error: the direction and then the scaled
    step are each rounded to bf16 (rel <= 2^-8 each), together <= 2^-7 per element."""
    opt = jstep.adam(0.01, mu_dtype=jnp.float32, nu_dtype=jnp.float32)
    grads = gradient_sequence(42, 40, jnp.bfloat16)
    got, state = run(opt, grads, jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves((state.mu, state.nu))} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in got[0]} == {np.dtype(np.float64)}  # widened by the harness
    assert max_relative_error(got, ref.run_adam(as_leaves(grads), 0.01)) < 2**-7 + 1e-4


@pytest.mark.parametrize("name", ALL_NAMES)
def test_state_types_never_change(name):
    """The state after a step has exactly the init state's types (dtype and weak type), so it
    is a valid lax.scan carry and both lax.cond branches agree: checked eagerly, and in a
    jitted lax.scan whose body steps or skips under lax.cond. The params mix float32 and
    bfloat16 leaves."""
    opt = all_transformations()[name]
    params = {"f32": jnp.ones((3, 2), jnp.float32), "bf16": jnp.ones(4, jnp.bfloat16)}
    grads = [jax.tree.map(lambda p, s=s: (s + 1.0) * p, params) for s in range(4)]
    take = jnp.array([True, False, True, True])
    state = opt.init(params)
    initial = types(state)

    _, eager = opt.update(grads[0], state)
    assert types(eager) == initial

    def body(state, inputs):
        g, take = inputs
        state = jax.lax.cond(take, lambda s: opt.update(g, s)[1], lambda s: s, state)
        return state, None

    final, _ = jax.jit(lambda s, xs: jax.lax.scan(body, s, xs))(state, (stack(grads), take))
    assert types(final) == initial
    assert int(final.count) == 3


# --------------------------------------------------------------------- bad hyperparameters

DECAYS = [
    (jstep.running_average, "gamma", {}),
    (jstep.moving_average, "decay", {}),
    (jstep.momentum, "gamma", {"learning_rate": 0.1}),
    (jstep.ema_momentum, "gamma", {"learning_rate": 0.1}),
    (jstep.rmsprop, "gamma", {"learning_rate": 0.1}),
    (jstep.scale_by_rms, "gamma", {}),
    (jstep.adadelta, "rho", {}),
    (jstep.adam, "b1", {}),
    (jstep.adam, "b2", {}),
    (jstep.scale_by_adam, "b1", {}),
    (jstep.scale_by_adam, "b2", {}),
]
NON_NEGATIVE = [
    (jstep.rmsprop, "eps", {"learning_rate": 0.1}),
    (jstep.rmsprop, "initial_scale", {"learning_rate": 0.1}),
    (jstep.scale_by_rms, "eps", {}),
    (jstep.adagrad, "eps", {"learning_rate": 0.1}),
    (jstep.adagrad, "initial_accumulator_value", {"learning_rate": 0.1}),
    (jstep.scale_by_rss, "eps", {}),
    (jstep.adadelta, "eps", {}),
    (jstep.adam, "eps", {}),
    (jstep.adam, "eps_root", {}),
    (jstep.scale_by_adam, "eps", {}),
    (jstep.scale_by_adam, "eps_root", {}),
] + [
    (factory, "learning_rate", {})
    for factory in (
        jstep.sgd,
        jstep.momentum,
        jstep.ema_momentum,
        jstep.rmsprop,
        jstep.adagrad,
        jstep.adadelta,
        jstep.adam,
    )
]


def _id(case):
    factory, argument, _ = case
    return f"{factory.__name__}-{argument}"


@pytest.mark.parametrize("value", [math.nan, 1.0, -0.1, 1.5, math.inf])
@pytest.mark.parametrize("case", DECAYS, ids=_id)
def test_a_decay_outside_zero_one_is_rejected_at_construction(case, value):
    factory, argument, required = case
    with pytest.raises(ValueError, match=argument) as error:
        factory(**required, **{argument: value})
    message = str(error.value)
    assert argument in message and repr(value) in message and "[0, 1)" in message, message


@pytest.mark.parametrize("value", [-1e-8, -0.1, math.nan, -math.inf])
@pytest.mark.parametrize("case", NON_NEGATIVE, ids=_id)
def test_a_negative_rate_or_eps_is_rejected_at_construction(case, value):
    factory, argument, required = case
    with pytest.raises(ValueError, match=argument) as error:
        factory(**required, **{argument: value})
    message = str(error.value)
    assert argument in message and repr(value) in message and "[0, inf)" in message, message


@pytest.mark.parametrize("case", DECAYS + NON_NEGATIVE, ids=_id)
def test_boundary_values_and_arrays_are_accepted(case):
    """0 is allowed everywhere; an array is not checked (inject_hyperparams passes arrays)."""
    factory, argument, required = case
    params = {"w": jnp.ones(3)}
    for value in (0.0, jnp.asarray(0.5)):
        opt = factory(**required, **{argument: value})
        updates, _ = opt.update({"w": jnp.ones(3)}, opt.init(params))
        assert updates["w"].shape == (3,)


# Every public factory, with the arguments it cannot do without; every parameter of its
# signature (read from the signature, so a new one is covered too) is fed wrong types below.
FACTORIES = {
    jstep.sgd: {"learning_rate": 0.1},
    jstep.momentum: {"learning_rate": 0.1},
    jstep.ema_momentum: {"learning_rate": 0.1},
    jstep.rmsprop: {"learning_rate": 0.1},
    jstep.scale_by_rms: {},
    jstep.adagrad: {"learning_rate": 0.1},
    jstep.scale_by_rss: {},
    jstep.adadelta: {},
    jstep.adam: {},
    jstep.adamw: {},
    jstep.scale_by_adam: {},
    jstep.running_average: {"gamma": 0.9},
    jstep.moving_average: {"decay": 0.9},
    jstep.cumulative_average: {},
    jstep.grouped: {"transformation": jstep.adam(0.1)},
}
# The arguments that take a schedule (a callable count -> value); `mask` takes a callable too.
SCHEDULES = {(jstep.running_average, "gamma"), (jstep.adamw, "weight_decay")}
SCHEDULES |= {(f, "learning_rate") for f in FACTORIES}
# None means something for the arguments whose default is None, and for these.
TAKES_NONE = {(jstep.grouped, "max_leaf_size")}


def test_every_public_factory_is_checked():
    """A factory added to jstep's API without a line in FACTORIES fails here."""
    not_factories = {
        "apply_updates",
        "batch_norm",
        "batch_renorm",
        "batch_stats",
        "blockwise",
        "check_vjp",
        "dequantize",
        "quantize",
        "running_average_update",
        "stochastic_round",
    }
    public = {name for name in jstep.__all__ if inspect.isfunction(getattr(jstep, name))} - not_factories
    assert public == {factory.__name__ for factory in FACTORIES}


def _arguments():
    for factory in FACTORIES:
        for name, parameter in inspect.signature(factory).parameters.items():
            yield factory, name, parameter.default


def _is_number(default):
    return isinstance(default, (int, float)) and not isinstance(default, bool)


def _wrong_types():
    for factory, name, default in _arguments():
        takes_none = default is None or (factory, name) in TAKES_NONE
        bad_values = ["0.1", [0.1]] + ([] if takes_none else [None])
        numeric = _is_number(default) or (default is inspect.Parameter.empty and name != "transformation")
        if numeric:  # arrays pass unchecked only when 0-d and real: not a string array, not a vector
            bad_values += [np.array("0.1"), jnp.ones(2)]
        if numeric and (factory, name) not in SCHEDULES:
            bad_values.append(_a_schedule)
        for bad in bad_values:
            yield pytest.param(factory, name, bad, id=f"{factory.__name__}-{name}-{type(bad).__name__}")


def _a_schedule(count):
    return 0.1


@pytest.mark.parametrize(("factory", "argument", "bad"), list(_wrong_types()))
def test_a_hyperparameter_of_the_wrong_type_is_refused_at_construction(factory, argument, bad):
    """A string from a config file, None, a list (or a schedule where the argument takes
    none) is a TypeError when the transformation is built, naming the argument and the value,
    not an error deep inside the first update."""
    arguments = {**FACTORIES[factory], argument: bad}
    with pytest.raises(TypeError) as error:
        factory(**arguments)
    message = str(error.value)
    assert argument in message and repr(bad) in message, message


def _numeric_arguments():
    for factory, name, default in _arguments():
        value = FACTORIES[factory].get(name, default)
        # max_leaf_size decides the packing, a static layout: a Python int (or None) only.
        if _is_number(value) and (factory, name) != (jstep.grouped, "max_leaf_size"):
            yield pytest.param(factory, name, value, id=f"{factory.__name__}-{name}")


@pytest.mark.parametrize(("factory", "argument", "value"), list(_numeric_arguments()))
def test_every_numeric_hyperparameter_may_be_a_traced_scalar(factory, argument, value):
    """As optax.inject_hyperparams passes them under jit: the transformation built inside
    the traced function from a tracer gives the updates of the Python number."""
    params = {"w": jnp.linspace(0.5, 1.5, 3)}
    grads = {"w": jnp.array([0.3, -1.0, 2.0])}

    def step(hyperparameter):
        opt = factory(**{**FACTORIES[factory], argument: hyperparameter})
        return opt.update(grads, opt.init(params), params)[0]

    traced = jax.jit(step)(jnp.asarray(value, jnp.result_type(type(value))))
    # A decay of 0.999 rounded to float32 moves 1 - decay by up to 2^-24 / 0.001 = 6e-5 relative
    # (the Python number keeps 1 - decay exact); everything else agrees to float32 rounding.
    np.testing.assert_allclose(traced["w"], step(value)["w"], rtol=1e-4)


def test_inject_hyperparams_with_a_dtype_class_says_to_make_it_static():
    """jnp.bfloat16 is callable, so inject_hyperparams takes it for a schedule and passes an
    array: the error names the argument and the fix, and the fix works."""
    with pytest.raises(TypeError, match=r"mu_dtype.*static_args=\('mu_dtype',\)"):
        optax.inject_hyperparams(jstep.adam)(mu_dtype=jnp.bfloat16).init(jnp.zeros(3))
    for opt in (
        optax.inject_hyperparams(jstep.adam, static_args=("mu_dtype",))(mu_dtype=jnp.bfloat16),
        optax.inject_hyperparams(jstep.adam)(mu_dtype=jnp.dtype(jnp.bfloat16)),
    ):
        _, state = jax.jit(opt.update)(jnp.ones(3), opt.init(jnp.zeros(3)))
        assert state.inner_state.mu.dtype == jnp.bfloat16


# ------------------------------------------------------------------- trees with no leaves

BUILT = {factory.__name__: lambda factory=factory: factory(**FACTORIES[factory]) for factory in FACTORIES} | {
    "rmsprop_momentum": lambda: jstep.rmsprop(0.1, momentum=0.9),
    "rmsprop_centered": lambda: jstep.rmsprop(0.1, centered=True),
    "momentum_nesterov": lambda: jstep.momentum(0.1, nesterov=True),
}


@pytest.mark.parametrize("name", list(BUILT))
def test_a_tree_with_no_leaves_is_accepted(name):
    """optax.multi_transform and optax.masked hand a transformation whose group has no
    parameters a tree with no leaves ({"w": MaskedNode()}): every factory steps it, as Optax's
    do, and the group that has the parameters steps exactly as alone."""
    make = BUILT[name]
    for empty in ({}, optax.MaskedNode(), {"w": optax.MaskedNode()}):
        opt = make()
        updates, _ = jax.jit(opt.update)(empty, opt.init(empty), empty)
        assert jax.tree.structure(updates) == jax.tree.structure(empty)
    params = {"w": jnp.linspace(0.5, 1.5, 6).reshape(3, 2), "b": jnp.array([0.1, -0.2])}
    grads = {"w": jnp.arange(6.0).reshape(3, 2) - 2.5, "b": jnp.array([0.3, 0.7])}
    split = optax.multi_transform({"used": make(), "unused": make()}, jax.tree.map(lambda _: "used", params))
    updates, _ = split.update(grads, split.init(params), params)
    alone = make()
    expected, _ = alone.update(grads, alone.init(params), params)
    for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------- bad params at init


@pytest.mark.parametrize("bad", [jnp.arange(3), jnp.array([True, False])], ids=["int32", "bool"])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_integer_or_boolean_leaves_are_rejected_at_init_by_path(name, bad):
    opt = all_transformations()[name]
    params = {"layer": {"bias": jnp.zeros(3), "steps": bad}}
    with pytest.raises(TypeError) as error:
        opt.init(params)
    message = str(error.value)
    assert "['layer']['steps']" in message and str(bad.dtype) in message, message


@pytest.mark.parametrize("name", ALL_NAMES)
def test_a_leaf_that_is_not_an_array_is_rejected_at_init_by_path(name):
    """A whole Equinox model given to init (its activation function a leaf): the error names
    the leaf and the filter to use, not JAX's "Cannot determine dtype"."""
    opt = all_transformations()[name]
    params = {"layer": {"bias": jnp.zeros(3), "activation": jax.nn.relu}}
    with pytest.raises(TypeError, match=r"leaf \['layer'\]\['activation'\] .* not an array; .*eqx.is_inexact_array"):
        opt.init(params)


# -------------------------------------------------------------- mismatched trees at update


@pytest.mark.parametrize("name", ["momentum", "rmsprop", "adam"])
def test_none_gradients_where_init_built_state_are_refused_saying_what_to_do(name):
    """A frozen part's gradients are None; with the state built on every param (optax.sgd and
    optax.rmsprop then drop that leaf's state, changing the state's tree) jstep refuses, and
    the message says to give init the trainable params only."""
    opt = all_transformations()[name]
    params = {"w": jnp.ones(3), "frozen": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"The updates hold None .* give init the trainable params only"):
        opt.update({"w": jnp.ones(3), "frozen": None}, opt.init(params), params)


# sgd keeps no per-parameter state, so there is nothing to compare a gradient tree with.
STATEFUL = [name for name in ALL_NAMES if name != "sgd"]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", STATEFUL)
def test_a_gradient_tree_of_another_structure_is_rejected(name, jit):
    opt = all_transformations()[name]
    state = opt.init({"w": jnp.ones((2, 3)), "b": jnp.ones(3)})
    update = jax.jit(opt.update) if jit else opt.update
    with pytest.raises(ValueError, match="extra") as error:
        update({"w": jnp.ones((2, 3)), "b": jnp.ones(3), "extra": jnp.ones(1)}, state)
    message = str(error.value)
    assert "structure" in message or "does not match" in message, message
    assert "extra" in message, message


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", STATEFUL)
def test_a_leaf_of_another_shape_is_rejected(name, jit):
    opt = all_transformations()[name]
    state = opt.init({"w": jnp.ones((2, 3)), "b": jnp.ones(3)})
    update = jax.jit(opt.update) if jit else opt.update
    with pytest.raises(ValueError, match=r"\['b'\]") as error:
        update({"w": jnp.ones((2, 3)), "b": jnp.ones(4)}, state)
    message = str(error.value)
    assert "['b']" in message and "(4,)" in message and "(3,)" in message, message


# ------------------------------------------------------------------------------- counts


@pytest.mark.parametrize("name", ALL_NAMES)
def test_the_count_saturates_at_int32_max(name):
    opt = all_transformations()[name]
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    top = np.iinfo(np.int32).max
    state = opt.init(params)._replace(count=jnp.asarray(top - 1, jnp.int32))
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    for _ in range(3):
        updates, state = opt.update(grads, state)
        assert state.count.dtype == jnp.int32
        assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
    assert int(state.count) == top


def test_adam_bias_corrections_vanish_at_a_saturated_count():
    """At t = 2^31 - 1, B^t = 0: Adam's step is m / (sqrt(v) + eps), as the equation says."""
    opt = jstep.adam(0.1)
    state = opt.init(jnp.zeros(3))._replace(count=jnp.asarray(np.iinfo(np.int32).max, jnp.int32))
    g = jnp.array([1.0, -2.0, 0.5])
    updates, state = opt.update(g, state)
    m, v = 0.1 * np.asarray(g), 0.001 * np.asarray(g) ** 2
    np.testing.assert_allclose(updates, -0.1 * m / (np.sqrt(v) + 1e-8), rtol=1e-5)


# ----------------------------------------------------------------------- complex params


@pytest.mark.parametrize(
    ("name", "dtype", "rtol"),
    [pytest.param(name, np.complex128, RTOL64, id=f"{name}-complex128") for name in OPTIMIZER_NAMES]
    + [
        pytest.param(name, np.complex64, FLOAT32_RTOL[name], id=f"{name}-complex64")
        for name in ("momentum", "rmsprop", "adam")
    ],
)
def test_complex_params_match_the_reference_with_squared_magnitudes(name, dtype, rtol):
    """Complex leaves work: first moments are complex, second moments accumulate |g|^2 (real)."""
    opt = optimizers()[name]
    grads = gradient_sequence(44, 20, dtype, complex_values=True)
    with jax.enable_x64(dtype == np.complex128):
        got, state = run(opt, grads, dtype, jit=False)
    assert_close_runs(got, REFERENCE_RUNS[name](as_leaves(grads)), rtol)
    real_state = {"nu", "sum_of_squares", "e_g", "e_x"}
    for field in set(state._fields) & real_state:
        for leaf in leaves64(getattr(state, field)):
            assert not np.iscomplexobj(leaf) and np.all(leaf >= 0)


def _split(grads):
    """Each complex leaf as two real leaves, its real and imaginary parts."""
    return [jax.tree.map(lambda x: np.stack([x.real, x.imag]), g) for g in grads]


@pytest.mark.parametrize("name", ["sgd", "momentum"])
def test_linear_rules_on_complex_params_equal_the_real_and_imaginary_parts_apart(name):
    """sgd and momentum are linear in g, so a complex weight moves exactly as its real and
    imaginary parts would as two real weights."""
    grads = gradient_sequence(45, 20, np.complex128, complex_values=True)
    with jax.enable_x64(True):
        joint, _ = run(optimizers()[name], grads, np.complex128, jit=False)
        apart, _ = run(optimizers()[name], _split(grads), np.float64, jit=False)
    assert_close_runs([[np.stack([u.real, u.imag]) for u in step] for step in joint], apart, 1e-13)


def test_adam_couples_the_real_and_imaginary_parts():
    """Adam's v accumulates |g|^2 = Re^2 + Im^2, one step size per complex weight, so it is
    *not* the two parts apart (each with its own v): the reference above is the test that counts."""
    grads = gradient_sequence(46, 10, np.complex128, complex_values=True)
    with jax.enable_x64(True):
        joint, _ = run(jstep.adam(0.01), grads, np.complex128, jit=False)
        apart, _ = run(jstep.adam(0.01), _split(grads), np.float64, jit=False)
    restacked = [[np.stack([u.real, u.imag]) for u in step] for step in joint]
    assert max_relative_error(restacked, apart) > 0.05


@pytest.mark.parametrize("name", ALL_NAMES)
def test_the_initial_state_is_positive_zero_whatever_the_params(name):
    """Moments start at +0 even for params holding inf, nan or negative values (init reads
    the params only for their shape, dtype and sharding)."""
    opt = all_transformations()[name]
    params = {
        "w": jnp.array([-2.0, jnp.inf, -jnp.inf, jnp.nan, -0.0]),
        "z": jnp.array([-1 - 1j, jnp.nan * 1j]),
    }
    state = opt.init(params)
    for leaf in jax.tree.leaves(state)[1:]:
        values = np.asarray(leaf)
        assert np.all(values == 0) and not np.any(np.signbit(values.real)) and not np.any(np.signbit(values.imag))


def _state_bytes(state):
    return sum(leaf.nbytes for leaf in jax.tree.leaves(state))


def test_adam_state_is_two_copies_of_the_params_plus_a_count():
    params = {"w": jnp.ones((64, 32), jnp.float32), "b": jnp.ones((32,), jnp.float32)}
    param_bytes = _state_bytes(params)
    assert _state_bytes(jstep.adam(1e-3).init(params)) == 2 * param_bytes + 4
    low = jstep.adam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16).init(params)
    assert _state_bytes(low) == param_bytes + 4
