"""Batch normalization for Equinox: a drop-in for ``equinox.nn.BatchNorm`` with jstep's numbers.

``jstep.equinox.BatchNorm`` is a subclass of ``eqx.nn.BatchNorm``, so code that looks for
Equinox's layer (``isinstance(layer, eqx.nn.BatchNorm)``, as Equinox's examples do to thread
the state) finds it. It has Equinox's constructor and defaults (``mode="legacy"``, which runs
``"ema"``), call, fields (`weight`, `bias`, the same `eqx.nn.StateIndex` fields per mode) and
state, so a model switches by changing the import, and its leaves and state load into either
layer. As in Equinox it normalizes one example of shape ``(input_size, ...)`` and takes the
batch statistics across ``jax.vmap(..., axis_name=...)`` (or ``pmap``, or a ``shard_map``
axis, or a tuple of names). The numbers are Equinox's, to float32 rounding, in both modes;
what differs is inside: two-pass statistics in at least float32, and in ``mode="batch"`` the
notes' derivation as the gradient (`jstep.batch_norm`'s hand-derived derivatives, forward
mode included).

Needs Equinox: ``pip install "jstep[equinox]"``. Not imported by ``import jstep``.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jstep import _core, _layers
from jstep.normalization.virtual import _check_virtual_batch_size

try:
    import equinox as eqx
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    raise _layers.missing_framework("jstep.equinox", "Equinox", "equinox") from error

__all__ = ["BatchNorm", "BatchRenorm"]

MODES = ("ema", "batch", "legacy")

_LEGACY = (
    "jstep.equinox.BatchNorm(..., mode=...) was left unspecified, so it runs mode='ema', as "
    "eqx.nn.BatchNorm does by default (for backward compatibility; Equinox recommends 'batch' "
    "for new code, see https://github.com/patrick-kidger/equinox/issues/659). Pass mode='ema' "
    "or mode='batch' to choose, and to silence this warning."
)


class BatchNorm(eqx.nn.BatchNorm):
    """Batch normalization as ``equinox.nn.BatchNorm``, computed by jstep's batch-norm core.

    Called on one example ``x`` of shape ``(input_size, dim_1, ..., dim_N)`` inside a map with
    `axis_name`. For each channel i, mu_i and sigma_i^2 are the mean and population variance
    over the K values of the whole batch (the example's positions and every example along
    `axis_name`), G = `weight`, B = `bias` (1 and 0 without `channelwise_affine`), and

        Zhat_ij = G_i (Z_ij - m_i) / sqrt(v_i + eps) + B_i

    with (m, v) by `mode`, as in Equinox:

    * ``"batch"``: training uses (m, v) = (mu, sigma^2); the state's hidden statistics become
      ``h <- momentum * h + (1 - momentum) * (mu, sigma^2)`` (the notes' running average with
      gamma = `momentum`, from h_0 = (0, 1)) and its step count t grows by one. Inference
      uses Equinox's debiased ``h / (1 - momentum^t)`` (h itself at t = 0). The gradient is
      the notes' derivation (`jstep.batch_norm`).
    * ``"ema"``: training first averages the batch's statistics into the running ones,
      ``C <- momentum * C + (1 - momentum) * (mu, sigma^2)`` (C = (mu, sigma^2) on the first
      training call), then normalizes with (m, v) = C; inference uses C as it is (zeros before
      any training call, as Equinox's). The gradient is autodiff through that formula, as
      Equinox's: the batch's statistics enter with weight (1 - momentum).
    * ``"legacy"`` (the default, as Equinox's): runs ``"ema"`` and warns that the mode was left
      unspecified, as Equinox does; the layer's `mode` field is then ``"ema"``.

    Args:
      input_size: the number of channels (the first axis of each example); a Python or NumPy int.
      axis_name: the name of the mapped batch axis, or a sequence of names.
      eps: eps >= 0.
      channelwise_affine: whether `weight` and `bias` are learned.
      momentum: the running statistics' gamma, in [0, 1] (1 keeps them as they are).
      inference: the mode when the call does not give one; `eqx.nn.inference_mode` sets it.
      dtype: the dtype of `weight`, `bias` and the running statistics (float32, or float64
        under ``jax_enable_x64``, by default).
      mode: ``"batch"``, ``"ema"`` or ``"legacy"`` (see above).
      eps_in_sqrt: jstep's own option; False gives the notes' ``(Z - m) / (sqrt(v) + eps)``.
      virtual_batch_size: jstep's own option (ghost batch norm), ``mode="batch"`` only: None, or
        V, a positive int dividing the N examples mapped along `axis_name`. Example n
        (``jax.lax.axis_index(axis_name)``) is in group n // V, and each group of V consecutive
        examples is normalized with its own mu and sigma^2 (and its own hand-derived gradient);
        the hidden statistics take the mean of the groups' (mu, sigma^2) once per call. Inference
        is unchanged. Each example carries one row per group, so a call costs N/V times the work
        of a plain one.

    Every setting is checked when the layer is built (a TypeError or ValueError naming it).

    Example:
      Each call sees one example; ``jax.vmap`` names the batch axis the statistics are taken
      over. With ``mode="batch"`` one training call moves the hidden statistics half way
      (momentum 0.5) from (0, 1) to the batch's mean [3, 30] and variance [3.5, 350]:

      >>> import equinox as eqx
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from jstep.equinox import BatchNorm
      >>> bn, state = eqx.nn.make_with_state(BatchNorm)(2, axis_name="batch", momentum=0.5, mode="batch")
      >>> isinstance(bn, eqx.nn.BatchNorm)
      True
      >>> x = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 60.0], [6.0, 30.0]])
      >>> train = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> y, state = train(x, state)
      >>> mean, var = state.get(bn.batch_state_index)
      >>> print(y.shape, mean, var)
      (4, 2) [ 1.5 15. ] [  2.25 175.5 ]

      With ``mode="ema"`` the first training call sets the running statistics to the batch's,
      and the next averages the new batch's in:

      >>> bn, state = eqx.nn.make_with_state(BatchNorm)(2, axis_name="batch", momentum=0.5, mode="ema")
      >>> train = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> _, state = train(x, state)
      >>> _, state = train(2 * x, state)  # batch mean [6, 60], variance [14, 1400]
      >>> print(*state.get(bn.ema_state_index))
      [ 4.5 45. ] [  8.75 875.  ]

      With ``virtual_batch_size=2`` (``mode="batch"``) examples 0, 1 and examples 2, 3 are two
      batches, with means [1.5, 15] and [4.5, 45]; the hidden mean moves half way to their mean:

      >>> bn, state = eqx.nn.make_with_state(BatchNorm)(2, "batch", momentum=0.5, mode="batch", virtual_batch_size=2)
      >>> train = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> y, state = train(x, state)
      >>> print(y[:, 0].round(3), state.get(bn.batch_state_index)[0])
      [-1.  1. -1.  1.] [ 1.5 15. ]
    """

    eps_in_sqrt: bool = eqx.field(static=True)
    virtual_batch_size: int | None = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        dtype: Any = None,
        mode: str = "legacy",
        *,
        eps_in_sqrt: bool = True,
        virtual_batch_size: int | None = None,
    ):
        if not isinstance(mode, str):
            raise TypeError(f"mode must be one of the strings {MODES} (as in Equinox), got {_core._shown(mode)}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (as in Equinox), got {mode!r}")
        settings = _layers.check_settings(
            input_size=input_size,
            eps=eps,
            channelwise_affine=channelwise_affine,
            momentum=momentum,
            inference=inference,
            dtype=dtype,
            eps_in_sqrt=eps_in_sqrt,
        )
        eps_in_sqrt = settings.pop("eps_in_sqrt")
        axis_name = _layers.check_axis_name("axis_name", axis_name, required=True)
        virtual_batch_size = _check_virtual_batch_size(virtual_batch_size)
        if mode == "batch" and settings["momentum"] == 1:
            raise ValueError(
                "momentum=1 with mode='batch': inference divides the hidden statistics by "
                "1 - momentum^t = 0 (Equinox's layer gives NaN there). Use mode='ema', which keeps the "
                "first batch's statistics with momentum=1, or a momentum in [0, 1)"
            )
        if virtual_batch_size is not None and mode != "batch":
            raise ValueError(
                f"virtual_batch_size={virtual_batch_size} needs mode='batch', got mode={mode!r}: in "
                "mode='ema' each example is normalized with the running statistics after the batch's "
                "are averaged in, and ghost batch norm there is not supported"
            )
        # Equinox's own constructor builds the fields and the state indices of the mode.
        super().__init__(axis_name=axis_name, mode="ema" if mode == "legacy" else mode, **settings)  # type: ignore[arg-type]
        self.eps_in_sqrt = eps_in_sqrt
        self.virtual_batch_size = virtual_batch_size
        self._core()  # checks the settings together now
        if mode == "legacy":  # the caller, above Equinox's two constructor frames
            warnings.warn(_LEGACY, stacklevel=4)

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
        index = self.ema_state_index if self.mode == "ema" else self.batch_state_index
        assert index is not None  # Equinox's constructor built the mode's indices
        mean, var = state.get(index)
        # Equinox's result dtype: the input promoted with the statistics and weights.
        x = jnp.asarray(x, jnp.result_type(x, mean, *([] if self.weight is None else [self.weight])))
        if self.mode == "ema":
            return self._ema(x, state, mean, var, inference=inference)
        return self._batch(x, state, mean, var, inference=inference)

    def _batch(self, x, state, mean, var, *, inference):
        """``mode="batch"``: the batch's statistics, and the debiased hidden ones at inference."""
        layer = self._core()
        count = state.get(self.batch_counter)
        if inference:
            debias = jnp.where(count == 0, 1, 1 - self.momentum**count).astype(mean.dtype)
            y, _, _ = _layers.normalize(layer, x, self.weight, self.bias, mean / debias, var / debias, training=False)
            return y, state
        if self.virtual_batch_size is None:
            y, mean, var = _layers.normalize(
                layer, x, self.weight, self.bias, mean, var, training=True, evaluation="inference=True"
            )
        else:
            y, mean, var = self._ghost(x, mean, var, self.virtual_batch_size)
        state = state.set(self.batch_counter, count + 1)
        return y, state.set(self.batch_state_index, (mean, var))

    def _ema(self, x, state, mean, var, *, inference):
        """``mode="ema"``: the running statistics, after averaging the batch's in when training."""
        layer = self._core()
        if inference:
            y, _, _ = _layers.normalize(layer, x, self.weight, self.bias, mean, var, training=False)
            return y, state
        first = state.get(self.ema_first_time_index)
        y, mean, var = _layers.normalize_with_average(
            layer, x, self.weight, self.bias, mean, var, first=first, evaluation="inference=True"
        )
        # False typed as the stored flag (under shard_map a new constant's type would differ from it)
        state = state.set(self.ema_first_time_index, jnp.zeros_like(first))
        return y, state.set(self.ema_state_index, (mean, var))

    def _ghost(self, x, mean, var, size: int):
        """``mode="batch"`` training with virtual batches: (y, new hidden mean, new hidden var).

        Example n of the N along `axis_name` belongs to group g(n) = n // V. The example is
        broadcast to X of shape (N/V, input_size, ...), one row per group, with the mask
        m_g = [g == g(n)] (its own group's row only), and `jstep.batch_norm` normalizes X with
        (group, channel) as the features: row g's statistics are then the masked-in values, the
        V examples of group g, exactly that group's mu and sigma^2, and the core's hand-derived
        backward and forward mode hold per group (a masked-out value moves no statistic). The
        example keeps its own row, Zhat = X[g(n)]; the other rows' outputs are dropped, so their
        cotangents are zero. G and B are broadcast along the rows (their gradients sum over the
        groups), and the hidden statistics average the rows' updates, that is
        h <- momentum h + (1 - momentum) mean_g (mu_g, sigma_g^2).
        It costs N/V times the work of the example (each example carries every group's row).
        """
        names = tuple(self.axis_name) if isinstance(self.axis_name, list) else self.axis_name
        count = jax.lax.axis_size(names)
        if count % size:
            raise ValueError(
                f"virtual_batch_size={size} does not divide the {count} examples mapped along "
                f"axis_name={self.axis_name!r}: the virtual batches are consecutive groups of equal "
                f"size; use a size that divides {count}"
            )
        groups = count // size
        group = jax.lax.axis_index(names) // size
        rows = jnp.broadcast_to(x, (groups, *x.shape))
        mask = jnp.reshape(jnp.arange(groups) == group, (groups,) + (1,) * x.ndim)
        layer = _layers.core_layer(
            momentum=self.momentum,
            epsilon=self.eps,
            eps_in_sqrt=self.eps_in_sqrt,
            feature_axis=(0, 1),
            axis_name=self.axis_name,
            axis_index_groups=None,
        )

        def per_group(value):
            return None if value is None else jnp.broadcast_to(value, (groups, *jnp.shape(value)))

        y, means, variances = _layers.normalize(
            layer,
            rows,
            per_group(self.weight),
            per_group(self.bias),
            per_group(mean),
            per_group(var),
            training=True,
            mask=mask,
            evaluation="inference=True",
        )
        return y[group], jnp.mean(means, axis=0), jnp.mean(variances, axis=0)


class BatchRenorm(eqx.nn.StatefulLayer):
    """Batch renormalization for Equinox, computed by `jstep.batch_renorm`: ``eqx.nn.BatchNorm``'s
    arguments, call and state layout (``mode="batch"``'s), plus `warmup_steps`, `r_max`, `d_max`.

    Called on one example ``x`` of shape ``(input_size, dim_1, ..., dim_N)`` inside a map with
    `axis_name`, as Equinox's layer. Training: for the first `warmup_steps` calls batch norm,
    Zhat = G (Z - mu_B) / sqrt(sigma_B^2 + eps) + B, over the whole batch; after them batch
    renormalization towards the running statistics (mean, var),

        r = clip(sqrt(sigma_B^2 + eps) / sqrt(var + eps), 1/r_max, r_max)
        d = clip((mu_B - mean) / sqrt(var + eps), -d_max, d_max)
        Zhat = G (r (Z - mu_B) + d sigma_B) / sqrt(sigma_B^2 + eps r^2) + B

    with r and d held constant in the gradient. Either way the state's statistics become
    ``momentum * (mean, var) + (1 - momentum) * (mu_B, sigma_B^2)`` from (0, 1) and its step count
    grows by one. Inference normalizes with those statistics as they are,
    Zhat = G (Z - mean) / sqrt(var + eps) + B: renormalization trains towards exactly what
    inference uses, so, unlike ``eqx.nn.BatchNorm(mode="batch")``, nothing is debiased. These are
    `jstep.linen.BatchRenorm`'s (and Stable-Baselines-JAX's) numbers, with Equinox's defaults
    for the arguments Equinox's BatchNorm has (eps 1e-5; Stable-Baselines-JAX's layer takes 1e-3).

    Args:
      input_size: the number of channels (the first axis of each example).
      axis_name: the name of the mapped batch axis, or a sequence of names.
      eps: eps >= 0.
      channelwise_affine: whether `weight` (G) and `bias` (B) are learned.
      momentum: the running statistics' gamma, in [0, 1] (1 keeps them as they are).
      inference: the mode when the call does not give one; `eqx.nn.inference_mode` sets it.
      dtype: the dtype of `weight`, `bias` and the running statistics (float32, or float64
        under ``jax_enable_x64``, by default).
      mode: "batch" only: batch renormalization trains with the batch's statistics (Equinox's
        "ema" mode normalizes with an average of them instead).
      warmup_steps: the training calls that run batch norm before renormalization starts (an
        integer >= 0; 100_000 as Stable-Baselines-JAX).
      r_max: the initial r_max of the state, r's bound, >= 1.
      d_max: the initial d_max of the state, d's bound, >= 0.

    The state holds the statistics (`batch_state_index`), the step count (`batch_counter`) and
    the bounds (`bounds_index`: (r_max, d_max)), as the Linen layer's ``batch_stats``. The
    bounds are read at every call, so a schedule (the paper raises r_max from 1 and d_max from
    0 during training) sets them, ``state = state.set(layer.bounds_index, (r, d))`` with arrays,
    without a new trace under ``eqx.filter_jit``, and checkpoints of the state keep them.

    Example:
      With no warm-up the first training call renormalizes towards the initial statistics
      (0, 1), within r_max and d_max, and counts the step:

      >>> import equinox as eqx
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from jstep.equinox import BatchRenorm
      >>> layer, state = eqx.nn.make_with_state(BatchRenorm)(2, "batch", momentum=0.5, warmup_steps=0)
      >>> x = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 60.0], [6.0, 30.0]])
      >>> train = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> y, state = train(x, state)
      >>> mean, var = state.get(layer.batch_state_index)
      >>> print(mean, state.get(layer.batch_counter))
      [ 1.5 15. ] 1
    """

    weight: jax.Array | None
    bias: jax.Array | None
    batch_counter: eqx.nn.StateIndex
    batch_state_index: eqx.nn.StateIndex
    bounds_index: eqx.nn.StateIndex
    axis_name: Hashable | Sequence[Hashable]
    inference: bool
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    mode: str = eqx.field(static=True)
    warmup_steps: int = eqx.field(static=True)
    r_max: float = eqx.field(static=True)  # the bounds' initial values; the state holds the current ones
    d_max: float = eqx.field(static=True)

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
        warmup_steps: int = 100_000,
        r_max: float = 3.0,
        d_max: float = 5.0,
    ):
        if mode != "batch":
            raise ValueError(
                f"mode={mode!r}: jstep.equinox.BatchRenorm has mode='batch' only; batch renormalization "
                "trains with the batch's statistics, where Equinox's 'ema' mode (and 'legacy') normalizes "
                "with an average of them"
            )
        settings = _layers.check_settings(
            input_size=input_size,
            eps=eps,
            channelwise_affine=channelwise_affine,
            momentum=momentum,
            inference=inference,
            dtype=dtype,
            warmup_steps=warmup_steps,
            r_max=r_max,
            d_max=d_max,
        )
        self.axis_name = _layers.check_axis_name("axis_name", axis_name, required=True)
        dtype = _core.default_float() if dtype is None else dtype
        shape = (settings["input_size"],)
        self.weight = jnp.ones(shape, dtype) if channelwise_affine else None
        self.bias = jnp.zeros(shape, dtype) if channelwise_affine else None
        self.batch_counter = eqx.nn.StateIndex(jnp.zeros((), jnp.int32))
        self.batch_state_index = eqx.nn.StateIndex((jnp.zeros(shape, dtype), jnp.ones(shape, dtype)))
        bounds = (settings["r_max"], settings["d_max"])
        self.bounds_index = eqx.nn.StateIndex(tuple(jnp.asarray(b, _core.default_float()) for b in bounds))
        self.inference = settings["inference"]
        self.input_size = settings["input_size"]
        self.eps = settings["eps"]
        self.channelwise_affine = settings["channelwise_affine"]
        self.momentum = settings["momentum"]
        self.mode = mode
        self.warmup_steps = settings["warmup_steps"]
        self.r_max, self.d_max = bounds
        _layers.core_layer(  # the checks of the settings together
            momentum=self.momentum,
            epsilon=self.eps,
            eps_in_sqrt=True,
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
          state: the `eqx.nn.State` holding this layer's statistics and step count.
          inference: overrides the layer's mode for this call.
        """
        del key
        inference = self.inference if inference is None else inference
        _layers.check_feature_count(x, 0, self.input_size, "input_size")
        mean, var = state.get(self.batch_state_index)
        # Equinox's result dtype: the input promoted with the statistics and weights.
        x = jnp.asarray(x, jnp.result_type(x, mean, *([] if self.weight is None else [self.weight])))
        if inference:
            return _layers.evaluate(x, self.weight, self.bias, mean, var, epsilon=self.eps, feature_axis=0), state
        y, mean, var, steps = _layers.renormalize(
            x,
            self.weight,
            self.bias,
            mean,
            var,
            state.get(self.batch_counter),
            *state.get(self.bounds_index),
            warmup_steps=self.warmup_steps,
            momentum=self.momentum,
            epsilon=self.eps,
            feature_axis=0,
            axis_name=self.axis_name,
            axis_index_groups=None,
            evaluation="inference=True",
        )
        state = state.set(self.batch_counter, steps)
        return y, state.set(self.batch_state_index, (mean, var))
