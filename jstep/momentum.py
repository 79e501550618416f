"""B.0.1.2 Momentum, in the notes' two forms.

V form (the learning rate inside the velocity)::

    V_0 = 0,   V_t = gamma V_{t-1} + eta g_t,   W_t = W_{t-1} - V_t

M form (a moving average of the gradients, stepped by eta')::

    M_0 = 0,   M_t = gamma M_{t-1} + (1 - gamma) g_t,   W_t = W_{t-1} - eta' M_t

With eta = eta' (1 - gamma) the two give the same W_t (the notes' study question): unrolled,
V_t = eta' (1 - gamma) sum_s gamma^(t-s) g_s = eta' M_t.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from jstep import _core
from jstep.averages import moving_average
from jstep.precision import advance, load, step_keys


class MomentumState(NamedTuple):
    """`count`: steps taken (int32, saturating); `velocity`: V_t, shaped like the params."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in Optax's states
    velocity: Any


def velocity_step(velocity: jax.Array, gradient: jax.Array, gamma: Any, eta: Any, *, nesterov: bool = False):
    """One leaf of the V form: V_t = gamma V_{t-1} + eta g_t, in at least float32.

    Returns ``(direction, V_t)``: the direction is V_t, or gamma V_t + eta g_t with
    `nesterov`; the update is its negative. With eta = 1 this is Optax's trace,
    T_t = gamma T_{t-1} + g_t (``jstep.optax.sgd`` steps by that trace).
    """
    dtype = _core.compute_dtype(velocity.dtype)
    v_new = gamma * velocity.astype(dtype) + eta * gradient.astype(dtype)
    return velocity_direction(v_new, gradient, gamma, eta, nesterov=nesterov), v_new


def velocity_direction(v_new: jax.Array, gradient: jax.Array, gamma: Any, eta: Any, *, nesterov: bool = False):
    """The direction from V_t: V_t itself, or gamma V_t + eta g_t with `nesterov`."""
    return gamma * v_new + eta * gradient.astype(v_new.dtype) if nesterov else v_new


def sgd(learning_rate: _core.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
    """Plain gradient descent: W_t = W_{t-1} - eta_t g_t.

    Args:
      learning_rate: eta, a number >= 0 or an Optax schedule ``count -> eta_t``.
    """

    def init(params):
        _core.check_floating_leaves(params)
        return _core.CountState(_core.new_count())

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        return updates, _core.CountState(_core.increment(state.count))

    return _core.descent(optax.GradientTransformationExtraArgs(init, update), learning_rate)


def momentum(
    learning_rate: _core.ScalarOrSchedule,
    gamma: Any = 0.9,
    *,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
    rounding_seed: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Momentum in the notes' V form: V_t = gamma V_{t-1} + eta_t g_t, update -V_t.

    The learning rate sits *inside* the velocity, as in the notes. At a constant rate this is
    exactly ``optax.sgd(eta, momentum=gamma)`` (there V_t = eta T_t with T_t = gamma T_{t-1}
    + g_t). With a schedule it is not: here each gradient keeps the rate of the step it
    arrived at (V_t = sum_s gamma^(t-s) eta_s g_s), while ``optax.sgd`` multiplies the whole
    accumulated trace by the current rate (eta_t sum_s gamma^(t-s) g_s). After a rate drop,
    jstep's old velocity decays at its old size; Optax's shrinks at once.

    Args:
      learning_rate: eta, a number >= 0 or an Optax schedule ``count -> eta_t``.
      gamma: the momentum decay, in [0, 1) (the notes suggest 0.9).
      nesterov: update by -(gamma V_t + eta_t g_t) instead (Nesterov's look-ahead, the form
        Optax and PyTorch use).
      accumulator_dtype: dtype of V (default: each parameter's dtype). Arithmetic runs in at
        least float32 whatever the dtypes.
      rounding_seed: None (store V by round-to-nearest), or an int: V, where narrower than
        float32, is stored by stochastic rounding with keys from (seed, t, leaf), so that
        E[V_t] = gamma V_{t-1} + eta_t g_t exactly. No key is kept in the state.

    Complex parameters work: V is complex and the rule is the same.

    Example:
      At a constant rate the updates are ``optax.sgd``'s with ``momentum=gamma``:

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import jstep
      >>> ours, theirs = jstep.momentum(0.1, 0.9), optax.sgd(0.1, momentum=0.9)
      >>> ours_state, theirs_state = ours.init(jnp.zeros(2)), theirs.init(jnp.zeros(2))
      >>> for g in [jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5]), jnp.array([-1.0, 3.0])]:
      ...     u, ours_state = ours.update(g, ours_state)
      ...     u_optax, theirs_state = theirs.update(g, theirs_state)
      >>> print(u.round(4), jnp.allclose(u, u_optax))
      [-0.026 -0.183] True
    """
    _core.check_learning_rate(learning_rate)
    _core.check_decay("gamma", gamma)
    _core.check_flag("nesterov", nesterov)
    _core.check_state_dtype("accumulator_dtype", accumulator_dtype)
    _core.check_rounding_seed(rounding_seed)

    def init(params):
        _core.check_floating_leaves(params)
        return MomentumState(_core.new_count(), _core.zeros_like_tree(params, accumulator_dtype))

    @_core.sees_through_variables
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        old = load(state.velocity)
        _core.check_same_shapes(updates, old, holds_values=True)
        eta = _core.learning_rate_at(learning_rate, state.count)
        count = _core.increment(state.count)
        (key,) = step_keys(rounding_seed, count, 1)
        velocity, stored = advance(
            lambda v, g: velocity_step(v, g, gamma, eta)[1], state.velocity, updates, key=key, nonnegative=False
        )

        def step(v_new, g):
            # -1 * V, the same bits as -V: XLA:CPU compiles W + (-V) after the fusion to a
            # slower kernel than W + c * V (about 10% of the step, benchmarks/optimizers.py).
            return (-1.0 * velocity_direction(v_new, g, gamma, eta, nesterov=nesterov)).astype(g.dtype)

        return jax.tree.map(step, velocity, updates), MomentumState(count, stored)

    return optax.GradientTransformationExtraArgs(init, update)


def ema_momentum(
    learning_rate: _core.ScalarOrSchedule,
    gamma: Any = 0.9,
    *,
    accumulator_dtype: Any = None,
    rounding_seed: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Momentum in the notes' M form: M_t = gamma M_{t-1} + (1-gamma) g_t, update -eta'_t M_t.

    M is the `moving_average` of the gradients. ``ema_momentum(eta', gamma)`` equals
    ``momentum(eta' * (1 - gamma), gamma)`` at a constant rate.

    Args:
      learning_rate: eta', a number >= 0 or an Optax schedule ``count -> eta'_t``.
      gamma: the averaging decay, in [0, 1).
      accumulator_dtype: dtype of M (default: each parameter's dtype).
      rounding_seed: stochastic rounding of a narrow M, as in `momentum`.

    Example:
      The notes' two forms give the same steps when eta = eta' (1 - gamma):

      >>> import jax.numpy as jnp
      >>> import jstep
      >>> m_form = jstep.ema_momentum(0.1, 0.9)  # eta' = 0.1
      >>> v_form = jstep.momentum(0.1 * (1 - 0.9), 0.9)  # eta = eta' (1 - gamma)
      >>> m_state, v_state = m_form.init(jnp.zeros(2)), v_form.init(jnp.zeros(2))
      >>> for g in [jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5]), jnp.array([-1.0, 3.0])]:
      ...     u_m, m_state = m_form.update(g, m_state)
      ...     u_v, v_state = v_form.update(g, v_state)
      >>> print(u_m.round(4), jnp.allclose(u_m, u_v))
      [-0.0026 -0.0183] True
    """
    _core.check_decay("gamma", gamma)
    average = moving_average(gamma, accumulator_dtype=accumulator_dtype, rounding_seed=rounding_seed)
    return _core.descent(average, learning_rate)
