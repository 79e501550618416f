"""Sphinx configuration for jstep's documentation.

Build by hand: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (the notebooks are
executed once and cached in docs/_build/.jupyter_cache). tests/test_docs.py builds the same
pages from the notebooks the tests have just executed (``JSTEP_DOCS_NOTEBOOKS``), so CI runs
each notebook once.

Environment:
  JSTEP_DOCS_NOTEBOOKS: a folder of executed notebooks to show as they are (nothing executed).
  JSTEP_DOCS_MATHJAX: a MathJax 2 ``MathJax.js`` to load instead of MathJax 3 from its CDN, for
    machines without internet access (e.g. Debian's libjs-mathjax,
    /usr/share/javascript/mathjax/MathJax.js).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil

import jstep

DOCS = pathlib.Path(__file__).resolve().parent
NOTEBOOK_SOURCES = pathlib.Path(os.environ.get("JSTEP_DOCS_NOTEBOOKS") or DOCS.parent / "notebooks")

project = "jstep"
author = "the jstep authors"
copyright = "the jstep authors"
release = jstep.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

# Names in single backticks link to the API entry when there is one (as in Optax's and JAX's docs).
default_role = "py:obj"

# Docstrings: Google style ("Args:"), type hints shown from the signatures.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
typehints_use_signature = True
typehints_use_signature_return = True
always_use_bars_union = True
autosummary_generate = False

# MyST: $...$ and $$...$$ maths, amsmath environments, ::: fences, anchors for ## and ###.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
myst_dmath_double_inline = True  # $$...$$ inside a paragraph, as Jupyter reads it (the notebooks write it so)

# Notebooks: shown with the outputs the tests produced when JSTEP_DOCS_NOTEBOOKS is set,
# otherwise executed once and cached.
nb_execution_mode = "off" if os.environ.get("JSTEP_DOCS_NOTEBOOKS") else "cache"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_merge_streams = True

html_theme = "sphinx_book_theme"
html_title = f"jstep {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}

if os.environ.get("JSTEP_DOCS_MATHJAX"):
    mathjax_path = os.environ["JSTEP_DOCS_MATHJAX"] + "?config=TeX-AMS-MML_HTMLorMML"
    mathjax2_config = {
        "tex2jax": {"inlineMath": [["\\(", "\\)"]], "displayMath": [["\\[", "\\]"]], "processEscapes": True},
    }
    myst_update_mathjax = False  # its settings are MathJax 3's; MathJax 2 reads \( \) and \[ \] as they are


# jstep's docstrings write maths as plain text, readable in help(): |g| is an absolute value,
# which reStructuredText would read as a substitution reference. Escape it, outside ``code``
# and literal blocks.
ABSOLUTE_VALUE = re.compile(r"(?<![\w\\|`])\|(?=[^\s|])([^|`]*?[^\s\\|])\|(?![\w|`])")
INLINE_LITERAL = re.compile(r"(``.+?``)")


def escape_absolute_values(app, what, name, obj, options, lines: list[str]) -> None:
    """Turn |x| into \\|x\\| in a docstring's prose, in place."""
    literal_indent = None
    for number, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        if literal_indent is not None and (not line.strip() or indent > literal_indent):
            continue
        literal_indent = indent if line.rstrip().endswith("::") else None
        parts = INLINE_LITERAL.split(line)
        lines[number] = "".join(
            part if part.startswith("``") else ABSOLUTE_VALUE.sub(r"\\|\1\\|", part) for part in parts
        )


def copy_notebooks(app) -> None:
    """Put the notebooks where Sphinx reads them: docs/notebooks/ (generated, not committed)."""
    target = DOCS / "notebooks"
    target.mkdir(exist_ok=True)
    sources = {path.name: path for path in NOTEBOOK_SOURCES.glob("*.ipynb")}
    for stale in target.glob("*.ipynb"):
        if stale.name not in sources:
            stale.unlink()
    for name, source in sources.items():
        copy = target / name
        if not copy.exists() or copy.read_bytes() != source.read_bytes():
            shutil.copyfile(source, copy)


def setup(app) -> None:
    app.connect("builder-inited", copy_notebooks)
    app.connect("autodoc-process-docstring", escape_absolute_values, priority=100)  # before the type hints parse it
