"""Batch normalization for Flax Linen: a drop-in for `flax.linen.BatchNorm` with jstep's numbers.

``jstep.linen.BatchNorm`` has `flax.linen.BatchNorm`'s fields, call and collections (`params`
holds `scale` and `bias`, `batch_stats` holds `mean` and `var`), and initializes as Flax's
does, so a model switches by changing the import and its variables load into either layer.
What differs is inside: two-pass statistics, and the notes' derivation as the gradient
(`jstep.batch_norm`'s hand-derived derivatives, forward mode included) instead of autodiff
through the normalization.

Needs Flax: ``pip install "jstep[flax]"``. Not imported by ``import jstep``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jstep import _layers

try:
    import flax.linen as nn
    from flax.linen import dtypes, initializers
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    raise _layers.missing_framework("jstep.linen", "Flax", "flax") from error

__all__ = ["BatchNorm", "BatchRenorm"]


class BatchNorm(nn.Module):
    """Batch normalization as `flax.linen.BatchNorm`, computed by `jstep.batch_norm`.

    Training (``use_running_average=False``): for each feature i, over the K values of the
    batch (every axis but `axis`; across devices under `axis_name`),

        Zhat_ij = G_i (Z_ij - mu_i) / sqrt(sigma_i^2 + eps) + B_i

    with G = `scale`, B = `bias`, eps = `epsilon`, and mu, sigma^2 the batch mean and
    population variance. With ``batch_stats`` mutable the running statistics become
    ``mean <- momentum * mean + (1 - momentum) * mu`` (and the same for `var`), the notes'
    running average with gamma = `momentum`. As in Flax, ``init`` does not update them and
    ignores `axis_name` (the mapped axis need not exist then). ``use_running_average=True``
    normalizes with the running statistics.

    Attributes:
      use_running_average: the mode when the call does not give one.
      axis: the feature axis or axes of the input.
      momentum: the running statistics' gamma, in [0, 1] (1 keeps them as they are).
      epsilon: eps >= 0.
      dtype: the dtype of the result; None promotes the input with `scale` and `bias`, as Flax
        does. Statistics are at least float32 either way.
      param_dtype: the dtype of `scale` and `bias`.
      use_bias: whether B is learned (else B = 0).
      use_scale: whether G is learned (else G = 1).
      bias_init: the initializer of B.
      scale_init: the initializer of G.
      axis_name: the mapped axis (``shard_map``, ``pmap``, ``vmap``, ``nn.vmap``) over which the
        batch is split; the statistics and the gradient's sums are all-reduced over it. Under
        a sharded ``jit`` leave it None: XLA inserts the collectives.
      axis_index_groups: None, or groups of indices along `axis_name`, e.g.
        ``[[0, 1, 2, 3], [4, 5, 6, 7]]``: each group's devices normalize with their group's
        statistics and keep its running statistics, as in Flax. JAX's all-reduce takes groups
        under ``pmap`` and ``shard_map(..., check_vma=False)``; elsewhere (``nn.vmap``, a
        ``shard_map`` that checks types) the call raises NotImplementedError saying so.
      use_fast_variance: accepted and moot: jstep's variance is always the two-pass
        (1/K) sum (Z - mu)^2, never E[Z^2] - mu^2.
      force_float32_reductions: as in Flax, the dtype of the running statistics (float32, or
        `param_dtype` when False). jstep's reductions are at least float32 either way.
      eps_in_sqrt: jstep's own option; False gives the notes' ``(Z - mu) / (sigma + eps)``.
      virtual_batch_size: jstep's own option (ghost batch norm): None, or V dividing the batch
        axis (the first non-feature axis): each group of V consecutive examples is normalized
        with its own statistics, and the running statistics take the mean of the groups' (see
        `jstep.batch_norm` and `jstep.BatchNorm`; Keras's groups are strided, jstep's consecutive).
        ``init`` normalizes its batch as one group, so it takes a batch of any size.

    Example:
      Flax's variables; a training call with ``batch_stats`` mutable moves the running
      statistics from (0, 1) half way to the batch's mean [3, 30] and variance [3.5, 350]:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> from jstep.linen import BatchNorm
      >>> bn = BatchNorm(use_running_average=False, momentum=0.5)
      >>> x = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 60.0], [6.0, 30.0]])
      >>> variables = bn.init(jax.random.key(0), x)
      >>> print(jax.tree.map(jnp.shape, variables))
      {'batch_stats': {'mean': (2,), 'var': (2,)}, 'params': {'bias': (2,), 'scale': (2,)}}
      >>> y, updated = bn.apply(variables, x, mutable=["batch_stats"])
      >>> print(y.shape, updated["batch_stats"]["mean"], updated["batch_stats"]["var"])
      (4, 2) [ 1.5 15. ] [  2.25 175.5 ]
    """

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable = initializers.zeros
    scale_init: Callable = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    eps_in_sqrt: bool = True
    virtual_batch_size: int | None = None

    def __post_init__(self):
        # Checks every setting when the module is built (a wrong type fails here, naming it).
        _layers.check_settings(
            use_running_average=self.use_running_average,
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            use_bias=self.use_bias,
            use_scale=self.use_scale,
            bias_init=self.bias_init,
            scale_init=self.scale_init,
            axis_name=self.axis_name,
            use_fast_variance=self.use_fast_variance,
            force_float32_reductions=self.force_float32_reductions,
            eps_in_sqrt=self.eps_in_sqrt,
        )
        self._core(mapped=True)
        super().__post_init__()

    def _core(self, *, mapped: bool):
        """The `jstep.BatchNorm` doing the arithmetic; unmapped (in ``init``) over this device's batch."""
        return _layers.core_layer(
            momentum=self.momentum,
            epsilon=self.epsilon,
            eps_in_sqrt=self.eps_in_sqrt,
            feature_axis=self.axis,
            axis_name=self.axis_name if mapped else None,
            axis_index_groups=self.axis_index_groups if mapped else None,
            virtual_batch_size=self.virtual_batch_size if mapped else None,  # init: any batch
        )

    @nn.compact
    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ) -> jax.Array:
        """Normalize `x`; when training outside ``init``, also update ``batch_stats``.

        Args:
          x: the input.
          use_running_average: the mode; merged with the attribute as Flax does (give it in
            one place only).
          mask: booleans broadcastable to `x`: the statistics are taken over the True
            positions only; every position is normalized.
        """
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        shape = _layers.feature_shape(x, self.axis)
        stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), shape)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), shape)
        scale = self.param("scale", self.scale_init, shape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, shape, self.param_dtype) if self.use_bias else None

        # Flax's result dtype; the arithmetic runs in at least the input's precision.
        dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        x = jnp.asarray(x, jnp.promote_types(jnp.result_type(x), dtype))
        initializing = self.is_initializing()
        layer = self._core(mapped=not initializing)
        y, mean, var = _layers.normalize(
            layer, x, scale, bias, ra_mean.value, ra_var.value, training=not use_running_average, mask=mask
        )
        if not use_running_average and not initializing:
            ra_mean.value, ra_var.value = mean, var
        return y.astype(dtype)


class BatchRenorm(nn.Module):
    """Batch renormalization as Stable-Baselines-JAX's ``BatchRenorm``, computed by `jstep.batch_renorm`.

    A drop-in for ``sbx.common.jax_layers.BatchRenorm`` (sbx-rl 0.28, the layer CrossQ uses):
    the same fields and defaults, the same call, the same variables (``params``: `scale`,
    `bias`; ``batch_stats``: `mean`, `var`, `r_max`, `d_max`, `steps`), so its checkpoints load,
    and its numbers. Training (``use_running_average=False``) outside ``init``: for the first
    `warmup_steps` calls batch norm, Zhat = G (Z - mu_B) / sqrt(sigma_B^2 + eps) + B; after them
    batch renormalization towards the running statistics (mean, var),

        r = clip(sqrt(sigma_B^2 + eps) / sqrt(var + eps), 1/r_max, r_max)
        d = clip((mu_B - mean) / sqrt(var + eps), -d_max, d_max)
        Zhat = G (r (Z - mu_B) + d sigma_B) / sqrt(sigma_B^2 + eps r^2) + B

    with r and d held constant in the gradient (`jstep.batch_renorm`'s hand-derived one).
    Either way, with ``batch_stats`` mutable, ``mean <- momentum * mean + (1 - momentum) * mu_B``
    (the same for `var`) and ``steps <- steps + 1`` (saturating instead of wrapping around). As
    in Stable-Baselines-JAX, ``init`` normalizes with the batch statistics, updates nothing and
    ignores `axis_name`; ``use_running_average=True`` gives Zhat = G (Z - mean) / sqrt(var + eps) + B.
    The bounds are read from the `r_max` and `d_max` variables at every call, so a checkpoint's
    values, or a schedule written into them, apply without recompiling.

    What differs is inside: two-pass batch statistics (Stable-Baselines-JAX takes
    E[Z^2] - E[Z]^2), and the hand-derived gradient instead of autodiff through the layer.

    Attributes:
      use_running_average: the mode when the call does not give one.
      axis: the feature axis or axes of the input.
      momentum: the running statistics' gamma, in [0, 1] (1 keeps them as they are).
      epsilon: eps >= 0.
      warmup_steps: the training calls that run batch norm before renormalization starts.
      dtype: the dtype of the result; None promotes the input with `scale` and `bias`, as Flax
        does. Statistics are at least float32 either way.
      param_dtype: the dtype of `scale` and `bias`.
      use_bias: whether B is learned (else B = 0).
      use_scale: whether G is learned (else G = 1).
      bias_init: the initializer of B.
      scale_init: the initializer of G.
      axis_name: the mapped axis over which the batch is split, as in `BatchNorm`.
      axis_index_groups: None, or groups of indices along `axis_name`, as in `BatchNorm`.
      r_max: jstep's own: the initial value of the `r_max` variable, >= 1 (3, as Stable-Baselines-JAX).
      d_max: jstep's own: the initial value of the `d_max` variable, >= 0 (5, as Stable-Baselines-JAX).

    Example:
      Stable-Baselines-JAX's variables; with no warm-up the first training call already
      renormalizes towards the initial running statistics (0, 1), within r_max and d_max:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> from jstep.linen import BatchRenorm
      >>> layer = BatchRenorm(use_running_average=False, warmup_steps=0, momentum=0.5)
      >>> x = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 60.0], [6.0, 30.0]])
      >>> variables = layer.init(jax.random.key(0), x)
      >>> print(sorted(variables["params"]), sorted(variables["batch_stats"]))
      ['bias', 'scale'] ['d_max', 'mean', 'r_max', 'steps', 'var']
      >>> y, updated = layer.apply(variables, x, mutable=["batch_stats"])
      >>> print(updated["batch_stats"]["mean"], updated["batch_stats"]["steps"])
      [ 1.5 15. ] 1
    """

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 0.001
    warmup_steps: int = 100_000
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable = initializers.zeros
    scale_init: Callable = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    r_max: float = 3
    d_max: float = 5

    def __post_init__(self):
        # Checks every setting when the module is built (a wrong type fails here, naming it).
        _layers.check_settings(
            use_running_average=self.use_running_average,
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            warmup_steps=self.warmup_steps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            use_bias=self.use_bias,
            use_scale=self.use_scale,
            bias_init=self.bias_init,
            scale_init=self.scale_init,
            axis_name=self.axis_name,
            r_max=self.r_max,
            d_max=self.d_max,
        )
        _layers.core_layer(  # the checks of momentum, axis_name and axis_index_groups together
            momentum=self.momentum,
            epsilon=self.epsilon,
            eps_in_sqrt=True,
            feature_axis=self.axis,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
        )
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ) -> jax.Array:
        """Normalize `x`; when training outside ``init``, also update ``batch_stats``.

        Args:
          x: the input.
          use_running_average: the mode; merged with the attribute as Flax does (give it in
            one place only).
          mask: jstep's own: booleans broadcastable to `x`; the batch statistics are taken over
            the True positions only (as in `BatchNorm`); every position is normalized.
        """
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        shape = _layers.feature_shape(x, self.axis)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), shape)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), shape)
        r_max = self.variable("batch_stats", "r_max", lambda: self.r_max)
        d_max = self.variable("batch_stats", "d_max", lambda: self.d_max)
        steps: nn.Variable[Any] = self.variable("batch_stats", "steps", lambda: 0)
        scale = self.param("scale", self.scale_init, shape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, shape, self.param_dtype) if self.use_bias else None

        # Flax's result dtype; the arithmetic runs in at least the input's precision.
        dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        x = jnp.asarray(x, jnp.promote_types(jnp.result_type(x), dtype))
        if use_running_average:
            y = _layers.evaluate(
                x, scale, bias, ra_mean.value, ra_var.value, epsilon=self.epsilon, feature_axis=self.axis
            )
            return y.astype(dtype)
        initializing = self.is_initializing()
        y, mean, var, count = _layers.renormalize(
            x,
            scale,
            bias,
            ra_mean.value,
            ra_var.value,
            steps.value,
            # init: batch norm (r_max = 1, d_max = 0) over this device's batch, as Stable-Baselines-JAX's
            1 if initializing else r_max.value,
            0 if initializing else d_max.value,
            warmup_steps=self.warmup_steps,
            momentum=self.momentum,
            epsilon=self.epsilon,
            feature_axis=self.axis,
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            mask=mask,
        )
        if not initializing:
            ra_mean.value, ra_var.value, steps.value = mean, var, count
        return y.astype(dtype)
