"""IDX files (the MNIST format), raw or gzip-compressed.

Layout: two zero bytes, a type code, the number of dimensions ``ndim``, then ``ndim``
big-endian uint32 sizes, then the elements in C order, big-endian. Every deviation is a
:class:`DataError` naming the file; the declared size is checked against the bytes really
present before the array is built.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dtrain.data.bytestream import ByteStream
from dtrain.data.errors import DataError

# IDX type code -> big-endian element dtype
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(blob: bytes, source: str) -> np.ndarray:
    """The array stored in IDX bytes ``blob`` (gzip detected by its magic bytes), native byte order.

    ``source`` names the file in error messages.
    """
    stream = ByteStream(blob, source)
    magic = stream.read(4)
    if len(magic) < 4:
        raise DataError(f"{source}: too short for an IDX file ({len(magic)} bytes, the header alone is 4+)")
    if magic[:2] != b"\x00\x00" or magic[2] not in IDX_DTYPES:
        raise DataError(
            f"{source}: not an IDX file: magic number 0x{magic.hex()} should be 0x0000TTNN with "
            f"type code TT in {{{', '.join(f'{c:02x}' for c in IDX_DTYPES)}}} and NN dimensions"
        )
    dtype, ndim = IDX_DTYPES[magic[2]], magic[3]
    if ndim == 0:
        raise DataError(f"{source}: IDX header declares 0 dimensions")
    dims_bytes = stream.read(4 * ndim)
    if len(dims_bytes) < 4 * ndim:
        raise DataError(f"{source}: truncated IDX header: {ndim} dimension sizes declared, file ends first")
    shape = tuple(int(d) for d in np.frombuffer(dims_bytes, dtype=">u4"))
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if expected > stream.max_remaining():
        raise DataError(
            f"{source}: truncated IDX data: header declares shape {shape} of {dtype.name} "
            f"({expected} bytes) but the file can hold at most {stream.max_remaining()} bytes"
        )
    payload = stream.read(expected)
    if len(payload) < expected:
        raise DataError(
            f"{source}: truncated IDX data: header declares shape {shape} of {dtype.name} "
            f"({expected} bytes) but only {len(payload)} bytes follow"
        )
    if stream.read(1):
        raise DataError(
            f"{source}: {expected} bytes of data for shape {shape} are followed by extra bytes; "
            "the file is corrupt or not the one its header describes"
        )
    return np.frombuffer(bytearray(payload), dtype=dtype).astype(dtype.newbyteorder("="), copy=False).reshape(shape)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array in IDX file ``path`` (raw or ``.gz``); a :class:`DataError` names the file otherwise."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc.strerror or exc})") from None
    return parse_idx(blob, str(path))
