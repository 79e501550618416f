"""What the distribution declares holds: the MIT license text ships at the root and in the wheel
(``license-files``), and the test extra installs what the tests import instead of skipping."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_declared_mit_license_has_its_text_and_ships_in_the_wheel():
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 jstep contributors\n")
    assert "Permission is hereby granted, free of charge" in text and 'THE SOFTWARE IS PROVIDED "AS IS"' in text


def test_the_test_extra_installs_scikit_learn_for_the_digits_cross_check():
    assert any(requirement.startswith("scikit-learn") for requirement in PROJECT["optional-dependencies"]["test"])
