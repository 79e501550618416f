"""Ghost batch norm (``virtual_batch_size``): each group of V consecutive examples along the
batch axis normalized with its own statistics, against a float64 reference that reshapes the
batch into its groups and batch-normalizes each with a plain jnp batch norm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jstep

EPS = 0.05
LAYOUTS = [  # (name, shape, feature_axis, V): the batch axis is the first non-feature axis
    ("NHWC, batch axis 0", (8, 3, 4), -1, 4),
    ("notes n x K, batch axis 1", (3, 12), 0, 3),
    ("two feature axes, batch axis 1", (2, 6, 3), (0, 2), 2),
]


def plain_batch_norm(x, scale, offset, axes, eps_in_sqrt, mask=None):
    """Batch norm over `axes` (keepdims statistics), a direct jnp transcription for autodiff."""
    m = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
    count = jnp.sum(m, axis=axes, keepdims=True)
    mean = jnp.sum(jnp.where(m, x, 0), axis=axes, keepdims=True) / count
    var = jnp.sum(jnp.where(m, (x - mean) ** 2, 0), axis=axes, keepdims=True) / count
    s = jnp.sqrt(var + EPS) if eps_in_sqrt else jnp.sqrt(var) + EPS
    return (x - mean) / s * scale + offset, mean, var


def ghost_reference(x, scale, offset, feature_axis, size, eps_in_sqrt, mask=None):
    """(Zhat, the groups' mu, the groups' sigma^2): the batch axis b cut into groups with a
    Python loop over slices b[gV:(g+1)V], each batch-normalized on its own."""
    features = {a % x.ndim for a in ((feature_axis,) if isinstance(feature_axis, int) else feature_axis)}
    b = min(a for a in range(x.ndim) if a not in features)
    axes = tuple(a for a in range(x.ndim) if a not in features)
    keep = tuple(n if a in features else 1 for a, n in enumerate(x.shape))
    scale, offset = scale.reshape(keep), offset.reshape(keep)
    mask = None if mask is None else jnp.broadcast_to(mask, x.shape)
    outputs, means, variances = [], [], []
    for g in range(x.shape[b] // size):
        rows = (slice(None),) * b + (slice(g * size, (g + 1) * size),)
        y, mean, var = plain_batch_norm(x[rows], scale, offset, axes, eps_in_sqrt, None if mask is None else mask[rows])
        outputs.append(y)
        means.append(mean.reshape(tuple(x.shape[a] for a in sorted(features))))
        variances.append(var.reshape(means[-1].shape))
    return jnp.concatenate(outputs, axis=b), jnp.stack(means), jnp.stack(variances)


def inputs(shape, feature_axis, seed=0):
    rng = np.random.default_rng(seed)
    features = (feature_axis,) if isinstance(feature_axis, int) else feature_axis
    feature_shape = tuple(shape[a] for a in features)
    x = rng.normal(1.5, 2.0, shape) + rng.normal(0, 3, (shape[0],) + (1,) * (len(shape) - 1))
    return x, rng.normal(1.0, 0.5, feature_shape), rng.normal(0.0, 0.5, feature_shape)


def a_mask(shape, feature_axis, size, seed=1):
    """About 60% in, and the first two examples of every group in (so each group has K >= 2)."""
    features = {a % len(shape) for a in ((feature_axis,) if isinstance(feature_axis, int) else feature_axis)}
    b = min(a for a in range(len(shape)) if a not in features)
    mask = np.random.default_rng(seed).random(shape) < 0.6
    for start in range(0, shape[b], size):
        mask[(slice(None),) * b + (slice(start, start + 2),)] = True
    return mask


def max_rel(got, want):
    got, want = np.asarray(got), np.asarray(want)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


OPTIONS = [(True, False), (False, False), (True, True), (False, True)]
OPTION_IDS = ["sqrt(var+eps)", "sigma+eps", "sqrt(var+eps)-masked", "sigma+eps-masked"]


@pytest.mark.parametrize(("name", "shape", "feature_axis", "size"), LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
@pytest.mark.parametrize(("eps_in_sqrt", "masked"), OPTIONS, ids=OPTION_IDS)
def test_values_statistics_gradients_and_tangents_are_each_groups(name, shape, feature_axis, size, eps_in_sqrt, masked):
    with jax.enable_x64(True):
        x, scale, offset = inputs(shape, feature_axis)
        mask = a_mask(shape, feature_axis, size) if masked else None
        kw = {"feature_axis": feature_axis, "eps": EPS, "eps_in_sqrt": eps_in_sqrt, "mask": mask}

        def ours(x, scale, offset):
            return jstep.batch_norm(x, scale, offset, virtual_batch_size=size, **kw)

        def reference(x, scale, offset):
            return ghost_reference(x, scale, offset, feature_axis, size, eps_in_sqrt, mask)[0]

        assert max_rel(jax.jit(ours)(x, scale, offset), reference(x, scale, offset)) < 1e-13
        stats = jstep.batch_stats(x, feature_axis=feature_axis, mask=mask, virtual_batch_size=size)
        _, means, variances = ghost_reference(x, scale, offset, feature_axis, size, eps_in_sqrt, mask)
        assert max_rel(stats[0], means) < 1e-13 and max_rel(stats[1], variances) < 1e-13
        dy = np.random.default_rng(2).normal(size=shape)
        got = jax.vjp(ours, x, scale, offset)[1](dy)
        want = jax.vjp(reference, x, scale, offset)[1](dy)
        for g, w in zip(got, want, strict=True):
            assert max_rel(g, w) < 1e-12
        tangents = tuple(np.random.default_rng(3).normal(size=np.shape(a)) for a in (x, scale, offset))
        assert (
            max_rel(jax.jvp(ours, (x, scale, offset), tangents)[1], jax.jvp(reference, (x, scale, offset), tangents)[1])
            < 1e-12
        )


@pytest.mark.parametrize("eps_in_sqrt", [True, False], ids=["sqrt(var+eps)", "sigma+eps"])
def test_first_and_second_order_pass_check_vjp(eps_in_sqrt):
    x, scale, offset = inputs((6, 2, 3), -1, seed=4)

    def f(x, scale, offset):
        return jstep.batch_norm(x, scale, offset, eps=EPS, eps_in_sqrt=eps_in_sqrt, virtual_batch_size=3)

    def reference(x, scale, offset):
        return ghost_reference(x, scale, offset, -1, 3, eps_in_sqrt)[0]

    report = jstep.check_vjp(f, x, scale, offset, reference=reference, order=2, rtol=1e-7)
    assert {c.order for c in report.comparisons} == {1, 2}


def test_one_group_is_batch_norm_and_a_group_of_one_example_is_its_own_batch():
    x, scale, offset = inputs((6, 5), -1, seed=5)
    np.testing.assert_array_equal(
        jstep.batch_norm(x, scale, offset, virtual_batch_size=6), jstep.batch_norm(x, scale, offset)
    )
    # V = 1 with features last: every group holds one value per feature, so Zhat = B.
    np.testing.assert_allclose(
        jstep.batch_norm(x, scale, offset, virtual_batch_size=1), np.broadcast_to(offset, x.shape), rtol=1e-6
    )


def test_layer_running_statistics_average_the_groups_statistics():
    with jax.enable_x64(True):
        x, scale, offset = inputs((12, 3, 2), -1, seed=6)
        bn = jstep.BatchNorm(momentum=0.75, eps=EPS, virtual_batch_size=4)
        params = jstep.BatchNormParams(jnp.asarray(scale), jnp.asarray(offset))
        state = jstep.BatchNormState(jnp.full(2, 0.5), jnp.full(2, 2.0))
        y, new_state = jax.jit(bn.apply)(params, state, x)
        want_y, means, variances = ghost_reference(x, scale, offset, -1, 4, True)
        assert max_rel(y, want_y) < 1e-13
        np.testing.assert_allclose(new_state.mean, 0.75 * 0.5 + 0.25 * np.mean(means, axis=0), rtol=1e-13)
        np.testing.assert_allclose(new_state.var, 0.75 * 2.0 + 0.25 * np.mean(variances, axis=0), rtol=1e-13)
        # The mean of the groups' variances is not the whole batch's variance (the groups'
        # means differ): the running variance is the one a group of V sees.
        assert np.all(np.mean(variances, axis=0) < x.var(axis=(0, 1)) - 0.1)
        # Evaluation uses the running statistics, the same with or without virtual batches.
        np.testing.assert_array_equal(
            bn.apply(params, new_state, x, training=False)[0],
            jstep.BatchNorm(eps=EPS).apply(params, new_state, x, training=False)[0],
        )


def test_under_a_vmap_axis_each_shard_splits_its_own_batch_and_running_statistics_agree():
    """axis_name with virtual batches: each mapped shard's batch axis is split (the statistics
    are not all-reduced), the scale gradient stays the shard's share, and every shard keeps the
    mean of all shards' groups' statistics."""
    with jax.enable_x64(True):
        x, scale, offset = inputs((2, 8, 3), -1, seed=7)  # 2 shards of 8 examples, V = 4
        bn = jstep.BatchNorm(momentum=0.5, eps=EPS, axis_name="shards", virtual_batch_size=4)
        params = jstep.BatchNormParams(jnp.asarray(scale), jnp.asarray(offset))
        state = jstep.BatchNormState(jnp.zeros(3), jnp.ones(3))
        y, new_state = jax.vmap(lambda x: bn.apply(params, state, x), axis_name="shards", out_axes=(0, None))(x)
        want = [ghost_reference(x[d], scale, offset, -1, 4, True) for d in range(2)]
        assert max_rel(y, np.stack([w[0] for w in want])) < 1e-13
        all_means = np.concatenate([w[1] for w in want])
        all_variances = np.concatenate([w[2] for w in want])
        np.testing.assert_allclose(new_state.mean, 0.5 * np.mean(all_means, axis=0), rtol=1e-13)
        np.testing.assert_allclose(new_state.var, 0.5 + 0.5 * np.mean(all_variances, axis=0), rtol=1e-13)
        w = np.random.default_rng(8).normal(size=x.shape)

        def share(scale, x, w):
            y = jstep.batch_norm(x, scale, offset, eps=EPS, axis_name="shards", virtual_batch_size=4)
            return jnp.sum(y * w)

        shares = jax.vmap(jax.grad(share), in_axes=(None, 0, 0), axis_name="shards")(scale, x, w)
        for d in range(2):
            want_share = jax.grad(lambda s, d=d: jnp.sum(ghost_reference(x[d], s, offset, -1, 4, True)[0] * w[d]))(
                scale
            )
            assert max_rel(shares[d], want_share) < 1e-12


def test_under_vmap_scan_and_checkpoint():
    with jax.enable_x64(True):
        x, scale, offset = inputs((3, 8, 2), -1, seed=13)  # 3 problems of 8 examples, V = 4
        dy = np.random.default_rng(14).normal(size=x.shape)

        def grad(x, dy):
            def loss(x):
                return jnp.sum(jstep.batch_norm(x, scale, offset, eps=EPS, virtual_batch_size=4) * dy)

            return jax.grad(loss)(x)

        def reference(x, dy):
            return jax.grad(lambda x: jnp.sum(ghost_reference(x, scale, offset, -1, 4, True)[0] * dy))(x)

        want = np.stack([reference(x[i], dy[i]) for i in range(3)])
        assert max_rel(jax.jit(jax.vmap(grad))(x, dy), want) < 1e-12
        assert max_rel(jax.lax.scan(lambda c, a: (c, grad(*a)), None, (x, dy))[1], want) < 1e-12
        assert max_rel(jax.checkpoint(grad)(x[0], dy[0]), want[0]) < 1e-12


def test_bad_virtual_batch_sizes_are_refused_naming_what_is_allowed():
    x, scale, offset = inputs((6, 4), -1, seed=9)
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 does not divide the batch axis 0 .* \(length 6\)"):
        jstep.batch_norm(x, scale, offset, virtual_batch_size=4)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="positive int"):
            jstep.batch_norm(x, scale, offset, virtual_batch_size=bad)
        with pytest.raises(ValueError, match="positive int"):
            jstep.BatchNorm(virtual_batch_size=bad)
    with pytest.raises(ValueError, match="every axis of x of shape \\(6, 4\\) is a feature axis"):
        jstep.batch_stats(x, feature_axis=(0, 1), virtual_batch_size=2)
    with pytest.raises(ValueError, match="axis_index_groups"):
        jstep.BatchNorm(axis_name="i", axis_index_groups=[[0, 1]], virtual_batch_size=2)
    with pytest.raises(ValueError, match="scale has shape \\(3,\\)"):
        jstep.batch_norm(x, scale[:3], offset, virtual_batch_size=2)


def test_a_mask_that_empties_one_virtual_batch_is_refused_naming_that_batch():
    """Examples 4-7 masked out, in groups of 4: virtual batch 1 has no value for any feature.
    The error names the virtual batch and its examples in x's own shape (not the grouped one)."""
    x, scale, offset = inputs((12, 3), -1, seed=10)
    mask = np.ones((12, 1), bool)
    mask[4:8] = False
    empty = r"no masked-in value for feature \(0,\) in virtual batch 1 \(examples 4 to 7 along axis 0 of x of shape"
    with pytest.raises(ValueError, match=empty):
        jstep.batch_norm(x, scale, offset, mask=mask, virtual_batch_size=4)
    with pytest.raises(ValueError, match=empty):
        jstep.batch_stats(x, mask=mask, virtual_batch_size=4)
    y = jstep.batch_norm(x, scale, offset, mask=mask, virtual_batch_size=6)[0]  # groups 0-5 and 6-11 keep values
    assert np.all(np.isfinite(y))


# ------------------------------------------------------------------ the framework layers


def flax_per_group(x, scale, bias, size, momentum):
    """Flax's BatchNorm on each group of `size` examples (jax.vmap over the groups, the
    variables shared): (y, the groups' running means and variances after one step)."""
    nn = pytest.importorskip("flax.linen")
    layer = nn.BatchNorm(use_running_average=False, momentum=momentum, use_fast_variance=False)
    stats = {"mean": jnp.zeros(x.shape[-1]), "var": jnp.ones(x.shape[-1])}
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}

    def one_group(x):
        y, updates = layer.apply(variables, x, mutable=["batch_stats"])
        return y, updates["batch_stats"]["mean"], updates["batch_stats"]["var"]

    y, means, variances = jax.vmap(one_group)(x.reshape(-1, size, *x.shape[1:]))
    return y.reshape(x.shape), means, variances


def test_linen_layer_with_virtual_batches_is_flax_batch_norm_vmapped_over_the_groups():
    pytest.importorskip("flax.linen")
    import jstep.linen

    with jax.enable_x64(True):
        x, scale, bias = inputs((12, 3, 4), -1, seed=10)
        layer = jstep.linen.BatchNorm(use_running_average=False, momentum=0.8, virtual_batch_size=4)
        variables = layer.init(jax.random.key(0), x[:1])  # init takes a batch of any size
        variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": variables["batch_stats"]}

        def ours(x, scale):
            params = {"scale": scale, "bias": bias}
            return layer.apply({**variables, "params": params}, x, mutable=["batch_stats"])

        (y, updates) = ours(x, scale)
        want_y, means, variances = flax_per_group(x, scale, bias, 4, 0.8)
        assert max_rel(y, want_y) < 1e-13
        # The running statistics (kept in float32, as Flax's): the mean of the groups' updates.
        np.testing.assert_allclose(updates["batch_stats"]["mean"], means.mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(updates["batch_stats"]["var"], variances.mean(axis=0), rtol=1e-6)
        w = np.random.default_rng(11).normal(size=x.shape)
        got = jax.grad(lambda x, s: jnp.sum(ours(x, s)[0] * w), argnums=(0, 1))(x, scale)
        want = jax.grad(lambda x, s: jnp.sum(flax_per_group(x, s, bias, 4, 0.8)[0] * w), argnums=(0, 1))(x, scale)
        for g, v in zip(got, want, strict=True):
            assert max_rel(g, v) < 1e-12


def test_nnx_layer_with_virtual_batches_is_flax_batch_norm_vmapped_over_the_groups():
    nnx = pytest.importorskip("flax.nnx")
    import jstep.nnx

    with jax.enable_x64(True):
        x, scale, bias = inputs((12, 4), -1, seed=12)
        layer = jstep.nnx.BatchNorm(4, momentum=0.8, virtual_batch_size=3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        layer.scale[...], layer.bias[...] = scale, bias
        y = layer(x)
        want_y, means, variances = flax_per_group(x, scale, bias, 3, 0.8)
        assert max_rel(y, want_y) < 1e-13
        np.testing.assert_allclose(layer.mean[...], means.mean(axis=0), rtol=1e-6)  # float32 statistics
        np.testing.assert_allclose(layer.var[...], variances.mean(axis=0), rtol=1e-6)
        with pytest.raises(ValueError, match="virtual_batch_size=5 does not divide"):
            jstep.nnx.BatchNorm(4, virtual_batch_size=5, rngs=nnx.Rngs(0))(x)


# ------------------------------------------------ Equinox: the groups taken across the vmap axis


def eqx_train(layer, state, axis_name="batch"):
    """The layer's training call over a batch of examples, vmapped along `axis_name`."""
    return jax.vmap(layer, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))


def eqx_ghost_layer(size, eps_in_sqrt=True, input_size=3):
    eqx = pytest.importorskip("equinox")
    import jstep.equinox

    make = eqx.nn.make_with_state(jstep.equinox.BatchNorm)
    return make(
        input_size,
        "batch",
        eps=EPS,
        momentum=0.75,
        mode="batch",
        dtype=jnp.float64,
        eps_in_sqrt=eps_in_sqrt,
        virtual_batch_size=size,
    )


def with_weights(layer, weight, bias):
    eqx = pytest.importorskip("equinox")
    return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (jnp.asarray(weight), jnp.asarray(bias)))


@pytest.mark.parametrize("eps_in_sqrt", [True, False], ids=["sqrt(var+eps)", "sigma+eps"])
def test_equinox_layer_normalizes_each_group_of_consecutive_examples_along_the_vmap_axis(eps_in_sqrt):
    """Values, the hidden statistics, gradients (x, weight, bias) and tangents of 12 examples of
    shape (3, 2) in groups of 4, against the float64 plain-jnp reference per group and against
    jstep.batch_norm(..., virtual_batch_size=4) on the stacked batch."""
    with jax.enable_x64(True):
        x, weight, bias = inputs((12, 3, 2), 1, seed=20)
        layer, state = eqx_ghost_layer(4, eps_in_sqrt)
        layer = with_weights(layer, weight, bias)
        y, new_state = eqx_train(layer, state)(x, state)
        want_y, means, variances = ghost_reference(x, weight, bias, 1, 4, eps_in_sqrt)
        assert max_rel(y, want_y) < 1e-13
        stacked = jstep.batch_norm(
            x, weight, bias, feature_axis=1, eps=EPS, eps_in_sqrt=eps_in_sqrt, virtual_batch_size=4
        )
        assert max_rel(y, stacked) < 1e-13
        # h <- 0.75 h + 0.25 (the groups' mean), from h = (0, 1); the step count grows by one.
        hidden_mean, hidden_var = new_state.get(layer.batch_state_index)
        np.testing.assert_allclose(hidden_mean, 0.25 * np.mean(means, axis=0), rtol=1e-13)
        np.testing.assert_allclose(hidden_var, 0.75 + 0.25 * np.mean(variances, axis=0), rtol=1e-13)
        assert int(new_state.get(layer.batch_counter)) == 1

        w = np.random.default_rng(21).normal(size=x.shape)

        def loss(x, weight, bias):
            model = with_weights(layer, weight, bias)
            return jnp.sum(eqx_train(model, state)(x, state)[0] * w)

        def reference_loss(x, weight, bias):
            return jnp.sum(ghost_reference(x, weight, bias, 1, 4, eps_in_sqrt)[0] * w)

        got = jax.grad(loss, argnums=(0, 1, 2))(x, weight, bias)
        want = jax.grad(reference_loss, argnums=(0, 1, 2))(x, weight, bias)
        for g, v in zip(got, want, strict=True):
            assert max_rel(g, v) < 1e-12

        def forward(x, weight, bias):
            return eqx_train(with_weights(layer, weight, bias), state)(x, state)[0]

        rng = np.random.default_rng(22)
        tangents = (rng.normal(size=x.shape), rng.normal(size=3), rng.normal(size=3))
        _, got_tangent = jax.jvp(forward, (x, weight, bias), tangents)
        _, want_tangent = jax.jvp(lambda *a: ghost_reference(*a, 1, 4, eps_in_sqrt)[0], (x, weight, bias), tangents)
        assert max_rel(got_tangent, want_tangent) < 1e-12


def test_equinox_layer_with_virtual_batches_is_equinox_batch_norm_vmapped_over_the_groups():
    """Against Equinox's own eqx.nn.BatchNorm(mode="batch"), vmapped (with the axis name) over
    each group of 3 examples: values, the mean of the groups' hidden statistics, gradients."""
    eqx = pytest.importorskip("equinox")
    import jstep.equinox

    with jax.enable_x64(True):
        x, weight, bias = inputs((6, 3, 4), 1, seed=23)
        layer, state = eqx_ghost_layer(3)
        layer = with_weights(layer, weight, bias)
        theirs, their_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            3, "batch", eps=EPS, momentum=0.75, mode="batch", dtype=jnp.float64
        )

        def per_group(x, weight, bias):
            model = with_weights(theirs, weight, bias)
            groups = x.reshape(2, 3, *x.shape[1:])
            y, states = jax.vmap(eqx_train(model, their_state), in_axes=(0, None), out_axes=(0, 0))(groups, their_state)
            return y.reshape(x.shape), states.get(model.batch_state_index)

        y, new_state = eqx_train(layer, state)(x, state)
        want_y, (means, variances) = per_group(x, weight, bias)
        assert max_rel(y, want_y) < 1e-12
        hidden_mean, hidden_var = new_state.get(layer.batch_state_index)
        np.testing.assert_allclose(hidden_mean, np.mean(means, axis=0), rtol=1e-12)
        np.testing.assert_allclose(hidden_var, np.mean(variances, axis=0), rtol=1e-12)

        w = np.random.default_rng(24).normal(size=x.shape)

        def loss(x, weight, bias):
            return jnp.sum(eqx_train(with_weights(layer, weight, bias), state)(x, state)[0] * w)

        got = jax.grad(loss, argnums=(0, 1, 2))(x, weight, bias)
        want = jax.grad(lambda *a: jnp.sum(per_group(*a)[0] * w), argnums=(0, 1, 2))(x, weight, bias)
        for g, v in zip(got, want, strict=True):
            assert max_rel(g, v) < 1e-11
        # Inference uses the hidden statistics: the same with or without virtual batches.
        plain, _ = eqx.nn.make_with_state(jstep.equinox.BatchNorm)(
            3, "batch", eps=EPS, momentum=0.75, mode="batch", dtype=jnp.float64
        )
        infer = eqx.nn.inference_mode
        np.testing.assert_array_equal(
            eqx_train(infer(layer), new_state)(x, new_state)[0],
            eqx_train(infer(with_weights(plain, weight, bias)), new_state)(x, new_state)[0],
        )


@pytest.mark.parametrize("names", [("outer", "batch"), ["outer", "batch"]], ids=["tuple", "list"])
def test_equinox_layer_groups_run_along_several_axis_names_in_their_order(names):
    """With several axis names (nested vmaps: 4 x 2 examples), example n is the index JAX's
    axis_index gives the names (major first), and a group of 4 spans two outer entries: the same
    as one vmap over the 8 examples."""
    with jax.enable_x64(True):
        x, weight, bias = inputs((8, 3, 2), 1, seed=25)
        layer, state = eqx_ghost_layer(4)
        layer = with_weights(layer, weight, bias)
        nested = pytest.importorskip("equinox").tree_at(lambda m: m.axis_name, layer, names)
        inner = eqx_train(nested, state)
        y, new_state = jax.vmap(inner, axis_name="outer", in_axes=(0, None), out_axes=(0, None))(
            x.reshape(4, 2, 3, 2), state
        )
        want_y, means, variances = ghost_reference(x, weight, bias, 1, 4, True)
        assert max_rel(y.reshape(x.shape), want_y) < 1e-13
        hidden_mean, hidden_var = new_state.get(nested.batch_state_index)
        np.testing.assert_allclose(hidden_mean, 0.25 * np.mean(means, axis=0), rtol=1e-13)
        np.testing.assert_allclose(hidden_var, 0.75 + 0.25 * np.mean(variances, axis=0), rtol=1e-13)


def test_equinox_bad_virtual_batch_sizes_and_modes_are_refused():
    eqx = pytest.importorskip("equinox")
    import jstep.equinox

    make = eqx.nn.make_with_state(jstep.equinox.BatchNorm)
    for bad in (0, -2, 2.0, True, "4"):
        with pytest.raises(ValueError, match=f"virtual_batch_size={bad!r}: allowed is None .* positive int"):
            make(3, "batch", mode="batch", virtual_batch_size=bad)
    for mode in ("ema", "legacy"):
        with pytest.raises(ValueError, match=f"virtual_batch_size=2 needs mode='batch', got mode='{mode}'"):
            make(3, "batch", mode=mode, virtual_batch_size=2)
    layer, state = make(3, "batch", mode="batch", virtual_batch_size=4)
    x = jnp.ones((6, 3))
    with pytest.raises(
        ValueError, match=r"virtual_batch_size=4 does not divide the 6 examples mapped along axis_name='batch'"
    ):
        eqx_train(layer, state)(x, state)
    assert layer.virtual_batch_size == 4 and make(3, "batch", mode="batch")[0].virtual_batch_size is None


def test_equinox_virtual_batches_of_bfloat16_examples_without_affine_take_float32_statistics():
    eqx = pytest.importorskip("equinox")
    import jstep.equinox

    with jax.enable_x64(True):
        x, _, _ = inputs((8, 3, 4), 1, seed=26)
        x = jnp.asarray(x, jnp.bfloat16)
        layer, state = eqx.nn.make_with_state(jstep.equinox.BatchNorm)(
            3, "batch", eps=EPS, mode="batch", channelwise_affine=False, dtype=jnp.float32, virtual_batch_size=4
        )
        y, new_state = eqx_train(layer, state)(x, state)
        want_y, means, _ = ghost_reference(np.asarray(x, np.float64), np.ones(3), np.zeros(3), 1, 4, True)
        assert y.dtype == jnp.float32  # Equinox's promotion with the float32 statistics
        assert max_rel(y, want_y) < 1e-6
        hidden_mean = new_state.get(layer.batch_state_index)[0]
        assert hidden_mean.dtype == jnp.float32
        np.testing.assert_allclose(hidden_mean, 0.01 * np.mean(means, axis=0), rtol=1e-6)
