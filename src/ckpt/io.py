"""Save and load a model's parameters (and an optimizer's state) as one ``.npz`` file.

Saving writes a temporary file in the destination's folder, then renames it over the
destination (``os.replace`` is atomic), so an interrupted save leaves the previous file intact.
Loading checks the whole file against the model (and optimizer) before copying anything, so a
mismatched file raises ValueError and changes nothing. Files hold plain arrays and one JSON
string: they load without pickle.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np

from ckpt.layers import layer_config, layer_from_config
from ckpt.optim import Optimizer, collect_parameters

FORMAT_VERSION = 1
_META = "ckpt_meta"


def save(path: "os.PathLike[str] | str", model: Any, optimizer: Optional[Optimizer] = None) -> None:
    """Write every parameter of ``model`` (and ``optimizer``'s state) to ``path``, atomically.

    ``path`` is used as given (no ``.npz`` is appended).
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
    arrays[_META] = np.array(json.dumps(meta))

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)   # mkstemp's 0600 would make the saved model private
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load(path: "os.PathLike[str] | str", model: Any, optimizer: Optional[Optimizer] = None) -> None:
    """Copy the parameters saved in ``path`` into ``model`` (and the state into ``optimizer``).

    Raises ValueError, leaving model and optimizer untouched, when the file does not match them
    (number of parameters, shapes, optimizer type) or holds no optimizer state when one is asked.
    """
    params, _ = collect_parameters(model)
    with np.load(os.fspath(path), allow_pickle=False) as data:
        files = set(data.files)
        if _META not in files:
            raise ValueError(f"{os.fspath(path)} is not a ckpt model file (no {_META})")
        try:
            meta = json.loads(str(data[_META]))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{os.fspath(path)}: corrupt metadata ({exc})") from None
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{os.fspath(path)}: unsupported format {meta.get('format')!r}")
        count = meta.get("params")
        if count != len(params) or any(f"param_{i}" not in files for i in range(len(params))):
            raise ValueError(f"{os.fspath(path)} holds {count} parameter arrays, but the model "
                             f"has {len(params)}")
        values = [data[f"param_{i}"] for i in range(len(params))]
        state = _read_optimizer_state(data, meta, path) if optimizer is not None else None
    _check_values(params, values)
    if optimizer is not None:
        optimizer.check_state_dict(state)
    for target, value in zip(params, values):
        np.copyto(target, value, casting="same_kind")
    if optimizer is not None:
        optimizer.load_state_dict(state)


def _read_optimizer_state(data: Any, meta: Dict[str, Any], path: Any) -> Dict[str, Any]:
    info = meta.get("optimizer")
    if not isinstance(info, dict):
        raise ValueError(f"{os.fspath(path)} holds no optimizer state")
    buffers: Dict[str, List[np.ndarray]] = {}
    for name, count in dict(info.get("buffers", {})).items():
        keys = [f"optimizer_{name}_{i}" for i in range(int(count))]
        missing = [key for key in keys if key not in data.files]
        if missing:
            raise ValueError(f"{os.fspath(path)}: optimizer array {missing[0]} is missing")
        buffers[name] = [data[key] for key in keys]
    return {"type": info.get("type"), "hyperparameters": info.get("hyperparameters", {}),
            "step": info.get("step"), "buffers": buffers}


def _check_values(params: List[np.ndarray], values: List[np.ndarray]) -> None:
    for i, (p, value) in enumerate(zip(params, values)):
        if value.shape != p.shape:
            raise ValueError(f"parameter {i} has shape {p.shape} in the model but {value.shape} "
                             f"in the file")
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"parameter {i} in the file holds {value.dtype}, not floats")


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


def load_model(path: "os.PathLike[str] | str"):
    """Rebuild a model saved by :func:`save` from its recorded architecture, without user code:
    a SegmentCheckpointer of the built-in layers, with the saved parameters (and the saved
    checkpoint interval). Raises ValueError when the file records no architecture (a model of
    custom layers: build it in code and use :func:`load`).
    """
    from ckpt.checkpoint import SegmentCheckpointer
    with np.load(os.fspath(path), allow_pickle=False) as data:
        if _META not in data.files:
            raise ValueError(f"{os.fspath(path)} is not a ckpt model file (no {_META})")
        try:
            meta = json.loads(str(data[_META]))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{os.fspath(path)}: corrupt metadata ({exc})") from None
    configs = meta.get("architecture") if isinstance(meta, dict) else None
    if not isinstance(configs, list) or not configs:
        raise ValueError(f"{os.fspath(path)} records no architecture (a model of custom layers?): "
                         "build the model in code and call ckpt.load(path, model)")
    layers = [layer_from_config(c, f"{os.fspath(path)}: layer {i}") for i, c in enumerate(configs)]
    every = meta.get("checkpoint_every")
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        every = None
    model = SegmentCheckpointer(layers, every)
    load(path, model)
    return model
