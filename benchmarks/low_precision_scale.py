"""Low precision at scale: compile time and step time of narrow optimizer state on many small leaves.

A network is hundreds of arrays, most of them small. Storing the optimizer's state narrow
(bfloat16, and later 8 or 4 bits) must not cost much more to compile, or to run, than storing
it by round-to-nearest. This script measures, in one process, for each configuration of the
table `CONFIGS` against its reference (the same step stored by round-to-nearest):

* compile time on `--compile-leaves` leaves (default 300): the wall time of
  ``jax.jit(step).lower(...).compile()``, the median of `--compiles` fresh compiles (a new
  function each time and ``jax.clear_caches()`` before it, so that no cache of JAX's or of
  XLA's helps), the contenders alternated; target: at most 1.5x the reference's;
* step time on `--step-leaves` leaves (default 1000): the jitted step (params, state, grads) ->
  (params, state), params and state donated, compile excluded (a warm-up call), the contenders
  alternated call by call (`_harness.interleaved_times`), median of `--repeats` calls and the
  paired ratio (median over repeats of the two side-by-side calls' ratio); target: at most 1.3x.

Leaves cycle through `SHAPES`, small and varied like a convolutional network's (biases and
batch-norm scales of 10 to 256 values, 1x1 and 3x3 kernels, small dense layers; 4155
elements on average, 1.2M parameters on 300 leaves, 4.2M on 1000). Params and gradients
are bfloat16; "nearest" stores the state in bfloat16 by round-to-nearest and adds the update
with ``jstep.apply_updates(params, updates)``; "stochastic" passes ``rounding_seed=0`` and
adds with ``jstep.apply_updates(..., key=fold_in(key(1), count))``, so every stored value
(params and state) is rounded stochastically.

    python benchmarks/low_precision_scale.py                 # all configurations
    python benchmarks/low_precision_scale.py --quick         # 3 compiles on 100 leaves, 10 repeats
    python benchmarks/low_precision_scale.py --configs "adam stochastic" --no-steps

Quantized state formats join the table where ``jstep.blockwise`` exists (guarded by
``hasattr``): their reference is the same optimizer with bfloat16 state by round-to-nearest.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jstep

from _harness import format_table, interleaved_times, machine_report, paired_ratio

LEARNING_RATE = 1e-3
BF16 = jnp.bfloat16
COMPILE_TARGET, STEP_TARGET = 1.5, 1.3

# A convolutional network's mix of small leaves (the cycle's mean is 4155 elements).
SHAPES: tuple[tuple[int, ...], ...] = (
    (64,), (128,), (3, 3, 16, 32), (32, 64), (1, 1, 64, 128),
    (128, 128), (10,), (3, 3, 32, 32), (256,), (64, 10),
)  # fmt: skip


class Config(NamedTuple):
    """One row: how to build the optimizer, whether the params are added with a key, and the row it is compared with."""

    make: Callable[[], optax.GradientTransformation]
    keyed: bool  # jstep.apply_updates(..., key=...) (stochastic rounding of the params too)
    reference: str | None  # the configuration this one is timed against (None: it is a reference)


def _adam(**state) -> Callable[[], optax.GradientTransformation]:
    return lambda: jstep.adam(LEARNING_RATE, **state)


def _momentum(**state) -> Callable[[], optax.GradientTransformation]:
    return lambda: jstep.momentum(LEARNING_RATE, 0.9, **state)


# The table of configurations. Quantized formats are added below where jstep has them.
CONFIGS: dict[str, Config] = {
    "adam nearest": Config(_adam(mu_dtype=BF16, nu_dtype=BF16), False, None),
    "adam stochastic": Config(_adam(mu_dtype=BF16, nu_dtype=BF16, rounding_seed=0), True, "adam nearest"),
    "momentum nearest": Config(_momentum(accumulator_dtype=BF16), False, None),
    "momentum stochastic": Config(_momentum(accumulator_dtype=BF16, rounding_seed=0), True, "momentum nearest"),
}
if hasattr(jstep, "blockwise"):  # 8- and 4-bit state (issue 16), once jstep has it
    for bits in (8, 4):
        fmt = jstep.blockwise(bits)
        CONFIGS[f"adam {bits}-bit"] = Config(_adam(mu_dtype=fmt, nu_dtype=fmt), False, "adam nearest")
        CONFIGS[f"adam {bits}-bit stochastic"] = Config(
            _adam(mu_dtype=fmt, nu_dtype=fmt, rounding_seed=0), True, "adam nearest"
        )
        CONFIGS[f"momentum {bits}-bit"] = Config(_momentum(accumulator_dtype=fmt), False, "momentum nearest")


def tree(leaves: int, seed: int) -> dict[str, jax.Array]:
    """`leaves` bfloat16 arrays of normal values, shapes cycling through SHAPES."""
    rng = np.random.default_rng(seed)
    return {
        f"leaf{i:05d}": jnp.asarray(rng.standard_normal(SHAPES[i % len(SHAPES)], dtype=np.float32), BF16)
        for i in range(leaves)
    }


def step_function(config: Config, optimizer: optax.GradientTransformation) -> Callable:
    """The (unjitted) step (params, state, grads) -> (params, state) of `config` (its state has a `count`)."""

    def step(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        key = jax.random.fold_in(jax.random.key(1), state.count) if config.keyed else None
        return jstep.apply_updates(params, updates, key=key), state

    return step


def compile_seconds(config: Config, params: Any, grads: Any) -> float:
    """Wall time of lowering and compiling `config`'s step, with every JAX cache cleared first."""
    jax.clear_caches()
    optimizer = config.make()
    state = jax.eval_shape(optimizer.init, params)
    jitted = jax.jit(step_function(config, optimizer), donate_argnums=(0, 1))  # a new function each time
    start = time.perf_counter()
    jitted.lower(params, state, grads).compile()
    return time.perf_counter() - start


def measure_compiles(names: list[str], leaves: int, compiles: int) -> dict[str, list[float]]:
    """Seconds per compile of each configuration, `compiles` rounds, the contenders alternated
    (every other round in the reverse order)."""
    params, grads = tree(leaves, 0), tree(leaves, 1)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(compiles):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(compile_seconds(CONFIGS[name], params, grads))
    return times


def measure_steps(names: list[str], leaves: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per step of each configuration (compile excluded, donated, alternated call by call)."""
    params, grads = tree(leaves, 0), tree(leaves, 1)
    steps, carries = {}, {}
    for name in names:
        optimizer = CONFIGS[name].make()
        jitted = jax.jit(step_function(CONFIGS[name], optimizer), donate_argnums=(0, 1))
        carries[name] = (jax.tree.map(jnp.copy, params), optimizer.init(params))
        steps[name] = lambda p, s, step=jitted: step(p, s, grads)
    return interleaved_times(steps, carries, repeats)


def with_references(names: list[str]) -> list[str]:
    """`names` and the references they are compared with, references first."""
    wanted = set(names) | {CONFIGS[n].reference for n in names if CONFIGS[n].reference}
    return [n for n in CONFIGS if n in wanted and CONFIGS[n].reference is None] + [
        n for n in CONFIGS if n in wanted and CONFIGS[n].reference is not None
    ]


def rows(times: dict[str, list[float]], unit: float, target: float) -> list[list[str]]:
    """One row per configuration: median, ratio of medians to its reference and paired ratio, within target."""
    out = []
    for name, ts in times.items():
        median = statistics.median(ts)
        reference = CONFIGS[name].reference
        if reference is None:
            out.append([name, "-", f"{median * unit:.2f}", "-", "-", "-"])
            continue
        ratio = median / statistics.median(times[reference])
        paired = paired_ratio(ts, times[reference])
        verdict = "yes" if max(ratio, paired) <= target else "NO"
        out.append([name, reference, f"{median * unit:.2f}", f"{ratio:.2f}", f"{paired:.2f}", verdict])
    return out


def load() -> str:
    """The load averages (`uptime`), since other work on the machine moves the figures."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "uptime unavailable"


def lscpu_model() -> str:
    """`lscpu`'s Model name."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "lscpu unavailable"
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "?")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    parser.add_argument("--compile-leaves", type=int, default=None, help="leaves for compile time (default 300)")
    parser.add_argument("--step-leaves", type=int, default=None, help="leaves for step time (default 1000)")
    parser.add_argument("--compiles", type=int, default=None, help="fresh compiles per configuration (default 5)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per configuration (default 50)")
    parser.add_argument("--quick", action="store_true", help="3 compiles on 100 leaves, 10 steps on 300")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="time compiles")
    parser.add_argument("--steps", action=argparse.BooleanOptionalAction, default=True, help="time steps")
    args = parser.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    names = with_references(names)
    compile_leaves = args.compile_leaves or (100 if args.quick else 300)
    step_leaves = args.step_leaves or (300 if args.quick else 1000)
    compiles = args.compiles or (3 if args.quick else 5)
    repeats = args.repeats or (10 if args.quick else 50)

    print(machine_report())
    print(f"lscpu Model name: {lscpu_model()}")
    print(f"jax {jax.__version__}; configurations: {', '.join(names)}")
    print(f"leaf shapes (cycled): {', '.join(str(s) for s in SHAPES)}; bfloat16 params and gradients")
    header = ["configuration", "against", "", "ratio", "paired", ""]
    if args.compile:
        count = sum(math.prod(SHAPES[i % len(SHAPES)]) for i in range(compile_leaves))
        print(f"\nload before compiles: {load()}")
        times = measure_compiles(names, compile_leaves, compiles)
        print(f"load after compiles:  {load()}")
        print(f"\ncompile time (lower + compile), {compile_leaves} leaves ({count:,} parameters), "
              f"median of {compiles} fresh compiles\n")  # fmt: skip
        header[2], header[5] = "seconds", f"<= {COMPILE_TARGET}x"
        print(format_table(header, rows(times, 1.0, COMPILE_TARGET), text_columns=2))
    if args.steps:
        count = sum(math.prod(SHAPES[i % len(SHAPES)]) for i in range(step_leaves))
        print(f"\nload before steps: {load()}")
        times = measure_steps(names, step_leaves, repeats)
        print(f"load after steps:  {load()}")
        print(f"\nstep time, {step_leaves} leaves ({count:,} parameters), median of {repeats} calls, donated\n")
        header[2], header[5] = "ms", f"<= {STEP_TARGET}x"
        print(format_table(header, rows(times, 1e3, STEP_TARGET), text_columns=2))
    print(
        """
against: the configuration it is compared with (the same optimizer, state in bfloat16 by round-to-nearest)
ratio:   median / the reference's median; paired: median over rounds of the two side-by-side runs' ratio
last:    whether both ratios are within the target"""
    )


if __name__ == "__main__":
    main()
