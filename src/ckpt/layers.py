"""ckpt's layers, by their historical module name: every name here lives in ckpt.elements (one
module per kind, and the registry) and is re-exported for code that imports ckpt.layers."""
from ckpt.elements import (Activation, BatchNorm, Dense, Dropout, Layer, LayerNorm, Residual, Step,
                           dropout_streams, layer_config, layer_from_config, new_step, walk)
from ckpt.elements._checks import (BLAS_INT_MAX, ActivationName, DTypeLike, _as_generator,
                                   _check_learning_rate, as_batch, check_allocation,
                                   check_blas_size, check_float_dtype, check_size)

__all__ = ["Activation", "BatchNorm", "BLAS_INT_MAX", "ActivationName", "DTypeLike", "Dense", "Dropout",
           "Layer", "LayerNorm", "Residual", "Step", "_as_generator", "_check_learning_rate",
           "as_batch", "check_allocation", "check_blas_size", "check_float_dtype", "check_size",
           "dropout_streams", "layer_config", "layer_from_config", "new_step", "walk"]
