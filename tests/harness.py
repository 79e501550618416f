"""Test plumbing: random multi-leaf pytrees, gradient sequences, and a jitted optimizer run.

`run` steps an optax transformation over a sequence of gradients and returns each step's
updates as a list of NumPy leaves, the layout the float64 references in `reference.py`
produce, so that the two compare leaf by leaf.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jstep

import reference as ref

# A multi-leaf tree: a dense layer, a nested list with a 3-d leaf, and a scalar.
SHAPES = {"dense": {"w": (5, 3), "b": (3,)}, "conv": [(2, 3, 2)], "scale": ()}
# Each leaf gets its own gradient scale, so that a per-leaf rule cannot hide behind another.
SCALES = (3.0, 0.02, 1.0, 40.0)


def tree_of(make):
    """The SHAPES tree with `make(index, shape)` at each leaf."""
    shapes, treedef = jax.tree.flatten(SHAPES, is_leaf=lambda s: isinstance(s, tuple))
    return jax.tree.unflatten(treedef, [make(i, s) for i, s in enumerate(shapes)])


def gradient_sequence(seed, steps, dtype=np.float64, *, complex_values=False):
    """`steps` random gradient trees (NumPy), rounded to `dtype`, each leaf with its own scale."""
    rng = np.random.default_rng(seed)

    def draw(i, shape):
        x = rng.normal(size=(steps, *shape))
        if complex_values:
            x = x + 1j * rng.normal(size=(steps, *shape))
        return (SCALES[i] * x).astype(dtype)

    stacked = tree_of(draw)
    return [jax.tree.map(lambda x, t=t: x[t], stacked) for t in range(steps)]


def params_like(grads, dtype):
    """A parameter tree shaped like one gradient tree, as JAX arrays of `dtype`."""
    return jax.tree.map(lambda g: jnp.ones(np.shape(g), dtype), grads[0])


def leaves64(tree):
    """The leaves of a tree as float64 (or complex128) NumPy arrays, the reference layout."""

    def widen(x):
        x = np.asarray(x)
        return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)

    return [widen(x) for x in jax.tree.leaves(tree)]


def stack(trees, dtype=None):
    """A list of trees -> one tree of arrays with a leading step axis."""
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs), dtype), *trees)


def scan_updates(opt, state, stacked_grads):
    """(final state, stacked updates): `opt.update` scanned over the leading axis."""

    def step(state, g):
        updates, state = opt.update(g, state)
        return state, updates

    return jax.lax.scan(step, state, stacked_grads)


def run(opt, grads, dtype, *, jit=True):
    """Initialize `opt` on params of `dtype` and step it over `grads` (a list of trees).

    Returns (updates per step as lists of float64/complex128 leaves, final state). Call
    inside `jax.enable_x64(True)` for float64. `jit=False` steps eagerly, which is cheaper
    than a compilation for a few steps.
    """
    params = params_like(grads, dtype)
    state = opt.init(params)
    update = jax.jit(opt.update) if jit else opt.update
    steps = []
    for g in grads:
        updates, state = update(jax.tree.map(lambda x: np.asarray(x, dtype), g), state, params)
        steps.append(updates)
    return [leaves64(u) for u in jax.device_get(steps)], state


def as_leaves(grads):
    """A list of gradient trees -> a list of lists of float64 leaves (reference input)."""
    return [leaves64(g) for g in grads]


def max_relative_error(actual, expected):
    """max over steps and leaves of max|a - e| / max|e|: a normwise relative error per leaf."""
    worst = 0.0
    for step_a, step_e in zip(actual, expected, strict=True):
        for a, e in zip(step_a, step_e, strict=True):
            assert a.shape == e.shape
            scale = np.max(np.abs(e))
            err = np.max(np.abs(a - e))
            worst = max(worst, err / scale if scale > 0 else err)
    return worst


def assert_close_runs(actual, expected, rtol):
    err = max_relative_error(actual, expected)
    assert err <= rtol, f"relative error {err:.3g} > {rtol:.3g}"
    return err


# Tolerances (normwise per leaf, worst step), after 50 steps:
# - float64 against the float64 reference;
# - float32 against the float64 reference, with the inputs rounded to float32 for both, so only
#   round-off is measured: a bound per algorithm, about twice what it measures (FLOAT32_RTOL);
# - float32 against Optax: the README's bound (OPTAX_RTOL).
RTOL64 = 1e-10
STEPS = 50

# float32 against the float64 reference, jitted, 50 steps: about twice the measured worst case.
FLOAT32_RTOL = {
    # One product per step: only the rounding of eta and g (measured 7e-8).
    "sgd": 2e-7,
    # A sum of 50 decaying terms, read relative to the largest update of the leaf: the scalar leaf's
    # velocity passes near 0, where its relative round-off is largest (measured 6.6e-6 to 1.1e-5).
    "momentum": 2e-5,
    "momentum_nesterov": 2e-5,
    "ema_momentum": 2e-5,
    # g / (sqrt(G) + eps): each update is a ratio of well-scaled float32 values (measured 2-3e-7).
    "rmsprop": 5e-7,
    "adagrad": 5e-7,
    "adadelta": 6e-7,
    # 1 - B^t is formed in float32 as Optax forms it: B2 = 0.999 rounded to float32 moves 1 - B2 by
    # 1.3e-5 relative, and so v_hat and the update (measured 1.8e-5; Nesterov's look-ahead divides
    # by 1 - B1^(t+1) as well, 5.6e-5). Optax agrees with jstep to 4e-7 (OPTAX_RTOL).
    "adam": 4e-5,
    "adam_nesterov": 1e-4,
    # gamma = 0.9 rounded to float32 (measured 4e-7); the cumulative average's gamma_t = (t-1)/t is
    # rounded to float32 anew every step (measured 3.7e-5).
    "running_average": 1e-6,
    "cumulative_average": 6e-5,
}

# float32 against Optax, both stepped eagerly (op by op): the README's bound for `adam` against
# `optax.adam`, each update equal or within 4e-7 relative (measured at most 2.8e-7, element by
# element). Forming 1 - B2 after rounding B2 to float32 would move each update by about 7e-6.
OPTAX_RTOL = 4e-7
# After 200 jitted steps, where XLA compiles the two steps differently: the displacement of the
# parameters within 4e-6 relative (README), normwise over the tree (measured 3e-7 to 1.8e-6).
OPTAX_RTOL_200_JITTED = 4e-6


def precision_cases(names, float32_names):
    """(name, dtype, rtol) parameters: every case in float64 (under jax.enable_x64), and the cases
    of `float32_names` (a dict of case name -> its FLOAT32_RTOL key) in float32 too."""
    cases = [pytest.param(n, np.float64, RTOL64, id=f"{n}-float64") for n in names]
    return cases + [
        pytest.param(n, np.float32, FLOAT32_RTOL[key], id=f"{n}-float32") for n, key in float32_names.items()
    ]


def max_elementwise_relative_error(actual, expected):
    """max over steps, leaves and elements of |a - e| / |e| (|a - e| where e = 0)."""
    worst = 0.0
    for step_a, step_e in zip(actual, expected, strict=True):
        for a, e in zip(step_a, step_e, strict=True):
            assert a.shape == e.shape
            error, scale = np.abs(a - e), np.abs(e)
            worst = max(worst, float(np.max(np.where(scale > 0, error / np.where(scale > 0, scale, 1), error))))
    return worst


def optimizers():
    """One instance of every jstep optimizer, by name (fresh closures on each call)."""
    return {
        "sgd": jstep.sgd(0.05),
        "momentum": jstep.momentum(0.05, 0.9),
        "momentum_nesterov": jstep.momentum(0.05, 0.9, nesterov=True),
        "ema_momentum": jstep.ema_momentum(0.5, 0.9),
        "rmsprop": jstep.rmsprop(0.01, 0.9),
        "adagrad": jstep.adagrad(0.1),
        "adadelta": jstep.adadelta(1.0, 0.9),
        "adam": jstep.adam(0.01),
    }


OPTIMIZER_NAMES = list(optimizers())

# The float64 reference of each of those, with the same settings: grads -> updates per step.
REFERENCE_RUNS = {
    "sgd": lambda g: ref.run_sgd(g, 0.05),
    "momentum": lambda g: ref.run_momentum(g, 0.05, 0.9),
    "momentum_nesterov": lambda g: ref.run_momentum(g, 0.05, 0.9, nesterov=True),
    "ema_momentum": lambda g: ref.run_ema_momentum(g, 0.5, 0.9),
    "rmsprop": lambda g: ref.run_rmsprop(g, 0.01, 0.9, 1e-8),
    "adagrad": lambda g: ref.run_adagrad(g, 0.1, 1e-10),
    "adadelta": lambda g: ref.run_adadelta(g, 1.0, 0.9, 1e-6),
    "adam": lambda g: ref.run_adam(g, 0.01),
}


def assert_matches_reference(case, seed, dtype, rtol):
    """Run `case` = (make_optimizer, reference) for STEPS steps on a seeded sequence: the
    optimizer (in `dtype`, under x64 for float64) must match the float64 reference."""
    make, reference = case
    grads = gradient_sequence(seed, STEPS, dtype)
    with jax.enable_x64(dtype == np.float64):
        got, state = run(make(), grads, dtype)
    assert_close_runs(got, reference(as_leaves(grads)), rtol)
    assert int(state.count) == STEPS


def assert_matches_optax(pair, seed, rtol=OPTAX_RTOL, *, elementwise=True):
    """`pair` = (make_jstep, make_optax): the same float32 updates for STEPS steps, both stepped
    eagerly, each update within `rtol` relative of Optax's, element by element (`elementwise`) or
    normwise per leaf (where the two forms differ, so that an element near 0 cancels differently)."""
    make, make_optax = pair
    grads = gradient_sequence(seed, STEPS, np.float32)
    got, _ = run(make(), grads, np.float32, jit=False)
    expected, _ = run(make_optax(), grads, np.float32, jit=False)
    if elementwise:
        err = max_elementwise_relative_error(got, expected)
        assert err <= rtol, f"elementwise relative error {err:.3g} > {rtol:.3g}"
    else:
        assert_close_runs(got, expected, rtol)


def displacement_after_jitted_steps(opt, grads):
    """W_T - W_0 (float64 leaves) after one jitted step of `opt` per gradient, from W_0 = 1 in float32."""
    import optax

    params = params_like(grads, np.float32)

    @jax.jit
    def step(params, state, g):
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    current, state = params, opt.init(params)
    for g in grads:
        current, state = step(current, state, jax.tree.map(jnp.asarray, g))
    return [a - b for a, b in zip(leaves64(current), leaves64(params), strict=True)]


# ------------------------------------------------------------------ subprocesses, checkpoints

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_on_eight_devices(script: str, *args: str, timeout: float = 300) -> str:
    """The stdout of ``python -c script *args`` on 8 CPU devices (XLA_FLAGS in a subprocess, so
    that this process keeps its one device), importing this checkout's jstep; it must exit 0."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        check=False,
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def tagged_json(stdout: str, tag: str):
    """The JSON that a script printed on the line starting with `tag`."""
    line = next(line for line in stdout.splitlines() if line.startswith(tag))
    return json.loads(line[len(tag) :])


def flax_round_trip(state, target, tmp_path):
    """`state` saved with flax.serialization and restored into the structure of `target`."""
    serialization = pytest.importorskip("flax.serialization")
    return serialization.from_bytes(target, serialization.to_bytes(state))


def orbax_round_trip(state, target, tmp_path):
    """`state` saved with orbax's StandardCheckpointer under `tmp_path` and restored into `target`."""
    ocp = pytest.importorskip("orbax.checkpoint")
    path = tmp_path / "orbax"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, state)
        checkpointer.wait_until_finished()
        return checkpointer.restore(path, target)
