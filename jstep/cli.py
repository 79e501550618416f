"""``python -m jstep`` (or ``jstep``): every optimizer of the notes training one network.

Trains the batch-normalized MLP of `jstep._demo` on the shipped 8x8 digits once per optimizer,
from the same initialisation and the same batches (with ``--precision bfloat16``, once in
float32 and once in bfloat16 with stochastic rounding; with ``--state-format
blockwise8,blockwise4``, each optimizer with state once more per format, its state stored
block-wise in 8 or 4 bits); shows a progress bar per run, then a table (optimizer,
precision, settings, final training loss, test accuracy, bytes per parameter of the
optimizer state and of params and state, steps per second); writes
``loss_curves.png`` (one panel of every optimizer; with several precisions, a panel per
optimizer), with several precisions ``precisions_against_float32.png`` (accuracy, loss and
bytes per parameter against float32), and ``loss_curves.json`` into ``--out``; and ends with
`jstep.check_vjp`'s worst error for a batch-norm layer of the trained network.

This module parses and prints only. It touches no JAX backend before the arguments are
read, so that ``--devices N`` can still ask XLA for N host devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from typing import Any, NamedTuple, NoReturn, TextIO

OPTIMIZERS = ("sgd", "momentum", "ema_momentum", "rmsprop", "adagrad", "adadelta", "adam")
PRECISIONS = ("float32", "bfloat16")
STATE_FORMATS = ("blockwise8", "blockwise4")
ROUNDINGS = ("stochastic", "nearest")
DEFAULT_STEPS = 1000
DEFAULT_BATCH_SIZE = 128
TRAINING_EXAMPLES = 1500
PNG_NAME, JSON_NAME = "loss_curves.png", "loss_curves.json"
AGAINST_FLOAT32_PNG_NAME = "precisions_against_float32.png"
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


def _names_from(choices: tuple[str, ...], kind: str):
    """An argparse type: a comma-separated list of `choices`, each once, in the order given."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(map(repr, unknown)) or repr(text)}; choose from {','.join(choices)}"
            )
        return list(dict.fromkeys(names))

    return parse


_optimizer_list = _names_from(OPTIMIZERS, "optimizer")
_state_format_list = _names_from(STATE_FORMATS, "state format")


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
            f"{PNG_NAME} (with --precision bfloat16 or --state-format also {AGAINST_FLOAT32_PNG_NAME}) and "
            f"{JSON_NAME}, and checks "
            "the batch-norm gradient with check_vjp."
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
        "--state-format",
        type=_state_format_list,
        default=[],
        metavar="FORMATS",
        help="comma-separated subset of: blockwise8, blockwise4. Trains each optimizer with state once more per "
        "format, its optimizer state stored block-wise in 8 or 4 bits (jstep.blockwise(8), jstep.blockwise(4)) "
        "and its params in the --precision dtype, and shows accuracy and bytes per parameter beside float32's "
        "(default: none)",
    )
    parser.add_argument(
        "--rounding",
        choices=ROUNDINGS,
        default="stochastic",
        help="how bfloat16 params and state, and 8- and 4-bit state, are stored after each step: stochastic "
        "rounding (unbiased: small steps and slow decays survive) or round-to-nearest (default stochastic)",
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
    header = (
        "optimizer",
        "precision",
        "settings",
        "final train loss",
        "test accuracy",
        "state bytes/param",
        "bytes/param",
        "steps/s",
    )
    lines = [
        (
            row["optimizer"],
            row["precision"],
            row["settings"],
            f"{row['final_train_loss']:.4f}",
            f"{100 * row['test_accuracy']:.1f}%",
            f"{row['state_bytes_per_parameter']:.2f}",
            f"{row['bytes_per_parameter']:.2f}",
            f"{row['steps_per_second']:.0f}",
        )
        for row in rows
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines, strict=True)]
    left = (True, True, True, False, False, False, False, False)

    def fmt(cells):
        return "  ".join(
            c.ljust(w) if leftward else c.rjust(w) for c, w, leftward in zip(cells, widths, left, strict=True)
        ).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def compare_precisions(rows: Sequence[dict]) -> list[str]:
    """One line per optimizer trained in float32 and in a narrower dtype or state format:
    accuracy, bytes of params and state, and bytes of the state alone side by side."""
    lines = []
    for wide in (row for row in rows if row["precision"] == "float32"):
        for narrow in (r for r in rows if r["optimizer"] == wide["optimizer"] and r["precision"] != "float32"):
            change = 100 * (narrow["test_accuracy"] - wide["test_accuracy"])
            accuracy = 100 * narrow["test_accuracy"]
            lines.append(
                f"{wide['optimizer']}: {narrow['precision']} test accuracy {accuracy:.1f}% against "
                f"float32's {100 * wide['test_accuracy']:.1f}% ({change:+.1f} points), "
                f"{narrow['bytes_per_parameter']:.2f} against {wide['bytes_per_parameter']:.2f} bytes per parameter "
                f"(state alone {narrow['state_bytes_per_parameter']:.2f} against "
                f"{wide['state_bytes_per_parameter']:.2f})"
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


# ------------------------------------------------------------------------------- pictures


class Curve(NamedTuple):
    """One run's training curve: its optimizer, the precision or state format it ran in
    (``"float32"``, ``"bfloat16 stochastic"``, ...), the per-step batch losses and their
    debiased moving average."""

    optimizer: str
    precision: str
    loss: Any  # a sequence or array of floats
    smoothed: Any


def _new_figure(**options: Any) -> Any:
    """A matplotlib Figure with an Agg canvas and constrained layout, outside pyplot (no global
    state, nothing to close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(layout="constrained", **options)
    FigureCanvasAgg(figure)
    return figure


def _suptitle(figure: Any, title: str) -> None:
    """`title` above every panel, broken into lines that fit the figure's width (10 characters an inch)."""
    figure.suptitle(textwrap.fill(title, width=int(10 * figure.get_figwidth())))


def _in_order(values: Any) -> list[str]:
    return list(dict.fromkeys(values))


def precision_styles(precisions: Sequence[str]) -> dict[str, dict[str, Any]]:
    """How each precision is drawn, the same in every panel and picture: colour ``C{i}``; the
    first (float32, the baseline) wide and pale at the bottom, every later one narrower than
    the one before and drawn above it, so that curves lying on one another all stay visible."""
    narrow = len(precisions) - 1
    styles = {}
    for index, precision in enumerate(precisions):
        if index == 0:
            width, alpha = 6.0, 0.35
        else:  # 3.6 points down to 1; a single narrow curve gets 1.5
            width, alpha = (1.5 if narrow == 1 else 3.6 - 2.6 * (index - 1) / (narrow - 1)), 0.95
        styles[precision] = {"color": f"C{index % 10}", "linewidth": width, "alpha": alpha, "zorder": 2 + index}
    return styles


def draw_curves(curves: Sequence[Curve], title: str) -> Any:
    """The main picture: `draw_one_panel` when the curves have one precision, else `draw_panels`."""
    one_precision = len(_in_order(curve.precision for curve in curves)) == 1
    return draw_one_panel(curves, title) if one_precision else draw_panels(curves, title)


def draw_one_panel(curves: Sequence[Curve], title: str) -> Any:
    """Training loss per step of every optimizer in one panel, a colour each (thin and pale: the
    raw losses; thick: their moving average), the legend to the right of the panel."""
    import numpy as np

    figure = _new_figure(figsize=(10, 5))
    ax = figure.subplots()
    for index, curve in enumerate(curves):
        color = f"C{index % 10}"
        steps = np.arange(1, len(curve.loss) + 1)
        # A curve that coincides with an earlier one (momentum's two forms) is dashed so both show.
        twin = next((other for other in curves[:index] if np.allclose(other.loss, curve.loss, rtol=1e-3)), None)
        label = f"{curve.optimizer}\n(same curve as {twin.optimizer})" if twin else curve.optimizer
        ax.plot(steps, curve.loss, color=color, alpha=0.25, linewidth=0.7)
        ax.plot(steps, curve.smoothed, color=color, linewidth=1.8, linestyle="--" if twin else "-", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss on the batch (cross entropy, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    _suptitle(figure, title)
    figure.legend(loc="outside right center")
    return figure


def draw_panels(curves: Sequence[Curve], title: str) -> Any:
    """A panel per optimizer (at most 4 a row, shared axes) with the moving average of its
    training loss in every precision, styled by `precision_styles`; the legend to the right of the panels."""
    import numpy as np

    optimizers = _in_order(curve.optimizer for curve in curves)
    precisions = _in_order(curve.precision for curve in curves)
    styles = precision_styles(precisions)
    columns = min(4, len(optimizers))
    rows = -(-len(optimizers) // columns)
    figure = _new_figure(figsize=(2.9 * columns + 2.2, 2.4 * rows + 1.2))
    grid = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
    for ax, optimizer in zip(grid.flat, optimizers, strict=False):
        for curve in (c for c in curves if c.optimizer == optimizer):
            steps = np.arange(1, len(curve.smoothed) + 1)
            ax.plot(steps, curve.smoothed, label=curve.precision, **styles[curve.precision])
        ax.set_title(optimizer)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    for index, ax in enumerate(grid.flat):
        if index >= len(optimizers):
            figure.delaxes(ax)
        elif index + columns >= len(optimizers):  # the lowest panel of its column shows the steps
            ax.xaxis.set_tick_params(labelbottom=True)
    _suptitle(figure, title)
    figure.supxlabel("training step")
    figure.supylabel("training loss on the batch\n(moving average, log scale)")
    handles = [_legend_line(precision, styles[precision]) for precision in precisions]
    figure.legend(handles=handles, loc="outside right center")
    return figure


def _legend_line(label: str, style: dict[str, Any]) -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], label=label, **style)


def _bars(ax: Any, groups: dict[str, tuple[str, list[float]]], text: str, bottom: float = 0.0) -> None:
    """Grouped bars: position i holds, side by side, value i of each ``{name: (colour, values)}``,
    the bar from `bottom` to the value and labelled ``text.format(value)``; NaN draws nothing."""
    width = 0.8 / max(1, len(groups))
    for slot, (name, (colour, values)) in enumerate(groups.items()):
        positions = [i + (slot - (len(groups) - 1) / 2) * width for i in range(len(values))]
        heights = [value - bottom for value in values]
        bars = ax.bar(positions, heights, width, bottom=bottom, color=colour, label=name)
        texts = ["" if math.isnan(value) else text.format(value) for value in values]
        ax.bar_label(bars, labels=texts, fontsize=7, padding=2)


def _symmetric_limits(values: Any, floor: float) -> tuple[float, float]:
    """(-m, m) with m 1.35 times the largest |value| (NaN ignored), at least `floor`."""
    finite = [abs(v) for v in values if not math.isnan(v)]
    largest = max([floor, *(1.35 * v for v in finite)])
    return -largest, largest


def draw_against_baseline(rows: Sequence[dict], title: str) -> Any:
    """What each precision changes, per optimizer, from the table's rows (`format_table`'s):
    test accuracy minus the first precision's (float32's) in points, final training loss over
    float32's (log scale), and bytes per parameter of params plus optimizer state. Colours as
    in `precision_styles`; the legend below the panels."""
    optimizers = _in_order(row["optimizer"] for row in rows)
    precisions = _in_order(row["precision"] for row in rows)
    baseline = precisions[0]
    colours = {precision: style["color"] for precision, style in precision_styles(precisions).items()}
    table = {(row["optimizer"], row["precision"]): row for row in rows}

    def values(precision: str, value: Any) -> tuple[str, list[float]]:
        """(colour, [value(row, baseline row) per optimizer]), NaN where either run is missing."""
        pairs = [(table.get((o, precision)), table.get((o, baseline))) for o in optimizers]
        return colours[precision], [value(row, base) if row and base else math.nan for row, base in pairs]

    def points_gained(row: dict, base: dict) -> float:
        return 100 * (row["test_accuracy"] - base["test_accuracy"])

    def loss_ratio(row: dict, base: dict) -> float:
        return row["final_train_loss"] / base["final_train_loss"] if base["final_train_loss"] > 0 else math.nan

    others = precisions[1:]
    accuracy = {p: values(p, points_gained) for p in others}
    loss = {p: values(p, loss_ratio) for p in others}
    held = {p: values(p, lambda row, base: row["bytes_per_parameter"]) for p in precisions}

    figure = _new_figure(figsize=(max(6.5, 1.1 * len(optimizers) + 2.5), 8.5))
    accuracy_ax, loss_ax, bytes_ax = figure.subplots(3, 1, sharex=True)
    _bars(accuracy_ax, accuracy, "{:+.1f}")
    accuracy_ax.axhline(0.0, color="black", linewidth=0.8)
    accuracy_ax.set_ylim(*_symmetric_limits([v for _, vs in accuracy.values() for v in vs], 1.0))
    accuracy_ax.set_title(f"test accuracy minus {baseline}'s (percentage points)", loc="left")
    loss_ax.set_yscale("log")
    _bars(loss_ax, loss, "{:.2f}", bottom=1.0)
    loss_ax.axhline(1.0, color="black", linewidth=0.8)
    logs = [math.log10(v) for _, vs in loss.values() for v in vs if v > 0]
    low, high = _symmetric_limits(logs, math.log10(2.0))
    loss_ax.set_ylim(10**low, 10**high)
    ratios = [r for r in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if 10**low <= r <= 10**high]
    loss_ax.set_yticks(ratios, [f"\N{MULTIPLICATION SIGN}{r:g}" for r in ratios])
    loss_ax.minorticks_off()
    loss_ax.set_title(f"final training loss divided by {baseline}'s (log scale)", loc="left")
    _bars(bytes_ax, held, "{:.1f}")
    bytes_ax.set_ylim(0, 1.2 * max(v for _, vs in held.values() for v in vs if not math.isnan(v)))
    bytes_ax.set_title("bytes per parameter held by params and optimizer state", loc="left")
    bytes_ax.set_xticks(range(len(optimizers)), optimizers)
    for ax in (accuracy_ax, loss_ax, bytes_ax):
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    _suptitle(figure, title)
    figure.legend(*bytes_ax.get_legend_handles_labels(), loc="outside lower center", ncols=len(precisions))
    return figure


def write_pictures(
    out: pathlib.Path, curves: Sequence[Curve], rows: Sequence[dict], batch_size: int
) -> list[pathlib.Path]:
    """`PNG_NAME` (`draw_curves`) into `out`, and with several precisions `AGAINST_FLOAT32_PNG_NAME`
    (`draw_against_baseline`); returns their paths."""
    title = f"The notes' optimizers on the 8x8 digits ({batch_size}-example batches, MLP with batch norm)"
    pictures = [(out / PNG_NAME, draw_curves(curves, title))]
    if len(_in_order(row["precision"] for row in rows)) > 1:
        subtitle = (
            f"What a narrower precision or state format changes against float32 (8x8 digits, {batch_size}-example "
            "batches)"
        )
        pictures.append((out / AGAINST_FLOAT32_PNG_NAME, draw_against_baseline(rows, subtitle)))
    for path, figure in pictures:
        figure.savefig(path, dpi=120)
    return [path for path, _ in pictures]


# ----------------------------------------------------------------------------------- main


def training_runs(
    optimizers: Sequence[str], precision: str, state_formats: Sequence[str]
) -> list[tuple[str, str, str | None]]:
    """(optimizer, params dtype, state format or None) of each run, in the table's order: per
    optimizer float32, then `precision` if narrower, then each state format (optimizers with
    state only; params in `precision`)."""
    from jstep import _demo

    runs: list[tuple[str, str, str | None]] = []
    for name in optimizers:
        runs += [(name, dtype, None) for dtype in dict.fromkeys(["float32", precision])]
        if _demo.keeps_state(name):
            runs += [(name, precision, state_format) for state_format in state_formats]
    return runs


def run_label(name: str, dtype: str, state_format: str | None) -> str:
    """The progress bar's label: 'adam', 'adam bfloat16', 'adam blockwise8'."""
    return " ".join([name, *([] if dtype == "float32" else [dtype]), *([state_format] if state_format else [])])


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

    stochastic = args.rounding == "stochastic"
    runs = training_runs(args.optimizers, args.precision, args.state_format)
    labels = [run_label(name, dtype, state_format) for name, dtype, state_format in runs]
    results = []
    for (name, dtype, state_format), label in zip(runs, labels, strict=True):
        bar = ProgressBar(label, args.steps, stderr, label_width=max(13, *map(len, labels)))

        def show(t: int, loss: Any, bar: ProgressBar = bar) -> None:
            bar.update(t, float(loss))

        results.append(
            _demo.train(
                name, init, data, batches, mesh=mesh, precision=dtype, state_format=state_format,
                stochastic_rounding=stochastic, seed=args.seed, on_progress=show,
            )
        )  # fmt: skip

    rows = [
        {
            "optimizer": r.optimizer,
            "precision": r.precision,
            "settings": _demo.describe_settings(r.settings),
            "final_train_loss": r.final_train_loss,
            "test_accuracy": r.test_accuracy,
            "state_bytes_per_parameter": r.state_bytes_per_parameter,
            "bytes_per_parameter": r.bytes_per_parameter,
            "steps_per_second": r.steps_per_second,
        }
        for r in results
    ]
    print("\n" + format_table(rows), file=stdout)
    print("final train loss: the whole training set in evaluation mode (running batch-norm statistics).", file=stdout)
    print(
        "bytes/param: what the params and the optimizer state hold, per parameter; state bytes/param: the "
        "optimizer state alone.",
        file=stdout,
    )
    rounded = "stochastic rounding" if stochastic else "round-to-nearest"
    if args.precision != "float32":
        print(
            f"{args.precision}: params, gradients and optimizer state in {args.precision}, arithmetic in float32; "
            f"after each step both are stored by {rounded}.",
            file=stdout,
        )
    for state_format in args.state_format:
        fmt = _demo.STATE_FORMATS[state_format]
        print(
            f"{fmt.bits}-bit: optimizer state stored by {fmt} (leaves under {fmt.min_size} elements stay float32), "
            f"params and gradients in {args.precision}; arithmetic in float32, the state stored by {rounded} "
            "after each step.",
            file=stdout,
        )
    stateless = [name for name in args.optimizers if not _demo.keeps_state(name)]
    if args.state_format and stateless:
        print(f"{', '.join(stateless)} keeps no optimizer state: no 8- or 4-bit row.", file=stdout)
    if len(runs) > len(args.optimizers):
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
    record = {
        "dataset": "8x8 handwritten digits (UCI Optical Recognition of Handwritten Digits, CC BY 4.0)",
        "model": "64-128-BN-relu-64-BN-relu-10",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "devices": args.devices,
        "precision": args.precision,
        "state_formats": args.state_format,
        "rounding": args.rounding,
        "runs": [
            {
                **row,
                "dtype": dtype,
                "state_format": state_format or dtype,
                "rounding": None if dtype == "float32" and state_format is None else args.rounding,
                "settings": r.settings,
                "loss": r.losses.tolist(),
            }
            for row, r, (_, dtype, state_format) in zip(rows, results, runs, strict=True)
        ],
        "check_vjp": check_record(check) if check else {"passed": False, "report": failure},
    }
    json_path = args.out / JSON_NAME
    json_path.write_text(json.dumps(record, indent=1))
    decay = smoothing_decay(args.steps)
    curves = [Curve(r.optimizer, r.precision, r.losses, _demo.smooth(r.losses, decay)) for r in results]
    try:
        pictures = write_pictures(args.out, curves, rows, args.batch_size)
    except ImportError:
        pictures = []
        print(f"matplotlib is not installed, so {PNG_NAME} was not drawn: pip install 'jstep[demo]'", file=stderr)
    written = [str(path) for path in [*pictures, json_path]]
    print("\nwrote " + ", ".join(written[:-1]) + " and " + written[-1], file=stdout)
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
