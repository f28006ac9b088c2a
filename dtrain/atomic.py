"""Write a file so that readers see either the old contents or the complete new ones.

The bytes go to a temporary file in the destination's directory (same file system, so
the final rename is atomic), are flushed and ``fsync``-ed, and only then is the file
renamed over the destination with ``os.replace``. If writing fails, or the process dies,
nothing exists under the final name that was not completely written; an exception also
removes the temporary file. A crash (kill -9, power loss) can leave a hidden
``.<name>.*.tmp`` file behind, which :func:`remove_stale_temp_files` cleans up.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file, then move it to ``path`` atomically.

    Creates the parent directory if needed. Returns ``path`` as a ``Path``. Any exception
    raised by ``write`` propagates after the temporary file has been removed; an existing
    file at ``path`` is then untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; a result file should be readable like any other
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)
    return path


def remove_stale_temp_files(directory: str | os.PathLike, name_prefix: str) -> list[Path]:
    """Delete temporary files that :func:`atomic_write` left in ``directory`` after a crash.

    Only files named ``.<name_prefix>*.tmp`` are removed. Call this only where no other
    process is writing into ``directory`` at the same time. Returns the removed paths.
    """
    removed = []
    for tmp in Path(directory).glob(f".{name_prefix}*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the data file is already synced
    finally:
        os.close(fd)
