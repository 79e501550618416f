"""What jstep's framework layers (`jstep.nnx`, `jstep.linen`, `jstep.equinox`) share.

Each layer is a thin shell around `jstep.BatchNorm`: the numbers (batch statistics, the
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
    _safe_inverse,
    batch_stats,
)


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


def check_size(name: str, value: Any) -> int:
    """A count of features: a positive Python or NumPy integer (``np.int64(3)``), as an int."""
    try:
        size = None if _is_bool(value) else operator.index(value)
    except TypeError:
        size = None
    if size is None:
        raise TypeError(f"{name} must be a positive integer (a Python or NumPy int), got {_core._shown(value)}")
    if size < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return size


def check_flag(name: str, value: Any, *, optional: bool = False) -> bool | None:
    """A switch: True or False (a NumPy bool too), or None where `optional`; as a bool or None."""
    if value is None and optional:
        return None
    if not isinstance(value, (bool, np.bool_)):
        allowed = "True, False or None" if optional else "True or False"
        raise TypeError(f"{name} must be {allowed}, got {_core._shown(value)}")
    return bool(value)


def check_static_number(name: str, value: Any, *, low: float = 0.0, high: float | None = None) -> float:
    """A setting fixed when the layer is built (eps): a Python or NumPy real number in [low, high)."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python or NumPy real number, got {_core._shown(value)}")
    _core.check_number(name, value, low=low, high=high)
    return float(value)


def check_momentum(name: str, value: Any) -> Any:
    """The running statistics' gamma: a number in [0, 1) (`jstep._core.check_decay`)."""
    _core.check_decay(name, value)
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


_FLAGS = ["use_bias", "use_scale", "use_fast_variance", "force_float32_reductions", "channelwise_affine", "inference"]

# Each setting's rule, by the name the frameworks give it.
_CHECKS: dict[str, Any] = {
    "num_features": check_size,
    "input_size": check_size,
    "momentum": check_momentum,
    "epsilon": check_static_number,
    "eps": check_static_number,
    "axis": check_axes,
    "dtype": functools.partial(check_dtype, optional=True),
    "param_dtype": check_dtype,
    "use_running_average": functools.partial(check_flag, optional=True),
    **dict.fromkeys([*_FLAGS, "eps_in_sqrt"], check_flag),
    **dict.fromkeys(["bias_init", "scale_init", "promote_dtype"], check_callable),
    **dict.fromkeys(["bias_metadata", "scale_metadata"], check_mapping),
    "axis_name": check_axis_name,
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
) -> BatchNorm:
    """The `jstep.BatchNorm` that does a layer's arithmetic; raises on invalid settings.

    momentum must lie in [0, 1), epsilon >= 0, and axis_index_groups, if given, needs axis_name
    and must be a list of equal-sized lists of indices (`jstep.BatchNorm`'s checks, named as the
    frameworks name them). `axis_name` is one name or a tuple or list of them, as
    ``jax.lax.psum`` takes.
    """
    return BatchNorm(
        momentum=momentum,
        eps=epsilon,
        eps_in_sqrt=eps_in_sqrt,
        feature_axis=feature_axis,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
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

    and (m, v) is the new C. The gradient is derived by hand (`_averaged_bwd`); the new running
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

    # c, held constant: `_averaged`'s backward differentiates through it by hand. (Autodiff through
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _averaged(x, scale, offset, running, batch, first, settings: _Averaging):
    """Zhat = G (Z - m) / s + B with (m, v) = `_average_in(running, batch, first)`, where `batch`
    holds the statistics of `x` (per-feature arrays shaped to broadcast against x)."""
    return _averaged_fwd(x, scale, offset, running, batch, first, settings)[0]


def _averaged_fwd(x, scale, offset, running, batch, first, settings):
    mean, var = _average_in(running, batch, first, settings.momentum)
    _, s = _denominator(var, settings.eps, settings.eps_in_sqrt)
    y = (x.astype(var.dtype) - mean) * (scale * _safe_inverse(s)) + offset
    # The one activation-sized residual is x itself, as in `batch_norm`.
    return y.astype(x.dtype), (x, scale, batch.mean, mean, var, first)


def _averaged_bwd(settings, residuals, dy):
    """The gradient of Zhat = G (Z - m) / s + B, through Z and the batch's share of (m, v).

    With T1 = sum_j dZhat_j and T2 = sum_j dZhat_j (Z_j - m) (over the whole batch, all-reduced
    across `axis_name`), dL/dm = -G T1 / s and dL/dv = -G r T2 / (2 s^3), where r = 2 s ds/dv is
    1 for s = sqrt(v + eps) and s / sqrt(v) for s = sqrt(v) + eps (0 at v = 0, its limit, as in
    `batch_norm`). The batch's statistics enter (m, v) with weight w = 1 - gamma (w = 1 where
    `first`), and d mu/dZ_j = 1/K, d sigma^2/dZ_j = 2 (Z_j - mu)/K, so

        dL/dZ_j = G dZhat_j / s + (w/K) (dL/dm + 2 (Z_j - mu) dL/dv)

    (with w = 1: `batch_norm`'s, the notes' formula). dL/dG and dL/dB are `batch_norm`'s, and
    the running statistics get (1 - w) dL/dm and (1 - w) dL/dv; these are this device's (or
    example's) shares, summed by the map's transpose as for `batch_norm`'s scale.
    """
    x, scale, batch_mean, mean, var, first = residuals
    x = _first_derivative_only(x)
    layout = settings.layout
    root_v, s = _denominator(var, settings.eps, settings.eps_in_sqrt)
    inverse_s = _safe_inverse(s)
    r = 1 if settings.eps_in_sqrt else jnp.where(root_v > 0, s * _safe_inverse(root_v), 0)
    xc, dy = x.astype(var.dtype), dy.astype(var.dtype)
    sums = (
        jnp.sum(dy, axis=layout.reduce_axes, keepdims=True),
        jnp.sum(dy * (xc - mean), axis=layout.reduce_axes, keepdims=True),
    )
    totals = sums if settings.axis_name is None else _all_reduce(sums, settings.axis_name, layout.groups)

    def d_statistics(sum_dy, sum_dy_centred):
        """(dL/dm, dL/dv) from the two sums."""
        return -scale * inverse_s * sum_dy, -scale * inverse_s**3 * r * sum_dy_centred / 2

    d_mean, d_var = d_statistics(*totals)
    take = jnp.where(first, 1, 1 - settings.momentum).astype(var.dtype)  # w
    dx = scale * inverse_s * dy + (take / layout.size) * (d_mean + 2 * (xc - batch_mean) * d_var)
    d_running = BatchNormState(*((1 - take) * d for d in d_statistics(*sums)))
    return dx.astype(x.dtype), sums[1] * inverse_s, sums[0], d_running, None, None


_averaged.defvjp(_averaged_fwd, _averaged_bwd)


@jax.custom_jvp
def _first_derivative_only(x: jax.Array) -> jax.Array:
    """x itself, in `_averaged_bwd`, where the batch's statistics are held constant: its derivative
    in x (a second derivative of the layer through x) would miss their dependence on x, so it
    is refused rather than given wrong."""
    return x


@_first_derivative_only.defjvp
def _first_derivative_only_jvp(primals, tangents):
    raise NotImplementedError(
        'second derivatives through the input of Equinox\'s mode="ema" batch norm (grad of grad, '
        "Hessian-vector products in x) are not provided; first derivatives are, and second "
        'derivatives in the weights and running statistics. mode="batch" (jstep.batch_norm) gives '
        "exact second derivatives in x too."
    )
