"""Batch norm inside a network: a Flax NNX convnet's training step with three normalizations.

One jitted training step of the same network, ``loss, grads = value_and_grad(cross-entropy)``,
then ``jstep.adam``'s update and ``optax.apply_updates``, with params, batch statistics and
optimizer state donated and fed back. The contenders differ only in the layer after each
convolution:

- ``nnx``: ``flax.nnx.BatchNorm`` (autodiff through its normalization);
- ``jstep``: ``jstep.nnx.BatchNorm`` (``jstep.batch_norm``: two-pass statistics, the notes'
  hand-derived backward);
- ``none``: no normalization at all, the floor both others pay.

Batch norm's own cost in the network is (jstep - none) / (nnx - none): what jstep's layer adds
to the step over what Flax's adds. It is printed from the medians and as the median over
repeats of the same ratio within one repeat (robust to load that drifts during a run). The
contenders alternate call by call in this one process, compilation excluded (one warm-up call),
every call waits for its outputs; the table also shows what each compiled step reads and
writes (XLA's cost analysis), and the difference to ``none`` is batch norm's share of it.

Before timing, one step of ``jstep`` and ``nnx`` from the same weights and batch is checked to
give the same loss, gradients and running statistics (float32 tolerances).

What the compiled step shows (XLA:CPU, jax 0.10.2), per normalized activation of A bytes
(``HLO MiB accessed`` less ``none``'s; A summed over the six layers is 14 MiB here): jstep's
layer adds about 9 A of traffic, Flax's 13 A. jstep's are the forward's two statistics passes
(2 reads; the normalization fuses with the relu, and with the transpose that feeds the next
convolution's weight gradient, so y is never written); the backward's two sums (sum dZhat reads
the relu backward's output, which the network without a norm writes too, and sum dZhat Z reads
it and Z: 3 reads); and the input gradient (read dZhat and Z, write dZ for the convolution's
input gradient: 3), which XLA also recomputes inside the weight gradient's transpose rather
than reading dZ (1 more read). No x - mu, no converts, no extra copies. Flax's adds a written
x - mu, a written dZhat (x - mu) product and a third reduction. Two things were tried and left
out: the two sums as one two-output reduction (one read fewer, but XLA:CPU runs such a
reduction several times slower) and an optimization barrier on dZ (XLA keeps the same kernels).

Models (NHWC, float32):

- ``convnet`` (the default): six conv + norm + relu blocks in three stages of 16, 32 and 64
  channels (the first block of the second and third strided), global average pooling and a
  dense layer, 32x32x3 images, batch 64;
- ``resnet18`` (``--gpu-resnet18``): a ResNet-18-sized network (7x7 stem, max pool, four stages
  of two basic blocks, 64 to 512 channels, 1000 classes) on 224x224 images at batch 128, the
  figure to take on a GPU; ``--tiny`` shrinks it (8x narrower, 32x32 images, batch 8) so that
  the same code path runs on a CPU (about a minute on 2 cores, mostly compilation).

    python benchmarks/convnet.py                         # the convnet, 30 repeats
    python benchmarks/convnet.py --repeats 100           # steadier medians on a busy machine
    python benchmarks/convnet.py --gpu-resnet18          # ResNet-18 at batch 128 (for a GPU)
    python benchmarks/convnet.py --gpu-resnet18 --tiny --repeats 3   # its CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jstep
import jstep.nnx

from _harness import compiled_figures, format_table, interleaved_times, machine_report

NORMS = ("nnx", "jstep", "none")
MOMENTUM = 0.9
LEARNING_RATE = 1e-3


def norm_layer(kind: str, channels: int, rngs: nnx.Rngs) -> Callable[[jax.Array], jax.Array]:
    """The layer after a convolution: Flax's batch norm, jstep's, or nothing."""
    if kind == "nnx":
        return nnx.BatchNorm(channels, momentum=MOMENTUM, use_running_average=False, rngs=rngs)
    if kind == "jstep":
        return jstep.nnx.BatchNorm(channels, momentum=MOMENTUM, use_running_average=False, rngs=rngs)
    if kind == "none":
        return lambda x: x
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class ConvNormRelu(nnx.Module):
    """relu(norm(conv(x))), the conv without a bias (the norm's offset takes its place)."""

    def __init__(self, norm: str, c_in: int, c_out: int, kernel: int, stride: int, rngs: nnx.Rngs, relu: bool = True):
        self.conv = nnx.Conv(c_in, c_out, (kernel, kernel), strides=stride, padding="SAME", use_bias=False, rngs=rngs)
        self.norm = norm_layer(norm, c_out, rngs)
        self.relu = relu

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.norm(self.conv(x))
        return nnx.relu(y) if self.relu else y


class ConvNet(nnx.Module):
    """Stages of conv + norm + relu blocks (the first block of every stage but the first
    strided), global average pooling, dense: CIFAR's plain 20-layer net, shortened."""

    def __init__(self, norm: str, stages: Sequence[tuple[int, int]], classes: int, rngs: nnx.Rngs):
        layers, c_in = [], 3
        for stage, (width, blocks) in enumerate(stages):
            for i in range(blocks):
                layers.append(ConvNormRelu(norm, c_in, width, 3, 2 if stage > 0 and i == 0 else 1, rngs))
                c_in = width
        self.layers = nnx.List(layers)
        self.head = nnx.Linear(c_in, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


class BasicBlock(nnx.Module):
    """ResNet's basic block: relu(norm(conv(relu(norm(conv(x))))) + shortcut(x))."""

    def __init__(self, norm: str, c_in: int, c_out: int, stride: int, rngs: nnx.Rngs):
        self.first = ConvNormRelu(norm, c_in, c_out, 3, stride, rngs)
        self.second = ConvNormRelu(norm, c_out, c_out, 3, 1, rngs, relu=False)
        downsample = stride != 1 or c_in != c_out
        self.shortcut = ConvNormRelu(norm, c_in, c_out, 1, stride, rngs, relu=False) if downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return nnx.relu(self.second(self.first(x)) + shortcut)


class ResNet18(nnx.Module):
    """ResNet-18 (He et al. 2016): 7x7/2 stem and 3x3/2 max pool, four stages of two basic
    blocks (`width`, 2 `width`, 4 `width`, 8 `width` channels), global pooling, dense."""

    def __init__(self, norm: str, width: int, classes: int, rngs: nnx.Rngs):
        self.stem = ConvNormRelu(norm, 3, width, 7, 2, rngs)
        blocks, c_in = [], width
        for stage in range(4):
            c_out = width * 2**stage
            for i in range(2):
                blocks.append(BasicBlock(norm, c_in, c_out, 2 if stage > 0 and i == 0 else 1, rngs))
                c_in = c_out
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(c_in, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.stem(x)
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


def build(model: str, norm: str, tiny: bool) -> tuple[nnx.Module, tuple[int, ...], int]:
    """(the network with this norm, the input batch's shape, the number of classes)."""
    rngs = nnx.Rngs(0)  # the same weights for every norm
    if model == "convnet":
        return ConvNet(norm, ((16, 2), (32, 2), (64, 2)), 10, rngs), (64, 32, 32, 3), 10
    if tiny:
        return ResNet18(norm, 8, 10, rngs), (8, 32, 32, 3), 10
    return ResNet18(norm, 64, 1000, rngs), (128, 224, 224, 3), 1000


def training_step(graphdef: Any, optimizer: optax.GradientTransformation):
    """(params, stats, opt_state, x, labels) -> (the same after one step): cross-entropy, adam."""

    def loss_fn(params, stats, x, labels):
        model = nnx.merge(graphdef, params, stats, copy=True)  # fresh Variables at this trace level
        logits = model(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, nnx.state(model, nnx.BatchStat)

    def step(params, stats, opt_state, x, labels):
        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, x, labels

    return step, loss_fn


def contenders(model: str, tiny: bool, seed: int = 0) -> tuple[dict, dict, dict]:
    """For each norm: the jitted, donated step, its initial carry, and its loss function."""
    optimizer = jstep.adam(LEARNING_RATE)
    steps, carries, losses = {}, {}, {}
    for norm in NORMS:
        network, shape, classes = build(model, norm, tiny)
        graphdef, params, stats = nnx.split(network, nnx.Param, nnx.BatchStat)
        rng = np.random.default_rng(seed)
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        labels = jnp.asarray(rng.integers(0, classes, shape[0]), jnp.int32)
        step, loss_fn = training_step(graphdef, optimizer)
        steps[norm] = jax.jit(step, donate_argnums=(0, 1, 2, 3, 4))
        carries[norm] = (params, stats, optimizer.init(params), x, labels)
        losses[norm] = loss_fn
    return steps, carries, losses


def check_agreement(losses: dict, carries: dict) -> None:
    """jstep's layer and Flax's give the same loss, gradients and running statistics."""

    def evaluate(norm):
        params, stats, _, x, labels = carries[norm]
        (loss, new_stats), grads = jax.jit(jax.value_and_grad(losses[norm], has_aux=True))(params, stats, x, labels)
        return loss, jax.tree.leaves(grads), jax.tree.leaves(new_stats)

    loss_j, grads_j, stats_j = evaluate("jstep")
    loss_f, grads_f, stats_f = evaluate("nnx")
    np.testing.assert_allclose(loss_j, loss_f, rtol=1e-5)
    for got, want in zip(grads_j + stats_j, grads_f + stats_f, strict=True):
        scale = float(np.max(np.abs(want))) or 1.0
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4 * scale)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per contender (default 30)")
    parser.add_argument(
        "--gpu-resnet18", action="store_true", help="a ResNet-18-sized network at batch 128 on 224x224 (for a GPU)"
    )
    parser.add_argument("--tiny", action="store_true", help="with --gpu-resnet18: 8x narrower, 32x32 images, batch 8")
    args = parser.parse_args(argv)
    model = "resnet18" if args.gpu_resnet18 else "convnet"
    if args.tiny and model != "resnet18":
        parser.error("--tiny shrinks the --gpu-resnet18 network; the convnet is already small")

    print(machine_report())
    steps, carries, losses = contenders(model, args.tiny)
    check_agreement(losses, carries)
    accessed = {norm: compiled_figures(steps[norm], *carries[norm])[1] for norm in NORMS}
    times = interleaved_times(steps, carries, args.repeats)
    medians = {norm: statistics.median(ts) for norm, ts in times.items()}

    shape = build(model, "none", args.tiny)[1]
    print(f"\n{model}{' (tiny)' if args.tiny else ''}, input {'x'.join(map(str, shape))} NHWC float32, jstep.adam")
    rows = []
    for norm in NORMS:
        extra = accessed[norm] - accessed["none"] if accessed[norm] is not None else None
        rows.append(
            [
                norm,
                f"{medians[norm] * 1e3:.2f}",
                f"{medians[norm] / medians['nnx']:.3f}",
                "n/a" if accessed[norm] is None else f"{accessed[norm] / 2**20:.0f}",
                "n/a" if extra is None else f"{extra / 2**20:.0f}",
            ]
        )
    header = ["norm", "ms (median)", "vs nnx", "HLO MiB accessed", "of which norm"]
    print(format_table(header, rows))
    own = (medians["jstep"] - medians["none"]) / (medians["nnx"] - medians["none"])
    paired = statistics.median(
        (j - n) / (f - n) for j, f, n in zip(times["jstep"], times["nnx"], times["none"], strict=True) if f > n
    )
    print(f"\nwhole step, jstep / nnx: {medians['jstep'] / medians['nnx']:.3f}")
    print(f"batch norm's own cost, (jstep - none) / (nnx - none): {own:.2f} (medians), {paired:.2f} (paired)")
    print(f"batch norm's share of the nnx step: {(medians['nnx'] - medians['none']) / medians['nnx']:.0%}")
    print(f"{args.repeats} repeats per contender, alternated call by call; compile excluded")


if __name__ == "__main__":
    main()
