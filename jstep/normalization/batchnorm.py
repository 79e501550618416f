"""B.0.2 Batch normalization, with the notes' hand-derived gradient and its forward mode.

For each feature i, over the K values Z_i1..Z_iK it takes in a batch (every axis of ``x``
except the feature axes; across devices and vmapped examples too under ``axis_name``)::

    mu_i      = (1/K) sum_j Z_ij
    sigma_i^2 = (1/K) sum_j (Z_ij - mu_i)^2                (population variance, two passes)
    Zbar_ij   = (Z_ij - mu_i) / s_i
    Zhat_ij   = G_i Zbar_ij + B_i

with ``s_i = sqrt(sigma_i^2 + eps)`` (``eps_in_sqrt=True``, Ioffe & Szegedy, Flax, PyTorch)
or the notes' ``s_i = sigma_i + eps`` (``eps_in_sqrt=False``).

The backward pass is the notes' derivation, vectorised and made exact for eps > 0. With
dZhat = dL/dZhat, the gradients of the weights are the two per-feature reductions

    dL/dB_i = sum_j dZhat_ij
    dL/dG_i = sum_j dZhat_ij Zbar_ij

and, from d mu_i/dZ_ij = 1/K, d sigma_i/dZ_ij = (Z_ij - mu_i)/(K sigma_i) and
dZbar_ik/dZ_ij = (delta_jk - 1/K)/s_i - (Zbar_ik/s_i) ds_i/dZ_ij with ds_i/dZ_ij = c_i Zbar_ij/K,

    dL/dZ_ij = (G_i / s_i) (dZhat_ij - (1/K) dL/dB_i - c_i Zbar_ij (1/K) dL/dG_i)

where

    c_i = 1                 for s_i = sqrt(sigma_i^2 + eps)   (ds_i/dZ_ij = (Z_ij - mu_i)/(K s_i))
    c_i = s_i / sigma_i     for s_i = sigma_i + eps           (ds_i/dZ_ij = (Z_ij - mu_i)/(K sigma_i))
        = 1 + eps/sigma_i

With eps = 0 both are the notes' closing formula,
dL/dZ_ij = sum_k dZhat_ik G_i/(K sigma_i) (delta_jk K - 1 - (Z_ik-mu_i)(Z_ij-mu_i)/sigma_i^2).
So the backward is two per-feature reductions and one elementwise pass. It keeps one
activation-sized array from the forward pass, the input Z itself (nothing is written out for
the backward), plus per-feature vectors, and it is written with differentiable jnp
operations, so second derivatives (grad of grad, Hessian-vector products) are exact too.
The centred values are taken with mu held as an unevaluated sum of fl(mu) and what its
rounding left off (`low`), Z - mu = (Z - fl(mu)) - low: in the forward pass for sigma^2 and
Zhat, in the backward for the input gradient and for

    sum_j dZhat_ij Zbar_ij = sum_j dZhat_ij (Z_ij - mu_i) / s_i

And mu itself is summed about a value of the batch, c_i (this device's first value of the
feature, averaged over the shards pooled): mu_i = c_i + (1/K) sum_j (Z_ij - c_i).
Rounding: where |mu_i| >> sigma_i, Z_ij - c_i and Z_ij - fl(mu_i) are exact (Sterbenz), so
no term loses a factor |mu_i|/sigma_i: with float32 at |mu|/sigma = 1e4 the gradients keep
about 1e-7 of their size, where the one-pass sum_j dZhat_ij Z_ij - mu_i sum_j dZhat_ij (and
autodiff through Z - fl(mu)) lose 1e-4 to 1e-2. Every subtraction is fused into the pass
that reads Z, so no centred copy of Z is written. (Under a sharded ``jit`` whose mesh splits
the batch axes with explicit axes, JAX cannot take one value of Z: there c = 0, and Z - fl(mu)
loses that factor in Zhat and dL/dZ, as autodiff does; dL/dG stays two-pass.)

Forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) and how reverse mode still runs
the backward above. Perturb Z by dZ and G, B by dG, dB. With a_i = (1/K) sum_j dZ_ij and
b_i = (1/K) sum_j Zbar_ij dZ_ij (two per-feature reductions),

    d mu_i      = a_i
    d sigma_i^2 = (2/K) sum_j (Z_ij - mu_i) dZ_ij = 2 s_i b_i
    d s_i       = c_i b_i                        (the same c_i: ds = d sigma^2 / (2 s) or / (2 sigma))
    d Zbar_ij   = (dZ_ij - a_i)/s_i - Zbar_ij d s_i / s_i
    dZhat_ij    = (G_i/s_i) (dZ_ij - a_i - c_i Zbar_ij b_i) + dG_i Zbar_ij + dB_i

(mu_i and s_i move every Zhat_ij, so only the two sums carry the batch). The tangent map is
written in the form

    dZhat_ij = (G_i/s_i) dZ_ij + (Z_ij - mu_i) P_i + Q_i,
    P_i = dG_i/s_i - G_i c_i/(K s_i^3) sum_j (Z_ij - mu_i) dZ_ij,   Q_i = dB_i - (G_i/s_i) a_i

whose operations on activation-sized arrays only multiply a tangent by the per-feature G/s,
by Z - mu or by the mask, and sum over the batch. That map is linear in (dZ, dG, dB). Reverse
mode (``jax.grad``, ``jax.vjp``) linearizes and transposes it, and each operation transposes
to its counterpart: "multiply by Z - mu, sum over the batch" to "broadcast, multiply by
Z - mu", the sum to the broadcast, a multiplication to itself. So what runs is the backward
above, term for term: the reductions sum_j dZhat_ij = dL/dB_i and
sum_j dZhat_ij (Z_ij - mu_i) = s_i dL/dG_i, then the one elementwise pass of dL/dZ_ij.
(Without a mask the Jacobian (G_i/s_i)(delta_jk - 1/K - c_i Zbar_ij Zbar_ik/K) is symmetric:
the tangent map and the backward are the same formula.)
Z - mu is recomputed where it is used (a checkpointed product), so reverse mode keeps Z
itself, as before, and a training step still reads and writes 8 activation-sized arrays.
Under ``axis_name`` the two sums of the tangent map are all-reduced; their transposes are
the all-reduces of the backward's two sums. Second derivatives are autodiff of this map.
With a mask, a_i and b_i take the masked-in values only (m_ij dZ_ij, over K_i).

With a mask (``mask=``, booleans broadcastable to Z; m_ij = 1 where Z_ij is masked in, else 0)
the statistics are those of the masked-in values, and every value is normalized with them:

    K_i       = sum_j m_ij                                 (per feature; summed across axis_name)
    mu_i      = (1/K_i) sum_j m_ij Z_ij
    sigma_i^2 = (1/K_i) sum_j m_ij (Z_ij - mu_i)^2

Then d mu_i/dZ_ij = m_ij/K_i and ds_i/dZ_ij = c_i m_ij Zbar_ij/K_i, and the same derivation
gives the input gradient with its two correction terms masked,

    dL/dZ_ij = (G_i / s_i) (dZhat_ij - m_ij (1/K_i) dL/dB_i - c_i m_ij Zbar_ij (1/K_i) dL/dG_i)

while dL/dB_i and dL/dG_i still sum over every j (every Zhat_ij depends on G_i and B_i): a
masked-out value, which moves no statistic, gets only the direct term (G_i/s_i) dZhat_ij.
A feature needs K_i >= 1. A mask whose values are known when `batch_norm` is traced is
checked (a clear error for K_i = 0); a traced mask cannot be, and there K_i = 0 gives
mu_i = sigma_i = 0/0, so that feature's outputs and gradients are NaN. K_i = 1 gives
sigma_i = 0, so the one masked-in value becomes B_i and the others G_i (Z_ij - mu_i)/s_i + B_i
with s_i = sqrt(eps) or eps (with eps = 0, see below).

One value per feature (K = 1, e.g. a batch of one example of a dense layer): the value is its
own mean, sigma = 0 and Zhat = B, as in Flax (PyTorch refuses a training call with one value
per channel). Zhat does not depend on Z at all then, so dL/dZ = 0 and
dL/dG = 0 exactly, eps = 0 included; dL/dB = dZhat.

With ``axis_index_groups`` (under ``pmap``, or ``shard_map(..., check_vma=False)``) the
devices along ``axis_name`` are split into groups of equal size, and each group is a batch of
its own: the sums behind mu_i, sigma_i^2 and K_i, and the backward's two reductions, are
all-reduced within the group only (``jax.lax.psum(..., axis_index_groups=...)``), so without a
mask K = (the values per device) x (the group size).

Degenerate features (every value of the feature equal, sigma_i = 0):
  * eps > 0: Zbar = 0 and the output is B_i. Both forms are differentiable there; for
    ``s = sigma + eps`` the term c_i Zbar_ij is 0/0, and its limit is 0 (Zbar_ij = O(|Z-mu|)
    while c_i = O(1/|Z-mu|) multiplies sum_k dZhat_ik (Z_ik-mu_i) = O(|Z-mu|)), so
    dL/dZ_ij = (G_i/eps)(dZhat_ij - mean_k dZhat_ik) exactly, with no NaN.
  * eps = 0: the forward gives Zbar = 0, the eps -> 0+ limit, so the output is B_i and the
    gradients of G and B are finite. The input gradient of that feature is not finite
    (inf or NaN): an arbitrarily small change of Z moves Zbar by O(1), so no derivative
    exists. Use eps > 0 when constant features can occur.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jstep.normalization.checks import (
    FeatureAxis,
    _check_axis_name,
    _check_eps,
    _check_features,
    _check_mask,
    _check_x,
    _feature_axes,
)
from jstep.normalization.collectives import _all_reduce, _per_device, _rebinding_vmap_axes
from jstep.normalization.layout import _Layout, _layout
from jstep.normalization.statistics import _denominator, _masked, _moments, _safe_inverse
from jstep.normalization.virtual import _check_virtual_batches, _check_virtual_mask, _virtual_batches

# ------------------------------------------------------------- the custom-gradient core


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7))
def _normalize(x, scale, offset, mask, layout: _Layout, eps: float, eps_in_sqrt: bool, axis_name: Any):
    """(Zhat, mu, sigma^2): the forward pass, statistics shaped like `scale`; `mask` None or booleans."""
    return _forward(x, scale, offset, mask, layout, eps, eps_in_sqrt, axis_name)[0]


def _forward(x, scale, offset, mask, layout, eps, eps_in_sqrt, axis_name):
    """((Zhat, mu, sigma^2), (mu as a `_Centre`, sigma^2, K)), the last three shaped to broadcast against x."""
    centre, var, count = _moments(x, layout, axis_name, mask)
    _, s = _denominator(var, eps, eps_in_sqrt)
    gain = scale.reshape(layout.keep_shape).astype(var.dtype) * _safe_inverse(s)  # G/s
    y = centre.of(x.astype(var.dtype)) * gain + offset.reshape(layout.keep_shape).astype(var.dtype)
    outputs = (y.astype(x.dtype), centre.high.reshape(layout.feature_shape), var.reshape(layout.feature_shape))
    return outputs, (centre, var, count)


def _normalize_jvp(layout, eps, eps_in_sqrt, axis_name, primals, tangents):
    """The forward pass and the tangent map of the module docstring, linear in the tangents.

    Every activation-sized operation of the tangent map multiplies a tangent by a per-feature
    value, by the centred input Z - mu, or by the mask, and its reductions are sums over the
    batch axes, all-reduced across `axis_name`. Its transpose, which JAX takes for reverse
    mode, is then the notes' backward op for op: the two reductions sum dZhat and
    sum dZhat (Z - mu), one all-reduce, one elementwise pass; and Z - mu (with the mask and
    per-feature vectors) is all it keeps from the forward pass.
    """
    x, scale, offset, mask = primals
    dx, dscale, doffset, _ = tangents  # the mask's tangent is a symbolic zero (booleans)
    outputs, (centre, var, count) = _forward(x, scale, offset, mask, layout, eps, eps_in_sqrt, axis_name)
    sigma, s = _denominator(var, eps, eps_in_sqrt)
    inverse_s = _safe_inverse(s)
    xc = x.astype(var.dtype)

    def per_feature(tangent):
        return tangent.reshape(layout.keep_shape).astype(var.dtype)

    zero = jnp.zeros(layout.keep_shape, var.dtype)
    # dZhat = gain dZ + (Z - mu) slope + shift, with slope and shift per feature.
    slope = zero if isinstance(dscale, SymbolicZero) else per_feature(dscale) * inverse_s  # dG/s
    shift = zero if isinstance(doffset, SymbolicZero) else per_feature(doffset)  # dB
    dmean = dvar = zero
    dy = None
    if not isinstance(dx, SymbolicZero):
        dz = dx.astype(var.dtype)
        sums = (
            jnp.sum(_masked(dz, mask), axis=layout.reduce_axes, keepdims=True),
            jnp.sum(_masked(_times_centred(dz, xc, centre), mask), axis=layout.reduce_axes, keepdims=True),
        )
        sum_dz, sum_dz_centred = sums if axis_name is None else _all_reduce(sums, axis_name, layout.groups)
        dmean, dvar = sum_dz / count, 2 * sum_dz_centred / count  # d mu, d sigma^2
        g = per_feature(scale)
        # G/s, as in the backward: with K = 1 (no mask) Zhat = B and the terms cancel exactly.
        gain = g * inverse_s if layout.size == 1 and mask is None else g / s
        # c/s^3 = 1/s^3 (eps inside the root) or 1/(sigma s^2) (the notes' form; 0 at sigma = 0)
        c_over_s3 = inverse_s * inverse_s * (inverse_s if eps_in_sqrt else _safe_inverse(sigma))
        slope = slope - g * c_over_s3 * (sum_dz_centred / count)
        shift = shift - gain * dmean
        dy = gain * dz
    dy_rest = _times_centred(slope, xc, centre) + shift
    dy = dy_rest if dy is None else dy + dy_rest
    y, mean, _ = outputs

    def like(tangent, primal):
        return tangent.reshape(primal.shape).astype(primal.dtype)

    return outputs, (like(jnp.broadcast_to(dy, y.shape), y), like(dmean, mean), like(dvar, mean))


_normalize.defjvp(_rebinding_vmap_axes(_normalize_jvp), symbolic_zeros=True)


@jax.checkpoint
def _times_centred(tangent, x, centre):
    """tangent (Z - mu), with Z - mu taken where it is used: reverse mode keeps Z, not Z - mu.

    Checkpointed, so that linearizing the tangent map saves its inputs (Z and the per-feature
    mu) and computes Z - mu again inside each use (fused into the pass that reads Z), instead
    of writing Z - mu out in the forward pass and keeping it for the backward.
    """
    return tangent * centre.of(x)


# Staged as one jitted call (inlined into an enclosing jit): JAX 0.10 cannot run a custom
# derivative rule with symbolic zeros op by op under an eager shard_map, but runs it staged.
_normalize_staged = jax.jit(_normalize, static_argnums=(4, 5, 6, 7))


def _normalize_checked(
    x,
    scale,
    offset,
    feature_axis,
    eps,
    eps_in_sqrt,
    axis_name,
    mask=None,
    axis_index_groups=None,
    virtual_batch_size=None,
):
    """(Zhat, mu, sigma^2) after checking every argument; with virtual batches, the statistics
    of each group, the groups on their first axis."""
    axis_name = _check_axis_name(axis_name)
    size = _check_virtual_batches(virtual_batch_size, axis_index_groups)
    if size is not None:
        return _normalize_virtual(x, scale, offset, feature_axis, eps, eps_in_sqrt, axis_name, mask, size)
    layout = _layout(x, feature_axis, axis_name, axis_index_groups)
    features = tuple(a for a in range(jnp.ndim(x)) if a not in layout.reduce_axes)
    _check_features("scale", scale, layout.feature_shape, jnp.shape(x), features)
    _check_features("offset", offset, layout.feature_shape, jnp.shape(x), features)
    mask = _check_mask(mask, jnp.shape(x), layout, axis_name)
    scale, offset = _per_device(scale, axis_name), _per_device(offset, axis_name)
    return _normalize_staged(x, scale, offset, mask, layout, _check_eps(eps), bool(eps_in_sqrt), axis_name)


def _normalize_virtual(x, scale, offset, feature_axis, eps, eps_in_sqrt, axis_name, mask, size):
    """Batch norm of each virtual batch: the grouped x, with the group axis as a feature axis.

    A virtual batch lies within one shard, so its statistics are not all-reduced; `axis_name`
    still makes the gradients of `scale` and `offset` this shard's share, as without groups.
    """
    _check_x(x)
    split = _virtual_batches(jnp.shape(x), feature_axis, size)
    features = _feature_axes(jnp.ndim(x), feature_axis)
    feature_shape = tuple(jnp.shape(x)[a] for a in features)
    _check_features("scale", scale, feature_shape, jnp.shape(x), features)
    _check_features("offset", offset, feature_shape, jnp.shape(x), features)
    scale, offset = _per_device(scale, axis_name), _per_device(offset, axis_name)
    _check_virtual_mask(mask, split)
    y, mean, var = _normalize_checked(
        split.group(x),
        split.per_group(scale),
        split.per_group(offset),
        split.feature_axis,
        eps,
        eps_in_sqrt,
        None,
        split.group_mask(mask),
    )
    return split.ungroup(y), split.groups_first(mean), split.groups_first(var)


# --------------------------------------------------------------------------- public API


def batch_norm(
    x: jax.Array,
    scale: jax.Array,
    offset: jax.Array,
    *,
    feature_axis: FeatureAxis = -1,
    eps: float = 1e-5,
    eps_in_sqrt: bool = True,
    axis_name: Any = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    virtual_batch_size: int | None = None,
) -> jax.Array:
    """Batch-normalize `x` with its own statistics: Zhat = G (Z - mu) / s + B.

    ``s = sqrt(sigma^2 + eps)`` by default; ``eps_in_sqrt=False`` is the notes' literal
    ``s = sigma + eps``, and ``feature_axis=0`` their n x K layout. The gradient is the notes'
    derivation made exact for eps > 0 (see the docstring of `jstep.normalization.batchnorm` for the
    formulas and for what a constant feature gives):

        dL/dZ = (G/s) (dZhat - mean(dZhat) - c Zbar mean(dZhat Zbar)),
        c = 1 (eps inside the root) or c = (sigma + eps)/sigma (the notes' form).

    Args:
      x: floating array; bfloat16/float16 are normalized in float32 and returned in their dtype.
      scale: G, shaped like the feature axes of `x` (e.g. ``(C,)`` for NHWC).
      offset: B, the same shape.
      feature_axis: the axis or axes that index features (-1 for NHWC, 1 for NCHW, 0 for the
        notes' n x K); statistics are taken over every other axis.
      eps: eps >= 0, a Python number. eps = 0 is the notes' derivation.
      eps_in_sqrt: True for sqrt(sigma^2 + eps), False for sigma + eps.
      axis_name: the mapped axis, or a tuple of them, over which the batch is split: a
        ``shard_map``/``pmap`` axis (devices), a ``jax.vmap(..., axis_name=...)`` axis (e.g. one
        example per call, as in Equinox, ``nnx.vmap`` or Linen's ``nn.vmap``), or both, e.g.
        ``("devices", "examples")`` for a vmap inside a shard_map. The statistics and the
        backward pass's two reductions are all-reduced over it, so the output and the input
        gradient equal those of one device holding the whole batch. The gradients of `scale`
        and `offset` taken inside the map stay this device's (or example's) contribution: sum
        them over the axis, as for any parameter under data parallelism. Taken outside the
        map, they are already summed (shard_map's transpose does that for a replicated
        `scale`, vmap's for an unbatched one).
      axis_index_groups: None, or a list of equal-sized lists of indices along `axis_name`
        holding each index once, e.g. ``[[0, 1, 2, 3], [4, 5, 6, 7]]``: each group of devices
        is a batch of its own (statistics, K and the backward's reductions all-reduced within
        the group), as ``jax.lax.psum(..., axis_index_groups=...)``. Where ``psum`` takes no
        groups (a ``jax.vmap`` axis in `axis_name`, a ``shard_map`` with ``check_vma=True``,
        its default in jax 0.10) a NotImplementedError says so; ``pmap`` and
        ``shard_map(..., check_vma=False)`` take them.
      mask: None, or booleans broadcastable to `x` (as in Flax): the statistics are taken over
        the True values only, K_i being their count per feature (summed across `axis_name`,
        so devices may hold different numbers of them), and every value is normalized with
        them. In the gradient a masked-out value gets only the direct term (G/s) dZhat (see
        the docstring of `jstep.normalization.batchnorm`). A feature needs K_i >= 1: a mask known when traced (not a
        traced argument) is checked; for a traced one, K_i = 0 gives NaN for that feature's
        values and gradients. K_i = 1 gives sigma = 0 (a constant feature).
      virtual_batch_size: None, or V dividing the length N of the batch axis (the first axis
        of `x` that is not a feature axis): ghost batch norm. The batch axis is split into
        N/V consecutive groups of V examples (examples 0..V-1, V..2V-1, ...), and each group
        is normalized with its own mu and sigma^2, K being V times the other batch axes'
        sizes; the backward and forward mode are batch norm's, per group, and the gradients
        of the shared G and B sum over the groups. A group lies within one shard: under
        `axis_name` each device's (or example's) batch axis is split, and the statistics are
        not all-reduced (`axis_index_groups` is refused with it). As Hoffer et al. (2017) and
        TabNet's ghost batch norm; Keras's ``virtual_batch_size`` (tf.keras 2) reshapes the
        batch to (V, N/V), so its groups are strided (examples i, i + N/V, i + 2N/V, ...):
        pass ``x`` reordered by ``x.reshape(V, N // V, ...).swapaxes(0, 1)`` to match it.

    Returns:
      Zhat, with the shape and dtype of `x`.

    Example:
      With G = 1 and B = 0 each feature (column) comes out with mean 0 and variance
      sigma^2 / (sigma^2 + eps), just under 1:

      >>> import jax.numpy as jnp
      >>> import jstep
      >>> x = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 60.0], [6.0, 30.0]])
      >>> y = jstep.batch_norm(x, jnp.ones(2), jnp.zeros(2))
      >>> print(y.shape, jnp.allclose(y.mean(axis=0), 0, atol=1e-6), y.var(axis=0).round(4))
      (4, 2) True [1. 1.]
    """
    return _normalize_checked(
        x, scale, offset, feature_axis, eps, eps_in_sqrt, axis_name, mask, axis_index_groups, virtual_batch_size
    )[0]


def batch_stats(
    x: jax.Array,
    *,
    feature_axis: FeatureAxis = -1,
    axis_name: Any = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    virtual_batch_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(mu, sigma^2) of each feature: mu = (1/K) sum_j Z_j, sigma^2 = (1/K) sum_j (Z_j - mu)^2.

    Two passes over `x` (mean first, then the centred squares), in at least float32, shaped like
    the feature axes; under `axis_name` the sums are all-reduced so every device gets the
    statistics of the whole batch (with `axis_index_groups`, those of its group's batch). With
    `mask` (booleans broadcastable to `x`) the sums take the True values only, and K is their
    count per feature (see `batch_norm`). With `virtual_batch_size` V, the statistics of each
    virtual batch (N/V consecutive groups along the batch axis, see `batch_norm`), with the
    groups on a first axis of length N/V before the feature axes, this shard's groups only.

    Example:
      >>> import jax.numpy as jnp
      >>> import jstep
      >>> x = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 60.0], [6.0, 30.0]])
      >>> mean, var = jstep.batch_stats(x)  # per column; var = (1/K) sum (Z - mu)^2
      >>> print(mean, var)
      [ 3. 30.] [  3.5 350. ]
      >>> mean, var = jstep.batch_stats(x, virtual_batch_size=2)  # rows 0-1, then rows 2-3
      >>> print(mean.shape, mean[1], var[1])  # the second group's: rows 2 and 3
      (2, 2) [ 4.5 45. ] [  2.25 225.  ]
    """
    axis_name = _check_axis_name(axis_name)
    size = _check_virtual_batches(virtual_batch_size, axis_index_groups)
    if size is not None:
        _check_x(x)
        split = _virtual_batches(jnp.shape(x), feature_axis, size)
        _check_virtual_mask(mask, split)
        grouped = split.group(jnp.asarray(x))
        mean, var = batch_stats(grouped, feature_axis=split.feature_axis, mask=split.group_mask(mask))
        return split.groups_first(mean), split.groups_first(var)
    layout = _layout(x, feature_axis, axis_name, axis_index_groups)
    mask = _check_mask(mask, jnp.shape(x), layout, axis_name)
    centre, var, _ = _moments(jnp.asarray(x), layout, axis_name, mask)
    return centre.high.reshape(layout.feature_shape), var.reshape(layout.feature_shape)
