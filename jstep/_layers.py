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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jstep import _core
from jstep.averages import running_average_update
from jstep.normalization import BatchNorm, BatchNormParams, BatchNormState, FeatureAxis, _feature_axes, batch_stats


def missing_framework(module: str, framework: str, extra: str) -> ImportError:
    """The ImportError raised when `module` is imported without its framework installed."""
    return ImportError(
        f"{module} needs {framework}, which is not installed. Install it with jstep's "
        f'"{extra}" extra: pip install "jstep[{extra}]"'
    )


# --------------------------------------------------------------------------- validation
# A layer checks every setting when it is built, naming the argument as its framework names it,
# so that a wrong type (a string from a config file, None, a list) fails there, not in a step.


def shown(value: Any) -> str:
    """The type and repr of `value` for an error message."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_)) or (hasattr(value, "dtype") and jnp.result_type(value) == jnp.bool_)


def check_size(name: str, value: Any) -> int:
    """A count of features: a positive Python or NumPy integer (``np.int64(3)``), as an int."""
    try:
        size = None if _is_bool(value) else operator.index(value)
    except TypeError:
        size = None
    if size is None:
        raise TypeError(f"{name} must be a positive integer (a Python or NumPy int), got {shown(value)}")
    if size < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return size


def check_flag(name: str, value: Any, *, optional: bool = False) -> bool | None:
    """A switch: True or False (a NumPy bool too), or None where `optional`; as a bool or None."""
    if value is None and optional:
        return None
    if not isinstance(value, (bool, np.bool_)):
        allowed = "True, False or None" if optional else "True or False"
        raise TypeError(f"{name} must be {allowed}, got {shown(value)}")
    return bool(value)


def check_static_number(name: str, value: Any, *, low: float = 0.0, high: float | None = None) -> float:
    """A setting fixed when the layer is built (eps): a Python or NumPy real number in [low, high)."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python or NumPy real number, got {shown(value)}")
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
    raise TypeError(f"{name} must be an integer axis or a sequence of them, e.g. -1 or (1, 2); got {shown(value)}")


def check_dtype(name: str, value: Any, *, optional: bool = False) -> Any:
    """A floating dtype (``jnp.float32``, ``"bfloat16"``), or None where `optional`."""
    if value is None and optional:
        return None
    if not _is_floating_dtype(value):
        allowed = "a floating dtype such as jnp.float32" + (" or None" if optional else "")
        raise TypeError(f"{name} must be {allowed}, got {shown(value)}")
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
        raise TypeError(f"{name} must be a callable, got {shown(value)}")
    return value


def check_mapping(name: str, value: Any) -> Any:
    """A mapping of metadata (e.g. a parameter's sharding)."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping (e.g. a dict), got {shown(value)}")
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
            f"{name} must be the name of a mapped axis (e.g. 'batch') or a tuple of names, got {shown(value)}"
        )
    return value


_CHECKS: dict[str, Any] = {
    **dict.fromkeys(["num_features", "input_size"], check_size),
    **dict.fromkeys(["momentum"], check_momentum),
    **dict.fromkeys(["epsilon", "eps"], check_static_number),
    **dict.fromkeys(["axis"], check_axes),
    **dict.fromkeys(["dtype"], functools.partial(check_dtype, optional=True)),
    **dict.fromkeys(["param_dtype"], check_dtype),
    **dict.fromkeys(["use_running_average"], functools.partial(check_flag, optional=True)),
    **dict.fromkeys(["use_bias", "use_scale", "use_fast_variance", "force_float32_reductions"], check_flag),
    **dict.fromkeys(["channelwise_affine", "inference", "eps_in_sqrt"], check_flag),
    **dict.fromkeys(["bias_init", "scale_init", "promote_dtype"], check_callable),
    **dict.fromkeys(["bias_metadata", "scale_metadata"], check_mapping),
    **dict.fromkeys(["axis_name"], check_axis_name),
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
    frameworks name them).
    """
    if isinstance(axis_name, list):  # Equinox accepts a list of names; collectives need a tuple
        axis_name = tuple(axis_name)
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
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(y, new running mean, new running var) by `layer.apply`, for a framework's variables.

    Training: y = G (x - mu) / s + B with the batch statistics, and the running ones updated
    as C_t = momentum C_{t-1} + (1 - momentum) c_t (the notes' running average with
    gamma = momentum, which is Flax's and Equinox's rule). Evaluation: y from the running
    `mean` and `var`, which come back unchanged (a `mask` plays no part there, as in Flax).
    `scale` or `bias` None means G = 1 or B = 0.
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
    y, new_state = layer.apply(params, state, x, training=training, **options)
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
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(y, new running mean, new running var) of a training step that normalizes with the running
    statistics after averaging the batch's in (Equinox's ``mode="ema"``).

    With c = (mu, sigma^2) the batch statistics (`batch_stats`) and C the running ones,

        C <- momentum C + (1 - momentum) c     (c itself where `first`, the first training call)
        y  = G (Z - C_mean) / s(C_var) + B      (the evaluation formula, with the new C)

    The gradient reaches Z through c, weighted by (1 - momentum), by autodiff through the
    statistics and the formula (the notes' derivation is for the batch's own statistics).
    """
    batch = BatchNormState(
        *batch_stats(
            x, feature_axis=layer.feature_axis, axis_name=layer.axis_name, axis_index_groups=layer.axis_index_groups
        )
    )
    running = BatchNormState(mean, var)
    averaged = running_average_update(running, batch, layer.momentum)
    new = jax.tree.map(lambda c, average: jnp.where(first, c, average).astype(average.dtype), batch, averaged)
    y, _, _ = normalize(layer, x, scale, bias, new.mean, new.var, training=False)
    return y, new.mean, new.var
