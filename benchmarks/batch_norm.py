"""Batch norm forward + backward: jstep's hand-derived VJP against Flax and plain autodiff.

One jitted training-style step per contender on NHWC float32 activations:
``loss, grads = value_and_grad(sum(batch_norm(x, scale, offset) * w))`` with respect to x,
scale and offset, returning the input gradient as the next ``x`` (and a small step on scale
and offset), all buffers donated. The contenders:

- ``jstep``: `jstep.batch_norm` (two-pass statistics, the notes' backward: two per-feature
  reductions that read only dy and x, and one elementwise pass; only ``x`` kept for the
  backward);
- ``flax``: ``flax.linen.BatchNorm(use_running_average=False)`` (its batch-stats update included);
- ``autodiff``: a plain jnp batch norm (two-pass statistics) differentiated by JAX;
- ``jstep ghost`` and ``flax ghost``: ghost batch norm, each group of ``--virtual-batch-size``
  consecutive examples normalized with its own statistics: `jstep.batch_norm(...,
  virtual_batch_size=V)` against the best JAX alternative, Flax's BatchNorm under ``jax.vmap``
  over the groups (``x.reshape(N // V, V, ...)``, the variables shared). Their ``vs flax``
  column compares them with each other;
- ``torch`` (when PyTorch imports; ``--no-torch`` leaves it out): PyTorch's native
  ``torch.nn.functional.batch_norm(x, None, None, weight, bias, training=True)`` on the same data
  as an NCHW tensor in ``torch.channels_last`` memory format (the NHWC bytes, permuted), the loss
  ``(y * w).sum()`` and ``torch.autograd.grad`` with respect to x, weight and bias, the same
  update of x, weight and bias, with ``torch.set_num_threads`` equal to the usable cores. Eager
  PyTorch also writes y and y * w and materialises the loss's gradient with respect to y, which
  the jitted contenders never do; that is part of what its users run.

Compilation is excluded (one warm-up call), the contenders alternate call by call in this one
process, and the table shows medians. A call's time depends on which contender ran just
before it (on a 2-core EPYC VM at (64,32,32,64), any step is about 4 ms slower right after
autodiff's, which frees some 64 MiB of temporaries per call), and a fixed rotation of three
contenders puts each one after the same neighbour two times in three; so the shared harness
rotates the contenders in one order and then in the reverse order, and each follows each other
equally often. ``of copy BW`` counts the 8 activation-sized passes of a two-pass batch norm's
training step (forward: read x twice for mu and sigma; backward: read dy, then dy and x, for
the two sums, then read x and dy and write dx; the loss needs no y, so XLA never writes it)
as a fraction of a donated ``x + 1`` measured in the same run; ``HLO passes`` is what the kernels
of each compiled step read and write, in activation-sized arrays, by XLA's cost analysis (a
reduction whose operand fits in cache may re-read it for less). ``residual MiB`` is what the
forward keeps for the backward (the leaves of ``jax.vjp``'s closure).

    python benchmarks/batch_norm.py               # both shapes, 30 repeats
    python benchmarks/batch_norm.py --repeats 5   # a quick look
    python benchmarks/batch_norm.py --no-torch    # without PyTorch
    python benchmarks/batch_norm.py --virtual-batch-size 32  # ghost batches of 32 (default 16)

A second table times batch renormalization (after the warm-up) the same way: `jstep.linen.BatchRenorm`
against Stable-Baselines-JAX's ``BatchRenorm`` (sbx-rl, installed with ``pip install --no-deps
sbx-rl==0.28.0``; its layer is loaded from its file, without importing Stable-Baselines3) and
autodiff through a plain jnp version; both layers include their batch_stats update.
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

from _harness import (
    compiled_figures,
    copy_bandwidth,
    format_table,
    interleaved_medians,
    load_torch,
    machine_report,
    torch_copy_probe,
    torch_device,
    torch_report,
    torch_step,
)

SHAPES = [(64, 32, 32, 64), (128, 14, 14, 256)]
EPS = 1e-5
PASSES = 8  # activation-sized reads + writes of a two-pass forward and the notes' backward


def plain_batch_norm(x, scale, offset):
    """The same function as jstep.batch_norm (NHWC, eps inside the root), left to autodiff."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    return (x - mean) / jnp.sqrt(var + EPS) * scale + offset


def flax_batch_norm():
    """Flax's layer as a function (x, scale, offset) -> y, its running-stats update included."""
    import flax.linen as nn

    layer = nn.BatchNorm(use_running_average=False, axis=-1, momentum=0.9, epsilon=EPS)

    def apply(x, scale, offset):
        stats = {"mean": jnp.zeros(x.shape[-1:], x.dtype), "var": jnp.ones(x.shape[-1:], x.dtype)}
        variables = {"params": {"scale": scale, "bias": offset}, "batch_stats": stats}
        y, _ = layer.apply(variables, x, mutable=["batch_stats"])
        return y

    return apply


def flax_ghost_batch_norm(size):
    """Flax's layer on each group of `size` examples: jax.vmap over the groups, shared variables."""
    flax = flax_batch_norm()

    def apply(x, scale, offset):
        groups = jax.vmap(flax, in_axes=(0, None, None))(x.reshape(-1, size, *x.shape[1:]), scale, offset)
        return groups.reshape(x.shape)

    return apply


def jstep_ghost_batch_norm(size):
    def apply(x, scale, offset):
        return jstep.batch_norm(x, scale, offset, virtual_batch_size=size)

    return apply


def check_ghost_gradient(jstep_ghost, flax_ghost, x, scale, offset, w) -> None:
    """Both ghost batch norms give the same input gradient, to 1e-4 of its largest entry."""
    grads = [jax.grad(lambda x, f=f: jnp.sum(f(x, scale, offset) * w))(x) for f in (jstep_ghost, flax_ghost)]
    got, want = map(np.asarray, grads)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)))


def training_step(normalize):
    """(x, scale, offset, w) -> (dL/dx, scale - 1e-3 dL/dscale, offset - 1e-3 dL/doffset, w)."""

    def step(x, scale, offset, w):
        def loss(x, scale, offset):
            return jnp.sum(normalize(x, scale, offset) * w)

        dx, dscale, doffset = jax.grad(loss, argnums=(0, 1, 2))(x, scale, offset)
        return dx, scale - 1e-3 * dscale, offset - 1e-3 * doffset, w

    return jax.jit(step, donate_argnums=(0, 1, 2, 3))


def residual_bytes(normalize, x, scale, offset) -> int:
    """Bytes the forward pass keeps for the backward: the arrays in jax.vjp's closure."""
    _, vjp_fn = jax.vjp(normalize, x, scale, offset)
    leaves = {id(leaf): leaf for leaf in jax.tree.leaves(vjp_fn) if hasattr(leaf, "nbytes")}
    return sum(leaf.nbytes for leaf in leaves.values())


def inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    return (
        jnp.asarray(rng.normal(1.0, 2.0, shape), jnp.float32),
        jnp.asarray(rng.uniform(0.5, 1.5, channels), jnp.float32),
        jnp.asarray(rng.normal(0.0, 0.1, channels), jnp.float32),
        jnp.asarray(rng.normal(0.0, 1.0, shape), jnp.float32),
    )


def to_torch(torch, device, array, requires_grad=False):
    """A JAX array as a torch tensor; NHWC activations become NCHW in channels_last memory format."""
    tensor = torch.tensor(np.asarray(array), device=device)
    if tensor.ndim == 4:
        tensor = tensor.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    return tensor.requires_grad_(requires_grad)


def torch_training_step(torch, device, x, scale, offset, w):
    """PyTorch's native batch norm as `training_step`: x <- dL/dx, weight and bias take a 1e-3 step.

    The tensors live in the returned step's closure (its carry is empty); also returns a
    function that gives the current x's gradient, as NHWC NumPy, for the agreement check.
    """
    state = {
        "x": to_torch(torch, device, x, True),
        "weight": to_torch(torch, device, scale, True),
        "bias": to_torch(torch, device, offset, True),
    }
    w = to_torch(torch, device, w)

    def gradients():
        x, weight, bias = state["x"], state["weight"], state["bias"]
        y = torch.nn.functional.batch_norm(x, None, None, weight, bias, training=True, eps=EPS)
        return torch.autograd.grad((y * w).sum(), (x, weight, bias))

    def step():
        dx, dweight, dbias = gradients()
        with torch.no_grad():
            state["weight"].sub_(1e-3 * dweight)
            state["bias"].sub_(1e-3 * dbias)
        state["x"] = dx.requires_grad_(True)

    def input_gradient():
        return gradients()[0].permute(0, 2, 3, 1).cpu().numpy()

    assert state["x"].is_contiguous(memory_format=torch.channels_last)
    return torch_step(torch, device, step), input_gradient


def check_torch_gradient(input_gradient, x, scale, offset, w) -> None:
    """PyTorch's input gradient agrees with jstep's to 1e-4 of its largest entry."""
    want = jax.grad(lambda x: jnp.sum(jstep.batch_norm(x, scale, offset) * w))(x)
    want = np.asarray(want)
    got = input_gradient()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)))


# ---------------------------------------------------------------- batch renormalization

RENORM_STATS = 0.5, 2.0  # running mean and var: r and d inside their bounds for inputs()'s N(1, 2^2)


def sbx_layers_module():
    """Stable-Baselines-JAX's ``sbx/common/jax_layers.py`` (sbx-rl), loaded from its file: ``import sbx``
    would import Stable-Baselines3, which the layer does not need. None when sbx-rl is not installed."""
    import importlib.metadata
    import importlib.util

    try:
        path = importlib.metadata.distribution("sbx-rl").locate_file("sbx/common/jax_layers.py")
    except importlib.metadata.PackageNotFoundError:
        return None
    spec = importlib.util.spec_from_file_location("sbx_jax_layers", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def renorm_layer(layer_class):
    """A BatchRenorm layer after its warm-up as (x, scale, offset) -> y, its running-stats update included."""
    layer = layer_class(use_running_average=False, warmup_steps=0, epsilon=EPS)

    def apply(x, scale, offset):
        mean, var = RENORM_STATS
        stats = {
            "mean": jnp.full(x.shape[-1:], mean, x.dtype),
            "var": jnp.full(x.shape[-1:], var, x.dtype),
            "r_max": 3,
            "d_max": 5,
            "steps": 1,
        }
        y, _ = layer.apply(
            {"params": {"scale": scale, "bias": offset}, "batch_stats": stats}, x, mutable=["batch_stats"]
        )
        return y

    return apply


def plain_batch_renorm(x, scale, offset):
    """The same function as jstep.batch_renorm after the warm-up (r_max 3, d_max 5), left to autodiff."""
    axes = tuple(range(x.ndim - 1))
    mean, var = RENORM_STATS
    mu_b = jnp.mean(x, axis=axes, keepdims=True)
    var_b = jnp.mean(jnp.square(x - mu_b), axis=axes, keepdims=True)
    s = jnp.sqrt(var + EPS)
    r = jax.lax.stop_gradient(jnp.clip(jnp.sqrt(var_b + EPS) / s, 1 / 3, 3))
    d = jax.lax.stop_gradient(jnp.clip((mu_b - mean) / s, -5, 5))
    return scale * (r * (x - mu_b) + d * jnp.sqrt(var_b)) / jnp.sqrt(var_b + EPS * r**2) + offset


def check_renorm_gradient(ours, theirs, x, scale, offset, w) -> None:
    """jstep's input gradient agrees with Stable-Baselines-JAX's to 1e-4 of its largest entry."""
    want = jax.grad(lambda x: jnp.sum(theirs(x, scale, offset) * w))(x)
    got = jax.grad(lambda x: jnp.sum(ours(x, scale, offset) * w))(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))


def renorm_rows(repeats: int) -> list[list[str]] | None:
    """Batch renorm's training step: jstep.linen.BatchRenorm against Stable-Baselines-JAX's layer."""
    sbx = sbx_layers_module()
    if sbx is None:
        return None
    import jstep.linen

    contenders = {
        "jstep": renorm_layer(jstep.linen.BatchRenorm),
        "sbx": renorm_layer(sbx.BatchRenorm),
        "autodiff": plain_batch_renorm,
    }
    rows = []
    for shape in SHAPES:
        x, scale, offset, w = inputs(shape)
        check_renorm_gradient(contenders["jstep"], contenders["sbx"], x, scale, offset, w)
        residuals = {name: residual_bytes(f, x, scale, offset) for name, f in contenders.items()}
        steps = {name: training_step(f) for name, f in contenders.items()}
        carries = {name: inputs(shape) for name in steps}
        accessed = {name: compiled_figures(step, *carries[name])[1] for name, step in steps.items()}
        medians = interleaved_medians(steps, carries, repeats)
        rows += [
            [
                "x".join(map(str, shape)),
                name,
                f"{medians[name] * 1e3:.2f}",
                f"{medians[name] / medians['sbx']:.2f}",
                f"{medians[name] / medians['autodiff']:.2f}",
                "n/a" if accessed[name] is None else f"{accessed[name] / (np.prod(shape) * 4):.1f}",
                f"{residuals[name] / 2**20:.1f}",
            ]
            for name in steps
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--torch", action=argparse.BooleanOptionalAction, default=None,
        help="also time PyTorch's native batch norm (default: when torch imports)",
    )  # fmt: skip
    parser.add_argument("--virtual-batch-size", type=int, default=16, help="ghost batch norm's group size")
    args = parser.parse_args()

    torch = load_torch(args.torch)
    size = args.virtual_batch_size
    contenders = {
        "jstep": jstep.batch_norm,
        "flax": flax_batch_norm(),
        "autodiff": plain_batch_norm,
        "jstep ghost": jstep_ghost_batch_norm(size),
        "flax ghost": flax_ghost_batch_norm(size),
    }
    baseline = {"jstep ghost": "flax ghost", "flax ghost": "flax ghost"}  # the ghost rows compare with each other
    print(machine_report())
    if torch:
        device = torch_device(torch)
        print(torch_report(torch, device))
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (donated x + 1, float32): {bandwidth / 1e9:.1f} GB/s")
    if torch:
        step, carry, moved = torch_copy_probe(torch, device)
        torch_bandwidth = moved / interleaved_medians({"torch copy": step}, {"torch copy": carry}, 15)["torch copy"]
        print(f"PyTorch's in-place x.add_(1) on the same bytes: {torch_bandwidth / 1e9:.1f} GB/s")
    print()

    rows = []
    for shape in SHAPES:
        probe = inputs(shape)
        check_ghost_gradient(contenders["jstep ghost"], contenders["flax ghost"], *probe)
        residuals = {name: residual_bytes(f, *probe[:3]) for name, f in contenders.items()}
        steps = {name: training_step(f) for name, f in contenders.items()}
        carries = {name: inputs(shape) for name in steps}
        accessed = {name: compiled_figures(step, *carries[name])[1] for name, step in steps.items()}
        if torch:
            steps["torch"], input_gradient = torch_training_step(torch, device, *inputs(shape))
            carries["torch"] = ()
            check_torch_gradient(input_gradient, *inputs(shape))
        medians = interleaved_medians(steps, carries, args.repeats)
        moved = PASSES * np.prod(shape) * 4
        for name in steps:
            row = [
                "x".join(map(str, shape)),
                name,
                f"{medians[name] * 1e3:.2f}",
                f"{medians[name] / medians[baseline.get(name, 'flax')]:.2f}",
                "n/a" if name in baseline else f"{medians[name] / medians['autodiff']:.2f}",
            ]
            if torch:
                row.append(f"{medians[name] / medians['torch']:.2f}")
            passes = accessed.get(name)
            row += [
                f"{moved / medians[name] / bandwidth:.2f}",
                "n/a" if passes is None else f"{passes / (np.prod(shape) * 4):.1f}",
                f"{residuals[name] / 2**20:.1f}" if name in residuals else "n/a",
            ]
            rows.append(row)
    header = ["NHWC shape", "contender", "ms (median)", "vs flax", "vs autodiff"]
    header += ["vs torch"] * bool(torch) + ["of copy BW", "HLO passes", "residual MiB"]
    print(format_table(header, rows, text_columns=2))
    targets = "jstep <= 0.6x flax, <= 0.3x autodiff" + (", <= 1x torch" if torch else "")
    print(f"\n{args.repeats} repeats, forward + backward per call; targets: {targets}")
    print(f"ghost rows: groups of {size} examples; their vs flax is against flax ghost (Flax vmapped over the groups)")
    if torch:
        print("of copy BW counts the 8 passes of the jitted step for every contender, torch included")
    print("HLO passes: activation-sized arrays the compiled step's kernels read and write (XLA's cost analysis)")

    renorm = renorm_rows(args.repeats)
    if renorm is None:
        print("\nbatch renorm: skipped, sbx-rl is not installed (pip install --no-deps sbx-rl==0.28.0)")
        return
    print("\nBatch renormalization after the warm-up (r_max 3, d_max 5), the same training step:")
    header = ["NHWC shape", "contender", "ms (median)", "vs sbx", "vs autodiff", "HLO passes", "residual MiB"]
    print(format_table(header, renorm, text_columns=2))
    print(
        "jstep: jstep.linen.BatchRenorm; sbx: Stable-Baselines-JAX's BatchRenorm (sbx-rl 0.28); both update batch_stats"
    )


if __name__ == "__main__":
    main()
