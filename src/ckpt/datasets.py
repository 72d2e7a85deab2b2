"""Data sets for training and prediction: reading tables, labels and targets, the split, scaling.

Shared by ``ckpt train``, ``ckpt predict``, the MPI launcher and scripts. Bad data raises
:class:`DataError` (a ValueError) whose one-line message names the file, the row or line and
the column, for a front end to print as it is.

Reading (:func:`read_table`): CSV with or without a header (a first line none of whose fields is
a number), ``.npz`` holding X and y, ``.npy`` (a 2-D table, or features with ``labels=`` a 1-D
.npy of the same rows), and Parquet through pyarrow (``pip install 'ckpt-cpu[parquet]'``). The
target is a column chosen by name or 0-based index (negative from the end; default: the last
column), the features are the other columns or those chosen. Features must be numbers, and every
value finite.

Memory: a table is read straight into one array of the training dtype, sized up front from a
count of the file's lines, chunk by chunk (each chunk of text a few MiB); the split
(:func:`split_in_place`) reorders that array's rows in place so that the training rows come
first and each part is a view; the scaling (:class:`Standardizer`) is computed and applied in
blocks, in place. So loading, splitting and scaling together hold the one array (the training
rows and the held-out ones) and a few MiB besides; ``tests/test_datasets_memory.py`` measures it.
"""
from __future__ import annotations

import csv
import errno
import io as _io
import math
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

PARQUET_HINT = "pip install 'ckpt-cpu[parquet]'"
TASKS = ("classification", "regression")
# Auto task: integer-like targets with at most this share of the rows distinct, and at most
# this many distinct values, are class labels.
AUTO_MAX_CLASS_FRACTION = 0.02
AUTO_MAX_CLASSES = 1000
# Text read per parse of a CSV file, and the bytes of a block of rows (in float64) when
# checking, scaling and splitting: what these steps hold besides the data.
_CHUNK_BYTES = 1 << 19
_BLOCK_BYTES = 1 << 19


def _block_rows(array: np.ndarray) -> int:
    """Rows per block of ``array``: about _BLOCK_BYTES of them in float64, at least one."""
    row = 8 * (int(np.prod(array.shape[1:])) if array.ndim > 1 else 1)
    return max(1, _BLOCK_BYTES // max(row, 1))


class DataError(ValueError):
    """Data that cannot be used; the message names the source and the problem."""


def load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """The bundled UCI digits: X (1797, 64) uint8 in 0..16, y (1797,) uint8 in 0..9."""
    raw = (resources.files("ckpt") / "data" / "digits.npz").read_bytes()
    with np.load(_io.BytesIO(raw)) as data:
        return data["X"], data["y"]


# ------------------------------------------------------------------------------------ tables

@dataclass
class Table:
    """Features X (rows, features) in the requested dtype, the target column y (or None), the
    feature names and the target's name. ``named`` says whether the names came from the file
    (a CSV header, Parquet) or are column positions ("0", "1", ...)."""

    X: np.ndarray
    y: Optional[np.ndarray]
    feature_names: List[str]
    target_name: Optional[str]
    source: str
    named: bool = False
    columns: int = 0          # columns in the file, target included
    feature_columns: List[int] = field(default_factory=list)    # their positions in the file
    target_column: Optional[int] = None


def read_table(path: "os.PathLike[str] | str", *, target: Union[None, str, int] = None,
               features: Optional[Sequence[Union[str, int]]] = None,
               labels: "os.PathLike[str] | str | None" = None, dtype: Any = np.float64,
               require_target: bool = True) -> Table:
    """Read a data file into a :class:`Table` (see the module docstring for the formats).

    ``target``: the target column, by name or 0-based index; default the last column. With
    ``require_target=False`` a missing target column is allowed (prediction data): a named
    target present in the file is still dropped from the features. ``features``: the feature
    columns (names or indices), default every column but the target. ``labels``: for an .npy
    of features, the 1-D .npy of its targets. ``dtype``: the dtype of X (float32 or float64).
    """
    path = os.fspath(path)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    suffix = Path(path).suffix.lower()
    if labels is not None and suffix != ".npy":
        raise DataError(f"{path}: a separate labels file goes with an .npy of features only")
    if suffix == ".csv":
        return _read_csv(path, target, features, dtype, require_target)
    if suffix == ".npz":
        return _read_npz(path, target, features, dtype, require_target)
    if suffix == ".npy":
        return _read_npy(path, target, features, labels, dtype, require_target)
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path, target, features, dtype, require_target)
    raise DataError(f"{path}: expected a .csv, .npz, .npy or .parquet file")


def column_names(path: "os.PathLike[str] | str") -> Optional[List[str]]:
    """The column names of a data file that names them (Parquet; a CSV whose first line is a
    header, as :func:`read_table` decides), else None (arrays, headerless CSV)."""
    path = os.fspath(path)
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        pq = _import_parquet()
        try:
            return list(pq.read_schema(path).names)
        except Exception as exc:   # pyarrow raises its own errors for a bad file
            raise DataError(f"{path} is not a readable Parquet file ({exc})") from None
    if suffix != ".csv":
        return None
    with open(path, encoding="utf-8-sig") as f:
        for _, line in _numbered_lines(f, path):
            fields = _split_line(line)
            if any(_is_number(value) for value in fields):
                return None
            return [value.strip() for value in fields]
    return None


def _choose_columns(names: List[str], target: Union[None, str, int],
                    features: Optional[Sequence[Union[str, int]]], source: str,
                    require_target: bool) -> Tuple[Optional[int], List[int]]:
    """(target column or None, feature columns) among ``names``."""
    def find(key: Union[str, int], what: str) -> Optional[int]:
        if isinstance(key, str) and key in names:
            return names.index(key)
        try:
            index = int(key)
        except (TypeError, ValueError):
            index = None
        if index is not None and -len(names) <= index < len(names):
            return index % len(names)
        if what == "target" and not require_target:
            return None
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20
                                         else "")
        raise DataError(f"{source}: the {what} {key!r} is not a column (columns: {shown})")

    if not names:
        raise DataError(f"{source} has no columns")
    if target is None:
        target_col: Optional[int] = len(names) - 1 if require_target else None
    else:
        target_col = find(target, "target")
    if features is None:
        chosen = [i for i in range(len(names)) if i != target_col]
    else:
        chosen = [find(key, "feature") for key in features]   # type: ignore[misc]
        if target_col in chosen:
            raise DataError(f"{source}: column {names[target_col]!r} is both the target and a "
                            f"feature")
        if len(set(chosen)) != len(chosen):
            raise DataError(f"{source}: a feature column is chosen twice")
    if not chosen:
        raise DataError(f"{source} needs at least one feature column besides the target "
                        f"{names[target_col]!r}" if target_col is not None else
                        f"{source} has no feature columns")
    return target_col, chosen  # type: ignore[return-value]


def _check_finite_block(block: np.ndarray, first_row: int, names: List[str], source: str,
                        line_of: Optional[List[int]] = None) -> None:
    """DataError naming the first row and column of ``block`` holding NaN or infinity."""
    finite = np.isfinite(block)
    if finite.all():
        return
    row, col = (int(i[0]) for i in np.nonzero(~finite))
    where = f"row {first_row + row}"
    if line_of is not None:
        where += f" (line {line_of[row]})"
    raise DataError(f"{source}: {where}, column {names[col]!r} holds {block[row, col]}; "
                    f"every value must be a finite number")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _split_line(line: str) -> List[str]:
    return next(csv.reader([line]), [])


def _count_lines(path: str) -> int:
    """Lines in the file (a last line without a newline counts), read in binary chunks."""
    count = 0
    last = b"\n"
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK_BYTES)
            if not chunk:
                break
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def _read_csv(path: str, target: Union[None, str, int],
              features: Optional[Sequence[Union[str, int]]], dtype: np.dtype,
              require_target: bool) -> Table:
    capacity = _count_lines(path)
    # utf-8-sig drops a byte-order mark; universal newlines read \r\n files too.
    with open(path, encoding="utf-8-sig") as f:
        lines = _numbered_lines(f, path)
        first = next(lines, None)
        if first is None:
            raise DataError(f"{path} is empty")
        first_no, first_line = first
        fields = _split_line(first_line)
        named = not any(_is_number(value) for value in fields)
        if named:
            names = [value.strip() for value in fields]
            duplicate = next((n for n in names if names.count(n) > 1), None)
            if duplicate is not None:
                raise DataError(f"{path}: the header names column {duplicate!r} twice")
            pending: List[Tuple[int, str]] = []
            capacity -= 1
        else:
            names = [str(i) for i in range(len(fields))]
            pending = [first]
        target_col, feature_cols = _choose_columns(names, target, features, path,
                                                   require_target)
        reader = _CsvChunks(path, names, target_col, feature_cols)
        X = np.empty((max(capacity, 0), len(feature_cols)), dtype)
        y_parts: List[np.ndarray] = []
        rows = 0
        chunk: List[Tuple[int, str]] = pending
        size = sum(len(line) for _, line in pending)
        for numbered in lines:
            chunk.append(numbered)
            size += len(numbered[1])
            if size >= _CHUNK_BYTES:
                rows = reader.parse(chunk, X, rows, y_parts)
                chunk, size = [], 0
        if chunk:
            rows = reader.parse(chunk, X, rows, y_parts)
    if rows == 0:
        raise DataError(f"{path} holds no data rows" + (" (only a header)" if named else ""))
    if rows < len(X):
        X.resize((rows, X.shape[1]), refcheck=False)   # blank lines: shrink, in place
    y = np.concatenate(y_parts) if target_col is not None else None
    return Table(X, y, [names[i] for i in feature_cols],
                 names[target_col] if target_col is not None else None, path, named,
                 len(names), feature_cols, target_col)


def _numbered_lines(f, path: str):
    """(line number from 1, text) of every line that is not blank."""
    try:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line.rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start} of a "
                        f"chunk)") from None


class _CsvChunks:
    """Parses chunks of numbered CSV lines into rows of X (and target values)."""

    def __init__(self, path: str, names: List[str], target_col: Optional[int],
                 feature_cols: List[int]) -> None:
        self.path = path
        self.names = names
        self.target_col = target_col
        self.feature_cols = feature_cols
        self.feature_names = [names[i] for i in feature_cols]
        self.text_target: Optional[bool] = None    # decided by the first data row
        # The columns parsed: the features and the target (others are never read as numbers).
        self.used = sorted(set(feature_cols) | ({target_col} if target_col is not None
                                                  else set()))

    def _check_field_counts(self, chunk: List[Tuple[int, str]]) -> None:
        """DataError at the first line with more or fewer fields than the table has columns.

        Commas are counted first (fast); a line whose count is off is split as CSV, so that a
        quoted comma inside a field is not taken for a separator."""
        commas = len(self.names) - 1
        for number, line in chunk:
            if line.count(",") != commas:
                fields = len(_split_line(line))
                if fields != len(self.names):
                    raise DataError(f"{self.path}, line {number}: {fields} fields, but the "
                                    f"table has {len(self.names)} columns (a ragged row)")

    def parse(self, chunk: List[Tuple[int, str]], X: np.ndarray, rows: int,
              y_parts: List[np.ndarray]) -> int:
        if self.text_target is None and self.target_col is not None:
            fields = _split_line(chunk[0][1])
            self.text_target = (self.target_col < len(fields)
                                and not _is_number(fields[self.target_col]))
        self._check_field_counts(chunk)
        if self.text_target:
            table = self._parse_with_text_target(chunk, y_parts)
        else:
            try:
                table = np.loadtxt([line for _, line in chunk], delimiter=",", quotechar='"',
                                   dtype=np.float64, ndmin=2, comments=None,
                                   usecols=self.used)
            except ValueError as exc:
                raise self._diagnose(chunk, exc) from None
            if self.target_col is not None:
                y_parts.append(table[:, self.used.index(self.target_col)].copy())
            table = table[:, [self.used.index(i) for i in self.feature_cols]]
        line_of = [number for number, _ in chunk]
        _check_finite_block(table, rows, self.feature_names, self.path, line_of)
        if self.target_col is not None and not self.text_target:
            target = y_parts[-1]
            bad = np.flatnonzero(~np.isfinite(target))
            if len(bad):
                raise DataError(f"{self.path}: row {rows + bad[0]} (line {line_of[bad[0]]}), "
                                f"target {self.names[self.target_col]!r} holds "
                                f"{target[bad[0]]}; every value must be a finite number")
        if rows + len(table) > len(X):
            raise DataError(f"{self.path} changed while it was read")
        X[rows:rows + len(table)] = table
        return rows + len(table)

    def _parse_with_text_target(self, chunk: List[Tuple[int, str]],
                                y_parts: List[np.ndarray]) -> np.ndarray:
        records = list(csv.reader(line for _, line in chunk))
        try:
            table = np.array([[record[i] for i in self.feature_cols] for record in records],
                             dtype=np.float64)
        except ValueError as exc:
            raise self._diagnose(chunk, exc) from None
        y_parts.append(np.array([record[self.target_col].strip() for record in records],
                                dtype=str))
        return table.reshape(len(records), len(self.feature_cols))

    def _diagnose(self, chunk: List[Tuple[int, str]], exc: Optional[Exception]) -> DataError:
        """The first ragged line or non-number of the chunk, as a DataError."""
        for number, line in chunk:
            fields = _split_line(line)
            for i in self.feature_cols:
                if not _is_number(fields[i]):
                    value = fields[i].strip()
                    what = "is empty (missing values are not supported)" if not value else \
                        f"holds {value!r}, not a number"
                    return DataError(f"{self.path}, line {number}: feature column "
                                     f"{self.names[i]!r} {what}; features must be numeric")
            if self.target_col is not None and not self.text_target \
                    and not _is_number(fields[self.target_col]):
                return DataError(f"{self.path}, line {number}: the target "
                                 f"{self.names[self.target_col]!r} holds "
                                 f"{fields[self.target_col].strip()!r}, but its first value is "
                                 f"a number")
        return DataError(f"{self.path} is not a CSV table of numbers ({exc})")


def _numeric_array(values: np.ndarray, what: str, source: str) -> np.ndarray:
    if values.dtype.kind not in "biuf":
        raise DataError(f"{source}: {what} must hold real numbers, got dtype {values.dtype}")
    return values


def _fill(X: np.ndarray, values: np.ndarray, names: List[str], source: str) -> None:
    """Copy ``values`` into X block by block (cast to X's dtype), checking each is finite."""
    step = _block_rows(values)
    for start in range(0, len(values), step):
        block = np.asarray(values[start:start + step], dtype=np.float64)
        _check_finite_block(block, start, names, source)
        X[start:start + len(block)] = block


def _from_array(values: np.ndarray, y: Optional[np.ndarray], target: Union[None, str, int],
                features: Optional[Sequence[Union[str, int]]], dtype: np.dtype, source: str,
                require_target: bool, target_in_table: bool) -> Table:
    """A Table from a 2-D array (its columns named by position) and, apart, its targets."""
    if values.ndim != 2:
        raise DataError(f"{source}: the features must be a 2-D table, got shape {values.shape}")
    names = [str(i) for i in range(values.shape[1])]
    if target_in_table:
        target_col, feature_cols = _choose_columns(names, target, features, source,
                                                   require_target)
    else:
        target_col, feature_cols = _choose_columns(names, None, features, source, False)
    _numeric_array(values, "the features", source)
    if not target_in_table and y is not None:
        if y.ndim != 1:
            raise DataError(f"{source}: the targets must be 1-D (one per row), got shape "
                            f"{y.shape}")
        if len(y) != len(values):
            raise DataError(f"{source}: {len(values)} rows of features but {len(y)} targets")
    elif target_col is not None:
        y = np.asarray(values[:, target_col])
    X = np.empty((len(values), len(feature_cols)), dtype)
    chosen = values if feature_cols == list(range(values.shape[1])) else \
        values[:, feature_cols]
    _fill(X, chosen, [names[i] for i in feature_cols], source)
    if y is not None and y.dtype.kind in "biuf":
        y = y.astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(y))
        if len(bad):
            raise DataError(f"{source}: row {bad[0]}, the target holds {y[bad[0]]}; every "
                            f"value must be a finite number")
    elif y is not None and y.dtype.kind not in "US":
        raise DataError(f"{source}: the targets must be numbers or strings, got dtype {y.dtype}")
    return Table(X, y, [names[i] for i in feature_cols],
                 names[target_col] if target_col is not None else
                 ("y" if y is not None else None), source, False, len(names), feature_cols,
                 target_col)


def _read_npz(path: str, target: Union[None, str, int],
              features: Optional[Sequence[Union[str, int]]], dtype: np.dtype,
              require_target: bool) -> Table:
    if target is not None:
        raise DataError(f"{path}: an .npz keeps its targets in array y; a target column is "
                        f"chosen in tables (.csv, .npy, .parquet)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in ("X", "y") if key in data.files}
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc})") from None
    wanted = ("X", "y") if require_target else ("X",)
    missing = [key for key in wanted if key not in arrays]
    if missing:
        raise DataError(f"{path} has no array {missing[0]!r} (it needs X and y)")
    return _from_array(arrays["X"], arrays.get("y"), None, features, dtype, path,
                       require_target, target_in_table=False)


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npy file ({exc})") from None


def _read_npy(path: str, target: Union[None, str, int],
              features: Optional[Sequence[Union[str, int]]],
              labels: "os.PathLike[str] | str | None", dtype: np.dtype,
              require_target: bool) -> Table:
    values = _load_npy(path)
    if labels is None:
        return _from_array(values, None, target, features, dtype, path, require_target,
                           target_in_table=True)
    if target is not None:
        raise DataError(f"{path}: the targets come from {os.fspath(labels)}; no target column "
                        f"is chosen among the features")
    return _from_array(values, _load_npy(os.fspath(labels)), None, features, dtype,
                       f"{path} with {os.fspath(labels)}", require_target,
                       target_in_table=False)


def _import_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"reading Parquet needs pyarrow: {PARQUET_HINT} ({exc})") from None
    return pq


def _read_parquet(path: str, target: Union[None, str, int],
                  features: Optional[Sequence[Union[str, int]]], dtype: np.dtype,
                  require_target: bool) -> Table:
    pq = _import_parquet()
    import pyarrow as pa
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path} is not a readable Parquet file ({exc})") from None
    names = list(schema.names)
    target_col, feature_cols = _choose_columns(names, target, features, path, require_target)
    for i in feature_cols:
        kind = schema.field(i).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)
                or pa.types.is_boolean(kind)):
            raise DataError(f"{path}: feature column {names[i]!r} is of type {kind}; features "
                            f"must be numeric")
    used = feature_cols + ([target_col] if target_col is not None else [])
    try:
        table = pq.read_table(path, columns=[names[i] for i in used])
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path} is not a readable Parquet file ({exc})") from None
    X = np.empty((table.num_rows, len(feature_cols)), dtype)
    for j, i in enumerate(feature_cols):
        column = table.column(names[i])
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{path}: row {row}, column {names[i]!r} is missing a value; "
                            f"every value must be a finite number")
        values = column.to_numpy().astype(np.float64, copy=False)
        _check_finite_block(values[:, None], 0, [names[i]], path)
        X[:, j] = values
    y = None
    if target_col is not None:
        column = table.column(names[target_col])
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{path}: row {row}, the target {names[target_col]!r} is missing")
        y = column.to_numpy()
        if y.dtype.kind in "biuf":
            y = y.astype(np.float64)
            _check_finite_block(y[:, None], 0, [names[target_col]], path)
        else:
            y = y.astype(str)
    if table.num_rows == 0:
        raise DataError(f"{path} holds no data rows")
    return Table(X, y, [names[i] for i in feature_cols],
                 names[target_col] if target_col is not None else None, path, True,
                 len(names), feature_cols, target_col)


# ------------------------------------------------------------------------------------ targets

def choose_task(y: np.ndarray, task: str = "auto") -> Tuple[str, str]:
    """(task, why): "classification" or "regression" for targets ``y``.

    ``auto``: text labels are classes; numbers are classes when they are all integer-like and
    at most 2% of the rows (and at most 1,000) are distinct values, else regression targets.
    """
    if task not in TASKS + ("auto",):
        raise ValueError(f"task must be classification, regression or auto, got {task!r}")
    y = np.asarray(y)
    text = y.dtype.kind in "US"
    if task == "regression" and text:
        raise DataError(f"regression needs numeric targets, got text labels such as {y[0]!r}")
    if task != "auto":
        return task, f"{task} (as asked)"
    if text:
        return "classification", "classification (auto: the targets are text labels)"
    distinct = len(np.unique(y))
    integer_like = bool(np.all(y == np.round(y)))
    limit = min(AUTO_MAX_CLASSES, math.floor(AUTO_MAX_CLASS_FRACTION * len(y)))
    if integer_like and distinct <= limit:
        return "classification", (f"classification (auto: {distinct} distinct integer-like "
                                  f"targets in {len(y):,} rows, at most {limit})")
    reason = "not all integer-like" if not integer_like else \
        f"{distinct} distinct values in {len(y):,} rows, more than {limit}"
    return "regression", f"regression (auto: the targets are {reason})"


def encode_classes(y: np.ndarray, source: str) -> Tuple[np.ndarray, np.ndarray]:
    """(labels 0..C-1 as int64, the sorted class values) of class targets ``y``."""
    y = np.asarray(y)
    if y.dtype.kind == "f":
        if np.any(y != np.round(y)):
            raise DataError(f"{source}: class labels must be whole numbers or text; "
                            f"{y[np.flatnonzero(y != np.round(y))[0]]} is neither")
        huge = np.flatnonzero(np.abs(y) > 2**53)
        if len(huge):
            raise DataError(f"{source}: label {y[huge[0]]:g} in row {huge[0]} is too large for "
                            f"a class value (at most 2**53 in magnitude)")
        y = y.astype(np.int64)
    classes, labels = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"{source}: need at least 2 classes, got {len(classes)}")
    return labels.astype(np.int64), classes


# ------------------------------------------------------------------------------------ splits

def stratified_split(y: np.ndarray, fraction: float,
                     rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded (kept, held-out) row indices, each class split in the same proportion, both
    sorted; ``y`` holds class labels. Every class of at least 2 rows gives round(fraction *
    rows) rows to the held-out part."""
    held: List[np.ndarray] = []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_held = int(round(fraction * len(idx))) if len(idx) > 1 else 0
        held.append(idx[:n_held])
    return _complement(len(y), np.concatenate(held))


def random_split(n: int, fraction: float,
                 rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded (kept, held-out) row indices of n rows, round(fraction * n) held out, sorted."""
    return _complement(n, rng.permutation(n)[:int(round(fraction * n))])


def _complement(n: int, held: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(n, bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def split_in_place(X: np.ndarray, held: np.ndarray, *others: np.ndarray) -> int:
    """Move the rows ``held`` (sorted indices) of X to its end, in place; returns the number
    of kept rows m, so that X[:m] holds the kept rows and X[m:] the held ones (both views).

    The arrays in ``others`` (y, row numbers: anything with X's rows) are reordered alike.
    Each held row before m is swapped with a kept row from m on, both in increasing order,
    through a buffer of at most a block of rows: the memory is that of X alone.
    """
    n = len(X)
    m = n - len(held)
    front = held[held < m]                          # held rows that must leave the front
    mask = np.ones(n - m, bool)
    mask[held[held >= m] - m] = False
    back = np.flatnonzero(mask) + m                 # kept rows that must come forward
    step = _block_rows(X)
    for start in range(0, len(front), step):
        a, b = front[start:start + step], back[start:start + step]
        for array in (X,) + others:
            swap = array[a]
            array[a] = array[b]
            array[b] = swap
    return m


# ------------------------------------------------------------------------------------ scaling

@dataclass
class Standardizer:
    """Per-column (x - mean) / scale, with scale the standard deviation (1 where it is 0).

    :meth:`fit` reads the rows in blocks, in float64 (two passes: the mean, then the squared
    deviations), and :meth:`transform` writes in place, block by block, in the array's dtype:
    the same operations on the same values give the same bits in training and prediction.
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray) -> "Standardizer":
        X = np.asarray(X)
        if X.ndim == 1:
            return cls.fit(X[:, None])
        if len(X) == 0:
            raise DataError("cannot scale an empty set of rows")
        step = _block_rows(X)
        total = np.zeros(X.shape[1])
        for start in range(0, len(X), step):
            total += X[start:start + step].sum(axis=0, dtype=np.float64)
        mean = total / len(X)
        squares = np.zeros(X.shape[1])
        for start in range(0, len(X), step):
            deviation = X[start:start + step] - mean
            squares += np.einsum("ij,ij->j", deviation, deviation)
        std = np.sqrt(squares / len(X))
        return cls(mean, np.where(std > 0, std, 1.0))

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Scale X in place (returns X)."""
        if X.shape[-1] != len(self.mean):
            raise DataError(f"{X.shape[-1]} columns to scale, but the scaling has "
                            f"{len(self.mean)}")
        mean = self.mean.astype(X.dtype)
        scale = self.scale.astype(X.dtype)
        step = _block_rows(X)
        for start in range(0, len(X), step):
            block = X[start:start + step]
            block -= mean
            block /= scale
        return X

    def inverse(self, values: np.ndarray) -> np.ndarray:
        """values * scale + mean, in float64 (a new array)."""
        return np.asarray(values, dtype=np.float64) * self.scale + self.mean


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


# ------------------------------------------------------------------------------------ training

@dataclass
class TrainingData:
    """A data set ready to fit: the training and test rows (views of one array, scaled), their
    targets (class labels 0..C-1, or float64 values: the training ones standardised unless
    asked not to, the test ones in the original units), and what prediction needs again: the
    task, the class values, the scalings, the columns."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    X_val: Optional[np.ndarray]     # validation rows (None without a validation split), with
    y_val: Optional[np.ndarray]     # targets in the units trained on
    task: str
    task_reason: str
    classes: Optional[np.ndarray]
    scaler: Standardizer
    target_scaler: Optional[Standardizer]
    table: Table
    test_rows: np.ndarray        # the held-out rows' positions in the table as read


def digits_table(dtype: Any = np.float32) -> Table:
    """The bundled digits as a Table (pixels 0..16 in ``dtype``, 64 features "0".."63")."""
    X, y = load_digits()
    return Table(X.astype(dtype), y, [str(i) for i in range(X.shape[1])], None,
                 "UCI digits (bundled, 1,797 8x8 images)", False, X.shape[1],
                 list(range(X.shape[1])))


SKLEARN_HINT = "pip install 'ckpt-cpu[sklearn]'"
EXAMPLES = ("digits", "diabetes")


def diabetes_table(dtype: Any = np.float32) -> Table:
    """scikit-learn's bundled diabetes data (Efron et al., 2004), unscaled: 442 patients, 10
    named features, and the disease progression a year later as the regression target.
    Needs scikit-learn (a DataError naming the ckpt-cpu[sklearn] extra without it)."""
    try:
        from sklearn.datasets import load_diabetes
    except ImportError as exc:
        raise DataError(f"the diabetes example comes with scikit-learn: {SKLEARN_HINT} "
                        f"({exc})") from None
    bunch = load_diabetes(scaled=False)
    X = np.asarray(bunch.data, dtype=np.float64)
    names = [str(name) for name in bunch.feature_names]
    return Table(X.astype(dtype), np.asarray(bunch.target, dtype=np.float64), names,
                 "progression", "diabetes (scikit-learn's bundled copy, 442 patients)", True,
                 len(names) + 1, list(range(len(names))), len(names))


def example_table(name: str, dtype: Any = np.float32) -> Tuple[Table, Optional[Standardizer]]:
    """A bundled example as (table, its fixed scaling or None to standardise): "digits" (the
    pixels / 16) or "diabetes" (standardised; needs scikit-learn)."""
    if name == "digits":
        return digits_table(dtype), digits_scaler()
    if name == "diabetes":
        return diabetes_table(dtype), None
    raise ValueError(f"unknown example {name!r}; expected one of {', '.join(EXAMPLES)}")


def digits_scaler() -> Standardizer:
    """The digits' fixed scaling: pixels / 16, into [0, 1]."""
    return Standardizer(np.zeros(64), np.full(64, 16.0))


def prepare_training_data(table: Table, rng: np.random.Generator, *, test_fraction: float,
                          val_fraction: float = 0.0, task: str = "auto",
                          scaler: Optional[Standardizer] = None,
                          scale_target: bool = True) -> TrainingData:
    """Choose the task, prepare the targets, hold out rows for testing (and validation), and
    scale.

    ``test_fraction`` of the rows are held out for testing, then ``val_fraction`` of the rest
    for validation: stratified by class for classification, at random for regression. Class
    targets become labels 0..C-1; regression targets are float64, standardised with the
    training rows' mean and standard deviation when ``scale_target`` (the validation targets
    alike; the test targets stay in their units). The table's X is reordered and scaled in
    place (see :func:`split_in_place`): training rows first, then validation, then test, each
    a view. The features are standardised with the training rows' statistics, or with
    ``scaler`` when one is given (the digits' :func:`digits_scaler`).
    """
    if table.y is None:
        raise DataError(f"{table.source} holds no target column")
    task, reason = choose_task(table.y, task)
    classes: Optional[np.ndarray] = None
    if task == "classification":
        y, classes = encode_classes(table.y, table.source)
    else:
        y = np.array(table.y, dtype=np.float64)

    def hold_out(labels: np.ndarray, fraction: float) -> np.ndarray:
        if task == "classification":
            return stratified_split(labels, fraction, rng)[1]
        return random_split(len(labels), fraction, rng)[1]

    held = hold_out(y, test_fraction)
    if len(held) == 0:
        raise DataError(f"{table.source}: too few rows to hold out a test split")
    rows = np.arange(len(y))
    kept = split_in_place(table.X, held, y, rows)
    m = kept
    if val_fraction > 0:
        held = hold_out(y[:kept], val_fraction)
        if len(held) == 0 or len(held) == kept:
            raise DataError(f"{table.source}: too few rows to hold out a validation split "
                            f"({kept} rows besides the test rows)")
        m = split_in_place(table.X[:kept], held, y[:kept], rows[:kept])
    X = table.X
    if scaler is None:
        scaler = Standardizer.fit(X[:m])
    scaler.transform(X)
    y_train, y_val, target_scaler = y[:m], y[m:kept], None
    if task == "regression" and scale_target:
        target_scaler = Standardizer.fit(y_train)
        y_train = target_scaler.transform(y_train[:, None].copy())[:, 0]
        y_val = target_scaler.transform(y_val[:, None].copy())[:, 0]
    validation = kept > m
    return TrainingData(X[:m], y_train, X[kept:], y[kept:],
                        X[m:kept] if validation else None, y_val if validation else None,
                        task, reason, classes, scaler, target_scaler, table, rows[kept:])


# ------------------------------------------------------------------------------------ preprocessing

@dataclass
class Preprocessing:
    """What a model file keeps besides the network, so that it predicts on raw data alone: the
    task, the feature columns (by name, or by position when ``named`` is False) and their
    scaling, the target's name and position, its scaling (regression) or the class values
    (classification). ``columns`` is the width of the table trained on, target included."""

    task: str
    feature_names: List[str]
    named: bool
    scaler: Standardizer
    target_name: Optional[str] = None
    target_index: Optional[int] = None
    columns: int = 0
    feature_columns: List[int] = field(default_factory=list)
    classes: Optional[np.ndarray] = None
    target_scaler: Optional[Standardizer] = None

    @classmethod
    def from_training(cls, data: TrainingData) -> "Preprocessing":
        table = data.table
        return cls(data.task, list(table.feature_names), table.named, data.scaler,
                   table.target_name, table.target_column, table.columns,
                   list(table.feature_columns), data.classes, data.target_scaler)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def record(self) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
        """(JSON-able fields, float64 arrays) for a model file."""
        fields = {"task": self.task, "feature_names": list(self.feature_names),
                  "named": self.named, "target_name": self.target_name,
                  "target_index": self.target_index, "columns": self.columns,
                  "feature_columns": list(self.feature_columns),
                  "classes": None if self.classes is None else self.classes.tolist(),
                  "target_scaling": self.target_scaler is not None}
        arrays = {"feature_mean": self.scaler.mean, "feature_scale": self.scaler.scale}
        if self.target_scaler is not None:
            arrays.update(target_mean=self.target_scaler.mean,
                          target_scale=self.target_scaler.scale)
        return fields, {key: np.asarray(value, np.float64) for key, value in arrays.items()}

    @classmethod
    def from_record(cls, fields: Dict[str, Any], arrays: Dict[str, np.ndarray], inputs: int,
                    outputs: int) -> "Preprocessing":
        """Rebuild from :meth:`record`'s parts, checked against the network's widths;
        ValueError naming the first field that does not fit."""
        if not isinstance(fields, dict):
            raise ValueError("the preprocessing record is not a JSON object")
        task = fields.get("task")
        if task not in TASKS:
            raise ValueError(f"the preprocessing's task is {task!r}")
        names = fields.get("feature_names")
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)
                and len(names) == inputs):
            count = len(names) if isinstance(names, list) else names
            raise ValueError(f"the preprocessing names {count!r} features for a network of "
                             f"{inputs} inputs")
        scaler = _scaler_from(arrays, "feature", inputs)
        classes = fields.get("classes")
        target_scaler = None
        if task == "classification":
            if not isinstance(classes, list) or len(classes) != outputs or \
                    not all(isinstance(c, (int, float, str)) and not isinstance(c, bool)
                            for c in classes):
                raise ValueError(f"the preprocessing holds {classes!r} as the classes of a "
                                 f"network of {outputs} outputs")
            classes_array: Optional[np.ndarray] = np.array(classes)
        else:
            if outputs != 1:
                raise ValueError(f"a regression model has one output, this network {outputs}")
            classes_array = None
            if fields.get("target_scaling"):
                target_scaler = _scaler_from(arrays, "target", 1)
        index = fields.get("target_index")
        columns = fields.get("columns")
        if index is not None and not (isinstance(index, int) and not isinstance(index, bool)):
            raise ValueError(f"the preprocessing's target_index is {index!r}")
        if not isinstance(columns, int) or isinstance(columns, bool) or columns < 0:
            raise ValueError(f"the preprocessing's columns is {columns!r}")
        positions = fields.get("feature_columns")
        if not (isinstance(positions, list) and len(positions) == inputs
                and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < columns
                        for i in positions)):
            raise ValueError(f"the preprocessing's feature_columns is {positions!r}")
        target_name = fields.get("target_name")
        if target_name is not None and not isinstance(target_name, str):
            raise ValueError(f"the preprocessing's target_name is {target_name!r}")
        return cls(task, names, bool(fields.get("named")), scaler, target_name, index, columns,
                   positions, classes_array, target_scaler)


def _scaler_from(arrays: Dict[str, np.ndarray], what: str, width: int) -> Standardizer:
    mean, scale = arrays.get(f"{what}_mean"), arrays.get(f"{what}_scale")
    for key, value in ((f"{what}_mean", mean), (f"{what}_scale", scale)):
        if value is None or value.shape != (width,):
            raise ValueError(f"the {what} scaling {key} has shape "
                             f"{None if value is None else value.shape}, expected ({width},)")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"the {what} scaling {key} holds NaN or infinite values")
    if not np.all(scale > 0):
        raise ValueError(f"the {what} scaling divides by a scale that is not positive")
    return Standardizer(np.asarray(mean, np.float64), np.asarray(scale, np.float64))


def write_csv(path: "os.PathLike[str] | str", header: Sequence[str],
              rows: Sequence[Sequence[Any]]) -> None:
    """Write a CSV file with a header, atomically: a temporary file beside ``path`` renamed
    over it, so that a failure leaves no partial file. Floats are written exactly (repr)."""
    import tempfile
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
