"""Batch normalization for Equinox: the equivalent of ``equinox.nn.BatchNorm(mode="batch")``.

``jstep.equinox.BatchNorm`` has Equinox's constructor, call, fields (`weight`, `bias`) and
state (an `eqx.nn.StateIndex` for the step count and one for the running statistics, in
`eqx.nn.State`), so a model switches by changing the import and its leaves and state load into
either layer. As in Equinox it normalizes one example of shape ``(input_size, ...)`` and
takes the batch statistics across ``jax.vmap(..., axis_name=...)`` (or ``pmap``, or a
``shard_map`` axis, or a tuple of names). What differs is inside: the gradient is the notes'
derivation (`jstep.batch_norm`'s custom VJP) instead of autodiff through the normalization.

Needs Equinox: ``pip install "jstep[equinox]"``. Not imported by ``import jstep``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jstep import _layers

try:
    import equinox as eqx
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    raise _layers.missing_framework("jstep.equinox", "Equinox", "equinox") from error

__all__ = ["BatchNorm"]


class BatchNorm(eqx.nn.StatefulLayer):
    """Batch normalization as ``equinox.nn.BatchNorm(mode="batch")``, computed by `jstep.batch_norm`.

    Called on one example ``x`` of shape ``(input_size, dim_1, ..., dim_N)`` inside a map with
    `axis_name`. Training: for each channel i, over the K values of the whole batch (the
    example's positions and every example along `axis_name`),

        Zhat_ij = G_i (Z_ij - mu_i) / sqrt(sigma_i^2 + eps) + B_i

    with G = `weight`, B = `bias` (1 and 0 without `channelwise_affine`); the state's hidden
    statistics become ``h <- momentum * h + (1 - momentum) * (mu, sigma^2)`` (the notes' running
    average with gamma = `momentum`, from h_0 = (0, 1)) and its step count t grows by one.
    Inference uses Equinox's debiased statistics ``h / (1 - momentum^t)`` (h itself at t = 0).

    Args:
      input_size: the number of channels (the first axis of each example).
      axis_name: the name of the mapped batch axis, or a sequence of names.
      eps: eps >= 0.
      channelwise_affine: whether `weight` and `bias` are learned.
      momentum: the running statistics' gamma, in [0, 1).
      inference: the mode when the call does not give one; `eqx.nn.inference_mode` sets it.
      dtype: the dtype of `weight`, `bias` and the running statistics (float32, or float64
        under ``jax_enable_x64``, by default).
      mode: only "batch" (Equinox's "ema" mode is not provided).
      eps_in_sqrt: jstep's own option; False gives the notes' ``(Z - mu) / (sigma + eps)``.

    Example:
      Each call sees one example; ``jax.vmap`` names the batch axis the statistics are taken
      over. One training call moves the hidden statistics half way (momentum 0.5) from (0, 1)
      to the batch's mean [3, 30] and variance [3.5, 350]:

      >>> import equinox as eqx
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from jstep.equinox import BatchNorm
      >>> bn, state = eqx.nn.make_with_state(BatchNorm)(2, axis_name="batch", momentum=0.5)
      >>> x = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 60.0], [6.0, 30.0]])
      >>> train = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> y, state = train(x, state)
      >>> mean, var = state.get(bn.batch_state_index)
      >>> print(y.shape, mean, var)
      (4, 2) [ 1.5 15. ] [  2.25 175.5 ]
    """

    weight: jax.Array | None
    bias: jax.Array | None
    ema_first_time_index: None
    ema_state_index: None
    batch_counter: eqx.nn.StateIndex
    batch_state_index: eqx.nn.StateIndex
    axis_name: Hashable | Sequence[Hashable]
    inference: bool
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    mode: str = eqx.field(static=True)
    eps_in_sqrt: bool = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        dtype: Any = None,
        mode: str = "batch",
        *,
        eps_in_sqrt: bool = True,
    ):
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
            raise ValueError(f"input_size must be a positive int, got {input_size!r}")
        if mode != "batch":
            raise ValueError(
                f"mode={mode!r}: jstep.equinox.BatchNorm implements Equinox's mode='batch' only "
                "(batch statistics in training, running averages at inference)"
            )
        if axis_name is None:
            raise ValueError(
                "axis_name is None: give the name of the mapped batch axis, as in jax.vmap(..., axis_name=...)"
            )
        dtype = jnp.result_type(float) if dtype is None else dtype
        self.weight = jnp.ones((input_size,), dtype) if channelwise_affine else None
        self.bias = jnp.zeros((input_size,), dtype) if channelwise_affine else None
        self.ema_first_time_index = None
        self.ema_state_index = None
        self.batch_counter = eqx.nn.StateIndex(jnp.array(0))
        self.batch_state_index = eqx.nn.StateIndex((jnp.zeros((input_size,), dtype), jnp.ones((input_size,), dtype)))
        self.axis_name = axis_name
        self.inference = inference
        self.input_size = input_size
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum
        self.mode = mode
        self.eps_in_sqrt = eps_in_sqrt
        self._core()  # checks the settings now

    def _core(self):
        """The `jstep.BatchNorm` that does the arithmetic: channels on axis 0 of each example."""
        return _layers.core_layer(
            momentum=self.momentum,
            epsilon=self.eps,
            eps_in_sqrt=self.eps_in_sqrt,
            feature_axis=0,
            axis_name=self.axis_name,
            axis_index_groups=None,
        )

    def __call__(
        self, x: jax.Array, state: eqx.nn.State, *, key: Any = None, inference: bool | None = None
    ) -> tuple[jax.Array, eqx.nn.State]:
        """(the normalized example, the new state); `key` is ignored, as in Equinox.

        Args:
          x: one example, shape ``(input_size, dim_1, ..., dim_N)``.
          state: the `eqx.nn.State` holding this layer's statistics.
          inference: overrides the layer's mode for this call.
        """
        del key
        inference = self.inference if inference is None else inference
        _layers.check_feature_count(x, 0, self.input_size, "input_size")
        layer = self._core()
        count = state.get(self.batch_counter)
        mean, var = state.get(self.batch_state_index)
        # Equinox's result dtype: the input promoted with the statistics and weights.
        x = jnp.asarray(x, jnp.result_type(x, mean, *([] if self.weight is None else [self.weight])))
        if inference:
            debias = jnp.where(count == 0, 1, 1 - self.momentum**count).astype(mean.dtype)
            y, _, _ = _layers.normalize(layer, x, self.weight, self.bias, mean / debias, var / debias, training=False)
            return y, state
        y, mean, var = _layers.normalize(
            layer, x, self.weight, self.bias, mean, var, training=True, evaluation="inference=True"
        )
        state = state.set(self.batch_counter, count + 1)
        return y, state.set(self.batch_state_index, (mean, var))
