"""jstep.linen.BatchNorm against flax.linen.BatchNorm: the same collections, init behaviour,
values, gradients, running statistics and evaluation, and variables that load into either layer.

The reference is Flax's own layer with ``use_fast_variance=False`` (its two-pass variance), so
the two differ only by float32 rounding; jstep's gradient is the notes' derivation, Flax's is
autodiff. Multi-device runs are in tests/test_layers_devices.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import close, trees_close

import jstep.linen

RNG = np.random.default_rng(1)
BATCHES = [RNG.normal(1.5 * i, 1.0 + i, (4, 3, 6)).astype(np.float32) for i in range(3)]
WEIGHTS = RNG.normal(size=(4, 3, 6)).astype(np.float32)  # the loss is sum(sin(y) * w)
KEY = jax.random.key(0)


def pair(**fields):
    """(jstep's layer, Flax's layer) with the same fields; Flax's variance is two-pass."""
    return jstep.linen.BatchNorm(**fields), nn.BatchNorm(use_fast_variance=False, **fields)


def describe(variables):
    """{path: (shape, dtype)} of a variables dict."""
    return {jax.tree_util.keystr(p): (v.shape, v.dtype) for p, v in jax.tree_util.tree_leaves_with_path(variables)}


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"axis": (1, 2), "use_scale": False},
        {"param_dtype": jnp.bfloat16, "force_float32_reductions": False, "use_bias": False},
        {"scale_init": nn.initializers.normal(), "bias_init": nn.initializers.normal()},
    ],
    ids=["default", "two feature axes, no scale", "bfloat16 params and statistics", "random init"],
)
def test_init_gives_flaxs_collections_and_leaves_the_statistics_alone(fields):
    """params/{scale,bias}, batch_stats/{mean,var}: same shapes, dtypes and initial values, and
    init (in training mode, with an axis_name that is not bound) does not move the statistics."""
    ours, theirs = pair(use_running_average=False, axis_name="batch", **fields)
    ours_vars, theirs_vars = ours.init(KEY, BATCHES[2]), theirs.init(KEY, BATCHES[2])
    assert describe(ours_vars) == describe(theirs_vars)
    jax.tree.map(np.testing.assert_array_equal, ours_vars, theirs_vars)
    np.testing.assert_array_equal(ours_vars["batch_stats"]["mean"], 0)
    np.testing.assert_array_equal(ours_vars["batch_stats"]["var"], 1)


def train_step(module):
    """(y, new batch_stats, dL/dparams, dL/dx) of one training apply, jitted."""

    def loss(params, batch_stats, x, w, mask):
        variables = {"params": params, "batch_stats": batch_stats}
        options = {} if mask is None else {"mask": mask}  # nn.vmap warns about any keyword argument
        y, updates = module.apply(variables, x, mutable=["batch_stats"], **options)
        return jnp.sum(jnp.sin(y) * w), (y, updates["batch_stats"])

    @jax.jit
    def step(variables, x, w, mask=None):
        (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 2), has_aux=True)(
            variables["params"], variables["batch_stats"], x, w, mask
        )
        return y, stats, grads

    return step


@pytest.mark.parametrize(
    "fields", [{"momentum": 0.8}, {"axis": (1, 2), "epsilon": 1e-3}], ids=["features last", "two feature axes"]
)
def test_training_values_gradients_and_running_statistics_over_steps(fields):
    ours, theirs = pair(use_running_average=False, **fields)
    variables = ours.init(KEY, BATCHES[0])
    ours_vars, theirs_vars = variables, variables
    ours_step, theirs_step = train_step(ours), train_step(theirs)
    for x in BATCHES:
        y1, stats1, grads1 = ours_step(ours_vars, x, WEIGHTS)
        y2, stats2, grads2 = theirs_step(theirs_vars, x, WEIGHTS)
        close(y1, y2)
        trees_close(grads1, grads2, tol=1e-5)
        trees_close(stats1, stats2, tol=1e-5)
        ours_vars, theirs_vars = {**ours_vars, "batch_stats": stats1}, {**theirs_vars, "batch_stats": stats2}
    ours, theirs = pair(use_running_average=True, **fields)
    close(ours.apply(ours_vars, BATCHES[1]), theirs.apply(theirs_vars, BATCHES[1]))


@pytest.mark.parametrize(
    "mask",
    [RNG.random((4, 3, 1)) < 0.6, RNG.random((4, 3, 6)) < 0.5],
    ids=["positions masked", "values masked, a different count per feature"],
)
def test_mask_takes_the_statistics_over_the_true_values(mask):
    """Values, gradients and running statistics as Flax's layer with the same mask."""
    ours, theirs = pair(use_running_average=False, momentum=0.8)
    ours_vars = theirs_vars = ours.init(KEY, BATCHES[0])
    ours_step, theirs_step = train_step(ours), train_step(theirs)
    for x in BATCHES[1:]:
        y1, stats1, grads1 = ours_step(ours_vars, x, WEIGHTS, mask)
        y2, stats2, grads2 = theirs_step(theirs_vars, x, WEIGHTS, mask)
        close(y1, y2)
        trees_close(grads1, grads2, tol=1e-5)
        trees_close(stats1, stats2, tol=1e-5)
        ours_vars, theirs_vars = {**ours_vars, "batch_stats": stats1}, {**theirs_vars, "batch_stats": stats2}
    # The comparison means something only if the mask changes the statistics:
    masked_mean = np.nanmean(np.where(np.broadcast_to(mask, x.shape), x, np.nan), axis=(0, 1))
    assert not np.allclose(masked_mean, x.mean((0, 1)), atol=1e-3)


def test_per_example_under_nn_vmap_equals_the_whole_batch():
    """axis_name under Linen's nn.vmap (one example per call): the whole batch's values, gradients, statistics."""
    per_example = nn.vmap(
        jstep.linen.BatchNorm,
        variable_axes={"params": None, "batch_stats": None},
        split_rngs={"params": False},
        axis_name="batch",
    )(use_running_average=False, momentum=0.8, axis_name="batch")
    whole = jstep.linen.BatchNorm(use_running_average=False, momentum=0.8)
    variables = whole.init(KEY, BATCHES[0])
    assert jax.tree.map(jnp.shape, per_example.init(KEY, BATCHES[0])) == jax.tree.map(jnp.shape, variables)
    (y1, stats1, grads1), (y2, stats2, grads2) = (
        train_step(module)(variables, BATCHES[1], WEIGHTS) for module in (per_example, whole)
    )
    close(y1, y2)
    trees_close(grads1, grads2, tol=1e-5)
    trees_close(stats1, stats2, tol=1e-5)


def test_evaluation_and_the_mode_argument():
    x = BATCHES[1]
    variables = nn.BatchNorm(use_running_average=False).init(KEY, x)
    variables = {**variables, "batch_stats": {"mean": jnp.full(6, 0.5), "var": jnp.full(6, 2.0)}}
    close(
        jstep.linen.BatchNorm(use_running_average=True).apply(variables, x),
        nn.BatchNorm(use_running_average=True).apply(variables, x),
    )
    close(  # the mode given at the call, and batch_stats left immutable: no update is attempted
        jstep.linen.BatchNorm().apply(variables, x, use_running_average=True),
        nn.BatchNorm().apply(variables, x, use_running_average=True),
    )
    with pytest.raises(ValueError, match="use_running_average"):  # given twice: Flax's merge_param error
        jstep.linen.BatchNorm(use_running_average=True).apply(variables, x, use_running_average=False)
    with pytest.raises(Exception, match="batch_stats"):  # training needs a mutable batch_stats, as in Flax
        jstep.linen.BatchNorm(use_running_average=False).apply(variables, x)


def test_bfloat16_activations_with_float32_params_follow_flaxs_dtype_policy():
    """dtype=None gives the promoted float32 (bfloat16 without scale and bias); dtype=bfloat16 gives bfloat16."""
    x = jnp.asarray(BATCHES[2], jnp.bfloat16)
    for fields, tol in [({}, 2e-6), ({"use_scale": False, "use_bias": False}, 1e-2), ({"dtype": jnp.bfloat16}, 1e-2)]:
        ours, theirs = pair(use_running_average=False, **fields)
        variables = ours.init(KEY, x)
        (y1, stats1), (y2, stats2) = (m.apply(variables, x, mutable=["batch_stats"]) for m in (ours, theirs))
        close(y1, y2, tol)
        trees_close(stats1, stats2, tol=1e-5)


def test_variables_swap_both_ways():
    """Variables trained by Flax's layer give Flax's outputs in jstep's, and the other way round."""
    ours, theirs = pair(scale_init=nn.initializers.normal(), bias_init=nn.initializers.normal())
    initial = theirs.init(KEY, BATCHES[0], use_running_average=False)
    for trainer, other in [(theirs, ours), (ours, theirs)]:
        trained = initial
        for x in BATCHES:
            _, stats = trainer.apply(trained, x, use_running_average=False, mutable=["batch_stats"])
            trained = {**trained, **stats}
        for use_running_average in (True, False):
            outputs = [
                m.apply(trained, BATCHES[1], use_running_average=use_running_average, mutable=["batch_stats"])
                for m in (other, trainer)
            ]
            close(outputs[0][0], outputs[1][0])
            trees_close(outputs[0][1], outputs[1][1])


def test_use_fast_variance_is_accepted_and_changes_nothing():
    x = BATCHES[2] + 1e3  # where E[x^2] - E[x]^2 would lose digits; jstep is two-pass either way
    fast, slow = jstep.linen.BatchNorm(use_fast_variance=True), jstep.linen.BatchNorm(use_fast_variance=False)
    variables = fast.init(KEY, x, use_running_average=False)
    (y1, s1), (y2, s2) = (
        m.apply(variables, x, use_running_average=False, mutable=["batch_stats"]) for m in (fast, slow)
    )
    np.testing.assert_array_equal(y1, y2)
    jax.tree.map(np.testing.assert_array_equal, s1, s2)


def test_momentum_one_keeps_the_running_statistics_as_flax():
    """momentum=1 (Flax accepts it): the running statistics stay at their initial values."""
    ours, theirs = pair(momentum=1.0)
    variables = ours.init(KEY, BATCHES[0], use_running_average=False)
    for x in BATCHES:
        (y1, s1), (y2, s2) = (
            m.apply(variables, x, use_running_average=False, mutable=["batch_stats"]) for m in (ours, theirs)
        )
        close(y1, y2)
        trees_close(s1, s2)
    jax.tree.map(np.testing.assert_array_equal, s1["batch_stats"], variables["batch_stats"])


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="momentum"):
        jstep.linen.BatchNorm(momentum=-0.1)
    with pytest.raises(ValueError, match="eps"):
        jstep.linen.BatchNorm(epsilon=-1.0)
    with pytest.raises(ValueError, match="feature_axis"):
        jstep.linen.BatchNorm(axis=3).init(KEY, BATCHES[0], use_running_average=False)
    with pytest.raises(ValueError, match="axis_name"):
        jstep.linen.BatchNorm(axis_index_groups=[[0, 1]])
    with pytest.raises(TypeError, match=r"axis_index_groups=\[0, 1\]: allowed is a list of non-empty lists of ints"):
        jstep.linen.BatchNorm(axis_name="batch", axis_index_groups=[0, 1])
    with pytest.raises(ValueError, match=r"axis_index_groups=\[\[0, 1\], \[2\]\] has groups of sizes \[1, 2\]"):
        jstep.linen.BatchNorm(axis_name="batch", axis_index_groups=[[0, 1], [2]])


def test_axis_index_groups_over_a_vmap_axis_raise_what_jax_lacks():
    """jax.lax.psum takes no index groups over a vmap axis; the layer says so when traced."""
    module = jstep.linen.BatchNorm(use_running_average=False, axis_name="batch", axis_index_groups=[[0, 1], [2, 3]])
    variables = module.init(KEY, BATCHES[0])  # init ignores axis_name and the groups, as Flax's
    apply = jax.vmap(lambda x: module.apply(variables, x, mutable=["batch_stats"]), axis_name="batch")
    with pytest.raises(NotImplementedError, match=r"axis_index_groups=\[\[0, 1\], \[2, 3\]\].*jax\.vmap axis"):
        jax.eval_shape(apply, BATCHES[0])


@pytest.mark.parametrize("eps_in_sqrt", [False, True])
def test_eps_in_sqrt_against_a_float64_transcription(eps_in_sqrt):
    """jstep's own option (Flax has none to compare with): eps_in_sqrt=False is the notes'
    G (x - mu) / (sigma + eps) + B, in training (values, dL/dx, running statistics over three
    steps) and in evaluation; a large eps (0.1) makes the two forms differ by percents."""
    import layer_reference as ref

    fields = {"momentum": 0.8, "epsilon": 0.1, "eps_in_sqrt": eps_in_sqrt, "scale_init": nn.initializers.normal()}
    options = {"momentum": 0.8, "eps": 0.1, "eps_in_sqrt": eps_in_sqrt}
    module = jstep.linen.BatchNorm(use_running_average=False, **fields)
    variables = module.init(KEY, BATCHES[0])
    scale, bias = np.asarray(variables["params"]["scale"]), np.asarray(variables["params"]["bias"])
    mean, var = np.zeros(6), np.ones(6)

    @jax.jit
    def step(variables, x):
        def loss(x):
            y, updates = module.apply(variables, x, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y) * WEIGHTS), (y, updates["batch_stats"])

        (_, (y, stats)), dx = jax.value_and_grad(loss, has_aux=True)(x)
        return y, stats, dx

    for x in BATCHES:
        y, stats, dx = step(variables, x)
        want_y, want_dx, mean, var = ref.training(x, WEIGHTS, scale, bias, mean, var, reduce=(0, 1), **options)
        ref.assert_close(y, want_y)
        ref.assert_close(dx, want_dx)
        ref.assert_close(stats["mean"], mean[0, 0])
        ref.assert_close(stats["var"], var[0, 0])
        variables = {**variables, "batch_stats": stats}
    evaluate = jstep.linen.BatchNorm(use_running_average=True, **fields)
    x = BATCHES[1]
    want = ref.evaluation(x, scale, bias, mean, var, eps=0.1, eps_in_sqrt=eps_in_sqrt)
    ref.assert_close(evaluate.apply(variables, x), want)


# ---------------------------------------------- NumPy integer axes; settings of a wrong type


def test_numpy_integer_axes_are_accepted_as_flax_accepts_them():
    """Linen takes no sizes (they come from x); its axis may be a NumPy integer, alone or in a tuple."""
    for axis in [np.int64(-1), (np.int64(1), np.int64(2))]:
        ours, theirs = pair(use_running_average=False, axis=axis, momentum=0.8)
        variables = ours.init(KEY, BATCHES[0])
        assert describe(variables) == describe(theirs.init(KEY, BATCHES[0]))
        y, stats = ours.apply(variables, BATCHES[1], mutable=["batch_stats"])
        y_flax, stats_flax = theirs.apply(variables, BATCHES[1], mutable=["batch_stats"])
        close(y, y_flax)
        trees_close(stats, stats_flax, tol=1e-5)


# Every field with values of a wrong type (a string from a config file, None, a list) where that
# type is not allowed: use_running_average, dtype and axis_name take None, axis_name a string.
WRONG_TYPES = {
    "use_running_average": ["False", [False], 0],
    "axis": ["-1", None, ["-1"], 1.0, True],
    "momentum": ["0.99", None, [0.99], True],
    "epsilon": ["1e-5", None, [1e-5], True],
    "dtype": ["float33", [jnp.float32], jnp.int32],
    "param_dtype": ["float33", None, [jnp.float32]],
    "use_bias": ["True", None, [True], 1],
    "use_scale": ["True", None, [True]],
    "bias_init": ["zeros", None, [nn.initializers.zeros]],
    "scale_init": ["ones", None],
    "axis_name": [{"batch": 0}, [["batch"]]],
    "axis_index_groups": ["[[0, 1]]", [0, 1]],
    "use_fast_variance": ["True", None],
    "force_float32_reductions": ["True", None, [True]],
    "eps_in_sqrt": ["True", None, [True]],
}


@pytest.mark.parametrize(
    ("argument", "value"), [(argument, value) for argument, values in WRONG_TYPES.items() for value in values]
)
def test_a_field_of_the_wrong_type_is_refused_at_construction_naming_it(argument, value):
    fields = {"axis_name": "batch"} if argument == "axis_index_groups" else {}
    fields[argument] = value
    with pytest.raises((TypeError, ValueError), match=rf"^{argument}\b") as raised:
        jstep.linen.BatchNorm(**fields)
    assert repr(value) in str(raised.value)
