"""batch_renorm against a float64 transcription of Ioffe's (2017) corrections, against autodiff
of a plain jnp version (r and d under stop_gradient), check_vjp, and under jit, vmap, scan and
checkpoint."""

import contextlib
import io

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

import jstep

LAYOUTS = [  # (name, shape, feature_axis)
    ("NHWC", (4, 3, 2, 5), -1),
    ("NCHW", (4, 5, 3, 2), 1),
    ("notes n x K", (5, 12), 0),
    ("two feature axes", (3, 4, 6), (0, 2)),
]


def axes_of(ndim, feature_axis):
    features = (feature_axis,) if isinstance(feature_axis, int) else feature_axis
    features = tuple(a % ndim for a in features)
    return features, tuple(a for a in range(ndim) if a not in features)


def transcription(Z, G, B, mean, var, r_max, d_max, feature_axis, eps, mask=None):
    """The formulas of the module docstring in float64 NumPy, feature by feature."""
    features, axes = axes_of(Z.ndim, feature_axis)
    Zf = np.moveaxis(Z, features, range(len(features))).reshape(G.size, -1)
    m = (
        np.ones_like(Zf, bool)
        if mask is None
        else np.moveaxis(np.broadcast_to(mask, Z.shape), features, range(len(features))).reshape(G.size, -1)
    )
    out = np.empty_like(Zf)
    for i, (z, mi, g, b, mu, v) in enumerate(zip(Zf, m, G.ravel(), B.ravel(), mean.ravel(), var.ravel(), strict=True)):
        mu_b = z[mi].mean()
        var_b = ((z[mi] - mu_b) ** 2).mean()
        s = np.sqrt(v + eps)
        r = min(max(np.sqrt(var_b + eps) / s, 1 / r_max), r_max)
        d = min(max((mu_b - mu) / s, -d_max), d_max)
        out[i] = g * (r * (z - mu_b) + d * np.sqrt(var_b)) / np.sqrt(var_b + eps * r**2) + b
    shape = [Z.shape[a] for a in features] + [Z.shape[a] for a in axes]
    return np.moveaxis(out.reshape(shape), range(len(features)), features)


def plain_batch_renorm(x, scale, offset, mean, var, r_max=3.0, d_max=5.0, feature_axis=-1, eps=1e-5, mask=None):
    """A direct jnp version, left to JAX's autodiff, with r and d under stop_gradient."""
    features, axes = axes_of(x.ndim, feature_axis)
    keep = tuple(n if a in features else 1 for a, n in enumerate(x.shape))

    def per(v):
        return jnp.reshape(v, keep)

    where = None if mask is None else jnp.broadcast_to(mask, x.shape)
    mu_b = jnp.mean(x, axis=axes, keepdims=True, where=where)
    var_b = jnp.mean((x - mu_b) ** 2, axis=axes, keepdims=True, where=where)
    s = jnp.sqrt(per(var) + eps)
    r = jax.lax.stop_gradient(jnp.clip(jnp.sqrt(var_b + eps) / s, 1 / r_max, r_max))
    d = jax.lax.stop_gradient(jnp.clip((mu_b - per(mean)) / s, -d_max, d_max))
    return per(scale) * (r * (x - mu_b) + d * jnp.sqrt(var_b)) / jnp.sqrt(var_b + eps * r**2) + per(offset)


def random_inputs(shape, feature_axis, seed=0, dtype=np.float64):
    """x, G, B, running mean and var, a cotangent. The running statistics are set from the
    batch's so that, feature by feature in turn, r (with r_max = 1.5) is inside its bounds,
    clipped at r_max, clipped at 1/r_max, and d (with d_max = 0.5) inside, above or below."""
    rng = np.random.default_rng(seed)
    features, axes = axes_of(len(shape), feature_axis)
    fshape = tuple(shape[a] for a in features)
    x = rng.normal(1.5, 2.0, shape)
    scale = rng.normal(1.0, 0.5, fshape)
    offset = rng.normal(0.0, 0.5, fshape)
    n = int(np.prod(fshape))
    var = x.var(axis=axes) * np.resize([1.3, 0.1, 10.0], n).reshape(fshape)
    mean = x.mean(axis=axes) - np.sqrt(var) * np.resize([0.2, 2.0, -0.3, -2.0], n).reshape(fshape)
    cotangent = rng.normal(0.0, 1.0, shape)
    return tuple(a.astype(dtype) for a in (x, scale, offset, mean, var, cotangent))


def max_rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def corrections(x, mean, var, r_max, d_max, eps, feature_axis=-1):
    """(r, d) per feature, in float64, to see which are clipped."""
    _, axes = axes_of(x.ndim, feature_axis)
    mu_b, var_b = x.mean(axis=axes), x.var(axis=axes)
    s = np.sqrt(var + eps)
    return np.sqrt(var_b + eps) / s, (mu_b - mean) / s


@pytest.mark.parametrize(("name", "shape", "feature_axis"), LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_values_match_the_float64_transcription_and_gradients_autodiff(name, shape, feature_axis, eps):
    with jax.enable_x64(True):
        x, scale, offset, mean, var, dy = random_inputs(shape, feature_axis)
        kw = {"r_max": 1.5, "d_max": 0.5, "feature_axis": feature_axis, "eps": eps}

        @jax.jit
        def outputs_and_gradients(x, scale, offset, dy):
            y, vjp = jax.vjp(lambda *a: jstep.batch_renorm(*a, mean, var, **kw), x, scale, offset)
            y_ref, vjp_ref = jax.vjp(lambda *a: plain_batch_renorm(*a, mean, var, **kw), x, scale, offset)
            return y, y_ref, vjp(dy), vjp_ref(dy)

        y, y_ref, grads, grads_ref = outputs_and_gradients(x, scale, offset, dy)
        assert y.dtype == jnp.float64
        assert max_rel(y, y_ref) <= 1e-12
        assert max_rel(y, transcription(x, scale, offset, mean, var, **kw)) <= 1e-12
        for got, want in zip(grads, grads_ref, strict=True):
            assert got.shape == want.shape
            assert max_rel(got, want) <= 1e-10


def test_the_draws_clip_some_corrections_and_leave_others_inside():
    """The inputs above exercise both sides of each clip (else a missing clip would pass)."""
    for eps in (0.0, 0.3):
        x, _, _, mean, var, _ = random_inputs((4, 3, 2, 5), -1)
        r, d = corrections(x, mean, var, 1.5, 0.5, eps)
        assert np.any(r > 1.5) and np.any(r < 1 / 1.5) and np.any((r < 1.5) & (r > 1 / 1.5))
        assert np.any(d > 0.5) and np.any(d < -0.5) and np.any(np.abs(d) < 0.5)


def test_as_eps_goes_to_zero_it_is_algorithm_1():
    """Ioffe (2017), Algorithm 1: Zhat = G ((Z - mu_B) / sigma_B r + d) + B, exactly at eps = 0,
    and within O(eps) of the paper's eps placement, sigma_B = sqrt(sigma_B^2 + eps)."""
    with jax.enable_x64(True):
        x, scale, offset, mean, var, _ = random_inputs((16, 4), -1, seed=1)
        mu_b, sigma_b = x.mean(0), x.std(0)
        for eps in (0.0, 1e-4):
            sigma_paper = np.sqrt(sigma_b**2 + eps)
            sigma_run = np.sqrt(var + eps)
            r = np.clip(sigma_paper / sigma_run, 1 / 3, 3)
            d = np.clip((mu_b - mean) / sigma_run, -5, 5)
            paper = scale * ((x - mu_b) / sigma_paper * r + d) + offset
            y = jstep.batch_renorm(x, scale, offset, mean, var, eps=eps)
            assert np.max(np.abs(y - paper)) <= (1e-12 if eps == 0 else 10 * eps * np.max(np.abs(scale) * (r**2 + 1)))


def test_r_max_one_and_d_max_zero_is_batch_norm_with_its_gradient():
    with jax.enable_x64(True):
        x, scale, offset, mean, var, dy = random_inputs((6, 3, 4), -1, seed=2)

        def renorm(x, scale, offset):
            return jstep.batch_renorm(x, scale, offset, mean, var, r_max=1.0, d_max=0.0, eps=0.1)

        def norm(x, scale, offset):
            return jstep.batch_norm(x, scale, offset, eps=0.1)

        y, vjp = jax.vjp(renorm, x, scale, offset)
        y_ref, vjp_ref = jax.vjp(norm, x, scale, offset)
        assert max_rel(y, y_ref) <= 1e-14
        for got, want in zip(vjp(dy), vjp_ref(dy), strict=True):
            assert max_rel(got, want) <= 1e-12


def saturated_inputs(seed):
    """Running statistics far from the batch's: every r and d sits at a bound, and stays there
    under small changes of x, so the function itself has r and d constant nearby and finite
    differences check the gradient that holds them constant."""
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, (6, 2, 4))
    scale, offset = rng.normal(1.0, 0.3, 4), rng.normal(0.0, 0.3, 4)
    mean = np.array([-20.0, 20.0, -20.0, 20.0])
    var = np.array([0.01, 0.01, 400.0, 400.0])  # r at r_max for the first two, 1/r_max after
    return x, scale, offset, mean, var


def test_first_and_second_order_pass_check_vjp():
    x, scale, offset, mean, var = saturated_inputs(3)
    kw = {"r_max": 1.5, "d_max": 0.5, "feature_axis": -1, "eps": 0.3}
    r, d = corrections(x, mean, var, 1.5, 0.5, 0.3)
    assert np.all((r > 1.6) | (r < 1 / 1.6)) and np.all(np.abs(d) > 0.6)  # saturated, with a margin

    def f(x, scale, offset):
        return jstep.batch_renorm(x, scale, offset, mean, var, **kw)

    report = jstep.check_vjp(
        f, x, scale, offset, reference=lambda *a: plain_batch_renorm(*a, mean, var, **kw), order=2, rtol=1e-7
    )
    assert {c.order for c in report.comparisons} == {1, 2}
    assert len(report.comparisons) == 12  # 3 arguments x 2 references x 2 orders


def test_check_vjp_without_finite_differences_checks_the_unsaturated_gradient_against_the_reference():
    """Where r and d are not clipped they depend on x, and the hand-derived gradient (r and d held
    constant) is by design not the output's derivative: finite differences fail it. With
    directions=0 check_vjp compares it with autodiff of the stop_gradient reference alone, at
    orders 1 and 2, and passes."""
    rng = np.random.default_rng(4)
    x, scale, offset = rng.normal(1.0, 2.0, (6, 4)), rng.normal(1.0, 0.3, 4), rng.normal(0.0, 0.3, 4)
    mean, var = np.full(4, 1.2), np.full(4, 3.0)
    kw = {"r_max": 3.0, "d_max": 5.0, "feature_axis": -1, "eps": 1e-3}
    r, d = corrections(x, mean, var, 3.0, 5.0, 1e-3)
    assert np.all((r < 2.9) & (r > 1 / 2.9)) and np.all(np.abs(d) < 4.9)  # not clipped

    def f(x, scale, offset):
        return jstep.batch_renorm(x, scale, offset, mean, var, **kw)

    def reference(*args):
        return plain_batch_renorm(*args, mean, var, **kw)

    with pytest.raises(AssertionError, match="finite differences"):
        jstep.check_vjp(f, x, scale, offset, reference=reference)
    report = jstep.check_vjp(f, x, scale, offset, reference=reference, order=2, directions=0, rtol=1e-7)
    assert [c.against for c in report.comparisons] == ["autodiff of reference"] * 6


def test_hessian_vector_product_matches_autodiff():
    with jax.enable_x64(True):
        x, scale, offset, mean, var, w = random_inputs((5, 4), -1, seed=5)
        v = np.random.default_rng(6).normal(size=x.shape)
        kw = {"r_max": 1.5, "d_max": 0.5, "feature_axis": -1, "eps": 1e-2}

        def loss(norm):
            return lambda x: jnp.sum(jnp.sin(norm(x, scale, offset, mean, var, **kw)) * w)

        hvp = jax.jvp(jax.grad(loss(jstep.batch_renorm)), (x,), (v,))[1]
        hvp_ref = jax.jvp(jax.grad(loss(plain_batch_renorm)), (x,), (v,))[1]
        assert max_rel(hvp, hvp_ref) <= 1e-10


@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "mask"])
def test_forward_mode_matches_autodiff_of_the_plain_version(masked):
    """jvp, linearize and jacfwd (first order), jacfwd of jacfwd and of jacrev (second order)."""
    with jax.enable_x64(True):
        x, scale, offset, mean, var, _ = random_inputs((7, 2, 3), -1, seed=14)
        mask = (
            (np.random.default_rng(15).random((7, 2, 1)) < 0.7) | (np.arange(7) < 2)[:, None, None] if masked else None
        )
        kw = {"r_max": 1.5, "d_max": 0.5, "feature_axis": -1, "eps": 0.05, "mask": mask}

        def ours(x, scale, offset):
            return jstep.batch_renorm(x, scale, offset, mean, var, **kw)

        def plain(x, scale, offset):
            return plain_batch_renorm(x, scale, offset, mean, var, **kw)

        rng = np.random.default_rng(16)
        primals = (x, scale, offset)
        tangents = tuple(rng.normal(size=np.shape(a)) for a in primals)
        y, dy = jax.jvp(ours, primals, tangents)
        y_ref, dy_ref = jax.jvp(plain, primals, tangents)
        assert max_rel(y, y_ref) <= 1e-12 and max_rel(dy, dy_ref) <= 1e-12
        _, linear = jax.linearize(ours, *primals)
        assert max_rel(linear(*tangents), dy_ref) <= 1e-12
        for got, want in zip(
            jax.jacfwd(ours, argnums=(0, 1, 2))(*primals), jax.jacrev(plain, argnums=(0, 1, 2))(*primals), strict=True
        ):
            assert max_rel(got, want) <= 1e-12

        def loss(f):
            return lambda x: jnp.sum(jnp.sin(f(x, scale, offset)))

        hessian = jax.hessian(loss(plain))(x)
        assert max_rel(jax.jacfwd(jax.jacfwd(loss(ours)))(x), hessian) <= 1e-10
        assert max_rel(jax.jacfwd(jax.jacrev(loss(ours)))(x), hessian) <= 1e-10


def test_reverse_mode_keeps_one_activation_sized_residual_and_per_feature_vectors():
    x, scale, offset, mean, var, _ = random_inputs((8, 6, 6, 16), -1, dtype=np.float32)
    x, scale, offset = map(jnp.asarray, (x, scale, offset))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(lambda *a: jstep.batch_renorm(*a, mean, var), x, scale, offset)
    lines = out.getvalue().strip().splitlines()
    activation = [line for line in lines if "[8,6,6,16]" in line]
    assert len(activation) == 1, lines  # Z, the one activation-sized residual
    assert all("[16]" in line or "[1,1,1,16]" in line or "[]" in line for line in lines if line not in activation), (
        lines
    )


def test_no_gradient_flows_into_the_running_statistics_or_the_bounds():
    with jax.enable_x64(True):
        x, scale, offset, mean, var, w = random_inputs((8, 3), -1, seed=7)

        def loss(mean, var, r_max, d_max):
            return jnp.sum(jstep.batch_renorm(x, scale, offset, mean, var, r_max=r_max, d_max=d_max) * w)

        grads = jax.grad(loss, argnums=(0, 1, 2, 3))(mean, var, jnp.float64(1.2), jnp.float64(0.1))
        for grad in grads:
            assert not np.any(np.asarray(grad))


@pytest.mark.parametrize("mask_shape", [(9, 1), (9, 3)])
def test_masked_values_and_gradients_match_the_transcription_and_autodiff(mask_shape):
    with jax.enable_x64(True):
        x, scale, offset, mean, var, dy = random_inputs((9, 3), -1, seed=8)
        mask = np.random.default_rng(9).random(mask_shape) < 0.6
        mask[:2] = True
        kw = {"r_max": 1.5, "d_max": 0.5, "feature_axis": -1, "eps": 0.2}
        y, vjp = jax.vjp(lambda *a: jstep.batch_renorm(*a, mean, var, mask=mask, **kw), x, scale, offset)
        _, vjp_ref = jax.vjp(lambda *a: plain_batch_renorm(*a, mean, var, mask=mask, **kw), x, scale, offset)
        assert max_rel(y, transcription(x, scale, offset, mean, var, mask=mask, **kw)) <= 1e-12
        for got, want in zip(vjp(dy), vjp_ref(dy), strict=True):
            assert max_rel(got, want) <= 1e-10


def test_constant_feature_gives_a_finite_gradient_batch_norms_when_d_is_zero():
    """sigma_B = 0: the output is G d sigma_B / t + B = B, and the q term is taken as 0, so the
    input gradient is (G r / t)(dZhat - mean dZhat): batch norm's exact one when d = 0."""
    with jax.enable_x64(True):
        x = np.stack([np.full(6, 2.0), np.arange(6.0)], axis=1)
        scale, offset = np.array([1.5, 1.0]), np.array([0.25, 0.0])
        mean, var = np.zeros(2), np.ones(2)  # d = 2 / sqrt(1.1), clipped to d_max where given
        dy = np.random.default_rng(10).normal(size=x.shape)
        for r_max, d_max in ((1.0, 0.0), (3.0, 5.0)):

            def f(x, r_max=r_max, d_max=d_max):
                return jstep.batch_renorm(x, scale, offset, mean, var, r_max=r_max, d_max=d_max, eps=0.1)

            y, vjp = jax.vjp(f, x)
            (dx,) = vjp(dy)
            assert np.all(np.isfinite(dx))
            np.testing.assert_allclose(y[:, 0], 0.25, rtol=1e-14)
            r = np.clip(np.sqrt(0.1) / np.sqrt(1.1), 1 / r_max, r_max)
            t = np.sqrt(0.1) * r
            np.testing.assert_allclose(dx[:, 0], 1.5 * r / t * (dy[:, 0] - dy[:, 0].mean()), rtol=1e-12)
            if d_max == 0.0:
                (dx_bn,) = jax.vjp(lambda x: jstep.batch_norm(x, scale, offset, eps=0.1), x)[1](dy)
                np.testing.assert_allclose(dx, dx_bn, rtol=1e-12)


def test_bfloat16_input_renormalizes_in_float32_and_returns_bfloat16():
    x, scale, offset, mean, var, dy = random_inputs((16, 4, 8), -1, seed=11, dtype=np.float32)
    x16 = jnp.asarray(x, jnp.bfloat16)
    y, vjp = jax.vjp(lambda x: jstep.batch_renorm(x, scale, offset, mean, var, r_max=1.5, d_max=0.5), x16)
    (dx,) = vjp(jnp.asarray(dy, jnp.bfloat16))
    assert y.dtype == dx.dtype == jnp.bfloat16
    with jax.enable_x64(True):
        x64 = np.asarray(x16.astype(jnp.float32), np.float64)
        f64 = [np.asarray(a, np.float64) for a in (scale, offset, mean, var)]
        y_ref, vjp_ref = jax.vjp(lambda x: plain_batch_renorm(x, *f64, 1.5, 0.5, -1, 1e-5), x64)
        (dx_ref,) = vjp_ref(np.asarray(jnp.asarray(dy, jnp.bfloat16).astype(jnp.float32), np.float64))
    # Only the final rounding to bf16 (8 bits of mantissa) is lost.
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, rtol=2**-7, atol=2**-7 * np.abs(y_ref).max())
    np.testing.assert_allclose(np.asarray(dx, np.float32), dx_ref, rtol=2**-7, atol=2**-7 * np.abs(dx_ref).max())


def test_float32_matches_float64_to_float32_precision():
    x, scale, offset, mean, var, dy = random_inputs((64, 8), -1, seed=12)
    kw = {"r_max": 1.5, "d_max": 0.5, "eps": 1e-3}
    with jax.enable_x64(True):
        y64, vjp64 = jax.vjp(lambda *a: jstep.batch_renorm(*a, mean, var, **kw), x, scale, offset)
        grads64 = vjp64(dy)
    f32 = [np.asarray(a, np.float32) for a in (x, scale, offset, mean, var, dy)]
    y32, vjp32 = jax.vjp(lambda *a: jstep.batch_renorm(*a, f32[3], f32[4], **kw), *f32[:3])
    assert max_rel(y32, y64) <= 1e-6
    for got, want in zip(vjp32(f32[5]), grads64, strict=True):
        assert max_rel(got, want) <= 1e-5


def test_under_jit_vmap_scan_and_checkpoint():
    with jax.enable_x64(True):
        x, scale, offset, mean, var, w = random_inputs((3, 6, 4), -1, seed=13)
        kw = {"r_max": 1.5, "d_max": 0.5, "eps": 1e-3}

        def loss(norm):
            def f(x, scale):
                return jnp.sum(jnp.tanh(norm(x, scale, offset, mean, var, **kw)) * w[0])

            return f

        ours, plain = loss(jstep.batch_renorm), loss(plain_batch_renorm)
        grad = jax.grad(ours, argnums=(0, 1))
        grad_ref = jax.grad(plain, argnums=(0, 1))
        # vmap over three independent batches (no axis_name: each normalized alone)
        for got, want in zip(
            jax.jit(jax.vmap(grad, (0, None)))(x, scale), jax.vmap(grad_ref, (0, None))(x, scale), strict=True
        ):
            assert max_rel(got, want) <= 1e-10

        # scan: a chain of three renormalizations, each batch's output feeding a carry
        def chain(norm):
            def step(carry, xs):
                y = norm(xs + carry, scale, offset, mean, var, **kw)
                return y.mean(0), jnp.sum(y * w[0])

            return lambda x: jnp.sum(jax.lax.scan(step, jnp.zeros(4), x)[1])

        g = jax.jit(jax.grad(chain(jstep.batch_renorm)))(x)
        g_ref = jax.grad(chain(plain_batch_renorm))(x)
        assert max_rel(g, g_ref) <= 1e-10
        # checkpoint (rematerialization) of the whole loss
        g = jax.grad(jax.checkpoint(ours), argnums=(0, 1))(x[0], scale)
        for got, want in zip(g, grad_ref(x[0], scale), strict=True):
            assert max_rel(got, want) <= 1e-10


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"r_max": 0.5}, ValueError, r"r_max must be in \[1, inf\), got 0.5"),
        ({"d_max": -1.0}, ValueError, r"d_max must be in \[0, inf\), got -1.0"),
        ({"r_max": True}, TypeError, r"r_max must be a Python number or a scalar .*, got bool True"),
        ({"r_max": "3"}, TypeError, r"r_max must be a Python number or a scalar .*, got str '3'"),
        ({"d_max": None}, TypeError, r"d_max must be a Python number or a scalar .*, got NoneType None"),
        ({"d_max": [5.0]}, TypeError, r"d_max must be a Python number or a scalar .*, got list \[5.0\]"),
        ({"r_max": jnp.ones(3)}, TypeError, r"r_max must be a Python number or a scalar .*, got ArrayImpl"),
        ({"d_max": jnp.array(1 + 1j)}, TypeError, r"d_max must be a Python number or a scalar .*, got ArrayImpl"),
        ({"eps": -1e-3}, ValueError, "eps"),
    ],
)
def test_bad_settings_are_refused_naming_them(kwargs, error, match):
    x, scale, offset, mean, var, _ = random_inputs((4, 3), -1, dtype=np.float32)
    with pytest.raises(error, match=match):
        jstep.batch_renorm(x, scale, offset, mean, var, **kwargs)


@pytest.mark.parametrize("name", ["mean", "var", "scale"])
def test_running_statistics_of_the_wrong_shape_are_refused(name):
    x, scale, offset, mean, var, _ = random_inputs((4, 3), -1, dtype=np.float32)
    args = {"scale": scale, "offset": offset, "mean": mean, "var": var}
    args[name] = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=rf"{name} has shape \(4,\).* must have shape \(3,\)"):
        jstep.batch_renorm(x, **args)


def test_it_is_exported_from_jstep_normalization():
    import jstep.normalization

    assert jstep.batch_renorm is jstep.normalization.batch_renorm


@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_one_value_per_feature_gives_the_offset_and_no_input_gradient(eps):
    """K = 1: sigma_B = 0, so Zhat = B whatever Z, and dL/dZ = dL/dG = 0, as batch_norm's."""
    x = np.array([[2.0, -1.0, 7.0]], np.float32)
    scale, offset, mean, var = np.full(3, 2.0), np.array([0.5, -0.5, 0.0]), np.zeros(3), np.ones(3)
    dy = np.array([[1.0, -2.0, 3.0]], np.float32)
    y, vjp = jax.vjp(lambda x, g, b: jstep.batch_renorm(x, g, b, mean, var, eps=eps), x, scale, offset)
    dx, dscale, doffset = vjp(dy)
    np.testing.assert_array_equal(y, offset[None].astype(np.float32))
    np.testing.assert_array_equal(dx, 0)
    np.testing.assert_array_equal(dscale, 0)
    np.testing.assert_array_equal(doffset, dy[0])
