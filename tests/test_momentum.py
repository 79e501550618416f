"""B.0.1.2 momentum: the notes' V and M forms against float64 references, Optax, and the study questions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jstep

import reference as ref
from harness import (
    FLOAT32_RTOL,
    STEPS,
    as_leaves,
    assert_close_runs,
    assert_matches_optax,
    assert_matches_reference,
    gradient_sequence,
    leaves64,
    precision_cases,
    run,
)


def stepped(t):
    """A schedule that drops the rate tenfold after 20 steps (count is the pre-step count)."""
    return jnp.where(t < 20, 0.1, 0.01)


def stepped_np(count):
    return 0.1 if count < 20 else 0.01


CASES = {
    "sgd": (lambda: jstep.sgd(0.05), lambda g: ref.run_sgd(g, 0.05)),
    "sgd_schedule": (lambda: jstep.sgd(stepped), lambda g: ref.run_sgd(g, stepped_np)),
    "momentum": (lambda: jstep.momentum(0.05, 0.9), lambda g: ref.run_momentum(g, 0.05, 0.9)),
    "momentum_nesterov": (
        lambda: jstep.momentum(0.05, 0.8, nesterov=True),
        lambda g: ref.run_momentum(g, 0.05, 0.8, nesterov=True),
    ),
    "momentum_schedule": (
        lambda: jstep.momentum(stepped, 0.9),
        lambda g: ref.run_momentum(g, stepped_np, 0.9),
    ),
    "ema_momentum": (lambda: jstep.ema_momentum(0.5, 0.9), lambda g: ref.run_ema_momentum(g, 0.5, 0.9)),
    "ema_momentum_schedule": (
        lambda: jstep.ema_momentum(stepped, 0.7),
        lambda g: ref.run_ema_momentum(g, stepped_np, 0.7),
    ),
}


@pytest.mark.parametrize(
    ("name", "dtype", "rtol"),
    precision_cases(CASES, {n: n for n in ("sgd", "momentum", "momentum_nesterov", "ema_momentum")}),
)
def test_matches_reference(name, dtype, rtol):
    assert_matches_reference(CASES[name], 10, dtype, rtol)


OPTAX_PARITY = {
    "sgd": (lambda: jstep.sgd(0.05), lambda: optax.sgd(0.05)),
    "momentum": (lambda: jstep.momentum(0.05, 0.9), lambda: optax.sgd(0.05, momentum=0.9)),
    "nesterov": (
        lambda: jstep.momentum(0.05, 0.9, nesterov=True),
        lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
    ),
}


@pytest.mark.parametrize("name", list(OPTAX_PARITY))
def test_optax_parity_at_a_constant_rate(name):
    """sgd is Optax's bit for bit. Momentum is V_t = gamma V_{t-1} + eta g_t against Optax's
    eta (gamma T_{t-1} + g_t): the same value rounded in another order, so an element that
    cancels to near 0 differs relatively more; normwise per leaf the two agree within 1e-6
    (measured 3e-7 to 4.7e-7)."""
    if name == "sgd":
        assert_matches_optax(OPTAX_PARITY[name], 11, rtol=0.0)
    else:
        assert_matches_optax(OPTAX_PARITY[name], 11, rtol=1e-6, elementwise=False)


def test_a_schedule_differs_from_optax_sgd_as_the_docstring_says():
    """With a schedule, jstep keeps each gradient at the rate of the step it arrived at,
    V_t = sum_s gamma^(t-s) eta_s g_s; optax.sgd scales the whole trace by the current rate,
    eta_t sum_s gamma^(t-s) g_s. After a tenfold drop, with zero gradients from then on,
    jstep's update keeps decaying at its old size while Optax's is ten times smaller at once.
    """
    gamma = 0.9
    grads = gradient_sequence(12, 20, np.float64) + [
        jax.tree.map(np.zeros_like, g) for g in gradient_sequence(12, 10, np.float64)
    ]
    ours, _ = run(jstep.momentum(stepped, gamma), grads, np.float32)
    theirs, _ = run(optax.sgd(stepped, momentum=gamma), grads, np.float32)
    cs = as_leaves(grads)
    # jstep is the notes' V form with eta_t inside the velocity.
    assert_close_runs(ours, ref.run_momentum(cs, stepped_np, gamma), FLOAT32_RTOL["momentum"])
    # Optax is the trace form T_t = gamma T_{t-1} + g_t, update -eta_t T_t.
    trace, optax_form = ref.zeros(cs[0]), []
    for t, g in enumerate(cs, start=1):
        trace = [gamma * T + x for T, x in zip(trace, g, strict=False)]
        optax_form.append([-stepped_np(t - 1) * T for T in trace])
    assert_close_runs(theirs, optax_form, FLOAT32_RTOL["momentum"])
    # Before the drop they agree; after it they differ by exactly the ratio of the rates.
    assert_close_runs(ours[:20], theirs[:20], 1e-5)
    for t in range(20, 30):
        for a, b in zip(ours[t], theirs[t], strict=False):
            np.testing.assert_allclose(b, 0.1 * a, rtol=1e-5)


def test_study_question_the_two_forms_are_the_same_when_eta_is_eta_prime_times_one_minus_gamma():
    """Study question B.0.1.2: V_t = eta'(1-gamma) sum_s gamma^(t-s) g_s = eta' M_t, so
    momentum(eta'(1-gamma), gamma) and ema_momentum(eta', gamma) give the same W_t. Checked
    on a training run where the gradient depends on the weights (so any difference would
    feed back), for the updates and the weights, in float64."""
    eta_prime, gamma = 0.3, 0.9
    rng = np.random.default_rng(13)
    curvature = {"a": rng.uniform(0.1, 2.0, (6,)), "b": rng.uniform(0.1, 2.0, (2, 3))}
    noise = [jax.tree.map(lambda c: rng.normal(size=c.shape), curvature) for _ in range(STEPS)]

    def train(opt):
        w = jax.tree.map(jnp.ones_like, curvature)
        state = opt.init(w)
        update = jax.jit(opt.update)
        path = []
        for n in noise:
            g = jax.tree.map(lambda c, x, e: c * x + 0.1 * e, curvature, w, n)
            u, state = update(g, state)
            w = optax.apply_updates(w, u)
            path.append(leaves64(w))
        return path

    with jax.enable_x64(True):
        curvature = jax.tree.map(jnp.asarray, curvature)
        v_form = train(jstep.momentum(eta_prime * (1 - gamma), gamma))
        m_form = train(jstep.ema_momentum(eta_prime, gamma))
    assert_close_runs(v_form, m_form, 1e-12)
    # And the two forms do move: the weights end far from where they started.
    assert max(np.max(np.abs(w - 1)) for w in v_form[-1]) > 0.5


def _noisy_average(gamma, true_gradient, sigma, steps, rng):
    """M_t = -update / eta' of ema_momentum(1, gamma) over g_t = true_gradient + sigma noise."""
    grads = [[true_gradient + sigma * rng.normal(size=4000)] for _ in range(steps)]
    with jax.enable_x64(True):
        got, _ = run(jstep.ema_momentum(1.0, gamma), grads, np.float64)
    return np.stack([-u[0] for u in got])


def test_study_question_gamma_0_9_averages_more_than_gamma_0_1():
    """Study question B.0.1.2: gamma = 0.9 has *more* effect than gamma = 0.1.

    On g_t = g + sigma xi_t the step direction M_t has stationary variance
    sigma^2 (1 - gamma)/(1 + gamma) around g: 0.0526 sigma^2 for 0.9, 0.818 sigma^2 for 0.1,
    a ratio of 15.5. The price is lag: after g flips sign, M_t with gamma = 0.9 needs
    ceil(log 2 / -log 0.9) = 7 steps to change sign, with gamma = 0.1 one step.
    """
    rng = np.random.default_rng(14)
    sigma, g = 2.0, 0.5
    burn_in = 40
    variance = {}
    for gamma in (0.1, 0.9):
        M = _noisy_average(gamma, g, sigma, 200, rng)[burn_in:]
        variance[gamma] = np.mean((M - g) ** 2)
        expected = sigma**2 * (1 - gamma) / (1 + gamma)
        assert abs(variance[gamma] / expected - 1) < 0.05, (gamma, variance[gamma], expected)
    ratio = variance[0.1] / variance[0.9]
    assert 14 < ratio < 17, ratio

    lag = {}
    for gamma in (0.1, 0.9):
        grads = [[np.array([1.0])]] * 60 + [[np.array([-1.0])]] * 20
        with jax.enable_x64(True):
            got, _ = run(jstep.ema_momentum(1.0, gamma), grads, np.float64)
        M = np.array([-u[0][0] for u in got])
        lag[gamma] = int(np.argmax(M[60:] < 0)) + 1
    assert lag == {0.1: 1, 0.9: 7}
