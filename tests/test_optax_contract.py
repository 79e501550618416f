"""Optax's contract: extra keyword arguments, abstract init, rmsprop's options and adamw.

References: PyTorch (`torch.optim.RMSprop`, `torch.optim.AdamW`) and Optax (`optax.rmsprop`,
`optax.scale_by_rms`, `optax.adamw`), all in float64 over 100 steps; `jax.eval_shape` for the
abstract state. The sharded abstract init runs on 8 CPU devices in a subprocess.
"""

import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jstep
from jstep import _core

from harness import gradient_sequence, leaves64, optimizers, run_on_eight_devices, tree_of

STEPS = 100
RTOL = 1e-9


def every_transformation():
    """One instance of every jstep factory, by name: the harness's optimizers and the rest."""
    return {
        **optimizers(),
        "rmsprop_centered_momentum": jstep.rmsprop(0.01, centered=True, momentum=0.9),
        "scale_by_rms": jstep.scale_by_rms(bias_correction=True),
        "scale_by_rss": jstep.scale_by_rss(),
        "scale_by_adam": jstep.scale_by_adam(),
        "adamw": jstep.adamw(0.01, weight_decay=0.1),
        "running_average": jstep.running_average(0.9),
        "moving_average_debiased": jstep.moving_average(0.9, debias=True),
        "cumulative_average": jstep.cumulative_average(),
    }


NAMES = list(every_transformation())


def initial_params(dtype=np.float64):
    rng = np.random.default_rng(7)
    return tree_of(lambda i, shape: rng.normal(size=shape).astype(dtype))


# ----------------------------------------------------------------------------- extra args


@pytest.mark.parametrize("name", NAMES)
def test_update_takes_extra_keyword_arguments(name):
    """Every factory is a GradientTransformationExtraArgs; extra arguments change nothing."""
    opt = every_transformation()[name]
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    params = jax.tree.map(jnp.asarray, initial_params(np.float32))
    grads = jax.tree.map(jnp.asarray, gradient_sequence(1, 1, np.float32)[0])
    state = opt.init(params)
    plain = opt.update(grads, state, params)
    with_extras = opt.update(grads, state, params, value=jnp.float32(1.5), batch_index=3)
    jax.tree.map(np.testing.assert_array_equal, with_extras, plain)


def test_extra_arguments_reach_the_wrapped_transformation():
    """`descent` (which turns every direction into a step) hands the extra arguments on."""
    seen = []

    def init(params):
        return _core.CountState(_core.new_count())

    def update(updates, state, params=None, **extra_args):
        seen.append(extra_args)
        return updates, _core.CountState(_core.increment(state.count))

    opt = _core.descent(optax.GradientTransformationExtraArgs(init, update), 0.5)
    updates, _ = opt.update({"w": jnp.ones(2)}, opt.init({"w": jnp.ones(2)}), None, value=3.0)
    assert seen == [{"value": 3.0}]
    np.testing.assert_array_equal(updates["w"], -0.5)


def test_optax_chain_passes_extra_arguments_through_jstep():
    """In a chain, a transformation that needs `value` still gets it after a jstep one."""

    def init(params):
        return optax.EmptyState()

    def scale_by_value(updates, state, params=None, *, value, **extra_args):
        return jax.tree.map(lambda u: u * value, updates), state

    opt = optax.chain(jstep.adam(0.1), optax.GradientTransformationExtraArgs(init, scale_by_value))
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    scaled, _ = opt.update({"w": jnp.ones(3)}, state, params, value=2.0)
    unscaled, _ = jstep.adam(0.1).update({"w": jnp.ones(3)}, jstep.adam(0.1).init(params), params)
    np.testing.assert_allclose(scaled["w"], 2.0 * unscaled["w"])


@pytest.mark.parametrize("name", NAMES)
def test_none_leaves_are_left_out_as_optax_does(name):
    """Equinox's eqx.partition gives params and gradients with None where a leaf is not trained:
    such a leaf has no state and a None update, and the others are those of the tree without it."""
    opt = every_transformation()[name]
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "frozen": None}
    grads = {"w": jnp.arange(6.0).reshape(2, 3) - 2.5, "frozen": None}
    state = opt.init(params)
    for _ in range(2):
        updates, state = opt.update(grads, state, params)
    assert updates["frozen"] is None
    alone = every_transformation()[name]
    alone_state = alone.init({"w": params["w"]})
    for _ in range(2):
        alone_updates, alone_state = alone.update({"w": grads["w"]}, alone_state, {"w": params["w"]})
    np.testing.assert_array_equal(updates["w"], alone_updates["w"])


# --------------------------------------------------------------------------- abstract init


@pytest.mark.parametrize("name", NAMES)
def test_init_of_abstract_params_is_what_eval_shape_describes(name):
    opt = every_transformation()[name]
    params = {"w": jnp.ones((4, 3), jnp.float32), "b": jnp.ones((3,), jnp.bfloat16), "s": jnp.ones((), jnp.float32)}
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    state = opt.init(abstract)
    described = jax.eval_shape(opt.init, abstract)
    assert jax.tree.structure(state) == jax.tree.structure(described)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(described), strict=True):
        assert isinstance(got, jax.Array)
        assert (got.shape, got.dtype) == (want.shape, want.dtype)
    # The same values as init of concrete params of those shapes (init reads no values).
    jax.tree.map(np.testing.assert_array_equal, state, opt.init(params))


def test_init_of_abstract_params_still_refuses_integer_leaves():
    with pytest.raises(TypeError, match=r"\['n'\].*int32"):
        jstep.adam(0.1).init({"n": jax.ShapeDtypeStruct((3,), jnp.int32)})


SHARDED_SCRIPT = textwrap.dedent(
    r"""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import jstep

    assert jax.device_count() == 8
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type, axis_type))
        shardings = {"w": NamedSharding(mesh, P("data", "model")), "b": NamedSharding(mesh, P()),
                     "v": NamedSharding(mesh, P("model"))}
        shapes = {"w": (8, 6), "b": (6,), "v": (4,)}
        abstract = {k: jax.ShapeDtypeStruct(shapes[k], jnp.float32, sharding=shardings[k]) for k in shapes}
        concrete = {k: jax.device_put(jnp.ones(shapes[k]), shardings[k]) for k in shapes}
        for name, opt in [("adam", jstep.adam(0.1)), ("adamw", jstep.adamw(0.1)),
                          ("rmsprop", jstep.rmsprop(0.1, centered=True, momentum=0.9)),
                          ("adagrad", jstep.adagrad(0.1)), ("momentum", jstep.momentum(0.1)),
                          ("ema_momentum", jstep.ema_momentum(0.1)), ("adadelta", jstep.adadelta()),
                          ("scale_by_rss", jstep.scale_by_rss()), ("moving_average", jstep.moving_average(0.9))]:
            for how, state in [("abstract", opt.init(abstract)), ("jit", jax.jit(opt.init)(concrete))]:
                is_dict = lambda t: isinstance(t, dict)
                trees = [t for t in jax.tree.leaves(state, is_leaf=is_dict) if is_dict(t)]
                assert trees, (name, state)
                for tree in trees:
                    for k, leaf in tree.items():
                        where = (axis_type, name, how, k, leaf.sharding)
                        assert leaf.sharding.is_equivalent_to(shardings[k], leaf.ndim), where
            print(f"{axis_type.name} {name}: ok")
    print("ALL OK")
    """
)


def test_state_of_sharded_abstract_params_carries_their_sharding():
    stdout = run_on_eight_devices(SHARDED_SCRIPT)
    assert "Explicit adamw: ok" in stdout and "ALL OK" in stdout, stdout


# ------------------------------------------------------------------ float64 trajectories


def jstep_trajectory(opt, grads, params):
    """The params after each of len(grads) steps of `opt`, as float64 leaves (under x64)."""
    with jax.enable_x64(True):
        params = jax.tree.map(jnp.asarray, params)
        state = opt.init(params)

        @jax.jit
        def step(params, state, g):
            updates, state = opt.update(g, state, params)
            return optax.apply_updates(params, updates), state

        out = []
        for g in grads:
            params, state = step(params, state, jax.tree.map(jnp.asarray, g))
            out.append(leaves64(params))
    return out


def torch_trajectory(make_opt, grads, params):
    """The same for a torch.optim optimizer on float64 tensors (one tensor per leaf)."""
    tensors = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in leaves64(params)]
    opt = make_opt(tensors)
    out = []
    for g in grads:
        for tensor, leaf in zip(tensors, leaves64(g), strict=True):
            tensor.grad = torch.tensor(leaf, dtype=torch.float64)
        opt.step()
        out.append([t.detach().numpy().copy() for t in tensors])
    return out


def assert_same_trajectory(got, want, rtol=RTOL):
    worst = 0.0
    for step_got, step_want in zip(got, want, strict=True):
        for a, b in zip(step_got, step_want, strict=True):
            worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)))
    assert worst <= rtol, f"relative error {worst:.3g} > {rtol:g}"


@pytest.fixture(scope="module")
def grads():
    return gradient_sequence(30, STEPS)


TORCH_RMSPROP = {
    "plain": {},
    "centered": {"centered": True},
    "momentum": {"momentum": 0.9},
    "centered_momentum": {"centered": True, "momentum": 0.8},
}


@pytest.mark.parametrize("name", list(TORCH_RMSPROP))
def test_rmsprop_equals_torch(name, grads):
    """jstep's default eps placement (outside the root) is PyTorch's."""
    options = TORCH_RMSPROP[name]
    jstep_options = {"momentum": options["momentum"]} if "momentum" in options else {}
    opt = jstep.rmsprop(0.01, 0.95, 1e-3, centered=options.get("centered", False), **jstep_options)
    got = jstep_trajectory(opt, grads, initial_params())
    want = torch_trajectory(
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.95, eps=1e-3, **options), grads, initial_params()
    )
    assert_same_trajectory(got, want)


def decaying(count):
    return 0.02 / (1.0 + 0.1 * count)


OPTAX_RMSPROP = {
    "centered": {"centered": True},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "bias_correction": {"bias_correction": True},
    "everything": {"centered": True, "momentum": 0.7, "nesterov": True, "bias_correction": True, "initial_scale": 0.5},
}


@pytest.mark.parametrize("name", list(OPTAX_RMSPROP))
@pytest.mark.parametrize("rate", [0.01, decaying], ids=["constant", "schedule"])
def test_rmsprop_equals_optax_with_eps_in_sqrt(name, rate, grads):
    options = OPTAX_RMSPROP[name]
    opt = jstep.rmsprop(rate, 0.9, 1e-3, eps_in_sqrt=True, **options)
    expected = optax.rmsprop(rate, decay=0.9, eps=1e-3, eps_in_sqrt=True, **options)
    assert_same_trajectory(
        jstep_trajectory(opt, grads, initial_params()), jstep_trajectory(expected, grads, initial_params())
    )


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_scale_by_rms_bias_correction_equals_optax(eps_in_sqrt, grads):
    opt = optax.chain(jstep.scale_by_rms(0.9, 1e-4, eps_in_sqrt=eps_in_sqrt, bias_correction=True), optax.scale(-0.01))
    expected = optax.chain(
        optax.scale_by_rms(0.9, 1e-4, eps_in_sqrt=eps_in_sqrt, bias_correction=True), optax.scale(-0.01)
    )
    assert_same_trajectory(
        jstep_trajectory(opt, grads, initial_params()), jstep_trajectory(expected, grads, initial_params())
    )


def test_centered_rmsprop_divides_by_the_running_variance():
    """One step by hand: G_1 = (1-gamma) g^2, M_1 = (1-gamma) g, so G - M^2 = gamma (1-gamma) g^2."""
    g, gamma = np.array([2.0, -0.5]), 0.9
    opt = jstep.scale_by_rms(gamma, 0.0, centered=True)
    with jax.enable_x64(True):
        d, state = opt.update(jnp.asarray(g), opt.init(jnp.zeros(2)))
    np.testing.assert_allclose(np.asarray(d), g / np.sqrt(gamma * (1 - gamma) * g**2), rtol=1e-12)
    assert isinstance(state, jstep.ScaleByCenteredRmsState)


def test_rmsprop_options_are_checked():
    with pytest.raises(ValueError, match="nesterov=True needs a momentum"):
        jstep.rmsprop(0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got 1.5"):
        jstep.rmsprop(0.1, momentum=1.5)


# ---------------------------------------------------------------------------------- adamw


def test_adamw_equals_torch(grads):
    opt = jstep.adamw(0.01, 0.9, 0.99, 1e-6, weight_decay=0.05)
    got = jstep_trajectory(opt, grads, initial_params())
    want = torch_trajectory(
        lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05),
        grads,
        initial_params(),
    )
    assert_same_trajectory(got, want)


MASK_TREE = {"conv": [True], "dense": {"b": False, "w": True}, "scale": False}


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="every_leaf"),
        pytest.param({"mask": MASK_TREE}, id="mask_tree"),
        pytest.param({"mask": {"conv": True, "dense": False, "scale": True}}, id="mask_prefix"),
        pytest.param({"mask": lambda p: jax.tree.map(lambda x: x.ndim > 1, p)}, id="mask_callable"),
        pytest.param({"nesterov": True, "eps_root": 1e-8}, id="nesterov"),
    ],
)
@pytest.mark.parametrize("rate", [0.01, decaying], ids=["constant", "schedule"])
def test_adamw_equals_optax(options, rate, grads):
    opt = jstep.adamw(rate, 0.9, 0.999, 1e-8, weight_decay=0.1, **options)
    expected = optax.adamw(rate, 0.9, 0.999, 1e-8, weight_decay=0.1, **options)
    assert_same_trajectory(
        jstep_trajectory(opt, grads, initial_params()), jstep_trajectory(expected, grads, initial_params())
    )


def test_adamw_with_a_weight_decay_schedule_equals_optax(grads):
    """A schedule of lambda, evaluated at the count before each step as optax.adamw's, under a
    learning-rate schedule too."""
    schedule = optax.linear_schedule(0.2, 0.0, 8)
    opt = jstep.adamw(decaying, weight_decay=schedule, mask=MASK_TREE)
    expected = optax.adamw(decaying, weight_decay=schedule, mask=MASK_TREE)
    assert_same_trajectory(
        jstep_trajectory(opt, grads[:10], initial_params()), jstep_trajectory(expected, grads[:10], initial_params())
    )


def test_a_callable_mask_inside_inject_hyperparams_is_refused_unless_static(grads):
    """inject_hyperparams calls a callable mask with the step count (a schedule, to it): the
    mask then arrives as False and would decay no weight, silently (optax.adamw's case). jstep
    refuses it, naming static_args; named there, the mask gives the plain optimizer's numbers."""
    mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    injected = optax.inject_hyperparams(jstep.adamw)(learning_rate=0.01, weight_decay=0.1, mask=mask)
    with pytest.raises(ValueError, match=re.escape("static_args=('mask',)")):
        injected.init(initial_params())
    named = optax.inject_hyperparams(jstep.adamw, static_args=("mask",))
    static = named(learning_rate=0.01, weight_decay=0.1, mask=mask)
    assert_same_trajectory(
        jstep_trajectory(static, grads[:10], initial_params()),
        jstep_trajectory(jstep.adamw(0.01, weight_decay=0.1, mask=mask), grads[:10], initial_params()),
    )


def test_frozen_leaves_without_gradients_step_as_optax():
    """Equinox's loop with a frozen part: init on the trainable params (None where frozen), the
    gradients None there too, and update given every array of the model as params
    (``eqx.filter(model, eqx.is_array)``). jstep.adamw and jstep.grouped raised tree errors;
    they now give Optax's updates, None for the frozen leaf."""
    trainable = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3), "frozen": None}
    every_array = {**trainable, "frozen": jnp.ones(4)}
    grads = {"w": jnp.full((2, 3), 0.5), "b": jnp.array([0.1, -0.2, 0.3]), "frozen": None}
    pairs = [
        (jstep.adamw(0.1, weight_decay=0.1), optax.adamw(0.1, weight_decay=0.1)),
        (jstep.grouped(jstep.adamw(0.1, weight_decay=0.1)), optax.adamw(0.1, weight_decay=0.1)),
        (jstep.grouped(jstep.adam(0.1)), optax.adam(0.1)),
    ]
    for ours, theirs in pairs:
        got, _ = ours.update(grads, ours.init(trainable), every_array)
        want, _ = theirs.update(grads, theirs.init(trainable), every_array)
        assert got["frozen"] is None
        for key in ("w", "b"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6)


def test_a_weight_decay_mask_given_as_an_equinox_module_of_bools_is_a_tree_as_in_optax():
    """An Equinox module is callable (it defines __call__), so a mask built on the model with
    jax.tree.map was taken for a mask function and called (TypeError). As Optax, a mask is a
    function only when every leaf is callable."""
    eqx = pytest.importorskip("equinox")
    params = eqx.filter(eqx.nn.Linear(3, 2, key=jax.random.key(0)), eqx.is_inexact_array)
    mask = jax.tree.map(lambda p: p.ndim > 1, params)  # decay the weight, not the bias
    grads = jax.tree.map(jnp.ones_like, params)
    ours, theirs = jstep.adamw(0.1, weight_decay=0.5, mask=mask), optax.adamw(0.1, weight_decay=0.5, mask=mask)
    got, _ = ours.update(grads, ours.init(params), params)
    want, _ = theirs.update(grads, theirs.init(params), params)
    np.testing.assert_allclose(got.weight, want.weight, rtol=1e-6)
    np.testing.assert_allclose(got.bias, want.bias, rtol=1e-6)
    assert not np.allclose(got.weight, jstep.adam(0.1).update(grads, jstep.adam(0.1).init(params))[0].weight)


def test_adam_after_added_decay_is_not_adamw(grads):
    """L2 regularisation through Adam's moments is a different method: far beyond round-off."""
    l2 = optax.chain(optax.add_decayed_weights(0.1), jstep.adam(0.01))
    got = jstep_trajectory(l2, grads[:20], initial_params())
    want = jstep_trajectory(jstep.adamw(0.01, weight_decay=0.1), grads[:20], initial_params())
    with pytest.raises(AssertionError, match="relative error"):
        assert_same_trajectory(got, want, rtol=1e-3)


def test_adamw_with_zero_decay_is_adam(grads):
    got = jstep_trajectory(jstep.adamw(0.01, weight_decay=0.0), grads[:10], initial_params())
    want = jstep_trajectory(jstep.adam(0.01), grads[:10], initial_params())
    assert_same_trajectory(got, want, rtol=0.0)


def test_adamw_works_inside_optax_wrappers(grads):
    """inject_hyperparams (weight decay and rate as arrays) and MultiSteps give adamw's numbers."""
    injected = optax.inject_hyperparams(jstep.adamw)(learning_rate=0.01, weight_decay=0.1, mask=MASK_TREE)
    plain = jstep.adamw(0.01, weight_decay=0.1, mask=MASK_TREE)
    assert_same_trajectory(
        jstep_trajectory(injected, grads[:10], initial_params()), jstep_trajectory(plain, grads[:10], initial_params())
    )
    every_other = optax.MultiSteps(jstep.adamw(0.01, weight_decay=0.1), every_k_schedule=2)
    averaged = [jax.tree.map(lambda a, b: (a + b) / 2, grads[2 * i], grads[2 * i + 1]) for i in range(5)]
    got = jstep_trajectory(every_other, grads[:10], initial_params())[1::2]
    assert_same_trajectory(got, jstep_trajectory(jstep.adamw(0.01, weight_decay=0.1), averaged, initial_params()))


def test_adamw_errors():
    with pytest.raises(ValueError, match=r"weight_decay must be in \[0, inf\), got -0.1"):
        jstep.adamw(0.1, weight_decay=-0.1)
    opt = jstep.adamw(0.1)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="needs the params"):
        opt.update(params, opt.init(params))
    with pytest.raises(TypeError, match=r"mask must be None, a tree of Python bools.*leaf \['w'\] is 1"):
        jstep.adamw(0.1, mask={"w": 1})  # when built
    computed = jstep.adamw(0.1, mask=lambda p: {"w": 1})
    with pytest.raises(TypeError, match=r"leaf \['w'\] is 1"):
        computed.init(params)  # a callable's result: when it meets the params
    wrong = jstep.adamw(0.1, mask={"v": True})
    with pytest.raises(ValueError, match="tree structure"):
        wrong.init(params)


# ------------------------------------------------------------- every factory in Optax's wrappers

# Every factory with keyword hyperparameters, for optax.inject_hyperparams.
FACTORIES = {
    "sgd": (jstep.sgd, {"learning_rate": 0.05}),
    "momentum": (jstep.momentum, {"learning_rate": 0.05, "gamma": 0.9, "nesterov": True}),
    "ema_momentum": (jstep.ema_momentum, {"learning_rate": 0.5, "gamma": 0.9}),
    "rmsprop": (jstep.rmsprop, {"learning_rate": 0.01, "gamma": 0.9, "centered": True, "momentum": 0.5}),
    "scale_by_rms": (jstep.scale_by_rms, {"gamma": 0.8}),
    "adagrad": (jstep.adagrad, {"learning_rate": 0.1}),
    "scale_by_rss": (jstep.scale_by_rss, {"initial_accumulator_value": 0.1}),
    "adadelta": (jstep.adadelta, {"learning_rate": 1.0, "rho": 0.9}),
    "adam": (jstep.adam, {"learning_rate": 0.01, "b1": 0.8}),
    "scale_by_adam": (jstep.scale_by_adam, {"b2": 0.99}),
    "adamw": (jstep.adamw, {"learning_rate": 0.01, "weight_decay": 0.1}),
    "running_average": (jstep.running_average, {"gamma": 0.9}),
    "moving_average": (jstep.moving_average, {"decay": 0.9, "debias": True}),
    "cumulative_average": (jstep.cumulative_average, {}),
}


def eager_updates(opt, grads, params, *, jit=False):
    """The updates of `opt` over `grads` as float64 leaves, stepped eagerly or by one jitted update
    (a wrapper whose lax.cond would compile the step on every eager call is cheaper jitted)."""
    state = opt.init(params)
    update = jax.jit(opt.update) if jit else opt.update
    out = []
    for g in grads:
        updates, state = update(g, state, params)
        out.append(leaves64(updates))
    return out


def contract_grads(steps=3):
    return [jax.tree.map(jnp.asarray, g) for g in gradient_sequence(8, steps, np.float32)]


def test_every_factory_is_listed():
    """FACTORIES names every optimizer factory jstep exports: every lower-case public name but the
    functions that are not transformations."""
    not_factories = {
        "apply_updates", "batch_norm", "batch_renorm", "batch_stats", "blockwise", "check_vjp", "dequantize", "grouped",
        "quantize", "running_average_update", "stochastic_round",
    }  # fmt: skip
    exported = {name for name in jstep.__all__ if name.islower()} - not_factories
    assert set(FACTORIES) == exported


@pytest.mark.parametrize("name", list(FACTORIES))
def test_inject_hyperparams_gives_the_factorys_updates(name):
    """optax.inject_hyperparams(factory)(**hyperparameters) steps as factory(**hyperparameters):
    the numbers become float32 arrays in the state, so they agree to float32 rounding."""
    factory, hyperparameters = FACTORIES[name]
    params = jax.tree.map(jnp.asarray, initial_params(np.float32))
    grads = contract_grads()
    injected = optax.inject_hyperparams(factory)(**hyperparameters)
    got = eager_updates(injected, grads, params)
    want = eager_updates(factory(**hyperparameters), grads, params)
    numeric = {k for k, v in hyperparameters.items() if not isinstance(v, bool)}
    assert numeric <= set(injected.init(params).hyperparams)
    for step_got, step_want in zip(got, want, strict=True):
        for a, b in zip(step_got, step_want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite_skips_a_nan_step_of_every_factory(name):
    """A NaN gradient gives zero updates and leaves the inner state as it was: the steps after it
    are those of the optimizer that never saw it (to float32 rounding: the step inside
    apply_if_finite's lax.cond may be compiled differently)."""
    params = jax.tree.map(jnp.asarray, initial_params(np.float32))
    grads = contract_grads(3)
    poisoned = [grads[0], jax.tree.map(lambda g: g * jnp.nan, grads[1]), grads[1], grads[2]]
    wrapped = optax.apply_if_finite(every_transformation()[name], max_consecutive_errors=2)
    got = eager_updates(wrapped, poisoned, params, jit=True)
    want = eager_updates(every_transformation()[name], grads, params, jit=True)
    assert all(np.all(u == 0) for u in got[1])
    for step_got, step_want in zip([got[0], *got[2:]], want, strict=True):
        for a, b in zip(step_got, step_want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_masked_applies_every_factory_to_the_masked_leaves_only(name):
    """optax.masked: the masked-in leaves get the optimizer's updates for that sub-tree alone,
    the others pass their gradients through unchanged."""
    params = jax.tree.map(jnp.asarray, initial_params(np.float32))
    grads = contract_grads()
    mask = {"conv": [True], "dense": {"b": False, "w": True}, "scale": False}
    got = eager_updates(optax.masked(every_transformation()[name], mask), grads, params)

    def sub(tree):
        return {"conv": tree["conv"], "w": tree["dense"]["w"]}

    want = eager_updates(every_transformation()[name], [sub(g) for g in grads], sub(params))
    for t, (step_got, step_want) in enumerate(zip(got, want, strict=True)):
        conv, b, w, scale = step_got  # leaves sort by key: conv[0], dense.b, dense.w, scale
        np.testing.assert_array_equal(conv, step_want[0])
        np.testing.assert_array_equal(w, step_want[1])
        np.testing.assert_array_equal(b, np.asarray(grads[t]["dense"]["b"], np.float64))
        np.testing.assert_array_equal(scale, np.asarray(grads[t]["scale"], np.float64))


@pytest.mark.parametrize("name", NAMES)
def test_multi_steps_of_every_factory_steps_on_the_mean_gradient(name):
    """optax.MultiSteps(k=2) on each gradient given twice: a zero update, then the optimizer's own
    step on their mean (the gradient itself), to float32 rounding (its lax.cond may compile the
    step differently)."""
    params = jax.tree.map(jnp.asarray, initial_params(np.float32))
    grads = contract_grads(3)
    wrapped = optax.MultiSteps(every_transformation()[name], every_k_schedule=2)
    got = eager_updates(wrapped, [g for g in grads for _ in range(2)], params, jit=True)
    want = eager_updates(every_transformation()[name], grads, params, jit=True)
    assert all(np.all(u == 0) for step in got[0::2] for u in step)
    for step_got, step_want in zip(got[1::2], want, strict=True):
        for a, b in zip(step_got, step_want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
