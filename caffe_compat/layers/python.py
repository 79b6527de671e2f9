"""Caffe's ``Python`` layer: user code (pycaffe's ``caffe.Layer`` subclasses) inside a net.

A Python layer runs arbitrary code named by the prototxt (``python_param { module layer }``),
so it is refused unless the user opts in, by one of:

- ``caffe_compat.allow_python_layers()`` in Python;
- the environment variable ``CAFFE_COMPAT_ALLOW_PYTHON_LAYERS=1``;
- the tools' flag ``--allow-python-layers``.

The user's class follows pycaffe: it is built as ``cls(layer_param)`` when it defines its own
``__init__`` (Caffe hands it the ``LayerParameter``); ``setup(bottom, top)``,
``reshape(bottom, top)``, ``forward(bottom, top)``, ``backward(top, propagate_down, bottom)``
over blobs whose ``data`` and ``diff`` are NumPy arrays (``bottom`` and ``top`` are
``RawBlobVec`` lists); ``self.param_str``, ``self.phase``; ``self.blobs`` is a ``BlobVec`` for
the learnable blobs (``self.blobs.add_blob(*shape)``). Its backward becomes the autograd of the
layer, so Python layers train like any other.

An exception raised by the user's code reaches the caller as an instance of its own type (a
script's ``except RuntimeError`` catches it, as with pycaffe) that is also a
``PythonLayerError`` (a ``LayerError``): the same arguments and attributes, the user's
traceback, and the layer's name, its class and the method in its message
(``... (while running layer 'loss' (Python: pyloss.EuclideanLossLayer.forward))``).
"""

from __future__ import annotations

import importlib
import inspect
import os

import numpy as np
import torch

from caffe_compat import _caffe
from caffe_compat._caffe import BlobVec, PyBlob, RawBlobVec
from caffe_compat.errors import LayerError
from caffe_compat.layers.base import Layer, layer_class, register_layer

__all__ = [
    "PythonLayer",
    "PyLayer",
    "PyBlob",
    "PythonLayerError",
    "NATIVE_PYTHON_LAYERS",
    "allow_python_layers",
    "python_layers_allowed",
]

_ENV = "CAFFE_COMPAT_ALLOW_PYTHON_LAYERS"
_allowed = {"value": False}


def allow_python_layers(allow: bool = True) -> None:
    """Opt in (or out) to running ``Python`` layers, which execute the code a prototxt names."""
    _allowed["value"] = bool(allow)


def python_layers_allowed() -> bool:
    return _allowed["value"] or os.environ.get(_ENV, "").strip().lower() in ("1", "true", "yes", "on")


_PyBlob = PyBlob  # the earlier private name


class PyLayer:
    """pycaffe's ``caffe.Layer``: the base class of user Python layers.

    Override ``setup``, ``reshape``, ``forward`` and (to train through it) ``backward``.
    A subclass that defines ``__init__`` receives the ``LayerParameter``, as in pycaffe, and
    passes it on: ``super().__init__(param)``.
    """

    def __init__(self, param=None):
        self.blobs = BlobVec()
        self.param_str = "" if param is None else param.python_param.param_str
        self.phase = 0 if param is None else int(param.phase)

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        raise NotImplementedError("Python layer: forward() not implemented")

    def backward(self, top, propagate_down, bottom):
        pass

    def add_blob(self, *shape) -> PyBlob:
        """``self.blobs.add_blob(*shape)``, returning the new blob (pycaffe has only the former)."""
        self.blobs.add_blob(*shape)
        return self.blobs[-1]


# ---------------------------------------------------------------------------------------------
# the user's exceptions: their own type, and a PythonLayerError naming the layer


class PythonLayerError(LayerError):
    """An exception raised by a Python layer's own code.

    What reaches the caller is an instance of a class derived from both the user's exception
    type and this one, so ``except ValueError`` and ``except LayerError`` both catch it. It has
    the original's ``args`` and attributes (``errno``, the user's own) and traceback, and:
    ``layer_name``, ``layer_type`` ("Python"), ``python_layer`` ("module.Class"), ``method``
    (``setup``, ``reshape``, ``forward``, ``backward``, ``__init__``) and ``layer_context``
    (the text ``str()`` appends). Pickled, it becomes an instance of the original type.
    """

    layer_name: str = ""
    layer_type: str = "Python"
    python_layer: str = ""
    method: str = ""
    layer_context: str = ""


_ERROR_TYPES: dict[type, type | None] = {}


def _error_type(original: type[BaseException]) -> type | None:
    """The class derived from ``original`` and ``PythonLayerError`` (None: cannot be derived)."""
    if original in _ERROR_TYPES:
        return _ERROR_TYPES[original]

    def __init__(self, *args, **kwargs):
        # only used when someone builds one from a message (e.g. type(e)(text)); the layer's
        # own path copies the original's state without calling __init__
        try:
            original.__init__(self, *args, **kwargs)
        except TypeError:
            BaseException.__init__(self, *args)

    def __str__(self):
        text = original.__str__(self)
        context = self.__dict__.get("layer_context", "")
        return f"{text} ({context})" if context and context not in text else text

    def __reduce__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in _CONTEXT_FIELDS}
        return (original, self.args, state or None)

    namespace = {
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
        "__doc__": original.__doc__,
        "__init__": __init__,
        "__str__": __str__,
        "__reduce__": __reduce__,
        "original_type": original,
    }
    try:
        derived = type(original.__name__, (original, PythonLayerError), namespace)
    except TypeError:  # a final type, or one whose instance layout cannot combine with Exception's
        derived = None
    _ERROR_TYPES[original] = derived
    return derived


_CONTEXT_FIELDS = ("layer_name", "layer_type", "python_layer", "method", "layer_context")


def _user_error(e: Exception, layer_name: str, python_layer: str, method: str) -> Exception:
    """``e`` as an instance of its own type and of ``PythonLayerError`` (see the class)."""
    if isinstance(e, PythonLayerError):  # from a Python layer of a net run inside this one
        return e
    context = f"while running layer {layer_name!r} (Python: {python_layer}.{method})"
    fields = {
        "layer_name": layer_name,
        "layer_type": "Python",
        "python_layer": python_layer,
        "method": method,
        "layer_context": context,
    }
    derived = _error_type(type(e))
    if derived is not None:
        try:
            new = derived.__new__(derived, *e.args)
            new.__dict__.update(e.__dict__)
        except Exception:  # noqa: BLE001 - an exotic __new__: keep the original below
            new = None
        if new is not None:
            new.__dict__.update(fields)
            new.__cause__, new.__context__ = e.__cause__, e.__context__
            new.__suppress_context__ = e.__suppress_context__
            return new.with_traceback(e.__traceback__)
    # the type cannot be derived from: the original itself, with the context as attributes
    try:
        e.__dict__.update(fields)
    except AttributeError:  # pragma: no cover - no __dict__
        pass
    return e


class _UserCode:
    """Calls into the user's layer; an exception comes out as ``_user_error`` makes it."""

    def __init__(self, layer_name: str, python_layer: str):
        self.layer_name = layer_name
        self.python_layer = python_layer

    def __call__(self, method: str, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - every user exception, re-raised below
            err = _user_error(e, self.layer_name, self.python_layer, method)
        # raised outside the handler, so that the error's own chain stays as the user made it
        raise err


class _PyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, nparams, *inputs):
        bottoms_t = inputs[: len(inputs) - nparams]
        params_t = inputs[len(inputs) - nparams :]
        user = layer.user
        for b, t in zip(user.blobs, params_t):
            b.data = t.detach().cpu().numpy().copy()
        bottom = RawBlobVec(PyBlob(t.detach().cpu().numpy().copy()) for t in bottoms_t)
        top = RawBlobVec(PyBlob(shape=s) for s in layer._top_shapes_cache or [()] * layer.num_tops)
        layer._call_user("reshape", user.reshape, bottom, top)
        layer._call_user("forward", user.forward, bottom, top)
        ctx.layer = layer
        ctx.bottom = bottom
        ctx.top = top
        ctx.nparams = nparams
        ref = bottoms_t[0] if bottoms_t else (params_t[0] if params_t else torch.zeros(()))
        outs = tuple(torch.from_numpy(np.ascontiguousarray(t.data, np.float32)).to(ref.device) for t in top)
        return outs if len(outs) != 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *_user_backward(ctx, grads, first_bottom=2))


def _user_backward(ctx, grads, first_bottom: int) -> list:
    """The user's ``backward(top, propagate_down, bottom)`` on the context's blobs: the bottom
    gradients (None where not propagated) and the parameter gradients."""
    layer = ctx.layer
    user = layer.user
    for t, g in zip(ctx.top, grads):
        t.diff[...] = g.detach().cpu().numpy() if g is not None else 0
    for b in ctx.bottom:
        b.diff[...] = 0
    for b in user.blobs:
        b.diff[...] = 0
    nb = len(ctx.bottom)
    propagate = [bool(ctx.needs_input_grad[first_bottom + i]) for i in range(nb)]
    layer._call_user("backward", user.backward, ctx.top, propagate, ctx.bottom)
    dev = grads[0].device if grads and grads[0] is not None else torch.device("cpu")
    gb = [torch.from_numpy(b.diff.astype(np.float32)).to(dev) if p else None for b, p in zip(ctx.bottom, propagate)]
    gp = [torch.from_numpy(b.diff.astype(np.float32)).to(dev) for b in user.blobs]
    return [*gb, *gp]


class _PyBackwardOnly(torch.autograd.Function):
    """A Python layer in a backward from the blobs (``net.backward()`` without the last forward's
    graph): its tops are what the top blobs hold — the user's forward does not run again (it may
    have side effects, as Caffe's Backward never calls Forward) — and its gradient is the user's
    ``backward`` on the blobs' data and diffs."""

    @staticmethod
    def forward(ctx, layer, ntops, nparams, *inputs):
        tops_t, rest = inputs[:ntops], inputs[ntops:]
        bottoms_t = rest[: len(rest) - nparams]
        params_t = rest[len(rest) - nparams :]
        for b, t in zip(layer.user.blobs, params_t):
            b.data = t.detach().cpu().numpy().copy()
        ctx.layer = layer
        ctx.ntops = ntops
        ctx.bottom = RawBlobVec(PyBlob(t.detach().cpu().numpy().copy()) for t in bottoms_t)
        ctx.top = RawBlobVec(PyBlob(t.detach().cpu().numpy().copy()) for t in tops_t)
        outs = tuple(t.detach().clone() for t in tops_t)
        return outs if len(outs) != 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, None, *([None] * ctx.ntops), *_user_backward(ctx, grads, first_bottom=3 + ctx.ntops))


def _takes_param(init) -> bool:
    """Whether a user's ``__init__`` takes the LayerParameter (pycaffe calls ``cls(param)``)."""
    try:
        sig = inspect.signature(init)
    except (TypeError, ValueError):  # pragma: no cover - a builtin: assume pycaffe's call
        return True
    params = list(sig.parameters.values())[1:]  # after self
    for p in params:
        if p.kind in (p.VAR_POSITIONAL,):
            return True
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return True
    return False


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

    host_side_effect = "runs Python code of its own"

    @classmethod
    def implementation(cls, param) -> type[Layer]:
        """A ``(module, layer)`` of ``NATIVE_PYTHON_LAYERS``: that native class (the user's
        module is never imported), else this class."""
        pp = param.python_param
        native = NATIVE_PYTHON_LAYERS.get((pp.module, pp.layer))
        return cls if native is None else layer_class(native, param.name)

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
        _caffe.install_as_caffe()  # the user's module was written for pycaffe: `import caffe`
        try:
            mod = importlib.import_module(pp.module)
        except ImportError as e:
            raise self.error(f"cannot import python_param.module {pp.module!r}: {e}") from None
        cls = getattr(mod, pp.layer, None)
        if cls is None:
            raise self.error(f"module {pp.module!r} has no class {pp.layer!r}")
        self._call_user = _UserCode(self.name, f"{pp.module}.{pp.layer}")
        user = cls.__new__(cls)
        PyLayer.__init__(user)
        init = type(user).__init__
        if init is not PyLayer.__init__ and init is not object.__init__:
            if _takes_param(init):
                self._call_user("__init__", init, user, self.param)
            else:
                self._call_user("__init__", init, user)
            if not isinstance(getattr(user, "blobs", None), BlobVec):
                user.blobs = BlobVec(getattr(user, "blobs", None) or ())
        # what Caffe's PythonLayer::LayerSetUp sets before calling setup
        user.param_str = pp.param_str
        user.phase = self.phase
        self.user = user
        self.num_tops = len(self.param.top)
        bottom = RawBlobVec(PyBlob(shape=s) for s in bottom_shapes)
        top = RawBlobVec(PyBlob(shape=()) for _ in range(self.num_tops))
        self._call_user("setup", user.setup, bottom, top)
        self._call_user("reshape", user.reshape, bottom, top)
        self._top_shapes_cache = [t.shape for t in top]
        for b in user.blobs:
            p = self.add_blob(b.data.shape)
            with torch.no_grad():
                p.copy_(torch.from_numpy(np.asarray(b.data, np.float32)))

    def top_shapes(self, bottom_shapes):
        bottom = RawBlobVec(PyBlob(shape=s) for s in bottom_shapes)
        top = RawBlobVec(PyBlob(shape=s) for s in self._top_shapes_cache)
        self._call_user("reshape", self.user.reshape, bottom, top)
        self._top_shapes_cache = [t.shape for t in top]
        return list(self._top_shapes_cache)

    def recompute(self, bottoms, tops):
        """For a backward from the blobs: the user's backward on what the blobs hold (see
        ``_PyBackwardOnly``); the user's forward is not called again."""
        params = list(self.blobs)
        out = _PyBackwardOnly.apply(self, len(tops), len(params), *tops, *bottoms, *params)
        return out if isinstance(out, tuple) else (out,)

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
