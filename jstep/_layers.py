"""What jstep's framework layers (`jstep.nnx`, `jstep.linen`, `jstep.equinox`) share.

Each layer is a thin shell around `jstep.BatchNorm` (the BatchRenorm layers around
`jstep.batch_renorm`, by `renormalize`): the numbers (batch statistics, the
normalization and its hand-derived gradient, the running average of the statistics, the
evaluation with running statistics) all come from there; a layer only keeps its framework's
variables, names, dtype policy and train/eval switch. Nothing here imports a framework.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jstep import _core
from jstep.averages import running_average_update
from jstep.normalization import (
    BatchNorm,
    BatchNormParams,
    BatchNormState,
    FeatureAxis,
    _all_reduce,
    _denominator,
    _EmptyBatchError,
    _feature_axes,
    _Layout,
    _layout,
    _per_device,
    _rebinding_vmap_axes,
    _safe_inverse,
    batch_stats,
)
from jstep.normalization.renorm import _renormalize_checked


def missing_framework(module: str, framework: str, extra: str) -> ImportError:
    """The ImportError raised when `module` is imported without its framework installed."""
    return ImportError(
        f"{module} needs {framework}, which is not installed. Install it with jstep's "
        f'"{extra}" extra: pip install "jstep[{extra}]"'
    )


# --------------------------------------------------------------------------- validation
# A layer checks every setting when it is built, naming the argument as its framework names it,
# so that a wrong type (a string from a config file, None, a list) fails there, not in a step.


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_)) or (hasattr(value, "dtype") and jnp.result_type(value) == jnp.bool_)


def _check_integer(name: str, value: Any, allowed: str, low: int) -> int:
    """`value` as an int: a Python or NumPy integer (``np.int64(3)``, not a bool) >= `low`,
    described to the user as `allowed`."""
    try:
        number = None if _is_bool(value) else operator.index(value)
    except TypeError:
        number = None
    if number is None:
        raise TypeError(f"{name} must be {allowed} (a Python or NumPy int), got {_core._shown(value)}")
    if number < low:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


def check_size(name: str, value: Any) -> int:
    """A count of features: a positive Python or NumPy integer, as an int."""
    return _check_integer(name, value, "a positive integer", 1)


def check_momentum(name: str, value: Any) -> Any:
    """The running statistics' gamma: a number in [0, 1] (`jstep._core.check_running_momentum`)."""
    _core.check_running_momentum(name, value)
    return float(value) if isinstance(value, numbers.Real) else value


def check_axes(name: str, value: Any) -> int | tuple[int, ...]:
    """A feature axis: an integer, or a non-empty sequence of them (Python or NumPy ints)."""

    def is_axis(axis):
        return not _is_bool(axis) and isinstance(axis, numbers.Integral)

    if is_axis(value):
        return int(value)
    if isinstance(value, (list, tuple)) and value and all(map(is_axis, value)):
        return tuple(int(axis) for axis in value)
    raise TypeError(
        f"{name} must be an integer axis or a sequence of them, e.g. -1 or (1, 2); got {_core._shown(value)}"
    )


def check_dtype(name: str, value: Any, *, optional: bool = False) -> Any:
    """A floating dtype (``jnp.float32``, ``"bfloat16"``), or None where `optional`."""
    if value is None and optional:
        return None
    if not _is_floating_dtype(value):
        allowed = "a floating dtype such as jnp.float32" + (" or None" if optional else "")
        raise TypeError(f"{name} must be {allowed}, got {_core._shown(value)}")
    return value


def _is_floating_dtype(value: Any) -> bool:
    if value is None:  # np.dtype(None) is float64
        return False
    try:
        return bool(jnp.issubdtype(jnp.dtype(value), jnp.floating))
    except TypeError:
        return False


def check_callable(name: str, value: Any) -> Any:
    """A function (an initializer, a dtype promotion)."""
    if not callable(value):
        raise TypeError(f"{name} must be a callable, got {_core._shown(value)}")
    return value


def check_mapping(name: str, value: Any) -> Any:
    """A mapping of metadata (e.g. a parameter's sharding)."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping (e.g. a dict), got {_core._shown(value)}")
    return value


def check_axis_name(name: str, value: Any, *, required: bool = False) -> Any:
    """A mapped axis name (hashable, e.g. a str) or a tuple or list of them; None where not `required`."""
    if value is None:
        if required:
            raise ValueError(
                f"{name} is None: give the name of the mapped batch axis, as in jax.vmap(..., axis_name=...)"
            )
        return None
    names = value if isinstance(value, (tuple, list)) else (value,)
    if not names or not all(isinstance(n, Hashable) and not isinstance(n, (tuple, list)) for n in names):
        raise TypeError(
            f"{name} must be the name of a mapped axis (e.g. 'batch') or a tuple of names, got {_core._shown(value)}"
        )
    return value


def check_count(name: str, value: Any) -> int:
    """A number of steps: a non-negative Python or NumPy integer, as an int."""
    return _check_integer(name, value, "an integer >= 0", 0)


_FLAGS = ["use_bias", "use_scale", "use_fast_variance", "force_float32_reductions", "channelwise_affine", "inference"]

# Each setting's rule, by the name the frameworks give it.
_CHECKS: dict[str, Any] = {
    "num_features": check_size,
    "input_size": check_size,
    "momentum": check_momentum,
    "epsilon": _core.check_static_number,
    "eps": _core.check_static_number,
    "axis": check_axes,
    "dtype": functools.partial(check_dtype, optional=True),
    "param_dtype": check_dtype,
    "use_running_average": functools.partial(_core.check_flag, optional=True),
    **dict.fromkeys([*_FLAGS, "eps_in_sqrt"], _core.check_flag),
    **dict.fromkeys(["bias_init", "scale_init", "promote_dtype"], check_callable),
    **dict.fromkeys(["bias_metadata", "scale_metadata"], check_mapping),
    "axis_name": check_axis_name,
    "warmup_steps": check_count,
    "r_max": functools.partial(_core.check_static_number, low=1.0),
    "d_max": _core.check_static_number,
}


def check_settings(**settings: Any) -> dict[str, Any]:
    """A layer's settings, each checked by the rule for its name (a TypeError or ValueError naming
    it), given back as plain Python values where that is what they stand for (``np.int64(3)`` -> 3).

    `axis_index_groups`, and the settings' fit with each other, are checked by `core_layer`.
    """
    return {name: _CHECKS[name](name, value) for name, value in settings.items()}


def core_layer(
    *,
    momentum: Any,
    epsilon: float,
    eps_in_sqrt: bool,
    feature_axis: FeatureAxis,
    axis_name: Any,
    axis_index_groups: Any,
    virtual_batch_size: Any = None,
) -> BatchNorm:
    """The `jstep.BatchNorm` that does a layer's arithmetic; raises on invalid settings.

    momentum must lie in [0, 1], epsilon >= 0, and axis_index_groups, if given, needs axis_name
    and must be a list of equal-sized lists of indices (`jstep.BatchNorm`'s checks, named as the
    frameworks name them). `axis_name` is one name or a tuple or list of them, as
    ``jax.lax.psum`` takes. `virtual_batch_size` (ghost batch norm) is None or a positive int.
    """
    return BatchNorm(
        momentum=momentum,
        eps=epsilon,
        eps_in_sqrt=eps_in_sqrt,
        feature_axis=feature_axis,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        virtual_batch_size=virtual_batch_size,
    )


def feature_shape(x: jax.Array, feature_axis: FeatureAxis) -> tuple[int, ...]:
    """The sizes of `x`'s feature axes (ValueError naming `axis` when out of range)."""
    return tuple(jnp.shape(x)[a] for a in _feature_axes(jnp.ndim(x), feature_axis))


def check_feature_count(x: jax.Array, feature_axis: FeatureAxis, expected: int, name: str) -> None:
    """ValueError when `x`'s feature axes do not hold the `expected` features the layer was built for."""
    shape = feature_shape(x, feature_axis)
    if math.prod(shape) != expected:
        raise ValueError(
            f"x of shape {tuple(jnp.shape(x))} has feature axes of sizes {shape} ({math.prod(shape)} "
            f"features), but the layer was built with {name}={expected}"
        )


def normalize(
    layer: BatchNorm,
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mean: jax.Array,
    var: jax.Array,
    *,
    training: bool,
    mask: Any = None,
    evaluation: str = "use_running_average=True",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(y, new running mean, new running var) by `layer.apply`, for a framework's variables.

    Training: y = G (x - mu) / s + B with the batch statistics, and the running ones updated
    as C_t = momentum C_{t-1} + (1 - momentum) c_t (the notes' running average with
    gamma = momentum, which is Flax's and Equinox's rule). Evaluation: y from the running
    `mean` and `var`, which come back unchanged (a `mask` plays no part there, as in Flax).
    `scale` or `bias` None means G = 1 or B = 0. A batch with no value for a feature (K = 0;
    one value is fine: y = B, as in Flax) is refused naming the framework's switch to the
    running statistics, `evaluation`.
    The per-feature arrays may have any shape with the features' count of elements (NNX keeps
    them flat); they are given back in their own shapes.
    """
    shape = feature_shape(x, layer.feature_axis)
    dtype = jnp.result_type(x)
    params = BatchNormParams(
        jnp.ones(shape, dtype) if scale is None else jnp.reshape(scale, shape),
        jnp.zeros(shape, dtype) if bias is None else jnp.reshape(bias, shape),
    )
    state = BatchNormState(jnp.reshape(mean, shape), jnp.reshape(var, shape))
    options = {"mask": mask} if training and mask is not None else {}  # a mask only selects statistics
    try:
        y, new_state = layer.apply(params, state, x, training=training, **options)
    except _EmptyBatchError as error:
        raise error.naming(evaluation) from None
    return y, jnp.reshape(new_state.mean, jnp.shape(mean)), jnp.reshape(new_state.var, jnp.shape(var))


def normalize_with_average(
    layer: BatchNorm,
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mean: jax.Array,
    var: jax.Array,
    *,
    first: jax.Array,
    evaluation: str = "use_running_average=True",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(y, new running mean, new running var) of a training step that normalizes with the running
    statistics after averaging the batch's into them (Equinox's ``mode="ema"``).

    With c = (mu, sigma^2) the batch statistics (`batch_stats`), C = (M, V) the running ones and
    gamma = `layer.momentum` (a Python number here, as Equinox's static field), per feature

        (m, v) = gamma C + (1 - gamma) c      (`running_average_update`; c itself where `first`)
        Zhat   = G (Z - m) / s + B,           s = sqrt(v + eps), or sqrt(v) + eps

    and (m, v) is the new C. The derivatives are derived by hand (`_averaged_jvp`); the new running
    statistics carry none (they are state, as in `jstep.BatchNorm.apply`). An empty batch's error
    names `evaluation`, the framework's switch to the running statistics.
    """
    axis_name = tuple(layer.axis_name) if isinstance(layer.axis_name, list) else layer.axis_name
    try:
        layout = _layout(x, layer.feature_axis, axis_name, layer.axis_index_groups)
    except _EmptyBatchError as error:
        raise error.naming(evaluation) from None
    dtype = _core.compute_dtype(jnp.result_type(x))

    def per_feature(value, default):
        value = jnp.full(layout.keep_shape, default, dtype) if value is None else value
        return jnp.reshape(value, layout.keep_shape).astype(dtype)

    # c, held constant: `_averaged`'s tangent map differentiates through it by hand. (Autodiff through
    # `batch_stats` fails under a vmap inside shard_map in jax 0.10: JAX cannot transpose its
    # sum over the vmap axis there.)
    statistics = batch_stats(x, feature_axis=layer.feature_axis, axis_name=axis_name, axis_index_groups=layout.groups)
    batch = BatchNormState(*(per_feature(c, 0) for c in jax.lax.stop_gradient(statistics)))
    running = BatchNormState(per_feature(mean, 0), per_feature(var, 1))
    new = _average_in(running, batch, first, float(layer.momentum))
    # As `batch_norm` does with its scale: each device's share of these inputs' gradients.
    weights = _per_device((per_feature(scale, 1), per_feature(bias, 0), running), axis_name)
    settings = _Averaging(layout, layer.eps, layer.eps_in_sqrt, float(layer.momentum), axis_name)
    y = _averaged(x, *weights, batch, jnp.asarray(first), settings)

    def like(value, old):
        return jnp.reshape(value, jnp.shape(old)).astype(jnp.result_type(old))

    return y, like(new.mean, mean), like(new.var, var)


def _average_in(running: BatchNormState, batch: BatchNormState, first: Any, momentum: float) -> BatchNormState:
    """gamma C + (1 - gamma) c (`running_average_update`), or c itself where `first`."""
    averaged = running_average_update(running, batch, momentum)
    return BatchNormState(*(jnp.where(first, c, a) for c, a in zip(batch, averaged, strict=True)))


class _Averaging(NamedTuple):
    """The static settings of `_averaged` (hashable)."""

    layout: _Layout
    eps: float
    eps_in_sqrt: bool
    momentum: float
    axis_name: Any

    @property
    def vmap_axes(self) -> Any:
        return self.layout.vmap_axes


@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def _averaged(x, scale, offset, running, batch, first, settings: _Averaging):
    """Zhat = G (Z - m) / s + B with (m, v) = `_average_in(running, batch, first)`, where `batch`
    holds the statistics of `x` (per-feature arrays shaped to broadcast against x)."""
    mean, var = _average_in(running, batch, first, settings.momentum)
    _, s = _denominator(var, settings.eps, settings.eps_in_sqrt)
    y = (x.astype(var.dtype) - mean) * (scale * _safe_inverse(s)) + offset
    return y.astype(x.dtype)


def _averaged_jvp(settings, primals, tangents):
    """The tangent map of Zhat = G (Z - m) / s + B, through Z and the batch's share of (m, v).

    The batch's statistics enter (m, v) with weight w = 1 - gamma (w = 1 where `first`), and
    d mu = (1/K) sum_j dZ_j, d sigma^2 = (2/K) sum_j (Z_j - mu) dZ_j (sums over the whole batch,
    all-reduced across `axis_name`), so with the running statistics' tangents dM, dV

        dm = w d mu + (1 - w) dM,   dv = w d sigma^2 + (1 - w) dV,   ds = r dv / (2 s)
        dZhat_j = (G/s)(dZ_j - dm) - G (Z_j - m) ds / s^2 + dG (Z_j - m)/s + dB

    where r = 2 s ds/dv is 1 for s = sqrt(v + eps) and s / sqrt(v) for s = sqrt(v) + eps (0 at
    v = 0, its limit, as in `batch_norm`). With w = 1 it is `batch_norm`'s tangent map. Its
    transpose, which reverse mode takes, is the hand-derived backward: the reductions
    T1 = sum_j dZhat_j and T2 = sum_j dZhat_j (Z_j - m), then dL/dm = -G T1 / s,
    dL/dv = -G r T2 / (2 s^3) and dL/dZ_j = G dZhat_j / s + (w/K)(dL/dm + 2 (Z_j - mu) dL/dv);
    dL/dG and dL/dB are `batch_norm`'s, and the running statistics get (1 - w) dL/dm and
    (1 - w) dL/dv, this device's (or example's) shares, summed by the map's transpose.
    """
    x, scale, offset, running, batch, first = primals
    dx, dscale, doffset, drunning, _, _ = tangents  # `batch` is held constant: its tangent is 0
    layout = settings.layout
    y = _averaged(x, scale, offset, running, batch, first, settings)
    mean, var = _average_in(running, batch, first, settings.momentum)
    root_v, s = _denominator(var, settings.eps, settings.eps_in_sqrt)
    inverse_s = _safe_inverse(s)
    r = 1 if settings.eps_in_sqrt else jnp.where(root_v > 0, s * _safe_inverse(root_v), 0)
    take = jnp.where(first, 1, 1 - settings.momentum).astype(var.dtype)  # w
    xc = _first_derivative_only(x).astype(var.dtype)

    def given(tangent):
        return not isinstance(tangent, SymbolicZero)

    zero = jnp.zeros(layout.keep_shape, var.dtype)
    d_mean = (1 - take) * drunning.mean if given(drunning.mean) else zero
    d_var = (1 - take) * drunning.var if given(drunning.var) else zero
    direct = None
    if given(dx):
        dz = dx.astype(var.dtype)
        sums = (
            jnp.sum(dz, axis=layout.reduce_axes, keepdims=True),
            jnp.sum(_times_difference(dz, xc, batch.mean), axis=layout.reduce_axes, keepdims=True),
        )
        if settings.axis_name is not None:
            sums = _all_reduce(sums, settings.axis_name, layout.groups)
        sum_dz, sum_dz_centred = sums
        d_mean = d_mean + take * sum_dz / layout.size
        d_var = d_var + take * 2 * sum_dz_centred / layout.size
        direct = scale * inverse_s * dz
    d_s = r * d_var * inverse_s / 2
    slope = -scale * d_s * inverse_s * inverse_s + (dscale * inverse_s if given(dscale) else 0)
    shift = -scale * inverse_s * d_mean + (doffset if given(doffset) else 0)
    dy = _times_difference(slope, xc, mean) + shift
    dy = dy if direct is None else direct + dy
    return y, jnp.broadcast_to(dy, y.shape).astype(y.dtype)


_averaged.defjvp(_rebinding_vmap_axes(_averaged_jvp), symbolic_zeros=True)


@jax.checkpoint
def _times_difference(tangent, x, centre):
    """tangent (Z - c), with Z - c computed where it is used: linearizing keeps Z, not Z - c
    (see `jstep.normalization.batchnorm`'s `_times_centred`)."""
    return tangent * (x - centre)


@jax.custom_jvp
def _first_derivative_only(x: jax.Array) -> jax.Array:
    """x itself, in `_averaged_jvp`'s tangent map, where the batch's statistics are held constant:
    its derivative in x (a second derivative of the layer through x) would miss their
    dependence on x, so it is refused rather than given wrong."""
    return x


@_first_derivative_only.defjvp
def _first_derivative_only_jvp(primals, tangents):
    raise NotImplementedError(
        'second derivatives through the input of Equinox\'s mode="ema" batch norm (grad of grad, '
        "Hessian-vector products in x) are not provided; first derivatives are, and second "
        'derivatives in the weights and running statistics. mode="batch" (jstep.batch_norm) gives '
        "exact second derivatives in x too."
    )


# ----------------------------------------------------------------- batch renormalization


def renormalize(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mean: jax.Array,
    var: jax.Array,
    steps: Any,
    r_max: Any,
    d_max: Any,
    *,
    warmup_steps: int,
    momentum: Any,
    epsilon: float,
    feature_axis: FeatureAxis,
    axis_name: Any,
    axis_index_groups: Any,
    mask: Any = None,
    evaluation: str = "use_running_average=True",
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(y, new running mean, new running var, steps + 1) of a BatchRenorm layer's training call.

    y is `jstep.batch_renorm` of x towards the running `mean` and `var`; while
    ``steps < warmup_steps`` the bounds are r_max = 1 and d_max = 0, so r = 1, d = 0 and y is
    batch norm, G (x - mu_B) / sqrt(sigma_B^2 + eps) + B, gradient included. Either way the
    running statistics become C <- momentum C + (1 - momentum) c with the batch's
    c = (mu_B, sigma_B^2) (`running_average_update`), and the step count saturates instead of
    wrapping around. `scale` or `bias` None means G = 1 or B = 0; the per-feature arrays keep
    their own shapes; an empty batch's error names `evaluation`.
    """
    shape = feature_shape(x, feature_axis)
    dtype = jnp.result_type(x)
    scale = jnp.ones(shape, dtype) if scale is None else jnp.reshape(scale, shape)
    bias = jnp.zeros(shape, dtype) if bias is None else jnp.reshape(bias, shape)
    steps = jnp.asarray(steps)
    warm = steps >= warmup_steps
    try:
        y, batch_mean, batch_var = _renormalize_checked(
            x,
            scale,
            bias,
            jnp.reshape(mean, shape),
            jnp.reshape(var, shape),
            jnp.where(warm, r_max, 1),
            jnp.where(warm, d_max, 0),
            feature_axis,
            epsilon,
            axis_name,
            mask,
            axis_index_groups,
        )
    except _EmptyBatchError as error:
        raise error.naming(evaluation) from None
    batch = jax.lax.stop_gradient((jnp.reshape(batch_mean, jnp.shape(mean)), jnp.reshape(batch_var, jnp.shape(var))))
    new_mean, new_var = running_average_update((mean, var), batch, momentum)
    return y, new_mean, new_var, _core.increment(steps)


def evaluate(
    x: jax.Array, scale: Any, bias: Any, mean: Any, var: Any, *, epsilon: float, feature_axis: Any
) -> jax.Array:
    """G (x - mean) / sqrt(var + eps) + B with the running statistics (a BatchRenorm layer's evaluation)."""
    layer = core_layer(
        momentum=0.0,
        epsilon=epsilon,
        eps_in_sqrt=True,
        feature_axis=feature_axis,
        axis_name=None,
        axis_index_groups=None,
    )
    return normalize(layer, x, scale, bias, mean, var, training=False)[0]
