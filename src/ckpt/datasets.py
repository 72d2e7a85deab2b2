"""Data sets for training: the bundled digits, data files, labels and the stratified split.

Shared by ``ckpt train``, the MPI launcher and scripts: every function takes and returns plain
arrays, and bad data raises :class:`DataError` (a ValueError) whose message names the file and
the problem, for a front end to print as one line.
"""
from __future__ import annotations

import io as _io
import os
import zipfile
import zlib
from importlib import resources
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np


class DataError(ValueError):
    """Data that cannot be trained on; the message names the source and the problem."""


def load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """The bundled UCI digits: X (1797, 64) uint8 in 0..16, y (1797,) uint8 in 0..9."""
    raw = (resources.files("ckpt") / "data" / "digits.npz").read_bytes()
    with np.load(_io.BytesIO(raw)) as data:
        return data["X"], data["y"]


def load_data_file(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """X and y from an .npz (arrays X and y) or a .csv (the label in the last column)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in ("X", "y") if key in data.files}
        except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"{path} is not a readable .npz file ({exc})") from None
        missing = [key for key in ("X", "y") if key not in arrays]
        if missing:
            raise DataError(f"{path} has no array {missing[0]!r} (it needs X and y)")
        X, y = arrays["X"], arrays["y"]
    elif suffix == ".csv":
        X, y = _read_csv(path)
    else:
        raise DataError(f"{path}: expected a .npz or .csv file")
    return X, y


def _read_csv(path: str) -> Tuple[np.ndarray, np.ndarray]:
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    if lines and not _is_numeric_row(lines[0]):
        lines = lines[1:]          # a header
    if not lines:
        raise DataError(f"{path} holds no data rows")
    try:
        table = np.loadtxt(lines, delimiter=",", ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise DataError(f"{path} is not a numeric CSV table ({exc})") from None
    if table.shape[1] < 2:
        raise DataError(f"{path} needs at least one feature column and the label column")
    return table[:, :-1], table[:, -1]


def _is_numeric_row(line: str) -> bool:
    try:
        [float(field) for field in line.split(",")]
    except ValueError:
        return False
    return True


def prepare_labels(X: np.ndarray, y: np.ndarray,
                   source: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check X and y; returns X as float64, labels 0..C-1 and the original class values."""
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2 or X.shape[1] == 0:
        raise DataError(f"{source}: X must be a 2-D table of features, got shape {X.shape}")
    if y.ndim != 1:
        raise DataError(f"{source}: y must be 1-D (one label per row), got shape {y.shape}")
    if X.shape[0] != y.shape[0]:
        raise DataError(f"{source}: {X.shape[0]} rows of features but {y.shape[0]} labels")
    if not (np.issubdtype(X.dtype, np.number) and not np.issubdtype(X.dtype, np.complexfloating)):
        raise DataError(f"{source}: features must be real numbers, got {X.dtype}")
    X = X.astype(np.float64)
    if not np.all(np.isfinite(X)):
        raise DataError(f"{source}: the features contain NaN or infinite values")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise DataError(f"{source}: labels must be whole numbers (class indices)")
        huge = np.flatnonzero(np.abs(y) > 2**53)
        if len(huge):
            raise DataError(f"{source}: label {y[huge[0]]:g} in row {huge[0]} is too large for "
                             f"a class value (at most 2**53 in magnitude)")
        y = y.astype(np.int64)
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: labels must be integers, got {y.dtype}")
    classes, labels = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"{source}: need at least 2 classes, got {len(classes)}")
    return X, labels.astype(np.int64), classes


def stratified_split(y: np.ndarray, fraction: float,
                     rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded train/test indices with each class split in the same proportion."""
    test: List[np.ndarray] = []
    train: List[np.ndarray] = []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(fraction * len(idx))) if len(idx) > 1 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx, test_idx = np.concatenate(train), np.concatenate(test)
    if len(test_idx) == 0:
        raise DataError("too few rows to hold out a test split")
    return rng.permutation(train_idx), np.sort(test_idx)


# ------------------------------------------------------------------------------------ memory maps

def open_rows(path: "os.PathLike[str] | str") -> Dict[str, np.ndarray]:
    """Memory-map the arrays of an ``.npy`` (key "X") or an uncompressed ``.npz`` file, read-only.

    Nothing is read until it is indexed: a rank that trains on ``X[rows]`` reads only those
    rows from disk (the page cache keeps what is read, and the kernel may drop it again), so the
    data set may be larger than the memory of any one machine. Save the features in the model's
    dtype, or fit will convert (and so read) the whole array once.
    """
    path = os.fspath(path)
    if path.lower().endswith(".npy"):
        return {"X": np.load(path, mmap_mode="r", allow_pickle=False)}
    if not path.lower().endswith(".npz"):
        raise ValueError(f"{path}: expected an .npy or .npz file")
    arrays = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[:-4]
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: array {name!r} is compressed and cannot be "
                                 f"memory-mapped; save with np.savez, not np.savez_compressed")
            arrays[name] = _map_member(raw, info, path)
    return arrays


def _map_member(raw, info: zipfile.ZipInfo, path: str) -> np.ndarray:
    """A read-only memmap of one stored (uncompressed) .npy member of a zip archive."""
    raw.seek(info.header_offset)
    header = raw.read(30)
    if header[:4] != b"PK\x03\x04":
        raise ValueError(f"{path}: corrupt zip entry {info.filename!r}")
    name_length = int.from_bytes(header[26:28], "little")
    extra_length = int.from_bytes(header[28:30], "little")
    raw.seek(info.header_offset + 30 + name_length + extra_length)
    version = np.lib.format.read_magic(raw)
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"{path}: array {info.filename[:-4]!r} has .npy format {version}, "
                         f"expected 1.0 or 2.0")
    shape, fortran, dtype = readers[version](raw)
    if dtype.hasobject:
        raise ValueError(f"{path}: array {info.filename[:-4]!r} holds Python objects")
    return np.memmap(path, dtype=dtype, mode="r", offset=raw.tell(), shape=shape,
                     order="F" if fortran else "C")
