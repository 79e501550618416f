"""B.0.1.3 Adaptive step sizes: the notes' "adadelta" (RMSprop), adagrad, and Zeiler's adadelta.

The notes' rule, for every weight j::

    G_{t,j} = gamma G_{t-1,j} + (1 - gamma) g_{t,j}^2
    W_{t,j} = W_{t-1,j} - eta / (sqrt(G_{t,j}) + eps) g_{t,j}

The notes name this method "adadelta"; the literature (Hinton's lecture 6e, Optax, PyTorch)
calls it RMSprop, and that is its name here. The notes' equation puts eps outside the root,
their sentence ("divide the step size by sqrt(G + eps)") inside: ``eps_in_sqrt`` chooses.
Adagrad replaces the moving average by the plain sum, G_t = G_{t-1} + g_t^2.

Complex parameters work: g^2 is |g|^2 = g conj(g), so G stays real and positive.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jstep import _core
from jstep.averages import running_average_update


class ScaleByRmsState(NamedTuple):
    """`count`: steps taken (int32, saturating); `nu`: G_t, the moving average of g^2."""

    count: jax.Array
    nu: Any


class ScaleByRssState(NamedTuple):
    """`count`: steps taken (int32, saturating); `sum_of_squares`: G_t = sum_s g_s^2."""

    count: jax.Array
    sum_of_squares: Any


class AdadeltaState(NamedTuple):
    """`count`; `e_g`: moving average of g^2; `e_x`: moving average of the squared steps."""

    count: jax.Array
    e_g: Any
    e_x: Any


def _eps_placement(eps: Any, eps_in_sqrt: bool) -> dict[str, Any]:
    """eps as `adaptive_step` takes it: inside the root (eps_root) or added after it (eps)."""
    return {"eps": 0.0, "eps_root": eps} if eps_in_sqrt else {"eps": eps, "eps_root": 0.0}


def scale_by_rms(
    gamma: Any = 0.9, eps: Any = 1e-8, *, eps_in_sqrt: bool = False, initial_scale: Any = 0.0
) -> optax.GradientTransformation:
    """g_t / (sqrt(G_t) + eps) with G_t = gamma G_{t-1} + (1 - gamma) g_t^2 (no learning rate).

    Args:
      gamma: decay of the squared-gradient average, in [0, 1).
      eps: >= 0, added to the denominator.
      eps_in_sqrt: use g_t / sqrt(G_t + eps) (the notes' sentence; Optax's and Keras' form).
      initial_scale: G_0, >= 0 (the notes: 0; TensorFlow 1: 1).
    """
    _core.check_decay("gamma", gamma)
    _core.check_number("eps", eps)
    _core.check_number("initial_scale", initial_scale)
    placement = _eps_placement(eps, eps_in_sqrt)

    def init(params):
        _core.check_floating_leaves(params)
        return ScaleByRmsState(_core.new_count(), _core.full_like_tree(params, initial_scale, real=True))

    def update(updates, state, params=None):
        del params
        _core.check_same_shapes(updates, state.nu)
        nu = running_average_update(state.nu, jax.tree.map(_core.squared_magnitude, updates), gamma)
        directions = jax.tree.map(
            lambda g, G: _core.adaptive_step(g, G, **placement).astype(g.dtype), updates, nu
        )
        return directions, ScaleByRmsState(_core.increment(state.count), nu)

    return optax.GradientTransformation(init, update)


def rmsprop(
    learning_rate: _core.ScalarOrSchedule,
    gamma: Any = 0.9,
    eps: Any = 1e-8,
    *,
    eps_in_sqrt: bool = False,
    initial_scale: Any = 0.0,
) -> optax.GradientTransformation:
    """The notes' "adadelta" (RMSprop): W_t = W_{t-1} - eta_t g_t / (sqrt(G_t) + eps).

    G_t = gamma G_{t-1} + (1 - gamma) g_t^2, G_0 = `initial_scale`.

    The default is the notes' equation (eps outside the root). ``eps_in_sqrt=True`` gives
    the notes' sentence, eta g_t / sqrt(G_t + eps), which is ``optax.rmsprop``'s form.

    Args:
      learning_rate: eta, a number >= 0 or an Optax schedule ``count -> eta_t``.
      gamma: decay of the squared-gradient average, in [0, 1).
      eps: >= 0.
      eps_in_sqrt: put eps inside the square root.
      initial_scale: G_0, >= 0.
    """
    return _core.descent(
        scale_by_rms(gamma, eps, eps_in_sqrt=eps_in_sqrt, initial_scale=initial_scale), learning_rate
    )


def scale_by_rss(
    eps: Any = 1e-10, *, eps_in_sqrt: bool = False, initial_accumulator_value: Any = 0.0
) -> optax.GradientTransformation:
    """g_t / (sqrt(G_t) + eps) with G_t = G_{t-1} + g_t^2, the root of the sum of squares.

    Args:
      eps: >= 0, added to the denominator.
      eps_in_sqrt: use g_t / sqrt(G_t + eps) instead.
      initial_accumulator_value: G_0, >= 0 (``optax.adagrad`` uses 0.1).
    """
    _core.check_number("eps", eps)
    _core.check_number("initial_accumulator_value", initial_accumulator_value)
    placement = _eps_placement(eps, eps_in_sqrt)

    def init(params):
        _core.check_floating_leaves(params)
        initial = _core.full_like_tree(params, initial_accumulator_value, real=True)
        return ScaleByRssState(_core.new_count(), initial)

    def update(updates, state, params=None):
        del params
        _core.check_same_shapes(updates, state.sum_of_squares)

        def step(g, G):
            G_new = G.astype(_core.compute_dtype(G.dtype)) + _core.squared_magnitude(g)
            return _core.adaptive_step(g, G_new, **placement).astype(g.dtype), G_new.astype(G.dtype)

        directions, sum_of_squares = _core.unzip_pairs(
            jax.tree.map(step, updates, state.sum_of_squares), updates
        )
        return directions, ScaleByRssState(_core.increment(state.count), sum_of_squares)

    return optax.GradientTransformation(init, update)


def adagrad(
    learning_rate: _core.ScalarOrSchedule,
    eps: Any = 1e-10,
    *,
    eps_in_sqrt: bool = False,
    initial_accumulator_value: Any = 0.0,
) -> optax.GradientTransformation:
    """Adagrad: W_t = W_{t-1} - eta_t g_t / (sqrt(G_t) + eps), G_t = G_{t-1} + g_t^2.

    ``optax.adagrad(lr)`` is ``adagrad(lr, eps=1e-7, eps_in_sqrt=True,
    initial_accumulator_value=0.1)`` (with a zero step wherever G_t = 0).

    Args:
      learning_rate: eta, a number >= 0 or an Optax schedule ``count -> eta_t``.
      eps: >= 0.
      eps_in_sqrt: put eps inside the square root.
      initial_accumulator_value: G_0, >= 0.
    """
    return _core.descent(
        scale_by_rss(eps, eps_in_sqrt=eps_in_sqrt, initial_accumulator_value=initial_accumulator_value),
        learning_rate,
    )


def adadelta(learning_rate: _core.ScalarOrSchedule = 1.0, rho: Any = 0.9, eps: Any = 1e-6) -> optax.GradientTransformation:
    """Zeiler's ADADELTA (2012), the method the name usually means (for completeness).

        E[g^2]_t  = rho E[g^2]_{t-1} + (1 - rho) g_t^2
        d_t       = sqrt(E[dx^2]_{t-1} + eps) / sqrt(E[g^2]_t + eps) g_t
        E[dx^2]_t = rho E[dx^2]_{t-1} + (1 - rho) d_t^2
        W_t       = W_{t-1} - eta_t d_t

    Zeiler uses eta = 1; ``optax.adadelta`` keeps the same rule and state.

    Args:
      learning_rate: eta, a number >= 0 or an Optax schedule ``count -> eta_t``.
      rho: the decay of both averages, in [0, 1).
      eps: > 0 in practice (with eps = 0 the first step is 0 and so is every later one).
    """
    _core.check_decay("rho", rho)
    _core.check_number("eps", eps)

    def init(params):
        _core.check_floating_leaves(params)
        return AdadeltaState(
            _core.new_count(),
            _core.zeros_like_tree(params, real=True),
            _core.zeros_like_tree(params, real=True),
        )

    def update(updates, state, params=None):
        del params
        _core.check_same_shapes(updates, state.e_g)
        e_g = running_average_update(state.e_g, jax.tree.map(_core.squared_magnitude, updates), rho)

        def step(g, Eg, Ex):
            Ex = Ex.astype(_core.compute_dtype(Ex.dtype))
            return _core.adaptive_step(g, Eg, eps=0.0, eps_root=eps) * jnp.sqrt(Ex + eps)

        steps = jax.tree.map(step, updates, e_g, state.e_x)
        e_x = running_average_update(state.e_x, jax.tree.map(_core.squared_magnitude, steps), rho)
        return _core.cast_like(steps, updates), AdadeltaState(_core.increment(state.count), e_g, e_x)

    return _core.descent(optax.GradientTransformation(init, update), learning_rate)
