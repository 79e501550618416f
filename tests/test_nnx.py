"""jstep.nnx.BatchNorm against flax.nnx.BatchNorm: the same variables, values, gradients,
running statistics and modes, and weights that load into either layer.

The reference is Flax's own layer with ``use_fast_variance=False`` (its two-pass variance), so
the two differ only by float32 rounding; jstep's gradient is the notes' derivation, Flax's is
autodiff. Multi-device runs are in tests/test_layers_devices.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from layer_checks import close, trees_close

import jstep.nnx

FEATURES = 6
RNG = np.random.default_rng(0)
BATCHES = [RNG.normal(1.5 * i, 1.0 + i, (12, FEATURES)).astype(np.float32) for i in range(3)]
WEIGHTS = RNG.normal(size=(12, FEATURES)).astype(np.float32)  # the loss is sum(sin(y) * w)


def pair(**options):
    """(jstep's layer, Flax's layer), built alike; Flax's computes its variance in two passes."""
    ours = jstep.nnx.BatchNorm(FEATURES, rngs=nnx.Rngs(0), **options)
    theirs = nnx.BatchNorm(FEATURES, rngs=nnx.Rngs(0), use_fast_variance=False, **options)
    return ours, theirs


def describe(model):
    """{path: (variable type, shape, dtype)} of a layer's state."""
    return {path: (type(v).__name__, v.shape, v.dtype) for path, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_scale": False},
        {"use_bias": False, "param_dtype": jnp.bfloat16},
        {"scale_init": nnx.initializers.normal(), "bias_init": nnx.initializers.normal()},
    ],
    ids=["default", "no scale", "bfloat16 params, no bias", "random init"],
)
def test_variables_are_flaxs(options):
    """Same paths, variable types, shapes, dtypes and initial values (random inits included)."""
    ours, theirs = pair(**options)
    assert describe(ours) == describe(theirs)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(ours)), nnx.to_pure_dict(nnx.state(theirs)))


@nnx.jit
def train_step(model, x, w, mask=None):
    """(y, dL/dParams, dL/dx) of one training call; the running statistics update in place."""
    y = model(x, mask=mask)
    param_grads, x_grad = nnx.grad(lambda model, x: jnp.sum(jnp.sin(model(x, mask=mask)) * w), argnums=(0, 1))(
        nnx.clone(model), x
    )
    return y, param_grads, x_grad


@pytest.mark.parametrize(
    ("options", "shape"),
    [({"momentum": 0.8}, (12, FEATURES)), ({"axis": 1, "epsilon": 1e-3}, (4, FEATURES, 3))],
    ids=["features last", "features on axis 1"],
)
def test_training_values_gradients_and_running_statistics_over_steps(options, shape):
    ours, theirs = pair(**options)
    w = WEIGHTS.reshape(shape)
    for batch in BATCHES:
        x = batch.reshape(shape)
        (y1, g1, dx1), (y2, g2, dx2) = train_step(ours, x, w), train_step(theirs, x, w)
        close(y1, y2)
        close(dx1, dx2, tol=1e-5)
        trees_close(nnx.to_pure_dict(g1), nnx.to_pure_dict(g2), tol=1e-5)
        close(ours.mean[...], theirs.mean[...])
        close(ours.var[...], theirs.var[...], tol=1e-5)
    ours.eval(), theirs.eval()
    x = BATCHES[0].reshape(shape)
    close(ours(x), theirs(x))


@pytest.mark.parametrize(
    "mask",
    [RNG.random((12, 1)) < 0.6, RNG.random((12, FEATURES)) < 0.5],
    ids=["examples masked", "values masked, a different count per feature"],
)
def test_mask_takes_the_statistics_over_the_true_values(mask):
    """Values, gradients and running statistics as Flax's layer with the same mask."""
    ours, theirs = pair(momentum=0.8)
    for x in BATCHES[1:]:
        (y1, g1, dx1), (y2, g2, dx2) = train_step(ours, x, WEIGHTS, mask), train_step(theirs, x, WEIGHTS, mask)
        close(y1, y2)
        close(dx1, dx2, tol=1e-5)
        trees_close(nnx.to_pure_dict(g1), nnx.to_pure_dict(g2), tol=1e-5)
        close(ours.mean[...], theirs.mean[...])
        close(ours.var[...], theirs.var[...], tol=1e-5)
    # The comparison means something only if the mask changes the statistics:
    masked_mean = np.nanmean(np.where(np.broadcast_to(mask, x.shape), x, np.nan), axis=0)
    assert not np.allclose(masked_mean, x.mean(0), atol=1e-3)


def test_per_example_under_nnx_vmap_equals_the_whole_batch():
    """axis_name under nnx.vmap (one example per call): the whole batch's values, gradients and statistics."""
    whole, per_example = (
        pair(momentum=0.8)[0],
        jstep.nnx.BatchNorm(FEATURES, momentum=0.8, axis_name="batch", rngs=nnx.Rngs(0)),
    )
    mapped = nnx.vmap(lambda model, x: model(x), in_axes=(None, 0), axis_name="batch")
    x = BATCHES[1]

    def loss(model, x, call):
        return jnp.sum(jnp.sin(call(model, x)) * WEIGHTS)

    grads = [
        nnx.grad(loss, argnums=(0, 1))(model, x, call)
        for model, call in [(whole, lambda model, x: model(x)), (per_example, mapped)]
    ]
    close(grads[1][1], grads[0][1], tol=1e-5)
    trees_close(nnx.to_pure_dict(grads[1][0]), nnx.to_pure_dict(grads[0][0]), tol=1e-5)
    close(mapped(per_example, x), whole(x))  # a second step, from the statistics the first one left
    close(per_example.mean[...], whole.mean[...])
    close(per_example.var[...], whole.var[...], tol=1e-5)


def test_modes_follow_eval_train_view_and_the_call():
    ours, theirs = pair()
    x = BATCHES[1]
    statistics = nnx.clone(nnx.state(ours, nnx.BatchStat))
    ours.eval()
    assert ours.use_running_average is True
    close(ours(x), theirs(x, use_running_average=True))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(ours, nnx.BatchStat), statistics)  # unchanged
    ours.train()
    assert ours.use_running_average is False
    close(ours(x), theirs(x))  # training: batch statistics, and the running ones move
    assert not np.allclose(ours.mean[...], statistics["mean"][...])
    close(ours.mean[...], theirs.mean[...])
    evaluating = nnx.view(ours, use_running_average=True)
    close(evaluating(x), theirs(x, use_running_average=True))
    close(ours(x, use_running_average=True), theirs(x, use_running_average=True))
    for layer in ("BatchNorm", "BatchRenorm"):  # the message names the layer it comes from
        with pytest.raises(ValueError, match=rf"No use_running_average was given to jstep\.nnx\.{layer}\. "):
            getattr(jstep.nnx, layer)(FEATURES, use_running_average=None, rngs=nnx.Rngs(0))(x)


def test_bfloat16_activations_with_float32_params_follow_flaxs_dtype_policy():
    """dtype=None promotes (a float32 result); dtype=bfloat16 gives bfloat16."""
    x = jnp.asarray(BATCHES[2], jnp.bfloat16)
    ours, theirs = pair()
    close(ours(x), theirs(x))  # both normalize the same bfloat16 values in float32
    close(ours.var[...], theirs.var[...], tol=1e-5)
    ours, theirs = pair(dtype=jnp.bfloat16)
    close(ours(x), theirs(x), tol=2e-2)  # Flax does part of the arithmetic in bfloat16
    assert ours.mean[...].dtype == jnp.float32
    close(ours.mean[...], theirs.mean[...], tol=1e-5)


def test_weights_swap_both_ways():
    """Flax's trained state loaded into jstep's layer gives Flax's outputs, and back."""
    _, trained = pair(scale_init=nnx.initializers.normal(), bias_init=nnx.initializers.normal())
    for x in BATCHES:
        trained(x)
    ours, _ = pair()
    nnx.update(ours, nnx.state(trained))
    close(ours(BATCHES[0], use_running_average=True), trained(BATCHES[0], use_running_average=True))
    fresh = nnx.BatchNorm(FEATURES, rngs=nnx.Rngs(1), use_fast_variance=False)
    nnx.update(fresh, nnx.state(ours))
    close(fresh(BATCHES[1]), ours(BATCHES[1]))
    close(fresh.var[...], ours.var[...])


def test_momentum_one_keeps_the_running_statistics_as_flax():
    """momentum=1 (Flax accepts it; PyTorch's momentum=0): training normalizes with the batch's
    statistics and leaves the running ones where they were, as Flax's layer does."""
    ours, theirs = pair(momentum=1.0)
    for x in BATCHES:
        close(ours(x), theirs(x))
    close(ours.mean[...], theirs.mean[...])
    close(ours.var[...], theirs.var[...])
    np.testing.assert_array_equal(ours.mean[...], np.zeros(FEATURES))
    np.testing.assert_array_equal(ours.var[...], np.ones(FEATURES))


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.5"):
        jstep.nnx.BatchNorm(FEATURES, momentum=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="eps"):
        jstep.nnx.BatchNorm(FEATURES, epsilon=-1e-5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_features"):
        jstep.nnx.BatchNorm(0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_features=6"):
        jstep.nnx.BatchNorm(FEATURES, rngs=nnx.Rngs(0))(np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match="axis_name"):
        jstep.nnx.BatchNorm(FEATURES, axis_index_groups=[[0, 1]], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"axis_index_groups=\[\[0, 1\], \[2\]\] has groups of sizes \[1, 2\]"):
        jstep.nnx.BatchNorm(FEATURES, axis_name="batch", axis_index_groups=[[0, 1], [2]], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"each index 0\.\.3 exactly once.*repeated: \[1\], missing: \[3\]"):
        jstep.nnx.BatchNorm(FEATURES, axis_name="batch", axis_index_groups=[[0, 1], [1, 2]], rngs=nnx.Rngs(0))


@pytest.mark.parametrize("eps_in_sqrt", [False, True])
def test_eps_in_sqrt_against_a_float64_transcription(eps_in_sqrt):
    """jstep's own option (Flax has none to compare with): eps_in_sqrt=False is the notes'
    G (x - mu) / (sigma + eps) + B, in training (values, dL/dx, running statistics over three
    steps) and in evaluation; a large eps (0.1) makes the two forms differ by percents."""
    import layer_reference as ref

    bn = jstep.nnx.BatchNorm(
        FEATURES,
        momentum=0.8,
        epsilon=0.1,
        eps_in_sqrt=eps_in_sqrt,
        rngs=nnx.Rngs(0),
        scale_init=nnx.initializers.normal(),
    )
    options = {"momentum": 0.8, "eps": 0.1, "eps_in_sqrt": eps_in_sqrt}
    scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
    mean, var = np.zeros(FEATURES), np.ones(FEATURES)
    for x in BATCHES:
        y, _, dx = train_step(bn, x, WEIGHTS)
        want_y, want_dx, mean, var = ref.training(x, WEIGHTS, scale, bias, mean, var, reduce=(0,), **options)
        ref.assert_close(y, want_y)
        ref.assert_close(dx, want_dx)
        ref.assert_close(bn.mean[...], mean[0])
        ref.assert_close(bn.var[...], var[0])
    bn.eval()
    x = BATCHES[1]
    ref.assert_close(bn(x), ref.evaluation(x, scale, bias, mean, var, eps=0.1, eps_in_sqrt=eps_in_sqrt))


# ------------------------------------------------- NumPy integer sizes; settings of a wrong type


def test_numpy_integer_sizes_and_axis_are_accepted_as_flax_accepts_them():
    ours = jstep.nnx.BatchNorm(np.int64(FEATURES), axis=np.int64(-1), momentum=0.8, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(
        np.int64(FEATURES), axis=np.int64(-1), momentum=0.8, use_fast_variance=False, rngs=nnx.Rngs(0)
    )
    assert ours.num_features == FEATURES and type(ours.num_features) is int
    assert describe(ours) == describe(theirs)
    for x in BATCHES[:2]:
        close(ours(x), theirs(x))
    close(ours.var[...], theirs.var[...], tol=1e-5)


# Every setting with values of a wrong type (a string from a config file, None, a list) where that
# type is not allowed: use_running_average and dtype take None, axis_name a string.
WRONG_TYPES = {
    "num_features": ["6", None, [6], 6.0, True],
    "use_running_average": ["False", [False], 0],
    "axis": ["-1", None, ["-1"], 1.0, True],
    "momentum": ["0.99", None, [0.99], True],
    "epsilon": ["1e-5", None, [1e-5], True],
    "dtype": ["float33", [jnp.float32], jnp.int32],
    "param_dtype": ["float33", None, [jnp.float32]],
    "use_bias": ["True", None, [True], 1],
    "use_scale": ["True", None, [True]],
    "bias_init": ["zeros", None, [nnx.initializers.zeros]],
    "scale_init": ["ones", None],
    "axis_name": [{"batch": 0}, [["batch"]]],
    "axis_index_groups": ["[[0, 1]]", [0, 1]],
    "use_fast_variance": ["True", None],
    "promote_dtype": ["float32", None],
    "bias_metadata": ["sharding", [("sharding", None)]],
    "scale_metadata": [None],
    "eps_in_sqrt": ["True", None, [True]],
}


@pytest.mark.parametrize(
    ("argument", "value"), [(argument, value) for argument, values in WRONG_TYPES.items() for value in values]
)
def test_a_setting_of_the_wrong_type_is_refused_at_construction_naming_it(argument, value):
    settings = {"axis_name": "batch"} if argument == "axis_index_groups" else {}
    settings[argument] = value
    with pytest.raises((TypeError, ValueError), match=rf"^{argument}\b") as raised:
        jstep.nnx.BatchNorm(**{"num_features": FEATURES, "rngs": nnx.Rngs(0), **settings})
    assert repr(value) in str(raised.value)
