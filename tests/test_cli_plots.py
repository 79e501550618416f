"""The main job's pictures: one panel for one precision, a panel per optimizer for several, and
the picture against float32; no legend over a curve, an axes or a label, every curve visible.

The layouts are drawn from synthetic curves (fast, no training); one short ``--precision
bfloat16`` run checks the files the job writes.
"""

import io
import json
import math
import struct

import numpy as np
import pytest
from matplotlib.transforms import Bbox

from jstep import cli

OPTIMIZERS = list(cli.OPTIMIZERS)
FOUR = ["float32", "bfloat16 stochastic", "8-bit", "4-bit"]
TITLE = "The notes' optimizers on the 8x8 digits (128-example batches, MLP with batch norm)"  # the job's


# ------------------------------------------------------------------------------ the checks


def renderer_of(figure):
    figure.canvas.draw()
    return figure.canvas.get_renderer()


def legends_of(figure):
    return [*figure.legends, *(ax.get_legend() for ax in figure.axes if ax.get_legend() is not None)]


def texts_of(figure):
    """Every visible, non-empty text outside the legends: titles, axis and tick labels, bar labels."""
    texts = list(figure.texts)
    for ax in figure.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        texts += drawn_tick_labels(ax.xaxis) + drawn_tick_labels(ax.yaxis)
    return [text for text in texts if text.get_visible() and text.get_text().strip()]


def drawn_tick_labels(axis):
    """The labels of the ticks inside the axis's view (matplotlib keeps, and does not draw, others)."""
    low, high = sorted(axis.get_view_interval())
    ticks = [*axis.get_major_ticks(), *axis.get_minor_ticks()]
    return [tick.label1 for tick in ticks if low <= tick.get_loc() <= high] + [
        tick.label2 for tick in ticks if low <= tick.get_loc() <= high and tick.label2.get_visible()
    ]


def area_of_overlap(a, b):
    both = Bbox.intersection(a, b)
    return 0.0 if both is None else both.width * both.height


def legend_overlaps(figure):
    """(legend, what) for each axes or text whose window extent meets a legend's."""
    renderer = renderer_of(figure)
    found = []
    for legend in legends_of(figure):
        box = legend.get_window_extent(renderer)
        found += [(legend, ax) for ax in figure.axes if box.overlaps(ax.get_window_extent(renderer))]
        found += [(legend, text) for text in texts_of(figure) if box.overlaps(text.get_window_extent(renderer))]
    return found


def overlapping_texts(figure):
    """Pairs of texts that share more than a pixel of area (a label drawn over another)."""
    renderer = renderer_of(figure)
    boxes = [(text, text.get_window_extent(renderer)) for text in texts_of(figure)]
    return [
        (a.get_text(), b.get_text())
        for i, (a, box_a) in enumerate(boxes)
        for b, box_b in boxes[i + 1 :]
        if area_of_overlap(box_a, box_b) > 1.0
    ]


def hidden_lines(figure):
    """Lines with no point inside their axes and outside every legend (in display coordinates)."""
    renderer = renderer_of(figure)
    legend_boxes = [legend.get_window_extent(renderer) for legend in legends_of(figure)]
    hidden = []
    for ax in figure.axes:
        frame = ax.get_window_extent(renderer)
        for line in ax.get_lines():
            x, y = line.get_transform().transform(line.get_xydata()).T
            shown = (frame.x0 <= x) & (x <= frame.x1) & (frame.y0 <= y) & (y <= frame.y1)
            for box in legend_boxes:
                shown &= ~((box.x0 <= x) & (x <= box.x1) & (box.y0 <= y) & (y <= box.y1))
            if not shown.any():
                hidden.append(line)
    return hidden


def pixels(figure):
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(int)


def pixels_only_it_draws(figure, line, change=32):
    """How many pixels change by more than `change` (of 255) in some channel when `line` is hidden
    (the layout and the axes' limits frozen first, so that only the line's own pixels change)."""
    pixels(figure)
    figure.set_layout_engine("none")
    for ax in figure.axes:
        ax.set_xlim(ax.get_xlim()), ax.set_ylim(ax.get_ylim())
    shown = pixels(figure)
    line.set_visible(False)
    try:
        return int(np.sum(np.abs(pixels(figure) - shown).max(axis=-1) > change))
    finally:
        line.set_visible(True)


def cut_off(figure):
    """The texts and legends that do not lie wholly inside the figure (the saved picture)."""
    renderer = renderer_of(figure)
    inside = figure.bbox
    boxes = [(text.get_text(), text.get_window_extent(renderer)) for text in texts_of(figure)]
    boxes += [("legend", legend.get_window_extent(renderer)) for legend in legends_of(figure)]
    return [name for name, box in boxes if not (inside.contains(*box.p0) and inside.contains(*box.p1))]


def assert_nothing_hidden(figure):
    assert legend_overlaps(figure) == []
    assert hidden_lines(figure) == []
    assert overlapping_texts(figure) == []
    assert cut_off(figure) == []


# ---------------------------------------------------------------------------- the curves


def synthetic_curves(optimizers, precisions, steps=200, same=False):
    """Decaying noisy losses; with `same`, every precision of an optimizer has one curve (the
    case where curves lie on one another)."""
    rng = np.random.default_rng(0)
    curves = []
    for i, optimizer in enumerate(optimizers):
        trend = 2.3 * np.exp(-(0.01 + 0.004 * i) * np.arange(steps))
        noise = np.exp(0.2 * rng.standard_normal((len(precisions), steps)))
        for j, precision in enumerate(precisions):
            loss = trend * noise[0] + 1e-4 if same else trend * (1.0 + 0.15 * j) * noise[j] + 1e-4
            curves.append(cli.Curve(optimizer, precision, loss, moving_average(loss)))
    return curves


def moving_average(values, decay=0.9):
    averaged, total = [], 0.0
    for t, value in enumerate(values, start=1):
        total = decay * total + (1 - decay) * value
        averaged.append(total / (1 - decay**t))
    return np.array(averaged)


def synthetic_rows(optimizers, precisions):
    rows = []
    for i, optimizer in enumerate(optimizers):
        for j, precision in enumerate(precisions):
            rows.append(
                {
                    "optimizer": optimizer,
                    "precision": precision,
                    "final_train_loss": 1e-3 * (i + 1) * (1 + 0.7 * j),
                    "test_accuracy": 0.98 - 0.01 * j + 0.001 * i,
                    "bytes_per_parameter": (4.0 + 4.0 * (i % 3)) / 2**j,
                }
            )
    return rows


# --------------------------------------------------------------------------- the layouts


def test_one_precision_keeps_one_panel_of_every_optimizer():
    figure = cli.draw_curves(synthetic_curves(OPTIMIZERS, ["float32"]), TITLE)
    [ax] = figure.axes
    assert len(ax.get_lines()) == 2 * len(OPTIMIZERS)  # raw and moving average
    [legend] = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == OPTIMIZERS
    assert ax.get_yscale() == "log"
    assert_nothing_hidden(figure)


@pytest.mark.parametrize(
    ("optimizers", "precisions", "rows", "columns"),
    [
        (OPTIMIZERS, FOUR[:2], 2, 4),
        (OPTIMIZERS, FOUR, 2, 4),
        (["sgd", "adam"], FOUR, 1, 2),
        (["sgd", "momentum", "rmsprop", "adagrad", "adam"], FOUR[:3], 2, 4),
        (["adam"], FOUR[:2], 1, 1),
    ],
)
def test_several_precisions_draw_a_panel_per_optimizer(optimizers, precisions, rows, columns):
    figure = cli.draw_curves(synthetic_curves(optimizers, precisions), TITLE)
    panels = figure.axes
    assert [ax.get_title() for ax in panels] == optimizers
    assert len(panels) == len(optimizers)  # the empty places of the grid are removed
    assert {ax.get_subplotspec().get_gridspec().get_geometry() for ax in panels} == {(rows, columns)}
    colours = {}
    for ax in panels[1:]:
        assert ax.get_shared_x_axes().joined(panels[0], ax) and ax.get_shared_y_axes().joined(panels[0], ax)
    for ax in panels:
        assert [line.get_label() for line in ax.get_lines()] == precisions
        for line in ax.get_lines():  # a precision has one colour and one width in every panel
            colours.setdefault(line.get_label(), (line.get_color(), line.get_linewidth()))
            assert colours[line.get_label()] == (line.get_color(), line.get_linewidth())
    assert len({colour for colour, _ in colours.values()}) == len(precisions)
    [legend] = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == precisions
    assert_nothing_hidden(figure)
    for ax in panels:  # the lowest panel of each column labels the steps
        below = [other for other in panels if other.get_subplotspec().colspan == ax.get_subplotspec().colspan]
        if ax is below[-1]:
            assert any(label.get_visible() and label.get_text() for label in ax.get_xticklabels())


@pytest.mark.parametrize("precisions", [FOUR[:2], FOUR])
def test_a_curve_lying_on_another_still_shows(precisions):
    """Every precision of an optimizer on one curve: hiding any one of them changes pixels along
    the whole curve, so none is covered by the others (float32 wide and pale below, each later
    one narrower above)."""
    figure = cli.draw_curves(synthetic_curves(["sgd", "adam"], precisions, same=True), TITLE)
    styles = cli.precision_styles(precisions)
    assert styles[precisions[0]]["alpha"] < 0.5
    widths = [styles[precision]["linewidth"] for precision in precisions]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == len(widths)
    assert [styles[precision]["zorder"] for precision in precisions] == sorted(
        styles[precision]["zorder"] for precision in precisions
    )
    for ax in figure.axes:
        for line in ax.get_lines():
            assert shows_along_the_panel(figure, ax, line), line.get_label()


def shows_along_the_panel(figure, ax, line):
    """At least as many pixels as the panel is wide change when the line is hidden: a rim on
    each side of a curve that runs across most of the panel."""
    return pixels_only_it_draws(figure, line) >= ax.get_window_extent(renderer_of(figure)).width


def test_the_picture_against_float32_shows_the_differences_and_the_bytes():
    rows = synthetic_rows(OPTIMIZERS, FOUR)
    figure = cli.draw_against_baseline(rows, TITLE)
    accuracy_ax, loss_ax, bytes_ax = figure.axes
    by = {(row["optimizer"], row["precision"]): row for row in rows}

    def bars(ax):
        return {container.get_label(): container for container in ax.containers}

    for precision, container in bars(accuracy_ax).items():
        expected = [100 * (by[o, precision]["test_accuracy"] - by[o, "float32"]["test_accuracy"]) for o in OPTIMIZERS]
        np.testing.assert_allclose([bar.get_height() for bar in container], expected, rtol=1e-12)
    for precision, container in bars(loss_ax).items():
        expected = [by[o, precision]["final_train_loss"] / by[o, "float32"]["final_train_loss"] for o in OPTIMIZERS]
        np.testing.assert_allclose([bar.get_y() + bar.get_height() for bar in container], expected, rtol=1e-12)
        assert all(bar.get_y() == 1.0 for bar in container)
    for precision, container in bars(bytes_ax).items():
        expected = [by[o, precision]["bytes_per_parameter"] for o in OPTIMIZERS]
        np.testing.assert_allclose([bar.get_height() for bar in container], expected, rtol=1e-12)
    assert list(bars(accuracy_ax)) == list(bars(loss_ax)) == FOUR[1:] and list(bars(bytes_ax)) == FOUR
    colours = {precision: style["color"] for precision, style in cli.precision_styles(FOUR).items()}
    for ax in figure.axes:
        for precision, container in bars(ax).items():
            assert all(np.allclose(bar.get_facecolor()[:3], _rgb(colours[precision])) for bar in container)
    assert [label.get_text() for label in bytes_ax.get_xticklabels()] == OPTIMIZERS
    assert loss_ax.get_yscale() == "log"
    [legend] = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == FOUR
    assert_nothing_hidden(figure)


def _rgb(colour):
    from matplotlib.colors import to_rgb

    return to_rgb(colour)


@pytest.mark.parametrize("precisions", [FOUR[:2], FOUR[:3]])
def test_the_picture_against_float32_with_fewer_precisions_and_optimizers(precisions):
    figure = cli.draw_against_baseline(synthetic_rows(["sgd", "adam"], precisions), TITLE)
    assert len(figure.axes) == 3
    assert_nothing_hidden(figure)


# ------------------------------------------------------------ the checks can fail


def test_the_overlap_check_catches_a_legend_inside_an_axes():
    figure = cli.draw_curves(synthetic_curves(["sgd", "adam"], FOUR), TITLE)
    assert legend_overlaps(figure) == []
    figure.axes[0].legend(loc="center")
    assert [what for _, what in legend_overlaps(figure)] == [figure.axes[0]]


def test_the_overlap_check_catches_a_legend_over_a_label():
    figure = cli.draw_curves(synthetic_curves(["sgd", "adam"], FOUR), TITLE)
    figure.legends[0].set_loc("outside lower center")
    figure.supxlabel("training step")
    assert any(what.get_text() == "training step" for _, what in legend_overlaps(figure) if hasattr(what, "get_text"))


def test_the_visibility_check_catches_a_line_under_a_legend():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure()
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    ax.set_xlim(0, 10), ax.set_ylim(0, 10)
    ax.plot([0, 10], [0, 10], label="diagonal, mostly in the open")
    short = ax.plot([1.0, 1.5], [8.0, 8.0], label="short line")[0]
    assert hidden_lines(figure) == []
    legend = ax.legend(loc="lower right", fontsize=16)
    assert hidden_lines(figure) == []  # the legend is beside the short line, not on it
    box = legend.get_window_extent(renderer_of(figure)).transformed(ax.transData.inverted())
    short.set_data([box.x0 + 0.1 * box.width, box.x1 - 0.1 * box.width], [box.y0 + 0.5 * box.height] * 2)
    assert hidden_lines(figure) == [short]


def test_the_pixel_check_catches_a_curve_drawn_over_its_twin():
    figure = cli.draw_curves(synthetic_curves(["adam"], FOUR[:2], same=True), TITLE)
    wide, narrow = figure.axes[0].get_lines()
    assert shows_along_the_panel(figure, figure.axes[0], wide)
    narrow.set_linewidth(wide.get_linewidth() + 1)  # the low-precision curve now covers float32's
    narrow.set_alpha(1.0)
    assert not shows_along_the_panel(figure, figure.axes[0], wide)


# ------------------------------------------------------------------------ the job's files


def png_size(path):
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


def test_bfloat16_run_writes_both_pictures_and_every_curve(tmp_path):
    flags = ["--steps", "30", "--batch-size", "64", "--optimizers", "sgd,adam", "--precision", "bfloat16"]
    stdout = io.StringIO()
    assert (
        cli.run(cli.parse_args([*flags, "--rounding", "nearest", "--out", str(tmp_path)]), stdout, io.StringIO()) == 0
    )
    out = stdout.getvalue()
    curves, against, record = tmp_path / cli.PNG_NAME, tmp_path / cli.AGAINST_FLOAT32_PNG_NAME, tmp_path / cli.JSON_NAME
    assert f"wrote {curves}, {against} and {record}" in out
    runs = json.loads(record.read_text())["runs"]
    assert [
        (run["optimizer"], run["precision"], run["dtype"], run["state_format"], run["rounding"]) for run in runs
    ] == [
        ("sgd", "float32", "float32", "float32", None),
        ("sgd", "bfloat16 nearest", "bfloat16", "bfloat16", "nearest"),
        ("adam", "float32", "float32", "float32", None),
        ("adam", "bfloat16 nearest", "bfloat16", "bfloat16", "nearest"),
    ]
    assert all(len(run["loss"]) == 30 and all(map(math.isfinite, run["loss"])) for run in runs)
    # The pictures are the layouts above, drawn from the curves and rows the file holds.
    drawn = [cli.Curve(run["optimizer"], run["precision"], run["loss"], run["loss"]) for run in runs]
    for path, figure in [
        (curves, cli.draw_curves(drawn, TITLE)),
        (against, cli.draw_against_baseline(runs, TITLE)),
    ]:
        assert png_size(path) == tuple(round(120 * inches) for inches in figure.get_size_inches())
    assert len(cli.draw_curves(drawn, TITLE).axes) == 2


def test_state_format_run_draws_every_format_and_leaves_sgd_without_one(tmp_path):
    """--state-format: sgd (no state) has one curve and no 8- or 4-bit bars; adam three curves;
    nothing hidden in either picture, drawn from the rows and curves the file holds."""
    flags = [
        "--steps",
        "30",
        "--batch-size",
        "64",
        "--optimizers",
        "sgd,adam",
        "--state-format",
        "blockwise8,blockwise4",
    ]
    assert cli.run(cli.parse_args([*flags, "--out", str(tmp_path)]), io.StringIO(), io.StringIO()) == 0
    runs = json.loads((tmp_path / cli.JSON_NAME).read_text())["runs"]
    labels = ["float32", "8-bit stochastic", "4-bit stochastic"]
    assert [(run["optimizer"], run["precision"]) for run in runs] == [("sgd", "float32")] + [
        ("adam", p) for p in labels
    ]
    drawn = [cli.Curve(run["optimizer"], run["precision"], run["loss"], run["loss"]) for run in runs]
    curves, against = cli.draw_curves(drawn, TITLE), cli.draw_against_baseline(runs, TITLE)
    assert [[line.get_label() for line in ax.get_lines()] for ax in curves.axes] == [["float32"], labels]
    accuracy_ax, _, bytes_ax = against.axes
    bars = {container.get_label(): [bar.get_height() for bar in container] for container in bytes_ax.containers}
    assert list(bars) == labels
    for label in labels[1:]:  # sgd: no bar; adam: its state's bytes with the params'
        assert math.isnan(bars[label][0]) and 4 < bars[label][1] < 7
    assert [len(container) for container in accuracy_ax.containers] == [2, 2]
    for figure in (curves, against):
        assert_nothing_hidden(figure)
    for path, figure in [(tmp_path / cli.PNG_NAME, curves), (tmp_path / cli.AGAINST_FLOAT32_PNG_NAME, against)]:
        assert png_size(path) == tuple(round(120 * inches) for inches in figure.get_size_inches())
