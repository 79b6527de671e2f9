"""Caffe's layers, one module per family, each class registered under its Caffe type string."""

from caffe_compat.layers import (  # noqa: F401  (importing registers the layers)
    common,
    conv,
    data,
    detection,
    forks,
    loss,
    neuron,
    norm,
    pooling,
    python,
    recurrent,
    ssd,
    ssd_train,
    window_data,
)
from caffe_compat.layers.base import LAYER_REGISTRY, Layer, layer_class, register_layer, registered_types

# pycaffe's ``caffe.layers`` (``L``): any CamelCase attribute is a net_spec layer factory (L.Convolution(...))
from caffe_compat.net_spec import layer_factory_getattr as __getattr__  # noqa: F401

__all__ = ["LAYER_REGISTRY", "Layer", "layer_class", "register_layer", "registered_types"]
