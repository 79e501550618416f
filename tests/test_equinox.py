"""jstep.equinox.BatchNorm against equinox.nn.BatchNorm(mode="batch"): the same fields and state,
values and gradients per example under jax.vmap, running statistics and inference, and leaves
and state that load into either layer.

Equinox's layer computes a two-pass variance like jstep's, so the two differ only by float32
rounding; jstep's gradient is the notes' derivation, Equinox's is autodiff. Multi-device runs
are in tests/test_layers_devices.py.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import close, trees_close

import jstep.equinox

CHANNELS = 5
RNG = np.random.default_rng(2)
BATCHES = [RNG.normal(1.5 * i, 1.0 + i, (8, CHANNELS, 3)).astype(np.float32) for i in range(3)]  # (N, C, L)
WEIGHTS = RNG.normal(size=(8, CHANNELS, 3)).astype(np.float32)  # the loss is sum(sin(y) * w)


def pair(**options):
    """((jstep's layer, state), (Equinox's layer, state)), built alike with make_with_state."""
    ours = eqx.nn.make_with_state(jstep.equinox.BatchNorm)(CHANNELS, "batch", **options)
    theirs = eqx.nn.make_with_state(eqx.nn.BatchNorm)(CHANNELS, "batch", mode="batch", **options)
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


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="mode='ema'"):
        jstep.equinox.BatchNorm(CHANNELS, "batch", mode="ema")
    with pytest.raises(ValueError, match="momentum"):
        jstep.equinox.BatchNorm(CHANNELS, "batch", momentum=1.0)
    with pytest.raises(ValueError, match="eps"):
        jstep.equinox.BatchNorm(CHANNELS, "batch", eps=-1.0)
    with pytest.raises(ValueError, match="axis_name"):
        jstep.equinox.BatchNorm(CHANNELS, None)
    with pytest.raises(ValueError, match="input_size"):
        jstep.equinox.BatchNorm(0, "batch")
    model, state = eqx.nn.make_with_state(jstep.equinox.BatchNorm)(CHANNELS, "batch")
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
