"""What jstep's framework layers (`jstep.nnx`, `jstep.linen`, `jstep.equinox`) share.

Each layer is a thin shell around `jstep.BatchNorm`: the numbers (batch statistics, the
normalization and its hand-derived gradient, the running average of the statistics, the
evaluation with running statistics) all come from there; a layer only keeps its framework's
variables, names, dtype policy and train/eval switch. Nothing here imports a framework.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jstep.normalization import (
    BatchNorm,
    BatchNormParams,
    BatchNormState,
    FeatureAxis,
    _EmptyBatchError,
    _feature_axes,
)


def missing_framework(module: str, framework: str, extra: str) -> ImportError:
    """The ImportError raised when `module` is imported without its framework installed."""
    return ImportError(
        f"{module} needs {framework}, which is not installed. Install it with jstep's "
        f'"{extra}" extra: pip install "jstep[{extra}]"'
    )


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
