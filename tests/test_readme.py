"""The README's quick start runs as written and trains the model it shows."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs_and_converges():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert float(namespace["value"]) < 1e-6


def section_code(heading):
    """The first python block under the README's `heading`."""
    section = README.read_text().split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)[0]


def test_quantized_state_example_trains_in_a_quarter_of_the_bytes(capsys):
    """The 8-bit example: the loss it prints (under 1e-9) and 2.12 bytes
    of state per parameter (w's m and v: 2 x (8192 codes + 32 scales x 4), b's: 2 x 128 x 4, a count)."""
    namespace: dict = {}
    exec(compile(section_code("## 8- and 4-bit optimizer state"), str(README), "exec"), namespace)
    assert float(namespace["loss"](namespace["params"], namespace["x"], namespace["y"])) < 1e-9
    assert namespace["state_bytes"] == 2 * (8192 + 32 * 4) + 2 * 128 * 4 + 4
    assert type(namespace["opt_state"].mu["w"]).__name__ == "QuantizedArray"
    printed = capsys.readouterr().out.split()
    assert printed[-1] == f"{(2 * (8192 + 32 * 4) + 2 * 128 * 4 + 4) / 8320}" and float(printed[-1]) < 2.13


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", README.read_text(), re.S)
    assert len(blocks) == 2, "the README has exactly two set-up commands"
    ci = (README.parent / ".ci" / "run").read_text()
    assert blocks[1].strip() in ci.splitlines()
