"""B.0.1.1 Running averages.

The notes define, for a sequence c_1, c_2, ...::

    C_0 = 0
    C_t = gamma_t C_{t-1} + (1 - gamma_t) c_t

With a constant gamma this is a *moving average*, C_T = sum_t gamma^(T-t) (1-gamma) c_t;
with gamma_t = (t-1)/t it is the exact mean of c_1..c_t. Each transformation below maps
the incoming values c_t (any pytree of floating arrays) to the average C_t.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jstep import _core
from jstep.precision import advance, load, step_keys, store

Gamma = float | jax.Array | Callable[[jax.Array], jax.Array]


class RunningAverageState(NamedTuple):
    """`count` = t, the number of values seen (int32, saturating); `average` = C_t."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in Optax's states
    average: Any


def running_average_value(average: Any, value: Any, gamma: Any) -> Any:
    """C_t = gamma C_{t-1} + (1 - gamma) c_t, leaf by leaf, in the compute dtype (at least float32).

    The step before storing: optimizers take their update from this value (as Optax does with
    ``mu_dtype``) and store it with `jstep.precision.store`.
    """

    # 1 - gamma before any rounding to float32: for gamma = 0.999 that keeps 1 - gamma exact
    # to float32 precision (rounding gamma first would move it by up to 1e-5 relative).
    weight_of_new = 1 - gamma

    def one(old, new):
        dtype = _core.compute_dtype(old.dtype)
        real = _core.real_dtype(dtype)
        keep, take = jnp.asarray(gamma).astype(real), jnp.asarray(weight_of_new).astype(real)
        return keep * old.astype(dtype) + take * new.astype(dtype)

    return jax.tree.map(one, average, value)


def running_average_update(average: Any, value: Any, gamma: Any, *, key: jax.Array | None = None) -> Any:
    """One step of the rule, C_t = gamma C_{t-1} + (1 - gamma) c_t, leaf by leaf.

    The arithmetic runs in at least float32 and the result keeps `average`'s dtype, so a
    bfloat16 accumulator stays bfloat16. This is the building block of every moment in
    jstep: momentum's M, RMSprop's G, Adam's m and v, and BatchNorm's running statistics.

    Stored in bfloat16 by round-to-nearest, C_t = gamma C_{t-1} stops moving once
    (1 - gamma) C is under half an ulp of C (gamma = 0.999: always). With `key`, each narrow
    leaf is stored by stochastic rounding instead (each leaf with bits of its own from `key`,
    as `jstep.apply_updates` draws them), so that E[C_t] follows the rule exactly.

    Args:
      average: the tree of C_{t-1}.
      value: the tree of c_t, same structure and shapes.
      gamma: the weight on the old average, a number or scalar array.
      key: None (round to nearest), or a JAX random key for stochastic rounding of the
        leaves narrower than float32.
    """
    return store(running_average_value(load(average), value, gamma), average, key)


def running_average(
    gamma: Gamma, *, accumulator_dtype: Any = None, rounding_seed: int | None = None
) -> optax.GradientTransformationExtraArgs:
    """The notes' running average, C_t = gamma_t C_{t-1} + (1 - gamma_t) c_t, C_0 = 0.

    Args:
      gamma: gamma_t, either a number in [0, 1) or a callable ``t -> gamma_t`` that receives
        t = 1, 2, ... as a float scalar array (float64 when x64 is enabled).
      accumulator_dtype: dtype of the stored C (default: each leaf's own dtype).
      rounding_seed: None (store C by round-to-nearest), or an int: C, where narrower than
        float32, is stored by stochastic rounding with keys from (seed, t, leaf), so that
        E[C_t] follows the rule (see `running_average_update`). No key is kept in the state.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(values, state)`` returns C_t in the
      values' dtypes, with state `RunningAverageState`.

    Example:
      With gamma = 0.5 each new value weighs as much as the whole past:

      >>> import jax.numpy as jnp
      >>> import jstep
      >>> average = jstep.running_average(0.5)
      >>> state = average.init(jnp.zeros(()))
      >>> for c in [4.0, 8.0]:
      ...     C, state = average.update(jnp.asarray(c), state)
      ...     print(C)
      2.0
      5.0
    """
    _core.check_decay("gamma", gamma, schedule=True)
    _core.check_state_dtype("accumulator_dtype", accumulator_dtype)
    _core.check_rounding_seed(rounding_seed)

    def init(values):
        _core.check_floating_leaves(values)
        return RunningAverageState(_core.new_count(), _core.zeros_like_tree(values, accumulator_dtype))

    @_core.sees_through_variables
    def update(values, state, params=None, **extra_args):
        del params, extra_args
        _core.check_same_shapes(values, load(state.average), holds_values=True)
        count = _core.increment(state.count)
        gamma_t = gamma(count.astype(_core.default_float())) if callable(gamma) else gamma
        (key,) = step_keys(rounding_seed, count, 1)
        average, stored = advance(
            lambda c, x: running_average_value(c, x, gamma_t), state.average, values, key=key, nonnegative=False
        )
        return _core.cast_like(average, values), RunningAverageState(count, stored)

    return optax.GradientTransformationExtraArgs(init, update)


def moving_average(
    decay: Any, *, debias: bool = False, accumulator_dtype: Any = None, rounding_seed: int | None = None
) -> optax.GradientTransformationExtraArgs:
    """A moving average: the running average with constant gamma = `decay`.

    C_t = decay C_{t-1} + (1 - decay) c_t = sum_{s<=t} decay^(t-s) (1 - decay) c_s.

    Args:
      decay: gamma, in [0, 1).
      debias: return C_t / (1 - decay^t) instead of C_t. The weights of C_t sum to
        1 - decay^t (the rest sits on C_0 = 0), so this is the weighted mean of the values
        seen; Adam's m_hat and v_hat are exactly this.
      accumulator_dtype: dtype of the stored C (default: each leaf's own dtype).
      rounding_seed: stochastic rounding of a narrow C, as in `running_average`.

    Example:
      A constant input c: C_t = (1 - 0.9^t) c is pulled towards C_0 = 0, the debiased
      average is c from the first step.

      >>> import jax.numpy as jnp
      >>> import jstep
      >>> biased, debiased = jstep.moving_average(0.9), jstep.moving_average(0.9, debias=True)
      >>> state = biased.init(jnp.zeros(()))  # both keep the same state
      >>> for t in range(3):
      ...     C, _ = biased.update(jnp.asarray(3.0), state)
      ...     C_hat, state = debiased.update(jnp.asarray(3.0), state)
      ...     print(round(float(C), 4), round(float(C_hat), 4))
      0.3 3.0
      0.57 3.0
      0.813 3.0
    """
    _core.check_decay("decay", decay)
    _core.check_flag("debias", debias)
    biased = running_average(decay, accumulator_dtype=accumulator_dtype, rounding_seed=rounding_seed)
    if not debias:
        return biased

    def update(values, state, params=None, **extra_args):
        average, state = biased.update(values, state, params, **extra_args)
        correction = _core.bias_correction(decay, state.count)
        return jax.tree.map(lambda c: (c / correction.astype(c.dtype)).astype(c.dtype), average), state

    return optax.GradientTransformationExtraArgs(biased.init, update)


def cumulative_average(
    *, accumulator_dtype: Any = None, rounding_seed: int | None = None
) -> optax.GradientTransformationExtraArgs:
    """The exact mean of c_1..c_t, as the running average with gamma_t = (t - 1) / t.

    (The notes' first study question: C_t = ((t-1)/t) C_{t-1} + (1/t) c_t; if
    C_{t-1} = mean(c_1..c_{t-1}) then C_t = (sum_{s<t} c_s + c_t) / t.)

    Args:
      accumulator_dtype, rounding_seed: as in `running_average`.

    Example:
      >>> import jax.numpy as jnp
      >>> import jstep
      >>> average = jstep.cumulative_average()
      >>> state = average.init(jnp.zeros(()))
      >>> for c in [2.0, 4.0, 9.0]:
      ...     C, state = average.update(jnp.asarray(c), state)
      >>> print(C, state.count)  # (2 + 4 + 9) / 3 after 3 values
      5.0 3
    """
    return running_average(lambda t: (t - 1) / t, accumulator_dtype=accumulator_dtype, rounding_seed=rounding_seed)
