"""The framework layers are optional: `import jstep` loads no framework, and a layer module
imported without its framework says which extra to install.

Checked in a fresh interpreter, where a framework is made missing by putting None in
sys.modules (what Python does for a module that cannot be imported).
"""

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import importlib
    import sys

    import jstep

    optional = ("flax", "equinox", "jstep.nnx", "jstep.linen", "jstep.equinox")
    loaded = sorted(name for name in optional if name in sys.modules)
    print("loaded by import jstep:", loaded)

    sys.modules["flax"] = None
    sys.modules["equinox"] = None
    for module, extra in [("jstep.nnx", "flax"), ("jstep.linen", "flax"), ("jstep.equinox", "equinox")]:
        try:
            importlib.import_module(module)
            print(module, "imported without its framework")
        except ImportError as error:
            print(module, "->", error)
    """
)


def test_import_jstep_loads_no_framework_and_a_missing_one_names_its_extra():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "loaded by import jstep: []"
    assert lines[1:] == [
        'jstep.nnx -> jstep.nnx needs Flax, which is not installed. Install it with jstep\'s "flax" extra: '
        'pip install "jstep[flax]"',
        'jstep.linen -> jstep.linen needs Flax, which is not installed. Install it with jstep\'s "flax" extra: '
        'pip install "jstep[flax]"',
        "jstep.equinox -> jstep.equinox needs Equinox, which is not installed. Install it with jstep's "
        '"equinox" extra: pip install "jstep[equinox]"',
    ]
