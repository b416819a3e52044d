"""CIFAR data: the official CIFAR-10/100 archives (download, verify, parse), .npz copies, synthetic data,
and the device-resident loader that augments a batch at a time on the training device.

Every source yields a `CifarData` of uint8 NHWC images and int64 labels. Anything that goes wrong
with a file or the network is a `DataError` whose message names the file and says what to do.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import http.client
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch

from effcifar.errors import DataError

OFFICIAL_BASE_URL = "https://www.cs.toronto.edu/~kriz/"
DATASET_NAMES = ("cifar10", "cifar100", "synthetic", "synthetic100")


@dataclass(frozen=True)
class ArchiveSpec:
    """One official python-version archive: where it lives, how to check it, what it holds."""

    name: str
    filename: str
    md5: str
    folder: str
    num_classes: int
    train_size: int = 50000  # image counts that verify() expects
    test_size: int = 10000


ARCHIVES: dict[str, ArchiveSpec] = {
    "cifar10": ArchiveSpec("cifar10", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py", 10),
    "cifar100": ArchiveSpec("cifar100", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python", 100),
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (32, 32, 3)
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
# Files of each official folder, and those whose presence marks a directory as that folder.
_MEMBERS = {"cifar10": _CIFAR10_TRAIN + ("test_batch", "batches.meta"), "cifar100": ("train", "test", "meta")}
_MARKERS = {"cifar10": ("data_batch_1", "test_batch"), "cifar100": ("train", "test", "meta")}
# The only globals a CIFAR batch needs: numpy array reconstruction (module path of numpy 1 and of numpy 2),
# and _codecs.encode, which protocol-2 pickles written by Python 3 use for bytes.
_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})
_TAR_SUFFIXES = (".tar.gz", ".tgz")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip
_IO_CHUNK = 1 << 20  # bytes per read when hashing or downloading
_IMAGE_CHUNK = 4096  # images per step in mean_std and make_synthetic, to bound temporary memory
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)
_OFFLINE_HINT = (
    "Without network, point EFFCIFAR_DATA (or --data-dir) at a local copy: "
    "the official folder, its .tar.gz, or an .npz with x_train/y_train/x_test/y_test"
)


@dataclass
class CifarData:
    """A whole dataset in host memory: uint8 NHWC images, int64 labels, class names and where it came from."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    source: str
    coarse_train: np.ndarray | None = None
    coarse_test: np.ndarray | None = None
    coarse_classes: list[str] | None = None

    @property
    def num_classes(self) -> int:
        """Number of (fine) classes, as the classifier head needs it."""
        return len(self.classes)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and population std of x_train in 0..255 units, for input normalisation."""
        if len(self.x_train) == 0:
            raise DataError(f"{self.name}: no training images to compute mean/std from")
        total, total_sq = np.zeros(3, np.int64), np.zeros(3, np.int64)
        for start in range(0, len(self.x_train), _IMAGE_CHUNK):
            pixels = self.x_train[start : start + _IMAGE_CHUNK].reshape(-1, 3).astype(np.int64)
            total += pixels.sum(axis=0)  # integer sums are exact, so chunking changes nothing
            total_sq += (pixels * pixels).sum(axis=0)
        count = self.x_train.size // 3
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
        return mean.astype(np.float32), std.astype(np.float32)


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """Where datasets live: the argument, else $EFFCIFAR_DATA, else ~/.cache/effcifar (a directory or a file)."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("EFFCIFAR_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "effcifar"


def archive_url(name: str) -> str:
    """Download URL of an official archive; $EFFCIFAR_MIRROR replaces the official base URL."""
    base = os.environ.get("EFFCIFAR_MIRROR") or OFFICIAL_BASE_URL
    return base.rstrip("/") + "/" + _spec(name).filename


def download(
    name: str, data_dir: str | os.PathLike | None = None, *,
    timeout: float = 60.0, progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Fetch (unless an intact copy is there) and extract an official archive into data_root; return its path."""
    spec = _spec(name)
    root = data_root(data_dir)
    if root.is_file():
        raise DataError(f"cannot download {name} into {root}: it is a file; download needs a directory")
    created = [p for p in (root, *root.parents) if not p.exists()]  # removed again if the download fails
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data directory {root}: {e}") from e
    archive = root / spec.filename
    if not (archive.is_file() and _md5(archive) == spec.md5):
        try:
            _fetch(archive_url(name), archive, spec.md5, timeout, progress)
        except BaseException:  # a mistyped --data-dir leaves no empty folders behind
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only while empty
            raise
    if not (root / spec.folder).is_dir():
        _extract(archive, spec, root)
    return archive


def verify(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """Check the local copy (archive md5, parse, image counts) and summarise it in one line."""
    spec = _spec(name)
    root = data_root(data_dir)
    archive = root if root.is_file() else root / spec.filename
    checksum = "no archive to checksum"
    if archive.is_file() and archive.name.endswith(_TAR_SUFFIXES):
        _check_md5(archive, spec, remove=False)
        checksum = "md5 ok"
    target = archive if root.is_file() else _find_folder(root, spec) or archive
    if not target.exists():
        raise DataError(f"{name}: nothing to verify; looked for {_looked_for(root, spec)}")
    data = _load_path(target, spec)
    counts = (len(data.y_train), len(data.y_test))
    if counts != (spec.train_size, spec.test_size):
        expected = f"{spec.train_size} train / {spec.test_size} test images"
        raise DataError(f"{target}: expected {expected}, got {counts[0]} / {counts[1]}")
    summary = f"{counts[0]} train / {counts[1]} test images, {data.num_classes} classes"
    return f"{name}: {summary}, {checksum}, parses ({target})"


SYNTHETIC_CLASSES = {"synthetic": 10, "synthetic100": 100}


def dataset_classes(name: str) -> int:
    """The number of classes of a dataset, known without loading it (a classifier head's size)."""
    if name in SYNTHETIC_CLASSES:
        return SYNTHETIC_CLASSES[name]
    if name not in ARCHIVES:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    return ARCHIVES[name].num_classes


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, download_missing: bool = True) -> CifarData:
    """Load a dataset by name from whatever local copy data_root holds, downloading the archive if allowed."""
    if name in SYNTHETIC_CLASSES:
        return make_synthetic(SYNTHETIC_CLASSES[name])
    if name not in ARCHIVES:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    spec = ARCHIVES[name]
    root = data_root(data_dir)
    if root.is_file():
        return _load_path(root, spec)
    if not root.exists() and root.name.endswith(_TAR_SUFFIXES + (".npz",)):
        raise DataError(f"{name}: no such file {root}")
    folder = _find_folder(root, spec)
    if folder is not None:
        return _load_path(folder, spec)
    if (root / spec.filename).is_file():
        _check_md5(root / spec.filename, spec, remove=True)
        return _load_path(_extract(root / spec.filename, spec, root), spec)
    if (root / f"{name}.npz").is_file():
        return _load_path(root / f"{name}.npz", spec)
    if not download_missing:
        raise DataError(f"{name}: no local copy; looked for {_looked_for(root, spec)}. {_OFFLINE_HINT}")
    download(name, root)
    return _load_path(root / spec.folder, spec)


def make_synthetic(num_classes: int = 10, n_train: int = 10000, n_test: int = 2000, seed: int = 0) -> CifarData:
    """A deterministic, learnable stand-in for CIFAR: translated class colour patterns under distractors and noise."""
    if num_classes < 2 or n_train < 0 or n_test < 0:
        raise DataError(f"make_synthetic: need num_classes >= 2 and sizes >= 0, got {num_classes}, {n_train}, {n_test}")
    rng = np.random.default_rng(seed)
    shift = 4  # patterns are drawn on a larger canvas, then cropped at a random offset
    patterns = _upsample(rng.uniform(-1.0, 1.0, (num_classes, 3, 4, 4)), IMAGE_SHAPE[0] + 2 * shift)
    splits = []
    for n in (n_train, n_test):
        labels = rng.permutation(np.arange(n, dtype=np.int64) % num_classes)
        chunks = [_render(rng, patterns, labels[i : i + _IMAGE_CHUNK], shift) for i in range(0, n, _IMAGE_CHUNK)]
        splits += [np.concatenate(chunks) if chunks else np.zeros((0, *IMAGE_SHAPE), np.uint8), labels]
    name = "synthetic" if num_classes == 10 else f"synthetic{num_classes}"
    return CifarData(name, *splits, [f"class_{i}" for i in range(num_classes)], f"synthetic(seed={seed})")


def _upsample(grids: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly resize [N,C,k,k] grids to [N,C,size,size] float32 (smooth, low-frequency patterns)."""
    k = grids.shape[-1]
    # Column j is the interpolated "hat" of grid point j, so hats @ grid @ hats.T interpolates rows and columns.
    hats = np.stack([np.interp(np.linspace(0, k - 1, size), np.arange(k), e) for e in np.eye(k)], axis=1)
    hats = hats.astype(np.float32)
    return hats @ grids.astype(np.float32) @ hats.T


def _render(rng: np.random.Generator, patterns: np.ndarray, labels: np.ndarray, shift: int) -> np.ndarray:
    """NHWC uint8 images: the label's pattern shifted by up to ±shift, under a distractor pattern, colour cast and noise."""
    n, size = len(labels), IMAGE_SHAPE[0]
    dy, dx = rng.integers(0, 2 * shift + 1, (2, n))
    windows = np.lib.stride_tricks.sliding_window_view(patterns, (size, size), axis=(2, 3))
    # Amplitudes chosen so a small convnet reaches ~70% after one epoch and ~95% after four (nearest centroid ~75%).
    images = 45.0 * windows[labels, :, dy, dx]
    images += 50.0 * _upsample(rng.uniform(-1.0, 1.0, (n, 3, 4, 4)), size)
    images *= rng.uniform(0.6, 1.4, (n, 1, 1, 1)).astype(np.float32)
    images += 30.0 * rng.uniform(-1.0, 1.0, (n, 3, 1, 1)).astype(np.float32)
    images += 80.0 * rng.random(images.shape, dtype=np.float32) + 88.0  # uniform pixel noise around 128
    np.clip(np.rint(images, out=images), 0, 255, out=images)
    return np.ascontiguousarray(images.astype(np.uint8).transpose(0, 2, 3, 1))


def _spec(name: str) -> ArchiveSpec:
    """The archive spec of a downloadable dataset, or a DataError naming the choices."""
    if name not in ARCHIVES:
        raise DataError(f"no official archive for {name!r}; expected one of {', '.join(ARCHIVES)}")
    return ARCHIVES[name]


def _looked_for(root: Path, spec: ArchiveSpec) -> str:
    """The places load_dataset tries, in order, for error messages."""
    return f"{root} as the official folder, {root / spec.folder}, {root / spec.filename}, {root / (spec.name + '.npz')}"


def _find_folder(root: Path, spec: ArchiveSpec) -> Path | None:
    """root itself if it is the official extracted folder, else root/<folder> if present, else None."""
    if root.is_dir() and all((root / m).is_file() for m in _MARKERS[spec.name]):
        return root
    return root / spec.folder if (root / spec.folder).is_dir() else None


def _md5(path: Path) -> str:
    """Hex md5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_IO_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_md5(archive: Path, spec: ArchiveSpec, *, remove: bool) -> None:
    """Raise DataError unless the archive has the official md5; optionally delete a bad copy so a retry re-downloads."""
    got = _md5(archive)
    if got != spec.md5:
        if remove:
            archive.unlink()
        fate = "the file was removed; run again to download a fresh copy" if remove else "delete it and download again"
        raise DataError(f"{archive}: md5 mismatch: expected {spec.md5}, got {got}; {fate}")


def _fetch(url: str, dest: Path, md5: str, timeout: float, progress: Callable[[int, int | None], None] | None) -> None:
    """Stream url into dest via a temporary file beside it, checking length and md5; never leave a partial file."""
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, OSError, ValueError) as e:
        detail = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        reason = " ".join(str(detail).split())  # one line, whatever the OS put in the message
        raise DataError(f"cannot download {url} into {dest.parent}: {reason}. {_OFFLINE_HINT}") from e
    with response:
        length = response.headers.get("Content-Length", "")
        total = int(length) if length.isdigit() else None
        part = tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part", delete=False)
        try:
            try:
                with part:
                    received, got = _stream(response, part, total, progress)
            except OSError as e:
                raise DataError(f"download of {url} failed: {e}; nothing was kept") from e
            if total is not None and received < total:
                raise DataError(f"download of {url} truncated: got {received} of {total} bytes; nothing was kept")
            if got != md5:
                raise DataError(f"{url}: md5 mismatch: expected {md5}, got {got}; the file was removed")
            os.replace(part.name, dest)
        except BaseException:
            Path(part.name).unlink(missing_ok=True)
            raise


def _stream(
    response: http.client.HTTPResponse, out: BinaryIO, total: int | None, progress: Callable[[int, int | None], None] | None,
) -> tuple[int, str]:
    """Copy a response body into `out` chunk by chunk; return the bytes received and their md5."""
    digest, received = hashlib.md5(usedforsecurity=False), 0
    try:
        for block in iter(lambda: response.read(_IO_CHUNK), b""):
            out.write(block)
            digest.update(block)
            received += len(block)
            if progress is not None:
                progress(received, total)
    except http.client.IncompleteRead:
        pass  # a chunked body cut short; a plain one just ends early. Either way the caller checks length and md5
    return received, digest.hexdigest()


def _extract(archive: Path, spec: ArchiveSpec, root: Path) -> Path:
    """Safely extract the official folder into a temporary directory, then rename it into place."""
    target = root / spec.folder
    try:
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{spec.folder}.", suffix=".extract"))
    except OSError as e:
        raise DataError(f"cannot extract {archive} into {root}: {e}; point EFFCIFAR_DATA at the archive itself") from e
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = [m for m in tar.getmembers() if PurePosixPath(m.name).parts[:1] == (spec.folder,)]
            if not members:
                raise DataError(f"{archive}: no {spec.folder}/ inside; is this the {spec.name} archive?")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(staging, members, filter="data")
            else:  # Python releases before the extraction filters: refuse anything but plain files and folders
                for m in members:
                    if ".." in PurePosixPath(m.name).parts or not (m.isfile() or m.isdir()):
                        raise DataError(f"{archive}: refusing unsafe member {m.name!r}")
                tar.extractall(staging, members)
        try:
            os.replace(staging / spec.folder, target)
        except OSError:
            if not target.is_dir():  # otherwise another process extracting at the same time got there first
                raise
    except _ARCHIVE_ERRORS as e:
        raise DataError(f"{archive}: cannot extract: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals the official batches use, so a tampered file cannot run code."""

    def find_class(self, module: str, name: str) -> object:
        """Resolve the globals listed in _PICKLE_GLOBALS; refuse everything else."""
        if (module, name) not in _PICKLE_GLOBALS:
            raise DataError(f"refusing to unpickle global {module}.{name} (not part of a CIFAR batch)")
        return super().find_class(module, name)


def _unpickle(raw: bytes, what: str) -> dict:
    """Decode one official Python-2 pickle into its dict with bytes keys."""
    try:
        batch = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (DataError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise DataError(f"{what}: not a valid CIFAR pickle: {e}") from e
    except MemoryError as e:  # an array larger than any CIFAR batch, e.g. 1 TiB asked for in a few bytes
        raise DataError(f"{what}: not a valid CIFAR pickle: it asks for more memory than this machine has "
                        f"({e})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{what}: expected a pickled dict, got {type(batch).__name__}")
    return batch


def _field(batch: dict, key: bytes, what: str) -> object:
    """batch[key], or a DataError naming the missing key."""
    if key not in batch:
        raise DataError(f"{what}: missing key {key.decode()!r}")
    return batch[key]


def _batch_rows(batch: dict, what: str) -> np.ndarray:
    """The batch's images as validated uint8 rows of 3072 bytes (one CHW image per row)."""
    data = _field(batch, b"data", what)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        got = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{what}: data: expected uint8 [N,3072], got {got}")
    return data


def _nhwc(rows: np.ndarray) -> np.ndarray:
    """Official CHW rows -> C-contiguous NHWC images."""
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _batch_labels(batch: dict, key: bytes, count: int, num_classes: int, what: str) -> np.ndarray:
    """Labels under key as int64, checked against the image count and the class range."""
    labels = np.asarray(_field(batch, key, what))
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{what}: {key.decode()}: expected {count} integer labels, got {labels.dtype} {list(labels.shape)}")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{what}: {key.decode()}: labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def _text(name: object) -> str:
    """A class name as str, whether it was stored as bytes (Python 2, numpy 'S' arrays) or as text."""
    return name.decode() if isinstance(name, bytes) else str(name)


def _names(meta: dict, key: bytes, count: int, what: str) -> list[str]:
    """Class names from a meta pickle, decoded and checked to number `count`."""
    names = [_text(n) for n in _field(meta, key, what)]
    if len(names) != count:
        raise DataError(f"{what}: {key.decode()}: expected {count} names, got {len(names)}")
    return names


def _official_files(path: Path, spec: ArchiveSpec) -> dict[str, bytes]:
    """The bytes of the official member files, from an extracted folder or, in one pass, from the .tar.gz."""
    if path.is_dir():
        return {m: (path / m).read_bytes() for m in _MEMBERS[spec.name] if (path / m).is_file()}
    wanted = {f"{spec.folder}/{m}": m for m in _MEMBERS[spec.name]}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                key = wanted.get(member.name.removeprefix("./"))
                handle = tar.extractfile(member) if key and member.isfile() else None
                if handle is not None:
                    found[key] = handle.read()
    except _ARCHIVE_ERRORS as e:
        raise DataError(f"{path}: cannot read archive: {e}") from e
    return found


def _load_official(path: Path, spec: ArchiveSpec) -> CifarData:
    """Parse the official pickles of an extracted folder or an unextracted archive."""
    files = _official_files(path, spec)
    missing = [m for m in _MEMBERS[spec.name] if m not in files]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}; is this the {spec.name} data ({spec.folder})?")
    batches = {m: _unpickle(raw, f"{path}/{m}") for m, raw in files.items()}
    if spec.name == "cifar10":
        train, test, meta, label_key, names_key = _CIFAR10_TRAIN, "test_batch", "batches.meta", b"labels", b"label_names"
    else:
        train, test, meta, label_key, names_key = ("train",), "test", "meta", b"fine_labels", b"fine_label_names"
    rows = {m: _batch_rows(batches[m], f"{path}/{m}") for m in train + (test,)}
    labels = {m: _batch_labels(batches[m], label_key, len(rows[m]), spec.num_classes, f"{path}/{m}") for m in rows}
    data = CifarData(
        spec.name, _nhwc(np.concatenate([rows[m] for m in train])), np.concatenate([labels[m] for m in train]),
        _nhwc(rows[test]), labels[test],
        _names(batches[meta], names_key, spec.num_classes, f"{path}/{meta}"), str(path),
    )
    if spec.name == "cifar100":  # the 20 superclasses come along; training uses the fine labels
        data.coarse_train = _batch_labels(batches["train"], b"coarse_labels", len(data.y_train), 20, f"{path}/train")
        data.coarse_test = _batch_labels(batches["test"], b"coarse_labels", len(data.y_test), 20, f"{path}/test")
        data.coarse_classes = _names(batches["meta"], b"coarse_label_names", 20, f"{path}/meta")
    return data


def _load_path(path: Path, spec: ArchiveSpec) -> CifarData:
    """Load from an official folder, an official .tar.gz/.tgz or an .npz, by what the path is."""
    if path.is_dir() or path.name.endswith(_TAR_SUFFIXES):
        return _load_official(path, spec)
    if path.suffix == ".npz":
        return _load_npz(path, spec)
    raise DataError(f"{path}: expected a directory, an official .tar.gz/.tgz archive or an .npz file")


def _load_npz(path: Path, spec: ArchiveSpec) -> CifarData:
    """Load and validate an .npz with x_train/y_train/x_test/y_test (uint8 NHWC) and optional class_names."""
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise DataError(f"{path}: cannot read .npz: {e.strerror or e}") from None
    if magic not in _ZIP_MAGIC:
        raise DataError(f"{path}: not an .npz archive (expected a zip of .npy arrays, as numpy.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in keys:
                if key not in npz.files:
                    raise DataError(f"{path}: missing array {key!r} (expected {', '.join(keys)} and optional class_names)")
            arrays = {key: npz[key] for key in keys + ("class_names",) if key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: cannot read .npz: {e}") from e
    except MemoryError as e:  # a header that declares an array larger than memory
        raise DataError(f"{path}: cannot read .npz: it asks for more memory than this machine has ({e})") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.shape[1:] != IMAGE_SHAPE:
            raise DataError(f"{path}: x_{split}: expected uint8 [N,32,32,3] (NHWC), got {x.dtype} {list(x.shape)}")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: y_{split}: expected 1-D integer labels, got {y.dtype} {list(y.shape)}")
        if len(y) != len(x):
            raise DataError(f"{path}: y_{split} has {len(y)} labels for {len(x)} images in x_{split}")
        if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
            bounds = f"[0, {spec.num_classes}) for {spec.name}"
            raise DataError(f"{path}: y_{split}: labels must lie in {bounds}, got {y.min()}..{y.max()}")
    if "class_names" in arrays:
        classes = [_text(n) for n in arrays["class_names"].reshape(-1)]
        if len(classes) != spec.num_classes:
            raise DataError(f"{path}: class_names has {len(classes)} names but {spec.name} has {spec.num_classes} classes")
    else:
        classes = list(CIFAR10_CLASSES) if spec.name == "cifar10" else [f"class_{i}" for i in range(spec.num_classes)]
    return CifarData(
        spec.name, np.ascontiguousarray(arrays["x_train"]), arrays["y_train"].astype(np.int64),
        np.ascontiguousarray(arrays["x_test"]), arrays["y_test"].astype(np.int64), classes, str(path),
    )


# ---------------------------------------------------------------------------------------------
# Device-resident batches with batched augmentation


@dataclass(frozen=True)
class Augment:
    """Training augmentation, applied to a whole batch at once on the device (cifar10-fast's set)."""

    crop_pad: int = 4  # random crop of a reflect-padded image: translate by up to ±crop_pad pixels
    flip: bool = True  # horizontal flip with probability 1/2
    cutout: int = 8  # zero a random cutout x cutout square lying inside the image (0: off)


def reflect_index(positions: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel positions outside [0, size) mirrored back inside, as reflect padding does (the edge is not repeated)."""
    positions = positions.abs()
    return torch.where(positions >= size, 2 * (size - 1) - positions, positions)


def batch_windows(images: torch.Tensor, index: torch.Tensor, crop_pad: int, flip: bool,
                  generator: torch.Generator) -> torch.Tensor:
    """Images `index` of an NCHW store, each a random window of itself reflect-padded by `crop_pad` and mirrored with
    probability 1/2, gathered in one indexing step (no padded copy; NHWC memory, an NCHW view).

    The random draws are cifar10-fast's, in its order: the crop offsets, then the flips.
    """
    n, (height, width) = len(index), images.shape[-2:]
    device = images.device
    rows, cols = torch.arange(height, device=device).expand(n, -1), torch.arange(width, device=device).expand(n, -1)
    if crop_pad > 0:
        dy = torch.randint(0, 2 * crop_pad + 1, (n,), device=device, generator=generator)
        dx = torch.randint(0, 2 * crop_pad + 1, (n,), device=device, generator=generator)
        rows = reflect_index(rows + (dy[:, None] - crop_pad), height)
        cols = reflect_index(cols + (dx[:, None] - crop_pad), width)
    if flip:
        mirror = torch.rand(n, device=device, generator=generator) < 0.5
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    return images[index[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def batch_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def batch_cutout_(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero, in place, one random size x size square per image, placed fully inside it (as cifar10-fast)."""
    n, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    y0 = torch.randint(0, h - size + 1, (n, 1), device=images.device, generator=generator)
    x0 = torch.randint(0, w - size + 1, (n, 1), device=images.device, generator=generator)
    ys = torch.arange(h, device=images.device)
    xs = torch.arange(w, device=images.device)
    in_rows = (ys >= y0) & (ys < y0 + size)  # n, h
    in_cols = (xs >= x0) & (xs < x0 + size)  # n, w
    return images.masked_fill_((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0)


class DeviceLoader:
    """Batches from one split kept whole on the device as uint8, augmented a batch at a time.

    No worker processes and no per-image Python: indexing, cropping, flipping, Cutout and
    normalisation are a handful of batched tensor operations on the training device, driven
    by a seeded generator so that the data order and augmentation are reproducible. On the
    CPU the images are the caller's array itself (NHWC bytes seen as NCHW), not a copy.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, *, batch_size: int, mean: np.ndarray, std: np.ndarray,
        device: torch.device | str = "cpu", augment: Augment | None = None, shuffle: bool = False,
        drop_last: bool = False, seed: int = 0, channels_last: bool = True, dtype: torch.dtype = torch.float32,
    ):
        device = torch.device(device)
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2)
        self.augment = augment
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
        self.mean = torch.tensor(mean, dtype=dtype, device=device).view(1, -1, 1, 1)
        self.inv_std = (1 / torch.tensor(std, dtype=dtype, device=device)).view(1, -1, 1, 1)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.dtype = dtype
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def subset(self, count: int, seed: int, skip: int = 0) -> DeviceLoader:
        """A loader like this one over `count` of its images drawn at random (seeded), in their original order.

        A split can be class-sorted (the held-out split keeps the dataset's order), so never its first `count`.
        `skip` passes over the first images of the same seeded draw: `subset(n, s, skip=n)` is disjoint from
        `subset(n, s)` (a second sample, to measure how much a score owes to the images it was judged on).
        """
        if skip == 0 and count >= len(self.labels):
            return self
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(seed))
        keep = order[skip:skip + count].sort().values
        loader = copy.copy(self)
        keep = keep.to(self.labels.device)
        loader.images, loader.labels = self.images[keep], self.labels[keep]
        loader.generator = torch.Generator(device=self.labels.device)
        loader.generator.manual_seed(seed)
        return loader

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """The model's input for images `index`: augmented (if configured) and normalised."""
        aug = self.augment
        if aug is None:
            images = self.images[index]
        else:
            images = batch_windows(self.images, index, aug.crop_pad, aug.flip, self.generator)
            if aug.cutout > 0:
                batch_cutout_(images, aug.cutout, self.generator)
        # One conversion into the model's dtype and layout, normalised in place: no other temporaries.
        x = images.to(self.dtype, memory_format=self.memory_format, copy=True)
        return x.sub_(self.mean).mul_(self.inv_std)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, device=self.labels.device, generator=self.generator)
        else:
            order = torch.arange(n, device=self.labels.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            yield self.batch(index), self.labels[index]
