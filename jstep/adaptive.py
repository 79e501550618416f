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
from jstep.averages import running_average_value
from jstep.momentum import momentum as jstep_momentum
from jstep.precision import advance, load, step_keys


class ScaleByRmsState(NamedTuple):
    """`count`: steps taken (int32, saturating); `nu`: G_t, the moving average of g^2."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in Optax's states
    nu: Any


class ScaleByCenteredRmsState(NamedTuple):
    """`count`; `mu`: M_t, the moving average of g; `nu`: G_t, the moving average of g^2."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in Optax's states
    mu: Any
    nu: Any


class ScaleByRssState(NamedTuple):
    """`count`: steps taken (int32, saturating); `sum_of_squares`: G_t = sum_s g_s^2."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in Optax's states
    sum_of_squares: Any


class AdadeltaState(NamedTuple):
    """`count`; `e_g`: moving average of g^2; `e_x`: moving average of the squared steps."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in Optax's states
    e_g: Any
    e_x: Any


def _eps_placement(eps: Any, eps_in_sqrt: bool) -> dict[str, Any]:
    """eps as `adaptive_step` takes it: inside the root (eps_root) or added after it (eps)."""
    return {"eps": 0.0, "eps_root": eps} if eps_in_sqrt else {"eps": eps, "eps_root": 0.0}


def scale_by_rms(
    gamma: Any = 0.9,
    eps: Any = 1e-8,
    *,
    eps_in_sqrt: bool = False,
    initial_scale: Any = 0.0,
    centered: bool = False,
    bias_correction: bool = False,
    accumulator_dtype: Any = None,
    rounding_seed: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """g_t / (sqrt(G_t) + eps) with G_t = gamma G_{t-1} + (1 - gamma) g_t^2 (no learning rate).

    ``centered=True`` (Graves 2013) also keeps the moving average of g itself,
    M_t = gamma M_{t-1} + (1 - gamma) g_t, and divides by the root of the running variance
    instead: g_t / (sqrt(G_t - M_t^2) + eps). G_t - M_t^2 >= 0 in exact arithmetic (the
    average of the squares is at least the square of the average); it is clipped at 0 so
    that rounding cannot make the root NaN.

    Args:
      gamma: decay of the squared-gradient average, in [0, 1).
      eps: >= 0, added to the denominator.
      eps_in_sqrt: use g_t / sqrt(G_t + eps) (the notes' sentence; Optax's and Keras' form).
      initial_scale: G_0, >= 0 (the notes: 0; TensorFlow 1: 1).
      centered: subtract M_t^2 under the root. The state is then `ScaleByCenteredRmsState`.
      bias_correction: divide G_t (and M_t) by 1 - gamma^t, as Adam does, before the root
        (``optax.scale_by_rms(bias_correction=True)``).
      accumulator_dtype: dtype of G (and M) (default: each parameter's real dtype for G, its
        dtype for M; float32 for float16 params, whose range cannot hold small g^2). An
        explicit dtype is kept as given. Arithmetic runs in at least float32 whatever the dtypes.
      rounding_seed: None (store G and M by round-to-nearest), or an int: where narrower than
        float32 they are stored by stochastic rounding, keys from (seed, t, leaf), so that
        E[G_t] follows the rule (in bfloat16 G cannot decay by round-to-nearest when
        1 - gamma < 2^-9). No key is kept in the state.
    """
    _core.check_decay("gamma", gamma)
    _core.check_number("eps", eps)
    _core.check_number("initial_scale", initial_scale)
    _core.check_flag("eps_in_sqrt", eps_in_sqrt)
    _core.check_flag("centered", centered)
    _core.check_flag("bias_correction", bias_correction)
    _core.check_state_dtype("accumulator_dtype", accumulator_dtype)
    _core.check_rounding_seed(rounding_seed)
    placement = _eps_placement(eps, eps_in_sqrt)

    def init(params):
        _core.check_floating_leaves(params)
        nu = _core.full_like_tree(params, initial_scale, accumulator_dtype, real=True, squares=True, nonnegative=True)
        if centered:  # M in G's precision: G - M^2 is the variance
            mu = _core.zeros_like_tree(params, accumulator_dtype, squares=True)
            return ScaleByCenteredRmsState(_core.new_count(), mu, nu)
        return ScaleByRmsState(_core.new_count(), nu)

    @_core.sees_through_variables
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        _core.check_same_shapes(updates, load(state.nu))
        if centered:
            _core.check_same_shapes(updates, load(state.mu), holds_values=True)
        count = _core.increment(state.count)
        nu_key, mu_key = step_keys(rounding_seed, count, 2)
        # The step is taken with G_t (and M_t) as computed, then they are stored in their dtypes.
        nu, new_nu = advance(
            lambda G, g: running_average_value(G, _core.squared_magnitude(g), gamma),
            state.nu,
            updates,
            key=nu_key,
            nonnegative=True,
        )
        if centered:
            mu, new_mu = advance(
                lambda M, g: running_average_value(M, g, gamma), state.mu, updates, key=mu_key, nonnegative=False
            )
        correction = _core.bias_correction(gamma, count) if bias_correction else None

        def second_moment(G, M=None):
            G = G.astype(_core.compute_dtype(G.dtype))
            if correction is not None:
                G = G / correction.astype(G.dtype)
            if M is None:
                return G
            M = M.astype(_core.compute_dtype(M.dtype))
            if correction is not None:
                M = M / correction.astype(G.dtype)
            return jnp.maximum(G - _core.squared_magnitude(M), 0)

        def direction(g, *moments):
            return _core.adaptive_step(g, second_moment(*moments), **placement).astype(g.dtype)

        if centered:
            directions = jax.tree.map(direction, updates, nu, mu)
            return directions, ScaleByCenteredRmsState(count, new_mu, new_nu)
        return jax.tree.map(direction, updates, nu), ScaleByRmsState(count, new_nu)

    return optax.GradientTransformationExtraArgs(init, update)


def rmsprop(
    learning_rate: _core.ScalarOrSchedule,
    gamma: Any = 0.9,
    eps: Any = 1e-8,
    *,
    eps_in_sqrt: bool = False,
    initial_scale: Any = 0.0,
    centered: bool = False,
    momentum: Any = None,
    nesterov: bool = False,
    bias_correction: bool = False,
    accumulator_dtype: Any = None,
    rounding_seed: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The notes' "adadelta" (RMSprop): W_t = W_{t-1} - eta_t g_t / (sqrt(G_t) + eps).

    G_t = gamma G_{t-1} + (1 - gamma) g_t^2, G_0 = `initial_scale`.

    The default is the notes' equation (eps outside the root), which is PyTorch's
    ``torch.optim.RMSprop``. ``eps_in_sqrt=True`` gives the notes' sentence,
    eta g_t / sqrt(G_t + eps), which is ``optax.rmsprop``'s default form.

    With ``momentum=beta`` the scaled step d_t = g_t / (sqrt(G_t) + eps) drives a velocity
    with the learning rate inside it, as in `jstep.momentum` (the notes' V form)::

        V_t = beta V_{t-1} + eta_t d_t,   W_t = W_{t-1} - V_t
        (nesterov: W_t = W_{t-1} - (beta V_t + eta_t d_t))

    which is ``torch.optim.RMSprop(momentum=beta)`` and ``optax.rmsprop(momentum=beta)``
    at a constant rate. The state is then ``(ScaleByRmsState, MomentumState)`` (or the
    centered state first), as from ``optax.chain``.

    Args:
      learning_rate: eta, a number >= 0 or an Optax schedule ``count -> eta_t``.
      gamma: decay of the squared-gradient average, in [0, 1).
      eps: >= 0.
      eps_in_sqrt: put eps inside the square root.
      initial_scale: G_0, >= 0.
      centered: divide by the root of G_t - M_t^2, the running variance (see `scale_by_rms`).
      momentum: beta in [0, 1), or None for no velocity.
      nesterov: Nesterov's look-ahead on the velocity; needs `momentum`.
      bias_correction: divide the averages by 1 - gamma^t (see `scale_by_rms`).
      accumulator_dtype: dtype of G (and M, and the velocity V) (default: the parameters', but
        float32 for G and M of float16 params; see `scale_by_rms`).
      rounding_seed: stochastic rounding of narrow state (see `scale_by_rms`); the velocity
        draws its bits from ``rounding_seed ^ 1`` (the last bit flipped), so that G and V
        round independently.

    Example:
      The first step by hand: G_1 = (1 - gamma) g^2, so the update is
      -eta g / (sqrt(G_1) + eps) = -eta sign(g) / sqrt(1 - gamma), whatever the size of g.

      >>> import jax.numpy as jnp
      >>> import jstep
      >>> g = jnp.array([0.5, -2.0])
      >>> optimizer = jstep.rmsprop(0.01, gamma=0.9, eps=1e-8)
      >>> updates, state = optimizer.update(g, optimizer.init(jnp.zeros(2)))
      >>> by_hand = -0.01 * g / (jnp.sqrt((1 - 0.9) * g**2) + 1e-8)
      >>> print(updates.round(4), jnp.allclose(updates, by_hand))
      [-0.0316  0.0316] True
    """
    scaled = scale_by_rms(
        gamma,
        eps,
        eps_in_sqrt=eps_in_sqrt,
        initial_scale=initial_scale,
        centered=centered,
        bias_correction=bias_correction,
        accumulator_dtype=accumulator_dtype,
        rounding_seed=rounding_seed,
    )
    _core.check_flag("nesterov", nesterov)
    if momentum is None:
        if nesterov:
            raise ValueError("nesterov=True needs a momentum: give momentum=beta in [0, 1), e.g. 0.9")
        return _core.descent(scaled, learning_rate)
    _core.check_decay("momentum", momentum)
    velocity_seed = None if rounding_seed is None else rounding_seed ^ 1
    velocity = jstep_momentum(
        learning_rate, momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype, rounding_seed=velocity_seed
    )
    return optax.chain(scaled, velocity)


def scale_by_rss(
    eps: Any = 1e-10,
    *,
    eps_in_sqrt: bool = False,
    initial_accumulator_value: Any = 0.0,
    accumulator_dtype: Any = None,
    rounding_seed: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """g_t / (sqrt(G_t) + eps) with G_t = G_{t-1} + g_t^2, the root of the sum of squares.

    Args:
      eps: >= 0, added to the denominator.
      eps_in_sqrt: use g_t / sqrt(G_t + eps) instead.
      initial_accumulator_value: G_0, >= 0 (``optax.adagrad`` uses 0.1).
      accumulator_dtype: dtype of G (default: each parameter's real dtype, float32 for float16
        params, whose range cannot hold small g^2).
      rounding_seed: None (store G by round-to-nearest), or an int: where narrower than
        float32, G is stored by stochastic rounding, keys from (seed, t, leaf), so that
        E[G_t] = G_{t-1} + g_t^2 (in bfloat16 a g_t^2 under half an ulp of G is otherwise
        lost). No key is kept in the state.
    """
    _core.check_number("eps", eps)
    _core.check_number("initial_accumulator_value", initial_accumulator_value)
    _core.check_flag("eps_in_sqrt", eps_in_sqrt)
    _core.check_state_dtype("accumulator_dtype", accumulator_dtype)
    _core.check_rounding_seed(rounding_seed)
    placement = _eps_placement(eps, eps_in_sqrt)

    def init(params):
        _core.check_floating_leaves(params)
        initial = _core.full_like_tree(
            params, initial_accumulator_value, accumulator_dtype, real=True, squares=True, nonnegative=True
        )
        return ScaleByRssState(_core.new_count(), initial)

    @_core.sees_through_variables
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        _core.check_same_shapes(updates, load(state.sum_of_squares))
        count = _core.increment(state.count)
        (key,) = step_keys(rounding_seed, count, 1)
        sum_of_squares, stored = advance(
            lambda G, g: G.astype(_core.compute_dtype(G.dtype)) + _core.squared_magnitude(g),
            state.sum_of_squares,
            updates,
            key=key,
            nonnegative=True,
        )

        def direction(g, G_new):
            return _core.adaptive_step(g, G_new, **placement).astype(g.dtype)

        return jax.tree.map(direction, updates, sum_of_squares), ScaleByRssState(count, stored)

    return optax.GradientTransformationExtraArgs(init, update)


def adagrad(
    learning_rate: _core.ScalarOrSchedule,
    eps: Any = 1e-10,
    *,
    eps_in_sqrt: bool = False,
    initial_accumulator_value: Any = 0.0,
    accumulator_dtype: Any = None,
    rounding_seed: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Adagrad: W_t = W_{t-1} - eta_t g_t / (sqrt(G_t) + eps), G_t = G_{t-1} + g_t^2.

    ``optax.adagrad(lr)`` is ``adagrad(lr, eps=1e-7, eps_in_sqrt=True,
    initial_accumulator_value=0.1)`` (with a zero step wherever G_t = 0).

    Args:
      learning_rate: eta, a number >= 0 or an Optax schedule ``count -> eta_t``.
      eps: >= 0.
      eps_in_sqrt: put eps inside the square root.
      initial_accumulator_value: G_0, >= 0.
      accumulator_dtype, rounding_seed: the dtype of G and its stochastic rounding (see `scale_by_rss`).

    Example:
      A constant gradient g = 2 gives G_t = 4t, so the steps shrink as -eta / sqrt(t):

      >>> import jax.numpy as jnp
      >>> import jstep
      >>> optimizer = jstep.adagrad(1.0)
      >>> state = optimizer.init(jnp.zeros(()))
      >>> for t in range(4):
      ...     u, state = optimizer.update(jnp.asarray(2.0), state)
      ...     print(round(float(u), 4))
      -1.0
      -0.7071
      -0.5774
      -0.5
    """
    scaled = scale_by_rss(
        eps,
        eps_in_sqrt=eps_in_sqrt,
        initial_accumulator_value=initial_accumulator_value,
        accumulator_dtype=accumulator_dtype,
        rounding_seed=rounding_seed,
    )
    return _core.descent(scaled, learning_rate)


def scale_by_adadelta(
    rho: Any = 0.9,
    eps: Any = 1e-6,
    *,
    accumulator_dtype: Any = None,
    rounding_seed: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Zeiler's ADADELTA direction d_t (see `adadelta`), without the learning rate.

    Args:
      rho, eps, accumulator_dtype, rounding_seed: as in `adadelta`.
    """
    _core.check_decay("rho", rho)
    _core.check_number("eps", eps)
    _core.check_state_dtype("accumulator_dtype", accumulator_dtype)
    _core.check_rounding_seed(rounding_seed)

    def init(params):
        _core.check_floating_leaves(params)
        return AdadeltaState(
            _core.new_count(),
            _core.zeros_like_tree(params, accumulator_dtype, real=True, squares=True, nonnegative=True),
            _core.zeros_like_tree(params, accumulator_dtype, real=True, squares=True, nonnegative=True),
        )

    @_core.sees_through_variables
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        _core.check_same_shapes(updates, load(state.e_g))
        count = _core.increment(state.count)
        e_g_key, e_x_key = step_keys(rounding_seed, count, 2)
        # Steps are taken with E[g^2]_t as computed, then both averages are stored in their dtypes.
        e_g, new_e_g = advance(
            lambda Eg, g: running_average_value(Eg, _core.squared_magnitude(g), rho),
            state.e_g,
            updates,
            key=e_g_key,
            nonnegative=True,
        )

        def step(g, Eg, Ex):
            Ex = Ex.astype(_core.compute_dtype(Ex.dtype))
            return _core.adaptive_step(g, Eg, eps=0.0, eps_root=eps) * jnp.sqrt(Ex + eps)

        steps = jax.tree.map(step, updates, e_g, load(state.e_x))
        _, new_e_x = advance(
            lambda Ex, g, Eg: running_average_value(Ex, _core.squared_magnitude(step(g, Eg, Ex)), rho),
            state.e_x,
            updates,
            e_g,
            key=e_x_key,
            nonnegative=True,
        )
        return _core.cast_like(steps, updates), AdadeltaState(count, new_e_g, new_e_x)

    return optax.GradientTransformationExtraArgs(init, update)


def adadelta(
    learning_rate: _core.ScalarOrSchedule = 1.0,
    rho: Any = 0.9,
    eps: Any = 1e-6,
    *,
    accumulator_dtype: Any = None,
    rounding_seed: int | None = None,
) -> optax.GradientTransformationExtraArgs:
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
      accumulator_dtype: dtype of both averages (default: each parameter's real dtype, float32
        for float16 params, whose range cannot hold small squares).
      rounding_seed: None (round-to-nearest), or an int: averages narrower than float32 are
        stored by stochastic rounding, keys from (seed, t, leaf). No key is kept in the state.
    """
    direction = scale_by_adadelta(rho, eps, accumulator_dtype=accumulator_dtype, rounding_seed=rounding_seed)
    return _core.descent(direction, learning_rate)
