"""pycaffe's net specification: write Caffe nets in Python (``caffe.NetSpec``, ``L``, ``P``).

Each ``L.<Type>(*bottoms, **params)`` call describes one layer and returns its top (a ``Top``;
a tuple of tops for ``ntop > 1``; the layer itself for ``ntop=0``). Assigning tops to the
attributes of a ``NetSpec`` names them; ``NetSpec.to_proto()`` returns the
``caffe_pb2.NetParameter`` of every layer needed to compute the assigned tops::

    from caffe_compat import layers as L, params as P
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[64, 1, 28, 28]))
    n.conv1 = L.Convolution(n.data, num_output=20, kernel_size=5, weight_filler=dict(type="xavier"),
                            param=[dict(lr_mult=1), dict(lr_mult=2)])
    n.pool1 = L.Pooling(n.conv1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.relu1 = L.ReLU(n.pool1, in_place=True)
    net_param = n.to_proto()

Rules (pycaffe's ``net_spec.py``):

- Keyword parameters go into the layer type's own message (``Convolution`` →
  ``convolution_param``) when it has that field, else into the ``LayerParameter``
  (``loss_weight``, ``name``, ``include``, ``propagate_down`` ...); keywords ending in ``param``
  (``param``, ``transform_param``, ``convolution_param`` ...) always go to the ``LayerParameter``.
- Values: a dict fills a message, a list fills a repeated field (a list of dicts adds one
  message per dict), a scalar given to a repeated field becomes a one-element list.
- ``ntop=N`` (default 1) sets the number of tops, ``in_place=True`` makes the tops the bottoms.
- Names: a layer is named after its first top; a top is named by the NetSpec attribute it was
  assigned to, otherwise ``<Type><k>`` with ``k`` counting per type from 1 in the order the
  layers are emitted (``Convolution1``, ``ReLU1`` ...). A ``name=`` keyword sets the layer name.
- Layers are emitted bottoms first, in the order the tops were assigned.

Deliberate differences from pycaffe, all accepting more and none changing what pycaffe accepts:
``Deconvolution`` and ``Im2col`` keywords go into ``convolution_param`` (pycaffe has no message
for them and raises); tuples count as lists; NumPy scalars and arrays are accepted; an enum
field also takes the value's name (``pool="MAX"``); a ``caffe_pb2`` message is accepted where a
dict is; an unknown field or a bad value raises ``LayerError`` naming the layer and the field.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

import numpy as np
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message

from caffe_compat.errors import LayerError
from caffe_compat.proto import caffe_pb2

__all__ = [
    "Top",
    "Function",
    "NetSpec",
    "Layers",
    "Parameters",
    "layers",
    "params",
    "to_proto",
    "assign_proto",
    "param_name_dict",
    "layer_factory_getattr",
]


def param_name_dict() -> dict[str, str]:
    """Layer type → the stem of its parameter field: ``{"Convolution": "convolution", ...}``.

    Derived from ``LayerParameter``'s ``*_param`` fields and their message names
    (``inner_product_param: InnerProductParameter`` gives ``"InnerProduct": "inner_product"``),
    plus the types that share another's message (``Deconvolution``, ``Im2col``).
    """
    out: dict[str, str] = {}
    for f in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if f.name.endswith("_param") and f.message_type is not None:
            type_name = f.message_type.name
            if type_name.endswith("Parameter"):
                out[type_name[: -len("Parameter")]] = f.name[: -len("_param")]
    out.setdefault("Deconvolution", "convolution")
    out.setdefault("Im2col", "convolution")
    return out


_param_names = param_name_dict()


def _plain(val: Any) -> Any:
    """NumPy scalars/arrays and tuples as the Python values protobuf takes."""
    if isinstance(val, np.ndarray):
        return val.tolist()
    if isinstance(val, np.generic):
        return val.item()
    if isinstance(val, tuple):
        return list(val)
    return val


def _is_repeated(field: _descriptor.FieldDescriptor) -> bool:
    flag = getattr(field, "is_repeated", None)  # protobuf >= 6; ``label`` is deprecated there
    if flag is None:
        return field.label == _descriptor.FieldDescriptor.LABEL_REPEATED
    return bool(flag() if callable(flag) else flag)


def _enum_value(field: _descriptor.FieldDescriptor, val: Any) -> Any:
    if field.type == _descriptor.FieldDescriptor.TYPE_ENUM and isinstance(val, str):
        ev = field.enum_type.values_by_name.get(val)
        if ev is None:
            names = ", ".join(v.name for v in field.enum_type.values)
            raise ValueError(f"{val!r} is not a value of {field.enum_type.name} ({names})")
        return ev.number
    return val


def assign_proto(proto: _message.Message, name: str, val: Any) -> None:
    """Assign a Python value to field ``name`` of ``proto``, recursively (pycaffe's rule).

    Dicts fill messages, lists fill repeated fields (dicts in a list each add a message), a
    scalar for a repeated field becomes a one-element list, anything else is set directly.
    """
    field = proto.DESCRIPTOR.fields_by_name.get(name)
    if field is None:
        raise AttributeError(f"{proto.DESCRIPTOR.name} has no field {name!r}")
    val = _plain(val)
    repeated = _is_repeated(field)
    is_message = field.message_type is not None
    if repeated and not isinstance(val, list):
        val = [val]
    if isinstance(val, list):
        if not repeated:
            raise TypeError(f"{proto.DESCRIPTOR.name}.{name} is not repeated; got a list {val!r}")
        container = getattr(proto, name)
        for item in val:
            item = _plain(item)
            if is_message:
                if isinstance(item, _message.Message):
                    container.add().CopyFrom(item)
                elif isinstance(item, dict):
                    sub = container.add()
                    for k, v in item.items():
                        assign_proto(sub, k, v)
                else:
                    raise TypeError(
                        f"{proto.DESCRIPTOR.name}.{name} holds {field.message_type.name} messages: "
                        f"give a dict, got {item!r}"
                    )
            else:
                container.append(_enum_value(field, item))
    elif is_message:
        if isinstance(val, _message.Message):
            getattr(proto, name).CopyFrom(val)
        elif isinstance(val, dict):
            sub = getattr(proto, name)
            for k, v in val.items():  # an empty dict leaves the message unset, as pycaffe
                assign_proto(sub, k, v)
        else:
            raise TypeError(f"{proto.DESCRIPTOR.name}.{name} is a {field.message_type.name}: give a dict, got {val!r}")
    else:
        setattr(proto, name, _enum_value(field, val))


class Top:
    """One output blob of a layer (``fn``), the ``n``-th of its tops."""

    def __init__(self, fn: Function, n: int):
        self.fn = fn
        self.n = n

    def to_proto(self) -> caffe_pb2.NetParameter:
        """The NetParameter of every layer needed to compute this top (names auto-generated)."""
        return to_proto(self)

    def _update(self, params: dict) -> None:
        self.fn._update(params)

    def _to_proto(self, layers: OrderedDict, names: dict, autonames: Counter) -> None:
        self.fn._to_proto(layers, names, autonames)

    def __repr__(self) -> str:
        return f"<Top {self.n} of {self.fn.type_name}>"


class Function:
    """One layer: its type, its bottoms (``Top`` objects) and its keyword parameters."""

    def __init__(self, type_name: str, inputs: tuple, params: dict):
        self.type_name = type_name
        for i, inp in enumerate(inputs):
            if not isinstance(inp, Top):
                hint = ""
                if isinstance(inp, (tuple, list)) and inp and isinstance(inp[0], Top):
                    hint = " (a layer with ntop > 1 returns a tuple of tops: pass one of them)"
                # pycaffe's wording first (scripts match on it), then what to do
                raise TypeError(
                    f"{type_name} input {i} is not a Top (type is {type(inp)}): a bottom must be a top "
                    f"returned by another layer{hint}"
                )
        self.inputs = tuple(inputs)
        self.params = dict(params)
        self.ntop = int(self.params.pop("ntop", 1))
        self.in_place = bool(self.params.pop("in_place", False))
        if self.ntop < 0:
            raise ValueError(f"L.{type_name}(...): ntop must be >= 0, got {self.ntop}")
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _get_name(self, names: dict, autonames: Counter) -> str:
        if self not in names and self.ntop > 0:
            names[self] = self._get_top_name(self.tops[0], names, autonames)
        elif self not in names:
            autonames[self.type_name] += 1
            names[self] = self.type_name + str(autonames[self.type_name])
        return names[self]

    def _get_top_name(self, top: Top, names: dict, autonames: Counter) -> str:
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = top.fn.type_name + str(autonames[top.fn.type_name])
        return names[top]

    def _update(self, params: dict) -> None:
        self.params.update(params)

    def _target(self, layer: caffe_pb2.LayerParameter, key: str) -> _message.Message:
        """The message a keyword goes to: the type's own parameter message or the layer."""
        if key.endswith("param"):
            return layer
        stem = _param_names.get(self.type_name)
        if stem is not None:
            sub_field = f"{stem}_param"
            if key in getattr(layer, sub_field).DESCRIPTOR.fields_by_name:
                return getattr(layer, sub_field)
        if key in layer.DESCRIPTOR.fields_by_name:
            return layer
        where = "LayerParameter" + (f" or {stem}_param" if stem else "")
        raise LayerError(
            f"layer {layer.name!r} ({self.type_name}): unknown parameter {key!r}: no such field in {where}"
            + (
                ""
                if stem
                else f" (type {self.type_name!r} has no parameter message of its own; "
                "pass the message explicitly, e.g. xxx_param=dict(...))"
            )
        )

    def _to_proto(self, layers: OrderedDict, names: dict, autonames: Counter) -> None:
        if self in layers:
            return
        bottom_names = []
        for inp in self.inputs:
            inp._to_proto(layers, names, autonames)
            bottom_names.append(layers[inp.fn].top[inp.n])
        layer = caffe_pb2.LayerParameter()
        layer.type = self.type_name
        layer.bottom.extend(bottom_names)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            for top in self.tops:
                layer.top.append(self._get_top_name(top, names, autonames))
        layer.name = self._get_name(names, autonames)
        for key, val in self.params.items():
            target = self._target(layer, key)
            try:
                assign_proto(target, key, val)
            except (AttributeError, TypeError, ValueError) as e:
                where = "" if target is layer else f"{self._target_field(layer, target)}."
                raise LayerError(
                    f"layer {layer.name!r} ({self.type_name}): cannot set {where}{key} = {val!r}: {e}"
                ) from None
        layers[self] = layer

    @staticmethod
    def _target_field(layer: caffe_pb2.LayerParameter, target: _message.Message) -> str:
        for f in layer.DESCRIPTOR.fields:
            if f.message_type is target.DESCRIPTOR and not _is_repeated(f):
                return f.name
        return target.DESCRIPTOR.name

    def __repr__(self) -> str:
        return f"<Function {self.type_name} ({self.ntop} tops)>"


class NetSpec:
    """A set of named tops (assigned as attributes or items) that ``to_proto`` turns into a net.

    ``n.conv1 = L.Convolution(...)`` names the top (and its layer) ``conv1``;
    ``n.data, n.label = L.Data(..., ntop=2)`` names both tops (the layer takes the first name).
    """

    def __init__(self):
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name: str, value) -> None:
        self.tops[name] = value

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(f"NetSpec has no top {name!r}; tops: {list(self.tops)}") from None

    def __setitem__(self, key: str, value) -> None:
        self.__setattr__(key, value)

    def __getitem__(self, item: str):
        return self.tops[item]

    def __delitem__(self, name: str) -> None:
        del self.tops[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tops

    def keys(self) -> list[str]:
        return list(self.tops.keys())

    def vals(self) -> list:
        return list(self.tops.values())

    def update(self, name: str, params: dict) -> None:
        """Add or change keyword parameters of the layer producing top ``name``."""
        self.tops[name]._update(params)

    def to_proto(self) -> caffe_pb2.NetParameter:
        """The NetParameter computing every assigned top, named as assigned."""
        names = {v: k for k, v in self.tops.items()}
        autonames: Counter = Counter()
        layers: OrderedDict = OrderedDict()
        for top in self.tops.values():
            top._to_proto(layers, names, autonames)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layers.values())
        return net


def to_proto(*tops: Top) -> caffe_pb2.NetParameter:
    """The NetParameter of every layer needed to compute ``tops``; all names auto-generated."""
    layers: OrderedDict = OrderedDict()
    autonames: Counter = Counter()
    for top in tops:
        top._to_proto(layers, {}, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


def _layer_fn(type_name: str):
    def layer_fn(*args, **kwargs):
        fn = Function(type_name, args, kwargs)
        if fn.ntop == 0:
            return fn
        if fn.ntop == 1:
            return fn.tops[0]
        return fn.tops

    layer_fn.__name__ = type_name
    layer_fn.__qualname__ = f"layers.{type_name}"
    layer_fn.__doc__ = f"Describe a {type_name!r} layer: L.{type_name}(*bottoms, ntop=1, in_place=False, **params)."
    return layer_fn


class Layers:
    """pycaffe's ``caffe.layers`` (``L``): ``L.<Type>(*bottoms, **params)`` describes a layer.

    Any type name is accepted (a custom layer type included); it is checked when a ``Net`` is
    built from the proto.
    """

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _layer_fn(name)


class _ParamEnums:
    def __init__(self, type_name: str):
        self._type_name = type_name

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        msg = getattr(caffe_pb2, self._type_name + "Parameter", None)
        if msg is None:
            raise AttributeError(f"caffe_pb2 has no message {self._type_name}Parameter (P.{self._type_name})")
        try:
            return getattr(msg, name)
        except AttributeError:
            raise AttributeError(
                f"{self._type_name}Parameter has no constant {name!r} (P.{self._type_name}.{name})"
            ) from None


class Parameters:
    """pycaffe's ``caffe.params`` (``P``): ``P.Pooling.MAX`` is ``caffe_pb2.PoolingParameter.MAX``."""

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _ParamEnums(name)


layers = Layers()
params = Parameters()


def layer_factory_getattr(name: str):
    """Module ``__getattr__`` that makes ``caffe_compat.layers`` also pycaffe's ``L``.

    A CamelCase name (``Convolution``, ``InnerProduct``, ``HDF5Data``) returns the layer
    factory; anything else raises ``AttributeError``, so that submodule imports and dunder
    look-ups of the package are unaffected.
    """
    if name[:1].isupper():
        return _layer_fn(name)
    raise AttributeError(f"module 'caffe_compat.layers' has no attribute {name!r}")
