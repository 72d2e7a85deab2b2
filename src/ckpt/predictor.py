"""A saved model that predicts on raw data: the network with its preprocessing.

``load_predictor(path)`` reads a model file of format 2 saved with its preprocessing (what
``ckpt train --save`` writes) and returns a :class:`Predictor`: ``predict(X)`` scales raw
features as in training and returns class labels or values in the target's own units, and
``predict_proba(X)`` the class probabilities. ``ckpt predict`` writes exactly these (through
:func:`prediction_table`), and ``ckpt evaluate`` scores them (:meth:`Predictor.score`).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ckpt.datasets import DataError, Preprocessing, Table, column_names, read_table
from ckpt.inference import check_inputs, model_dtype, predict, regression_metrics
from ckpt.losses import get_loss


class Predictor:
    """A network and the preprocessing of its inputs and outputs.

    ``model`` is the SegmentCheckpointer (``ckpt.load_model``'s); ``preprocessing`` the
    :class:`ckpt.datasets.Preprocessing` saved with it.
    """

    def __init__(self, model: Any, preprocessing: Preprocessing) -> None:
        self.model = model
        self.preprocessing = preprocessing
        self.dtype = model_dtype(model)

    @property
    def task(self) -> str:
        return self.preprocessing.task

    @property
    def classes(self) -> Optional[np.ndarray]:
        return self.preprocessing.classes

    @property
    def feature_names(self) -> List[str]:
        return list(self.preprocessing.feature_names)

    def __repr__(self) -> str:
        what = (f"{len(self.classes)} classes" if self.classes is not None else "values")
        return (f"Predictor({self.task}, {self.preprocessing.n_features} features -> {what}, "
                f"{self.dtype.name})")

    def transform(self, X: Any) -> np.ndarray:
        """Raw features as the network saw them in training: a scaled copy in its dtype."""
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (samples, features), got shape {X.shape}")
        expected = self.preprocessing.n_features
        if X.shape[1] != expected:
            raise ValueError(f"X has {X.shape[1]} features, but the model was trained on "
                             f"{expected}")
        if X.dtype.kind not in "biuf":
            raise TypeError(f"X must hold real numbers, got dtype {X.dtype}")
        with np.errstate(over="ignore"):
            X = np.array(X, dtype=self.dtype, order="C")
        # check_inputs names the first row holding a value that is not finite.
        check_inputs(X, np.zeros(len(X)), self.dtype, "mse")
        return self.preprocessing.scaler.transform(X)

    def _outputs(self, X: Any, scaled: bool) -> np.ndarray:
        return predict(self.model, X if scaled else self.transform(X))

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (samples, classes), float64, columns in ``classes`` order."""
        if self.task != "classification":
            raise ValueError("predict_proba needs a classifier; this model is a regression")
        return _softmax(self._outputs(X, scaled=False))

    def predict(self, X: Any) -> np.ndarray:
        """Class labels (the training's own values) or float64 values in the target's units."""
        return self._decode(self._outputs(X, scaled=False))

    def _decode(self, outputs: np.ndarray) -> np.ndarray:
        if self.task == "classification":
            return self.classes[outputs.argmax(axis=1)]
        values = outputs.astype(np.float64)
        scaler = self.preprocessing.target_scaler
        return (scaler.inverse(values) if scaler is not None else values)[:, 0]

    def score(self, X: Any, y: Any) -> Dict[str, float]:
        """Accuracy and mean cross-entropy, or RMSE and R^2 in the target's units."""
        outputs = self._outputs(X, scaled=False)
        y = np.asarray(y)
        if self.task == "classification":
            lookup = {value: i for i, value in enumerate(self.classes.tolist())}
            labels = np.array([lookup.get(value, -1) for value in y.tolist()], dtype=np.int64)
            unknown = np.flatnonzero(labels < 0)
            if len(unknown):
                raise DataError(f"row {unknown[0]}: class {y[unknown[0]]!r} is not one of the "
                                f"model's classes")
            loss, _ = get_loss("cross_entropy")(outputs, labels)
            return {"accuracy": float(np.mean(outputs.argmax(axis=1) == labels)),
                    "loss": float(loss)}
        return {key: value for key, value in
                regression_metrics(np.asarray(y, np.float64), self._decode(outputs)).items()
                if key in ("rmse", "r2")}


def _softmax(outputs: np.ndarray) -> np.ndarray:
    z = outputs.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def load_predictor(path: "os.PathLike[str] | str") -> Predictor:
    """The :class:`Predictor` of a model file saved with its preprocessing (``ckpt train
    --save``). ModelFileError when the file holds none: a file of format 1, or one saved by
    ``ckpt.save`` without ``preprocessing=``, loads with ``ckpt.load_model`` instead."""
    from ckpt.io import ModelFileError, load_model, load_preprocessing
    model = load_model(path)
    widths = model.widths
    preprocessing = load_preprocessing(path, widths[0], widths[-1])
    if preprocessing is None:
        raise ModelFileError(f"{os.fspath(path)} holds no preprocessing (saved by ckpt.save "
                             f"without it, or in model format 1): load the network with "
                             f"ckpt.load_model and scale its inputs as in training")
    return Predictor(model, preprocessing)


def read_features(path: "os.PathLike[str] | str", preprocessing: Preprocessing, dtype: Any, *,
                  with_target: bool = False) -> Table:
    """The model's feature columns of a data file (and its target with ``with_target``).

    By name when the model was trained on named columns and the file has names (a CSV header,
    Parquet): the saved target column, if the file holds it, is left out. Otherwise by position:
    a file of exactly the model's feature count is all features (an .npz may bring its y); one
    as wide as the table trained on gives the same columns as in training, the target apart.
    Any other width is a DataError naming both counts.
    """
    path = os.fspath(path)
    n = preprocessing.n_features
    names = column_names(path) if preprocessing.named else None
    if names is not None:
        missing = [name for name in preprocessing.feature_names if name not in names]
        if missing:
            present = n - len(missing)
            raise DataError(f"{path} has {present} of the model's {n} feature columns (missing: "
                            f"{', '.join(missing[:10])}{', ...' if len(missing) > 10 else ''})")
        if with_target and preprocessing.target_name not in names:
            raise DataError(f"{path} has no column {preprocessing.target_name!r}, the target "
                            f"to score against")
        return read_table(path, dtype=dtype, features=preprocessing.feature_names,
                          target=preprocessing.target_name if with_target else None,
                          require_target=with_target)
    table = read_table(path, dtype=dtype, require_target=False)
    width = table.X.shape[1]
    if width == n:
        if with_target and table.y is None:
            raise DataError(f"{path} holds no target column to score against (its {width} "
                            f"columns are the model's features)")
        return table
    if width == preprocessing.columns and preprocessing.target_index is not None:
        # The training table's layout: its feature columns, and its target when asked.
        return read_table(path, dtype=dtype, features=preprocessing.feature_columns,
                          target=preprocessing.target_index if with_target else None,
                          require_target=with_target)
    raise DataError(f"{path} has {width} feature columns, but the model was trained on {n}")


def prediction_table(predictor: Predictor, X: np.ndarray) -> Tuple[List[str], List[List[Any]]]:
    """(header, rows) of ``ckpt predict``'s CSV for raw features X: the predicted label and
    one probability column per class (``p_<class>``), or the predicted value."""
    outputs = predictor._outputs(X, scaled=False)
    name = predictor.preprocessing.target_name or "prediction"
    predicted = predictor._decode(outputs)
    if predictor.task == "classification":
        proba = _softmax(outputs)
        header = [name] + [f"p_{c}" for c in predictor.classes.tolist()]
        rows = [[label] + row for label, row in zip(predicted.tolist(), proba.tolist())]
        return header, rows
    return [name], [[value] for value in predicted.tolist()]
