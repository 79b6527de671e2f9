"""Caffe's ``Python`` layer: user code (pycaffe's ``caffe.Layer`` subclasses) inside a net.

A Python layer runs arbitrary code named by the prototxt (``python_param { module layer }``),
so it is refused unless the user opts in, by one of:

- ``caffe_compat.allow_python_layers()`` in Python;
- the environment variable ``CAFFE_COMPAT_ALLOW_PYTHON_LAYERS=1``;
- the tools' flag ``--allow-python-layers``.

The user's class follows pycaffe: ``setup(bottom, top)``, ``reshape(bottom, top)``,
``forward(bottom, top)``, ``backward(top, propagate_down, bottom)`` over blobs whose ``data`` and
``diff`` are NumPy arrays; ``self.param_str``, ``self.phase``; ``self.blobs`` for learnable blobs
(``self.add_blob(*shape)``). Its backward becomes the autograd of the layer, so Python layers
train like any other.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import torch

from caffe_compat.layers.base import Layer, layer_class, register_layer

__all__ = ["PythonLayer", "PyLayer", "NATIVE_PYTHON_LAYERS", "allow_python_layers", "python_layers_allowed"]

_ENV = "CAFFE_COMPAT_ALLOW_PYTHON_LAYERS"
_allowed = {"value": False}


def allow_python_layers(allow: bool = True) -> None:
    """Opt in (or out) to running ``Python`` layers, which execute the code a prototxt names."""
    _allowed["value"] = bool(allow)


def python_layers_allowed() -> bool:
    return _allowed["value"] or os.environ.get(_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class _PyBlob:
    """A blob as a Python layer sees it: NumPy ``data``/``diff`` and ``reshape``."""

    def __init__(self, data: np.ndarray | None = None, shape=()):
        self.data = data if data is not None else np.zeros(shape, np.float32)
        self._diff = None

    @property
    def diff(self) -> np.ndarray:
        if self._diff is None or self._diff.shape != self.data.shape:
            self._diff = np.zeros_like(self.data)
        return self._diff

    @diff.setter
    def diff(self, value) -> None:
        self.diff[...] = value

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def count(self) -> int:
        return int(self.data.size)

    def _legacy(self, i):
        return self.data.shape[i] if i < self.data.ndim else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    def reshape(self, *shape) -> None:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(d) for d in shape)
        if tuple(self.data.shape) != shape:
            self.data = np.zeros(shape, np.float32)
            self._diff = None


class PyLayer:
    """pycaffe's ``caffe.Layer``: the base class of user Python layers.

    Override ``setup``, ``reshape``, ``forward`` and (to train through it) ``backward``.
    """

    def __init__(self):
        self.blobs: list[_PyBlob] = []
        self.param_str = ""
        self.phase = 0

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        raise NotImplementedError("Python layer: forward() not implemented")

    def backward(self, top, propagate_down, bottom):
        pass

    def add_blob(self, *shape) -> _PyBlob:
        b = _PyBlob(shape=tuple(int(d) for d in shape))
        self.blobs.append(b)
        return b


class _PyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, nparams, *inputs):
        bottoms_t = inputs[: len(inputs) - nparams]
        params_t = inputs[len(inputs) - nparams :]
        user = layer.user
        for b, t in zip(user.blobs, params_t):
            b.data = t.detach().cpu().numpy().copy()
        bottom = [_PyBlob(t.detach().cpu().numpy().copy()) for t in bottoms_t]
        top = [_PyBlob(shape=s) for s in layer._top_shapes_cache or [()] * layer.num_tops]
        user.reshape(bottom, top)
        user.forward(bottom, top)
        ctx.layer = layer
        ctx.bottom = bottom
        ctx.top = top
        ctx.nparams = nparams
        ref = bottoms_t[0] if bottoms_t else (params_t[0] if params_t else torch.zeros(()))
        outs = tuple(torch.from_numpy(np.ascontiguousarray(t.data, np.float32)).to(ref.device) for t in top)
        return outs if len(outs) != 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        layer = ctx.layer
        user = layer.user
        for t, g in zip(ctx.top, grads):
            t.diff[...] = g.detach().cpu().numpy() if g is not None else 0
        for b in ctx.bottom:
            b.diff[...] = 0
        for b in user.blobs:
            b.diff[...] = 0
        nb = len(ctx.bottom)
        propagate = [bool(ctx.needs_input_grad[2 + i]) for i in range(nb)]
        user.backward(ctx.top, propagate, ctx.bottom)
        dev = grads[0].device if grads and grads[0] is not None else torch.device("cpu")
        gb = [torch.from_numpy(b.diff.astype(np.float32)).to(dev) if p else None for b, p in zip(ctx.bottom, propagate)]
        gp = [torch.from_numpy(b.diff.astype(np.float32)).to(dev) for b in user.blobs]
        return (None, None, *gb, *gp)


#: Python layers of published models that a native layer implements: ``(module, layer)`` -> the
#: registered type built instead, without importing or running the user's module (no opt-in
#: needed). The native class reads ``python_param.param_str`` itself.
NATIVE_PYTHON_LAYERS: dict[tuple[str, str], str] = {
    ("rpn.proposal_layer", "ProposalLayer"): "Proposal",  # py-faster-rcnn; layers/detection.py
}


@register_layer("Python")
class PythonLayer(Layer):
    """A user-defined layer written in Python (pycaffe's ``Python`` layer type).

    Parameters (``python_param``): ``module`` (importable module name; the current directory
    is searched too), ``layer`` (class name), ``param_str`` (handed to the layer as
    ``self.param_str``). Refused unless Python layers are allowed (see the module docstring).
    A ``(module, layer)`` listed in ``NATIVE_PYTHON_LAYERS`` builds that native layer instead.
    """

    def __new__(cls, param=None, *args, **kwargs):
        native = None
        if param is not None:
            pp = param.python_param
            native = NATIVE_PYTHON_LAYERS.get((pp.module, pp.layer))
        if native is None:
            return super().__new__(cls)
        # not a PythonLayer: Python then skips __init__ on the returned object, built here
        return layer_class(native, param.name)(param, *args, **kwargs)

    def setup(self, bottom_shapes):
        pp = self.param.python_param
        if not python_layers_allowed():
            raise self.error(
                f"runs user code (python_param module {pp.module!r}, layer {pp.layer!r}) and Python "
                "layers are off. Opt in explicitly: caffe_compat.allow_python_layers() in Python, "
                f"{_ENV}=1 in the environment, or --allow-python-layers on the tools"
            )
        if not pp.module or not pp.layer:
            raise self.error("python_param needs both 'module' and 'layer'")
        import sys

        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        import caffe_compat

        caffe_compat.install_as_caffe()  # the user's module was written for pycaffe: `import caffe`
        try:
            mod = importlib.import_module(pp.module)
        except ImportError as e:
            raise self.error(f"cannot import python_param.module {pp.module!r}: {e}") from None
        cls = getattr(mod, pp.layer, None)
        if cls is None:
            raise self.error(f"module {pp.module!r} has no class {pp.layer!r}")
        user = cls.__new__(cls)
        PyLayer.__init__(user)
        user.param_str = pp.param_str
        user.phase = self.phase
        if type(user).__init__ is not PyLayer.__init__ and type(user).__init__ is not object.__init__:
            try:
                type(user).__init__(user)
            except TypeError:
                pass
            user.param_str = pp.param_str
            user.phase = self.phase
            if not hasattr(user, "blobs"):
                user.blobs = []
        self.user = user
        self.num_tops = len(self.param.top)
        bottom = [_PyBlob(shape=s) for s in bottom_shapes]
        top = [_PyBlob(shape=()) for _ in range(self.num_tops)]
        user.setup(bottom, top)
        user.reshape(bottom, top)
        self._top_shapes_cache = [t.shape for t in top]
        for b in user.blobs:
            p = self.add_blob(b.data.shape)
            with torch.no_grad():
                p.copy_(torch.from_numpy(np.asarray(b.data, np.float32)))

    def top_shapes(self, bottom_shapes):
        bottom = [_PyBlob(shape=s) for s in bottom_shapes]
        top = [_PyBlob(shape=s) for s in self._top_shapes_cache]
        self.user.reshape(bottom, top)
        self._top_shapes_cache = [t.shape for t in top]
        return list(self._top_shapes_cache)

    def forward(self, *bottoms):
        params = list(self.blobs)
        out = _PyFunction.apply(self, len(params), *bottoms, *params)
        outs = out if isinstance(out, tuple) else (out,)
        for b, t in zip(self.user.blobs, params):
            # user code may change its blobs in forward (e.g. running statistics)
            if not np.array_equal(b.data, t.detach().cpu().numpy()):
                with torch.no_grad():
                    t.copy_(torch.from_numpy(np.asarray(b.data, np.float32)))
        self._top_shapes_cache = [tuple(t.shape) for t in outs]
        return outs
