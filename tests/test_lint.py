"""The code is lint-clean, formatted and type-checked, with the configuration in pyproject.toml."""

import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PATHS = ["jstep", "tests", "benchmarks", "docs"]


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


def ruff() -> str:
    path = shutil.which("ruff", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("ruff")
    assert path, "ruff is not installed: pip install -e '.[lint]'"
    return path


def test_ruff_check():
    result = run(ruff(), "check", "--no-cache", *PATHS)
    assert result.returncode == 0, f"ruff check found problems:\n{result.stdout}{result.stderr}"


def test_ruff_format():
    result = run(ruff(), "format", "--check", "--no-cache", *PATHS)
    assert result.returncode == 0, f"ruff format would reformat (run `ruff format`):\n{result.stdout}{result.stderr}"


def test_mypy():
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, f"mypy found problems:\n{result.stdout}{result.stderr}"
