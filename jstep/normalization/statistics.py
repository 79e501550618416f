"""The batch statistics every normalization takes: two-pass moments about a value of the batch,
summed across mapped axes, and the denominator s with its safe inverse."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jstep import _core
from jstep.normalization.collectives import _all_reduce
from jstep.normalization.layout import _Layout


def _total(values: jax.Array, layout: _Layout, axis_name: Any) -> jax.Array:
    """sum over the batch axes (keeping them as size 1), all-reduced across `axis_name`."""
    local = jnp.sum(values, axis=layout.reduce_axes, keepdims=True)
    return local if axis_name is None else _all_reduce(local, axis_name, layout.groups)


def _masked(values: Any, mask: Any) -> Any:
    """m values: `values` where `mask` is True, 0 elsewhere (just `values` without a mask)."""
    return values if mask is None else jnp.where(mask, values, 0)


class _Centre(NamedTuple):
    """mu_i as the unevaluated sum `high` + `low`: `high` = fl(mu_i), `low` what rounding left off.

    Z - mu is computed as (Z - high) - low. Where |mu| >> sigma, Z - high is exact (the two are
    within a factor 2 of each other), so the centred values keep their relative precision,
    where Z - fl(mu) alone would lose a factor |mu|/sigma to fl(mu)'s rounding.
    """

    high: jax.Array
    low: jax.Array

    @classmethod
    def about(cls, shift: jax.Array, offset: jax.Array) -> _Centre:
        """mu = shift + offset, split exactly (Knuth's TwoSum)."""
        high = shift + offset
        back = high - shift
        return cls(high, (shift - (high - back)) + (offset - back))

    def of(self, values: jax.Array) -> jax.Array:
        """Z - mu, as (Z - high) - low."""
        return (values - self.high) - self.low


def _shift(xc: jax.Array, layout: _Layout, axis_name: Any) -> jax.Array:
    """c: per feature, the first value on this device, averaged over the shards pooled (so that
    every shard has the same c; keepdims). Summed about c, x - c is exact where |mu| >> sigma.
    Any c gives the same mu; one near the values (not, say, a masked-out padding value) keeps
    the precision.

    Where `x` is split over its batch axes by explicit mesh axes (a sharded ``jit`` on a mesh of
    ``AxisType.Explicit``), JAX cannot take one value of it, and c = 0: mu is then fl(mu) alone.
    """
    spec = tuple(getattr(jax.typeof(xc).sharding, "spec", None) or ())
    if any(a < len(spec) and spec[a] is not None for a in layout.reduce_axes):
        return jnp.zeros(layout.keep_shape, xc.dtype)
    first = xc[tuple(slice(0, 1) if a in layout.reduce_axes else slice(None) for a in range(xc.ndim))]
    return first if axis_name is None else _all_reduce(first, axis_name, layout.groups) / layout.shards


def _moments(x: jax.Array, layout: _Layout, axis_name: Any, mask: Any = None) -> tuple[_Centre, jax.Array, Any]:
    """mu (as a `_Centre`), sigma^2 (keepdims) and K: two reads of x, in at least float32.

    The first pass sums x - c, the second (x - mu)^2: no E[x^2] - E[x]^2 cancellation, and with
    the shift c (a value of the batch, see `_shift`) no loss when |mu| >> sigma either. The
    subtractions are fused into the reductions, so x - c and x - mu are never written out. The
    optimization barriers give each reduction its own copy of c and mu: were their broadcasts
    shared with the caller's elementwise uses of them (Zhat, the input gradient), XLA:CPU would
    materialise x - mu as an activation-sized array and read it back.
    With a `mask`, both sums take the masked-in values only and K is their count per feature
    (an int32 sum, all-reduced too, then in the compute dtype); without one K is a number.
    """
    xc = x.astype(_core.compute_dtype(x.dtype))
    count: Any = layout.size
    if mask is not None:
        in_batch = jnp.broadcast_to(mask, x.shape).astype(jnp.int32)
        count = _total(in_batch, layout, axis_name).astype(xc.dtype)
    shift = _shift(xc, layout, axis_name)
    centre = _Centre.about(shift, _total(_masked(xc - shift, mask), layout, axis_name) / count)
    own = jax.lax.optimization_barrier(centre)  # the same values; see above
    var = _total(_masked(jnp.square(own.of(xc)), mask), layout, axis_name) / count
    return centre, var, count


def _safe_inverse(s: jax.Array) -> jax.Array:
    """1/s, and 0 where s = 0 (with a gradient that stays finite there)."""
    positive = s > 0
    return jnp.where(positive, 1 / jnp.where(positive, s, 1), 0)


def _denominator(var: jax.Array, eps: float, eps_in_sqrt: bool) -> tuple[Any, jax.Array]:
    """(sigma, s): s = sqrt(sigma^2 + eps) or the notes' s = sigma + eps."""
    if eps_in_sqrt:
        return None, jnp.sqrt(var + eps)
    sigma = jnp.sqrt(var)
    return sigma, sigma + eps
