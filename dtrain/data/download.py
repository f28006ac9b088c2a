"""Fetching dataset files from mirrors into a cache directory, SHA-256 verified.

Downloads go through pooch: the bytes stream into a temporary file in the target directory
(with a tqdm progress bar), the file's SHA-256 is checked, and only a matching file is renamed
onto its final name, so the cache never holds a partial or unverified file. A cached file that
no longer matches its checksum is deleted before anything else happens.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

from dtrain.data.errors import DatasetUnavailable

log = logging.getLogger(__name__)

TIMEOUT_S = 30
CHUNK_BYTES = 1 << 16


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(filename: str, sha256: str, mirrors: Sequence[str], directory: Path, progress: bool = True) -> Path:
    """``directory / filename``, verified against ``sha256``; downloaded from the first mirror
    (a base URL) that serves a matching file when it is not cached yet. No mirrors: offline.

    Raises :class:`DatasetUnavailable` listing every URL tried and why it failed.
    """
    import pooch  # deferred: pooch pulls in requests, which is slow to import
    import requests

    target = Path(directory) / filename
    if target.exists():
        actual = sha256_of(target)
        if actual == sha256.lower():
            return target
        log.warning("deleting %s: its SHA-256 %s is not the expected %s", target, actual, sha256)
        target.unlink()
    if not mirrors:
        raise DatasetUnavailable(f"{target} is missing too and downloading is off (or no mirror is given)")
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + filename
        downloader = pooch.HTTPDownloader(progressbar=progress, timeout=TIMEOUT_S, chunk_size=CHUNK_BYTES)
        try:
            pooch.retrieve(url, known_hash=f"sha256:{sha256}", fname=filename, path=directory, downloader=downloader)
            return target
        except ValueError as exc:  # pooch's checksum mismatch; the download was already deleted
            failures.append(f"{url}: downloaded file failed its SHA-256 check ({exc})")
        except (requests.RequestException, OSError) as exc:
            failures.append(f"{url}: {exc}")
    tried = "\n  ".join(failures)
    raise DatasetUnavailable(
        f"could not download {filename} (expected SHA-256 {sha256}); tried:\n  {tried}\n"
        f"Check the network or the mirrors, or place a verified copy at {target}"
    )
