"""Each notebook executed once per test process, shared by the notebook tests and the docs build.

`run(name)` executes ``notebooks/NAME.ipynb`` in a clean kernel, with a first cell that checks
every figure shown for a title and axis labels and a last cell that counts the checked axes.
The outcome (the executed notebook, or the error) is kept, so that tests/test_notebooks.py and
tests/test_docs.py, whichever runs first, execute each notebook only once.
`page(name)` is that run without the two added cells: what the docs show.
"""

from __future__ import annotations

import os
import pathlib

import nbclient
import nbformat

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"

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

_outcomes: dict[str, nbformat.NotebookNode | Exception] = {}


def names() -> list[str]:
    """The notebooks in notebooks/, by file name without the suffix."""
    return sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb"))


def run(name: str) -> nbformat.NotebookNode:
    """The notebook executed with the plot checks around it; raises what its execution raised."""
    if name not in _outcomes:
        _outcomes[name] = _execute(name)
    outcome = _outcomes[name]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def page(name: str) -> nbformat.NotebookNode:
    """The executed notebook as the docs show it: its own cells with their outputs."""
    executed = run(name)
    shown = nbformat.from_dict(executed)
    shown.cells = shown.cells[1:-1]
    return shown


def _execute(name: str) -> nbformat.NotebookNode | Exception:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    notebook.cells = [nbformat.v4.new_code_cell(CHECK_PLOTS), *notebook.cells, nbformat.v4.new_code_cell(COUNT_PLOTS)]
    repo = str(NOTEBOOKS.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    try:
        client.execute(env=env)  # raises CellExecutionError if any cell fails, an assertion included
    except Exception as error:  # kept, so that a second caller sees the same failure without a rerun
        return error
    return notebook
