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
