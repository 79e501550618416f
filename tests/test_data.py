"""The shipped digits: shapes, dtypes, labels, the fixed split and the checksum the loader checks."""

import gzip
import hashlib
import pathlib

import numpy as np
import pytest

from jstep.data import DIGITS_FILE, DIGITS_SHA256, load_digits

# Images per digit 0..9 in the UCI "optdigits" test set (its documentation lists these counts).
UCI_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_shapes_and_dtypes(digits):
    assert digits.train_images.shape == (1500, 8, 8)
    assert digits.train_labels.shape == (1500,)
    assert digits.test_images.shape == (297, 8, 8)
    assert digits.test_labels.shape == (297,)
    assert all(array.dtype == np.uint8 for array in digits)


def test_pixel_and_label_ranges(digits):
    for images in (digits.train_images, digits.test_images):
        assert images.min() == 0 and images.max() == 16
    for labels in (digits.train_labels, digits.test_labels):
        assert set(np.unique(labels)) == set(range(10))


def test_label_counts_are_the_uci_ones(digits):
    counts = np.bincount(digits.train_labels, minlength=10) + np.bincount(digits.test_labels, minlength=10)
    assert counts.tolist() == UCI_CLASS_COUNTS


def test_split_is_fixed_and_disjoint(digits):
    again = load_digits()
    for a, b in zip(digits, again, strict=False):
        np.testing.assert_array_equal(a, b)
    train = {image.tobytes() for image in digits.train_images}
    test = {image.tobytes() for image in digits.test_images}
    # A handful of images occur twice in the source data; almost all test images are unseen.
    assert len(test - train) >= 290


def test_shipped_file_has_the_recorded_checksum():
    assert hashlib.sha256(DIGITS_FILE.read_bytes()).hexdigest() == DIGITS_SHA256
    readme = DIGITS_FILE.with_name("README.md").read_text()
    assert DIGITS_SHA256 in readme and "CC BY 4.0" in readme


def test_loader_rejects_a_modified_file(tmp_path):
    damaged = tmp_path / "digits.npz"
    data = bytearray(DIGITS_FILE.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_digits(damaged)


def test_values_match_the_source_csv():
    """scikit-learn (in the test extra) ships the CSV the bundled file was made from."""
    import sklearn

    source = pathlib.Path(sklearn.__file__).parent / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(source) as csv:
        raw = np.loadtxt(csv, delimiter=",", dtype=np.int64)
    with np.load(DIGITS_FILE) as archive:
        np.testing.assert_array_equal(archive["images"].reshape(-1, 64), raw[:, :64])
        np.testing.assert_array_equal(archive["labels"], raw[:, 64])
