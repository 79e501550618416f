"""The documentation builds with no warning, from the notebooks the tests executed, and shows it all.

The site is built once per module (``sphinx-build -W``: a broken reference, a docstring that
does not parse or a missing page fails the build). The notebooks are not executed again:
`notebook_runs` hands over the runs tests/test_notebooks.py checks (or makes them, once, if
this file runs first). The examples in the pages are doctests (see pyproject.toml).
"""

import html
import importlib
import os
import pathlib
import posixpath
import re
import subprocess
import sys
from typing import NamedTuple

import pytest

import jstep

nbformat = pytest.importorskip("nbformat")
inventory_file = pytest.importorskip("sphinx.util.inventory").InventoryFile
pytest.importorskip("myst_nb")

import notebook_runs  # noqa: E402  (executes each notebook once; tests/test_notebooks.py checks the same runs)

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = (REPO / "README.md").read_text()
FRAMEWORK_MODULES = ["jstep.nnx", "jstep.linen", "jstep.equinox", "jstep.optax"]  # modules with their own __all__
NOTEBOOKS = notebook_runs.names()


class Build(NamedTuple):
    finished: subprocess.CompletedProcess
    html: pathlib.Path
    failed_notebooks: dict[str, Exception]  # not shown: tests/test_notebooks.py reports them in full


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """sphinx-build -W --keep-going into a temporary folder, with the notebooks that ran."""
    root = tmp_path_factory.mktemp("docs")
    executed = root / "notebooks"
    executed.mkdir()
    failed = {}
    for name in NOTEBOOKS:
        try:
            nbformat.write(notebook_runs.page(name), executed / f"{name}.ipynb")
        except Exception as error:
            failed[name] = error
    env = {**os.environ, "JSTEP_DOCS_NOTEBOOKS": str(executed), "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    command += ["-d", str(root / "doctrees"), str(DOCS), str(root / "html")]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    return Build(finished, root / "html", failed)


@pytest.fixture(scope="module")
def site(build):
    """The HTML folder. With --keep-going it is complete even when the build reported warnings."""
    assert (build.html / "objects.inv").is_file(), f"sphinx-build did not finish:\n{build.finished.stderr}"
    return build.html


def test_build_has_no_warnings(build):
    assert build.finished.returncode == 0, f"sphinx-build -W failed:\n{build.finished.stdout}\n{build.finished.stderr}"


def documented_names(site) -> set[str]:
    with open(site / "objects.inv", "rb") as stream:
        inventory = inventory_file.load(stream, "", posixpath.join)
    return {name for domain, entries in inventory.items() if domain.startswith("py:") for name in entries}


def test_every_public_name_has_an_api_entry(site):
    documented = documented_names(site)
    public = {f"jstep.{name}" for name in jstep.__all__}
    for module_name in FRAMEWORK_MODULES:
        module = importlib.import_module(module_name)
        public |= {f"{module_name}.{name}" for name in module.__all__}
    missing = sorted(public - documented)
    assert not missing, f"public names without an entry in docs/api/: {missing}"


def test_every_notebook_is_a_page_with_its_plots(build, site):
    assert not build.failed_notebooks, f"notebooks that did not run: {sorted(build.failed_notebooks)}"
    for name in NOTEBOOKS:
        page = (site / "notebooks" / f"{name}.html").read_text()
        shown = len(re.findall(r'<img[^>]+src="\.\./_images/[^"]+\.png"', page))
        plots = sum(
            "image/png" in output.get("data", {})
            for cell in notebook_runs.page(name).cells
            if cell.cell_type == "code"
            for output in cell.outputs
        )
        assert plots > 0 and shown == plots, f"{name}: {plots} plots in the notebook, {shown} on its page"


def test_notes_pages_show_their_maths_as_maths(site):
    for page in sorted((site / "notes").glob("*.html")):
        text = page.read_text()
        assert 'class="math notranslate nohighlight"' in text, f"{page.name} has no maths"
        body = re.sub(r"<script.*?</script>", "", text, flags=re.S)
        assert "$" not in body, f"{page.name}: a $ was left unparsed"


def test_home_shows_the_readme_set_up_commands(site):
    readme_commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    home = html.unescape(re.sub(r"<[^>]+>", "", (site / "index.html").read_text()))
    assert len(readme_commands) == 2
    for command in readme_commands:
        assert command in home


def test_speed_page_shows_every_readme_table(site):
    start, end = "<!-- docs/speed.md: speed from here -->", "<!-- docs/speed.md: speed to here -->"
    speed = README[README.index(start) : README.index(end)]
    tables = len(re.findall(r"^\|(?:---\|)+$", speed, re.M))
    assert tables > 0
    assert (site / "speed.html").read_text().count("<table") == tables
