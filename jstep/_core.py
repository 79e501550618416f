"""Pieces every jstep transformation shares: validation, schedules, dtypes, counters.

Nothing here is an algorithm of the notes; it is the plumbing the section modules
(`averages`, `momentum`, `adaptive`, `adam`, `batch_norm`) would otherwise each repeat.
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jstep import quantization

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


# --------------------------------------------------------------------------- validation


def _shown(value: Any) -> str:
    """The type and repr of `value` for an error message, the repr cut at 80 characters."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def _is_real_scalar_array(value: Any) -> bool:
    """A 0-d JAX or NumPy array (a tracer included) of an integer or real floating dtype."""
    if not isinstance(value, (jax.Array, np.ndarray)) or jnp.shape(value) != ():
        return False
    dtype = value.dtype  # not jnp.result_type: that refuses string and object arrays
    return bool(jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))


def check_number(
    name: str,
    value: Any,
    *,
    low: float = 0.0,
    high: float | None = None,
    schedule: bool = False,
    high_included: bool = False,
) -> None:
    """Check a hyperparameter: a Python number in [low, high) ([low, high] with
    `high_included`), a scalar array, or (with `schedule`) a callable.

    A Python (or NumPy scalar) number is checked against [low, high). A 0-d JAX or NumPy
    array of a real dtype (as `optax.inject_hyperparams` passes every hyperparameter, a
    tracer under `jit`) and, where the argument takes one, a schedule ``count -> value``
    are accepted unchecked: their values are not known when the transformation is built.
    Anything else (a string from a config file, None, a list, a bool, a complex number,
    an array of another shape) is a TypeError naming `name`, the value and what is allowed.
    """
    if schedule and callable(value):
        return
    if _is_real_scalar_array(value):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        array = "a scalar JAX/NumPy array (as optax.inject_hyperparams passes it)"
        if schedule:
            allowed = f"a Python number, {array} or a schedule (a callable count -> value)"
        else:
            allowed = f"a Python number or {array}"
        raise TypeError(f"{name} must be {allowed}, got {_shown(value)}")
    allowed = f"[{low:g}, {high:g}{']' if high_included else ')'}" if high is not None else f"[{low:g}, inf)"
    number = float(value)
    below_high = high is None or number < high or (high_included and number == high)
    in_range = math.isfinite(number) and number >= low and below_high
    if not in_range:
        raise ValueError(f"{name} must be in {allowed}, got {value!r}")


def check_decay(name: str, value: Any, *, schedule: bool = False) -> None:
    """A decay rate (gamma, b1, b2, rho, momentum) must lie in [0, 1)."""
    check_number(name, value, low=0.0, high=1.0, schedule=schedule)


def check_running_momentum(name: str, value: Any) -> None:
    """The running statistics' gamma must lie in [0, 1]: 1 keeps them as they are, as Flax's
    and Equinox's momentum=1 and PyTorch's momentum=0 do."""
    check_number(name, value, low=0.0, high=1.0, high_included=True)


def check_learning_rate(learning_rate: ScalarOrSchedule) -> None:
    """A learning rate is a schedule (not checked), a scalar array or a number >= 0."""
    check_number("learning_rate", learning_rate, low=0.0, schedule=True)


def check_rounding_seed(rounding_seed: Any) -> None:
    """`rounding_seed` is None, an int in [0, 2^31), or an integer scalar array (as
    `optax.inject_hyperparams` passes it); anything else is a TypeError or ValueError."""
    if rounding_seed is None:
        return
    dtype = getattr(rounding_seed, "dtype", None)
    if dtype is not None and not isinstance(rounding_seed, numbers.Integral):
        if jnp.issubdtype(dtype, jnp.integer) and jnp.shape(rounding_seed) == ():
            return  # an array: its value is not known here
        raise TypeError(
            f"rounding_seed must be an int or None, got an array of dtype {dtype} and shape {jnp.shape(rounding_seed)}"
        )
    if isinstance(rounding_seed, bool) or not isinstance(rounding_seed, numbers.Integral):
        raise TypeError(
            f"rounding_seed must be an int (the seed of the stochastic rounding of narrow state) or None, "
            f"got {type(rounding_seed).__name__} {rounding_seed!r}"
        )
    if not 0 <= int(rounding_seed) < 2**31:
        raise ValueError(f"rounding_seed must be in [0, 2^31), got {rounding_seed}")


def check_state_dtype(name: str, dtype: Any) -> None:
    """A state dtype (accumulator_dtype, mu_dtype, nu_dtype) is None, a floating or complex dtype,
    or a block-wise format (``jstep.blockwise(8)``).

    An array in its place is what ``optax.inject_hyperparams`` passes for a dtype given as
    ``jnp.bfloat16``: that is callable, so it is taken for a schedule and called with the
    step count. The TypeError then says how to keep the dtype a dtype.
    """
    if dtype is None or isinstance(dtype, quantization.BlockwiseFormat):
        return
    if isinstance(dtype, (jax.Array, np.ndarray)):
        raise TypeError(
            f"{name} must be None or a floating dtype such as jnp.bfloat16, got {_shown(dtype)}. "
            "optax.inject_hyperparams takes a dtype class such as jnp.bfloat16 for a schedule (it is "
            f"callable) and passes its value: name it static, optax.inject_hyperparams(factory, "
            f"static_args=('{name}',)), or pass {name}=jnp.dtype(jnp.bfloat16)"
        )
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(
            f"{name} must be None, a floating dtype such as jnp.bfloat16 or a format such as jstep.blockwise(8), "
            f"got {dtype!r}"
        ) from None
    if not jnp.issubdtype(resolved, jnp.inexact):
        raise TypeError(
            f"{name} must be None, a floating dtype such as jnp.bfloat16 or a format such as jstep.blockwise(8), "
            f"got {resolved}"
        )


def check_static_number(name: str, value: Any, *, low: float = 0.0, high: float | None = None) -> float:
    """A setting fixed when a function is traced or a layer built (eps, a layer's r_max): a
    Python or NumPy real number in [low, high), as a float. A bool, a string, None, a list or
    an array (whose value is not known when traced) is a TypeError naming `name` and the value."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python or NumPy real number, got {_shown(value)}")
    check_number(name, value, low=low, high=high)
    return float(value)


def check_flag(name: str, value: Any, *, optional: bool = False) -> bool | None:
    """A switch (nesterov, centered, debias, use_bias, ...): True or False (a NumPy bool too), or
    None where `optional`; as a bool or None. A string from a config file ("false" is truthy) is
    a TypeError, not silently read as its truth value."""
    if value is None and optional:
        return None
    if not isinstance(value, (bool, np.bool_)):
        allowed = "True, False or None" if optional else "True or False"
        raise TypeError(f"{name} must be {allowed}, got {_shown(value)}")
    return bool(value)


_LEAVE_IT_OUT = (
    "leave it out with optax.masked, or give init only the floating arrays (in Equinox, "
    "eqx.filter(model, eqx.is_inexact_array))"
)


def check_floating_leaves(tree: Any) -> None:
    """Raise TypeError naming the first leaf that is not a floating or complex array."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        where = f"leaf {jax.tree_util.keystr(path) or '<root>'} of the tree given to init"
        try:
            dtype = jnp.result_type(leaf)
        except TypeError:  # not an array: a function or an activation of a model, say
            raise TypeError(f"{where} is {_shown(leaf)}, not an array; {_LEAVE_IT_OUT}.") from None
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{where} has dtype {dtype}; jstep transformations need floating or complex leaves. Cast it "
                f"(e.g. x.astype(jnp.float32)), {_LEAVE_IT_OUT}."
            )


def check_same_shapes(
    updates: Any, state_tree: Any, *, holds_values: bool = False, name: str = "updates", against: str | None = None
) -> None:
    """Raise ValueError when `updates` is not shaped like the state `init` built.

    With `holds_values` (a state that stores the updates themselves: a velocity, Adam's m, an
    average) also raise TypeError where a complex update meets a real state dtype. `init`
    builds the dtype asked for, as Optax's does; Optax would then keep only the real part.
    `name` is what the messages call `updates`; `against` what they call `state_tree`, when
    it is not the state built by init (e.g. "the params").
    """
    expected = jax.tree.structure(state_tree)
    got = jax.tree.structure(updates)
    if got != expected:  # type: ignore[operator]  # PyTreeDef's comparison is untyped
        reference_name = against or "the optimizer state built by init"
        raise ValueError(
            f"the {name} tree does not match {reference_name}:\n"
            f"  {name}: {got}\n  {'state' if against is None else 'params'}:   {expected}"
            + ("" if against is not None else _restored_quantized_hint(state_tree) + _frozen_hint(updates))
        )
    for (path, leaf), reference in zip(
        jax.tree_util.tree_flatten_with_path(updates)[0], jax.tree.leaves(state_tree), strict=True
    ):
        if jnp.shape(leaf) != jnp.shape(reference):
            built = "init built the state for" if against is None else f"{against} have"
            raise ValueError(
                f"{name} leaf {jax.tree_util.keystr(path) or '<root>'} has shape "
                f"{jnp.shape(leaf)}, but {built} shape {jnp.shape(reference)}"
            )
        if holds_values and _is_complex(jnp.result_type(leaf)) and not _is_complex(jnp.result_type(reference)):
            raise TypeError(
                f"updates leaf {jax.tree_util.keystr(path) or '<root>'} is {jnp.result_type(leaf)}, but the "
                f"state that holds it is {jnp.result_type(reference)}: a real state cannot hold the complex "
                "values; give a complex state dtype (or None) for complex params"
            )


def _frozen_hint(updates: Any) -> str:
    """A sentence for updates with None leaves (the gradients of a frozen part), or ''."""
    if not any(leaf is None for leaf in jax.tree.leaves(updates, is_leaf=lambda leaf: leaf is None)):
        return ""
    return (
        "\nThe updates hold None (gradients of a frozen part) where init built state: give init the "
        "trainable params only, with None at the same places (in Equinox, the trainable half of "
        "eqx.partition, filtered by eqx.is_inexact_array), so that the trees match."
    )


def _restored_quantized_hint(state_tree: Any) -> str:
    """A sentence for a state holding a `jstep.QuantizedArray` restored as a dict of its codes and
    scale (a checkpoint of 8- or 4-bit state restored into a template with arrays there), or ''."""

    def codes_and_scale(node: Any) -> bool:
        return isinstance(node, dict) and {"codes", "scale"} <= set(node)

    for path, node in jax.tree_util.tree_flatten_with_path(state_tree, is_leaf=codes_and_scale)[0]:
        if codes_and_scale(node):
            return (
                f"\nThe state's {jax.tree_util.keystr(path)} is a dict of codes and scale: a quantized state "
                "(jstep.blockwise) restored into a template that holds arrays there, such as the init of an "
                "optimizer with float state. Restore into the init of the optimizer it was saved with, then "
                "convert each leaf into the new optimizer's init tree (README: changing a run's format)."
            )
    return ""


# ----------------------------------------------------------------------------- numerics


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype arithmetic runs in: at least float32 (bf16/fp16 are promoted)."""
    return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype: Any) -> jnp.dtype:
    """float32 for complex64, float64 for complex128, the dtype itself otherwise."""
    return jnp.finfo(dtype).dtype


def squared_magnitude(g: jax.Array) -> jax.Array:
    """g^2, or |g|^2 = Re(g conj(g)) for complex g, in the compute dtype."""
    g = g.astype(compute_dtype(g.dtype))
    if jnp.iscomplexobj(g):
        return jnp.real(g * jnp.conj(g))
    return g * g


def _is_complex(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.complexfloating)


def squares_dtype(dtype: Any) -> jnp.dtype:
    """The default dtype of a state of squared gradients for params of `dtype`.

    The params' dtype, except float16: its range cannot hold the squares of small gradients
    (its smallest number is 6e-8, so Adam's (1 - B2) g^2 with B2 = 0.999 is 0 for |g| under
    about 8e-3, and the step g / sqrt(v) grows without bound), so that state is float32, as
    mixed-precision training keeps it. bfloat16 has float32's range: its state stays
    bfloat16 (its rounding is what ``rounding_seed`` is for).
    """
    return jnp.dtype(jnp.float32) if jnp.dtype(dtype) == jnp.float16 else jnp.dtype(dtype)


def zeros_like_tree(
    tree: Any, dtype: Any = None, *, real: bool = False, squares: bool = False, nonnegative: bool = False
) -> Any:
    """Zeros shaped (and sharded) like each leaf; `dtype` overrides, `real` drops complex,
    `squares` (a state of squared gradients, when `dtype` is None) takes `squares_dtype`.

    A leaf may be a ``jax.ShapeDtypeStruct`` (abstract params): its zeros are placed with its
    sharding when it has one, so ``init`` of abstract params gives the state that
    ``jax.eval_shape(init, params)`` describes, already laid out across the devices.

    With a block-wise format (``jstep.blockwise``) as `dtype`, each leaf of at least its
    ``min_size`` elements is a `jstep.QuantizedArray` (its unsigned map when `nonnegative`:
    a state that only holds averages of squares), each smaller one float32.
    """
    return full_like_tree(tree, None, dtype, real=real, squares=squares, nonnegative=nonnegative)


def _zeros(leaf: Any, dtype: Any) -> jax.Array:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jnp.zeros(leaf.shape, dtype, device=leaf.sharding)
    # 0 * |leaf| (non-finite entries replaced), not a constant: under jit a constant has
    # no sharding to inherit and lands on one device, while a value computed from the
    # leaf gets the leaf's sharding from XLA's sharding propagation.
    magnitude = jnp.abs(leaf)
    return (jnp.where(jnp.isfinite(magnitude), magnitude, 0) * 0).astype(dtype)


def full_like_tree(
    tree: Any, value: Any, dtype: Any = None, *, real: bool = False, squares: bool = False, nonnegative: bool = False
) -> Any:
    """`zeros_like_tree` filled with `value` (initial accumulators; None: zeros).

    A leaf wrapped in a Flax NNX Variable (``nnx.Param``) gets its state in the same
    wrapper, as Optax's ``jax.tree.map`` gives it, except a `jstep.QuantizedArray`: that is
    left bare (`without_quantized_wrappers`).
    """

    def full(path, leaf):
        if isinstance(dtype, quantization.BlockwiseFormat):
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                raise TypeError(
                    f"leaf {jax.tree_util.keystr(path) or '<root>'} of the params has dtype {jnp.result_type(leaf)}, "
                    f"but a block-wise state format ({dtype!r}) holds real values; give None or a floating "
                    "dtype as the state dtype (mu_dtype, nu_dtype, accumulator_dtype) of complex params"
                )
            filled = _zeros(leaf, jnp.float32)
            if value is not None:
                filled = filled + jnp.asarray(value, jnp.float32)
            return quantization.state_leaf(filled, dtype, signed=not nonnegative, like=leaf)
        leaf_dtype = dtype if dtype is not None else jnp.result_type(leaf)
        if squares and dtype is None:
            leaf_dtype = squares_dtype(leaf_dtype)
        if real:
            leaf_dtype = real_dtype(leaf_dtype)
        zeros = _zeros(leaf, leaf_dtype)
        return zeros if value is None else zeros + jnp.asarray(value, leaf_dtype)

    return without_quantized_wrappers(jax.tree_util.tree_map_with_path(full, tree))


def _positive_number(value: Any) -> bool:
    """True for a Python number that stays > 0 in float32 (fixed when the transformation is built)."""
    return isinstance(value, numbers.Real) and float(value) >= float(jnp.finfo(jnp.float32).tiny)


def adaptive_step(numerator: jax.Array, second_moment: jax.Array, *, eps: Any, eps_root: Any) -> jax.Array:
    """numerator / (sqrt(second_moment + eps_root) + eps), and 0 where that denominator is 0.

    The denominator is 0 only when every gradient seen so far was 0 (and eps = eps_root = 0),
    so the numerator is 0 too: the limit of the step is 0, not the NaN of 0/0.
    """
    dtype = compute_dtype(second_moment.dtype)
    denominator = jnp.sqrt(second_moment.astype(dtype) + eps_root) + eps
    numerator = numerator.astype(compute_dtype(numerator.dtype))
    if _positive_number(eps) or _positive_number(eps_root):  # known now: never 0, no guard
        return numerator / denominator
    safe = jnp.where(denominator > 0, denominator, 1)
    return jnp.where(denominator > 0, numerator / safe, 0)


# ------------------------------------------------------------------ Flax NNX Variables
#
# NNX params come in two forms. Split off a model (``nnx.split(model, nnx.Param)``), each
# array sits in an ``nnx.Param``, a pytree node with the array as its one child; this is
# what ``init`` sees in every NNX loop and what ``update`` sees in a functional one, where
# ``jax.grad`` gives gradients in the same wrappers. ``nnx.Optimizer`` calls ``init`` on the
# wrapped tree but ``update`` on pure trees (``nnx.as_pure``), and it keeps each leaf of the
# state in a Variable of its own: a Variable of the state becomes an ``OptVariable`` holding
# its value, any other array an ``OptArray``. It writes the new state back leaf by leaf
# (``nnx.update``), which replaces a Variable's value by the state's subtree there: a
# `jstep.QuantizedArray` inside a Variable would come back as a dict of its codes and scales,
# its layout lost. So a quantized state leaf never carries the param's wrapper, and each
# ``update`` that holds state runs on the trees without wrappers (`sees_through_variables`).
# Flax is never imported here: no tree holds a Variable unless the user imported flax.nnx.


def _variable_class() -> type | None:
    """``flax.nnx.Variable`` where Flax NNX is imported, else None (no tree can hold one)."""
    return getattr(sys.modules.get("flax.nnx"), "Variable", None)


def _map_variables(rule: Callable[[Any], Any], tree: Any) -> Any:
    """`rule` applied to each NNX Variable of `tree` (every other leaf kept)."""
    variable = _variable_class()
    if variable is None:
        return tree
    return jax.tree.map(
        lambda x: rule(x) if isinstance(x, variable) else x, tree, is_leaf=lambda x: isinstance(x, variable)
    )


def has_variables(tree: Any) -> bool:
    """Whether `tree` holds a Flax NNX Variable (``nnx.Param`` and the like)."""
    variable = _variable_class()
    if variable is None:
        return False
    return any(isinstance(x, variable) for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, variable)))


def without_variables(tree: Any) -> Any:
    """`tree` with each Flax NNX Variable replaced by its value, as ``nnx.as_pure`` gives it."""
    return _map_variables(lambda v: v.get_value(), tree)


def without_quantized_wrappers(tree: Any) -> Any:
    """`tree` with each `jstep.QuantizedArray` that sits in a Flax NNX Variable taken out of it.

    A Variable's metadata (its sharding names, one per axis) describes an array of the param's
    shape, which a quantized state's codes and scales are not; and ``nnx.Optimizer`` keeps a
    bare one as the two arrays it is made of, where it would lose a wrapped one's layout.
    """
    return _map_variables(lambda v: v.get_value() if quantization.is_quantized(v.get_value()) else v, tree)


def with_variables_of(pure: Any, like: Any) -> Any:
    """`pure`, a tree shaped like ``without_variables(like)``, in the Variables of `like`.

    A Variable is a pytree node with its value as the one child, so the leaves of `pure` in
    order fill `like`'s structure: each value lands in the wrapper (and metadata) that held
    the matching value of `like`.
    """
    if not has_variables(like):
        return pure
    return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(pure))


def sees_through_variables(update: Callable[..., tuple[Any, Any]]) -> Callable[..., tuple[Any, Any]]:
    """An ``update(updates, state, params=None, **extra_args)`` that also takes Flax NNX trees.

    Where `updates`, `state` or `params` hold NNX Variables (a functional NNX loop: params and
    gradients in ``nnx.Param``, the state as `init` built it, wrapped where Optax's would be
    and bare where quantized), `update` runs on the trees without them, and its updates come
    back in the wrappers of the incoming updates, its state in those of the incoming state.
    Pure trees (``nnx.Optimizer``, Linen, Equinox, plain Optax) go through untouched.
    """

    @functools.wraps(update)
    def update_pure(updates, state, params=None, **extra_args):
        if not has_variables((updates, state, params)):
            return update(updates, state, params, **extra_args)
        new_updates, new_state = update(
            without_variables(updates), without_variables(state), without_variables(params), **extra_args
        )
        return with_variables_of(new_updates, updates), with_variables_of(new_state, state)

    return update_pure


# ------------------------------------------------------------------ counters and schedules


def default_float() -> jnp.dtype:
    """float64 when the user enabled jax_enable_x64, else float32: the dtype of step scalars."""
    return jnp.result_type(float)


def increment(count: jax.Array) -> jax.Array:
    """count + 1, saturating at the dtype's maximum instead of wrapping to a negative."""
    top = jnp.iinfo(count.dtype).max
    return jnp.where(count < top, count + 1, count)


def new_count() -> jax.Array:
    """The step counter every state starts from: an int32 zero."""
    return jnp.zeros([], jnp.int32)


def learning_rate_at(learning_rate: ScalarOrSchedule, count: jax.Array) -> Any:
    """eta_t: the schedule evaluated at the number of steps already taken (Optax's convention)."""
    return learning_rate(count) if callable(learning_rate) else learning_rate


def bias_correction(decay: Any, count: jax.Array) -> jax.Array:
    """1 - decay^t: the total weight a zero-started moving average has put on its inputs."""
    return 1 - decay ** count.astype(default_float())


class CountState(NamedTuple):
    """State of a transformation that only counts steps (e.g. `sgd` with a schedule)."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in Optax's states


def descent(
    direction: optax.GradientTransformationExtraArgs, learning_rate: ScalarOrSchedule
) -> optax.GradientTransformationExtraArgs:
    """Turn a direction d_t into the update -eta_t d_t, eta_t read at the state's count.

    `direction`'s state must have a `count` field; the result keeps that same state, so
    `descent(scale_by_adam(...), lr)` checkpoints exactly like `scale_by_adam(...)`. Extra
    keyword arguments of ``update`` are passed on to `direction`.
    """
    check_learning_rate(learning_rate)

    def update(updates, state, params=None, **extra_args):
        eta = learning_rate_at(learning_rate, state.count)
        directions, new_state = direction.update(updates, state, params, **extra_args)
        return jax.tree.map(lambda d: (-eta * d).astype(d.dtype), directions), new_state

    return optax.GradientTransformationExtraArgs(direction.init, update)


def cast_like(tree: Any, like: Any) -> Any:
    """Cast each leaf of `tree` to the dtype of the matching leaf of `like`."""
    return jax.tree.map(lambda x, y: x.astype(jnp.result_type(y)), tree, like)


def unzip_pairs(pairs: Any, like: Any) -> tuple[Any, Any]:
    """Split a tree of (a, b) tuples, shaped like `like`, into a tree of a's and a tree of b's.

    A tree with no leaves (what ``optax.masked`` and ``optax.multi_transform`` hand a group
    with no parameters) gives two empty trees of its structure.
    """
    outer: Any = jax.tree.structure(like)  # PyTreeDef: its methods are untyped
    firsts, seconds = zip(*outer.flatten_up_to(pairs), strict=True) if outer.num_leaves else ((), ())
    return jax.tree.unflatten(outer, firsts), jax.tree.unflatten(outer, seconds)
