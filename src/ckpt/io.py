"""Save and load a model's parameters (and an optimizer's state) as one ``.npz`` file.

Saving writes a temporary file in the destination's folder, then renames it over the
destination (``os.replace`` is atomic), so an interrupted save leaves the previous file intact.
Loading checks the whole file against the model (and optimizer) before copying anything, so a
mismatched file raises ValueError and changes nothing. Files hold plain arrays and one JSON
string: they load without pickle.

Format 2 adds, optionally, the preprocessing that ``ckpt train`` applied (feature and target
scaling, class values, task, column names: :class:`ckpt.datasets.Preprocessing`), so that the
file predicts on raw data by itself (:func:`ckpt.predictor.load_predictor`). Files of format 1
keep loading, without preprocessing; a file of a newer format is refused with a message saying
so.
"""
from __future__ import annotations

import errno
import glob
import io as _io
import json
import os
import tempfile
import zipfile
import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ckpt.datasets import Preprocessing
from ckpt.layers import layer_config, layer_from_config, walk
from ckpt.optim import Optimizer, collect_parameters

FORMAT_VERSION = 2
# The formats this version reads: 1 (no preprocessing) and 2.
READABLE_FORMATS = (1, 2)
_PREP = "preprocessing_"
_META = "ckpt_meta"
# The metadata is a short JSON string: refuse to read more than this from a (crafted) file.
_MAX_META_BYTES = 1 << 20
_TMP_TAG = ".ckpt-save-"


class ModelFileError(ValueError):
    """A model file that ``load`` cannot use; the message names the file and the problem.

    Raised for every malformed file (not an archive, truncated, corrupt, metadata that is not
    a JSON object, counts or shapes that do not fit, values that are NaN, infinite or overflow
    the model's dtype) and for a file that does not match the model or optimizer. A missing or
    unreadable file is an OSError as usual. A ValueError, so ``except ValueError`` catches it.
    """


def save(path: "os.PathLike[str] | str", model: Any, optimizer: Optional[Optimizer] = None,
         preprocessing: Optional[Preprocessing] = None) -> None:
    """Write every parameter of ``model`` (and ``optimizer``'s state, and the
    ``preprocessing`` of its inputs and outputs) to ``path``, atomically.

    ``path`` is used as given (no ``.npz`` is appended). The file is written as
    ``.<name>.ckpt-save-<pid>-<random>.tmp`` beside it, synced, renamed over ``path``, and the
    folder is synced, so a crash or power loss leaves the old file or the new one, whole.
    Temporary files that an interrupted save of a dead process left for this path are removed.
    An OSError names ``path``, not the temporary file.
    """
    params, _ = collect_parameters(model)
    arrays: Dict[str, np.ndarray] = {f"param_{i}": p for i, p in enumerate(params)}
    meta: Dict[str, Any] = {"format": FORMAT_VERSION, "params": len(params)}
    meta.update(_architecture(model))
    if optimizer is not None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a ckpt optimizer, got {type(optimizer).__name__}")
        state = optimizer.state_dict()
        meta["optimizer"] = {key: state[key] for key in ("type", "hyperparameters", "step")}
        meta["optimizer"]["buffers"] = {name: len(bufs) for name, bufs in state["buffers"].items()}
        for name, bufs in state["buffers"].items():
            for i, buf in enumerate(bufs):
                arrays[f"optimizer_{name}_{i}"] = buf
    if preprocessing is not None:
        if not isinstance(preprocessing, Preprocessing):
            raise TypeError(f"preprocessing must be a ckpt.datasets.Preprocessing, got "
                            f"{type(preprocessing).__name__}")
        widths = getattr(model, "widths", None)
        if isinstance(widths, tuple) and widths and widths[0] != preprocessing.n_features:
            raise ValueError(f"the preprocessing has {preprocessing.n_features} features, but "
                             f"the model {widths[0]} inputs")
        fields, prep_arrays = preprocessing.record()
        meta["preprocessing"] = fields
        arrays.update({_PREP + key: value for key, value in prep_arrays.items()})
    arrays[_META] = np.array(json.dumps(meta))
    write_npz(path, arrays)


def write_npz(path: "os.PathLike[str] | str", arrays: Dict[str, np.ndarray], *,
              halfway: Optional[Callable[[], None]] = None) -> None:
    """Write ``arrays`` as an .npz at ``path``, atomically (how :func:`save` writes).

    ``halfway``, when given, is called once half of the file's bytes are written to the
    temporary file (and synced): a test seam for a crash in the middle of a write.
    """
    path = os.fspath(path)
    with _naming(path):
        _check_destination(path)
        _remove_stale_temporaries(path)
        fd, tmp = _temporary(path)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o644)   # mkstemp's 0600 would make the saved model private
                if halfway is None:
                    np.savez(f, **arrays)
                else:
                    buffer = _io.BytesIO()
                    np.savez(buffer, **arrays)
                    data = buffer.getbuffer()
                    f.write(data[:len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    halfway()
                    f.write(data[len(data) // 2:])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _sync_folder(path)


def check_save_path(path: "os.PathLike[str] | str") -> None:
    """Raise OSError (naming ``path``) unless ``save(path, ...)`` can write there; writes nothing.

    For front ends that train first and save last: the check creates and removes one
    temporary file in the destination folder, exactly as ``save`` would.
    """
    path = os.fspath(path)
    with _naming(path):
        _check_destination(path)
        fd, tmp = _temporary(path)
        os.close(fd)
        os.unlink(tmp)


class _naming:
    """Re-raise an OSError about a temporary file as one about the requested path."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        if isinstance(exc, OSError) and exc.filename != self.path:
            if exc.errno is not None:
                raise OSError(exc.errno, exc.strerror, self.path) from exc
            raise OSError(f"cannot save {self.path}: {exc}") from exc
        return False


def _check_destination(path: str) -> None:
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)


def _temporary(path: str) -> Tuple[int, str]:
    folder, base = os.path.split(os.path.abspath(path))
    return tempfile.mkstemp(dir=folder, prefix=f".{base}{_TMP_TAG}{os.getpid()}-", suffix=".tmp")


def _remove_stale_temporaries(path: str) -> None:
    """Delete the temporary files of saves to ``path`` whose process is gone."""
    folder, base = os.path.split(os.path.abspath(path))
    prefix = f".{base}{_TMP_TAG}"
    for tmp in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*.tmp")):
        pid = os.path.basename(tmp)[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True     # another thread of this process may be saving right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _sync_folder(path: str) -> None:
    """fsync the folder, so that the rename itself survives a power loss."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    except (OSError, AttributeError):   # no O_DIRECTORY (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def load(path: "os.PathLike[str] | str", model: Any, optimizer: Optional[Optimizer] = None) -> None:
    """Copy the parameters saved in ``path`` into ``model`` (and the state into ``optimizer``).

    Layers with buffers (BatchNorm's running statistics) get the saved ones too, from the
    recorded architecture, when the file has one.

    Raises ModelFileError (a ValueError), leaving model and optimizer untouched, when the file
    is malformed or does not match them (number of parameters, shapes, optimizer type, buffers
    of another shape), holds values that are not finite in the model's dtype, or holds no
    optimizer state when one is asked. Every count and shape is checked before any array is read.
    """
    params, _ = collect_parameters(model)
    name = os.fspath(path)
    with open(name, "rb") as f:    # a missing or unreadable file is the usual OSError
        magic = f.read(4)
    if magic[:2] != b"PK":
        raise ModelFileError(f"{name} is not a ckpt model file (not an .npz archive)")
    try:
        with zipfile.ZipFile(name) as archive:
            opened = _Archive(archive, name)
            values, state = _read(opened, params, optimizer)
            buffers = _saved_buffers(opened.meta().get("architecture"), model, name)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise ModelFileError(f"{name} is corrupt or truncated ({type(exc).__name__}: {exc})") \
            from None
    if optimizer is not None:
        try:
            optimizer.check_state_dict(state)
        except (ValueError, TypeError) as exc:
            raise ModelFileError(f"{name}: {exc}") from None
    for target, value in zip(params, values):
        np.copyto(target, value)
    for layer, saved in buffers:
        for key, value in saved.buffers().items():
            current = getattr(layer, key)
            if isinstance(current, np.ndarray):
                np.copyto(current, value)
            else:
                setattr(layer, key, value)
    if optimizer is not None:
        optimizer.load_state_dict(state)


def _saved_buffers(configs: Any, model: Any, name: str) -> List[Tuple[Any, Any]]:
    """(model layer, layer rebuilt from the file's config) for every layer with buffers, when
    the file records the model's architecture; every buffer checked against the layer's."""
    layers = model if isinstance(model, (list, tuple)) else getattr(model, "layers", None)
    if not isinstance(configs, list) or not layers:
        return []
    flat: List[Any] = []

    def visit(items: Any) -> None:
        for item in items:
            flat.append(item)
            if isinstance(item, dict) and isinstance(item.get("layers"), list):
                visit(item["layers"])
    visit(configs)
    inside = list(walk(layers))
    pairs = []
    for i, layer in enumerate(inside):
        if not callable(getattr(layer, "buffers", None)):
            continue
        config = flat[i] if i < len(flat) else None
        if not isinstance(config, dict) or config.get("kind") != layer.layer_type:
            raise ModelFileError(f"{name}: layer {i} of the model is a {layer.layer_type}, "
                                 f"but the file's architecture has "
                                 f"{config.get('kind') if isinstance(config, dict) else None} "
                                 f"there")
        try:
            saved = layer_from_config(config, f"layer {i}")
        except ValueError as exc:
            raise ModelFileError(f"{name}: {exc}") from None
        for key, value in saved.buffers().items():
            current = layer.buffers()[key]
            if np.shape(value) != np.shape(current):
                raise ModelFileError(f"{name}: layer {i} ({layer.layer_type}) buffer {key} "
                                     f"has shape {np.shape(value)} in the file, the model's "
                                     f"has {np.shape(current)}")
        pairs.append((layer, saved))
    return pairs


def load_model(path: "os.PathLike[str] | str"):
    """Rebuild a model saved by :func:`save` from its recorded architecture, without user code:
    a SegmentCheckpointer of the built-in layers, with the saved parameters (and the saved
    checkpoint interval). Raises ModelFileError when the file is malformed or records no
    architecture (a model of custom layers: build it in code and use :func:`load`).
    """
    from ckpt.checkpoint import SegmentCheckpointer
    name = os.fspath(path)
    with open(name, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK":
        raise ModelFileError(f"{name} is not a ckpt model file (not an .npz archive)")
    try:
        with zipfile.ZipFile(name) as archive:
            meta = _Archive(archive, name).meta()
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise ModelFileError(f"{name} is corrupt or truncated ({type(exc).__name__}: {exc})") \
            from None
    configs = meta.get("architecture")
    if not isinstance(configs, list) or not configs:
        raise ModelFileError(f"{name} records no architecture (a model of custom layers?): "
                             "build the model in code and call ckpt.load(path, model)")
    try:
        layers = [layer_from_config(c, f"layer {i}") for i, c in enumerate(configs)]
    except ValueError as exc:
        raise ModelFileError(f"{name}: {exc}") from None
    every = meta.get("checkpoint_every")
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        every = None
    model = SegmentCheckpointer(layers, every)
    load(name, model)
    return model


def load_preprocessing(path: "os.PathLike[str] | str", inputs: int,
                       outputs: int) -> Optional[Preprocessing]:
    """The preprocessing saved in ``path`` for a network of ``inputs`` features and ``outputs``
    outputs, or None when the file holds none (format 1, or saved without); ModelFileError
    when it is malformed or does not fit those widths."""
    name = os.fspath(path)
    try:
        with zipfile.ZipFile(name) as archive:
            files = _Archive(archive, name)
            fields = files.meta().get("preprocessing")
            if fields is None:
                return None
            arrays = {}
            for key in ("feature_mean", "feature_scale", "target_mean", "target_scale"):
                if _PREP + key in files.members:
                    shape, dtype = files.header(_PREP + key)
                    if dtype.kind != "f" or len(shape) != 1 or shape[0] > max(inputs, 1):
                        raise files.error(f"array {_PREP + key} has shape {shape} {dtype}")
                    arrays[key] = files.read(_PREP + key)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise ModelFileError(f"{name} is corrupt or truncated ({type(exc).__name__}: {exc})") \
            from None
    try:
        return Preprocessing.from_record(fields, arrays, inputs, outputs)
    except ValueError as exc:
        raise ModelFileError(f"{name}: {exc}") from None


def _version() -> str:
    from ckpt._version import __version__
    return __version__


def _architecture(model: Any) -> Dict[str, Any]:
    """The model's layers as configs (and its checkpoint interval), when they are all built-in:
    what load_model needs to rebuild it. Empty for models of other layers."""
    layers = model if isinstance(model, (list, tuple)) else getattr(model, "layers", None)
    if not layers:
        return {}
    try:
        configs = [layer_config(layer) for layer in layers]
    except TypeError:
        return {}
    record: Dict[str, Any] = {"architecture": configs}
    if getattr(model, "checkpoint_every", None) is not None:
        record["checkpoint_every"] = model.checkpoint_every
    return record


class _Archive:
    """The .npy members of an open .npz, read only after their header and size are checked."""

    def __init__(self, archive: zipfile.ZipFile, name: str) -> None:
        self.archive = archive
        self.name = name
        self.members = {info.filename[:-4]: info for info in archive.infolist()
                        if info.filename.endswith(".npy")}
        self.sizes: Dict[str, Tuple[int, Tuple[int, ...], np.dtype]] = {}

    def error(self, problem: str) -> ModelFileError:
        return ModelFileError(f"{self.name}: {problem}")

    def header(self, key: str) -> Tuple[Tuple[int, ...], np.dtype]:
        """(shape, dtype) of member ``key``, from its .npy header alone."""
        info = self.members.get(key)
        if info is None:
            raise self.error(f"array {key} is missing")
        with self.archive.open(info) as f:
            try:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy version {version}")
            except ValueError as exc:
                raise self.error(f"array {key} has a bad header ({exc})") from None
            if dtype.hasobject:
                raise self.error(f"array {key} holds Python objects, which ckpt never saves")
            self.sizes[key] = (f.tell() + int(np.prod(shape, dtype=object)) * dtype.itemsize,
                               shape, dtype)
        return shape, dtype

    def read(self, key: str) -> np.ndarray:
        """The array, once its header's shape agrees with the member's size."""
        expected, shape, dtype = self.sizes[key]
        if self.members[key].file_size != expected:
            raise self.error(f"array {key} should take {expected} bytes for shape {shape} "
                             f"{dtype}, but takes {self.members[key].file_size}")
        with self.archive.open(self.members[key]) as f:
            try:
                return np.lib.format.read_array(f, allow_pickle=False)
            except ValueError as exc:
                raise self.error(f"array {key} cannot be read ({exc})") from None

    def meta(self) -> Dict[str, Any]:
        if _META not in self.members:
            raise ModelFileError(f"{self.name} is not a ckpt model file (no {_META})")
        if self.members[_META].file_size > _MAX_META_BYTES:
            raise self.error(f"{_META} takes {self.members[_META].file_size} bytes, more than "
                             f"metadata ever needs ({_MAX_META_BYTES})")
        shape, dtype = self.header(_META)
        if shape != () or dtype.kind != "U":
            raise self.error(f"{_META} must be one string, got shape {shape} {dtype}")
        try:
            meta = json.loads(str(self.read(_META)))
        except (ValueError, RecursionError) as exc:
            raise self.error(f"corrupt metadata ({exc})") from None
        if not isinstance(meta, dict):
            raise self.error(f"the metadata must be a JSON object, got {type(meta).__name__}")
        version = meta.get("format")
        if isinstance(version, int) and not isinstance(version, bool) \
                and version > FORMAT_VERSION:
            raise self.error(f"written by a newer ckpt (model format {version}; this ckpt "
                             f"{_version()} reads formats up to {FORMAT_VERSION}): upgrade "
                             f"ckpt to load it")
        if version not in READABLE_FORMATS or isinstance(version, bool):
            raise self.error(f"unsupported format {version!r}")
        return meta


def _read(archive: _Archive, params: List[np.ndarray],
          optimizer: Optional[Optimizer]) -> Tuple[List[np.ndarray], Optional[Dict[str, Any]]]:
    """Every array, checked against the model (and optimizer) before any is read."""
    meta = archive.meta()
    count = meta.get("params")
    if count != len(params):
        raise ModelFileError(f"{archive.name} holds {count!r} parameter arrays, but the model "
                             f"has {len(params)}")
    keys = [(f"param_{i}", p, f"parameter {i}") for i, p in enumerate(params)]
    names: List[str] = []
    info: Dict[str, Any] = {}
    if optimizer is not None:
        info = meta.get("optimizer")
        if not isinstance(info, dict):
            raise archive.error("holds no optimizer state")
        if info.get("type") != type(optimizer).__name__:
            raise archive.error(f"the state is of a {info.get('type')} optimizer, "
                                f"not {type(optimizer).__name__}")
        buffers = info.get("buffers", {})
        if not isinstance(buffers, dict):
            raise archive.error(f"the optimizer's buffers must be a JSON object, "
                                f"got {type(buffers).__name__}")
        wanted = set(optimizer._buffer_names)
        if set(buffers) != wanted:
            raise archive.error(f"{type(optimizer).__name__} state needs buffers "
                                f"{sorted(wanted)}, the file has {sorted(map(str, buffers))}")
        for name in sorted(buffers):
            if buffers[name] != len(params) or isinstance(buffers[name], bool):
                raise archive.error(f"optimizer buffer {name} has {buffers[name]!r} arrays for "
                                    f"{len(params)} parameters")
            keys += [(f"optimizer_{name}_{i}", p, f"{name} buffer {i}")
                     for i, p in enumerate(params)]
            names.append(name)
    for key, p, what in keys:
        shape, dtype = archive.header(key)
        if shape != p.shape:
            raise ModelFileError(f"{archive.name}: {what} has shape {p.shape} in the model but "
                                 f"{shape} in the file")
        if dtype.kind != "f":
            raise archive.error(f"{what} holds {dtype}, not floats")
    # Only now, with every count and shape checked, is anything allocated.
    values = {key: _finite(archive, archive.read(key), p.dtype, what) for key, p, what in keys}
    params_values = [values[f"param_{i}"] for i in range(len(params))]
    if optimizer is None:
        return params_values, None
    state = {"type": info.get("type"), "hyperparameters": info.get("hyperparameters", {}),
             "step": info.get("step"),
             "buffers": {name: [values[f"optimizer_{name}_{i}"] for i in range(len(params))]
                         for name in names}}
    return params_values, state


def _finite(archive: _Archive, value: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """``value`` cast to ``dtype``; ModelFileError if any value is NaN, infinite or overflows."""
    with np.errstate(over="ignore"):
        cast = value.astype(dtype)
    if not np.isfinite(cast).all():
        if np.isfinite(value).all():
            raise archive.error(f"{what} holds values too large for {dtype} "
                                f"(up to {np.abs(value).max():g})")
        raise archive.error(f"{what} holds NaN or infinite values")
    return cast
