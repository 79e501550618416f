"""Optax's aliases, computed by jstep: swap ``optax.X(...)`` for ``jstep.optax.X(...)``.

``sgd``, ``adam``, ``adamw``, ``rmsprop``, ``adagrad`` and ``adadelta`` take Optax 0.2.8's
arguments (every name and default), give Optax's numbers, and keep Optax's state trees (the
same NamedTuple classes, nesting and field names), so a checkpoint written by either restores
into the other. Each is Optax's own recipe, ``optax.chain`` of a direction and
``optax.scale_by_learning_rate``, with the direction computed by jstep's notes-first
transformations (`jstep.momentum`'s velocity, `jstep.scale_by_rms`, `jstep.scale_by_rss`,
`jstep.scale_by_adam`, Zeiler's ADADELTA of `jstep.adaptive`): the same arithmetic, with
the state renamed to Optax's.

Use these to move an Optax program to jstep without changing what it computes. Use the
notes-first API (`jstep.momentum`, `jstep.rmsprop`, ...) for the notes' forms: there the
learning rate sits inside the momentum's velocity, eps defaults to outside the root, and the
states are jstep's own.

Where the two can still differ:

- arithmetic runs in at least float32 (Optax's runs in the params' dtype), so for bfloat16 and
  float16 params the numbers agree to the params' precision rather than bit for bit;
- with float16 params the states built from squared gradients (Adam's nu, RMSprop's averages,
  adagrad's sum of squares, adadelta's e_g and e_x) are float32, where Optax's float16 state
  loses Adam's squared gradients below about 8e-3 and then steps up to 25x the learning rate
  (jstep's float16 rule; a checkpoint still restores either way);
- with a state dtype narrower than the params (``mu_dtype``, ``accumulator_dtype``), Optax forms
  decay * state in that dtype, jstep in float32, rounding once when it stores: from the same
  state the updates agree to the state dtype's precision (bfloat16: within 2^-9 of a step),
  and over many steps the two trajectories drift apart by such roundings;
- for complex params Optax keeps the (real) second moments in complex arrays, jstep in real
  ones: the tree is the same, and a checkpoint restores either way with the same numbers;
- hyperparameters out of range (a decay of 1.5, a negative learning rate) and
  ``nesterov=True`` without a momentum (which Optax ignores) are refused when the optimizer is
  built, and integer params at ``init`` (a ``TypeError`` naming the leaf), where Optax would
  run with them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

# Optax's own state classes for rmsprop(bias_correction=True): not exported, present in optax 0.2.5 to 0.2.8.
from optax._src.transform import ScaleByRmsWithCountState, ScaleByRStdDevWithCountState

from jstep import _core
from jstep.adam import ScaleByAdamState, scale_by_adam
from jstep.adaptive import (
    AdadeltaState,
    ScaleByCenteredRmsState,
    ScaleByRmsState,
    ScaleByRssState,
    scale_by_adadelta,
    scale_by_rms,
    scale_by_rss,
)
from jstep.momentum import velocity_step
from jstep.precision import load, store

__all__ = ["adadelta", "adagrad", "adam", "adamw", "rmsprop", "sgd"]


def _renamed(
    inner: optax.GradientTransformationExtraArgs,
    to_optax: Callable[[Any], Any],
    from_optax: Callable[[Any], Any],
) -> optax.GradientTransformationExtraArgs:
    """`inner` with its state kept as Optax's: `to_optax` maps jstep's state to Optax's,
    `from_optax` maps it back before each update. No arithmetic."""

    def init(params):
        return to_optax(inner.init(params))

    def update(updates, state, params=None, **extra_args):
        updates, new_state = inner.update(updates, from_optax(state), params, **extra_args)
        return updates, to_optax(new_state)

    return optax.GradientTransformationExtraArgs(init, update)


# A jstep state's `count` feeds only its bias correction and the keys of stochastic rounding.
# Where Optax's state has no count, neither is used (no bias correction, round to nearest),
# so the count is dropped on the way out and starts from 0 on the way in.


def _trace(decay: Any, nesterov: bool, accumulator_dtype: Any = None) -> optax.GradientTransformationExtraArgs:
    """Optax's trace, T_t = decay T_{t-1} + g_t (the direction: T_t, or decay T_t + g_t with
    `nesterov`): `jstep.momentum`'s velocity step with eta = 1, state ``optax.TraceState``."""
    _core.check_state_dtype("accumulator_dtype", accumulator_dtype)

    def init(params):
        _core.check_floating_leaves(params)
        return optax.TraceState(trace=_core.zeros_like_tree(params, accumulator_dtype))

    @_core.sees_through_variables
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        old = load(state.trace)
        _core.check_same_shapes(updates, old, holds_values=True)

        def step(t, g):
            direction, t_new = velocity_step(t, g, decay, 1.0, nesterov=nesterov)
            return direction.astype(g.dtype), t_new

        directions, trace = _core.unzip_pairs(jax.tree.map(step, old, updates), updates)
        return directions, optax.TraceState(trace=store(trace, state.trace, nonnegative=False))

    return optax.GradientTransformationExtraArgs(init, update)


def _momentum_or_identity(momentum: Any, nesterov: bool, accumulator_dtype: Any = None):
    _core.check_flag("nesterov", nesterov)
    if momentum is None:
        if nesterov:
            raise ValueError("nesterov=True needs a momentum: give momentum=beta in [0, 1), e.g. 0.9")
        return optax.identity()
    _core.check_decay("momentum", momentum)
    return _trace(momentum, nesterov, accumulator_dtype)


def _check_learning_rate(learning_rate: Any) -> None:
    if learning_rate is not None:
        _core.check_learning_rate(learning_rate)


def sgd(
    learning_rate: _core.ScalarOrSchedule,
    momentum: Any = None,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """``optax.sgd``: T_t = momentum T_{t-1} + g_t, update -eta_t T_t.

    The learning rate multiplies the whole trace at each step (Optax's and PyTorch's form),
    not the gradient entering it as in `jstep.momentum`; the two differ under a schedule.
    ``nesterov=True`` steps by -eta_t (momentum T_t + g_t). ``momentum=None`` is plain
    gradient descent.

    State: ``(optax.TraceState(trace), optax.EmptyState())``; with a schedule the second is
    ``optax.ScaleByScheduleState(count)``; without momentum the first is ``optax.EmptyState()``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import jstep.optax
      >>> schedule = optax.piecewise_constant_schedule(1.0, {2: 0.1})
      >>> ours, theirs = jstep.optax.sgd(schedule, 0.9), optax.sgd(schedule, 0.9)
      >>> ours_state, theirs_state = ours.init(jnp.zeros(())), theirs.init(jnp.zeros(()))
      >>> for _ in range(3):
      ...     u, ours_state = ours.update(jnp.ones(()), ours_state)
      ...     u_optax, theirs_state = theirs.update(jnp.ones(()), theirs_state)
      >>> print(round(float(u), 4), float(u) == float(u_optax), ours_state)
      -0.271 True (TraceState(trace=Array(2.71, dtype=float32)), ScaleByScheduleState(count=Array(3, dtype=int32)))
    """
    _check_learning_rate(learning_rate)
    return optax.chain(
        _momentum_or_identity(momentum, nesterov, accumulator_dtype),
        optax.scale_by_learning_rate(learning_rate),
    )


def _adam_direction(b1, b2, eps, eps_root, mu_dtype, nesterov) -> optax.GradientTransformationExtraArgs:
    """`jstep.scale_by_adam` with state ``optax.ScaleByAdamState`` (the same fields)."""
    return _renamed(
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype=mu_dtype, nesterov=nesterov),
        lambda s: optax.ScaleByAdamState(count=s.count, mu=s.mu, nu=s.nu),
        lambda s: ScaleByAdamState(count=s.count, mu=s.mu, nu=s.nu),
    )


def adam(
    learning_rate: _core.ScalarOrSchedule,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """``optax.adam``: update -eta_t m_hat_t / (sqrt(v_hat_t + eps_root) + eps), by `jstep.scale_by_adam`.

    State: ``(optax.ScaleByAdamState(count, mu, nu), optax.EmptyState())`` (with a schedule
    the second is ``optax.ScaleByScheduleState(count)``).

    Example:
      The first step is -eta g / (|g| + eps), about -eta sign(g) (m_hat = g, v_hat = g^2, up to
      1 - b2's float32 rounding), and bit for bit Optax's:

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import jstep.optax
      >>> g = jnp.array([0.5, -2.0])
      >>> ours, theirs = jstep.optax.adam(0.1), optax.adam(0.1)
      >>> u, state = ours.update(g, ours.init(jnp.zeros(2)))
      >>> u_optax, _ = theirs.update(g, theirs.init(jnp.zeros(2)))
      >>> print([round(float(v), 4) for v in u], bool(jnp.all(u == u_optax)), type(state[0]).__name__)
      [-0.1, 0.1] True ScaleByAdamState
    """
    _check_learning_rate(learning_rate)
    return optax.chain(
        _adam_direction(b1, b2, eps, eps_root, mu_dtype, nesterov),
        optax.scale_by_learning_rate(learning_rate),
    )


def adamw(
    learning_rate: _core.ScalarOrSchedule,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    mu_dtype: Any = None,
    weight_decay: _core.ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """``optax.adamw``: update -eta_t (Adam's direction + weight_decay W), by `jstep.scale_by_adam`.

    `weight_decay` is a number or a schedule; `mask` (a tree of bools or a callable) picks
    the leaves that decay, as in Optax (``optax.add_decayed_weights``). ``update`` needs the
    params. State: ``(optax.ScaleByAdamState, <the decay's state>, <the rate's state>)``.
    """
    _check_learning_rate(learning_rate)
    _core.check_number("weight_decay", weight_decay, schedule=True)
    return optax.chain(
        _adam_direction(b1, b2, eps, eps_root, mu_dtype, nesterov),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def _rms_direction(decay, eps, initial_scale, eps_in_sqrt, centered, bias_correction):
    """`jstep.scale_by_rms` with Optax's state: ``ScaleByRmsState(nu)`` or, centered,
    ``ScaleByRStdDevState(mu, nu)``; with `bias_correction` their ``...WithCountState``."""
    _core.check_decay("decay", decay)
    inner = scale_by_rms(
        decay,
        eps,
        eps_in_sqrt=eps_in_sqrt,
        initial_scale=initial_scale,
        centered=centered,
        bias_correction=bias_correction,
    )
    if centered and bias_correction:
        return _renamed(
            inner,
            lambda s: ScaleByRStdDevWithCountState(count=s.count, mu=s.mu, nu=s.nu),
            lambda s: ScaleByCenteredRmsState(count=s.count, mu=s.mu, nu=s.nu),
        )
    if centered:
        return _renamed(
            inner,
            lambda s: optax.ScaleByRStdDevState(mu=s.mu, nu=s.nu),
            lambda s: ScaleByCenteredRmsState(count=_core.new_count(), mu=s.mu, nu=s.nu),
        )
    if bias_correction:
        return _renamed(
            inner,
            lambda s: ScaleByRmsWithCountState(count=s.count, nu=s.nu),
            lambda s: ScaleByRmsState(count=s.count, nu=s.nu),
        )
    return _renamed(
        inner,
        lambda s: optax.ScaleByRmsState(nu=s.nu),
        lambda s: ScaleByRmsState(count=_core.new_count(), nu=s.nu),
    )


def rmsprop(
    learning_rate: _core.ScalarOrSchedule,
    decay: Any = 0.9,
    eps: Any = 1e-8,
    initial_scale: Any = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: Any = None,
    nesterov: bool = False,
    bias_correction: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """``optax.rmsprop``: -eta_t g_t / sqrt(G_t + eps), G_t = decay G_{t-1} + (1 - decay) g_t^2.

    By `jstep.scale_by_rms` (``eps_in_sqrt=False``: / (sqrt(G_t) + eps), the notes' equation).
    With `momentum`, the scaled steps -eta_t d_t feed Optax's trace, which is the notes' V
    form: the learning rate sits inside the velocity (as in `jstep.rmsprop`).

    State: ``(ScaleByRmsState(nu), <the rate's state>, TraceState(trace) or EmptyState())``,
    with ``ScaleByRStdDevState(mu, nu)`` when centered and the ``...WithCountState`` of
    either with `bias_correction`, as ``optax.rmsprop`` builds it.
    """
    _check_learning_rate(learning_rate)
    return optax.chain(
        _rms_direction(decay, eps, initial_scale, eps_in_sqrt, centered, bias_correction),
        optax.scale_by_learning_rate(learning_rate),
        _momentum_or_identity(momentum, nesterov),
    )


def adagrad(
    learning_rate: _core.ScalarOrSchedule,
    initial_accumulator_value: Any = 0.1,
    eps: Any = 1e-7,
) -> optax.GradientTransformationExtraArgs:
    """``optax.adagrad``: -eta_t g_t / sqrt(G_t + eps), G_t = G_{t-1} + g_t^2, G_0 = 0.1.

    By `jstep.scale_by_rss` with ``eps_in_sqrt=True``. State:
    ``(optax.ScaleByRssState(sum_of_squares), <the rate's state>)``.
    """
    _check_learning_rate(learning_rate)
    direction = _renamed(
        scale_by_rss(eps, eps_in_sqrt=True, initial_accumulator_value=initial_accumulator_value),
        lambda s: optax.ScaleByRssState(sum_of_squares=s.sum_of_squares),
        lambda s: ScaleByRssState(count=_core.new_count(), sum_of_squares=s.sum_of_squares),
    )
    return optax.chain(direction, optax.scale_by_learning_rate(learning_rate))


def adadelta(
    learning_rate: _core.ScalarOrSchedule | None = None,
    rho: Any = 0.9,
    eps: Any = 1e-6,
    weight_decay: _core.ScalarOrSchedule = 0.0,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """``optax.adadelta``: Zeiler's ADADELTA (see `jstep.adadelta`), by jstep's direction.

    `weight_decay` adds weight_decay W to the gradient *before* the averages (Optax's
    order). ``learning_rate=None`` returns +d_t, as ``optax.adadelta()`` does (its
    ``scale_by_learning_rate(None)`` is the identity, so no minus sign): pass a rate to descend. State:
    ``(<the decay's state>, optax.ScaleByAdaDeltaState(e_g, e_x), <the rate's state>)``.
    """
    _check_learning_rate(learning_rate)
    _core.check_number("weight_decay", weight_decay, schedule=True)
    direction = _renamed(
        scale_by_adadelta(rho, eps),
        lambda s: optax.ScaleByAdaDeltaState(e_g=s.e_g, e_x=s.e_x),
        lambda s: AdadeltaState(count=_core.new_count(), e_g=s.e_g, e_x=s.e_x),
    )
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        direction,
        optax.scale_by_learning_rate(learning_rate),
    )
