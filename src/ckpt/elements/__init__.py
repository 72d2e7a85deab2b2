"""ckpt's element kinds, one module each, and the registry every list of kinds is read from.

A kind's module holds its Layer class, its cost description, its config, its NumPy twin and
its executor record (:class:`ckpt.elements.base.ElementKind`); its kernels sit in a ``.pxi`` of
their own. Registering it here is the one line that makes the executor, saving and loading,
and the tests see it.
"""
from ckpt.elements import activation, batchnorm, dense, dropout, layernorm, residual
from ckpt.elements.base import (ElementKind, ExecutorRecord, Layer, RowContext, Step, Twin,
                                dropout_streams, get_kind, kind_names, kind_of, kinds,
                                layer_config, layer_from_config, new_step, register,
                                unregister, walk)

register(dense.KIND)
register(layernorm.KIND)
register(dropout.KIND)
register(residual.KIND)
register(activation.KIND)
register(batchnorm.KIND)

Activation = activation.Activation
BatchNorm = batchnorm.BatchNorm
Dense = dense.Dense
Dropout = dropout.Dropout
LayerNorm = layernorm.LayerNorm
Residual = residual.Residual

__all__ = ["Activation", "BatchNorm", "Dense", "Dropout", "ElementKind", "ExecutorRecord", "Layer",
           "LayerNorm", "Residual", "RowContext", "Step", "Twin", "dropout_streams", "get_kind",
           "kind_names", "kind_of", "kinds", "layer_config", "layer_from_config", "new_step",
           "register", "unregister", "walk"]
