"""Gradient checking: `check_vjp` compares a function's VJP with independent references.

For f(a_1, ..., a_n) and a fixed random output cotangent u, the VJP gives, per argument,
g_i = (df/da_i)^T u. It is compared, in float64, with

* autodiff of a `reference` implementation: g_i_ref = (d reference/da_i)^T u, elementwise;
* central finite differences along random directions v, scaled like the spread of a_i (so
  that the step h is relative to how much the argument varies, whatever its scale or offset):
  <g_i, v> must equal
  d/dh <u, f(.., a_i + h v, ..)> at h = 0, estimated by Richardson-extrapolated central
  differences, [8 (f(h/2) - f(-h/2)) - (f(h) - f(-h))] / (6 h), whose error is O(h^4).

``order=2`` applies the same comparisons to the function a -> vjp(f)(a)(u), i.e. checks the
derivative of the VJP itself (what grad-of-grad and Hessian-vector products use).

An argument passes when worst |error| <= atol + rtol * scale, with scale the largest magnitude
of the reference quantity for that argument (so the relative error reported is normwise,
robust to entries that happen to be near 0).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One line of the report: the VJP of one argument against one reference."""

    order: int
    argument: str
    against: str
    worst_abs: float
    worst_rel: float
    passed: bool


@dataclasses.dataclass(frozen=True)
class VjpReport:
    """What `check_vjp` measured; ``str(report)`` is a readable table."""

    function: str
    rtol: float
    atol: float
    comparisons: tuple[Comparison, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        header = ("order", "argument", "against", "worst abs err", "worst rel err", "")
        rows = [header] + [
            (
                str(c.order),
                c.argument,
                c.against,
                f"{c.worst_abs:.3e}",
                f"{c.worst_rel:.3e}",
                "ok" if c.passed else "FAIL",
            )
            for c in self.comparisons
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        rule = f"pass when abs err <= {self.atol:g} + {self.rtol:g} * scale"
        title = f"check_vjp({self.function}): {verdict} ({rule})"
        return "\n".join([title, *lines])


# The cotangents and directions of `seed` come from default_rng((seed, _STREAM)), a stream that
# differs from default_rng(seed)'s, from which test data is often drawn.
_STREAM = 0x766A70


def check_vjp(
    f: Callable[..., Any],
    *args: Any,
    reference: Callable[..., Any] | None = None,
    order: int = 1,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    directions: int = 3,
    step: float = 1e-3,
    seed: int = 0,
) -> VjpReport:
    """Check the VJP of `f` at `args` against autodiff of `reference` and finite differences.

    Runs in float64 (floating inputs are promoted; x64 is enabled only inside this call).

    Args:
      f: the function under test, taking pytrees of floating arrays and returning a pytree of
        floating arrays (typically one with a hand-derived derivative, `jax.custom_vjp` or
        `jax.custom_jvp`).
      *args: where to check it.
      reference: an independent implementation of the same function, differentiated by JAX.
      order: 1 checks the VJP; 2 also checks the VJP of the VJP (second derivatives). Where
        `f` has no second derivative the order-2 errors are NaN and the check fails, rightly:
        batch norm with eps outside the square root (``eps_in_sqrt=False``, sqrt(var) + eps) at
        a constant feature, where sqrt(var) is not differentiable.
      rtol, atol: the tolerance, worst |error| <= atol + rtol * scale (see the module).
      directions: random directions per argument for the finite differences; 0 skips them,
        for a VJP that is by design not the derivative of `f` (batch renormalization's holds
        r and d constant): it is then checked against autodiff of `reference` alone (f with
        r and d under ``jax.lax.stop_gradient``), which must be given.
      step: the finite-difference step h, relative to the argument: each leaf moves by h times
        its spread (the standard deviation of its elements; their RMS where they are all equal,
        1 where they are 0) along a random direction, so that arguments of any scale or offset
        are checked to the same relative accuracy (batch norm of x and of 1e5 + x alike; far
        beyond, float64 cannot hold a + h v finely enough). A function that varies on a much
        finer scale than its argument needs a smaller step (batch norm of a constant feature
        varies on the scale sqrt(eps) there).
      seed: seed of the random cotangents and directions: a stream of its own, not
        ``np.random.default_rng(seed)``'s, so that test data drawn from the same seed is
        never the cotangent itself.

    Returns:
      A `VjpReport`.

    Raises:
      AssertionError: with the report as its message, when any comparison fails.

    Example:
      `jstep.batch_norm`'s hand-derived VJP against autodiff of a plain transcription (the
      errors, elided here, depend on the machine):

      >>> import jax.numpy as jnp
      >>> import jstep
      >>> def plain(x, scale, offset):
      ...     mu = x.mean(axis=0)
      ...     return scale * (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(axis=0) + 1e-5) + offset
      >>> x = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 60.0], [6.0, 30.0]])
      >>> report = jstep.check_vjp(jstep.batch_norm, x, jnp.ones(2), jnp.zeros(2), reference=plain)
      >>> print(report)
      check_vjp(batch_norm): passed (pass when abs err <= 1e-09 + 1e-06 * scale)
      order  argument    against                worst abs err  worst rel err
      1      0 (x)       autodiff of reference  ...  ok
      1      1 (scale)   autodiff of reference  ...  ok
      1      2 (offset)  autodiff of reference  ...  ok
      1      0 (x)       finite differences     ...  ok
      1      1 (scale)   finite differences     ...  ok
      1      2 (offset)  finite differences     ...  ok
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 0:
        raise ValueError(f"directions must be an int >= 0, got {directions!r}")
    if directions == 0 and reference is None:
        raise ValueError(
            "directions=0 skips the finite differences, so a reference is needed to check against: "
            "give reference=, or directions >= 1"
        )
    with jax.enable_x64(True):
        args64 = tuple(_promote(a) for a in args)
        rng = np.random.default_rng((seed, _STREAM))
        names = _argument_names(f, len(args))
        comparisons = _compare(f, reference, args64, names, 1, rng, rtol, atol, directions, step)
        if order == 2:
            out = jax.eval_shape(f, *args64)
            u = _random_like(out, rng)
            second = _contracted_vjp(f, u)
            second_ref = None if reference is None else _contracted_vjp(reference, u)
            comparisons += _compare(second, second_ref, args64, names, 2, rng, rtol, atol, directions, step)
    report = VjpReport(getattr(f, "__name__", repr(f)), rtol, atol, tuple(comparisons))
    if not report.passed:
        raise AssertionError("\n" + str(report))
    return report


def _compare(f, reference, args, names, order, rng, rtol, atol, directions, step) -> list[Comparison]:
    f = jax.jit(f)  # evaluated many times at the same shapes below
    out, vjp_fn = jax.vjp(f, *args)
    u = _random_like(out, rng)
    grads = vjp_fn(u)
    results = []
    if reference is not None:
        ref_grads = jax.vjp(jax.jit(reference), *args)[1](u)
        for name, g, r in zip(names, grads, ref_grads, strict=True):
            error = _max_abs(jax.tree.map(jnp.subtract, g, r))
            results.append(_judge(order, name, "autodiff of reference", error, _max_abs(r), rtol, atol))
    for i, (name, g) in enumerate(zip(names, grads, strict=True)):
        predicted, measured = [], []
        for _ in range(directions):
            v = _random_direction(args[i], rng)
            predicted.append(_inner(g, v))
            measured.append(_directional_derivative(f, args, i, v, u, step))
        if not directions:
            continue
        error = float(np.max(np.abs(np.subtract(predicted, measured))))
        results.append(_judge(order, name, "finite differences", error, float(np.max(np.abs(measured))), rtol, atol))
    return results


def _judge(order, name, against, error, scale, rtol, atol) -> Comparison:
    relative = error / scale if scale > 0 else (0.0 if error == 0 else float("inf"))
    return Comparison(order, name, against, error, relative, bool(error <= atol + rtol * scale))


def _random_direction(tree, rng):
    """A random direction v scaled like `tree`: per leaf, standard normal times the leaf's
    spread (`_spread`), so that a + h v moves each leaf by about h of how much it varies."""
    return jax.tree.map(lambda leaf, v: v * _spread(leaf), tree, _random_like(tree, rng))


def _directional_derivative(f, args, i, v, u, step) -> float:
    """d/dh <u, f(a_1, .., a_i + h v, ..)> at h = 0, Richardson-extrapolated central differences.

    `v` is scaled like the argument (`_random_direction`), so the step h = `step` is relative to
    each leaf's spread: the same relative accuracy for arguments of any scale or offset.
    """

    def at(h):
        moved = list(args)
        moved[i] = jax.tree.map(lambda a, d: a + h * d, args[i], v)
        return _inner(u, f(*moved))

    wide = (at(step) - at(-step)) / (2 * step)
    narrow = (at(step / 2) - at(-step / 2)) / step
    return (4 * narrow - wide) / 3


def _contracted_vjp(f, u):
    """a -> vjp(f)(a)(u): the function whose VJP is f's second derivative contracted with u."""

    def vjp_of_f(*args):
        return jax.vjp(f, *args)[1](u)

    vjp_of_f.__name__ = f"vjp({getattr(f, '__name__', 'f')})"
    return vjp_of_f


def _promote(tree):
    def one(a):
        a = jnp.asarray(a)
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"check_vjp differentiates floating arguments only, got dtype {a.dtype}")
        return a.astype(jnp.float64)

    return jax.tree.map(one, tree)


def _random_like(tree, rng):
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float64), tree)


def _inner(a, b) -> float:
    return float(sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)))


def _max_abs(tree) -> float:
    return float(max((jnp.max(jnp.abs(leaf)) for leaf in jax.tree.leaves(tree) if leaf.size), default=0.0))


def _spread(leaf) -> float:
    """The standard deviation of the leaf's elements (two-pass); their RMS where they are all
    equal (a scalar, a constant); 1 where they are 0 or there are none."""
    values = np.asarray(leaf, np.float64).ravel()
    if not values.size:
        return 1.0
    deviation = float(np.sqrt(np.mean(np.square(values - values.mean()))))
    return deviation or float(np.sqrt(np.mean(np.square(values)))) or 1.0


def _argument_names(f, count: int) -> Sequence[str]:
    try:
        params = list(inspect.signature(f).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= count:
        return [f"{i} ({positional[i]})" for i in range(count)]
    return [str(i) for i in range(count)]
