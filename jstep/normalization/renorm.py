"""Batch renormalization (Ioffe, 2017): batch norm corrected towards the running statistics.

Batch norm trains with the batch's statistics mu_B, sigma_B and evaluates with the running ones
mu, sigma, so a model trained on small or non-i.i.d. batches meets other numbers at evaluation.
Batch renormalization keeps the batch's statistics in training but maps the result onto what
the running statistics would give, with two per-feature corrections held constant in the
gradient. For each feature (statistics over the K values of the batch, as in `batch_norm`;
sigma_B^2 the population variance, two passes)::

    s   = sqrt(var + eps)                                  (the running statistics mean, var)
    r   = clip(sqrt(sigma_B^2 + eps) / s, 1/r_max, r_max)
    d   = clip((mu_B - mean) / s, -d_max, d_max)
    t   = sqrt(sigma_B^2 + eps r^2)
    Zhat_j = G (r (Z_j - mu_B) + d sigma_B) / t + B

These are the numbers of Stable-Baselines-JAX's ``BatchRenorm`` after its warm-up: it hands
Flax's normalization the mean mu_B - d sigma_B / r and the variance sigma_B^2 / r^2, and Flax
adds eps to that variance, (sigma_B^2 / r^2 + eps) r^2 = t^2. So eps appears in three places:
inside the roots of s and of r's numerator, and as eps r^2 under t. As eps -> 0, t -> sigma_B
and this is the paper's Algorithm 1, Zhat = G ((Z - mu_B) / sigma_B r + d) + B (the paper puts
eps in sigma_B = sqrt(sigma_B^2 + eps), which differs from the above by O(eps)). With r = 1
and d = 0 it is batch norm, Zhat = G (Z - mu_B) / sqrt(sigma_B^2 + eps) + B, gradient included:
the layers' warm-up runs through here with r_max = 1, d_max = 0.

Backward, r and d held constant (no gradient flows into mean, var, r_max or d_max). Write
u_j = (Z_j - mu_B) / t, so that Zhat_j = G (r u_j + d sigma_B / t) + B. Then

    dL/dB = sum_j dZhat_j
    dL/dG = sum_j dZhat_j (r u_j + d sigma_B / t) = r sum_j dZhat_j u_j + (d sigma_B / t) dL/dB

and for the input, with d mu_B/dZ_j = 1/K and d sigma_B^2/dZ_j = 2 (Z_j - mu_B)/K = 2 t u_j/K,
so that dt/dZ_j = u_j/K and d(sigma_B/t)/dZ_j = (1/sigma_B - sigma_B/t^2) dt/dZ_j
= (eps r^2 / (sigma_B t^2)) u_j / K,

    dL/dZ_j = (G r / t) (dZhat_j - (1/K) sum_k dZhat_k - u_j (1/K) (sum_k dZhat_k u_k - q sum_k dZhat_k))

    with q = d eps r / (sigma_B t).

This is batch norm's backward (see `batch_norm`) with G r / t for G / s, plus the q term,
which comes from d sigma_B / t and vanishes as eps -> 0 (then dL/dZ is the paper's, r / sigma_B
times batch norm's with eps = 0). A mask enters as in `batch_norm`: the statistics take the
masked-in values (m_j = 1), K counts them, and the two correction terms are multiplied by m_j.
The sums read only dZhat and Z, centred as in `batch_norm` (mu_B kept as an unevaluated sum).

How it is attached (as batch norm's, see `jstep.normalization.batchnorm`): a ``jax.custom_jvp``
whose tangent map is derived by hand, and whose transpose, which JAX takes for reverse mode,
is the backward above. With tangents Zdot, Gdot, Bdot (none for mean, var, r_max, d_max) and
the two per-feature sums a = sum_k m_k Zdot_k and b = sum_k m_k (Z_k - mu_B) Zdot_k
(all-reduced across `axis_name`), from mu_Bdot = a/K, (sigma_B^2)dot = 2b/K, tdot = b/(K t),

    Zhatdot_j = (G r / t) Zdot_j + (Z_j - mu_B) slope + shift,
    slope = Gdot r / t - G r b / (K t^3),
    shift = Bdot + Gdot d sigma_B / t - (G r / t) (a - q b / t) / K.

Transposed, the activation-sized terms give the input gradient above (the cotangent times
G r / t, and the sums sum_k dZhat_k and sum_k dZhat_k (Z_k - mu_B) against m_j and
m_j (Z_j - mu_B)); the per-feature ones give dL/dG and dL/dB. Reverse mode keeps Z itself
(Z - mu_B is recomputed where it is used, by batch norm's checkpointed product), the mask and
per-feature vectors, and a training step reads and writes 8 activation-sized arrays, as batch
norm's. Second derivatives are autodiff of the tangent map, with r and d under
``stop_gradient`` so that they stay constant at every order.

A constant feature (sigma_B = 0) with d != 0: there d sigma_B / t moves like |Z - mu_B|, so no
derivative exists; the backward and the tangent map take the q term as 0 there (u_j = 0 for
every j), the symmetric choice, and with d = 0 (warm-up) this is batch norm's exact gradient.
With eps = 0 as well, t = 0: the output is B (1/t taken as 0, the eps -> 0+ limit, as in
`batch_norm`) and so is every derivative through Z, where none exists (`batch_norm` gives inf
or NaN there); use eps > 0 when constant features can occur. One value per feature (K = 1) is
such a feature: Zhat = B and dL/dZ = 0, as in `batch_norm`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jstep import _core
from jstep.normalization.batchnorm import _times_centred
from jstep.normalization.checks import (
    FeatureAxis,
    _check_axis_name,
    _check_eps,
    _check_features,
    _check_mask,
)
from jstep.normalization.collectives import _per_device, _rebinding_vmap_axes
from jstep.normalization.layout import _Layout, _layout
from jstep.normalization.statistics import _masked, _moments, _safe_inverse, _total

# ------------------------------------------------------------------------- validation


def _check_limit(name: str, value: Any, low: float) -> Any:
    """`r_max` or `d_max`: a Python number >= `low` (as a float), or a real scalar array (a
    layer's variable, passed on unchecked); anything else is refused by `_core.check_number`."""
    _core.check_number(name, value, low=low)
    return value if _core._is_real_scalar_array(value) else float(value)


# ----------------------------------------------------------------------------- numerics


def _corrections(mean_b, var_b, mean, var, r_max, d_max, eps):
    """(r, d, t, sigma_B): r and d clipped and held constant, t = sqrt(sigma_B^2 + eps r^2)."""
    s = jnp.sqrt(var + eps)
    r = jnp.clip(jnp.sqrt(var_b + eps) / s, 1 / r_max, r_max)
    d = jnp.clip((mean_b - mean) / s, -d_max, d_max)
    r, d = jax.lax.stop_gradient((r, d))  # constant at every order of differentiation
    return r, d, jnp.sqrt(var_b + eps * jnp.square(r)), jnp.sqrt(var_b)


def _renorm_forward(x, scale, offset, mean, var, r_max, d_max, mask, layout, eps, axis_name):
    """(Zhat, mu_B, sigma_B^2) and the parts the tangent map needs, shaped to broadcast against x."""
    centre, var_b, count = _moments(x, layout, axis_name, mask)
    dtype = var_b.dtype

    def per_feature(v):
        return jnp.reshape(v, layout.keep_shape).astype(dtype)

    limits = jnp.asarray(r_max, dtype), jnp.asarray(d_max, dtype)
    r, d, t, sigma = _corrections(centre.high, var_b, per_feature(mean), per_feature(var), *limits, eps)
    inverse_t = _safe_inverse(t)  # t = 0 only for a constant feature with eps = 0: Zhat = B there
    g = per_feature(scale)
    y = centre.of(x.astype(dtype)) * (g * r * inverse_t) + (g * d * sigma * inverse_t + per_feature(offset))
    outputs = (y.astype(x.dtype), centre.high.reshape(layout.feature_shape), var_b.reshape(layout.feature_shape))
    return outputs, (centre, count, g, r, d, sigma, inverse_t)


# ------------------------------------------------------------- the custom-derivative core


@functools.partial(jax.custom_jvp, nondiff_argnums=(8, 9, 10))
def _renormalize(x, scale, offset, mean, var, r_max, d_max, mask, layout: _Layout, eps: float, axis_name: Any):
    """(Zhat, mu_B, sigma_B^2), the statistics shaped like `scale`; `mask` None or booleans."""
    return _renorm_forward(x, scale, offset, mean, var, r_max, d_max, mask, layout, eps, axis_name)[0]


def _renormalize_jvp(layout, eps, axis_name, primals, tangents):
    """The module docstring's tangent map: no tangent reaches mean, var, r_max or d_max."""
    x, scale, offset, mean, var, r_max, d_max, mask = primals
    dx, dscale, doffset = tangents[:3]
    outputs, (centre, count, g, r, d, sigma, inverse_t) = _renorm_forward(
        x, scale, offset, mean, var, r_max, d_max, mask, layout, eps, axis_name
    )
    dtype = g.dtype
    xc = x.astype(dtype)
    zeros = jnp.zeros(layout.keep_shape, dtype)
    dy, slope, shift, dmean_b, dvar_b = jnp.zeros_like(xc), zeros, zeros, zeros, zeros
    if not isinstance(dx, SymbolicZero):
        dx = dx.astype(dtype)
        a = _total(_masked(dx, mask), layout, axis_name)  # sum m Zdot
        b = _total(_masked(_times_centred(dx, xc, centre), mask), layout, axis_name)  # sum m (Z - mu_B) Zdot
        gain = g * r * inverse_t
        q = d * eps * r * _safe_inverse(sigma) * inverse_t  # 0 for a constant feature
        dy = gain * dx
        slope = slope - gain * inverse_t**2 * b / count
        shift = shift - gain * (a - q * b * inverse_t) / count
        dmean_b, dvar_b = a / count, 2 * b / count
    if not isinstance(dscale, SymbolicZero):
        dscale = jnp.reshape(dscale, layout.keep_shape).astype(dtype)
        slope = slope + dscale * r * inverse_t
        shift = shift + dscale * d * sigma * inverse_t
    if not isinstance(doffset, SymbolicZero):
        shift = shift + jnp.reshape(doffset, layout.keep_shape).astype(dtype)
    dy = dy + _times_centred(slope, xc, centre) + shift
    y, mean_b, var_b = outputs
    tangent_out = (
        dy.astype(y.dtype),
        dmean_b.reshape(layout.feature_shape).astype(mean_b.dtype),
        dvar_b.reshape(layout.feature_shape).astype(var_b.dtype),
    )
    return outputs, tangent_out


_renormalize.defjvp(_rebinding_vmap_axes(_renormalize_jvp), symbolic_zeros=True)

# Staged as one jitted call, as batch norm's core (inlined into an enclosing jit).
_renormalize_staged = jax.jit(_renormalize, static_argnums=(8, 9, 10))


def _renormalize_checked(
    x, scale, offset, mean, var, r_max, d_max, feature_axis, eps, axis_name, mask=None, axis_index_groups=None
):
    """`_renormalize` after checking every argument: (Zhat, mu_B, sigma_B^2)."""
    axis_name = _check_axis_name(axis_name)
    layout = _layout(x, feature_axis, axis_name, axis_index_groups)
    features = tuple(a for a in range(jnp.ndim(x)) if a not in layout.reduce_axes)
    for name, value in (("scale", scale), ("offset", offset), ("mean", mean), ("var", var)):
        _check_features(name, value, layout.feature_shape, jnp.shape(x), features)
    r_max, d_max = _check_limit("r_max", r_max, 1.0), _check_limit("d_max", d_max, 0.0)
    mask = _check_mask(mask, jnp.shape(x), layout, axis_name)
    scale, offset = _per_device(scale, axis_name), _per_device(offset, axis_name)
    return _renormalize_staged(x, scale, offset, mean, var, r_max, d_max, mask, layout, _check_eps(eps), axis_name)


# --------------------------------------------------------------------------- public API


def batch_renorm(
    x: jax.Array,
    scale: jax.Array,
    offset: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    *,
    r_max: Any = 3.0,
    d_max: Any = 5.0,
    feature_axis: FeatureAxis = -1,
    eps: float = 1e-5,
    axis_name: Any = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Batch renormalization's training pass: Zhat = G (r (Z - mu_B) + d sigma_B) / t + B.

    With the batch's mu_B, sigma_B^2 and the running `mean`, `var` (see the docstring of
    `jstep.normalization.renorm`)::

        r = clip(sqrt(sigma_B^2 + eps) / sqrt(var + eps), 1/r_max, r_max)
        d = clip((mu_B - mean) / sqrt(var + eps), -d_max, d_max)
        t = sqrt(sigma_B^2 + eps r^2)

    Stable-Baselines-JAX's ``BatchRenorm`` after its warm-up computes exactly this; as eps -> 0
    it is Ioffe's (2017) Algorithm 1, G ((Z - mu_B) / sigma_B r + d) + B. r and d are held
    constant in the gradient, which is hand-derived (the docstring of
    `jstep.normalization.renorm`):

        dL/dZ = (G r / t) (dZhat - mean(dZhat) - u mean(dZhat (u - q))),
        u = (Z - mu_B) / t, q = d eps r / (sigma_B t),

    and nothing flows into `mean`, `var`, `r_max` or `d_max` (their gradients are zero).
    ``r_max=1, d_max=0`` gives r = 1, d = 0: batch norm, ``batch_norm(x, scale, offset, eps=eps)``.

    Args:
      x: floating array; bfloat16/float16 are normalized in float32 and returned in their dtype.
      scale: G, shaped like the feature axes of `x`.
      offset: B, the same shape.
      mean: the running mean, the same shape.
      var: the running (population) variance, the same shape; with eps = 0 it must be > 0.
      r_max: r's bound, >= 1: a Python number, or a scalar array (a layer's variable, so that a
        schedule or the warm-up can change it without recompiling).
      d_max: d's bound, >= 0, the same.
      feature_axis, eps, axis_name, axis_index_groups, mask: as in `batch_norm` (eps >= 0 goes
        where the formulas above say). Under `axis_name` the batch statistics, and so r and d,
        are those of the whole batch, and the backward's two sums are all-reduced.

    Returns:
      Zhat, with the shape and dtype of `x`.

    Example:
      With the running statistics equal to the batch's, r = 1 and d = 0, so batch renorm is
      batch norm; a running mean 1 below the batch's shifts the output by d = 1 / sqrt(var + eps):

      >>> import jax.numpy as jnp
      >>> import jstep
      >>> x = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 60.0], [6.0, 30.0]])
      >>> mean, var = jstep.batch_stats(x)
      >>> ones, zeros = jnp.ones(2), jnp.zeros(2)
      >>> y = jstep.batch_renorm(x, ones, zeros, mean, var)
      >>> print(jnp.allclose(y, jstep.batch_norm(x, ones, zeros), atol=1e-6))
      True
      >>> shifted = jstep.batch_renorm(x, ones, zeros, mean - 1, var)
      >>> print((shifted - y).mean(axis=0).round(4))
      [0.5345 0.0535]
    """
    return _renormalize_checked(
        x, scale, offset, mean, var, r_max, d_max, feature_axis, eps, axis_name, mask, axis_index_groups
    )[0]
