"""Reading a file's bytes whether or not it is gzip-compressed, in bounded pieces.

Readers ask for exactly the number of bytes a header declares, and decompression stops
there; :meth:`ByteStream.max_remaining` bounds what the data can still yield, so a header
declaring a huge array is rejected before anything is inflated or allocated for it. Every
gzip failure becomes a :class:`DataError` naming the file.
"""
from __future__ import annotations

import zlib

from dtrain.data.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib expects a gzip header and trailer (CRC, size)
# deflate expands at most ~1032x (a 258-byte match per 2 bits); the slack covers zlib's
# window of output produced but not yet handed out
_MAX_INFLATE_RATIO = 1032
_INFLATE_SLACK = 1 << 16


class ByteStream:
    """Sequential reader over ``blob``; gzip members (by magic bytes) are inflated on demand."""

    def __init__(self, blob: bytes, source: str) -> None:
        self.source = source
        self._gzip = blob[:2] == GZIP_MAGIC
        self._pending = memoryview(blob)  # raw bytes, or compressed input not yet inflated
        self._inflater = zlib.decompressobj(_GZIP_WBITS) if self._gzip else None

    def max_remaining(self) -> int:
        """An upper bound on the bytes :meth:`read` can still return (exact for raw data)."""
        if not self._gzip:
            return len(self._pending)
        if self._inflater is None:
            return 0
        return len(self._pending) * _MAX_INFLATE_RATIO + _INFLATE_SLACK

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the data."""
        if not self._gzip:
            out = bytes(self._pending[:n])
            self._pending = self._pending[len(out):]
            return out
        out = bytearray()
        while len(out) < n and self._inflater is not None:
            out += self._inflate(n - len(out))
        return bytes(out)

    def read_all(self) -> bytes:
        """Everything that is left."""
        out = bytearray()
        while True:
            piece = self.read(1 << 24)
            if not piece:
                return bytes(out)
            out += piece

    def _inflate(self, limit: int) -> bytes:
        """At most ``limit`` (> 0) inflated bytes; moves on to the next gzip member at a member's end."""
        try:
            piece = self._inflater.decompress(self._pending, limit)
        except zlib.error as exc:
            raise DataError(f"{self.source}: corrupt gzip data ({exc})") from None
        self._pending = memoryview(self._inflater.unconsumed_tail)
        if self._inflater.eof:
            rest = self._inflater.unused_data
            self._pending = memoryview(rest)
            self._inflater = zlib.decompressobj(_GZIP_WBITS) if rest else None
        elif not piece:  # input used up (or no progress) before the member's end
            raise DataError(f"{self.source}: gzip data is truncated (the compressed stream ends early)")
        return piece
