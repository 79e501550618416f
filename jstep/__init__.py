"""jstep: the optimizers and batch normalization of "Optimizing Neural Networks", in JAX.

Every optimizer is an ``optax.GradientTransformationExtraArgs``; batch normalization is a pure
function whose gradient is the notes' hand derivation.
"""

# The submodule `jstep.optax` (Optax's aliases, computed by jstep), reachable after `import jstep`.
# Not in __all__: `from jstep import *` must not shadow the `optax` package.
from jstep import optax as optax
from jstep._core import CountState
from jstep.adam import ScaleByAdamState, adam, adamw, scale_by_adam
from jstep.adaptive import (
    AdadeltaState,
    ScaleByCenteredRmsState,
    ScaleByRmsState,
    ScaleByRssState,
    adadelta,
    adagrad,
    rmsprop,
    scale_by_rms,
    scale_by_rss,
)
from jstep.averages import (
    RunningAverageState,
    cumulative_average,
    moving_average,
    running_average,
    running_average_update,
)
from jstep.grouping import grouped
from jstep.momentum import MomentumState, ema_momentum, momentum, sgd
from jstep.normalization import BatchNorm, BatchNormParams, BatchNormState, batch_norm, batch_renorm, batch_stats
from jstep.precision import apply_updates, stochastic_round
from jstep.quantization import BlockwiseFormat, QuantizedArray, blockwise, dequantize, quantize
from jstep.testing import check_vjp

__version__ = "0.1.0"

__all__ = [
    "AdadeltaState",
    "BatchNorm",
    "BatchNormParams",
    "BatchNormState",
    "BlockwiseFormat",
    "CountState",
    "MomentumState",
    "QuantizedArray",
    "RunningAverageState",
    "ScaleByAdamState",
    "ScaleByCenteredRmsState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "adadelta",
    "adagrad",
    "adam",
    "adamw",
    "apply_updates",
    "batch_norm",
    "batch_renorm",
    "batch_stats",
    "blockwise",
    "check_vjp",
    "cumulative_average",
    "dequantize",
    "ema_momentum",
    "grouped",
    "momentum",
    "moving_average",
    "quantize",
    "rmsprop",
    "running_average",
    "running_average_update",
    "scale_by_adam",
    "scale_by_rms",
    "scale_by_rss",
    "sgd",
    "stochastic_round",
]
