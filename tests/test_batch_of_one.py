"""One value per feature (K = 1: a batch of one example of a dense layer) is a batch, as in Flax:
the value is its own mean, sigma = 0 and the output is the offset B, whatever the input; its
gradient with respect to the input and the scale is exactly 0. Linen's ``model.init(key,
jnp.ones((1, d)))`` in training mode and NNX's training call on one example give Flax's
variables, outputs and running statistics. No value per feature (K = 0) is refused, and the
layers' message names their framework's switch to the running statistics.
"""

import functools

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from layer_checks import close, trees_close

import jstep
import jstep.equinox
import jstep.linen
import jstep.nnx

RNG = np.random.default_rng(21)
X1 = RNG.normal(2.0, 3.0, (1, 5)).astype(np.float32)  # one example of 5 features
SCALE = RNG.uniform(0.5, 1.5, 5).astype(np.float32)
OFFSET = RNG.normal(0.0, 0.5, 5).astype(np.float32)


def plain_batch_norm(x, scale, offset, eps):
    """The same function in plain jnp, left to autodiff (x - mean is exactly 0 for one value)."""
    mean = x.mean(axis=0)
    return scale * (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(axis=0) + eps) + offset


@pytest.mark.parametrize("shape", [(1, 5), (1, 1, 1, 5)])
@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_one_value_per_feature_gives_the_offset_and_the_exact_gradients(shape, eps_in_sqrt):
    x = X1.reshape(shape)
    y, (mean, var) = jstep.batch_norm(x, SCALE, OFFSET, eps_in_sqrt=eps_in_sqrt), jstep.batch_stats(x)
    np.testing.assert_array_equal(y, np.broadcast_to(OFFSET, shape))
    np.testing.assert_array_equal(mean, X1[0])
    np.testing.assert_array_equal(var, 0)
    for eps in (1e-5, 0.0):  # eps = 0 too: Zhat = B does not depend on Z at all
        dy = RNG.normal(size=shape).astype(np.float32)
        normalize = functools.partial(jstep.batch_norm, eps=eps, eps_in_sqrt=eps_in_sqrt)
        dx, dscale, doffset = jax.vjp(normalize, x, SCALE, OFFSET)[1](dy)
        np.testing.assert_array_equal(dx, 0)
        np.testing.assert_array_equal(dscale, 0)
        np.testing.assert_array_equal(doffset, dy.reshape(-1, 5).sum(0))


def test_one_value_per_feature_passes_check_vjp_against_autodiff_at_both_orders():
    def one(x, scale, offset):
        return jstep.batch_norm(x, scale, offset, eps=1e-3)

    jstep.check_vjp(one, X1, SCALE, OFFSET, reference=lambda x, s, b: plain_batch_norm(x, s, b, 1e-3), order=2)


def test_one_value_per_feature_under_vmap_and_a_mask_of_one():
    """K = 1 reached as one vmapped example with axis_name, and as a mask with one value in."""
    per_example = jax.vmap(lambda x: jstep.batch_norm(x, SCALE, OFFSET, axis_name="batch"), axis_name="batch")
    np.testing.assert_array_equal(per_example(X1), OFFSET[None])
    x = RNG.normal(size=(4, 5)).astype(np.float32)
    mask = np.zeros((4, 1), bool)
    mask[2] = True
    y = jstep.batch_norm(x, SCALE, OFFSET, mask=mask, eps=0.25)
    np.testing.assert_allclose(y[2], OFFSET, rtol=0, atol=1e-6)  # the one value in is its own mean
    np.testing.assert_allclose(y, (x - x[2]) / 0.5 * SCALE + OFFSET, rtol=1e-6)


def test_no_value_per_feature_is_refused_naming_the_core_switch():
    with pytest.raises(ValueError, match=r"K = 0 values per feature.*training=False"):
        jstep.batch_norm(jnp.ones((0, 5)), SCALE, OFFSET)
    with pytest.raises(ValueError, match=r"mask leaves K = 0 masked-in values for feature \(0,\)"):
        jstep.batch_norm(jnp.ones((4, 5)), SCALE, OFFSET, mask=np.zeros((4, 5), bool))


# ------------------------------------------------------------------------------ Linen


class Mlp(nn.Module):
    """Dense -> BatchNorm -> relu -> Dense, the layer class given (jstep's or Flax's)."""

    norm: type

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(4)(x)
        x = self.norm(use_running_average=not train, momentum=0.9, **self.norm_options())(x)
        return nn.Dense(2)(nn.relu(x))

    def norm_options(self):
        return {} if self.norm is jstep.linen.BatchNorm else {"use_fast_variance": False}


def test_linen_init_on_one_example_in_training_mode_gives_flaxs_variables():
    """The `model.init(key, jnp.ones((1, d)))` idiom, then a training step on a batch of one."""
    key = jax.random.key(3)
    ours, theirs = Mlp(jstep.linen.BatchNorm), Mlp(nn.BatchNorm)
    ours_vars = ours.init(key, jnp.ones((1, 5)), train=True)
    theirs_vars = theirs.init(key, jnp.ones((1, 5)), train=True)
    jax.tree.map(np.testing.assert_array_equal, ours_vars, theirs_vars)
    y, ours_stats = ours.apply(ours_vars, X1, train=True, mutable=["batch_stats"])
    y_ref, theirs_stats = theirs.apply(theirs_vars, X1, train=True, mutable=["batch_stats"])
    close(y, y_ref)
    trees_close(ours_stats, theirs_stats)
    var = ours_stats["batch_stats"]["BatchNorm_0"]["var"]
    np.testing.assert_allclose(var, 0.9)  # 0.9 * 1 + 0.1 * sigma^2, sigma^2 = 0
    grads = jax.grad(lambda x: ours.apply(ours_vars, x, train=True, mutable=["batch_stats"])[0].sum())(X1)
    np.testing.assert_array_equal(grads, 0)  # the norm's output is its bias, whatever x is


def test_linen_layer_on_one_example_equals_flaxs():
    ours, theirs = jstep.linen.BatchNorm(use_running_average=False), nn.BatchNorm(use_running_average=False)
    variables = theirs.init(jax.random.key(0), X1)
    variables["params"] = {"scale": jnp.asarray(SCALE), "bias": jnp.asarray(OFFSET)}
    y, stats = ours.apply(variables, X1, mutable=["batch_stats"])
    y_ref, stats_ref = theirs.apply(variables, X1, mutable=["batch_stats"])
    close(y, y_ref)
    np.testing.assert_array_equal(y, OFFSET[None])
    trees_close(stats, stats_ref)


# -------------------------------------------------------------------------------- NNX


def test_nnx_training_call_on_one_example_equals_flaxs():
    ours = jstep.nnx.BatchNorm(5, momentum=0.9, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(5, momentum=0.9, use_fast_variance=False, rngs=nnx.Rngs(0))
    for layer in (ours, theirs):
        layer.scale[...], layer.bias[...] = jnp.asarray(SCALE), jnp.asarray(OFFSET)
    for x in (X1, 3 * X1 - 1):  # two steps: the running statistics move with each
        close(ours(x), theirs(x))
        close(ours.mean[...], theirs.mean[...])
        close(ours.var[...], theirs.var[...])
    np.testing.assert_array_equal(ours(X1), OFFSET[None])


# ------------------------------------------------------------------ K = 0 in the layers


def test_the_layers_name_their_own_switch_when_a_batch_has_no_value():
    empty = jnp.ones((0, 5))
    linen_layer = jstep.linen.BatchNorm(use_running_average=False)
    variables = linen_layer.init(jax.random.key(0), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"K = 0.*\(use_running_average=True\)\.") as caught:
        linen_layer.apply(variables, empty, mutable=["batch_stats"])
    assert "BatchNorm.apply" not in str(caught.value)
    with pytest.raises(ValueError, match=r"K = 0.*\(use_running_average=True\)\.") as caught:
        jstep.nnx.BatchNorm(5, rngs=nnx.Rngs(0))(empty)
    assert "BatchNorm.apply" not in str(caught.value)
    bn, state = eqx.nn.make_with_state(jstep.equinox.BatchNorm)(5, axis_name="batch", mode="ema")
    with pytest.raises(ValueError, match=r"K = 0.*\(inference=True\)\.") as caught:
        jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(empty, state)
    assert "BatchNorm.apply" not in str(caught.value)
