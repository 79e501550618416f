"""One jitted training step, jstep against Optax: adam, momentum and rmsprop on three trees.

The step is ``updates, state = opt.update(grads, state, params)`` followed by
``params = optax.apply_updates(params, updates)``, jitted with params and state donated.
Three contenders: the jstep optimizer, the same optimizer wrapped in ``jstep.grouped`` (the
state of leaves up to 65536 elements packed into one buffer per dtype), and Optax's.
Compilation is excluded (one warm-up call), the contenders are alternated call by call in
this one process, every call waits for its outputs, and the table shows medians.

Each step is memory-bound, so the table also shows the bytes it must move per second as a
fraction of a donated ``x + 1`` copy timed in the same rounds: Adam reads p, g, m, v and
writes p, m, v (7 parameter-sized arrays); momentum and RMSprop read p, g, s and write p, s (5).
`tmp MiB` is the scratch memory XLA allocates for the step beyond its inputs and outputs.

With PyTorch installed (``--torch``, on by default when it imports), Adam is also timed as
``torch.optim.Adam(params, lr, fused=True)`` and ``foreach=True`` on float32 tensors of the same
trees with ``.grad`` set, ``opt.step()`` alternated in the same rounds as jstep and Optax, with
``torch.set_num_threads`` equal to the usable cores; a second table shows jstep / torch and
torch's bandwidth fraction. PyTorch updates its tensors in place, so they keep their addresses
for the whole run (the JAX contenders' carries are moved to new buffers every 10 repeats).

    python benchmarks/optimizers.py                  # every tree and optimizer, 50 repeats
    python benchmarks/optimizers.py --quick          # a quick look (5 repeats)
    python benchmarks/optimizers.py --trees resnet50 --optimizers adam --repeats 100
    python benchmarks/optimizers.py --no-torch       # without PyTorch
    python benchmarks/optimizers.py --optimizers adam --no-torch --no-grouped-table   # low precision only
    python benchmarks/optimizers.py --quantized --optimizers adam --no-grouped-table --no-low-precision  # 8/4-bit only

Low precision (with adam): the same step with params, gradients and Adam's m and v in
bfloat16, stored by round-to-nearest (``jstep.adam(lr)`` on bfloat16 params, ``jstep.apply_updates``
without a key) and by stochastic rounding (``rounding_seed=0`` and ``apply_updates`` with a key
folded from the step count), timed in the same rounds as that step in float32. Its bytes are
XLA's cost analysis of each compiled step: the step must read p, g, m, v and write p, m, v,
7 arrays of 4 bytes per parameter in float32 and of 2 in bfloat16.

Quantized state (``--quantized``, off by default): Adam's step with m and v stored block-wise
(``jstep.blockwise(8)`` and ``(4)``) against float32 jstep.adam, on the 4M leaf and the 1000
leaves, beside PyTorch's float32 Adam, bitsandbytes' Adam8bit and torchao's AdamW8bit and
AdamW4bit on the CPU (or the GPU where JAX measures one), in the same rounds. A peer that does
not run here gets a row that says why. On a 2-core CPU the peers' steps on 1000 leaves take
seconds each (a Python loop over the leaves) and compiling jstep's quantized step on them takes
minutes: ``--repeats 10`` keeps the table under a quarter of an hour.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jstep

from _harness import (
    compiled_figures,
    copy_probe,
    format_table,
    interleaved_times,
    load_torch,
    machine_report,
    paired_ratio,
    torch_copy_probe,
    torch_device,
    torch_report,
    torch_step,
)

LEARNING_RATE = 1e-3


# ---------------------------------------------------------------------------------- trees


def resnet50_shapes() -> dict[str, tuple[int, ...]]:
    """ResNet-50's parameter shapes (He et al. 2016, torchvision layout, no conv biases).

    Conv kernels are HWIO; each convolution is followed by a batch norm with a scale and a
    bias; stages of 3, 4, 6, 3 bottleneck blocks (1x1 -> 3x3 -> 1x1, expansion 4) whose first
    block projects the shortcut with a 1x1 convolution; a 2048 x 1000 dense layer with bias.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(name: str, size: int, c_in: int, c_out: int) -> None:
        shapes[f"{name}/kernel"] = (size, size, c_in, c_out)
        shapes[f"{name}/bn_scale"] = (c_out,)
        shapes[f"{name}/bn_bias"] = (c_out,)

    conv_bn("stem", 7, 3, 64)
    c_in = 64
    for stage, (blocks, width) in enumerate(zip([3, 4, 6, 3], [64, 128, 256, 512], strict=True), start=1):
        for block in range(blocks):
            name = f"stage{stage}/block{block}"
            conv_bn(f"{name}/conv1", 1, c_in, width)
            conv_bn(f"{name}/conv2", 3, width, width)
            conv_bn(f"{name}/conv3", 1, width, 4 * width)
            if block == 0:
                conv_bn(f"{name}/shortcut", 1, c_in, 4 * width)
            c_in = 4 * width
    shapes["head/kernel"] = (c_in, 1000)
    shapes["head/bias"] = (1000,)
    return shapes


def _check_resnet50(shapes: dict[str, tuple[int, ...]]) -> None:
    count = sum(math.prod(s) for s in shapes.values())
    assert len(shapes) == 161, f"ResNet-50 has 161 parameter arrays, the shapes list {len(shapes)}"
    assert count == 25_557_032, f"ResNet-50 has 25,557,032 parameters, the shapes hold {count:,}"


def tree_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """The benchmark's trees of float32 leaves, by name."""
    if name == "1x4M":
        return {"w": (2048, 2048)}
    if name == "resnet50":
        shapes = resnet50_shapes()
        _check_resnet50(shapes)
        return shapes
    if name == "1000x4096":
        return {f"w{i:04d}": (4096,) for i in range(1000)}
    raise ValueError(f"unknown tree {name!r}; choose from {', '.join(TREES)}")


TREES = ("1x4M", "resnet50", "1000x4096")


def random_tree(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for k, s in shapes.items()}


def copy_tree(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


# ----------------------------------------------------------------------------- optimizers


class Pair(NamedTuple):
    """A jstep optimizer, the Optax optimizer that computes the same update, and its traffic."""

    jstep: Callable[[], optax.GradientTransformation]
    optax: Callable[[], optax.GradientTransformation]
    arrays_moved: int  # parameter-sized arrays read + written by one step


OPTIMIZERS = {
    "adam": Pair(lambda: jstep.adam(LEARNING_RATE), lambda: optax.adam(LEARNING_RATE), 7),
    "momentum": Pair(lambda: jstep.momentum(LEARNING_RATE, 0.9), lambda: optax.sgd(LEARNING_RATE, momentum=0.9), 5),
    "rmsprop": Pair(lambda: jstep.rmsprop(LEARNING_RATE, eps_in_sqrt=True), lambda: optax.rmsprop(LEARNING_RATE), 5),
}


def training_step(optimizer: optax.GradientTransformation):
    """The jitted step (params, state, grads) -> (params, state), params and state donated."""

    def step(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def check_same_update(jitted: dict[str, Any], optimizers: dict[str, Any], params: Any, grads: Any) -> None:
    """Three steps of every contender from the same start agree with Optax's to float32 round-off."""
    results = {}
    for name, step in jitted.items():
        p, s = copy_tree(params), optimizers[name].init(params)
        for _ in range(3):
            p, s = step(p, s, grads)
        results[name] = p
    for name, result in results.items():
        for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(results["optax"]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------- torch

TORCH_ADAM = {"torch fused": {"fused": True}, "torch foreach": {"foreach": True}}


def torch_adam(torch: Any, device: Any, params: Any, grads: Any, **flavour: bool) -> Any:
    """torch.optim.Adam over float32 copies of `params`, each with `.grad` set from `grads`."""
    tensors = []
    for p, g in zip(jax.tree.leaves(params), jax.tree.leaves(grads), strict=True):
        tensor = torch.tensor(np.asarray(p), device=device)
        tensor.grad = torch.tensor(np.asarray(g), device=device)
        tensors.append(tensor)
    return torch.optim.Adam(tensors, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, **flavour)


def check_torch_adam(torch: Any, device: Any, step: Any, params: Any, grads: Any) -> None:
    """One step of jstep.adam and of each torch Adam from the same start agree to 1e-5."""
    p, _ = step(copy_tree(params), jstep.adam(LEARNING_RATE).init(params), grads)
    expected = [np.asarray(leaf) for leaf in jax.tree.leaves(p)]
    for name, flavour in TORCH_ADAM.items():
        opt = torch_adam(torch, device, params, grads, **flavour)
        opt.step()
        for got, want in zip(opt.param_groups[0]["params"], expected, strict=True):
            np.testing.assert_allclose(got.detach().cpu().numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)


# --------------------------------------------------------------------------- low precision

LOW_PRECISION = ("float32", "bf16 nearest", "bf16 stochastic")


def adam_step(stochastic: bool):
    """The jitted Adam step (params, state, grads) -> (params, state), params and state donated, the
    sum W + u formed in float32 and stored by `jstep.apply_updates` (stochastic: with a key from
    the step count, and `rounding_seed` for m and v)."""
    optimizer = jstep.adam(LEARNING_RATE, rounding_seed=0 if stochastic else None)

    def step(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        key = jax.random.fold_in(jax.random.key(1), state.count) if stochastic else None
        return jstep.apply_updates(params, updates, key=key), state

    return optimizer, jax.jit(step, donate_argnums=(0, 1))


def measure_low_precision(tree: str, repeats: int, copy_bytes: int) -> list:
    """Adam's step in float32 and in bfloat16 (nearest and stochastic rounding), timed in the same rounds."""
    shapes = tree_shapes(tree)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_tree(shapes, seed=0))
    grads16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_tree(shapes, seed=1))
    # float32 from the same (bfloat16-representable) values, so that the runs can be compared.
    params32, grads32 = (jax.tree.map(lambda x: x.astype(jnp.float32), t) for t in (params16, grads16))
    inputs = {
        "float32": (params32, grads32),
        "bf16 nearest": (params16, grads16),
        "bf16 stochastic": (params16, grads16),
    }
    steps, carries, accessed, finals = {}, {}, {}, {}
    for name, (params, grads) in inputs.items():
        optimizer, jitted = adam_step(stochastic=name == "bf16 stochastic")
        p, s = copy_tree(params), optimizer.init(params)
        accessed[name] = compiled_figures(jitted, p, s, grads)[1]
        for _ in range(3):
            p, s = jitted(p, s, grads)
        finals[name] = p
        carries[name] = (copy_tree(params), optimizer.init(params))
        steps[name] = lambda p, s, step=jitted, grads=grads: step(p, s, grads)
    # Three steps: each stored p is off by less than one bfloat16 ulp (<= 2^-7 |p|) from the float32
    # run, and Adam's steps (about the learning rate) by a fraction of themselves.
    for name in ("bf16 nearest", "bf16 stochastic"):
        for a, b in zip(jax.tree.leaves(finals[name]), jax.tree.leaves(finals["float32"]), strict=True):
            np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=3 * 2.0**-7, atol=1e-4, err_msg=name)
    steps["copy"], carries["copy"], _ = copy_probe(copy_bytes)
    times = interleaved_times(steps, carries, repeats)
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    count = sum(math.prod(s) for s in shapes.values())

    def per_parameter(name: str) -> str:
        n = accessed[name]
        return "n/a" if n is None else f"{n / count:.1f}"

    f, n, r = (seconds[name] for name in LOW_PRECISION)
    return [
        tree, f"{1e3 * f:.2f}", f"{1e3 * n:.2f}", f"{1e3 * r:.2f}", f"{n / f:.3f}",
        f"{paired_ratio(times['bf16 nearest'], times['float32']):.3f}", f"{r / n:.3f}",
        f"{paired_ratio(times['bf16 stochastic'], times['bf16 nearest']):.3f}",
        " / ".join(per_parameter(name) for name in LOW_PRECISION),
    ]  # fmt: skip


# ------------------------------------------------------------------------- quantized state

QUANTIZED_TREES = ("1x4M", "1000x4096")


def jstep_adam(bits: int | None) -> optax.GradientTransformation:
    """jstep.adam with float32 m and v (bits None) or both stored in ``jstep.blockwise(bits)``."""
    if bits is None:
        return jstep.adam(LEARNING_RATE)
    return jstep.adam(LEARNING_RATE, mu_dtype=jstep.blockwise(bits), nu_dtype=jstep.blockwise(bits))


# name: (module to import, the optimizer from that module and a list of tensors). torchao's AdamW
# with weight_decay=0 is Adam.
TORCH_QUANTIZED_ADAMS: dict[str, tuple[str, Callable[[Any, list], Any]]] = {
    "torch Adam float32": ("torch", lambda torch, ps: torch.optim.Adam(ps, lr=LEARNING_RATE, foreach=True)),
    "bitsandbytes Adam8bit": ("bitsandbytes", lambda bnb, ps: bnb.optim.Adam8bit(ps, lr=LEARNING_RATE)),
    "torchao AdamW8bit": ("torchao.optim", lambda ao, ps: ao.AdamW8bit(ps, lr=LEARNING_RATE, weight_decay=0.0)),
    "torchao AdamW4bit": ("torchao.optim", lambda ao, ps: ao.AdamW4bit(ps, lr=LEARNING_RATE, weight_decay=0.0)),
}
CHECK_STEPS = 3


def torch_tensors(torch: Any, device: Any, params: Any, grads: Any) -> list:
    """float32 torch copies of `params`' leaves, each with `.grad` set from `grads`."""
    tensors = []
    for p, g in zip(jax.tree.leaves(params), jax.tree.leaves(grads), strict=True):
        tensor = torch.tensor(np.asarray(p), device=device)
        tensor.grad = torch.tensor(np.asarray(g), device=device)
        tensors.append(tensor)
    return tensors


def step_error(after: list[np.ndarray], reference: list[np.ndarray], before: list[np.ndarray]) -> float:
    """Median over all elements of |dW - dW_float32| / lr, dW the change of the params over the check steps."""
    gaps = [np.abs((a - b) - (r - b)).ravel() for a, r, b in zip(after, reference, before, strict=True)]
    return float(np.median(np.concatenate(gaps)) / LEARNING_RATE)


def measure_quantized(tree: str, repeats: int, torch: Any) -> list[list[str]]:
    """Adam's step with 8- and 4-bit m and v against float32, jstep's and the PyTorch peers', in the same rounds.

    Every contender first takes CHECK_STEPS steps from the same params and gradients (compiling
    jstep's step and torchao's), whose change of the params is compared with float32 jstep.adam's;
    a peer that fails on this machine gets a row that says so.
    """
    shapes = tree_shapes(tree)
    params, grads = random_tree(shapes, seed=0), random_tree(shapes, seed=1)
    before = [np.asarray(leaf) for leaf in jax.tree.leaves(params)]
    steps, carries, after, failures = {}, {}, {}, {}
    for name, bits in (("jstep float32", None), ("jstep 8-bit", 8), ("jstep 4-bit", 4)):
        try:
            optimizer = jstep_adam(bits)
            jitted = training_step(optimizer)
            p, s = copy_tree(params), optimizer.init(params)
            for _ in range(CHECK_STEPS):
                p, s = jitted(p, s, grads)
        except Exception as error:  # shown in the table, not hidden
            failures[name] = f"fails: {type(error).__name__}: {str(error)[:80]}"
            continue
        after[name] = [np.asarray(leaf) for leaf in jax.tree.leaves(p)]
        carries[name] = (copy_tree(params), optimizer.init(params))
        steps[name] = lambda p, s, step=jitted: step(p, s, grads)
    if torch is None:
        failures.update(dict.fromkeys(TORCH_QUANTIZED_ADAMS, "not run: PyTorch is off or missing"))
    else:
        device = torch_device(torch)
        for name, (module, make) in TORCH_QUANTIZED_ADAMS.items():
            try:
                tensors = torch_tensors(torch, device, params, grads)
                opt = make(importlib.import_module(module), tensors)
                for _ in range(CHECK_STEPS):
                    opt.step()
            except Exception as error:  # a peer that does not run here is reported, not hidden
                failures[name] = f"fails on {device.type}: {type(error).__name__}: {str(error)[:80]}"
                continue
            after[name] = [t.detach().cpu().numpy().copy() for t in tensors]  # before the timed steps move them
            steps[name], carries[name] = torch_step(torch, device, opt.step), ()
    times = interleaved_times(steps, carries, repeats) if steps else {}
    baseline = times.get("jstep float32")
    rows = []
    for name in ["jstep float32", "jstep 8-bit", "jstep 4-bit", *TORCH_QUANTIZED_ADAMS]:
        if name in failures:
            rows.append([tree, name, failures[name], "", "", ""])
            continue
        ms = 1e3 * statistics.median(times[name])
        ratio = "" if baseline is None else f"{statistics.median(times[name]) / statistics.median(baseline):.3f}"
        paired = "" if baseline is None else f"{paired_ratio(times[name], baseline):.3f}"
        error = "" if "jstep float32" not in after else f"{step_error(after[name], after['jstep float32'], before):.4f}"
        rows.append([tree, name, f"{ms:.2f}", ratio, paired, error])
    return rows


# ---------------------------------------------------------------------------------- main


def measure(tree: str, optimizer: str, repeats: int, copy_bytes: int, torch: Any = None) -> tuple[list, list | None]:
    """jstep, Optax (and torch's Adams) and the copy probe timed side by side on one tree.

    Returns the row of the Optax table and, when torch's Adam took part, the row of the torch table.
    """
    shapes = tree_shapes(tree)
    params, grads = random_tree(shapes, seed=0), random_tree(shapes, seed=1)
    pair = OPTIMIZERS[optimizer]
    optimizers = {"jstep": pair.jstep(), "grouped": jstep.grouped(pair.jstep()), "optax": pair.optax()}
    jitted = {name: training_step(opt) for name, opt in optimizers.items()}
    check_same_update(jitted, optimizers, params, grads)
    # The floor: plain SGD reads p and g and writes p, which every optimizer's step must do too.
    optimizers["sgd floor"] = jstep.sgd(LEARNING_RATE)
    jitted["sgd floor"] = training_step(optimizers["sgd floor"])

    steps, carries, figures = {}, {}, {}
    for name, opt in optimizers.items():
        p = copy_tree(params)
        s = opt.init(p)
        figures[name] = compiled_figures(jitted[name], p, s, grads)
        carries[name] = (p, s)
        steps[name] = lambda p, s, step=jitted[name]: step(p, s, grads)
    with_torch = torch is not None and optimizer == "adam"
    if with_torch:
        device = torch_device(torch)
        check_torch_adam(torch, device, jitted["jstep"], params, grads)
        for name, flavour in TORCH_ADAM.items():
            steps[name] = torch_step(torch, device, torch_adam(torch, device, params, grads, **flavour).step)
            carries[name] = ()
        steps["torch copy"], carries["torch copy"], torch_copied = torch_copy_probe(torch, device, copy_bytes)
    steps["copy"], carries["copy"], copied = copy_probe(copy_bytes)
    times = interleaved_times(steps, carries, repeats)
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    bandwidth = copied / seconds["copy"]
    param_bytes = sum(4 * math.prod(s) for s in shapes.values())
    moved = pair.arrays_moved * param_bytes

    def fraction(name: str) -> str:
        return f"{moved / seconds[name] / bandwidth:.2f}"

    def joined(show: Callable[[str], str], names: tuple[str, ...] = ("jstep", "grouped", "optax")) -> str:
        return " / ".join(show(name) for name in names)

    def mib(name: str) -> str:
        n = figures[name][0]
        return "n/a" if n is None else f"{n / 2**20:.1f}"

    def passes(name: str) -> str:
        n = figures[name][1]
        return "n/a" if n is None else f"{n / param_bytes:.1f}"

    j, g, o = seconds["jstep"], seconds["grouped"], seconds["optax"]
    row = [
        tree, optimizer, f"{1e3 * j:.2f}", f"{1e3 * g:.2f}", f"{1e3 * o:.2f}", f"{j / o:.3f}",
        f"{paired_ratio(times['jstep'], times['optax']):.3f}", f"{g / o:.3f}",
        f"{paired_ratio(times['grouped'], times['optax']):.3f}", f"{seconds['sgd floor'] / o:.3f}",
        joined(fraction), f"{bandwidth / 1e9:.1f}", joined(passes, ("jstep", "optax")), joined(mib),
    ]  # fmt: skip
    if not with_torch:
        return row, None
    torch_row = [tree, f"{1e3 * j:.2f}", f"{1e3 * g:.2f}"]
    for name in TORCH_ADAM:
        torch_row += [
            f"{1e3 * seconds[name]:.2f}", f"{j / seconds[name]:.3f}", f"{g / seconds[name]:.3f}",
            f"{paired_ratio(times['grouped'], times[name]):.3f}", fraction(name),
        ]  # fmt: skip
    torch_row.append(f"{torch_copied / seconds['torch copy'] / 1e9:.1f}")
    return row, torch_row


def choices(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    names = [v for v in value.split(",") if v]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per contender (default 50; 5 with --quick)"
    )
    parser.add_argument("--trees", default=",".join(TREES), help=f"comma-separated subset of {','.join(TREES)}")
    parser.add_argument(
        "--optimizers", default=",".join(OPTIMIZERS), help=f"comma-separated subset of {','.join(OPTIMIZERS)}"
    )
    parser.add_argument("--quick", action="store_true", help="5 repeats and a 64 MiB copy probe (instead of 256 MiB)")
    parser.add_argument(
        "--torch", action=argparse.BooleanOptionalAction, default=None,
        help="also time torch.optim.Adam (fused and foreach) on the same trees (default: when torch imports)",
    )  # fmt: skip
    parser.add_argument(
        "--grouped-table", action=argparse.BooleanOptionalAction, default=True,
        help="time jstep, grouped and Optax (the first table; default on)",
    )  # fmt: skip
    parser.add_argument(
        "--low-precision", action=argparse.BooleanOptionalAction, default=True,
        help="time Adam's step in bfloat16, round-to-nearest and stochastic, against float32 (with adam; default on)",
    )  # fmt: skip
    parser.add_argument(
        "--quantized", action=argparse.BooleanOptionalAction, default=False,
        help="time Adam's step with 8- and 4-bit m and v (jstep.blockwise) against float32 and against "
        "bitsandbytes' and torchao's, on the trees among 1x4M,1000x4096 (default off)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 50)
    trees = choices(args.trees, TREES, "--trees")
    optimizers = choices(args.optimizers, tuple(OPTIMIZERS), "--optimizers")

    torch = load_torch(args.torch)
    print(machine_report())
    peers = "optax, torch.optim.Adam (fused, foreach for adam)" if torch else "optax"
    if torch:
        print(torch_report(torch, torch_device(torch)))
    print(f"median of {repeats} calls per contender, jstep, {peers} and a copy probe alternated call by call\n")
    copy_bytes = 1 << 26 if args.quick else 1 << 28
    if args.grouped_table:
        header = ["tree", "optimizer", "jstep ms", "grouped ms", "optax ms", "jstep/optax", "paired",
                  "grouped/optax", "paired", "floor/optax", "bw j / g / o", "copy GB/s",
                  "HLO passes j / o", "tmp MiB j / g / o"]  # fmt: skip
        rows, torch_rows = [], []
        for tree in trees:
            for optimizer in optimizers:
                row, torch_row = measure(tree, optimizer, repeats, copy_bytes, torch)
                rows.append(row)
                print(" | ".join(row), flush=True)
                if torch_row:
                    torch_rows.append(torch_row)
                    print(" | ".join(torch_row), flush=True)
        print()
        print(format_table(header, rows, text_columns=2))
        if torch_rows:
            torch_header = ["tree", "jstep ms", "grouped ms"]
            for name in TORCH_ADAM:
                short = name.split()[1]
                torch_header += [f"{short} ms", f"jstep/{short}", f"grouped/{short}", "paired", f"{short} bw"]
            torch_header.append("torch copy GB/s")
            print("\nadam against torch.optim.Adam, timed in the same rounds as the table above\n")
            print(format_table(torch_header, torch_rows))
        print(
            f"""
grouped:  jstep.grouped(the same jstep optimizer): the small leaves' state packed into one buffer per dtype
ratio:    jstep/optax and grouped/optax: ms / optax ms (medians); paired: median over repeats of the
          two side-by-side calls' ratio
floor:    jstep.sgd's step on the same tree (read p and g, write p: what every optimizer's step
          must do at least), timed in the same rounds, / optax ms
bw:       bytes the step must move per second / copy GB/s for jstep / grouped / optax (1.00 = the
          memory limit; more when the step's arrays fit in cache). Adam moves 7 parameter-sized
          float32 arrays, the others 5.
HLO passes: bytes all kernels of the compiled step read and write (XLA's cost analysis) /
          the parameters' bytes, for jstep / optax; the minimum is the arrays moved above (7 or 5).
          Not shown for grouped: the analysis counts the whole packed buffer for each leaf's
          kernel that reads a slice of it.
copy:     donated jitted x + 1 on {copy_bytes // 2**20} MiB of float32 (read + write), timed in the same rounds
tmp MiB:  XLA scratch memory of the compiled step beyond its (donated) inputs and outputs"""
        )
        if torch_rows:
            print(
                """jstep/fused, grouped/fused (foreach likewise): ms / torch.optim.Adam(fused=True) opt.step() ms;
          paired: grouped against that torch Adam
torch copy: in-place x.add_(1) in PyTorch on the same bytes as the copy probe, timed in the same
          rounds; the bw columns are fractions of the (XLA) copy GB/s of the first table"""
            )

    if args.low_precision and "adam" in optimizers:
        low_rows = [measure_low_precision(tree, repeats, copy_bytes) for tree in trees]
        low_header = ["tree", "f32 ms", "nearest ms", "stochastic ms", "nearest/f32", "paired",
                      "stochastic/nearest", "paired", "HLO bytes/param f32 / nearest / stochastic"]  # fmt: skip
        print("\nadam with params, gradients, m and v in bfloat16 against float32, timed in the same rounds\n")
        print(format_table(low_header, low_rows))
        print(
            """
nearest:    jstep.adam on bfloat16 params (m, v bfloat16), sums stored by round-to-nearest
stochastic: the same with rounding_seed=0 and jstep.apply_updates(..., key): every stored value
            stochastically rounded (random bits for p, m and v in each step); target <= 1.3x nearest
HLO bytes/param: what the compiled step's kernels read and write (XLA's cost analysis) per
            parameter; the minimum is 7 arrays: 28 bytes in float32, 14 in bfloat16. The random
            bits are computed, not read (a hash of each element's position). On a tree of many
            leaves the analysis counts the small (leaves x 4) array of per-leaf seeds once for
            every leaf's kernel that slices it, which inflates the stochastic figure there."""
        )

    if args.quantized:
        chosen = [tree for tree in trees if tree in QUANTIZED_TREES]
        quantized_rows = []
        for tree in chosen:
            for row in measure_quantized(tree, repeats, torch):
                quantized_rows.append(row)
                print(" | ".join(row), flush=True)
        header = ["tree", "adam", "ms", "/ jstep f32", "paired", "step err"]
        print("\nadam with m and v stored block-wise in 8 and 4 bits, timed in the same rounds\n")
        print(format_table(header, quantized_rows, text_columns=2))
        print(
            f"""
jstep 8-bit: jstep.adam(lr, mu_dtype=jstep.blockwise(8), nu_dtype=jstep.blockwise(8)) (blocks of 256;
             4-bit: blockwise(4), blocks of 128); target on the CPU: 8-bit / jstep f32 <= 2.0
torch Adam float32: torch.optim.Adam(foreach=True); bitsandbytes Adam8bit: blocks of 256 on the CPU;
             torchao AdamW8bit / AdamW4bit with weight_decay=0 (Adam), its step compiled by torch.compile
/ jstep f32: ms / jstep float32 ms (medians); paired: median over repeats of the side-by-side ratio
step err:    median over elements of |dW - dW_f32| / lr after {CHECK_STEPS} steps from the same params and
             gradients, dW_f32 jstep float32's (each step moves a weight by about lr)
compile excluded (the check steps compile jstep's and torchao's steps); jstep's params and state donated"""
        )


if __name__ == "__main__":
    main()
