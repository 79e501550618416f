"""check_vjp catches wrong VJPs (first and second order) and reports readably."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jstep


def cube_with_vjp(first_order_factor=1.0, differentiable_backward=True):
    """x^3 with a hand-written VJP 3 x^2 u (times a factor; optionally hiding x from autodiff)."""

    @jax.custom_vjp
    def cube(x):
        return x**3

    def fwd(x):
        return x**3, x

    def bwd(x, u):
        x = x if differentiable_backward else jax.lax.stop_gradient(x)
        return (3 * x**2 * u * first_order_factor,)

    cube.defvjp(fwd, bwd)
    return cube


X = np.array([0.7, -1.3, 2.1], np.float32)


def test_a_correct_vjp_passes_and_the_report_says_so():
    report = jstep.check_vjp(cube_with_vjp(), X, reference=lambda x: x**3, order=2)
    assert report.passed
    assert [(c.order, c.against) for c in report.comparisons] == [
        (1, "autodiff of reference"),
        (1, "finite differences"),
        (2, "autodiff of reference"),
        (2, "finite differences"),
    ]
    assert all(c.worst_rel < 1e-9 for c in report.comparisons)
    assert "passed" in str(report) and "0 (x)" in str(report)


def test_a_vjp_off_by_a_tenth_of_a_percent_is_caught_by_both_references():
    with pytest.raises(AssertionError) as caught:
        jstep.check_vjp(cube_with_vjp(1.001), X, reference=lambda x: x**3)
    message = str(caught.value)
    assert "FAILED" in message
    assert message.count("FAIL") == 3  # the title and both comparisons
    assert "1.000e-03" in message  # the relative error is reported as measured


def test_a_wrong_second_derivative_is_caught_only_at_order_two():
    broken = cube_with_vjp(differentiable_backward=False)  # grad of grad loses the 6 x u term
    jstep.check_vjp(broken, X, reference=lambda x: x**3, order=1)
    with pytest.raises(AssertionError, match=r"(?s)2 +0 \(x\) +finite differences.*FAIL"):
        jstep.check_vjp(broken, X, order=2)


def test_many_arguments_and_pytrees_are_reported_per_argument():
    def f(a, tree):
        return jnp.sin(a) * tree["b"] + tree["c"] ** 2

    report = jstep.check_vjp(f, X, {"b": X + 1, "c": X * 2})
    assert [c.argument for c in report.comparisons] == ["0 (a)", "1 (tree)"]


def test_float64_is_local_to_the_call():
    jstep.check_vjp(jnp.sin, X)
    assert jnp.ones(2).dtype == jnp.float32


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        jstep.check_vjp(jnp.sin, X, order=3)
    with pytest.raises(TypeError, match="floating"):
        jstep.check_vjp(jnp.sin, np.arange(3))
    with pytest.raises(ValueError, match=r"directions must be an int >= 0, got -1"):
        jstep.check_vjp(jnp.sin, X, directions=-1)
    with pytest.raises(ValueError, match="directions=0 skips the finite differences, so a reference is needed"):
        jstep.check_vjp(jnp.sin, X, directions=0)


# ------------------------------------------------------------ arguments of any scale


def with_planted_error(f, first=1.0, second=1.0):
    """`f` with a custom VJP: f's own times `first`, whose derivative (what grad of grad sees)
    is `second` times the true one (for first = 1; the value stays f's VJP)."""

    @jax.custom_vjp
    def planted(*args):
        return f(*args)

    def fwd(*args):
        return f(*args), args

    def bwd(args, u):
        exact = jax.vjp(f, *args)[1](u)
        return tuple(first * t + (second - 1) * (t - jax.lax.stop_gradient(t)) for t in exact)

    planted.defvjp(fwd, bwd)
    planted.__name__ = getattr(f, "__name__", "f")
    return planted


def plain_batch_norm(x, scale, offset):
    mu = x.mean(axis=0)
    return scale * (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(axis=0) + 1e-5) + offset


def batch_norm_at(size):
    """(jstep.batch_norm, its plain reference, arguments with x of RMS about `size`)."""
    rng = np.random.default_rng(5)
    x = size * rng.normal(size=(6, 3))
    return jstep.batch_norm, plain_batch_norm, (x, rng.uniform(0.5, 1.5, 3), rng.normal(size=3))


def sine_at(size):
    """(sin(x / size), itself, x of RMS about `size`): the length scale of the function is the
    argument's; at size 1e-3 it is the sin(1000 x) of JAX's own autodiff."""

    def sine(x):
        return jnp.sin(x / size)

    return sine, sine, (size * np.random.default_rng(6).normal(size=5),)


SCALES = [1e-3, 1.0, 1e3]
CASES = [batch_norm_at, sine_at]


@pytest.mark.parametrize("size", SCALES)
@pytest.mark.parametrize("case", CASES)
def test_exact_vjps_pass_at_every_scale_of_the_argument(case, size):
    f, reference, args = case(size)
    report = jstep.check_vjp(f, *args, reference=reference, order=2)
    assert report.passed  # check_vjp raises otherwise, with the report


@pytest.mark.parametrize("size", SCALES)
@pytest.mark.parametrize("case", CASES)
def test_a_tenth_of_a_percent_is_caught_at_every_scale_of_the_argument(case, size):
    f, reference, args = case(size)
    with pytest.raises(AssertionError) as caught:  # the VJP itself 0.1% off: both references see it
        jstep.check_vjp(with_planted_error(f, first=1.001), *args, reference=reference)
    failed = [line for line in str(caught.value).splitlines()[1:] if line.endswith("FAIL")]
    assert any("autodiff of reference" in line for line in failed), caught.value
    assert any("finite differences" in line for line in failed), caught.value
    # The VJP exact, its derivative 0.1% off: finite differences of the VJP see it at order 2.
    broken = with_planted_error(f, second=1.001)
    jstep.check_vjp(broken, *args, reference=reference, order=1)
    with pytest.raises(AssertionError, match=r"(?m)^2 +0 +finite differences .*FAIL$"):
        jstep.check_vjp(broken, *args, order=2)


# ------------------------------------------------------------ offsets and the seed


@pytest.mark.parametrize("offset", [3e2, 1e3, 1e5])
def test_batch_norm_far_from_zero_passes_and_a_wrong_vjp_there_is_caught(offset):
    """Batch norm does not see an offset of x: the step follows x's spread, not its size (a step
    of h times the RMS, 1e3 times the spread at offset 1e3, moved x by a whole spread there and
    failed the exact VJP by 8%). Far beyond 1e5 spreads, float64 no longer holds x + h v
    finely enough (at 1e8 its ulp is 1.5e-5 of the step: 4e-5 relative error)."""
    rng = np.random.default_rng(11)
    args = (offset + rng.normal(size=(32, 3)), rng.uniform(0.5, 1.5, 3), rng.normal(size=3))
    jstep.check_vjp(jstep.batch_norm, *args, reference=plain_batch_norm)
    with pytest.raises(AssertionError, match=r"(?m)^1 +0 +finite differences .*FAIL$"):
        jstep.check_vjp(with_planted_error(jstep.batch_norm, first=1.001), *args)


def test_a_wrong_vjp_that_is_right_only_along_the_data_is_caught_with_data_from_the_same_seed():
    """Test data drawn with np.random.default_rng(seed), as is usual, must not be check_vjp's
    cotangent u too (seed 0 is the default of both): a VJP that is wrong everywhere but along x
    (here u + (u - x <x, u> / <x, x>) / 100 for the identity) would then pass. For batch norm,
    u = x lies almost in the null space of the transposed Jacobian, and the finite differences
    would check derivatives 1e-4 of their usual size."""
    x = np.random.default_rng(0).standard_normal(6)

    @jax.custom_vjp
    def identity(y):
        return y

    def bwd(y, u):
        return (u + (u - y * jnp.vdot(y, u) / jnp.vdot(y, y)) / 100,)

    identity.defvjp(lambda y: (y, y), bwd)
    with pytest.raises(AssertionError, match=r"(?m)^1 +0 \(y\) +finite differences .*FAIL$"):
        jstep.check_vjp(identity, x)
