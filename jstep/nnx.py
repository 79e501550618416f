"""Batch normalization for Flax NNX: a drop-in for `flax.nnx.BatchNorm` with jstep's numbers.

``jstep.nnx.BatchNorm`` has `flax.nnx.BatchNorm`'s constructor, call and variables (`scale` and
`bias` as `nnx.Param`, `mean` and `var` as `nnx.BatchStat`), so a model switches by changing
the import and its weights and checkpoints load into either layer. What differs is inside:
the statistics are two-pass (no E[x^2] - E[x]^2), and the gradient is the notes' derivation
(`jstep.batch_norm`'s hand-derived derivatives, forward mode included) instead of autodiff
through the normalization.

Needs Flax: ``pip install "jstep[flax]"``. Not imported by ``import jstep``.
"""

from __future__ import annotations

import typing as tp
from types import MappingProxyType

import jax
import jax.numpy as jnp

from jstep import _core, _layers

try:
    from flax import nnx
    from flax.nnx.nn import dtypes, initializers
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    raise _layers.missing_framework("jstep.nnx", "Flax", "flax") from error

__all__ = ["BatchNorm", "BatchRenorm"]

_NO_MODE = (
    "No use_running_average was given to jstep.nnx.{layer}. Pass it to the constructor "
    "({layer}(..., use_running_average=False)), to the call (bn(x, use_running_average=True)), "
    "or set it with model.train() / model.eval() or nnx.view(model, use_running_average=...)."
)


class BatchNorm(nnx.Module):
    """Batch normalization as `flax.nnx.BatchNorm`, computed by `jstep.batch_norm`.

    Training (``use_running_average=False``, what ``model.train()`` sets): for each feature i,
    over the K values of the batch (every axis but `axis`; across devices under `axis_name`),

        Zhat_ij = G_i (Z_ij - mu_i) / sqrt(sigma_i^2 + eps) + B_i

    with G = `scale`, B = `bias`, eps = `epsilon`, and mu, sigma^2 the batch mean and
    population variance; the running statistics become ``mean <- momentum * mean +
    (1 - momentum) * mu`` (and the same for `var`), the notes' running average with
    gamma = `momentum`. Evaluation (``use_running_average=True``, ``model.eval()``) uses the
    running `mean` and `var` and leaves them unchanged.

    Args:
      num_features: the number of features (the size of `axis` in the input); a Python or
        NumPy int.
      use_running_average: the mode when the call does not give one; ``model.train()`` and
        ``model.eval()`` set it.
      axis: the feature axis of the input (-1 for NHWC or (batch, features)).
      momentum: the running statistics' gamma, in [0, 1] (1 keeps them as they are).
      epsilon: eps >= 0.
      dtype: the dtype of the computation and the result; None promotes the input with the
        variables, as Flax does (bfloat16 inputs with float32 variables give float32).
        Statistics are at least float32 either way.
      param_dtype: the dtype of `scale` and `bias` (the running statistics are float32).
      use_bias: whether B is learned (else B = 0).
      use_scale: whether G is learned (else G = 1).
      bias_init: the initializer of B.
      scale_init: the initializer of G.
      axis_name: the mapped axis (``shard_map``, ``pmap``, ``vmap``, ``nnx.shard_map``) over
        which the batch is split; the statistics and the gradient's sums are all-reduced over it.
        Under a sharded ``jit`` leave it None: XLA inserts the collectives.
      axis_index_groups: None, or groups of indices along `axis_name`, e.g.
        ``[[0, 1, 2, 3], [4, 5, 6, 7]]``: each group's devices normalize with their group's
        statistics and keep its running statistics, as in Flax. JAX's all-reduce takes groups
        under ``pmap`` and ``shard_map(..., check_vma=False)``; elsewhere (a vmap axis, a
        ``shard_map`` that checks types) the call raises NotImplementedError saying so.
      use_fast_variance: accepted and moot: jstep's variance is always the two-pass
        (1/K) sum (Z - mu)^2, never E[Z^2] - mu^2.
      promote_dtype: Flax's dtype promotion of ``(x, mean, var, scale, bias)``.
      rngs: the `nnx.Rngs` the initializers draw from.
      bias_metadata: metadata of the `bias` parameter (e.g. its sharding).
      scale_metadata: metadata of the `scale` parameter.
      eps_in_sqrt: jstep's own option; False gives the notes' ``(Z - mu) / (sigma + eps)``.
      virtual_batch_size: jstep's own option (ghost batch norm): None, or V dividing the batch
        axis (the first non-feature axis): each group of V consecutive examples is normalized
        with its own statistics, and the running statistics take the mean of the groups' (see
        `jstep.batch_norm` and `jstep.BatchNorm`; Keras's groups are strided, jstep's consecutive).

    Example:
      A training call on a batch whose columns have means [3, 30] and variances [3.5, 350]
      moves the running statistics from (0, 1) half way there (momentum 0.5):

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jstep.nnx import BatchNorm
      >>> bn = BatchNorm(2, momentum=0.5, rngs=nnx.Rngs(0))
      >>> x = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 60.0], [6.0, 30.0]])
      >>> y = bn(x)
      >>> print(y.shape, bn.mean[...], bn.var[...])
      (4, 2) [ 1.5 15. ] [  2.25 175.5 ]
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: tp.Any = None,
        param_dtype: tp.Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: tp.Callable = initializers.zeros_init(),
        scale_init: tp.Callable = initializers.ones_init(),
        axis_name: tp.Any = None,
        axis_index_groups: tp.Any = None,
        use_fast_variance: bool = True,
        promote_dtype: tp.Callable = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        eps_in_sqrt: bool = True,
        virtual_batch_size: int | None = None,
    ):
        settings = _layers.check_settings(
            num_features=num_features,
            use_running_average=use_running_average,
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=use_bias,
            use_scale=use_scale,
            bias_init=bias_init,
            scale_init=scale_init,
            axis_name=axis_name,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            bias_metadata=bias_metadata,
            scale_metadata=scale_metadata,
            eps_in_sqrt=eps_in_sqrt,
        )
        num_features = settings["num_features"]
        shape = (num_features,)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.scale = (
            nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata) if use_scale else nnx.data(None)
        )
        self.bias = (
            nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata) if use_bias else nnx.data(None)
        )
        self.num_features = num_features
        self.use_running_average = settings["use_running_average"]
        self.axis = settings["axis"]
        self.momentum = settings["momentum"]
        self.epsilon = settings["epsilon"]
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.eps_in_sqrt = eps_in_sqrt
        self.virtual_batch_size = virtual_batch_size
        self._core()  # checks the settings now

    def _core(self):
        """The `jstep.BatchNorm` that does the arithmetic, from the current settings."""
        return _layers.core_layer(
            momentum=self.momentum,
            epsilon=self.epsilon,
            eps_in_sqrt=self.eps_in_sqrt,
            feature_axis=self.axis,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            virtual_batch_size=self.virtual_batch_size,
        )

    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ) -> jax.Array:
        """Normalize `x`; in training also update `mean` and `var`.

        Args:
          x: the input, with `num_features` features on `axis`.
          use_running_average: overrides the layer's mode for this call.
          mask: booleans broadcastable to `x`: the statistics are taken over the True
            positions only; every position is normalized.
        """
        use_running_average = self.use_running_average if use_running_average is None else use_running_average
        if use_running_average is None:
            raise ValueError(_NO_MODE.format(layer="BatchNorm"))
        _layers.check_feature_count(x, self.axis, self.num_features, "num_features")
        layer = self._core()
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        x, mean, var, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
        )
        if use_running_average:
            return _layers.normalize(layer, x, scale, bias, mean, var, training=False)[0]
        y, self.mean[...], self.var[...] = _layers.normalize(
            layer, x, scale, bias, self.mean[...], self.var[...], training=True, mask=mask
        )
        return y

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view(model, use_running_average=...)``, as in Flax."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchRenorm(BatchNorm):
    """Batch renormalization for NNX, computed by `jstep.batch_renorm`: `BatchNorm`'s arguments,
    variables and train/eval switch (``model.train()``, ``model.eval()``, ``nnx.view``), plus
    `warmup_steps`, `r_max` and `d_max`, and a step count `steps`.

    Training (``use_running_average=False``): for the first `warmup_steps` calls batch norm,
    Zhat = G (Z - mu_B) / sqrt(sigma_B^2 + eps) + B; after them batch renormalization towards the
    running `mean` and `var`,

        r = clip(sqrt(sigma_B^2 + eps) / sqrt(var + eps), 1/r_max, r_max)
        d = clip((mu_B - mean) / sqrt(var + eps), -d_max, d_max)
        Zhat = G (r (Z - mu_B) + d sigma_B) / sqrt(sigma_B^2 + eps r^2) + B

    with r and d held constant in the gradient. Either way ``mean <- momentum * mean +
    (1 - momentum) * mu_B`` (the same for `var`) and `steps` grows by one (saturating).
    Evaluation (``use_running_average=True``) is batch norm's with the running statistics,
    Zhat = G (Z - mean) / sqrt(var + eps) + B. These are `jstep.linen.BatchRenorm`'s (and
    Stable-Baselines-JAX's) numbers, with NNX's defaults for the arguments NNX's BatchNorm has
    (epsilon 1e-5; Stable-Baselines-JAX's layer takes 1e-3).

    Every argument of `BatchNorm` (and ``flax.nnx.BatchNorm``) means the same here. The
    variables: `scale`, `bias` (`nnx.Param`), and `mean`, `var` (float32), `steps` (the
    training calls so far, int32) and the bounds `r_max`, `d_max` as `nnx.BatchStat`, as the
    Linen layer's ``batch_stats``. The bounds are read at every call, so a schedule (the paper
    raises r_max from 1 and d_max from 0 during training) sets them, ``layer.r_max[...] = r``,
    without a new trace under ``nnx.jit``, and checkpoints keep them.

    Args:
      warmup_steps: the training calls that run batch norm before renormalization starts (an
        integer >= 0; 100_000 as Stable-Baselines-JAX).
      r_max: the initial value of the `r_max` variable, r's bound, >= 1.
      d_max: the initial value of the `d_max` variable, d's bound, >= 0.

    Example:
      With no warm-up the first training call renormalizes towards the initial running
      statistics (0, 1), within r_max and d_max, and counts the step:

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jstep.nnx import BatchRenorm
      >>> layer = BatchRenorm(2, warmup_steps=0, momentum=0.5, rngs=nnx.Rngs(0))
      >>> x = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 60.0], [6.0, 30.0]])
      >>> y = layer(x)
      >>> print(layer.mean[...], layer.steps[...])
      [ 1.5 15. ] 1
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: tp.Any = None,
        param_dtype: tp.Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: tp.Callable = initializers.zeros_init(),
        scale_init: tp.Callable = initializers.ones_init(),
        axis_name: tp.Any = None,
        axis_index_groups: tp.Any = None,
        use_fast_variance: bool = True,
        promote_dtype: tp.Callable = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        warmup_steps: int = 100_000,
        r_max: float = 3.0,
        d_max: float = 5.0,
    ):
        settings = _layers.check_settings(warmup_steps=warmup_steps, r_max=r_max, d_max=d_max)
        super().__init__(
            num_features,
            use_running_average=use_running_average,
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=use_bias,
            use_scale=use_scale,
            bias_init=bias_init,
            scale_init=scale_init,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            rngs=rngs,
            bias_metadata=bias_metadata,
            scale_metadata=scale_metadata,
        )
        self.steps = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.warmup_steps = settings["warmup_steps"]
        # State, as the Linen layer's batch_stats: a schedule sets them without a new trace.
        self.r_max = nnx.BatchStat(jnp.asarray(settings["r_max"], _core.default_float()))
        self.d_max = nnx.BatchStat(jnp.asarray(settings["d_max"], _core.default_float()))

    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ) -> jax.Array:
        """Normalize `x`; in training also update `mean`, `var` and `steps`.

        Args:
          x: the input, with `num_features` features on `axis`.
          use_running_average: overrides the layer's mode for this call.
          mask: booleans broadcastable to `x`: the batch statistics are taken over the True
            positions only; every position is normalized.
        """
        use_running_average = self.use_running_average if use_running_average is None else use_running_average
        if use_running_average is None:
            raise ValueError(_NO_MODE.format(layer="BatchRenorm"))
        _layers.check_feature_count(x, self.axis, self.num_features, "num_features")
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        x, mean, var, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
        )
        if use_running_average:
            return _layers.evaluate(x, scale, bias, mean, var, epsilon=self.epsilon, feature_axis=self.axis)
        y, self.mean[...], self.var[...], self.steps[...] = _layers.renormalize(
            x,
            scale,
            bias,
            self.mean[...],
            self.var[...],
            self.steps[...],
            self.r_max[...],
            self.d_max[...],
            warmup_steps=self.warmup_steps,
            momentum=self.momentum,
            epsilon=self.epsilon,
            feature_axis=self.axis,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
        )
        return y
