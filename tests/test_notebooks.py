"""Each notebook runs top to bottom in a clean kernel (their cells assert what they show)."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

import notebook_runs  # noqa: E402  (executes each notebook once; tests/test_docs.py reuses the runs)

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NAMES = [
    "01_running_averages",
    "02_momentum",
    "03_adaptive_and_adam",
    "04_batch_norm",
    "05_flax_and_equinox",
    "06_low_precision",
    "07_batch_renorm",
    "08_quantized_state",
]


def test_exactly_these_notebooks_without_outputs():
    assert sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb")) == NAMES
    for name in NAMES:
        notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name):
    notebook = notebook_runs.run(name)  # raises CellExecutionError if any cell fails, an assertion included
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    count = int(notebook.cells[-1].outputs[0].text.split()[-1])
    assert images and count >= len(images)
