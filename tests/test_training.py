"""Training under jit (an ill-conditioned parabola, Rosenbrock) and composition with Optax and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jstep

import reference as ref
from harness import (
    FLOAT32_RTOL,
    OPTAX_RTOL,
    OPTIMIZER_NAMES,
    as_leaves,
    assert_close_runs,
    gradient_sequence,
    leaves64,
    max_relative_error,
    optimizers,
    params_like,
    run,
    stack,
)

# ------------------------------------------------------------------------- convergence

# The parabola f(w) = 1/2 sum_i h_i w_i^2 over two leaves, curvatures 1..100 (condition
# number 100), from w = 1; minimum at 0.
CURVATURE = {"a": np.logspace(0, 2, 8), "b": np.array([[1.0, 30.0], [3.0, 100.0]])}


def parabola(w):
    return 0.5 * sum(jnp.sum(h * x * x) for h, x in zip(jax.tree.leaves(CURVATURE), jax.tree.leaves(w), strict=True))


def rosenbrock(w):
    x, y = w["xy"]
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def decay_100x(rate, steps):
    """An exponential decay from `rate` to `rate`/100 over `steps` steps."""
    return optax.exponential_decay(rate, steps, 0.01)


# name -> (optimizer, steps). Step sizes tuned so that each one converges.
PARABOLA = {
    "sgd": (lambda: jstep.sgd(0.019), 1000),  # stable below 2/h_max = 0.02
    "momentum": (lambda: jstep.momentum(0.01, 0.9), 300),
    "momentum_nesterov": (lambda: jstep.momentum(0.01, 0.9, nesterov=True), 300),
    "ema_momentum": (lambda: jstep.ema_momentum(0.1, 0.9), 300),
    # With a constant rate RMSprop's sign-like steps end in a cycle of size ~eta.
    "rmsprop": (lambda: jstep.rmsprop(decay_100x(0.03, 1000), 0.99), 1000),
    "adagrad": (lambda: jstep.adagrad(0.3), 300),
    "adadelta": (lambda: jstep.adadelta(decay_100x(3.0, 1000), 0.9), 1000),
    "adam": (lambda: jstep.adam(0.1), 300),
}
ROSENBROCK = {
    "sgd": (lambda: jstep.sgd(0.0018), 20000),  # stable below 2/h_max = 0.001997 at (1, 1)
    "momentum": (lambda: jstep.momentum(0.001, 0.9), 3000),
    "momentum_nesterov": (lambda: jstep.momentum(0.001, 0.9, nesterov=True), 3000),
    "ema_momentum": (lambda: jstep.ema_momentum(0.01, 0.9), 3000),
    "rmsprop": (lambda: jstep.rmsprop(decay_100x(0.01, 5000), 0.9), 5000),
    "adagrad": (lambda: jstep.adagrad(1.0), 10000),
    "adadelta": (lambda: jstep.adadelta(decay_100x(0.3, 10000), 0.9), 10000),
    "adam": (lambda: jstep.adam(0.03), 3000),
}


@jax.jit(static_argnums=(0, 1, 3))
def train(opt, loss, w, steps):
    """`steps` steps of opt on loss from w, in one lax.fori_loop; returns the final weights."""

    def step(_, carry):
        w, state = carry
        updates, state = opt.update(jax.grad(loss)(w), state, w)
        return optax.apply_updates(w, updates), state

    return jax.lax.fori_loop(0, steps, step, (w, opt.init(w)))[0]


def distance(w, target):
    return float(
        np.sqrt(sum(np.sum((np.asarray(x) - t) ** 2) for x, t in zip(jax.tree.leaves(w), target, strict=True)))
    )


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_converges_on_an_ill_conditioned_parabola(name):
    make, steps = PARABOLA[name]
    w0 = jax.tree.map(lambda h: jnp.ones(h.shape, jnp.float32), CURVATURE)
    w = train(make(), parabola, w0, steps)
    start = distance(w0, [0, 0])
    assert distance(w, [0, 0]) < 1e-3 < start
    assert float(parabola(w)) < 1e-6 * float(parabola(w0))


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_converges_on_rosenbrock(name):
    make, steps = ROSENBROCK[name]
    w0 = {"xy": jnp.array([-1.2, 1.0])}
    w = train(make(), rosenbrock, w0, steps)
    assert distance(w, [np.ones(2)]) < 1e-2
    assert float(rosenbrock(w)) < 1e-4 < float(rosenbrock(w0))


# ------------------------------------------------------------------------- composition


def clipped(grads, max_norm):
    """optax.clip_by_global_norm, in float64: g * min(1, max_norm / ||g||)."""
    out = []
    for g in grads:
        norm = np.sqrt(sum(np.sum(x * x) for x in g))
        out.append([x * min(1.0, max_norm / norm) for x in g])
    return out


def test_chain_clip_by_global_norm_then_adam():
    grads = gradient_sequence(60, 30, np.float32)
    # Eagerly, so that the comparison with Optax is the README's per-update bound.
    chained, _ = run(optax.chain(optax.clip_by_global_norm(5.0), jstep.adam(0.01)), grads, np.float32, jit=False)
    with_optax, _ = run(optax.chain(optax.clip_by_global_norm(5.0), optax.adam(0.01)), grads, np.float32, jit=False)
    alone, _ = run(jstep.adam(0.01), grads, np.float32)
    assert_close_runs(chained, ref.run_adam(clipped(as_leaves(grads), 5.0), 0.01), FLOAT32_RTOL["adam"])
    assert_close_runs(chained, with_optax, OPTAX_RTOL)
    assert max_relative_error(chained, alone) > 0.05  # the clipping did change the steps


def test_inject_hyperparams_learning_rate_and_decay_as_arrays():
    """learning_rate and gamma become arrays in the state; changing them mid-run changes
    the following steps exactly as the reference with those values says."""
    grads = gradient_sequence(61, 20, np.float32)
    opt = optax.inject_hyperparams(jstep.momentum)(learning_rate=0.05, gamma=0.9)
    params = params_like(grads, np.float32)
    state = opt.init(params)
    assert set(state.hyperparams) == {"learning_rate", "gamma"}
    update = jax.jit(opt.update)
    got = []
    for t, g in enumerate(grads):
        if t == 10:
            hyperparams = dict(state.hyperparams, learning_rate=jnp.asarray(0.01), gamma=jnp.asarray(0.5))
            state = state._replace(hyperparams=hyperparams)
        updates, state = update(g, state)
        got.append(leaves64(updates))
    # The reference with the rate and decay switched after 10 steps.
    V, expected = ref.zeros(as_leaves(grads)[0]), []
    for t, g in enumerate(as_leaves(grads)):
        eta, gamma = (0.05, 0.9) if t < 10 else (0.01, 0.5)
        V = ref.velocity_step(V, g, eta, gamma)
        expected.append(ref.velocity_update(V))
    assert_close_runs(got, expected, FLOAT32_RTOL["momentum"])
    unchanged, _ = run(jstep.momentum(0.05, 0.9), grads, np.float32)
    assert_close_runs(got[:10], unchanged[:10], 1e-6)
    assert max_relative_error(got[10:], unchanged[10:]) > 0.5


def test_inject_hyperparams_adam_learning_rate_scales_the_next_step():
    grads = gradient_sequence(62, 6, np.float32)
    opt = optax.inject_hyperparams(jstep.adam)(learning_rate=0.01, b1=0.9, b2=0.999)
    state = opt.init(params_like(grads, np.float32))
    update = jax.jit(opt.update)
    for g in grads[:5]:
        _, state = update(g, state)
    lowered = state._replace(hyperparams=dict(state.hyperparams, learning_rate=jnp.asarray(0.001)))
    same, same_state = update(grads[5], state)
    smaller, smaller_state = update(grads[5], lowered)
    for a, b in zip(jax.tree.leaves(smaller), jax.tree.leaves(same), strict=True):
        np.testing.assert_allclose(a, 0.1 * b, rtol=1e-6)
    # The moments do not depend on the rate.
    for a, b in zip(jax.tree.leaves(smaller_state.inner_state), jax.tree.leaves(same_state.inner_state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_multi_steps_accumulates_three_gradients():
    """MultiSteps(k=3): two zero updates, then one Adam step on the mean of three gradients."""
    grads = gradient_sequence(63, 12, np.float32)
    got, _ = run(optax.MultiSteps(jstep.adam(0.01), every_k_schedule=3), grads, np.float32)
    means = [jax.tree.map(lambda *g: np.mean(g, axis=0), *grads[i : i + 3]) for i in range(0, 12, 3)]
    on_means, _ = run(jstep.adam(0.01), means, np.float32)
    for t, step in enumerate(got):
        if t % 3 < 2:
            assert all(np.all(u == 0) for u in step)
        else:
            assert_close_runs([step], [on_means[t // 3]], 1e-5)


def test_apply_if_finite_skips_a_nan_step():
    grads = gradient_sequence(64, 6, np.float32)
    poisoned = [*grads[:3], jax.tree.map(lambda g: np.full_like(g, np.nan), grads[0]), *grads[3:]]
    got, state = run(optax.apply_if_finite(jstep.adam(0.01), max_consecutive_errors=2), poisoned, np.float32)
    clean, clean_state = run(jstep.adam(0.01), grads, np.float32)
    assert all(np.all(u == 0) for u in got[3])
    assert_close_runs(got[:3] + got[4:], clean, 1e-6)
    assert int(state.total_notfinite) == 1
    assert int(state.inner_state.count) == int(clean_state.count) == 6


def test_masked_leaves_out_other_leaves_even_integer_ones():
    """optax.masked applies jstep.adam to the masked leaves only; an integer leaf outside the
    mask is never seen by init (the TypeError's advice)."""
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2), "step": jnp.zeros((), jnp.int32)}
    mask = {"w": True, "b": False, "step": False}
    opt = optax.masked(jstep.adam(0.01), mask)
    state = opt.init(params)
    alone = jstep.adam(0.01)
    alone_state = alone.init({"w": params["w"]})
    rng = np.random.default_rng(65)
    for _ in range(5):
        g = {
            "w": rng.normal(size=(3, 2)).astype(np.float32),
            "b": rng.normal(size=2).astype(np.float32),
            "step": np.zeros((), np.int32),
        }
        updates, state = opt.update(g, state, params)
        expected, alone_state = alone.update({"w": g["w"]}, alone_state)
        np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)
        np.testing.assert_array_equal(updates["b"], g["b"])  # passed through untouched


# -------------------------------------------------------------------------------- vmap


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_vmap_over_independent_problems_equals_a_loop(name):
    batch, steps = 3, 6
    opt = optimizers()[name]
    problems = [gradient_sequence(70 + b, steps, np.float32) for b in range(batch)]
    params = params_like(problems[0], np.float32)
    batched_params = jax.tree.map(lambda p: jnp.stack([p * (b + 1) for b in range(batch)]), params)

    state = jax.vmap(opt.init)(batched_params)
    update = jax.jit(jax.vmap(opt.update))
    batched = []
    for t in range(steps):
        g = stack([problems[b][t] for b in range(batch)], jnp.float32)
        updates, state = update(g, state, batched_params)
        batched.append(updates)
    assert state.count.shape == (batch,)

    # The loop runs eagerly and the batch under jit (which fuses multiply-adds): float32
    # round-off apart, normwise.
    for b in range(batch):
        single, single_state = run(opt, problems[b], np.float32, jit=False)
        assert_close_runs([leaves64(jax.tree.map(lambda u, b=b: u[b], u)) for u in batched], single, 1e-5)
        state_b = leaves64(jax.tree.map(lambda x, b=b: x[b], state))
        assert_close_runs([state_b], [leaves64(single_state)], 1e-5)
