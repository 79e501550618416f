"""B.0.1.4 Adam against the float64 transcription of the notes, Optax, and the m_hat study question."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jstep

import reference as ref
from harness import (
    OPTAX_RTOL_200_JITTED,
    STEPS,
    as_leaves,
    assert_close_runs,
    assert_matches_optax,
    assert_matches_reference,
    displacement_after_jitted_steps,
    gradient_sequence,
    leaves64,
    max_relative_error,
    precision_cases,
    run,
)


def warmup(count):
    return 0.01 * jnp.minimum(1.0, (count + 1.0) / 10)


def warmup_np(count):
    return 0.01 * min(1.0, (count + 1) / 10)


CASES = {
    "published": (lambda: jstep.adam(0.01), lambda g: ref.run_adam(g, 0.01)),
    # The notes' equation literally: eta m_hat / sqrt(v_hat + eps).
    "notes_literal": (
        lambda: jstep.adam(0.01, eps=0.0, eps_root=1e-8),
        lambda g: ref.run_adam(g, 0.01, eps=0.0, eps_root=1e-8),
    ),
    "other_decays": (
        lambda: jstep.adam(0.02, b1=0.5, b2=0.9, eps=1e-3, eps_root=1e-4),
        lambda g: ref.run_adam(g, 0.02, 0.5, 0.9, 1e-3, 1e-4),
    ),
    "nesterov": (lambda: jstep.adam(0.01, nesterov=True), lambda g: ref.run_adam(g, 0.01, nesterov=True)),
    "schedule": (lambda: jstep.adam(warmup), lambda g: ref.run_adam(g, warmup_np)),
    "scale_by_adam": (jstep.scale_by_adam, lambda g: ref.run_adam(g, -1.0)),
}


@pytest.mark.parametrize(
    ("name", "dtype", "rtol"), precision_cases(CASES, {"published": "adam", "nesterov": "adam_nesterov"})
)
def test_matches_reference(name, dtype, rtol):
    assert_matches_reference(CASES[name], 30, dtype, rtol)


OPTAX_PARITY = {
    "adam": (lambda: jstep.adam(0.01), lambda: optax.adam(0.01)),
    "adam_eps_root": (
        lambda: jstep.adam(0.01, 0.8, 0.99, 1e-6, 1e-5),
        lambda: optax.adam(0.01, 0.8, 0.99, 1e-6, 1e-5),
    ),
    "adam_nesterov": (lambda: jstep.adam(0.01, nesterov=True), lambda: optax.adam(0.01, nesterov=True)),
    "adam_schedule": (lambda: jstep.adam(warmup), lambda: optax.adam(warmup)),
    "scale_by_adam": (jstep.scale_by_adam, optax.scale_by_adam),
}


@pytest.mark.parametrize("name", list(OPTAX_PARITY))
def test_optax_parity(name):
    """The README's bound: each update equal to optax.adam's or within 4e-7 relative, element by
    element (measured 2.8e-7 at most). Nesterov's look-ahead adds two terms that nearly cancel
    where m_t and g_t disagree, which the two round differently: normwise per leaf within 1e-6
    (measured 4.8e-7)."""
    if name == "adam_nesterov":
        assert_matches_optax(OPTAX_PARITY[name], 31, rtol=1e-6, elementwise=False)
    else:
        assert_matches_optax(OPTAX_PARITY[name], 31)


@pytest.mark.parametrize("seed", [5, 6])
@pytest.mark.parametrize("name", ["adam", "adam_eps_root", "adam_nesterov"])
def test_optax_parity_after_200_jitted_steps(name, seed):
    """The README's bound for jitted training: after 200 steps, where XLA compiles the two steps
    differently, the parameters' displacement W_200 - W_0 agrees with optax.adam's within 4e-6
    relative, normwise over the whole tree (measured 3e-7 to 1.8e-6; a leaf that wandered back
    near its start has a small displacement, whose relative error alone is larger)."""
    make, make_optax = OPTAX_PARITY[name]
    grads = gradient_sequence(seed, 200, np.float32)
    got = np.concatenate([x.ravel() for x in displacement_after_jitted_steps(make(), grads)])
    want = np.concatenate([x.ravel() for x in displacement_after_jitted_steps(make_optax(), grads)])
    assert_close_runs([[got]], [[want]], OPTAX_RTOL_200_JITTED)


def test_published_and_literal_forms_differ_where_v_hat_is_small():
    """eps outside vs eps_root inside the root: the same for large v_hat, different for tiny ones."""
    grads = [{"big": np.ones(2, np.float32), "tiny": np.full(2, 1e-5, np.float32)}] * 3
    published, _ = run(jstep.adam(0.1), grads, np.float32)
    literal, _ = run(jstep.adam(0.1, eps=0.0, eps_root=1e-8), grads, np.float32)
    big, tiny = 0, 1  # leaves sort by key
    np.testing.assert_allclose(published[-1][big], literal[-1][big], rtol=1e-6)
    # |g| = 1e-5: published step ~ eta * 1e-5 / 1e-5 = eta, literal ~ eta * 1e-5 / sqrt(1.01e-8) ~ 0.0995 eta...
    np.testing.assert_allclose(published[-1][tiny], -0.1 * 1e-5 / (1e-5 + 1e-8), rtol=1e-5)
    np.testing.assert_allclose(literal[-1][tiny], -0.1 * 1e-5 / np.sqrt(1e-10 + 1e-8), rtol=1e-5)


def m_hat_gamma(b1):
    """The running-average weight of the study question, as a callable of t for jstep."""
    return lambda t: b1 * (1 - b1 ** (t - 1)) / (1 - b1**t)


def test_study_question_m_hat_is_a_running_average():
    """Study question B.0.1.4: m_hat_t = gamma_t m_hat_{t-1} + (1 - gamma_t) g_t with

        gamma_t = B1 (1 - B1^(t-1)) / (1 - B1^t),   1 - gamma_t = (1 - B1)/(1 - B1^t),

    a time-varying decay with gamma_1 = 0 (m_hat_1 = g_1: no weight on m_0 = 0) that rises
    to B1. jstep.running_average with this gamma_t reproduces Adam's m_hat, read three ways:
    the debiased moving average, scale_by_adam's state m_t / (1 - B1^t), and the reference.
    """
    b1 = 0.9
    assert m_hat_gamma(b1)(1.0) == 0.0
    assert ref.adam_m_hat_gamma(b1, 1) == 0.0
    np.testing.assert_allclose(m_hat_gamma(b1)(2.0), b1 * (1 - b1) / (1 - b1**2))  # = B1/(1+B1)
    np.testing.assert_allclose(m_hat_gamma(b1)(500.0), b1, rtol=1e-15)

    grads = gradient_sequence(32, STEPS)
    cs = as_leaves(grads)
    with jax.enable_x64(True):
        as_running_average, _ = run(jstep.running_average(m_hat_gamma(b1)), grads, np.float64)
        debiased, _ = run(jstep.moving_average(b1, debias=True), grads, np.float64)
        adam = jstep.scale_by_adam(b1)
        state = adam.init(jax.tree.map(jnp.asarray, grads[0]))
        update = jax.jit(adam.update)
        states = []
        for g in grads:
            _, state = update(g, state)
            states.append(state)
    from_adam_state = [[m / (1 - b1**t) for m in leaves64(s.mu)] for t, s in enumerate(jax.device_get(states), start=1)]
    assert [int(s.count) for s in states] == list(range(1, STEPS + 1))

    m = ref.zeros(cs[0])
    reference_m_hat = []
    for t, g in enumerate(cs, start=1):
        m = ref.running_average_step(m, g, b1)
        reference_m_hat.append(ref.debias(m, b1, t))
    # The running average with the derived gamma_t, in the reference itself.
    assert_close_runs(ref.run_running_average(cs, lambda t: ref.adam_m_hat_gamma(b1, t)), reference_m_hat, 1e-12)
    for got in (as_running_average, debiased, from_adam_state):
        assert_close_runs(got, reference_m_hat, 1e-12)
    # gamma_1 = 0: the first m_hat is the first gradient exactly.
    for a, g in zip(as_running_average[0], cs[0], strict=False):
        np.testing.assert_array_equal(a, g)


def test_a_constant_gamma_is_not_m_hat():
    """Without the time-varying gamma_t (a moving average with gamma = B1) early m_hat is off."""
    grads = gradient_sequence(33, 5)
    with jax.enable_x64(True):
        constant, _ = run(jstep.moving_average(0.9), grads, np.float64)
        m_hat, _ = run(jstep.moving_average(0.9, debias=True), grads, np.float64)
    assert max_relative_error(constant, m_hat) > 0.5
