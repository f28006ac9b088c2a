"""Kaggle digit-recognizer CSVs: both files, and errors that name the file, line and column."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
from data_files import pixel_csv

from dtrain.data import DataError, DatasetUnavailable, load_dataset


@pytest.fixture
def digits(rng):
    return rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), rng.integers(0, 10, 5)


def _write(directory, name, text):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)
    return directory / name


@pytest.mark.parametrize("subdir", ["kaggle_digits", ""])
def test_train_and_test_files_load(tmp_path, digits, subdir):
    images, labels = digits
    _write(tmp_path / subdir, "train.csv", pixel_csv(images, labels, header=True))
    _write(tmp_path / subdir, "test.csv", pixel_csv(images[:3], None, header=True))
    train = load_dataset("kaggle_digits", "train", str(tmp_path))
    np.testing.assert_array_equal(train.images[:, 0], images)
    np.testing.assert_array_equal(train.labels, labels)
    assert train.labels.dtype == np.int64 and train.images.dtype == np.uint8
    test = load_dataset("kaggle_digits", "test", str(tmp_path))
    assert test.labels is None
    np.testing.assert_array_equal(test.images[:, 0], images[:3])


def test_gzip_crlf_and_trailing_blank_lines_are_accepted(tmp_path, digits):
    images, labels = digits
    text = pixel_csv(images, labels, header=True).replace("\n", "\r\n") + "\r\n\n"
    (tmp_path / "train.csv.gz").write_bytes(gzip.compress(text.encode()))
    np.testing.assert_array_equal(load_dataset("kaggle_digits", "train", str(tmp_path)).labels, labels)


def test_missing_file_is_unavailable(tmp_path):
    with pytest.raises(DatasetUnavailable, match="test.csv not found.*digit-recognizer"):
        load_dataset("kaggle_digits", "test", str(tmp_path))


def _lines(images, labels):
    return pixel_csv(images, labels, header=True).splitlines()


def _set_field(line, column, value):
    fields = line.split(",")
    fields[column] = value
    return ",".join(fields)


CASES = {
    # name: (edit of the train.csv lines, expected message)
    "test-header": (lambda lines: [lines[0].removeprefix("label,")] + lines[1:],
                    r"line 1 should be the header 'label,pixel0,...,pixel783' \(785 columns\); got 784 columns"),
    "renamed-column": (lambda lines: [lines[0].replace("pixel7,", "pixel07,")] + lines[1:],
                       "line 1 .*column 9 is 'pixel07', expected 'pixel7'"),
    "short-line": (lambda lines: lines[:3] + [lines[3].rsplit(",", 1)[0]] + lines[4:], "line 4 has 784 columns, expected 785"),
    "long-line": (lambda lines: lines[:2] + [lines[2] + ",0"] + lines[3:], "line 3 has 786 columns, expected 785"),
    "all-short": (lambda lines: [lines[0]] + [line.rsplit(",", 1)[0] for line in lines[1:]], "line 2 has 784 columns"),
    "text": (lambda lines: lines[:4] + [_set_field(lines[4], 10, "abc")] + lines[5:],
             r"line 5, column 11 \(pixel9\): 'abc' is not an integer"),
    "float": (lambda lines: lines[:1] + [_set_field(lines[1], 0, "3.0")] + lines[2:],
              r"line 2, column 1 \(label\): '3.0' is not an integer"),
    "empty-field": (lambda lines: lines[:2] + [_set_field(lines[2], 5, "")] + lines[3:], "line 3, column 6 .* not an integer"),
    "pixel-256": (lambda lines: lines[:5] + [_set_field(lines[5], 784, "256")] + lines[6:],
                  r"line 6, column 785 \(pixel783\): value 256 is outside 0..255"),
    "huge": (lambda lines: lines[:5] + [_set_field(lines[5], 1, "99999999999999999999")] + lines[6:],
             r"line 6, column 2 \(pixel0\): value 99999999999999999999 is outside 0..255"),
    "negative": (lambda lines: lines[:2] + [_set_field(lines[2], 3, "-1")] + lines[3:], "line 3, column 4 .*value -1 is outside"),
    "label-10": (lambda lines: lines[:3] + [_set_field(lines[3], 0, "10")] + lines[4:],
                 r"line 4, column 1 \(label\): value 10 is outside 0..9"),
    "blank-line": (lambda lines: lines[:2] + [""] + lines[2:], "line 3 is empty"),
    "header-only": (lambda lines: lines[:1], "no data lines"),
    "empty-file": (lambda lines: [], "line 1 should be the header"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_train_file_names_file_line_and_column(tmp_path, digits, case):
    edit, message = CASES[case]
    path = _write(tmp_path, "train.csv", "\n".join(edit(_lines(*digits))) + "\n")
    with pytest.raises(DataError, match=message) as info:
        load_dataset("kaggle_digits", "train", str(tmp_path))
    assert str(path) in str(info.value)


def test_non_ascii_byte_is_located(tmp_path, digits):
    lines = _lines(*digits)
    (tmp_path / "train.csv").write_bytes("\n".join(lines[:2] + ["é" + lines[2]] + lines[3:]).encode())
    with pytest.raises(DataError, match="line 3 holds a non-ASCII byte 0xc3"):
        load_dataset("kaggle_digits", "train", str(tmp_path))


def test_labelled_file_as_test_csv_is_rejected(tmp_path, digits):
    _write(tmp_path, "test.csv", pixel_csv(*digits, header=True))
    with pytest.raises(DataError, match=r"test.csv: line 1 should be the header 'pixel0,pixel1,...,pixel783'"):
        load_dataset("kaggle_digits", "test", str(tmp_path))
