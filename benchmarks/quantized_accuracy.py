"""Accuracy of 8- and 4-bit optimizer state against float32 (the figures of the README's "8- and
4-bit optimizer state").

1. The digits network of the main job (`jstep._demo`: 64-128-BN-relu-64-BN-relu-10) trained with
   Adam (lr 0.002, batches of 128) from the same initialisation and batches, once with float32
   m and v and once per block-wise format and rounding; test accuracy per seed, and its
   difference to float32's. Targets: 8-bit within 0.5 points, 4-bit within 1.0.
2. One block of 256 params whose gradients span six decades (element i's scale 10^(-6 i/255),
   times z + shift with z ~ N(0, 1)), Adam lr 1e-3 with both moments in the format
   (``min_size=0``): the largest |update| over all steps and elements, in learning rates.
   Target: at most 3.

    python benchmarks/quantized_accuracy.py [--seeds 5] [--steps 1000] [--block-steps 1000]

Prints the machine first. Deterministic: the same seeds give the same figures on one machine.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jstep
from jstep import _demo

from _harness import format_table, machine_report

FORMATS = (None, "blockwise8", "blockwise4")
TARGET_POINTS = {"blockwise8": 0.5, "blockwise4": 1.0}
TARGET_STEP = 3.0
BLOCK, BLOCK_LEARNING_RATE = 256, 1e-3
# Gradient shapes inside the block: z + shift, z ~ N(0, 1) (shift 0: the sign flips at random;
# 0.5: a drift half the noise), and 1 + 0.3 z (one sign, 30% noise).
GRADIENT_KINDS = {"random sign": (1.0, 0.0), "drift 0.5": (1.0, 0.5), "one sign": (0.3, 1.0)}


def label(state_format: str | None, stochastic: bool) -> str:
    return "float32" if state_format is None else _demo.describe_precision("float32", stochastic, state_format)


def digits_accuracy(seeds: int, steps: int) -> None:
    data = _demo.digits_dataset()
    runs = [(None, False)] + [(f, stochastic) for f in FORMATS[1:] for stochastic in (False, True)]
    accuracy = {run: [] for run in runs}
    loss = {run: [] for run in runs}
    for seed in range(seeds):
        batches = _demo.batch_indices(seed, len(data.y_train), 128, steps)
        init = _demo.init_mlp(jax.random.key(seed), _demo.batch_norm_layer())
        for state_format, stochastic in runs:
            result = _demo.train(
                "adam", init, data, batches, state_format=state_format, stochastic_rounding=stochastic, seed=seed
            )
            accuracy[state_format, stochastic].append(100 * result.test_accuracy)
            loss[state_format, stochastic].append(result.final_train_loss)
    baseline = np.array(accuracy[None, False])
    rows = []
    for run in runs:
        points = np.array(accuracy[run])
        change = points - baseline
        target = TARGET_POINTS.get(run[0])
        verdict = "" if target is None else ("yes" if np.abs(change).max() <= target else "NO")
        rows.append(
            [
                label(*run),
                " ".join(f"{p:.1f}" for p in points),
                f"{points.mean():.2f}",
                f"{change.mean():+.2f}",
                f"{np.abs(change).max():.2f}",
                f"{np.mean(loss[run]):.5f}",
                "" if target is None else f"<= {target} pt: {verdict}",
            ]
        )
    header = ["state", "test accuracy per seed (%)", "mean", "mean change", "worst |change|", "train loss", "target"]
    print(f"\nAdam on the digits, {steps} steps of 128, seeds 0..{seeds - 1} (one test example = 0.34 points):")
    print(format_table(header, rows, text_columns=2))


def gradients(kind: str, seed: int, steps: int) -> jax.Array:
    spread, shift = GRADIENT_KINDS[kind]
    magnitudes = 10.0 ** (-6.0 * np.arange(BLOCK) / (BLOCK - 1))
    noise = shift + spread * np.random.default_rng(seed).standard_normal((steps, BLOCK))
    return jnp.asarray(magnitudes * noise, jnp.float32)


def largest_step(optimizer, grads: jax.Array) -> float:
    """max over steps and elements of |u_t|."""
    params = jnp.zeros(grads.shape[1], jnp.float32)

    def step(state, g):
        updates, state = optimizer.update(g, state, params)
        return state, jnp.max(jnp.abs(updates))

    _, sizes = jax.jit(lambda state, gs: jax.lax.scan(step, state, gs))(optimizer.init(params), grads)
    return float(jnp.max(sizes))


def six_decades(seeds: int, steps: int) -> None:
    runs = [(None, False)] + [(f, stochastic) for f in FORMATS[1:] for stochastic in (False, True)]
    rows = []
    for state_format, stochastic in runs:
        fmt = None if state_format is None else jstep.blockwise(_demo.STATE_FORMATS[state_format].bits, min_size=0)
        optimizer = jstep.adam(BLOCK_LEARNING_RATE, mu_dtype=fmt, nu_dtype=fmt, rounding_seed=0 if stochastic else None)
        worst = {
            kind: max(largest_step(optimizer, gradients(kind, seed, steps)) for seed in range(seeds))
            for kind in GRADIENT_KINDS
        }
        rows.append(
            [label(state_format, stochastic)]
            + [f"{value / BLOCK_LEARNING_RATE:.2f}" for value in worst.values()]
            + ["yes" if max(worst.values()) <= TARGET_STEP * BLOCK_LEARNING_RATE else "NO"]
        )
    print(
        f"\nOne block of {BLOCK} params, gradients 1 .. 1e-6 inside it, Adam lr {BLOCK_LEARNING_RATE:g}, {steps} steps,"
        f" seeds 0..{seeds - 1}: the largest |update| in learning rates"
    )
    print(format_table(["state", *GRADIENT_KINDS, f"<= {TARGET_STEP:g} lr"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds per configuration (default 5)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps on the digits (default 1000)")
    parser.add_argument("--block-steps", type=int, default=1000, help="steps of the six-decade block (default 1000)")
    args = parser.parse_args()
    print(machine_report())
    six_decades(args.seeds, args.block_steps)
    digits_accuracy(args.seeds, args.steps)


if __name__ == "__main__":
    main()
