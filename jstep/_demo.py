"""The main job's model and training loop: every optimizer of the notes on the shipped digits.

A multilayer perceptron 64 -> 128 -> BN -> relu -> 64 -> BN -> relu -> 10 with `jstep.BatchNorm`,
trained on softmax cross entropy. Every optimizer starts from the same initialisation and
sees the same batches. One device: a jitted step. N devices: the same step inside
`jax.shard_map` over a mesh axis ``"batch"``; each device holds 1/N of every batch, batch
normalization all-reduces its statistics over that axis (``BatchNorm(axis_name="batch")``)
and the gradients are averaged with ``pmean``, so the run equals the one-device run up to
float round-off.

Everything here is a small pure function; `jstep.cli` does the printing and the files, and
the notebooks reuse the same pieces.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jstep
from jstep.data import load_digits

LAYER_SIZES = (64, 128, 64, 10)
AXIS = "batch"

# The settings each optimizer trains with (learning rates tuned once on this problem).
OPTIMIZER_SETTINGS: dict[str, dict[str, float]] = {
    "sgd": {"learning_rate": 0.1},
    "momentum": {"learning_rate": 0.02, "gamma": 0.9},
    "ema_momentum": {"learning_rate": 0.2, "gamma": 0.9},
    "rmsprop": {"learning_rate": 1e-3, "gamma": 0.9},
    "adagrad": {"learning_rate": 0.05},
    "adadelta": {"learning_rate": 1.0, "rho": 0.9},
    "adam": {"learning_rate": 2e-3},
}
OPTIMIZERS = tuple(OPTIMIZER_SETTINGS)

# The dtypes params, gradients and optimizer state can be kept in. Arithmetic is float32 in all.
PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The block-wise formats optimizer state can be stored in instead (params keep their dtype).
STATE_FORMATS = {"blockwise8": jstep.blockwise(8), "blockwise4": jstep.blockwise(4)}

# The arguments that set an optimizer's state dtype (every optimizer with state has one of them).
STATE_DTYPE_ARGUMENTS = ("mu_dtype", "nu_dtype", "accumulator_dtype")


class Dataset(NamedTuple):
    """Features float32 (n, 64) in [0, 1]; labels int32 (n,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


class RunResult(NamedTuple):
    """One optimizer's run: the per-step batch losses and the trained network.

    `precision` names the dtype of params and optimizer state, or the state's block-wise format
    (and how narrow values were stored); `bytes_per_parameter` is what params plus optimizer
    state hold, per parameter, `state_bytes_per_parameter` what the optimizer state alone holds.
    """

    optimizer: str
    settings: dict
    losses: np.ndarray
    final_train_loss: float
    test_accuracy: float
    steps_per_second: float
    params: Any
    state: Any
    precision: str = "float32"
    bytes_per_parameter: float = float("nan")
    state_bytes_per_parameter: float = float("nan")


def features(images: np.ndarray) -> np.ndarray:
    """Pixels 0..16 of (n, 8, 8) images -> float32 (n, 64) in [0, 1]."""
    return (images.reshape(len(images), -1) / 16.0).astype(np.float32)


def digits_dataset() -> Dataset:
    """The shipped digits as network inputs: 1,500 training and 297 test examples."""
    digits = load_digits()
    return Dataset(
        features(digits.train_images),
        digits.train_labels.astype(np.int32),
        features(digits.test_images),
        digits.test_labels.astype(np.int32),
    )


def keeps_state(name: str) -> bool:
    """Whether optimizer `name` keeps state whose dtype or format can be chosen (all but sgd)."""
    return bool(STATE_DTYPE_ARGUMENTS & inspect.signature(getattr(jstep, name)).parameters.keys())


def make_optimizer(
    name: str, settings: dict | None = None, rounding_seed: int | None = None, state_format: str | None = None
) -> optax.GradientTransformation:
    """``jstep.<name>(**settings)``, by default with ``OPTIMIZER_SETTINGS[name]``; with
    `rounding_seed`, narrow or quantized state is stored by stochastic rounding (optimizers with
    state); with `state_format` (a key of `STATE_FORMATS`), every state (m and v, a velocity, an
    average of g^2) is stored in that format."""
    factory = getattr(jstep, name)
    settings = OPTIMIZER_SETTINGS[name] if settings is None else settings
    parameters = inspect.signature(factory).parameters
    if rounding_seed is not None and "rounding_seed" in parameters:
        settings = {**settings, "rounding_seed": rounding_seed}
    if state_format is not None:
        if not keeps_state(name):
            raise ValueError(f"state_format={state_format!r}: {name} keeps no state to store in it")
        fmt = STATE_FORMATS[state_format]
        settings = {**settings, **{argument: fmt for argument in STATE_DTYPE_ARGUMENTS if argument in parameters}}
    return factory(**settings)


def describe_precision(precision: str, stochastic: bool, state_format: str | None = None) -> str:
    """How params and state were stored: 'float32', 'bfloat16 stochastic', 'bfloat16 nearest';
    with a block-wise `state_format`, '8-bit stochastic' (float32 params) or 'bfloat16 4-bit
    nearest' (bfloat16 params)."""
    if state_format is not None:
        bits = f"{STATE_FORMATS[state_format].bits}-bit"
        wide = PRECISIONS[precision] == jnp.float32
        return f"{bits if wide else f'{precision} {bits}'} {'stochastic' if stochastic else 'nearest'}"
    if PRECISIONS[precision] == jnp.float32:
        return precision
    return f"{precision} {'stochastic' if stochastic else 'nearest'}"


def bytes_held(tree: Any) -> int:
    """Bytes of every array in `tree` (a `jstep.QuantizedArray` counts its codes and scales)."""
    return sum(np.dtype(leaf.dtype).itemsize * np.size(leaf) for leaf in jax.tree.leaves(tree))


def bytes_per_parameter(params: Any, opt_state: Any) -> float:
    """Bytes held by params and optimizer state together, divided by the number of parameters."""
    return bytes_held((params, opt_state)) / sum(np.size(leaf) for leaf in jax.tree.leaves(params))


def describe_settings(settings: dict) -> str:
    """{'learning_rate': 0.02, 'gamma': 0.9} -> 'lr=0.02 gamma=0.9'."""
    return " ".join(f"{'lr' if key == 'learning_rate' else key}={value:g}" for key, value in settings.items())


def batch_norm_layer(axis_name: Any = None) -> jstep.BatchNorm:
    """The network's batch-norm layer: running-average momentum 0.9, eps 1e-5 inside the root."""
    return jstep.BatchNorm(momentum=0.9, eps=1e-5, axis_name=axis_name)


# ------------------------------------------------------------------------------ the model


@functools.partial(jax.jit, static_argnames=("bn", "sizes"))
def init_mlp(key: jax.Array, bn: jstep.BatchNorm | None, sizes: Sequence[int] = LAYER_SIZES) -> tuple[Any, Any]:
    """He-normal weights and zero biases, and with `bn` a batch-norm layer after each hidden layer.

    Returns ``(params, state)``: params ``{"hidden": [layer, ...], "output": {"w", "b"}}`` with
    each hidden layer ``{"w", "bn"}`` (batch norm's offset B is the layer's bias) or, without
    `bn`, ``{"w", "b"}``; state holds one batch-norm running-statistics entry per hidden layer
    (None without `bn`).
    """
    keys = jax.random.split(key, len(sizes) - 1)

    def weights(key, fan_in, fan_out):
        return jax.random.normal(key, (fan_in, fan_out), jnp.float32) * np.sqrt(2.0 / fan_in)

    hidden: list[dict] = []
    state: list[jstep.BatchNormState | None] = []
    for key, fan_in, fan_out in zip(keys[:-1], sizes[:-2], sizes[1:-1], strict=True):
        if bn is None:
            hidden.append({"w": weights(key, fan_in, fan_out), "b": jnp.zeros(fan_out, jnp.float32)})
            state.append(None)
        else:
            bn_params, bn_state = bn.init(jnp.zeros((1, fan_out), jnp.float32))
            hidden.append({"w": weights(key, fan_in, fan_out), "bn": bn_params})
            state.append(bn_state)
    output = {"w": weights(keys[-1], sizes[-2], sizes[-1]), "b": jnp.zeros(sizes[-1], jnp.float32)}
    return {"hidden": hidden, "output": output}, state


def forward(
    params: Any, state: Any, x: jax.Array, bn: jstep.BatchNorm | None, *, training: bool
) -> tuple[jax.Array, Any]:
    """Logits and the new batch-norm state: relu(BN(x W)) (or relu(x W + b)) per hidden layer,
    then x W + b. The layers compute in the params' dtype (x is cast to it)."""
    x = x.astype(params["output"]["w"].dtype)
    new_state = []
    for layer, layer_state in zip(params["hidden"], state, strict=True):
        z = x @ layer["w"]
        if bn is None:
            z, updated = z + layer["b"], layer_state
        else:
            z, updated = bn.apply(layer["bn"], layer_state, z, training=training)
        x = jax.nn.relu(z)
        new_state.append(updated)
    return x @ params["output"]["w"] + params["output"]["b"], new_state


@functools.partial(jax.jit, static_argnames="bn")
def batch_norm_inputs(params: Any, state: Any, x: jax.Array, bn: jstep.BatchNorm) -> list[jax.Array]:
    """Z = x W, the input of each batch-norm layer for the batch `x` (training mode)."""
    inputs = []
    for layer, layer_state in zip(params["hidden"], state, strict=True):
        z = x @ layer["w"]
        inputs.append(z)
        x = jax.nn.relu(bn.apply(layer["bn"], layer_state, z, training=True)[0])
    return inputs


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross entropy: -(1/K) sum_j log softmax(logits_j)[label_j]."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1))


def training_loss(params, state, x, y, bn):
    """(loss on the batch, new batch-norm state), the batch statistics normalizing."""
    logits, state = forward(params, state, x, bn, training=True)
    return cross_entropy(logits, y), state


def make_train_step(
    optimizer: optax.GradientTransformation,
    bn: jstep.BatchNorm | None,
    mesh: Mesh | None = None,
    *,
    rounding_seed: int | None = None,
) -> Callable:
    """``step(params, state, opt_state, x, y, t) -> (params, state, opt_state, loss)``, jitted,
    the first three arguments donated, t the step number (an int32 scalar). With `mesh`, x and
    y are split over its ``"batch"`` axis, `bn` must have ``axis_name="batch"``, and the
    gradients and the loss are ``pmean``-ed. With `rounding_seed`, low-precision params are
    updated by `jstep.apply_updates` with the key ``fold_in(key(rounding_seed), t)``
    (stochastic rounding); otherwise the sum is rounded to nearest."""

    def step(params, state, opt_state, x, y, t):
        (loss, state), grads = jax.value_and_grad(training_loss, has_aux=True)(params, state, x, y, bn)
        if mesh is not None:
            grads, loss = jax.lax.pmean((grads, loss), AXIS)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        key = None if rounding_seed is None else jax.random.fold_in(jax.random.key(rounding_seed), t)
        return jstep.apply_updates(params, updates, key=key), state, opt_state, loss

    if mesh is not None:
        # check_vma=False: each device's gradient is its own contribution, averaged by the pmean
        # above (the batch-norm backward already all-reduces its reductions over AXIS).
        specs = (P(), P(), P(), P(AXIS), P(AXIS), P())
        step = jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)
    return jax.jit(step, donate_argnums=(0, 1, 2))


@jax.jit
def _evaluate(params, state, x, y):
    bn = batch_norm_layer() if "bn" in params["hidden"][0] else None
    logits, _ = forward(params, state, x, bn, training=False)
    return cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, axis=1) == y)


def evaluate(params: Any, state: Any, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(loss, accuracy) of the network in evaluation mode (batch norm uses running statistics)."""
    loss, accuracy = _evaluate(params, state, x, y)
    return float(loss), float(accuracy)


# ---------------------------------------------------------------------------- the runs


def batch_indices(seed: int, n: int, batch_size: int, steps: int) -> np.ndarray:
    """(steps, batch_size) example indices: epochs of a seeded shuffle, each cut into batches."""
    rng = np.random.default_rng(seed)
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    order = np.concatenate([rng.permutation(n)[: per_epoch * batch_size] for _ in range(epochs)])
    return order.reshape(-1, batch_size)[:steps]


def make_mesh(devices: int) -> Mesh | None:
    """A one-axis mesh ``("batch",)`` over the first `devices` devices (host CPUs if the default
    platform has fewer); None for one device."""
    if devices == 1:
        return None
    pool = jax.devices() if jax.device_count() >= devices else jax.devices("cpu")
    if len(pool) < devices:
        raise RuntimeError(f"--devices {devices} needs {devices} devices, this process sees {len(pool)}")
    return Mesh(np.array(pool[:devices]), (AXIS,))


def fresh_start(
    optimizer: optax.GradientTransformation, init: tuple[Any, Any], dtype: Any = jnp.float32
) -> tuple[Any, Any, Any]:
    """(params, state, opt_state): new buffers holding `init` (the step donates them), the params
    cast to `dtype` (round-to-nearest), and the optimizer's initial state for them."""

    @jax.jit
    def start(params, state):
        params, state = jax.tree.map(lambda leaf: leaf.astype(dtype), params), jax.tree.map(jnp.copy, state)
        return params, state, optimizer.init(params)

    return start(*init)


def train(
    name: str,
    init: tuple[Any, Any],
    data: Dataset,
    batches: np.ndarray,
    *,
    mesh: Mesh | None = None,
    use_batch_norm: bool = True,
    settings: dict | None = None,
    precision: str = "float32",
    state_format: str | None = None,
    stochastic_rounding: bool = True,
    seed: int = 0,
    on_progress: Callable[[int, jax.Array], None] = lambda step, loss: None,
    progress_every: int = 25,
) -> RunResult:
    """Train a copy of `init` with optimizer `name` (`settings`, default ``OPTIMIZER_SETTINGS``)
    on `batches` of `data`; `use_batch_norm` must match how `init` was built.

    `precision` (a key of `PRECISIONS`) is the dtype of the params, their gradients and the
    optimizer state; the batch-norm running statistics stay float32 and all arithmetic runs in
    at least float32. Below float32, `stochastic_rounding` stores params (`jstep.apply_updates`
    with a key) and optimizer state (``rounding_seed``) by stochastic rounding, keys from
    `seed`; without it both are rounded to nearest. With `state_format` (a key of
    `STATE_FORMATS`; optimizers with state only) the optimizer state is stored block-wise in 8
    or 4 bits instead, stochastically rounded by the same rule.

    `on_progress(step, loss)` is called every `progress_every` steps and after the last one
    (`loss` is that step's batch loss, a device scalar). Steps per second exclude the first
    step, which compiles.
    """
    settings = OPTIMIZER_SETTINGS[name] if settings is None else settings
    dtype = PRECISIONS[precision]
    narrow_params = dtype != jnp.float32
    rounding_seed = seed if stochastic_rounding and (narrow_params or state_format is not None) else None
    optimizer = make_optimizer(name, settings, rounding_seed, state_format)
    bn = batch_norm_layer(AXIS if mesh is not None else None) if use_batch_norm else None
    step = make_train_step(optimizer, bn, mesh, rounding_seed=rounding_seed if narrow_params else None)
    replicated = NamedSharding(mesh, P()) if mesh is not None else jax.devices()[0]
    split = NamedSharding(mesh, P(AXIS)) if mesh is not None else jax.devices()[0]

    params, state, opt_state = jax.device_put(fresh_start(optimizer, init, dtype), replicated)
    held = bytes_per_parameter(params, opt_state)
    state_held = bytes_held(opt_state) / sum(np.size(leaf) for leaf in jax.tree.leaves(params))
    step_losses = []
    start = time.perf_counter()
    for t, indices in enumerate(batches, start=1):
        x, y = jax.device_put((data.x_train[indices], data.y_train[indices]), split)
        params, state, opt_state, loss = step(params, state, opt_state, x, y, np.int32(t))
        step_losses.append(loss)
        if t == 1:
            loss.block_until_ready()
            start = time.perf_counter()
        if t % progress_every == 0 or t == len(batches):
            on_progress(t, loss)
    losses = np.asarray(jax.device_get(step_losses), np.float64)
    elapsed = time.perf_counter() - start
    steps_per_second = (len(batches) - 1) / elapsed if len(batches) > 1 and elapsed > 0 else float("nan")

    params, state = jax.device_get((params, state))
    final_loss, _ = evaluate(params, state, data.x_train, data.y_train)
    _, accuracy = evaluate(params, state, data.x_test, data.y_test)
    label = describe_precision(precision, stochastic_rounding, state_format)
    return RunResult(
        name, settings, losses, final_loss, accuracy, steps_per_second, params, state, label, held, state_held
    )


def smooth(values: np.ndarray, decay: float = 0.95) -> np.ndarray:
    """The debiased moving average of a curve (the notes' running average, B.0.1.1), for plots."""
    return np.asarray(_smooth(jnp.asarray(values, jnp.float32), decay))


@functools.partial(jax.jit, static_argnames="decay")
def _smooth(values, decay):
    average = jstep.moving_average(decay, debias=True)

    def one(state, value):
        smoothed, state = average.update(value, state)
        return state, smoothed

    return jax.lax.scan(one, average.init(values[0]), values)[1]


class LayerCheck(NamedTuple):
    """`jstep.check_vjp`'s report for one batch-norm layer of a trained network."""

    optimizer: str
    layer: int
    input_shape: tuple[int, ...]
    report: Any  # jstep.testing.VjpReport


def plain_batch_norm(z, scale, offset, eps: float = 1e-5):
    """G (Z - mu) / sqrt(sigma^2 + eps) + B with plain jnp ops: the reference autodiff differentiates."""
    mu = jnp.mean(z, axis=0)
    var = jnp.mean(jnp.square(z - mu), axis=0)
    return scale * (z - mu) / jnp.sqrt(var + eps) + offset


def check_batch_norm_layer(result: RunResult, data: Dataset, batch: np.ndarray, layer: int = 0) -> LayerCheck:
    """`jstep.check_vjp` of batch-norm layer `layer` of a trained network, on a real batch.

    The function checked is Z, G, B -> batch_norm(Z, G, B), with Z the layer's input for the
    training examples `batch` and G, B the layer's trained weights; its VJP (the notes' hand
    derivation) is compared in float64 with autodiff of `plain_batch_norm` and with finite
    differences. Raises AssertionError (with the report) if they disagree.
    """
    bn = batch_norm_layer()
    z = batch_norm_inputs(result.params, result.state, data.x_train[batch], bn)[layer]
    weights = result.params["hidden"][layer]["bn"]

    @jax.jit
    def batch_norm_layer_fn(z, scale, offset):
        return jstep.batch_norm(z, scale, offset, eps=bn.eps, eps_in_sqrt=bn.eps_in_sqrt)

    @jax.jit
    def reference(z, scale, offset):
        return plain_batch_norm(z, scale, offset, bn.eps)

    args = [np.asarray(a, np.float64) for a in (z, weights.scale, weights.offset)]
    report = jstep.check_vjp(batch_norm_layer_fn, *args, reference=reference)
    return LayerCheck(result.optimizer, layer, tuple(z.shape), report)


def worst_errors(check: LayerCheck) -> dict[str, dict[str, float]]:
    """{'autodiff of reference' | 'finite differences': {'abs': worst, 'rel': worst}} over the arguments."""
    worst: dict[str, dict[str, float]] = {}
    for c in check.report.comparisons:
        entry = worst.setdefault(c.against, {"abs": 0.0, "rel": 0.0})
        entry["abs"], entry["rel"] = max(entry["abs"], c.worst_abs), max(entry["rel"], c.worst_rel)
    return worst


def describe_check(check: LayerCheck) -> str:
    """A few lines: which layer was checked, against what, and the worst errors."""
    rows = {name.replace("reference", "a plain jnp batch norm"): e for name, e in worst_errors(check).items()}
    report = check.report
    lines = [
        f"check_vjp, batch-norm layer {check.layer + 1} of the network trained with {check.optimizer} "
        f"(input: a training batch, {check.input_shape[0]} examples x {check.input_shape[1]} features; float64):"
    ]
    width = max(len(name) for name in rows)
    lines += [
        f"  vs {name:<{width}}  worst abs error {e['abs']:.2e}  worst rel error {e['rel']:.2e}"
        for name, e in rows.items()
    ]
    verdict = "passed" if report.passed else "FAILED"
    lines.append(f"  {verdict} (tolerance: abs error <= {report.atol:g} + {report.rtol:g} * scale)")
    return "\n".join(lines)
