"""B.0.1.1 running averages against the float64 transcription of the notes, and the study question."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jstep

import reference as ref
from harness import (
    RTOL64,
    STEPS,
    as_leaves,
    assert_close_runs,
    assert_matches_reference,
    gradient_sequence,
    precision_cases,
    run,
)


def smooth_gamma(t):
    """A time-varying gamma_t in (0, 1), as a function of the float step t."""
    return 0.5 + 0.4 * jnp.sin(t) if isinstance(t, jax.Array) else 0.5 + 0.4 * np.sin(t)


CASES = {
    "running_average": (lambda: jstep.running_average(0.8), lambda c: ref.run_running_average(c, 0.8)),
    "running_average_callable": (
        lambda: jstep.running_average(smooth_gamma),
        lambda c: ref.run_running_average(c, smooth_gamma),
    ),
    "moving_average": (lambda: jstep.moving_average(0.7), lambda c: ref.run_running_average(c, 0.7)),
    "moving_average_debias": (
        lambda: jstep.moving_average(0.7, debias=True),
        lambda c: [ref.debias(C, 0.7, t) for t, C in enumerate(ref.run_running_average(c, 0.7), start=1)],
    ),
    "cumulative_average": (
        jstep.cumulative_average,
        lambda c: ref.run_running_average(c, ref.cumulative_gamma),
    ),
}


@pytest.mark.parametrize(
    ("name", "dtype", "rtol"), precision_cases(CASES, {n: n for n in ("running_average", "cumulative_average")})
)
def test_matches_reference(name, dtype, rtol):
    assert_matches_reference(CASES[name], 0, dtype, rtol)


def test_moving_average_is_the_notes_unrolled_sum():
    """C_T = sum_t gamma^(T-t) (1 - gamma) c_t, the notes' expansion of the recursion."""
    values = gradient_sequence(1, 40)
    with jax.enable_x64(True):
        got, _ = run(jstep.moving_average(0.9), values, np.float64)
    cs = as_leaves(values)
    for T in (1, 2, 17, 40):
        assert_close_runs([got[T - 1]], [ref.moving_average_sum(cs[:T], 0.9)], RTOL64)


def test_debiased_moving_average_of_a_constant_is_the_constant():
    """The biased average of a constant c is (1 - gamma^t) c; dividing by 1 - gamma^t gives c."""
    c = [np.full((3,), 2.5)] * 5
    with jax.enable_x64(True):
        biased, _ = run(jstep.moving_average(0.9), c, np.float64)
        debiased, _ = run(jstep.moving_average(0.9, debias=True), c, np.float64)
    for t in range(1, 6):
        np.testing.assert_allclose(biased[t - 1][0], (1 - 0.9**t) * 2.5, rtol=1e-14)
        np.testing.assert_allclose(debiased[t - 1][0], 2.5, rtol=1e-14)


def test_study_question_cumulative_gamma_gives_the_exact_mean():
    """Study question B.0.1.1: with gamma_t = (t - 1)/t, C_t is the mean of c_1..c_t.

    Proof by induction: if C_{t-1} = S_{t-1}/(t-1) then C_t = (t-1)/t S_{t-1}/(t-1) + c_t/t = S_t/t.
    Checked for every t against np.mean, both with `cumulative_average` and with
    `running_average` given that gamma_t.
    """
    values = gradient_sequence(2, STEPS)
    cs = as_leaves(values)
    means = [[np.mean([c[i] for c in cs[:t]], axis=0) for i in range(len(cs[0]))] for t in range(1, STEPS + 1)]
    with jax.enable_x64(True):
        exact, _ = run(jstep.cumulative_average(), values, np.float64)
        via_gamma, _ = run(jstep.running_average(lambda t: (t - 1) / t), values, np.float64)
    assert_close_runs(exact, means, 1e-12)
    assert_close_runs(via_gamma, means, 1e-12)
    # The first average is c_1 itself: gamma_1 = 0 puts no weight on C_0.
    for a, c in zip(exact[0], cs[0], strict=False):
        np.testing.assert_array_equal(a, c)


def test_a_constant_gamma_is_not_the_mean():
    """The counterpart: a moving average weights recent inputs more, so it is not the mean."""
    values = gradient_sequence(3, 30)
    cs = as_leaves(values)
    with jax.enable_x64(True):
        got, _ = run(jstep.moving_average(0.5, debias=True), values, np.float64)
    mean = [np.mean([c[i] for c in cs], axis=0) for i in range(len(cs[0]))]
    errors = [np.max(np.abs(a - m)) / np.max(np.abs(m)) for a, m in zip(got[-1], mean, strict=False)]
    assert min(errors) > 0.1


def test_running_average_update_is_one_step_of_the_rule():
    rng = np.random.default_rng(4)
    C = {"a": rng.normal(size=(4,)), "b": [rng.normal(size=(2, 2))]}
    c = {"a": rng.normal(size=(4,)), "b": [rng.normal(size=(2, 2))]}
    with jax.enable_x64(True):
        got = jstep.running_average_update(jax.tree.map(jnp.asarray, C), jax.tree.map(jnp.asarray, c), 0.3)
        assert jax.tree.structure(got) == jax.tree.structure(C)
        expected = ref.running_average_step(jax.tree.leaves(C), jax.tree.leaves(c), 0.3)
        for a, e in zip(jax.tree.leaves(got), expected, strict=False):
            np.testing.assert_allclose(np.asarray(a), e, rtol=1e-15)


def test_running_average_update_keeps_a_bfloat16_average_bfloat16():
    average = jnp.full((8,), 1.0, jnp.bfloat16)
    value = jnp.full((8,), 3.0, jnp.float32)
    got = jstep.running_average_update(average, value, 0.75)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), 0.75 * 1.0 + 0.25 * 3.0)
