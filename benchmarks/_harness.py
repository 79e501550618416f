"""Timing and machine-report helpers shared by the scripts in benchmarks/.

Every benchmark here follows the same rules: compile excluded (a warm-up call first), buffers
donated and fed back from one call to the next, contenders alternated inside one process,
outputs waited for with `block_until_ready`, and the median of the repeated runs reported
next to the machine that produced it and this machine's copy bandwidth.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

# A step takes the carried (donated) arguments and returns their next values.
Step = Callable[..., Any]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what `platform` knows elsewhere)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_report() -> str:
    """The lines that say where a measurement was taken."""
    import optax

    device = jax.devices()[0]
    return "\n".join(
        [
            f"platform: {platform.platform()}, python {platform.python_version()}",
            f"cpu: {cpu_model()}, {usable_cores()} usable cores (os.cpu_count() = {os.cpu_count()})",
            f"jax {jax.__version__}, jaxlib {jax.lib.__version__}, optax {optax.__version__}",
            f"jax device: {device.platform} / {device.device_kind} ({len(jax.devices())} device(s))",
        ]
    )


def load_torch(wanted: bool | None) -> Any:
    """PyTorch set up as a peer (threads = usable cores, denormals flushed), or None where it is off or missing.

    `wanted` None means "if it imports"; a printed note says when it does not. XLA's CPU
    kernels run with denormals flushed to zero, PyTorch's do not unless asked; the same setting
    keeps both sides doing the same arithmetic whatever values the carried data drift to (batch
    norm feeds dx back as x).
    """
    if wanted is False:
        return None
    try:
        import torch
    except ImportError:
        if wanted:
            raise SystemExit(
                "--torch: PyTorch does not import here; pip install torch==2.13.0 (the bench extra)"
            ) from None
        print("note: PyTorch does not import here, so its rows are left out (pip install torch==2.13.0)")
        return None
    torch.set_num_threads(usable_cores())
    torch.set_flush_denormal(True)
    return torch


def torch_device(torch: Any) -> Any:
    """Where the PyTorch peer runs: the GPU when JAX measures one and PyTorch can reach it, else the CPU."""
    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    return torch.device("cuda" if on_gpu else "cpu")


def torch_report(torch: Any, device: Any) -> str:
    """The line that says which PyTorch measured and where."""
    return f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads, denormals flushed to zero"


def torch_step(torch: Any, device: Any, call: Callable[[], Any]) -> Step:
    """`call` (which updates PyTorch tensors in place) in the harness's step shape, with an empty carry.

    The carry is `()` because the tensors live in `call`'s closure; on a GPU the step waits
    for the device, as `block` does for JAX.
    """

    def step() -> tuple:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return ()

    return step


def block(tree: Any) -> Any:
    """Wait until every array in `tree` is computed."""
    return jax.block_until_ready(tree)


def timed_call(step: Step, carry: tuple) -> tuple[float, tuple]:
    """Seconds one call of `step(*carry)` takes to finish, and its outputs (the next carry)."""
    start = time.perf_counter()
    out = block(step(*carry))
    return time.perf_counter() - start, out


def fresh_copy(tree: Any) -> Any:
    """The same values in newly allocated buffers (the old ones are freed when dropped)."""
    return block(jax.tree.map(jnp.copy, tree))


def interleaved_times(
    steps: dict[str, Step], carries: dict[str, tuple], repeats: int, *, reallocate_every: int = 10
) -> dict[str, list[float]]:
    """Seconds per call of each step, `repeats` calls each, the contenders alternated call by call.

    `steps[name](*carries[name])` must return the next carry (the donated buffers come back as
    new ones). Each contender gets one untimed warm-up call (compilation, first-touch page
    faults); then every repeat times each contender once, the order rotating so that no one
    always runs first, and every other round in the reverse order, so that each contender
    follows each other equally often (a call runs slower right after one that freed many
    temporaries, so a fixed neighbour would bias it). Entry r of every list comes from the same
    repeat, so the lists can be compared pairwise (see `paired_ratio`).

    A donated step writes its outputs into its inputs' buffers, so a contender would keep the
    same addresses for the whole run, and their offsets against each other (cache sets, 4K
    aliasing between the streams) would bias it by a few percent for good or ill. Every
    `reallocate_every` repeats each carry is copied, untimed, into new buffers, so that the
    median is taken over several placements.
    """
    names = list(steps)
    carries = dict(carries)
    for name in names:
        carries[name] = block(steps[name](*carries[name]))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        if r and reallocate_every and r % reallocate_every == 0:
            carries = {name: fresh_copy(carry) for name, carry in carries.items()}
        order = names if (r // len(names)) % 2 == 0 else names[::-1]
        shift = r % len(names)
        for name in order[shift:] + order[:shift]:
            seconds, carries[name] = timed_call(steps[name], carries[name])
            times[name].append(seconds)
    return times


def interleaved_medians(steps: dict[str, Step], carries: dict[str, tuple], repeats: int) -> dict[str, float]:
    """Median seconds per call of each step, measured by `interleaved_times`."""
    return {name: statistics.median(ts) for name, ts in interleaved_times(steps, carries, repeats).items()}


def paired_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """Median over repeats of times[r] / reference[r]: robust to load that drifts during a run."""
    return statistics.median(t / u for t, u in zip(times, reference, strict=True))


def copy_probe(nbytes: int = 1 << 28) -> tuple[Step, tuple, int]:
    """A donated, jitted `x + 1` over `nbytes` of float32: (step, carry, bytes moved per call).

    A memory-bound streaming kernel the compiler cannot skip (one read and one write of every
    element): the practical upper bound for any elementwise update on this device. Time it
    among the contenders with `interleaved_times` so that it sees the same machine load.
    """
    size = nbytes // 4
    bump = jax.jit(lambda x: (x + 1,), donate_argnums=0)
    return bump, (jnp.zeros([size], jnp.float32),), 2 * size * 4


def torch_copy_probe(torch: Any, device: Any, nbytes: int = 1 << 28) -> tuple[Step, tuple, int]:
    """PyTorch's in-place `x.add_(1)` over `nbytes` of float32: (step, carry, bytes moved per call).

    The same streaming kernel as `copy_probe` in PyTorch's hands; where it runs faster than
    XLA's, `copy_probe` understates what the memory can deliver.
    """
    x = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
    return torch_step(torch, device, lambda: x.add_(1)), (), 2 * x.numel() * 4


def copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 15) -> float:
    """Bytes per second of `copy_probe` on its own (median of `repeats` calls)."""
    step, carry, moved = copy_probe(nbytes)
    return moved / interleaved_medians({"copy": step}, {"copy": carry}, repeats)["copy"]


def compiled_figures(jitted: Any, *args: Any) -> tuple[int | None, float | None]:
    """(scratch bytes beyond arguments and outputs, bytes all kernels read and write) of the
    compiled `jitted(*args)`, from XLA's memory and cost analyses; None where a backend has none.

    The second figure is what the compiled HLO moves: it shows how many passes over the
    arrays the kernels XLA chose make, against the minimum the algorithm needs.
    """
    compiled = jitted.lower(*args).compile()
    try:
        scratch = compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # memory_analysis is not available on every backend
        scratch = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        accessed = float(cost["bytes accessed"])
    except Exception:  # nor is cost_analysis
        accessed = None
    return scratch, accessed


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, text_columns: int = 1) -> str:
    """A plain, aligned text table: the first `text_columns` left-aligned, numbers right-aligned."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        return "  ".join(
            c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])
