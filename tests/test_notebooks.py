"""Each notebook runs top to bottom in a clean kernel (their cells assert what they show)."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_running_averages", "02_momentum", "03_adaptive_and_adam", "04_batch_norm"]


def test_exactly_the_four_notebooks_without_outputs():
    assert sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb")) == NAMES
    for name in NAMES:
        notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


# Run before a notebook: every figure shown must have a title and labelled axes on every plot.
CHECK_PLOTS = """
import matplotlib.pyplot as _plt
_labelled_axes = []
_plain_show = _plt.show

def _show_checked(*args, **kwargs):
    for number in _plt.get_fignums():
        for ax in _plt.figure(number).axes:
            labels = (ax.get_title(), ax.get_xlabel(), ax.get_ylabel())
            assert all(labels), f"a plot lacks a title or an axis label: {labels}"
            _labelled_axes.append(labels)
    return _plain_show(*args, **kwargs)

_plt.show = _show_checked
"""
COUNT_PLOTS = "print('labelled axes:', len(_labelled_axes))"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, monkeypatch):
    repo = str(NOTEBOOKS.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    notebook.cells = [nbformat.v4.new_code_cell(CHECK_PLOTS), *notebook.cells, nbformat.v4.new_code_cell(COUNT_PLOTS)]
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError if any cell fails, an assertion included
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    count = int(notebook.cells[-1].outputs[0].text.split()[-1])
    assert images and count >= len(images)
