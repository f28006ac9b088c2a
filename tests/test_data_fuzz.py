"""Fuzzing the IDX and CSV readers: any input gives correct data or a DataError, quickly and
without allocating for sizes the bytes do not back."""
from __future__ import annotations

import gzip
import tracemalloc

import numpy as np
import pytest
from data_files import idx_bytes, pixel_csv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtrain.data import DataError
from dtrain.data.idx import IDX_DTYPES, parse_idx
from dtrain.data.pixel_csv import CsvLayout, parse_pixel_csv

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PEAK_LIMIT = 8 << 20  # bytes: far above what these small inputs need, far below any declared huge size

_rng = np.random.default_rng(0)
VALID_IDX = [
    idx_bytes(_rng.integers(0, 256, (3, 5, 4), dtype=np.uint8)),
    idx_bytes(_rng.integers(0, 10, 17, dtype=np.uint8)),
    idx_bytes(_rng.standard_normal((2, 3)).astype(np.float32)),
    idx_bytes(_rng.integers(-999, 999, (4, 2), dtype=np.int16)),
]


def _mutate(blob: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(blob)
    for op, position, value in ops:
        at = position % (len(data) + 1)
        if op == "truncate":
            del data[at:]
        elif op == "flip" and data:
            data[at % len(data)] ^= 1 << (value % 8)
        elif op == "set_byte" and data:
            data[at % len(data)] = value % 256
        elif op == "huge_dim" and len(data) >= 8:
            dim = 4 + 4 * (value % max(1, (min(len(data), 40) - 4) // 4))
            data[dim:dim + 4] = (0xFFFFFFFF - position % 3).to_bytes(4, "big")
        elif op == "insert":
            data[at:at] = bytes([value % 256]) * (1 + position % 5)
    return bytes(data)


MUTATIONS = st.lists(
    st.tuples(st.sampled_from(["truncate", "flip", "set_byte", "huge_dim", "insert"]),
              st.integers(0, 10_000), st.integers(0, 255)),
    min_size=1, max_size=3,
)


def _check_idx_outcome(blob: bytes) -> None:
    tracemalloc.start()
    try:
        array = parse_idx(blob, "fuzz.idx")
    except DataError as exc:
        assert "fuzz.idx" in str(exc)
    else:
        header = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
        assert header[2] in IDX_DTYPES and array.ndim == header[3]
        assert array.dtype.isnative and array.nbytes == len(header) - 4 - 4 * array.ndim
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < PEAK_LIMIT


@FUZZ
@given(st.binary(max_size=300))
def test_idx_random_bytes(blob):
    _check_idx_outcome(blob)
    _check_idx_outcome(gzip.compress(blob))


@FUZZ
@given(st.sampled_from(range(len(VALID_IDX))), st.booleans(), MUTATIONS)
def test_idx_mutated_files(which, compress_first, ops):
    blob = VALID_IDX[which]
    if compress_first:  # mutate the compressed stream
        _check_idx_outcome(_mutate(gzip.compress(blob), ops))
    else:  # mutate the IDX bytes, read raw and compressed
        mutated = _mutate(blob, ops)
        _check_idx_outcome(mutated)
        _check_idx_outcome(gzip.compress(mutated))


@pytest.mark.parametrize("dims", [(0xFFFFFFFF,), (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (60000, 28, 28)])
def test_idx_huge_declared_sizes_allocate_nothing(dims):
    header = bytes([0, 0, 0x0E, len(dims)]) + np.asarray(dims, ">u4").tobytes()
    for blob in (header + bytes(64), gzip.compress(header + bytes(64))):
        tracemalloc.start()
        try:
            with pytest.raises(DataError, match="truncated IDX data"):
                parse_idx(blob, "huge.idx")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < PEAK_LIMIT


KAGGLE_TRAIN = CsvLayout(label="first", header=("label", *(f"pixel{i}" for i in range(784))))
SAMPLE = CsvLayout(label="last", header=None)
_images = _rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
_labels = _rng.integers(0, 10, 3)
VALID_CSV = [
    (pixel_csv(_images, _labels, header=True).encode(), KAGGLE_TRAIN),
    (pixel_csv(_images, _labels, header=False, label_first=False).encode(), SAMPLE),
]


def _check_csv_outcome(blob: bytes, layout: CsvLayout) -> None:
    try:
        images, labels = parse_pixel_csv(blob, "fuzz.csv", layout)
    except DataError as exc:
        assert "fuzz.csv" in str(exc)
    else:
        assert images.dtype == np.uint8 and images.shape[1:] == (1, 28, 28) and len(images) >= 1
        assert labels.dtype == np.int64 and labels.shape == (len(images),)
        assert labels.min() >= 0 and labels.max() <= 9


@FUZZ
@given(st.binary(max_size=400), st.sampled_from([KAGGLE_TRAIN, SAMPLE]))
def test_csv_random_bytes(blob, layout):
    _check_csv_outcome(blob, layout)


CSV_CHARS = st.sampled_from(list("0123456789,\n\r -+.x") + ["256", "99999", "pixel", "\xff", ",,"])


@FUZZ
@given(st.sampled_from(range(len(VALID_CSV))), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 3), CSV_CHARS),
                                                       min_size=1, max_size=4))
def test_csv_mutated_files(which, edits):
    blob, layout = VALID_CSV[which]
    text = blob.decode()
    for position, delete, insert in edits:
        at = position % (len(text) + 1)
        text = text[:at] + insert + text[at + delete:]
    _check_csv_outcome(text.encode("latin-1"), layout)
    _check_csv_outcome(gzip.compress(text.encode("latin-1"))[: 10 + len(text) // 2], layout)
