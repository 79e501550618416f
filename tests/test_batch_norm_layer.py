"""The BatchNorm layer: training with batch statistics, running averages, evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jstep


def batches(steps, shape=(8, 3, 4), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(loc=i, scale=1 + i, size=shape).astype(np.float32) for i in range(steps)]


def test_init_gives_unit_scale_zero_offset_and_unit_running_variance():
    params, state = jstep.BatchNorm(feature_axis=1).init(jnp.ones((2, 5, 7), jnp.bfloat16))
    assert isinstance(params, jstep.BatchNormParams) and isinstance(state, jstep.BatchNormState)
    np.testing.assert_array_equal(params.scale, np.ones(5))
    np.testing.assert_array_equal(params.offset, np.zeros(5))
    np.testing.assert_array_equal(state.mean, np.zeros(5))
    np.testing.assert_array_equal(state.var, np.ones(5))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((params, state)))


def test_running_statistics_follow_the_running_average_equations():
    """C_t = momentum C_{t-1} + (1 - momentum) c_t for mu and sigma^2, from C_0 = (0, 1)."""
    bn = jstep.BatchNorm(momentum=0.8)
    xs = batches(4)
    params, state = bn.init(xs[0])
    step = jax.jit(lambda params, state, x: bn.apply(params, state, x, training=True))
    mean, var = np.zeros(4), np.ones(4)
    for x in xs:
        y, state = step(params, state, x)
        x64 = x.astype(np.float64).reshape(-1, 4)
        mean = 0.8 * mean + 0.2 * x64.mean(0)
        var = 0.8 * var + 0.2 * x64.var(0)
        np.testing.assert_allclose(y, jstep.batch_norm(x, params.scale, params.offset), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state.mean, mean, rtol=1e-5)
    np.testing.assert_allclose(state.var, var, rtol=1e-5)
    assert isinstance(state, jstep.BatchNormState)


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_evaluation_uses_the_running_statistics(eps_in_sqrt):
    bn = jstep.BatchNorm(eps=0.01, eps_in_sqrt=eps_in_sqrt, feature_axis=0)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 10)).astype(np.float32)
    params = jstep.BatchNormParams(jnp.asarray([1.0, 2.0, 0.5]), jnp.asarray([0.0, -1.0, 3.0]))
    state = jstep.BatchNormState(jnp.asarray([0.5, -0.2, 1.0]), jnp.asarray([2.0, 0.3, 1.5]))
    y, new_state = bn.apply(params, state, x, training=False)
    mean, var = np.asarray(state.mean)[:, None], np.asarray(state.var)[:, None]
    s = np.sqrt(var + 0.01) if eps_in_sqrt else np.sqrt(var) + 0.01
    expected = (x - mean) / s * np.asarray(params.scale)[:, None] + np.asarray(params.offset)[:, None]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert new_state is state


def test_training_gradients_are_batch_norms_and_the_state_gets_none():
    bn = jstep.BatchNorm()
    x = batches(1)[0]
    params, state = bn.init(x)
    w = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)

    def loss(params, x):
        y, new_state = bn.apply(params, state, x)
        return jnp.sum(y * w) + jnp.sum(new_state.mean) + jnp.sum(new_state.var)

    grads = jax.grad(loss, argnums=(0, 1))(params, x)
    expected = jax.grad(lambda s, b, x: jnp.sum(jstep.batch_norm(x, s, b) * w), argnums=(0, 1, 2))(
        params.scale, params.offset, x
    )
    for got, want in zip(jax.tree.leaves(grads), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_training_keeps_float32_state_and_bfloat16_output():
    bn = jstep.BatchNorm()
    x = jnp.asarray(batches(1)[0], jnp.bfloat16)
    params, state = bn.init(x)
    y, new_state = jax.jit(bn.apply)(params, state, x)
    assert y.dtype == jnp.bfloat16
    assert jax.tree.map(lambda a: a.dtype, new_state) == jax.tree.map(lambda a: a.dtype, state)


def test_state_is_a_checkpointable_pytree():
    bn = jstep.BatchNorm()
    params, state = bn.init(jnp.ones((4, 2)))
    leaves, treedef = jax.tree.flatten(state)
    restored = jax.tree.unflatten(treedef, [np.asarray(leaf) for leaf in leaves])
    assert isinstance(restored, jstep.BatchNormState)
    y1, _ = bn.apply(params, restored, jnp.arange(8.0).reshape(4, 2))
    y2, _ = bn.apply(params, state, jnp.arange(8.0).reshape(4, 2))
    np.testing.assert_array_equal(y1, y2)


def test_bad_settings_and_inputs_are_refused():
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.5"):
        jstep.BatchNorm(momentum=1.5)
    with pytest.raises(ValueError, match="eps must be in"):
        jstep.BatchNorm(eps=-1.0)
    bn = jstep.BatchNorm()
    with pytest.raises(TypeError, match="x has dtype int32"):
        bn.init(jnp.ones((4, 2), jnp.int32))
    params, state = bn.init(jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"scale has shape \(2,\).*\(3,\)"):
        bn.apply(params, state, jnp.ones((4, 3)))
    with pytest.raises(ValueError, match=r"state.mean has shape \(2,\)"):
        bn.apply(params._replace(scale=jnp.ones(3), offset=jnp.ones(3)), state, jnp.ones((4, 3)), training=False)
    with pytest.raises(ValueError, match="K = 0"):
        bn.apply(params, state, jnp.ones((0, 2)))


def test_masked_training_uses_and_averages_the_masked_in_statistics_and_evaluation_ignores_the_mask():
    bn = jstep.BatchNorm(momentum=0.5)
    x = batches(1, shape=(8, 3, 4))[0].astype(np.float64)
    mask = np.random.default_rng(3).random((8, 3, 1)) < 0.5
    mask[0] = True
    with jax.enable_x64(True):
        params, state = bn.init(x)
        y, new_state = jax.jit(lambda p, s, x, m: bn.apply(p, s, x, mask=m))(params, state, x, mask)
        y_fn = jstep.batch_norm(x, params.scale, params.offset, mask=mask)
        y_eval, same = bn.apply(params, new_state, x, training=False, mask=mask)
        y_eval_unmasked, _ = bn.apply(params, new_state, x, training=False)
    values = [x[..., i][np.broadcast_to(mask, x.shape)[..., i]] for i in range(4)]
    np.testing.assert_allclose(new_state.mean, 0.5 * 0 + 0.5 * np.array([v.mean() for v in values]), rtol=1e-12)
    np.testing.assert_allclose(new_state.var, 0.5 * 1 + 0.5 * np.array([v.var() for v in values]), rtol=1e-12)
    np.testing.assert_allclose(y, y_fn, rtol=1e-13, atol=1e-13)
    assert same is new_state
    np.testing.assert_array_equal(y_eval, y_eval_unmasked)


@pytest.mark.parametrize("eps_in_sqrt", [False, True])
def test_training_and_evaluation_against_a_float64_transcription(eps_in_sqrt):
    """BatchNorm.apply against the float64 transcription of the layer (tests/layer_reference.py),
    not against batch_norm, which it wraps: values, dL/dx and the running statistics over three
    training steps, then evaluation; eps = 0.1 makes the two forms of s differ by percents."""
    import layer_reference as ref

    bn = jstep.BatchNorm(momentum=0.7, eps=0.1, eps_in_sqrt=eps_in_sqrt)
    xs = batches(3, seed=5)
    w = np.random.default_rng(6).normal(size=xs[0].shape).astype(np.float32)
    params, state = bn.init(xs[0])
    params = params._replace(scale=jnp.linspace(0.5, 2.0, 4), offset=jnp.linspace(-1.0, 1.0, 4))

    @jax.jit
    def step(state, x):
        def loss(x):
            y, new_state = bn.apply(params, state, x, training=True)
            return jnp.sum(jnp.sin(y) * w), (y, new_state)

        (_, (y, new_state)), dx = jax.value_and_grad(loss, has_aux=True)(x)
        return y, new_state, dx

    mean, var = np.zeros(4), np.ones(4)
    options = {"momentum": 0.7, "eps": 0.1, "eps_in_sqrt": eps_in_sqrt}
    for x in xs:
        y, state, dx = step(state, x)
        want_y, want_dx, mean, var = ref.training(
            x, w, params.scale, params.offset, mean, var, reduce=(0, 1), **options
        )
        ref.assert_close(y, want_y)
        ref.assert_close(dx, want_dx)
        ref.assert_close(state.mean, mean[0, 0])
        ref.assert_close(state.var, var[0, 0])
    y_eval, _ = bn.apply(params, state, xs[1], training=False)
    ref.assert_close(
        y_eval, ref.evaluation(xs[1], params.scale, params.offset, mean, var, eps=0.1, eps_in_sqrt=eps_in_sqrt)
    )


def test_bfloat16_training_values_against_a_float64_transcription():
    """The values, not only the dtypes: bfloat16 inputs give the float64 layer's output on the same
    bfloat16 values to bfloat16's rounding (2^-8 of the largest), and running statistics that are
    float32 computations of them (within 1e-6: bfloat16 statistics would be off by about 2^-9)."""
    import layer_reference as ref

    bn = jstep.BatchNorm(momentum=0.5)
    x = jnp.asarray(batches(2, seed=7)[1] * 3 + 40, jnp.bfloat16)
    params, state = bn.init(x)
    y, new_state = jax.jit(lambda s, x: bn.apply(params, s, x))(state, x)
    x64 = np.asarray(x, np.float64)
    w = np.zeros(x.shape)
    want_y, _, mean, var = ref.training(
        x64, w, 1.0, 0.0, np.zeros(4), np.ones(4), reduce=(0, 1), momentum=0.5, eps=1e-5, eps_in_sqrt=True
    )
    assert y.dtype == jnp.bfloat16
    ref.assert_close(y, want_y, rtol=2**-8)
    ref.assert_close(new_state.mean, mean[0, 0], rtol=1e-6)
    ref.assert_close(new_state.var, var[0, 0], rtol=1e-6)
