"""The README's quick start runs as written and trains the model it shows."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs_and_converges():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert float(namespace["value"]) < 1e-6


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", README.read_text(), re.S)
    assert len(blocks) == 2, "the README has exactly two set-up commands"
    ci = (README.parent / ".ci" / "run").read_text()
    assert blocks[1].strip() in ci.splitlines()
