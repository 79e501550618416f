"""jstep.equinox.BatchNorm against equinox.nn.BatchNorm in each mode ("batch", "ema" and Equinox's
default "legacy"): a subclass of Equinox's layer with the same fields and state, values and
gradients per example under jax.vmap, running statistics and inference, leaves and state that
load into either layer, and every setting checked when the layer is built.

Equinox's layer computes a two-pass variance like jstep's, so the two differ only by float32
rounding; jstep's gradient is the notes' derivation, Equinox's is autodiff. Multi-device runs
are in tests/test_layers_devices.py.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from layer_checks import close, trees_close

import jstep._layers
import jstep.equinox

CHANNELS = 5
RNG = np.random.default_rng(2)
BATCHES = [RNG.normal(1.5 * i, 1.0 + i, (8, CHANNELS, 3)).astype(np.float32) for i in range(3)]  # (N, C, L)
WEIGHTS = RNG.normal(size=(8, CHANNELS, 3)).astype(np.float32)  # the loss is sum(sin(y) * w)


def pair(mode="batch", **options):
    """((jstep's layer, state), (Equinox's layer, state)), built alike with make_with_state."""
    ours = eqx.nn.make_with_state(jstep.equinox.BatchNorm)(CHANNELS, "batch", mode=mode, **options)
    theirs = eqx.nn.make_with_state(eqx.nn.BatchNorm)(CHANNELS, "batch", mode=mode, **options)
    return ours, theirs


def over_batch(model, x, state, **call):
    """The layer applied per example under jax.vmap(axis_name="batch"): (y, new state)."""
    return jax.vmap(lambda x, state: model(x, state, **call), axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        x, state
    )


def leaves_by_path(tree):
    """{path: (type, shape, dtype)} of a pytree's leaves (arrays, and Equinox's axis_name and inference)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(p): (type(v), np.shape(v), getattr(v, "dtype", None)) for p, v in leaves}


@pytest.mark.parametrize("options", [{}, {"channelwise_affine": False}, {"dtype": jnp.bfloat16}])
def test_fields_and_state_are_equinoxs(options):
    (ours, ours_state), (theirs, theirs_state) = pair(**options)
    assert leaves_by_path(ours) == leaves_by_path(theirs)  # weight, bias, axis_name, inference
    assert jax.tree.structure(ours_state) == jax.tree.structure(theirs_state)  # same StateIndex keys
    jax.tree.map(np.testing.assert_array_equal, ours_state, theirs_state)
    for got, want in zip(
        jax.tree.leaves(eqx.filter(ours, eqx.is_array)), jax.tree.leaves(eqx.filter(theirs, eqx.is_array)), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    assert isinstance(ours, eqx.nn.StatefulLayer) and ours.is_stateful()


@eqx.filter_jit
def train_step(model, state, x, w):
    """(y, new state, d loss / d model's arrays, d loss / dx) for the batch x, example by example."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(params, x):
        y, new_state = over_batch(eqx.combine(params, static), x, state)
        return jnp.sum(jnp.sin(y) * w), (y, new_state)

    (_, (y, new_state)), (grads, dx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, new_state, grads, dx


@pytest.mark.parametrize("options", [{"momentum": 0.8}, {"eps": 1e-3, "channelwise_affine": False}])
def test_training_values_gradients_running_statistics_and_inference(options):
    (ours, ours_state), (theirs, theirs_state) = pair(**options)
    for x in BATCHES:
        y1, ours_state, grads1, dx1 = train_step(ours, ours_state, x, WEIGHTS)
        y2, theirs_state, grads2, dx2 = train_step(theirs, theirs_state, x, WEIGHTS)
        close(y1, y2)
        close(dx1, dx2, tol=1e-5)
        trees_close(jax.tree.leaves(grads1), jax.tree.leaves(grads2), tol=1e-5)
        trees_close(jax.tree.leaves(ours_state), jax.tree.leaves(theirs_state), tol=1e-5)
    assert int(jax.tree.leaves(ours_state)[0]) == len(BATCHES)  # the step count Equinox debiases with
    inference = {"inference": True}
    close(
        over_batch(ours, BATCHES[1], ours_state, **inference)[0],
        over_batch(theirs, BATCHES[1], theirs_state, **inference)[0],
    )
    (ours, ours_fresh), (theirs, theirs_fresh) = pair(**options)  # t = 0: no debiasing, mean 0 and var 1
    eps = options.get("eps", 1e-5)
    close(over_batch(ours, BATCHES[1], ours_fresh, **inference)[0], BATCHES[1] / np.sqrt(np.float32(1 + eps)))
    close(
        over_batch(ours, BATCHES[1], ours_fresh, **inference)[0],
        over_batch(theirs, BATCHES[1], theirs_fresh, **inference)[0],
    )


def test_inference_mode_and_the_call_argument():
    (ours, ours_state), (theirs, theirs_state) = pair()
    x = BATCHES[2]
    _, ours_state = over_batch(ours, x, ours_state)
    _, theirs_state = over_batch(theirs, x, theirs_state)
    inferring = eqx.nn.inference_mode(ours)
    assert inferring.inference is True
    y, same_state = over_batch(inferring, BATCHES[0], ours_state)
    close(y, over_batch(eqx.nn.inference_mode(theirs), BATCHES[0], theirs_state)[0])
    trees_close(jax.tree.leaves(same_state), jax.tree.leaves(ours_state), tol=0)
    y, _ = over_batch(inferring, BATCHES[0], same_state, inference=False)  # the call overrides the field
    close(y, over_batch(theirs, BATCHES[0], theirs_state)[0])


def test_bfloat16_examples_with_float32_weights_give_float32_as_equinox():
    """The result is float32, as Equinox's. jstep's statistics are float32 (Equinox's are bfloat16
    here): its result is Equinox's on the same values cast to float32, and Equinox's own within
    bfloat16 rounding."""
    (ours, ours_state), (theirs, theirs_state) = pair()
    x = jnp.asarray(BATCHES[2], jnp.bfloat16)
    y, state = over_batch(ours, x, ours_state)
    y32, state32 = over_batch(theirs, x.astype(jnp.float32), theirs_state)
    close(y, y32)
    trees_close(jax.tree.leaves(state), jax.tree.leaves(state32), tol=1e-5)
    _, (_, theirs_fresh) = pair()
    close(y, over_batch(theirs, x, theirs_fresh)[0], tol=2e-2)


def test_leaves_and_state_swap_both_ways():
    """A model's leaves and state trained by Equinox's layer give its outputs in jstep's, and back."""
    (ours, ours_state), (theirs, theirs_state) = pair(momentum=0.5)
    key = jax.random.key(3)
    theirs = eqx.tree_at(lambda m: (m.weight, m.bias), theirs, tuple(jax.random.normal(key, (2, CHANNELS))))
    for x in BATCHES:
        _, theirs_state = over_batch(theirs, x, theirs_state)
    loaded = jax.tree.unflatten(jax.tree.structure(ours), jax.tree.leaves(theirs))
    loaded_state = jax.tree.unflatten(jax.tree.structure(ours_state), jax.tree.leaves(theirs_state))
    for call in ({"inference": True}, {}):
        close(
            over_batch(loaded, BATCHES[0], loaded_state, **call)[0],
            over_batch(theirs, BATCHES[0], theirs_state, **call)[0],
        )
    for x in BATCHES:
        _, loaded_state = over_batch(loaded, x, loaded_state)
    back = jax.tree.unflatten(jax.tree.structure(theirs_state), jax.tree.leaves(loaded_state))
    close(
        over_batch(theirs, BATCHES[2], back, inference=True)[0],
        over_batch(loaded, BATCHES[2], loaded_state, inference=True)[0],
    )


def test_momentum_one_in_ema_mode_keeps_the_first_batchs_statistics_as_equinox():
    """momentum=1 (Equinox accepts it): mode "ema" takes the first batch's statistics and keeps
    them; the outputs and the state equal Equinox's over three training calls and inference."""
    (ours, ours_state), (theirs, theirs_state) = pair(mode="ema", momentum=1.0)
    for x in BATCHES:
        y_ours, ours_state = over_batch(ours, x, ours_state)
        y_theirs, theirs_state = over_batch(theirs, x, theirs_state)
        close(y_ours, y_theirs)
    trees_close(ours_state, theirs_state)
    close(
        over_batch(ours, BATCHES[0], ours_state, inference=True)[0],
        over_batch(theirs, BATCHES[0], theirs_state, inference=True)[0],
    )


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        jstep.equinox.BatchNorm(CHANNELS, "batch", mode="emma")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.5"):
        jstep.equinox.BatchNorm(CHANNELS, "batch", momentum=1.5, mode="ema")
    with pytest.raises(ValueError, match=r"momentum=1 with mode='batch': inference divides .* by 1 - momentum\^t = 0"):
        jstep.equinox.BatchNorm(CHANNELS, "batch", momentum=1.0, mode="batch")
    with pytest.raises(ValueError, match="eps"):
        jstep.equinox.BatchNorm(CHANNELS, "batch", eps=-1.0)
    with pytest.raises(ValueError, match="axis_name"):
        jstep.equinox.BatchNorm(CHANNELS, None)
    with pytest.raises(ValueError, match="input_size"):
        jstep.equinox.BatchNorm(0, "batch")
    model, state = eqx.nn.make_with_state(jstep.equinox.BatchNorm)(CHANNELS, "batch", mode="batch")
    with pytest.raises(ValueError, match="input_size=5"):
        over_batch(model, np.ones((4, 3, 2), np.float32), state)


@pytest.mark.parametrize("eps_in_sqrt", [False, True])
def test_eps_in_sqrt_against_a_float64_transcription(eps_in_sqrt):
    """jstep's own option (Equinox has none to compare with): eps_in_sqrt=False is the notes'
    G (x - mu) / (sigma + eps) + B over the vmapped batch and the length axis, in values, dL/dx
    and the running statistics over three steps; a large eps (0.1) makes the two forms differ
    by percents. (Inference debiases the running statistics as Equinox does, tested above.)"""
    import layer_reference as ref

    model, state = eqx.nn.make_with_state(jstep.equinox.BatchNorm)(
        CHANNELS, "batch", eps=0.1, momentum=0.8, mode="batch", eps_in_sqrt=eps_in_sqrt
    )
    model = eqx.tree_at(lambda m: m.weight, model, jnp.linspace(0.5, 2.0, CHANNELS))
    scale = np.asarray(model.weight)[None, :, None]
    bias = np.zeros((1, CHANNELS, 1))
    mean, var = np.zeros((1, CHANNELS, 1)), np.ones((1, CHANNELS, 1))
    options = {"momentum": 0.8, "eps": 0.1, "eps_in_sqrt": eps_in_sqrt}
    for x in BATCHES:
        y, state, _, dx = train_step(model, state, x, WEIGHTS)
        want_y, want_dx, mean, var = ref.training(x, WEIGHTS, scale, bias, mean, var, reduce=(0, 2), **options)
        ref.assert_close(y, want_y)
        ref.assert_close(dx, want_dx)
        running_mean, running_var = state.get(model.batch_state_index)
        ref.assert_close(running_mean, mean[0, :, 0])
        ref.assert_close(running_var, var[0, :, 0])


# ---------------------------------------------------------------- Equinox's modes and its default


def make_pair(mode, **options):
    """`pair`, for any mode; "legacy" (Equinox's default, left unspecified) warns in both layers."""
    if mode != "legacy":
        return pair(mode, **options)
    with pytest.warns(UserWarning, match="mode"):
        ours = eqx.nn.make_with_state(jstep.equinox.BatchNorm)(CHANNELS, "batch", **options)
    with pytest.warns(UserWarning, match="mode"):
        theirs = eqx.nn.make_with_state(eqx.nn.BatchNorm)(CHANNELS, "batch", **options)
    return ours, theirs


@pytest.mark.parametrize("mode", ["ema", "legacy", "batch"])
@pytest.mark.parametrize("options", [{"momentum": 0.8}, {"eps": 1e-3, "channelwise_affine": False, "momentum": 0.5}])
def test_each_mode_equals_equinox_over_training_steps_then_inference(mode, options):
    """Values, gradients (of the weights and of x) and state over four training steps, then
    inference: the same inputs in jstep's layer and Equinox's, equal to float32 rounding."""
    (ours, ours_state), (theirs, theirs_state) = make_pair(mode, **options)
    assert ours.mode == theirs.mode == ("batch" if mode == "batch" else "ema")
    before = over_batch(ours, BATCHES[0], ours_state, inference=True)[0]  # ema: zeros before training
    close(before, over_batch(theirs, BATCHES[0], theirs_state, inference=True)[0])
    for x in [*BATCHES, 3 * BATCHES[0] - 2]:
        y1, ours_state, grads1, dx1 = train_step(ours, ours_state, x, WEIGHTS)
        y2, theirs_state, grads2, dx2 = train_step(theirs, theirs_state, x, WEIGHTS)
        close(y1, y2)
        close(dx1, dx2, tol=1e-5)
        trees_close(jax.tree.leaves(grads1), jax.tree.leaves(grads2), tol=1e-5)
        trees_close(jax.tree.leaves(ours_state), jax.tree.leaves(theirs_state), tol=1e-5)
    for x in BATCHES:
        close(
            over_batch(ours, x, ours_state, inference=True)[0],
            over_batch(theirs, x, theirs_state, inference=True)[0],
        )


def test_the_default_mode_is_equinoxs_and_the_first_steps_differ_from_batch():
    """Left unspecified, the mode is Equinox's default: "ema", with Equinox's warning and state.
    From the second training step on "ema" normalizes with averaged statistics, so the output
    differs from "batch" (what jstep ran before) by far more than rounding."""
    (ours, ours_state), (theirs, theirs_state) = make_pair("legacy")
    assert jax.tree.structure(ours_state) == jax.tree.structure(theirs_state)
    (batch, batch_state), _ = pair("batch")
    for x in BATCHES[:2]:
        y, ours_state = over_batch(ours, x, ours_state)
        y_theirs, theirs_state = over_batch(theirs, x, theirs_state)
        y_batch, batch_state = over_batch(batch, x, batch_state)
        close(y, y_theirs)
    assert np.max(np.abs(y - y_batch)) > 0.1


class EquinoxExampleModel(eqx.Module):
    """Equinox's examples' shape of a model: the state is threaded through the layers that are
    ``isinstance(layer, eqx.nn.BatchNorm)``, every other layer is called plainly."""

    layers: tuple

    def __init__(self, norm, key, **norm_options):
        first, second = jax.random.split(key)
        self.layers = (
            eqx.nn.Linear(3, 4, key=first),
            norm(4, axis_name="batch", **norm_options),
            jax.nn.relu,
            eqx.nn.Linear(4, 2, key=second),
        )

    def __call__(self, x, state):
        for layer in self.layers:
            if isinstance(layer, eqx.nn.BatchNorm):
                x, state = layer(x, state)
            else:
                x = layer(x)
        return x, state


@pytest.mark.parametrize("mode", ["ema", "batch"])
def test_equinox_example_threads_the_state_through_jstep_layer(mode):
    """isinstance(layer, eqx.nn.BatchNorm) holds, so an Equinox-example training loop runs with
    jstep's layer in place of Equinox's and trains the same: losses, weights and state."""
    assert isinstance(jstep.equinox.BatchNorm(2, "batch", mode=mode), eqx.nn.BatchNorm)
    x = jnp.asarray(RNG.normal(1.0, 2.0, (16, 3)), jnp.float32)
    target = jnp.sin(x[:, :2])
    optimizer = optax.sgd(0.1)

    @eqx.filter_jit
    def step(model, state, opt_state):
        def loss(model, state):
            y, state = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
            return jnp.mean((y - target) ** 2), state

        (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model, state)
        updates, opt_state = optimizer.update(grads, opt_state)
        return eqx.apply_updates(model, updates), state, opt_state, value

    def train(norm):
        model, state = eqx.nn.make_with_state(EquinoxExampleModel)(norm, jax.random.key(0), momentum=0.7, mode=mode)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        losses = []
        for _ in range(5):
            model, state, opt_state, value = step(model, state, opt_state)
            losses.append(value)
        inferred, _ = jax.vmap(eqx.nn.inference_mode(model), axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            x, state
        )
        return jnp.stack(losses), eqx.filter(model, eqx.is_array), state, inferred

    ours, theirs = train(jstep.equinox.BatchNorm), train(eqx.nn.BatchNorm)
    assert float(ours[0][-1]) < float(ours[0][0])  # it trains
    for got, want in zip(ours, theirs, strict=True):
        trees_close(jax.tree.leaves(got), jax.tree.leaves(want), tol=1e-5)


@pytest.mark.parametrize("mode", ["ema", "batch"])
def test_checkpoints_swap_both_ways_with_equinox_serialisation(mode, tmp_path):
    """eqx.tree_serialise_leaves of (model, state) trained with Equinox's layer loads into jstep's
    with eqx.tree_deserialise_leaves and gives Equinox's outputs and training, and back."""

    def build(norm):
        return eqx.nn.make_with_state(EquinoxExampleModel)(norm, jax.random.key(1), momentum=0.6, mode=mode)

    def run(model, state, x, inference):
        model = eqx.nn.inference_mode(model, inference)
        return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    xs = [jnp.asarray(RNG.normal(0.5 * i, 1.0 + i, (8, 3)), jnp.float32) for i in range(3)]
    for source, target in [(eqx.nn.BatchNorm, jstep.equinox.BatchNorm), (jstep.equinox.BatchNorm, eqx.nn.BatchNorm)]:
        model, state = build(source)
        for x in xs:
            _, state = run(model, state, x, inference=False)
        eqx.tree_serialise_leaves(tmp_path / "checkpoint.eqx", (model, state))
        loaded, loaded_state = eqx.tree_deserialise_leaves(tmp_path / "checkpoint.eqx", build(target))
        assert isinstance(loaded.layers[1], target)
        close(run(loaded, loaded_state, xs[0], inference=True)[0], run(model, state, xs[0], inference=True)[0])
        y_loaded, loaded_state = run(loaded, loaded_state, xs[1], inference=False)
        y, state = run(model, state, xs[1], inference=False)
        close(y_loaded, y)
        trees_close(jax.tree.leaves(loaded_state), jax.tree.leaves(state), tol=1e-6)


def test_numpy_integer_sizes_are_accepted():
    (reference, reference_state), _ = pair()
    ours, ours_state = eqx.nn.make_with_state(jstep.equinox.BatchNorm)(np.int64(CHANNELS), "batch", mode="batch")
    assert ours.input_size == CHANNELS and type(ours.input_size) is int
    close(over_batch(ours, BATCHES[0], ours_state)[0], over_batch(reference, BATCHES[0], reference_state)[0])


# Every setting of the constructor, with values of a wrong type: a string from a config file, None,
# a list (where that type is not allowed: axis_name takes a string or a list of names, dtype None).
WRONG_TYPES = {
    "input_size": ["5", None, [5], 5.0, True],
    "axis_name": [None, {"batch": 0}, [["batch"]]],
    "eps": ["1e-5", None, [1e-5], True],
    "channelwise_affine": ["True", None, [True], 1],
    "momentum": ["0.9", None, [0.9], True],
    "inference": ["False", None, [False], 0],
    "dtype": ["float33", [jnp.float32], jnp.int32],
    "mode": [None, ["ema"], "emma"],
    "eps_in_sqrt": ["True", None, [True]],
}


@pytest.mark.parametrize(
    ("argument", "value"), [(argument, value) for argument, values in WRONG_TYPES.items() for value in values]
)
def test_a_setting_of_the_wrong_type_is_refused_at_construction_naming_it(argument, value):
    settings = {"input_size": CHANNELS, "axis_name": "batch", "mode": "batch", argument: value}
    with pytest.raises((TypeError, ValueError), match=rf"^{argument}\b") as raised:
        jstep.equinox.BatchNorm(**settings)
    assert repr(value) in str(raised.value) or (argument == "axis_name" and value is None)


def plain_ema_step(x, weight, bias, running_mean, running_var, *, first, momentum, eps, eps_in_sqrt):
    """Equinox's "ema" training step for a batch x of shape (N, C), transcribed in plain jnp:
    normalize with the running statistics after averaging the batch's into them."""
    mu = x.mean(axis=0)
    var = ((x - mu) ** 2).mean(axis=0)
    m = mu if first else momentum * running_mean + (1 - momentum) * mu
    v = var if first else momentum * running_var + (1 - momentum) * var
    s = jnp.sqrt(v + eps) if eps_in_sqrt else jnp.sqrt(v) + eps
    return weight * (x - m) / s + bias


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("eps_in_sqrt", [True, False])
@pytest.mark.parametrize("per_example", [False, True], ids=["whole batch", "per example under vmap"])
def test_ema_hand_derived_gradient_against_autodiff_and_finite_differences(first, eps_in_sqrt, per_example):
    """The "ema" step's VJP (of x, the weights and the running statistics) in float64 against
    autodiff of the plain transcription and central differences (jstep.check_vjp)."""
    rng = np.random.default_rng(5)
    x = rng.normal(2.0, 1.5, (6, 3))
    weight, bias = rng.normal(size=3), rng.normal(size=3)
    running_mean, running_var = rng.normal(size=3), 0.5 + rng.random(3)
    settings = {"momentum": 0.7, "eps": 1e-3, "eps_in_sqrt": eps_in_sqrt}
    layer = jstep._layers.core_layer(
        momentum=0.7,
        epsilon=1e-3,
        eps_in_sqrt=eps_in_sqrt,
        feature_axis=-1,
        axis_name="examples" if per_example else None,
        axis_index_groups=None,
    )

    def ours(x, weight, bias, running_mean, running_var):
        def step(x):
            return jstep._layers.normalize_with_average(
                layer, x, weight, bias, running_mean, running_var, first=jnp.asarray(first)
            )[0]

        return jax.vmap(step, axis_name="examples")(x) if per_example else step(x)

    def reference(*args):
        return plain_ema_step(*args, first=first, **settings)

    report = jstep.check_vjp(ours, x, weight, bias, running_mean, running_var, reference=reference, rtol=1e-9)
    assert report.passed


def test_ema_second_derivatives_in_the_weights_are_exact_and_in_x_refused():
    """Second derivatives in the weights and running statistics agree with autodiff of the plain
    transcription; in x (where the backward holds the batch statistics constant) they raise."""
    rng = np.random.default_rng(6)
    x = rng.normal(-1.0, 2.0, (5, 4))
    args = (rng.normal(size=4), rng.normal(size=4), rng.normal(size=4), 0.5 + rng.random(4))
    layer = jstep._layers.core_layer(
        momentum=0.6, epsilon=1e-2, eps_in_sqrt=True, feature_axis=-1, axis_name=None, axis_index_groups=None
    )

    def ours(x, *weights):
        return jstep._layers.normalize_with_average(layer, x, *weights, first=jnp.asarray(False))[0]

    def reference(x, *weights):
        return plain_ema_step(x, *weights, first=False, momentum=0.6, eps=1e-2, eps_in_sqrt=True)

    jstep.check_vjp(lambda *w: ours(x, *w), *args, reference=lambda *w: reference(x, *w), order=2, rtol=1e-9)
    with pytest.raises(NotImplementedError, match=r'second derivatives through the input of Equinox.s mode="ema"'):
        jax.hessian(lambda x: jnp.sum(jnp.sin(ours(x, *args))))(x)


@pytest.mark.parametrize("mode", ["ema", "batch"])
def test_eqx_nn_sequential_threads_the_state_as_for_equinoxs_layer(mode):
    """eqx.nn.Sequential calls a StatefulLayer with the state; jstep's layer gives Equinox's numbers there."""

    def model(norm):
        layers = [eqx.nn.Linear(3, 4, key=jax.random.key(2)), norm(4, "batch", mode=mode), eqx.nn.Lambda(jnp.tanh)]
        return eqx.nn.make_with_state(eqx.nn.Sequential)(layers)

    x = jnp.asarray(RNG.normal(size=(8, 3)), jnp.float32)
    runs = []
    for norm in (jstep.equinox.BatchNorm, eqx.nn.BatchNorm):
        sequential, state = model(norm)
        outputs = []
        for scale in (1.0, 2.0):
            y, state = over_batch(sequential, scale * x, state)
            outputs.append(y)
        runs.append((outputs, state))
    (ours, ours_state), (theirs, theirs_state) = runs
    trees_close(ours, theirs)
    trees_close(jax.tree.leaves(ours_state), jax.tree.leaves(theirs_state), tol=1e-5)
