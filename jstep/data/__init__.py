"""Datasets that ship with jstep, so that the examples never download anything.

`load_digits()`: the 8x8 handwritten digits of UCI "Optical Recognition of Handwritten
Digits" (E. Alpaydin and C. Kaynak, 1998; CC BY 4.0), 1,797 images with pixels 0..16, split
once and for all into 1,500 training and 297 test images. See README.md beside this file.
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import NamedTuple

import numpy as np

DIGITS_FILE = pathlib.Path(__file__).with_name("digits.npz")
DIGITS_SHA256 = "3bb6496fc00529d1489e509c7b51e0e90b6704192ecee64dac22867faf0d01d5"


class Digits(NamedTuple):
    """A fixed train/test split: images are uint8 (n, 8, 8) with pixels 0..16, labels uint8 0..9."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def sha256_of(path: pathlib.Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_digits(path: str | pathlib.Path = DIGITS_FILE, *, sha256: str = DIGITS_SHA256) -> Digits:
    """The shipped digits, split into 1,500 training and 297 test images.

    The file's SHA-256 is checked first: a file that differs from the one jstep ships raises
    ValueError instead of training on something else. The test images are the ones listed in
    the file's ``test_indices`` (297 positions drawn once with ``numpy.random.default_rng(0)``
    and stored, so the split never depends on the NumPy version).
    """
    path = pathlib.Path(path)
    found = sha256_of(path)
    if found != sha256:
        raise ValueError(
            f"{path} has SHA-256 {found}, expected {sha256}: the file is damaged or not the one "
            "jstep ships; reinstall jstep to restore it"
        )
    with np.load(path) as archive:
        images, labels, test_indices = archive["images"], archive["labels"], archive["test_indices"]
    is_test = np.zeros(len(labels), bool)
    is_test[test_indices] = True
    return Digits(images[~is_test], labels[~is_test], images[is_test], labels[is_test])
