"""Tests for effcifar.data: tiny generated official-format archives, a local HTTP mirror, npz files, synthetic data."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import pickle
import shutil
import socket
import struct
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from effcifar import data
from effcifar.errors import DataError

KNOWN_PIXEL = (1, 2)  # (row, col) of the first training image, written with the RGB value below
KNOWN_RGB = (11, 22, 33)


def dump(path: Path, batch: dict) -> None:
    """Pickle a batch the way the official files are: a dict with bytes keys, protocol 2."""
    path.write_bytes(pickle.dumps(batch, protocol=2))


def write_official(parent: Path, name: str, per_batch: int = 3, seed: int = 0) -> dict:
    """Write a tiny official-format folder for `name` under parent; return what a loader should find."""
    rng = np.random.default_rng(seed)
    spec = data.ARCHIVES[name]
    folder = parent / spec.folder
    folder.mkdir(parents=True)
    train_members = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    test_member = "test_batch" if name == "cifar10" else "test"
    expected: dict = {"folder": folder, "y_train": [], "coarse_train": []}
    for member in train_members + [test_member]:
        n = per_batch if name == "cifar10" else 2 * per_batch
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        if member in ("data_batch_1", "train"):
            for channel, value in enumerate(KNOWN_RGB):  # CHW row layout: channel plane, then row, then column
                rows[0, channel * 1024 + KNOWN_PIXEL[0] * 32 + KNOWN_PIXEL[1]] = value
        fine = rng.integers(0, spec.num_classes, n).tolist()
        coarse = rng.integers(0, 20, n).tolist()
        batch = {b"batch_label": member.encode(), b"data": rows, b"filenames": [b"img.png"] * n}
        batch.update({b"labels": fine} if name == "cifar10" else {b"fine_labels": fine, b"coarse_labels": coarse})
        dump(folder / member, batch)
        if member == test_member:
            expected.update(y_test=fine, coarse_test=coarse, test_rows=rows)
        else:
            expected["y_train"] += fine
            expected["coarse_train"] += coarse
    if name == "cifar10":
        dump(folder / "batches.meta", {b"label_names": [c.encode() for c in data.CIFAR10_CLASSES], b"num_vis": 3072})
    else:
        meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)]}
        dump(folder / "meta", meta | {b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return expected


def make_archive(tmp_path: Path, name: str) -> tuple[Path, dict]:
    """A tiny official-format .tar.gz of `name` in tmp_path/published; returns its path and the expected content."""
    expected = write_official(tmp_path / "src", name)
    archive = tmp_path / "published" / data.ARCHIVES[name].filename
    archive.parent.mkdir(exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(expected["folder"], arcname=data.ARCHIVES[name].folder)
    return archive, expected


def check_loaded(loaded: data.CifarData, name: str, expected: dict) -> None:
    """Assert a loaded dataset matches what write_official wrote, including NHWC pixel order."""
    assert loaded.name == name
    assert loaded.x_train.dtype == np.uint8 and loaded.x_train.shape == (len(expected["y_train"]), 32, 32, 3)
    assert loaded.x_train.flags.c_contiguous and loaded.x_test.flags.c_contiguous
    assert tuple(loaded.x_train[0, KNOWN_PIXEL[0], KNOWN_PIXEL[1]]) == KNOWN_RGB
    assert loaded.y_train.dtype == np.int64 and loaded.y_train.tolist() == expected["y_train"]
    assert loaded.y_test.tolist() == expected["y_test"]
    test_rows = expected["test_rows"]
    assert loaded.x_test[-1, 31, 0, 2] == test_rows[-1, 2 * 1024 + 31 * 32 + 0]
    assert loaded.num_classes == data.ARCHIVES[name].num_classes


class Mirror:
    """A real HTTP server on 127.0.0.1 serving files from a dict, counting requests, optionally lying about length."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        self.extra_length = 0
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                """Serve mirror.files[path], announcing extra_length more bytes than the body has."""
                name = self.path.lstrip("/")
                mirror.hits[name] += 1
                if name not in mirror.files:
                    self.send_error(404)
                    return
                body = mirror.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + mirror.extra_length))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                """Keep the test output quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch):
    """A running Mirror that EFFCIFAR_MIRROR points at, shut down after the test."""
    server = Mirror()
    server.thread.start()
    monkeypatch.setenv("EFFCIFAR_MIRROR", server.url)
    yield server
    server.server.shutdown()
    server.server.server_close()
    server.thread.join()


def publish(mirror: Mirror, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, md5: str | None = None) -> dict:
    """Serve a generated archive for `name` and make ARCHIVES expect its md5 (or the md5 given)."""
    archive, expected = make_archive(tmp_path, name)
    body = archive.read_bytes()
    mirror.files[archive.name] = body
    spec = data.ARCHIVES[name]
    monkeypatch.setitem(data.ARCHIVES, name, dataclasses.replace(spec, md5=md5 or hashlib.md5(body).hexdigest()))
    return expected


def listing(path: Path) -> list[str]:
    """Names in a directory (hidden ones included), or [] if it does not exist."""
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


# ---- download, extract, parse ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_download_extract_and_parse(name, mirror, monkeypatch, tmp_path):
    expected = publish(mirror, monkeypatch, tmp_path, name)
    cache = tmp_path / "cache"
    loaded = data.load_dataset(name, cache)
    check_loaded(loaded, name, expected)
    spec = data.ARCHIVES[name]
    assert listing(cache) == sorted([spec.filename, spec.folder])  # no .part or staging folder left
    if name == "cifar100":
        assert loaded.coarse_train.tolist() == expected["coarse_train"]
        assert loaded.coarse_test.dtype == np.int64 and loaded.coarse_test.tolist() == expected["coarse_test"]
        assert loaded.coarse_classes[:2] == ["coarse0", "coarse1"] and loaded.classes[99] == "fine99"
    else:
        assert loaded.classes == list(data.CIFAR10_CLASSES) and loaded.coarse_train is None


def test_second_load_does_not_download_again(mirror, monkeypatch, tmp_path):
    publish(mirror, monkeypatch, tmp_path, "cifar10")
    cache = tmp_path / "cache"
    calls: list[tuple[int, int | None]] = []
    archive = data.download("cifar10", cache, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1] == (archive.stat().st_size, archive.stat().st_size)
    data.load_dataset("cifar10", cache)
    data.download("cifar10", cache)
    assert mirror.hits["cifar-10-python.tar.gz"] == 1
    # With the folder gone, the verified archive is extracted again, still without a request.
    shutil.rmtree(cache / "cifar-10-batches-py")
    assert len(data.load_dataset("cifar10", cache, download_missing=False).y_train) == 15
    assert mirror.hits["cifar-10-python.tar.gz"] == 1


def test_wrong_md5_removes_download(mirror, monkeypatch, tmp_path):
    publish(mirror, monkeypatch, tmp_path, "cifar10", md5="0" * 32)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"md5 mismatch: expected 0{32}, got [0-9a-f]{32}; the file was removed"):
        data.load_dataset("cifar10", cache)
    assert listing(cache) == []


def test_a_failed_download_leaves_no_folder_it_made(mirror, monkeypatch, tmp_path):
    """A mistyped --data-dir whose download fails: the folders made for it are gone again, those that were there kept."""
    publish(mirror, monkeypatch, tmp_path, "cifar10", md5="0" * 32)
    with pytest.raises(DataError, match="md5 mismatch"):
        data.download("cifar10", tmp_path / "typo" / "deep")
    assert not (tmp_path / "typo").exists()


def test_truncated_download_keeps_nothing(mirror, monkeypatch, tmp_path):
    publish(mirror, monkeypatch, tmp_path, "cifar10")
    mirror.extra_length = 1000
    size = len(mirror.files["cifar-10-python.tar.gz"])
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=rf"truncated: got {size} of {size + 1000} bytes; nothing was kept"):
        data.download("cifar10", cache, timeout=5)
    assert listing(cache) == []


def test_interrupted_download_keeps_nothing(mirror, monkeypatch, tmp_path):
    publish(mirror, monkeypatch, tmp_path, "cifar10")

    def interrupt(done: int, total: int | None) -> None:
        raise KeyboardInterrupt

    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        data.download("cifar10", cache, progress=interrupt)
    assert listing(cache) == []


def test_no_server_gives_one_line_hint(monkeypatch, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("EFFCIFAR_MIRROR", f"http://127.0.0.1:{port}")
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        data.load_dataset("cifar10", cache)
    message = str(info.value)
    assert "\n" not in message
    assert f"http://127.0.0.1:{port}/cifar-10-python.tar.gz" in message
    assert str(cache) in message and "EFFCIFAR_DATA" in message
    assert listing(cache) == []


def test_http_error_is_a_data_error(mirror, tmp_path):
    with pytest.raises(DataError, match="404"):
        data.download("cifar100", tmp_path / "cache")


def test_bad_archive_in_cache_is_removed(monkeypatch, tmp_path):
    archive, _ = make_archive(tmp_path, "cifar10")  # md5 differs from the official one
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / archive.name).write_bytes(archive.read_bytes())
    with pytest.raises(DataError, match="was removed"):
        data.load_dataset("cifar10", cache, download_missing=False)
    assert listing(cache) == []


@pytest.mark.parametrize("with_filters", [True, False], ids=["tarfile-filters", "older-python"])
def test_unsafe_archive_member_is_refused(with_filters, monkeypatch, tmp_path):
    if not with_filters:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    archive = tmp_path / "cache" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        link = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"  # a link out of the extraction directory
        tar.addfile(link)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(data.ARCHIVES, "cifar10", dataclasses.replace(data.ARCHIVES["cifar10"], md5=md5))
    with pytest.raises(DataError, match="cannot extract|unsafe"):
        data.load_dataset("cifar10", archive.parent, download_missing=False)
    assert listing(archive.parent) == [archive.name]  # no folder, no staging directory


# ---- local copies -----------------------------------------------------------------------------------


def test_load_archive_file_directly(tmp_path):
    archive, expected = make_archive(tmp_path, "cifar100")
    check_loaded(data.load_dataset("cifar100", archive, download_missing=False), "cifar100", expected)
    assert listing(archive.parent) == [archive.name]  # read in memory, nothing extracted


def test_load_extracted_folder_directly(tmp_path):
    expected = write_official(tmp_path, "cifar10")
    loaded = data.load_dataset("cifar10", expected["folder"], download_missing=False)
    check_loaded(loaded, "cifar10", expected)
    assert loaded.source == str(expected["folder"])


def test_wrong_folder_is_not_mistaken(tmp_path):
    folder = write_official(tmp_path, "cifar100")["folder"]
    with pytest.raises(DataError, match="no local copy; looked for"):
        data.load_dataset("cifar10", folder, download_missing=False)
    with pytest.raises(DataError, match="missing data_batch_1"):
        data.load_dataset("cifar10", make_archive(tmp_path, "cifar100")[0])


def py2_pickle(rows: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2 with numpy 1 pickled it: py2 str opcodes (BINSTRING) and numpy.core.multiarray."""

    def string(b: bytes) -> bytes:
        return b"T" + struct.pack("<I", len(b)) + b

    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b") + b"\x87R"
        + b"(K\x01M" + struct.pack("<H", rows.shape[0]) + b"M" + struct.pack("<H", rows.shape[1]) + b"\x86"
        + b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R(K\x03" + string(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + string(rows.tobytes()) + b"tb"
    )
    label_list = b"](" + b"".join(b"K" + bytes([label]) for label in labels) + b"e"
    return b"\x80\x02}(" + string(b"data") + array + string(b"labels") + label_list + b"u."


def test_python2_pickles_are_decoded(tmp_path):
    """The official files are Python-2 pickles naming numpy.core.multiarray: rewrite one batch that way."""
    expected = write_official(tmp_path, "cifar10")
    path = expected["folder"] / "data_batch_1"
    batch = pickle.loads(path.read_bytes())  # our own file, so plain pickle is fine here
    raw = py2_pickle(batch[b"data"], batch[b"labels"])
    assert b"numpy.core.multiarray" in raw and b"_codecs" not in raw
    path.write_bytes(raw)
    check_loaded(data.load_dataset("cifar10", expected["folder"]), "cifar10", expected)


class _Evil:
    """Unpickling this runs a shell command: what a tampered batch file could do to a plain pickle.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    folder = write_official(tmp_path, "cifar10")["folder"]
    marker = tmp_path / "pwned"
    dump(folder / "data_batch_2", {b"data": _Evil(marker), b"labels": []})
    with pytest.raises(DataError, match=r"data_batch_2: .*refusing to unpickle global (posix|os|nt)\.system"):
        data.load_dataset("cifar10", folder, download_missing=False)
    assert not marker.exists()


def test_missing_everything_lists_places(tmp_path):
    with pytest.raises(DataError) as info:
        data.load_dataset("cifar100", tmp_path / "empty", download_missing=False)
    for place in ("cifar-100-python", "cifar-100-python.tar.gz", "cifar100.npz", "EFFCIFAR_DATA"):
        assert place in str(info.value)
    with pytest.raises(DataError, match="no such file"):
        data.load_dataset("cifar10", tmp_path / "absent.npz")


def test_unknown_dataset_lists_names():
    with pytest.raises(DataError) as info:
        data.load_dataset("imagenet")
    assert all(name in str(info.value) for name in data.DATASET_NAMES)


# ---- npz ---------------------------------------------------------------------------------------------


def npz_arrays(num_classes: int = 10) -> dict[str, np.ndarray]:
    """A small valid set of npz arrays (labels stored as uint8, as the shared copy does)."""
    small = data.make_synthetic(num_classes, n_train=40, n_test=10, seed=3)
    return {
        "x_train": small.x_train, "y_train": small.y_train.astype(np.uint8),
        "x_test": small.x_test, "y_test": small.y_test,
    }


def test_npz_round_trip(tmp_path):
    arrays = npz_arrays()
    np.savez(tmp_path / "named.npz", **arrays, class_names=np.array([f"c{i}" for i in range(10)]))
    loaded = data.load_dataset("cifar10", tmp_path / "named.npz")
    assert np.array_equal(loaded.x_train, arrays["x_train"]) and np.array_equal(loaded.x_test, arrays["x_test"])
    assert loaded.y_train.dtype == np.int64 and np.array_equal(loaded.y_train, arrays["y_train"])
    assert loaded.classes == [f"c{i}" for i in range(10)]
    # Unnamed: official names for CIFAR-10, class_i for CIFAR-100; <root>/<name>.npz is found in a directory.
    np.savez(tmp_path / "cifar10.npz", **arrays)
    assert data.load_dataset("cifar10", tmp_path, download_missing=False).classes == list(data.CIFAR10_CLASSES)
    bytes_names = np.array([c.encode() for c in data.CIFAR10_CLASSES])  # an 'S' array, as some converters write
    np.savez(tmp_path / "bytes.npz", **arrays, class_names=bytes_names)
    assert data.load_dataset("cifar10", tmp_path / "bytes.npz").classes == list(data.CIFAR10_CLASSES)
    np.savez(tmp_path / "cifar100.npz", **npz_arrays(100))
    assert data.load_dataset("cifar100", tmp_path / "cifar100.npz").classes[-1] == "class_99"


# case -> (change to a valid set of arrays, dataset requested, what the error must say)
MALFORMED = {
    "missing key": (lambda a: a.pop("y_test"), "cifar10", r"missing array 'y_test'"),
    "wrong dtype": (
        lambda a: a.update(x_train=a["x_train"].astype(np.float32)), "cifar10", r"x_train: expected uint8 .* got float32",
    ),
    "wrong shape": (
        lambda a: a.update(x_test=a["x_test"].transpose(0, 3, 1, 2).copy()), "cifar10", r"x_test: .*got uint8 \[10, 3, 32, 32\]",
    ),
    "out of range": (lambda a: a.update(y_train=a["y_train"] + 5), "cifar10", r"y_train: labels must lie in \[0, 10\)"),
    "float labels": (
        lambda a: a.update(y_test=a["y_test"].astype(np.float32)), "cifar10", r"y_test: expected 1-D integer labels",
    ),
    "count mismatch": (lambda a: a.update(y_test=a["y_test"][:-1]), "cifar10", r"y_test has 9 labels for 10 images"),
    "cifar10 names for cifar100": (
        lambda a: a.update(class_names=np.array(data.CIFAR10_CLASSES)), "cifar100", r"class_names has 10 names but cifar100 has 100",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_npz_is_named(case, tmp_path):
    mutate, name, pattern = MALFORMED[case]
    arrays = npz_arrays()
    mutate(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=pattern) as info:
        data.load_dataset(name, path)
    assert str(path) in str(info.value)


def test_npz_with_pickled_object_is_refused(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, **npz_arrays(), class_names=np.array([object()] * 10, dtype=object))
    with pytest.raises(DataError, match="cannot read .npz"):
        data.load_dataset("cifar10", path)


@pytest.mark.slow
@pytest.mark.skipif(not str(os.environ.get("EFFCIFAR_DATA", "")).endswith(".npz")
                    or not Path(os.environ.get("EFFCIFAR_DATA", "")).is_file(), reason="EFFCIFAR_DATA is not an .npz")
def test_shared_cifar10_npz():
    loaded = data.load_dataset("cifar10")
    assert (len(loaded.y_train), len(loaded.y_test), loaded.num_classes) == (50000, 10000, 10)
    assert np.bincount(loaded.y_train).tolist() == [5000] * 10
    assert "parses" in data.verify("cifar10")


# ---- synthetic, statistics, paths ---------------------------------------------------------------------


def test_make_synthetic_is_deterministic_and_balanced():
    a = data.make_synthetic(10, n_train=600, n_test=100, seed=5)
    b = data.make_synthetic(10, n_train=600, n_test=100, seed=5)
    c = data.make_synthetic(10, n_train=600, n_test=100, seed=6)
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.x_train.shape == (600, 32, 32, 3) and a.x_test.shape == (100, 32, 32, 3)
    assert a.x_train.dtype == np.uint8 and a.y_train.dtype == np.int64 and a.x_train.flags.c_contiguous
    assert np.bincount(a.y_train).tolist() == [60] * 10
    assert a.source == "synthetic(seed=5)" and a.classes[3] == "class_3"
    big = data.load_dataset("synthetic100")
    assert (big.name, big.num_classes, len(big.y_train), len(big.y_test)) == ("synthetic100", 100, 10000, 2000)


def test_make_synthetic_is_learnable_but_not_by_one_pixel():
    d = data.make_synthetic(10, n_train=3000, n_test=500, seed=0)
    x = d.x_train.reshape(len(d.x_train), -1).astype(np.float32)
    xt = d.x_test.reshape(len(d.x_test), -1).astype(np.float32)
    centroids = np.stack([x[d.y_train == c].mean(0) for c in range(10)])
    nearest = ((xt[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == d.y_test).mean() > 0.5  # chance is 0.1
    centre = d.x_test[:, 16, 16].astype(np.float32)  # one pixel (all three channels) through the same classifier
    pixel_centroids = np.stack([d.x_train[d.y_train == c, 16, 16].astype(np.float32).mean(0) for c in range(10)])
    assert (((centre[:, None] - pixel_centroids[None]) ** 2).sum(-1).argmin(1) == d.y_test).mean() < 0.35


def test_mean_std_matches_numpy():
    d = data.make_synthetic(10, n_train=5000, n_test=10, seed=1)  # more images than one chunk
    mean, std = d.mean_std()
    flat = d.x_train.reshape(-1, 3).astype(np.float64)
    assert mean.dtype == np.float32 and mean.shape == (3,)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, flat.std(0), rtol=1e-5)


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EFFCIFAR_DATA", raising=False)
    assert data.data_root() == tmp_path / "home" / ".cache" / "effcifar"
    monkeypatch.setenv("EFFCIFAR_DATA", str(tmp_path / "env.npz"))
    assert data.data_root() == tmp_path / "env.npz"
    assert data.data_root(tmp_path / "arg") == tmp_path / "arg"


def test_archive_url(monkeypatch):
    monkeypatch.delenv("EFFCIFAR_MIRROR", raising=False)
    assert data.archive_url("cifar100") == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    monkeypatch.setenv("EFFCIFAR_MIRROR", "http://127.0.0.1:8000/mirror")
    assert data.archive_url("cifar10") == "http://127.0.0.1:8000/mirror/cifar-10-python.tar.gz"
    with pytest.raises(DataError, match="cifar10, cifar100"):
        data.archive_url("synthetic")


def test_verify_good_and_corrupted(mirror, monkeypatch, tmp_path):
    publish(mirror, monkeypatch, tmp_path, "cifar10")
    cache = tmp_path / "cache"
    data.download("cifar10", cache)
    with pytest.raises(DataError, match="expected 50000 train / 10000 test images, got 15 / 3"):
        data.verify("cifar10", cache)
    spec = dataclasses.replace(data.ARCHIVES["cifar10"], train_size=15, test_size=3)
    monkeypatch.setitem(data.ARCHIVES, "cifar10", spec)
    summary = data.verify("cifar10", cache)
    assert "15 train / 3 test images" in summary and "md5 ok" in summary and "\n" not in summary
    archive = cache / spec.filename
    raw = bytearray(archive.read_bytes())
    raw[100] ^= 0xFF
    archive.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="md5 mismatch"):
        data.verify("cifar10", cache)
    assert archive.exists()  # verify reports; it does not delete


# ---------------------------------------------------------------------------------------------
# Device loader and batched augmentation


def test_reflect_index_matches_numpy_reflect_padding():
    row = torch.arange(32)
    expected = np.pad(row.numpy(), 4, mode="reflect")
    assert torch.equal(data.reflect_index(torch.arange(-4, 36), 32), torch.from_numpy(expected))


def test_batch_windows_picks_windows_of_the_padded_image():
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    padded = torch.from_numpy(np.pad(images.numpy(), [(0, 0), (0, 0), (4, 4), (4, 4)], mode="reflect"))
    index = torch.randperm(64)
    crops = data.batch_windows(images, index, 4, False, torch.Generator().manual_seed(0))
    assert crops.shape == (64, 3, 32, 32)
    offsets = set()
    for image, crop in zip(padded[index], crops):
        matches = [(dy, dx) for dy in range(9) for dx in range(9)
                   if torch.equal(image[:, dy:dy + 32, dx:dx + 32], crop)]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 20  # offsets vary across the batch


def cifar10_fast_augment(images: np.ndarray, index: np.ndarray, aug: data.Augment, seed: int) -> np.ndarray:
    """The augmentation spelt out image by image (pad, crop, flip, Cutout), from the loader's draws in its order."""
    g = torch.Generator().manual_seed(seed)
    n, pad = len(index), aug.crop_pad
    batch = np.pad(images[index], [(0, 0), (pad, pad), (pad, pad), (0, 0)], mode="reflect")
    if pad:
        dy, dx = torch.randint(0, 2 * pad + 1, (n,), generator=g), torch.randint(0, 2 * pad + 1, (n,), generator=g)
        batch = np.stack([b[y:y + 32, x:x + 32] for b, y, x in zip(batch, dy.tolist(), dx.tolist())])
    if aug.flip:
        mirror = torch.rand(n, generator=g) < 0.5
        batch = np.stack([b[:, ::-1] if m else b for b, m in zip(batch, mirror.tolist())])
    if aug.cutout:
        y0 = torch.randint(0, 32 - aug.cutout + 1, (n, 1), generator=g)
        x0 = torch.randint(0, 32 - aug.cutout + 1, (n, 1), generator=g)
        for b, y, x in zip(batch, y0.flatten().tolist(), x0.flatten().tolist()):
            b[y:y + aug.cutout, x:x + aug.cutout] = 0
    return batch


@pytest.mark.parametrize("aug", [data.Augment(), data.Augment(crop_pad=0), data.Augment(flip=False, cutout=0),
                                 data.Augment(crop_pad=2, cutout=12)])
def test_loader_batches_are_the_augmentation_bit_for_bit(aug):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    mean, std = np.array([100.0, 110.0, 120.0]), np.array([50.0, 60.0, 70.0])
    loader = data.DeviceLoader(images, np.zeros(300), batch_size=128, mean=mean, std=std, augment=aug, seed=5)
    index = torch.from_numpy(rng.permutation(300)[:128])
    loader.generator.manual_seed(7)
    x = loader.batch(index)
    expected = torch.from_numpy(cifar10_fast_augment(images, index.numpy(), aug, 7)).permute(0, 3, 1, 2)
    assert x.is_contiguous(memory_format=torch.channels_last)
    normalised = (expected.float() - torch.tensor(mean).float().view(1, 3, 1, 1)) * (1 / torch.tensor(std).float()).view(1, 3, 1, 1)
    assert torch.equal(x, normalised)


def test_batch_flip_flips_about_half():
    images = torch.randint(0, 256, (400, 3, 8, 8), dtype=torch.uint8)
    out = data.batch_flip(images, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, i.flip(2)) for o, i in zip(out, images)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert bool((flipped | kept).all())
    assert 150 < int(flipped.sum()) < 250


def test_batch_cutout_zeroes_one_square_inside_the_image():
    images = torch.full((50, 3, 32, 32), 7, dtype=torch.uint8)
    out = data.batch_cutout_(images, 8, torch.Generator().manual_seed(0))
    assert out is images
    for o in out:
        zero = (o == 0).all(0)
        assert int(zero.sum()) == 64
        rows, cols = zero.nonzero(as_tuple=True)
        assert int(rows.max() - rows.min()) == 7 and int(cols.max() - cols.min()) == 7


def test_device_loader_batches_normalises_and_is_seeded():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 1000)
    mean, std = np.array([100.0, 110.0, 120.0]), np.array([50.0, 60.0, 70.0])

    def batches(seed, **kw):
        loader = data.DeviceLoader(images, labels, batch_size=256, mean=mean, std=std, seed=seed, **kw)
        return list(loader), len(loader)

    plain, n = batches(0)
    assert n == 4 and [len(y) for _, y in plain] == [256, 256, 256, 232]
    x0, y0 = plain[0]
    assert x0.is_contiguous(memory_format=torch.channels_last)
    expected = (torch.from_numpy(images[:256]).permute(0, 3, 1, 2).float() - torch.tensor(mean).float().view(1, 3, 1, 1)) \
        / torch.tensor(std).float().view(1, 3, 1, 1)
    torch.testing.assert_close(x0, expected)
    assert torch.equal(y0, torch.from_numpy(labels[:256]))

    aug = dict(augment=data.Augment(), shuffle=True, drop_last=True)
    a, n_a = batches(1, **aug)
    b, _ = batches(1, **aug)
    c, _ = batches(2, **aug)
    assert n_a == 3
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])
    # an epoch sees each image at most once, shuffled
    seen = torch.cat([y for _, y in a])
    assert len(seen) == 768 and not torch.equal(seen, torch.from_numpy(labels[:768]))


def test_subset_is_a_seeded_sample_and_skip_draws_a_disjoint_one():
    images = np.arange(100, dtype=np.uint8).repeat(32 * 32 * 3).reshape(100, 32, 32, 3)
    loader = data.DeviceLoader(images, np.arange(100), batch_size=10, mean=np.zeros(3), std=np.ones(3))
    first, again, second = loader.subset(30, 4), loader.subset(30, 4), loader.subset(30, 4, skip=30)
    assert torch.equal(first.labels, again.labels) and len(second.labels) == 30
    assert torch.equal(first.labels, first.labels.sort().values)  # in the split's own order
    assert not set(first.labels.tolist()) & set(second.labels.tolist())
    assert first.labels.tolist() != list(range(30))  # a random sample, not the first images
    assert torch.equal(first.images[:, 0, 0, 0].long(), first.labels)  # images and labels stay paired
    assert loader.subset(100, 4) is loader and len(loader.subset(100, 4, skip=90).labels) == 10
