"""batch_norm and batch_stats against float64 transcriptions of B.0.2 and against autodiff."""

import contextlib
import io

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

import jstep
from jstep.normalization import _normalize_checked

LAYOUTS = [  # (name, shape, feature_axis)
    ("NHWC", (4, 3, 2, 5), -1),
    ("NCHW", (4, 5, 3, 2), 1),
    ("notes n x K", (5, 12), 0),
    ("two feature axes", (3, 4, 6), (0, 2)),
]


def plain_batch_norm(x, scale, offset, feature_axis, eps, eps_in_sqrt):
    """A direct jnp transcription, left to JAX's autodiff."""
    features = (feature_axis,) if isinstance(feature_axis, int) else feature_axis
    features = tuple(a % x.ndim for a in features)
    axes = tuple(a for a in range(x.ndim) if a not in features)
    keep = tuple(n if a in features else 1 for a, n in enumerate(x.shape))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=axes, keepdims=True)
    s = jnp.sqrt(var + eps) if eps_in_sqrt else jnp.sqrt(var) + eps
    return (x - mean) / s * scale.reshape(keep) + offset.reshape(keep)


def random_inputs(shape, feature_axis, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    features = (feature_axis,) if isinstance(feature_axis, int) else feature_axis
    feature_shape = tuple(shape[a] for a in features)
    x = rng.normal(1.5, 2.0, shape).astype(dtype)
    scale = rng.normal(1.0, 0.5, feature_shape).astype(dtype)
    offset = rng.normal(0.0, 0.5, feature_shape).astype(dtype)
    cotangent = rng.normal(0.0, 1.0, shape).astype(dtype)
    return x, scale, offset, cotangent


def max_rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize(("name", "shape", "feature_axis"), LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
@pytest.mark.parametrize("eps_in_sqrt", [True, False], ids=["sqrt(var+eps)", "sigma+eps"])
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_values_and_gradients_match_autodiff_in_float64(name, shape, feature_axis, eps_in_sqrt, eps):
    with jax.enable_x64(True):
        x, scale, offset, dy = random_inputs(shape, feature_axis)
        kw = {"feature_axis": feature_axis, "eps": eps, "eps_in_sqrt": eps_in_sqrt}

        @jax.jit
        def outputs_and_gradients(x, scale, offset, dy):
            y, vjp = jax.vjp(lambda *a: jstep.batch_norm(*a, **kw), x, scale, offset)
            y_ref, vjp_ref = jax.vjp(lambda *a: plain_batch_norm(*a, **kw), x, scale, offset)
            return y, y_ref, vjp(dy), vjp_ref(dy)

        y, y_ref, grads, grads_ref = outputs_and_gradients(x, scale, offset, dy)
        assert y.dtype == jnp.float64
        assert max_rel(y, y_ref) <= 1e-12
        for got, want in zip(grads, grads_ref, strict=True):
            assert got.shape == want.shape
            assert max_rel(got, want) <= 1e-10


def notes_dZ(Z, G, dZhat):
    """The notes' closing formula, summed literally (eps = 0, n x K layout):
    dL/dZ_ij = sum_k dZhat_ik G_i 1/(K sigma_i) (delta_jk K - 1 - (Z_ik - mu_i)(Z_ij - mu_i)/sigma_i^2)."""
    n, K = Z.shape
    mu = Z.sum(axis=1) / K
    sigma = np.sqrt(((Z - mu[:, None]) ** 2).sum(axis=1) / K)
    dZ = np.zeros_like(Z)
    for i in range(n):
        for j in range(K):
            for k in range(K):
                delta = 1.0 if j == k else 0.0
                bracket = delta * K - 1 - (Z[i, k] - mu[i]) * (Z[i, j] - mu[i]) / sigma[i] ** 2
                dZ[i, j] += dZhat[i, k] * G[i] / (K * sigma[i]) * bracket
    return dZ


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_input_gradient_is_the_notes_formula_summed_literally(eps_in_sqrt):
    rng = np.random.default_rng(3)
    Z, G, B, dZhat = rng.normal(size=(4, 7)), rng.normal(size=4), rng.normal(size=4), rng.normal(size=(4, 7))
    with jax.enable_x64(True):

        def f(Z, G, B):
            return jstep.batch_norm(Z, G, B, feature_axis=0, eps=0.0, eps_in_sqrt=eps_in_sqrt)

        dZ, dG, dB = jax.vjp(f, Z, G, B)[1](dZhat)
    Zbar = (Z - Z.mean(1, keepdims=True)) / Z.std(1, keepdims=True)
    np.testing.assert_allclose(dZ, notes_dZ(Z, G, dZhat), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dB, dZhat.sum(axis=1), rtol=1e-12)  # dL/dB_i = sum_j dZhat_ij
    np.testing.assert_allclose(dG, (dZhat * Zbar).sum(axis=1), rtol=1e-10)  # dL/dG_i = sum_j dZhat_ij Zbar_ij


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_first_and_second_order_pass_check_vjp(eps_in_sqrt):
    x, scale, offset, _ = random_inputs((6, 2, 3), -1, seed=4)
    kw = {"eps": 0.05, "eps_in_sqrt": eps_in_sqrt}

    def f(x, scale, offset):
        return jstep.batch_norm(x, scale, offset, **kw)

    report = jstep.check_vjp(
        f, x, scale, offset, reference=lambda *a: plain_batch_norm(*a, -1, **kw), order=2, rtol=1e-7
    )
    assert {c.order for c in report.comparisons} == {1, 2}
    assert len(report.comparisons) == 12  # 3 arguments x 2 references x 2 orders


def test_hessian_vector_product_matches_autodiff():
    with jax.enable_x64(True):
        x, scale, offset, w = random_inputs((5, 4), -1, seed=5)
        v = np.random.default_rng(6).normal(size=x.shape)

        def loss(norm):
            return lambda x: jnp.sum(jnp.sin(norm(x, scale, offset)) * w)

        ours = loss(lambda *a: jstep.batch_norm(*a, eps=1e-3, eps_in_sqrt=False))
        plain = loss(lambda *a: plain_batch_norm(*a, -1, 1e-3, False))
        hvp = jax.jvp(jax.grad(ours), (x,), (v,))[1]
        hvp_ref = jax.jvp(jax.grad(plain), (x,), (v,))[1]
        assert max_rel(hvp, hvp_ref) <= 1e-10


def test_gradients_through_the_returned_statistics():
    """The core also returns (mu, sigma^2) for BatchNorm; its VJP handles their cotangents."""

    def with_stats(x, scale, offset):
        return _normalize_checked(x, scale, offset, -1, 1e-2, True, None)

    def reference(x, scale, offset):
        mean = jnp.mean(x, axis=0)
        var = jnp.mean((x - mean) ** 2, axis=0)
        return plain_batch_norm(x, scale, offset, -1, 1e-2, True), mean, var

    x, scale, offset, _ = random_inputs((7, 3), -1, seed=7)
    jstep.check_vjp(with_stats, x, scale, offset, reference=reference)


def test_bfloat16_input_normalizes_in_float32_and_returns_bfloat16():
    x, scale, offset, dy = random_inputs((16, 4, 4, 8), -1, seed=8, dtype=np.float32)
    x16 = jnp.asarray(x, jnp.bfloat16)
    y, vjp = jax.vjp(lambda x: jstep.batch_norm(x, scale, offset), x16)
    (dx,) = vjp(jnp.asarray(dy, jnp.bfloat16))
    assert y.dtype == dx.dtype == jnp.bfloat16
    # Reference: the same bf16 values, normalized in float64.
    with jax.enable_x64(True):
        x64 = np.asarray(x16.astype(jnp.float32), np.float64)
        y_ref, vjp_ref = jax.vjp(
            lambda x: plain_batch_norm(x, scale.astype(np.float64), offset.astype(np.float64), -1, 1e-5, True), x64
        )
        (dx_ref,) = vjp_ref(np.asarray(jnp.asarray(dy, jnp.bfloat16).astype(jnp.float32), np.float64))
    # Only the final rounding to bf16 (8 bits of mantissa) is lost.
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, rtol=2**-7, atol=2**-7)
    np.testing.assert_allclose(np.asarray(dx, np.float32), dx_ref, rtol=2**-7, atol=2**-7 * np.abs(dx_ref).max())
    mean, var = jstep.batch_stats(x16)
    assert mean.dtype == var.dtype == jnp.float32


def test_large_mean_float32_normalizes_correctly():
    """|mean|/std = 1e4 in float32: two-pass statistics still give mean 0, std 1."""
    rng = np.random.default_rng(9)
    x = (1e4 + rng.normal(size=(4096, 3))).astype(np.float32)
    y = np.asarray(jstep.batch_norm(jnp.asarray(x), jnp.ones(3), jnp.zeros(3), eps=0.0))
    x64 = x.astype(np.float64)
    y_ref = (x64 - x64.mean(0)) / x64.std(0)
    np.testing.assert_allclose(y, y_ref, atol=2e-6)  # Z - mu without fl(mu)'s rounding (1e-3 here)
    np.testing.assert_allclose(y.std(0), 1.0, atol=1e-6)
    # The one-pass formula E[x^2] - E[x]^2 fails on the same data (the test can tell them apart).
    x32 = jnp.asarray(x)
    one_pass = jnp.mean(x32 * x32, 0) - jnp.mean(x32, 0) ** 2
    assert np.max(np.abs(np.asarray(one_pass) / x64.var(0) - 1)) > 0.05
    _, var = jstep.batch_stats(x32)
    np.testing.assert_allclose(var, x64.var(0), rtol=1e-3)


def float32_gradient_errors(normalize, x, scale, offset, dy):
    """max |error| / max |value| of the float32 input, scale and offset gradients of
    sum(normalize(x, scale, offset) * dy), against float64 autodiff of `plain_batch_norm` on the
    same values."""

    def gradients(f, *args):
        return jax.grad(lambda x, s, b, dy: jnp.sum(f(x, s, b) * dy), argnums=(0, 1, 2))(*args)

    with jax.enable_x64(True):
        exact = gradients(
            lambda x, s, b: plain_batch_norm(x, s, b, -1, 1e-5, True),
            *(a.astype(np.float64) for a in (x, scale, offset, dy)),
        )
        exact = [np.asarray(g) for g in exact]
    return [max_rel(g, e) for g, e in zip(gradients(normalize, x, scale, offset, dy), exact, strict=True)]


@pytest.mark.parametrize("shape", [(4096, 3), (256, 8), (16, 4, 4, 8)])
@pytest.mark.parametrize("cotangent", ["random", "centred"])
def test_large_mean_float32_gradients_are_as_accurate_as_autodiff(shape, cotangent):
    """|mu|/sigma = 1e4 in float32, against float64 on the same values: every gradient within 10x
    of plain autodiff's error, and within 1e-6 of its size (the module docstring's 'about 1e-7').
    A centred cotangent (sum_j dy_ij = 0, as from a following normalization) is where autodiff is
    accurate and the one-pass sum dy Z - mu sum dy lost 1e2-1e3x more than it."""
    rng = np.random.default_rng(14)
    x = (1e4 + rng.normal(size=shape)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, shape[-1]).astype(np.float32)
    offset = rng.normal(0.0, 0.1, shape[-1]).astype(np.float32)
    dy = rng.normal(size=shape)
    if cotangent == "centred":
        dy -= dy.reshape(-1, shape[-1]).mean(0)
    dy = dy.astype(np.float32)
    jstep_errors = float32_gradient_errors(jstep.batch_norm, x, scale, offset, dy)
    autodiff_errors = float32_gradient_errors(
        lambda x, s, b: plain_batch_norm(x, s, b, -1, 1e-5, True), x, scale, offset, dy
    )
    # (The offset's gradient, sum_j dy_ij, involves no mu; with a centred dy it is 0 up to rounding.)
    for name, mine, autodiffs in zip(["x", "scale"], jstep_errors, autodiff_errors, strict=False):
        assert mine <= max(10 * autodiffs, 1e-6), (name, mine, autodiffs)
        assert mine <= 1e-6, (name, mine)


def test_batch_stats_are_population_mean_and_variance():
    x, *_ = random_inputs((6, 5, 4), 1, seed=10)
    mean, var = jstep.batch_stats(jnp.asarray(x, jnp.float32), feature_axis=1)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(var, x.var(axis=(0, 2)), rtol=1e-5)


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_constant_feature_with_eps_gives_offset_and_the_exact_gradient(eps_in_sqrt):
    eps = 0.1
    with jax.enable_x64(True):
        x = np.stack([np.full(6, 2.0), np.arange(6.0)], axis=1)  # feature 0 is constant
        scale, offset = np.array([1.5, 1.0]), np.array([0.25, 0.0])
        dy = np.random.default_rng(11).normal(size=x.shape)

        def f(x, s, b):
            return jstep.batch_norm(x, s, b, eps=eps, eps_in_sqrt=eps_in_sqrt)

        y, vjp = jax.vjp(f, x, scale, offset)
        dx, dscale, doffset = map(np.asarray, vjp(dy))
    s = np.sqrt(eps) if eps_in_sqrt else eps
    np.testing.assert_array_equal(y[:, 0], 0.25)
    np.testing.assert_allclose(dx[:, 0], 1.5 / s * (dy[:, 0] - dy[:, 0].mean()), rtol=1e-12)
    assert dscale[0] == 0 and np.isclose(doffset[0], dy[:, 0].sum())
    assert np.all(np.isfinite(dx))
    # The derivative really is that: finite differences agree (their error is O(h/eps) here,
    # since sigma + eps is not smooth at sigma = 0 though the output is differentiable).
    with jax.enable_x64(True):
        v = np.zeros_like(x)
        v[:, 0] = np.random.default_rng(12).normal(size=6)
        h = 1e-8
        fd = (np.vdot(dy, f(x + h * v, scale, offset)) - np.vdot(dy, f(x - h * v, scale, offset))) / (2 * h)
    np.testing.assert_allclose(np.vdot(dx, v), fd, rtol=1e-5)


def test_constant_feature_with_eps_zero_gives_offset_and_a_non_finite_input_gradient():
    with jax.enable_x64(True):
        x = np.stack([np.full(4, 3.0), np.arange(4.0)], axis=1)
        scale, offset = np.array([2.0, 1.0]), np.array([0.5, 0.0])
        y, vjp = jax.vjp(lambda x, s, b: jstep.batch_norm(x, s, b, eps=0.0), x, scale, offset)
        y, dx, dscale, doffset = map(np.asarray, (y, *vjp(np.arange(8.0).reshape(4, 2))))
    np.testing.assert_array_equal(y[:, 0], 0.5)  # the eps -> 0+ limit: Zbar = 0
    assert np.all(np.isfinite(y)) and np.isfinite(dscale).all() and np.isfinite(doffset).all()
    assert not np.any(np.isfinite(dx[:, 0]))  # no derivative exists: documented as inf/NaN
    assert np.all(np.isfinite(dx[:, 1]))


def test_backward_keeps_one_activation_sized_residual_and_per_feature_vectors():
    x, scale, offset, _ = random_inputs((8, 6, 6, 16), -1, dtype=np.float32)
    x, scale, offset = map(jnp.asarray, (x, scale, offset))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(jstep.batch_norm, x, scale, offset)
    lines = out.getvalue().strip().splitlines()
    activation = [line for line in lines if "[8,6,6,16]" in line]
    assert len(activation) == 1, lines  # x, the one activation-sized residual
    others = [line for line in lines if line not in activation]
    assert all(
        "[8,6,6,16]" not in line and ("[16]" in line or "[1,1,1,16]" in line or "[]" in line) for line in others
    ), lines
    # The plain jnp version keeps more than one activation-sized array.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(
            lambda x, s, b: plain_batch_norm(x, s, b, -1, 1e-5, True), x, scale, offset
        )
    assert out.getvalue().count("[8,6,6,16]") >= 2


def test_jit_and_vmap():
    x, scale, offset, dy = random_inputs((3, 6, 4), -1, seed=13, dtype=np.float32)
    eager = jstep.batch_norm(x[0], scale, offset)
    jitted = jax.jit(jstep.batch_norm, static_argnames=("feature_axis", "eps", "eps_in_sqrt", "axis_name"))(
        x[0], scale, offset
    )
    mapped = jax.vmap(lambda x: jstep.batch_norm(x, scale, offset))(x)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mapped[0], eager, rtol=1e-6, atol=1e-6)
    grads = jax.vmap(jax.grad(lambda x, dy: jnp.sum(jstep.batch_norm(x, scale, offset) * dy)))(x, dy)
    grad0 = jax.grad(lambda x: jnp.sum(jstep.batch_norm(x, scale, offset) * dy[0]))(x[0])
    np.testing.assert_allclose(grads[0], grad0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("names", [["a", "b"], ("a", "b")], ids=["list", "tuple"])
def test_axis_name_takes_what_psum_takes(names):
    """A list of axis names, as jax.lax.psum takes (it failed as a non-hashable static argument):
    under two nested vmaps the statistics, output and input gradient are the whole batch's."""
    x, scale, offset, dy = random_inputs((2, 3, 4, 5), -1, seed=31)
    with jax.enable_x64(True):

        def per_example(x, dy):  # x: (4, 5), one of 2 x 3 examples
            y, vjp = jax.vjp(lambda x: jstep.batch_norm(x, scale, offset, axis_name=names), x)
            return y, vjp(dy)[0], jstep.batch_stats(x, axis_name=names)

        def nested(f):
            return jax.vmap(jax.vmap(f, axis_name="b"), axis_name="a")

        y, dx, (mean, var) = jax.jit(nested(per_example))(x, dy)
        y_ref, vjp = jax.vjp(lambda x: jstep.batch_norm(x, scale, offset), x)
        dx_ref = vjp(dy)[0]
        mean_ref, var_ref = jstep.batch_stats(x)
        no_axis = jstep.batch_norm(x[0, 0], scale, offset, axis_name=[])  # psum over no axis: this batch
        np.testing.assert_array_equal(no_axis, jstep.batch_norm(x[0, 0], scale, offset))
        bn = jstep.BatchNorm(axis_name=list(names))
        state = bn.init(x[0, 0])[1]
        y_layer, new_state = nested(lambda x: bn.apply(jstep.BatchNormParams(scale, offset), state, x))(x)
        assert max_rel(y, y_ref) < 1e-12 and max_rel(dx, dx_ref) < 1e-12
        assert max_rel(mean[1, 2], mean_ref) < 1e-12 and max_rel(var[0, 1], var_ref) < 1e-12
        assert bn.axis_name == ("a", "b") and hash(bn) == hash(jstep.BatchNorm(axis_name=("a", "b")))
        assert max_rel(y_layer, y_ref) < 1e-12
        assert max_rel(new_state.var[1, 1], 0.9 + 0.1 * var_ref) < 1e-7  # momentum is a float32 0.9


@pytest.mark.parametrize("axis_name", [[["a"]], ["a", None], {"a"}, [["a", "b"]]])
def test_axis_names_that_psum_refuses_are_refused_naming_the_argument(axis_name):
    with pytest.raises(TypeError, match=r"axis_name=.*allowed is None, one axis name"):
        jstep.batch_norm(jnp.ones((4, 3)), jnp.ones(3), jnp.zeros(3), axis_name=axis_name)
    with pytest.raises(TypeError, match=r"axis_name=.*allowed is None, one axis name"):
        jstep.BatchNorm(axis_name=axis_name)


# --------------------------------------------------------------------------- bad input


def test_scale_with_the_wrong_shape_is_refused_naming_the_shapes():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"scale has shape \(4,\).*\(3,\)"):
        jstep.batch_norm(x, jnp.ones(4), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"offset has shape \(3, 1\)"):
        jstep.batch_norm(x, jnp.ones(3), jnp.zeros((3, 1)))


def test_non_floating_input_is_refused():
    with pytest.raises(TypeError, match="x has dtype int32"):
        jstep.batch_norm(jnp.ones((4, 3), jnp.int32), jnp.ones(3), jnp.zeros(3))
    with pytest.raises(TypeError, match="x has dtype"):
        jstep.batch_stats(jnp.ones((4, 3), jnp.int32))


@pytest.mark.parametrize("feature_axis", [2, -3, (0, 0), (1, 5)])
def test_feature_axis_out_of_range_is_refused(feature_axis):
    with pytest.raises(ValueError, match="feature_axis"):
        jstep.batch_norm(jnp.ones((4, 3)), jnp.ones(3), jnp.zeros(3), feature_axis=feature_axis)


def test_negative_eps_is_refused():
    with pytest.raises(ValueError, match=r"eps must be in \[0, inf\), got -1e-05"):
        jstep.batch_norm(jnp.ones((4, 3)), jnp.ones(3), jnp.zeros(3), eps=-1e-5)


@pytest.mark.parametrize(
    ("eps", "shown"),
    [("1e-5", "str '1e-5'"), (None, "NoneType None"), (True, "bool True"), (jnp.array(1e-5), "ArrayImpl")],
)
def test_eps_that_is_not_a_number_is_refused_naming_it(eps, shown):
    """eps is static (it is fixed when traced): an array is refused as a string or None is."""
    x = jnp.ones((4, 3))
    for call in (
        lambda: jstep.batch_norm(x, jnp.ones(3), jnp.zeros(3), eps=eps),
        lambda: jstep.batch_renorm(x, jnp.ones(3), jnp.zeros(3), jnp.zeros(3), jnp.ones(3), eps=eps),
    ):
        with pytest.raises(TypeError, match=rf"eps must be a Python or NumPy real number, got {shown}"):
            call()
    assert float(jstep.batch_norm(x, jnp.ones(3), jnp.zeros(3), eps=np.float32(0.5))[0, 0]) == 0.0


def test_a_feature_with_no_value_is_refused():
    with pytest.raises(ValueError, match=r"shape \(0, 3\) gives K = 0 values per feature.*need K >= 1"):
        jstep.batch_norm(jnp.ones((0, 3)), jnp.ones(3), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"K = 0.*BatchNorm.apply\(\.\.\., training=False\)"):
        jstep.batch_stats(jnp.ones((1, 0, 3)))


# --------------------------------------------------------------------------------- mask


def plain_masked_batch_norm(x, scale, offset, mask, eps, eps_in_sqrt):
    """A direct jnp transcription with a mask (NHWC-like, features last), left to autodiff:
    the statistics of the masked-in values, every value normalized."""
    m = jnp.broadcast_to(mask, x.shape)
    axes = tuple(range(x.ndim - 1))
    count = jnp.sum(m, axis=axes)
    mean = jnp.sum(jnp.where(m, x, 0), axis=axes) / count
    var = jnp.sum(jnp.where(m, (x - mean) ** 2, 0), axis=axes) / count
    s = jnp.sqrt(var + eps) if eps_in_sqrt else jnp.sqrt(var) + eps
    return (x - mean) / s * scale + offset


def masked_in(x, mask, feature):
    """The masked-in values of one feature (features last), as a flat NumPy array."""
    return np.asarray(x)[..., feature][np.broadcast_to(mask, np.shape(x))[..., feature]]


MASK_SHAPES = [(6, 4, 1), (6, 4, 5), (6, 1, 1)]  # for x of shape (6, 4, 5): broadcast and full


def random_mask(shape, seed):
    mask = np.random.default_rng(seed).random(shape) < 0.6
    mask.reshape(-1, shape[-1])[:2] = True  # at least 2 values in for every feature
    return mask


@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=str)
def test_masked_statistics_are_those_of_the_masked_in_values(mask_shape):
    x, *_ = random_inputs((6, 4, 5), -1, seed=20)
    mask = random_mask(mask_shape, seed=21)
    with jax.enable_x64(True):
        mean, var = jstep.batch_stats(x, mask=mask)
    for i in range(5):
        values = masked_in(x, mask, i)
        assert np.isclose(mean[i], values.mean(), rtol=1e-13) and np.isclose(var[i], values.var(), rtol=1e-12)
    # float32 statistics, and a feature axis other than the last (NCHW-like).
    mean, var = jstep.batch_stats(
        np.moveaxis(x, -1, 1).astype(np.float32), feature_axis=1, mask=np.moveaxis(mask, -1, 1)
    )
    assert mean.dtype == var.dtype == jnp.float32
    np.testing.assert_allclose(var, [masked_in(x, mask, i).var() for i in range(5)], rtol=1e-5)


@pytest.mark.parametrize("eps_in_sqrt", [True, False], ids=["sqrt(var+eps)", "sigma+eps"])
def test_masked_batch_norm_passes_check_vjp_at_orders_1_and_2(eps_in_sqrt):
    x, scale, offset, _ = random_inputs((6, 4, 5), -1, seed=22)
    mask = random_mask((6, 4, 1), seed=23)
    kw = {"eps": 0.05, "eps_in_sqrt": eps_in_sqrt}

    def f(x, scale, offset):
        return jstep.batch_norm(x, scale, offset, mask=mask, **kw)

    report = jstep.check_vjp(
        f, x, scale, offset, reference=lambda *a: plain_masked_batch_norm(*a, mask, **kw), order=2, rtol=1e-7
    )
    assert len(report.comparisons) == 12


@pytest.mark.parametrize("eps_in_sqrt", [True, False], ids=["sqrt(var+eps)", "sigma+eps"])
def test_masked_values_and_the_direct_term_of_masked_out_values_in_float64(eps_in_sqrt):
    """Zhat from NumPy statistics of the masked-in values; a masked-out value's input gradient
    is only (G/s) dZhat; an all-True mask is no mask."""
    x, scale, offset, dy = random_inputs((6, 4, 5), -1, seed=24)
    mask = random_mask((6, 4, 1), seed=25)
    eps = 0.05
    with jax.enable_x64(True):
        f = lambda x, s, b, m: jstep.batch_norm(x, s, b, eps=eps, eps_in_sqrt=eps_in_sqrt, mask=m)  # noqa: E731
        y, vjp = jax.vjp(lambda x: f(x, scale, offset, mask), x)
        (dx,) = vjp(dy)
        y_all, vjp_all = jax.vjp(lambda x: f(x, scale, offset, np.ones((1, 1, 1), bool)), x)
        y_none, vjp_none = jax.vjp(lambda x: f(x, scale, offset, None), x)
        (dx_all,), (dx_none,) = vjp_all(dy), vjp_none(dy)
    mean = np.array([masked_in(x, mask, i).mean() for i in range(5)])
    sigma = np.array([masked_in(x, mask, i).std() for i in range(5)])
    s = np.sqrt(sigma**2 + eps) if eps_in_sqrt else sigma + eps
    np.testing.assert_allclose(y, (x - mean) / s * scale + offset, rtol=1e-12, atol=1e-12)
    out = ~np.broadcast_to(mask, x.shape)
    np.testing.assert_allclose(np.asarray(dx)[out], np.broadcast_to(scale / s * dy, x.shape)[out], rtol=1e-12)
    assert np.max(np.abs(np.asarray(dx)[~out] - np.broadcast_to(scale / s * dy, x.shape)[~out])) > 1e-3
    np.testing.assert_allclose(y_all, y_none, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(dx_all, dx_none, rtol=1e-12, atol=1e-13)


def test_masked_gradients_through_the_returned_statistics():
    x, scale, offset, _ = random_inputs((7, 3), -1, seed=26)
    mask = random_mask((7, 1), seed=27)

    def with_stats(x, scale, offset):
        return _normalize_checked(x, scale, offset, -1, 1e-2, True, None, mask)

    def reference(x, scale, offset):
        m = jnp.broadcast_to(mask, x.shape)
        mean = jnp.sum(jnp.where(m, x, 0), 0) / m.sum(0)
        var = jnp.sum(jnp.where(m, (x - mean) ** 2, 0), 0) / m.sum(0)
        return plain_masked_batch_norm(x, scale, offset, mask, 1e-2, True), mean, var

    jstep.check_vjp(with_stats, x, scale, offset, reference=reference)


def test_per_example_masks_under_vmap_give_the_whole_batchs_masked_result():
    """Sequences of different lengths, padded (two are all padding), one per vmapped call."""
    x, scale, offset, dy = random_inputs((6, 4, 5), -1, seed=28, dtype=np.float32)
    lengths = np.array([4, 2, 0, 4, 1, 0])
    mask = (np.arange(4)[None, :] < lengths[:, None])[..., None]  # (examples, time, 1)

    def per_example(x, mask):
        return jstep.batch_norm(x, scale, offset, mask=mask, axis_name="examples")

    def loss_by_example(x, mask):
        return jax.vmap(lambda x, m, dy: jnp.sum(per_example(x, m) * dy), axis_name="examples")(x, mask, dy).sum()

    y = jax.jit(jax.vmap(per_example, axis_name="examples"))(x, mask)
    dx = jax.jit(jax.grad(loss_by_example))(x, mask)
    y_ref, vjp = jax.vjp(lambda x: jstep.batch_norm(x, scale, offset, mask=mask), x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, vjp(dy)[0], rtol=1e-5, atol=1e-5)


def test_a_traced_mask_with_too_few_values_gives_what_the_docstring_says():
    x, scale, offset, _ = random_inputs((6, 3), -1, seed=29)
    mask = np.ones(x.shape, bool)
    mask[:, 0] = False  # feature 0: K = 0
    mask[1:, 1] = False  # feature 1: K = 1
    with jax.enable_x64(True):
        y = jax.jit(lambda x, m: jstep.batch_norm(x, scale, offset, eps=0.25, mask=m))(x, mask)
        mean, var = jax.jit(lambda x, m: jstep.batch_stats(x, mask=m))(x, mask)
        y, mean, var, y_ref = map(np.asarray, (y, mean, var, plain_batch_norm(x, scale, offset, -1, 0.25, True)))
    assert np.all(np.isnan(y[:, 0])) and np.isnan(mean[0]) and np.isnan(var[0])
    assert mean[1] == x[0, 1] and var[1] == 0  # one value: sigma = 0, s = sqrt(eps)
    np.testing.assert_allclose(y[:, 1], (x[:, 1] - x[0, 1]) / 0.5 * scale[1] + offset[1], rtol=1e-12)
    assert y[0, 1] == offset[1]
    np.testing.assert_allclose(y[:, 2], y_ref[:, 2], rtol=1e-12)  # feature 2: every value in


def test_bad_masks_are_refused_naming_what_is_allowed():
    x = jnp.ones((4, 2, 3))
    scale, offset = jnp.ones(3), jnp.zeros(3)
    with pytest.raises(TypeError, match="mask has dtype float32; it must be a boolean array"):
        jstep.batch_norm(x, scale, offset, mask=jnp.ones((4, 1, 1)))
    with pytest.raises(ValueError, match=r"mask has shape \(4, 2\), which does not broadcast to x's shape \(4, 2, 3\)"):
        jstep.batch_norm(x, scale, offset, mask=np.ones((4, 2), bool))
    none_in = np.zeros((4, 2, 3), bool)
    none_in[:, :, 1:] = True  # features 1 and 2 have plenty; feature 0 has none
    with pytest.raises(ValueError, match=r"mask leaves K = 0 masked-in values for feature \(0,\)"):
        jstep.batch_norm(x, scale, offset, mask=none_in)
    with pytest.raises(ValueError, match="K = 0"):
        jax.jit(lambda x: jstep.batch_stats(x, mask=np.zeros((4, 1, 1), bool)))(x)  # known when traced


def test_the_module_is_jstep_normalization_and_jstep_batch_norm_the_function():
    """`jstep.batch_norm` is the function; its module has its own name, so importing one never
    hands back the other (a module named batch_norm was shadowed by the function)."""
    import importlib

    module = importlib.import_module("jstep.normalization")
    assert jstep.batch_norm is module.batch_norm
    assert callable(jstep.batch_norm) and jstep.batch_norm.__module__ == "jstep.normalization"
    with pytest.raises(ModuleNotFoundError, match=r"jstep\.batch_norm"):
        importlib.import_module("jstep.batch_norm")


def test_float16_input_normalizes_with_float32_statistics_and_returns_float16():
    """Values near 200 with a spread of 50: their squared deviations sum to about 6e5 over the
    batch, beyond float16's largest value (65504), so statistics taken in float16 overflow. jstep
    takes them in float32: y and dx equal the float64 computation on the same float16 values to
    float16's rounding, and batch_stats gives their float64 mean and variance to float32's."""
    x, scale, offset, dy = random_inputs((256, 3), -1, seed=10, dtype=np.float32)
    x16 = jnp.asarray(200 + 50 * x, jnp.float16)
    y, vjp = jax.vjp(lambda x: jstep.batch_norm(x, scale, offset), x16)
    (dx,) = vjp(jnp.asarray(dy, jnp.float16))
    assert y.dtype == dx.dtype == jnp.float16
    x64 = np.asarray(x16, np.float64)
    with jax.enable_x64(True):
        y_ref, vjp_ref = jax.vjp(
            lambda x: plain_batch_norm(x, scale.astype(np.float64), offset.astype(np.float64), -1, 1e-5, True), x64
        )
        (dx_ref,) = vjp_ref(np.asarray(jnp.asarray(dy, jnp.float16), np.float64))
    np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, rtol=2**-10, atol=2**-10 * np.abs(y_ref).max())
    np.testing.assert_allclose(np.asarray(dx, np.float64), dx_ref, rtol=2**-10, atol=2**-10 * np.abs(dx_ref).max())
    mean, var = jstep.batch_stats(x16)
    assert mean.dtype == var.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(mean), x64.mean(0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(var), x64.var(0), rtol=1e-5)


def test_bfloat16_statistics_are_the_float32_statistics_of_its_values():
    """batch_stats of bfloat16 inputs: not only float32 arrays, but the float64 mean and two-pass
    variance of the bfloat16 values to float32's precision (bfloat16 sums would be off by 2^-9)."""
    x, _, _, _ = random_inputs((512, 5), -1, seed=11, dtype=np.float32)
    x16 = jnp.asarray(30 + 4 * x, jnp.bfloat16)
    mean, var = jstep.batch_stats(x16)
    x64 = np.asarray(x16, np.float64)
    np.testing.assert_allclose(np.asarray(mean), x64.mean(0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(var), x64.var(0), rtol=1e-5)
