"""B.0.1.4 Adam: momentum's moving average of g and adadelta's moving average of g^2.

For every weight j (the notes' equations)::

    m_t = B1 m_{t-1} + (1 - B1) g_t            m_hat_t = m_t / (1 - B1^t)
    v_t = B2 v_{t-1} + (1 - B2) g_t^2          v_hat_t = v_t / (1 - B2^t)
    W_t = W_{t-1} - eta m_hat_t / sqrt(v_hat_t + eps)

The published algorithm (Kingma & Ba, Optax, PyTorch) puts eps outside the root:
eta m_hat / (sqrt(v_hat) + eps). jstep writes the denominator as
sqrt(v_hat + eps_root) + eps, so that both are one call away:

    adam(lr)                          published form (the default; optax.adam's numbers)
    adam(lr, eps=0.0, eps_root=1e-8)  the notes' equation, literally

AdamW (Loshchilov & Hutter) adds decoupled weight decay lambda W to Adam's direction:

    W_t = W_{t-1} - eta_t (m_hat_t / (sqrt(v_hat_t + eps_root) + eps) + lambda W_{t-1})

Study question: m_hat_t is itself a running average of g with gamma_t =
B1 (1 - B1^(t-1)) / (1 - B1^t), so gamma_1 = 0 and gamma_t -> B1 as t grows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jstep import _core
from jstep.averages import running_average_value
from jstep.grouping import Packed
from jstep.precision import advance, load, step_keys


class ScaleByAdamState(NamedTuple):
    """`count` = t (int32, saturating); `mu` = m_t; `nu` = v_t (real, even for complex params)."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in Optax's states
    mu: Any
    nu: Any


def scale_by_adam(
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    nesterov: bool = False,
    rounding_seed: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Adam's direction m_hat_t / (sqrt(v_hat_t + eps_root) + eps), without the learning rate.

    Args:
      b1: B1, the decay of m, in [0, 1).
      b2: B2, the decay of v, in [0, 1).
      eps: >= 0, added after the square root (published form).
      eps_root: >= 0, added inside the square root (the notes' form).
      mu_dtype: dtype of m (default: each parameter's dtype); e.g. ``jnp.bfloat16`` halves
        its memory. Arithmetic runs in at least float32 whatever the dtypes.
      nu_dtype: dtype of v (default: the parameter's real dtype, but float32 for float16
        params: float16's range cannot hold (1 - B2) g^2 for |g| under about 8e-3, and the
        step would grow 25x in 1000 steps of g = 1e-4). An explicit dtype is kept as given.
      nesterov: use Nesterov's look-ahead (NAdam, Dozat 2016), as ``optax.adam(nesterov=True)``:
        m_hat_t = B1 m_t / (1 - B1^(t+1)) + (1 - B1) g_t / (1 - B1^t).
      rounding_seed: None (store m and v by round-to-nearest), or an int: m and v, where
        narrower than float32, are stored by stochastic rounding with keys from (seed, t, leaf),
        so that E[m_t] and E[v_t] follow the equations above. In bfloat16 with B2 = 0.999,
        round-to-nearest leaves v stuck at its peak (B2 v rounds back to v); stochastic
        rounding lets it decay as in float32. No key is kept in the state, so a run resumed
        from a checkpoint rounds exactly as an uninterrupted one.

    Complex parameters work: m is complex and v accumulates |g|^2.
    """
    _core.check_decay("b1", b1)
    _core.check_decay("b2", b2)
    _core.check_number("eps", eps)
    _core.check_number("eps_root", eps_root)
    _core.check_flag("nesterov", nesterov)
    _core.check_state_dtype("mu_dtype", mu_dtype)
    _core.check_state_dtype("nu_dtype", nu_dtype)
    _core.check_rounding_seed(rounding_seed)

    def init(params):
        _core.check_floating_leaves(params)
        return ScaleByAdamState(
            _core.new_count(),
            _core.zeros_like_tree(params, mu_dtype),
            _core.zeros_like_tree(params, nu_dtype, real=True, squares=True, nonnegative=True),
        )

    @_core.sees_through_variables
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        _core.check_same_shapes(updates, load(state.mu), holds_values=True)
        count = _core.increment(state.count)
        mu_key, nu_key = step_keys(rounding_seed, count, 2)
        # The step is taken with m_t and v_t as computed (float32), then they are stored in their dtypes.
        mu, new_mu = advance(
            lambda m, g: running_average_value(m, g, b1), state.mu, updates, key=mu_key, nonnegative=False
        )
        nu, new_nu = advance(
            lambda v, g: running_average_value(v, _core.squared_magnitude(g), b2),
            state.nu,
            updates,
            key=nu_key,
            nonnegative=True,
        )
        correction1 = _core.bias_correction(b1, count)
        correction2 = _core.bias_correction(b2, count)
        if nesterov:
            look_ahead = _core.bias_correction(b1, _core.increment(count))

        def direction(g, m, v):
            dtype = _core.compute_dtype(m.dtype)
            real = _core.real_dtype(dtype)
            m = m.astype(dtype)
            if nesterov:
                m_hat = b1 * m / look_ahead.astype(real) + (1 - b1) * g.astype(dtype) / correction1.astype(real)
            else:
                m_hat = m / correction1.astype(real)
            v_hat = v.astype(_core.compute_dtype(v.dtype)) / correction2.astype(real)
            return _core.adaptive_step(m_hat, v_hat, eps=eps, eps_root=eps_root).astype(g.dtype)

        directions = jax.tree.map(direction, updates, mu, nu)
        return directions, ScaleByAdamState(count, new_mu, new_nu)

    return optax.GradientTransformationExtraArgs(init, update)


def adam(
    learning_rate: _core.ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    nesterov: bool = False,
    rounding_seed: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Adam: W_t = W_{t-1} - eta_t m_hat_t / (sqrt(v_hat_t + eps_root) + eps).

    The defaults are the published algorithm and ``optax.adam``'s numbers. The notes' literal
    equation, eta m_hat / sqrt(v_hat + eps), is ``adam(lr, eps=0.0, eps_root=1e-8)``.
    See `scale_by_adam` for the arguments; `learning_rate` is eta, a number >= 0 or an
    Optax schedule ``count -> eta_t`` (read at the count before the step, as in Optax).

    Example:
      At t = 1, m_hat = g and v_hat = g^2, so the notes' form steps by
      -eta g / sqrt(g^2 + eps) = -eta sign(g), whatever the size of g:

      >>> import jax.numpy as jnp
      >>> import jstep
      >>> optimizer = jstep.adam(0.001, eps=0.0, eps_root=1e-8)
      >>> g = jnp.array([0.3, -4.0])
      >>> updates, state = optimizer.update(g, optimizer.init(jnp.zeros(2)))
      >>> print((updates / 0.001).round(4), state.count)
      [-1.  1.] 1
    """
    return _core.descent(
        scale_by_adam(
            b1, b2, eps, eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype, nesterov=nesterov, rounding_seed=rounding_seed
        ),
        learning_rate,
    )


Mask = Any | Callable[[Any], Any]


def _check_mask_tree(tree: Any) -> None:
    """Raise TypeError naming the first leaf of a weight-decay mask that is not a bool."""
    for path, keep in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not isinstance(keep, (bool, np.bool_)):
            raise TypeError(
                "mask must be None, a tree of Python bools (True: decay this leaf) shaped like the "
                f"params or a prefix of them, or a callable params -> such a tree; got {_core._shown(tree)}, "
                f"whose leaf {jax.tree_util.keystr(path) or '<root>'} is {keep!r}"
            )


def _is_mask_function(mask: Mask) -> bool:
    """Whether `mask` is a function ``params -> tree of bools`` rather than such a tree, by
    Optax's rule: every leaf callable. An Equinox module of bools is callable itself (it defines
    ``__call__``), but its leaves, the bools, are not."""
    leaves = jax.tree.leaves(jax.tree.map(callable, mask))
    return bool(leaves) and all(leaves)


def _decay_mask(mask: Mask, params: Any) -> Any:
    """A bool per leaf of `params`: `mask` (a tree of bools shaped like `params` or a prefix
    of it, or a callable ``params -> such a tree``) broadcast over the params, as in
    ``optax.masked``.

    Inside `jstep.grouped` the params are packed into a few buffers: the mask is then resolved
    on the params' own tree (as ``jax.ShapeDtypeStruct`` leaves: their shapes and dtypes) and
    spread over the buffers, element by element, so that the same weights decay.
    """
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    if isinstance(params, Packed):
        return params.spread(_decay_mask(mask, params.unpacked_shapes()))
    tree = mask(params) if _is_mask_function(mask) else mask
    _check_mask_tree(tree)
    try:
        return jax.tree.map(lambda keep, subtree: jax.tree.map(lambda _: bool(keep), subtree), tree, params)
    except ValueError as error:
        raise ValueError(
            "the weight-decay mask must have the params' tree structure (or a prefix of it): "
            f"mask {jax.tree.structure(tree)}, params {jax.tree.structure(params)}"
        ) from error


def adamw(
    learning_rate: _core.ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    weight_decay: _core.ScalarOrSchedule = 1e-4,
    *,
    mask: Mask = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    nesterov: bool = False,
    rounding_seed: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """AdamW: W_t = W_{t-1} - eta_t (m_hat_t / (sqrt(v_hat_t + eps_root) + eps) + lambda W_{t-1}).

    Decoupled weight decay (Loshchilov & Hutter, 2019): lambda W is added to Adam's
    direction, after the adaptive scaling, so every weight shrinks by the same fraction
    eta_t lambda per step. The numbers of ``optax.adamw`` and ``torch.optim.AdamW``.

    ``optax.chain(optax.add_decayed_weights(lambda), jstep.adam(lr))`` is *not* AdamW: it adds
    lambda W to the gradient, so the decay enters m and v and is divided by
    sqrt(v_hat) + eps like the gradient. That is Adam on an L2-regularised loss: weights with
    large gradients are barely decayed, weights with tiny gradients are decayed by up to
    lambda W / eps. AdamW's decay does not depend on the gradients at all.

    Args:
      learning_rate, b1, b2, eps, eps_root, mu_dtype, nu_dtype, nesterov, rounding_seed: as in `adam`.
      weight_decay: lambda >= 0 (``torch.optim.AdamW``'s default is 1e-2, Optax's 1e-4), or a
        schedule ``count -> lambda`` evaluated at the step count before the step (0 at the
        first), as ``optax.adamw``'s.
      mask: which params decay: a tree of bools shaped like the params (or a prefix of
        them), or a callable ``params -> that tree``, as in ``optax.adamw``; e.g.
        ``lambda p: jax.tree.map(lambda x: x.ndim > 1, p)`` leaves biases and norms alone.
        None decays every leaf. A bare ``False`` (which would decay no leaf) is refused: it
        is what ``optax.inject_hyperparams`` passes when it calls a callable mask with the
        step count as if it were a schedule; name the mask in its ``static_args=('mask',)``.

    ``update`` needs ``params`` (the W in lambda W).

    Example:
      With a zero gradient Adam's direction is 0, and the decay alone moves each weight by
      -eta lambda W:

      >>> import jax.numpy as jnp
      >>> import jstep
      >>> optimizer = jstep.adamw(0.25, weight_decay=0.5)
      >>> params = jnp.array([2.0, -4.0])
      >>> updates, _ = optimizer.update(jnp.zeros(2), optimizer.init(params), params)
      >>> print(updates)  # -0.25 * 0.5 * W
      [-0.25  0.5 ]
    """
    _core.check_number("weight_decay", weight_decay, schedule=True)
    if mask is False or (isinstance(mask, np.bool_) and not mask):
        raise ValueError(
            "mask=False decays no leaf: for Adam without weight decay use jstep.adam or weight_decay=0. "
            "Inside optax.inject_hyperparams a callable mask is called with the step count, as if it were a "
            "schedule, and its result (False for lambda p: jax.tree.map(lambda x: x.ndim > 1, p)) arrives "
            "here: name it static, optax.inject_hyperparams(jstep.adamw, static_args=('mask',)), or give "
            "a tree of bools"
        )
    if not _is_mask_function(mask):
        _check_mask_tree(mask)
    direction = scale_by_adam(
        b1, b2, eps, eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype, nesterov=nesterov, rounding_seed=rounding_seed
    )

    def update(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("adamw's update needs the params for the weight decay: call update(grads, state, params)")
        decay = weight_decay(state.count) if callable(weight_decay) else weight_decay  # before the step, as Optax
        directions, state = direction.update(updates, state, params, **extra_args)

        def decayed(d, w, keep):
            if d is None or keep is False:  # None: a leaf without gradient (a frozen part, as in Equinox)
                return d
            dtype = _core.compute_dtype(d.dtype)
            with_decay = d.astype(dtype) + decay * w.astype(dtype)
            if keep is not True:  # a buffer of several leaves (jstep.grouped): decay where it says
                with_decay = jnp.where(keep, with_decay, d.astype(dtype))
            return with_decay.astype(d.dtype)

        keep = _decay_mask(mask, params)
        return jax.tree.map(decayed, directions, params, keep, is_leaf=lambda d: d is None), state

    def init(params):
        _decay_mask(mask, params)  # a mask that does not fit the params fails here, not at the first update
        return direction.init(params)

    return _core.descent(optax.GradientTransformationExtraArgs(init, update), learning_rate)
