"""The core batch-norm layer: a pure ``init``/``apply`` pair with the running statistics."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jstep import _core
from jstep.averages import running_average_update
from jstep.normalization.batchnorm import _normalize_checked
from jstep.normalization.checks import (
    FeatureAxis,
    _check_axis_index_groups,
    _check_axis_name,
    _check_eps,
    _check_features,
    _check_x,
    _feature_axes,
)
from jstep.normalization.collectives import _all_reduce, _pooled_shards
from jstep.normalization.statistics import _denominator, _safe_inverse
from jstep.normalization.virtual import _check_virtual_batches


class BatchNormParams(NamedTuple):
    """The learned weights: G (`scale`, starts at 1) and B (`offset`, starts at 0)."""

    scale: jax.Array
    offset: jax.Array


class BatchNormState(NamedTuple):
    """The running statistics used at evaluation: `mean` starts at 0, `var` at 1."""

    mean: jax.Array
    var: jax.Array


@dataclasses.dataclass(frozen=True)
class BatchNorm:
    """A batch-norm layer as a pure pair: ``params, state = bn.init(x)``;
    ``y, state = bn.apply(params, state, x, training=True)``.

    Training normalizes with the batch statistics (`batch_norm`, whose forward pass also returns
    mu and sigma^2, so they are computed once) and updates the running statistics with the
    notes' running average, C_t = momentum C_{t-1} + (1 - momentum) c_t
    (`running_average_update`); the running variance is the population variance, as in the
    notes and Flax (PyTorch keeps K/(K-1) times it). Evaluation (``training=False``) uses the
    running statistics and leaves the state unchanged.

    Args:
      momentum: the running average's gamma, in [0, 1] (1 keeps the running statistics as they are).
      eps, eps_in_sqrt, feature_axis, axis_name, axis_index_groups: as in `batch_norm` (with
        groups, each group's devices keep the running statistics of their group's batches).
      virtual_batch_size: None, or V: ghost batch norm, as in `batch_norm` (each group of V
        consecutive examples normalized with its own statistics). The running statistics
        take, once per step, the mean of the groups' means and the mean of their variances
        (over every shard's groups under `axis_name`, so all devices keep the same), as
        Keras's ``virtual_batch_size`` does; the mean of the variances leaves out the spread
        of the groups' means, so it is the variance a group of V sees, the one the layer
        normalizes with in training.

    Example:
      One training step moves the running statistics from (0, 1) towards the batch's
      (mu, sigma^2) = ([3, 30], [3.5, 350]); momentum 0.5 takes them half way:

      >>> import jax.numpy as jnp
      >>> import jstep
      >>> x = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 60.0], [6.0, 30.0]])
      >>> bn = jstep.BatchNorm(momentum=0.5)
      >>> params, state = bn.init(x)
      >>> y, state = bn.apply(params, state, x, training=True)
      >>> print(state.mean, state.var)
      [ 1.5 15. ] [  2.25 175.5 ]
      >>> y_eval, same_state = bn.apply(params, state, x, training=False)  # uses the running ones
      >>> print(y_eval.shape, same_state is state)
      (4, 2) True
    """

    momentum: Any = 0.9
    eps: float = 1e-5
    eps_in_sqrt: bool = True
    feature_axis: FeatureAxis = -1
    axis_name: Any = None
    axis_index_groups: Any = None
    virtual_batch_size: int | None = None

    def __post_init__(self):
        _core.check_running_momentum("momentum", self.momentum)
        _check_eps(self.eps)
        object.__setattr__(self, "axis_name", _check_axis_name(self.axis_name))  # a list becomes a tuple
        _check_axis_index_groups(self.axis_index_groups, self.axis_name)
        _check_virtual_batches(self.virtual_batch_size, self.axis_index_groups)

    def init(self, x: jax.Array) -> tuple[BatchNormParams, BatchNormState]:
        """Weights and running statistics for inputs shaped like `x` (float32 for low precision)."""
        _check_x(x)
        features = _feature_axes(jnp.ndim(x), self.feature_axis)
        shape = tuple(jnp.shape(x)[a] for a in features)
        dtype = _core.compute_dtype(jnp.result_type(x))
        zeros, ones = jnp.zeros(shape, dtype), jnp.ones(shape, dtype)
        return BatchNormParams(ones, zeros), BatchNormState(zeros, ones)

    def apply(
        self,
        params: BatchNormParams,
        state: BatchNormState,
        x: jax.Array,
        *,
        training: bool = True,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, BatchNormState]:
        """(Zhat, new state). `training` is a Python bool (it selects the computation).

        `mask` (booleans broadcastable to `x`) selects the values whose batch statistics are
        used and averaged into the running ones, as in `batch_norm`; evaluation ignores it, as
        Flax does (the running statistics are used for every value).
        """
        if training:
            y, mean, var = _normalize_checked(
                x,
                params.scale,
                params.offset,
                self.feature_axis,
                self.eps,
                self.eps_in_sqrt,
                self.axis_name,
                mask,
                self.axis_index_groups,
                self.virtual_batch_size,
            )
            if self.virtual_batch_size is not None:  # the groups' mean, over every shard's groups
                mean, var = _mean_over_shards((jnp.mean(mean, axis=0), jnp.mean(var, axis=0)), self.axis_name)
            batch = BatchNormState(jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var))
            return y, running_average_update(state, batch, self.momentum)
        return self._evaluate(params, state, x), state

    def _evaluate(self, params, state, x):
        """Zhat = G (Z - mu_run) / s(sigma_run^2) + B, plain jnp (autodiff is exact here)."""
        _check_x(x)
        features = _feature_axes(jnp.ndim(x), self.feature_axis)
        keep_shape = tuple(n if a in features else 1 for a, n in enumerate(jnp.shape(x)))
        feature_shape = tuple(jnp.shape(x)[a] for a in features)
        named = {"scale": params.scale, "offset": params.offset, "state.mean": state.mean, "state.var": state.var}
        for name, value in named.items():
            _check_features(name, value, feature_shape, jnp.shape(x), features)
        dtype = _core.compute_dtype(jnp.result_type(x))

        def per_feature(v):
            return v.reshape(keep_shape).astype(dtype)

        _, s = _denominator(per_feature(state.var), _check_eps(self.eps), self.eps_in_sqrt)
        gain = per_feature(params.scale) * _safe_inverse(s)
        y = (x.astype(dtype) - per_feature(state.mean)) * gain + per_feature(params.offset)
        return y.astype(x.dtype)


def _mean_over_shards(value: Any, axis_name: Any) -> Any:
    """The mean of `value` (a pytree) over the shards along `axis_name` (itself without one)."""
    if axis_name is None:
        return value
    shards = _pooled_shards(axis_name, None)
    return jax.tree.map(lambda total: total / shards, _all_reduce(value, axis_name))
