"""Downloading IDX files from a local HTTP server: verification, atomic placement, mirror fallback."""
from __future__ import annotations

import functools
import hashlib
import http.server
import re
import socket
import threading

import numpy as np
import pytest
from data_files import mnist_gz_files, write_files

from dtrain.data import DatasetUnavailable, load_dataset
from dtrain.data.idx_datasets import FASHION_MNIST, MNIST


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve(tmp_path):
    """``serve(name)``: a base URL on 127.0.0.1 serving folder ``tmp_path/name`` (created empty)."""
    servers = []

    def start(name: str) -> str:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def files():
    return mnist_gz_files()


def _checksums(files):
    return {name: hashlib.sha256(data).hexdigest() for name, (data, _) in files.items()}


def _load(root, cache, mirrors, sha256, split="train", **kw):
    return load_dataset("mnist", split, str(root), cache_dir=None if cache is None else str(cache),
                        mirrors=mirrors, sha256=sha256, **kw)


def test_download_fills_the_cache_and_is_reused_offline(tmp_path, serve, files):
    url = serve("mirror")
    write_files(tmp_path / "mirror", {name: data for name, (data, _) in files.items()})
    cache = tmp_path / "cache"
    data = _load(tmp_path / "root", cache, [url], _checksums(files))
    np.testing.assert_array_equal(data.labels, files["train-labels-idx1-ubyte.gz"][1])
    np.testing.assert_array_equal(data.images[:, 0], files["train-images-idx3-ubyte.gz"][1])
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == [
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    for path in (tmp_path / "mirror").iterdir():
        path.unlink()
    again = _load(tmp_path / "root", cache, [url], _checksums(files), download=False)
    np.testing.assert_array_equal(again.images, data.images)


def test_default_cache_is_the_root(tmp_path, serve, files):
    url = serve("mirror")
    write_files(tmp_path / "mirror", {name: data for name, (data, _) in files.items()})
    _load(tmp_path / "root", None, [url], _checksums(files), split="test")
    assert sorted(p.name for p in (tmp_path / "root" / "mnist").iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def test_next_mirror_is_tried_after_a_404(tmp_path, serve, files):
    empty, good = serve("empty"), serve("good")
    write_files(tmp_path / "good", {name: data for name, (data, _) in files.items()})
    data = _load(tmp_path / "root", tmp_path / "cache", [empty, good], _checksums(files))
    assert len(data) == 10


def test_checksum_mismatch_leaves_no_file_and_says_why(tmp_path, serve, files):
    url = serve("mirror")
    corrupted = {name: data[:-1] + bytes([data[-1] ^ 1]) for name, (data, _) in files.items()}
    write_files(tmp_path / "mirror", corrupted)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetUnavailable, match="SHA-256") as info:
        _load(tmp_path / "root", cache, [url], _checksums(files))
    assert url + "train-images-idx3-ubyte.gz" in str(info.value)
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_all_mirrors_failing_lists_every_url(tmp_path, serve, files):
    first, second = serve("a"), serve("b")
    with pytest.raises(DatasetUnavailable) as info:
        _load(tmp_path / "root", tmp_path / "cache", [first, second], _checksums(files))
    message = str(info.value)
    assert f"{first}train-images-idx3-ubyte.gz" in message and f"{second}train-images-idx3-ubyte.gz" in message
    assert "404" in message and "place a verified copy" in message


def test_unreachable_mirror_is_unavailable(tmp_path, files):
    with socket.socket() as probe:  # a port nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/"
    with pytest.raises(DatasetUnavailable, match=re.escape(url)):
        _load(tmp_path / "root", tmp_path / "cache", [url], _checksums(files))


def test_cached_file_failing_its_checksum_is_replaced(tmp_path, serve, files):
    url = serve("mirror")
    write_files(tmp_path / "mirror", {name: data for name, (data, _) in files.items()})
    cache = tmp_path / "cache"
    write_files(cache / "mnist", {"train-images-idx3-ubyte.gz": b"stale bytes"})
    data = _load(tmp_path / "root", cache, [url], _checksums(files))
    np.testing.assert_array_equal(data.images[:, 0], files["train-images-idx3-ubyte.gz"][1])


def test_cached_file_failing_its_checksum_is_deleted_when_offline(tmp_path, files):
    cache = tmp_path / "cache"
    write_files(cache / "mnist", {"train-images-idx3-ubyte.gz": b"stale bytes"})
    with pytest.raises(DatasetUnavailable, match="downloading is off"):
        _load(tmp_path / "root", cache, None, _checksums(files), download=False)
    assert not (cache / "mnist" / "train-images-idx3-ubyte.gz").exists()


def test_unknown_checksum_override_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown files"):
        _load(tmp_path, None, None, {"train-images.gz": "0" * 64})


@pytest.mark.parametrize("source", [MNIST, FASHION_MNIST], ids=lambda s: s.name)
def test_builtin_sources_are_well_formed(source):
    assert set(source.sha256) == {f"{name}.gz" for pair in source.files.values() for name in pair}
    assert all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in source.sha256.values())
    assert len(set(source.sha256.values())) == 4
    assert all(m.endswith("/") and m.startswith("http") for m in source.mirrors)
