"""``python -m jstep`` (or ``jstep``): every optimizer of the notes training one network.

Trains the batch-normalized MLP of `jstep._demo` on the shipped 8x8 digits once per optimizer,
from the same initialisation and the same batches (with ``--precision bfloat16``, once in
float32 and once in bfloat16 with stochastic rounding); shows a progress bar per run, then a
table (optimizer, precision, settings, final training loss, test accuracy, bytes per
parameter of params and optimizer state, steps per second); writes
``loss_curves.png`` and ``loss_curves.json`` into ``--out``; and ends with `jstep.check_vjp`'s
worst error for a batch-norm layer of the trained network.

This module parses and prints only. It touches no JAX backend before the arguments are
read, so that ``--devices N`` can still ask XLA for N host devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, NoReturn, TextIO

OPTIMIZERS = ("sgd", "momentum", "ema_momentum", "rmsprop", "adagrad", "adadelta", "adam")
PRECISIONS = ("float32", "bfloat16")
ROUNDINGS = ("stochastic", "nearest")
DEFAULT_STEPS = 1000
DEFAULT_BATCH_SIZE = 128
TRAINING_EXAMPLES = 1500
PNG_NAME, JSON_NAME = "loss_curves.png", "loss_curves.json"
HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"
_CHILD_MARK = "JSTEP_DEVICES_CHILD"


# ------------------------------------------------------------------------------ arguments


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _whole_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _optimizer_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in OPTIMIZERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer {', '.join(map(repr, unknown)) or repr(text)}; choose from {','.join(OPTIMIZERS)}"
        )
    return list(dict.fromkeys(names))


def _seed(text: str) -> int:
    value = _whole_number(text)
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^31), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jstep",
        description=(
            "Train a small MLP with batch normalization (64-128-BN-relu-64-BN-relu-10) on the "
            "8x8 handwritten digits that ship with jstep, once per optimizer of the notes, from "
            "the same initialisation and the same batches. Prints a table, writes "
            f"{PNG_NAME} and {JSON_NAME}, and checks the batch-norm gradient with check_vjp."
        ),
    )
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=DEFAULT_STEPS,
        metavar="N",
        help=f"training steps per optimizer (default {DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        metavar="K",
        help=f"examples per step, at most {TRAINING_EXAMPLES} and a multiple of --devices "
        f"(default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--optimizers",
        type=_optimizer_list,
        default=list(OPTIMIZERS),
        metavar="NAMES",
        help=f"comma-separated subset of: {', '.join(OPTIMIZERS)} (default: all, in this order)",
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="S",
        help="seed of the initialisation, the batch order and the stochastic rounding; the same seed gives the same "
        "numbers (default 0)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="dtype of the params, gradients and optimizer state. bfloat16 trains each optimizer twice, in float32 "
        "and in bfloat16 (arithmetic in float32), and shows them side by side (default float32)",
    )
    parser.add_argument(
        "--rounding",
        choices=ROUNDINGS,
        default="stochastic",
        help="how bfloat16 params and state are stored after each step: stochastic rounding (unbiased: small "
        "steps and slow decays survive) or round-to-nearest (default stochastic)",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("."),
        metavar="FOLDER",
        help="folder for the plot and the curves; created if missing (default: the current folder)",
    )
    parser.add_argument(
        "--devices",
        type=_positive_int,
        default=1,
        metavar="N",
        help="data-parallel training over N devices with shard_map (each holds 1/N of every batch); "
        "on a CPU-only machine N host devices are used (default 1)",
    )
    return parser


def check_writable(folder: pathlib.Path) -> str | None:
    """None if files can be written into `folder` (creating it), else why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return f"--out {str(folder)!r} is not a writable folder: {error.strerror or error}"
    return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, checked together; a bad one exits with code 2 and a one-line message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size > TRAINING_EXAMPLES:
        parser.error(f"--batch-size must be at most {TRAINING_EXAMPLES} (the training examples), got {args.batch_size}")
    if args.batch_size % args.devices:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of --devices {args.devices}")
    problem = check_writable(args.out)
    if problem:
        parser.error(problem)
    return args


# -------------------------------------------------------------------------------- devices


def with_host_devices(flags: str, count: int) -> str:
    """XLA_FLAGS asking for at least `count` host (CPU) devices."""
    match = re.search(rf"{HOST_DEVICES_FLAG}=(\d+)", flags)
    if match and int(match.group(1)) >= count:
        return flags
    flags = re.sub(rf"\s*{HOST_DEVICES_FLAG}=\d+", "", flags)
    return f"{flags} {HOST_DEVICES_FLAG}={count}".strip()


def _rerun_with_devices(argv: Sequence[str], count: int) -> int:
    """Run this command again in a fresh process whose XLA sees `count` host devices."""
    env = dict(os.environ, XLA_FLAGS=with_host_devices(os.environ.get("XLA_FLAGS", ""), count), **{_CHILD_MARK: "1"})
    return subprocess.run([sys.executable, "-m", "jstep", *argv], env=env, check=False).returncode


# ------------------------------------------------------------------------------- printing


class ProgressBar:
    """``adam          [##########..........]  500/1000  loss 0.0123`` on one line of `stream`."""

    def __init__(self, label: str, total: int, stream: TextIO = sys.stderr, width: int = 30, label_width: int = 13):
        self.label, self.total, self.stream, self.width = label, total, stream, width
        self.label_width = label_width
        self.live = getattr(stream, "isatty", lambda: False)()

    def update(self, done: int, loss: float) -> None:
        if not self.live and done < self.total:
            return  # not a terminal: one final line instead of a stream of carriage returns
        filled = self.width * done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        digits = len(str(self.total))
        line = f"{self.label:<{self.label_width}} [{bar}] {done:>{digits}}/{self.total}  loss {loss:.4f}"
        self.stream.write(("\r" if self.live else "") + line + ("\n" if done >= self.total else ""))
        self.stream.flush()


def format_table(rows: Sequence[dict]) -> str:
    """The results as an aligned text table."""
    header = ("optimizer", "precision", "settings", "final train loss", "test accuracy", "bytes/param", "steps/s")
    lines = [
        (
            row["optimizer"],
            row["precision"],
            row["settings"],
            f"{row['final_train_loss']:.4f}",
            f"{100 * row['test_accuracy']:.1f}%",
            f"{row['bytes_per_parameter']:.2f}",
            f"{row['steps_per_second']:.0f}",
        )
        for row in rows
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines, strict=True)]
    left = (True, True, True, False, False, False, False)

    def fmt(cells):
        return "  ".join(
            c.ljust(w) if leftward else c.rjust(w) for c, w, leftward in zip(cells, widths, left, strict=True)
        ).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def plot_curves(path: pathlib.Path, curves: dict[str, Any], smoothed: dict[str, Any], title: str) -> None:
    """Training loss per step for each optimizer (thin: raw; thick: debiased moving average).

    Curves named ``"adam (bfloat16 stochastic)"`` share their optimizer's colour; the second
    precision of an optimizer is drawn dashed."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(curves)
    optimizers = list(dict.fromkeys(name.split(" (")[0] for name in names))
    for index, name in enumerate(names):
        optimizer = name.split(" (")[0]
        color = f"C{optimizers.index(optimizer)}"
        steps = range(1, len(curves[name]) + 1)
        # A curve that coincides with an earlier one (momentum's two forms) is dashed so both show.
        twin = next((other for other in names[:index] if np.allclose(curves[other], curves[name], rtol=1e-3)), None)
        second = any(other.split(" (")[0] == optimizer for other in names[:index])
        ax.plot(steps, curves[name], color=color, alpha=0.25, linewidth=0.7)
        ax.plot(steps, smoothed[name], color=color, linewidth=1.8, linestyle="--" if twin or second else "-",
                label=f"{name} (same curve as {twin})" if twin else name)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss on the batch (cross entropy, log scale)")
    ax.set_title(title)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_precisions(rows: Sequence[dict]) -> list[str]:
    """One line per optimizer trained in float32 and in a narrower dtype: accuracy and bytes side by side."""
    lines = []
    for wide in (row for row in rows if row["precision"] == "float32"):
        for narrow in (r for r in rows if r["optimizer"] == wide["optimizer"] and r["precision"] != "float32"):
            change = 100 * (narrow["test_accuracy"] - wide["test_accuracy"])
            accuracy = 100 * narrow["test_accuracy"]
            lines.append(
                f"{wide['optimizer']}: {narrow['precision']} test accuracy {accuracy:.1f}% against "
                f"float32's {100 * wide['test_accuracy']:.1f}% ({change:+.1f} points), "
                f"{narrow['bytes_per_parameter']:.2f} against {wide['bytes_per_parameter']:.2f} bytes per parameter"
            )
    return lines


def smoothing_decay(steps: int) -> float:
    """The plot's moving-average decay: a window of about steps/40 steps, at most 0.98."""
    return min(0.98, max(0.0, 1.0 - 40.0 / steps))


def check_record(check: Any) -> dict:
    """`jstep.check_vjp`'s report on a batch-norm layer as JSON-ready data."""
    from jstep import _demo

    return {
        "passed": check.report.passed,
        "optimizer": check.optimizer,
        "layer": check.layer + 1,
        "input_shape": list(check.input_shape),
        "worst": _demo.worst_errors(check),
        "comparisons": [dataclasses.asdict(c) for c in check.report.comparisons],
    }


# ----------------------------------------------------------------------------------- main


def run(args: argparse.Namespace, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    """Train, print, write the files, check the batch-norm gradient. Returns the exit code."""
    import jax

    from jstep import _demo

    mesh = _demo.make_mesh(args.devices)
    data = _demo.digits_dataset()
    batches = _demo.batch_indices(args.seed, len(data.y_train), args.batch_size, args.steps)
    init = _demo.init_mlp(jax.random.key(args.seed), _demo.batch_norm_layer())
    where = f"{args.devices} devices ({jax.devices()[0].platform})" if mesh is not None else jax.devices()[0].platform
    print(
        f"digits: {len(data.y_train)} training / {len(data.y_test)} test images; MLP 64-128-BN-relu-64-BN-relu-10; "
        f"{args.steps} steps of {args.batch_size} examples on {where}; seed {args.seed}",
        file=stdout,
        flush=True,
    )

    precisions = list(dict.fromkeys(["float32", args.precision]))
    stochastic = args.rounding == "stochastic"
    runs = [(name, precision) for name in args.optimizers for precision in precisions]
    labels = [name if precision == "float32" else f"{name} {precision}" for name, precision in runs]
    results = []
    for (name, precision), label in zip(runs, labels, strict=True):
        bar = ProgressBar(label, args.steps, stderr, label_width=max(13, *map(len, labels)))

        def show(t: int, loss: Any, bar: ProgressBar = bar) -> None:
            bar.update(t, float(loss))

        results.append(
            _demo.train(
                name, init, data, batches, mesh=mesh, precision=precision, stochastic_rounding=stochastic,
                seed=args.seed, on_progress=show,
            )
        )  # fmt: skip

    rows = [
        {
            "optimizer": r.optimizer,
            "precision": r.precision,
            "settings": _demo.describe_settings(r.settings),
            "final_train_loss": r.final_train_loss,
            "test_accuracy": r.test_accuracy,
            "bytes_per_parameter": r.bytes_per_parameter,
            "steps_per_second": r.steps_per_second,
        }
        for r in results
    ]
    print("\n" + format_table(rows), file=stdout)
    print("final train loss: the whole training set in evaluation mode (running batch-norm statistics).", file=stdout)
    print("bytes/param: what the params and the optimizer state hold, per parameter.", file=stdout)
    if args.precision != "float32":
        print(
            f"{args.precision}: params, gradients and optimizer state in {args.precision}, arithmetic in float32; "
            f"after each step both are stored by {'stochastic rounding' if stochastic else 'round-to-nearest'}.",
            file=stdout,
        )
        print("\n".join(compare_precisions(rows)), file=stdout)
    if {"momentum", "ema_momentum"} <= set(args.optimizers):
        print(
            "momentum (eta) and ema_momentum (eta' = eta / (1 - gamma)) are the notes' two forms of one method.",
            file=stdout,
        )

    checked = next(r for r in reversed(results) if r.precision == "float32")
    try:
        check, failure = _demo.check_batch_norm_layer(checked, data, batches[-1]), None
    except AssertionError as error:
        check, failure = None, str(error)
    curves = {r.optimizer if len(precisions) == 1 else f"{r.optimizer} ({r.precision})": r.losses for r in results}
    record = {
        "dataset": "8x8 handwritten digits (UCI Optical Recognition of Handwritten Digits, CC BY 4.0)",
        "model": "64-128-BN-relu-64-BN-relu-10",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "devices": args.devices,
        "precision": args.precision,
        "rounding": args.rounding,
        "runs": [
            {**row, "settings": r.settings, "loss": r.losses.tolist()} for row, r in zip(rows, results, strict=True)
        ],
        "check_vjp": check_record(check) if check else {"passed": False, "report": failure},
    }
    written = []
    json_path = args.out / JSON_NAME
    json_path.write_text(json.dumps(record, indent=1))
    written.append(json_path)
    try:
        png_path = args.out / PNG_NAME
        decay = smoothing_decay(args.steps)
        plot_curves(
            png_path,
            curves,
            {name: _demo.smooth(loss, decay) for name, loss in curves.items()},
            f"The notes' optimizers on the 8x8 digits ({args.batch_size}-example batches, MLP with batch norm)",
        )
        written.insert(0, png_path)
    except ImportError:
        print(f"matplotlib is not installed, so {PNG_NAME} was not drawn: pip install 'jstep[demo]'", file=stderr)
    print("\nwrote " + " and ".join(str(path) for path in written), file=stdout)
    if check is None:
        print(f"check_vjp of the batch-norm layer FAILED:{failure}", file=stdout)
        return 1
    print(_demo.describe_check(check), file=stdout)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jstep`` and the ``jstep`` script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.devices > 1:
        # Read by XLA when JAX first starts a backend; importing jax alone does not start one.
        os.environ["XLA_FLAGS"] = with_host_devices(os.environ.get("XLA_FLAGS", ""), args.devices)
        import jax

        if jax.device_count() < args.devices and len(jax.devices("cpu")) < args.devices:
            if os.environ.get(_CHILD_MARK):
                print(
                    f"jstep: error: --devices {args.devices}: only {jax.device_count()} devices available",
                    file=sys.stderr,
                )
                return 2
            return _rerun_with_devices(argv, args.devices)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\njstep: interrupted", file=sys.stderr)
        return 130
