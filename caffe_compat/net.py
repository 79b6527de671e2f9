"""Net: a Caffe NetParameter interpreted into PyTorch layers, with pycaffe's Net API.

What the net does, in Caffe's order (BVLC/caffe src/caffe/net.cpp ``Init``):

1. filter layers by the NetState (phase, level, stages) and NetStateRules;
2. insert Caffe's implicit ``Split`` layers where a blob feeds several layers, named
   ``<blob>_<producer>_<top index>_split`` with tops ``..._split_<k>``;
3. build each layer from its parameters and its bottoms' shapes (shape inference), wire
   in-place layers (top name == bottom name at the same index), give each top its loss weight
   (loss layers default to 1 on top 0), resolve parameter sharing through ``ParamSpec.name`` and
   each learnable blob's ``lr_mult`` / ``decay_mult``;
4. decide which layers and bottoms need a backward pass exactly as Caffe does (blobs that need
   a gradient, ``propagate_down``, layers that do not contribute to the loss, ``force_backward``).

Forward runs the layers in order on torch tensors, recording autograd's graph; backward is one
autograd call from the net's outputs (seeded with their diffs: the loss weight for loss blobs)
to the blobs and parameters whose diffs Caffe would compute. Bottoms that Caffe would not
backpropagate to are detached, so the same diffs come out. An in-place blob's diff is the
gradient at its first producer, which is what Caffe leaves in the shared memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _module_mod

from caffe_compat import blob as _blob
from caffe_compat import layers as _layers  # noqa: F401  (registers every layer type)
from caffe_compat.blob import Blob, ParamBlob
from caffe_compat.errors import CaffeError, LayerError, NetError
from caffe_compat.layers import loss as _loss_layers
from caffe_compat.mode import apply_float32_numerics, autocast_dtype, compile_enabled, current_device
from caffe_compat.plan import build_plan
from caffe_compat.proto import caffe_pb2

__all__ = ["Net", "PendingLoss", "filter_net", "insert_splits", "state_meets_rule", "TRAIN", "TEST"]

log = logging.getLogger("caffe_compat")

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# NetParameter transformations (pure functions on protos)


def state_meets_rule(state, rule) -> bool:
    """Caffe's StateMeetsRule: phase, min/max level, every stage, no not_stage."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def filter_net(param, source: str = "<net>"):
    """Caffe's FilterNet: keep the layers whose include/exclude rules admit ``param.state``."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    for lp in param.layer:
        if len(lp.include) and len(lp.exclude):
            raise NetError(f"{source}: layer {lp.name!r}: specify either include rules or exclude rules, not both")
        included = len(lp.include) == 0
        for rule in lp.exclude:
            if state_meets_rule(param.state, rule):
                included = False
        for rule in lp.include:
            if state_meets_rule(param.state, rule):
                included = True
        if included:
            out.layer.add().CopyFrom(lp)
    return out


def _split_layer_name(layer_name: str, blob_name: str, top_idx: int) -> str:
    return f"{blob_name}_{layer_name}_{top_idx}_split"


def _split_sources(param) -> dict[str, str]:
    """The blob each top of an inserted Split layer copies (``label_data_1_split_0`` -> ``label``),
    so that messages name the blob the user wrote."""
    return {
        t: lp.bottom[0]
        for lp in param.layer
        # an inserted split is named after its bottom, producer and top index (_split_layer_name)
        if lp.type == "Split"
        and len(lp.bottom) == 1
        and lp.name.startswith(f"{lp.bottom[0]}_")
        and lp.name.endswith("_split")
        for t in lp.top
    }


def insert_splits(param, source: str = "<net>"):
    """Caffe's InsertSplits: a Split layer after every top that feeds more than one consumer.

    A top with a non-zero ``loss_weight`` counts as one extra consumer; its weight moves to the
    split's first top.
    """
    last_top: dict[str, tuple[int, int]] = {}
    source_of: dict[tuple[int, int], tuple[int, int]] = {}
    consumers: dict[tuple[int, int], int] = {}
    loss_weight: dict[tuple[int, int], float] = {}
    for i, lp in enumerate(param.layer):
        for j, b in enumerate(lp.bottom):
            if b not in last_top:
                raise NetError(f"{source}: Unknown bottom blob {b!r} (layer {lp.name!r}, bottom index {j})")
            src = last_top[b]
            source_of[(i, j)] = src
            consumers[src] = consumers.get(src, 0) + 1
        for j, t in enumerate(lp.top):
            last_top[t] = (i, j)
        for j in range(min(len(lp.loss_weight), len(lp.top))):
            w = lp.loss_weight[j]
            loss_weight[(i, j)] = w
            if w:
                consumers[(i, j)] = consumers.get((i, j), 0) + 1

    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    next_split: dict[tuple[int, int], int] = {}
    for i, lp in enumerate(param.layer):
        nl = out.layer.add()
        nl.CopyFrom(lp)
        for j, b in enumerate(lp.bottom):
            src = source_of[(i, j)]
            if consumers.get(src, 0) > 1:
                k = next_split.get(src, 0)
                next_split[src] = k + 1
                producer = param.layer[src[0]].name
                nl.bottom[j] = f"{_split_layer_name(producer, b, src[1])}_{k}"
        for j, t in enumerate(lp.top):
            n = consumers.get((i, j), 0)
            if n <= 1:
                continue
            w = loss_weight.get((i, j), 0.0)
            sp = out.layer.add()
            sp.name = _split_layer_name(lp.name, t, j)
            sp.type = "Split"
            sp.bottom.append(t)
            for k in range(n):
                sp.top.append(f"{sp.name}_{k}")
                if w:
                    sp.loss_weight.append(w if k == 0 else 0.0)
            if w:
                del nl.loss_weight[:]
                next_split[(i, j)] = next_split.get((i, j), 0) + 1
    return out


def _load_net_param(model, source_hint: str | None = None):
    from caffe_compat import io as cio

    if isinstance(model, caffe_pb2.NetParameter):
        p = caffe_pb2.NetParameter()
        p.CopyFrom(model)
        from caffe_compat.upgrade import upgrade_net

        return upgrade_net(p, source_hint or "<NetParameter>"), source_hint or "<NetParameter>"
    path = os.fspath(model)
    return cio.read_net(path), path


# ---------------------------------------------------------------------------------------------


class PendingLoss:
    """The loss of a queued training pass (``Net.forward_backward_pending``): ``value()`` reads
    it — exactly, as a Python float — and raises for a bad label the pass's loss layers recorded
    (naming layer, bottom and value) before returning. On a CPU, or with nothing deferred and a
    loss on the CPU, the read is immediate; on a GPU the values travel to pinned host memory
    behind the pass, and ``value()`` waits for that copy only."""

    __slots__ = ("_net", "_checks", "_value", "_host", "_event")

    def __init__(self, net: Net, loss: torch.Tensor | float, checks: list):
        self._net, self._checks, self._value, self._event = net, checks, None, None
        self._host = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)
        device = self._host.device if isinstance(self._host, torch.Tensor) else net._device
        if device.type == "cuda":
            # the loss into pinned memory behind the pass (the loss layers copied their labels as
            # they went), and an event on the net's stream to wait for these copies alone
            if isinstance(self._host, torch.Tensor):
                self._host = self._host.to("cpu", non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(device))

    def value(self) -> float:
        if self._value is None:
            if self._event is not None:
                self._event.synchronize()
            checks, self._checks, self._event = self._checks, [], None
            self._net._verify_labels(checks)
            self._value = float(self._host)  # exact: float32/64 -> double
        return self._value


def fmt(x) -> str:
    """A number as Caffe's log prints it (caffe_compat.solvers.log.fmt; imported late: the
    solvers package imports this module)."""
    from caffe_compat.solvers.log import fmt as _fmt

    return _fmt(x)


def _abs_mean(t) -> np.float32:
    """Caffe's ``asum / count`` of a blob's data or diff, in float32."""
    if t is None or t.numel() == 0:
        return np.float32(0)
    t = t.detach()
    return np.float32(np.float32(t.abs().sum(dtype=torch.float32).item()) / np.float32(t.numel()))


class Net(nn.Module):
    """A Caffe net. pycaffe's API plus ``torch.nn.Module``.

    ``Net(model, phase)``, ``Net(model, weights, phase)`` or keywords ``weights=``, ``phase=``;
    ``model`` is a prototxt path or a ``NetParameter``. ``phase`` is ``caffe_compat.TRAIN`` or
    ``TEST``; when omitted the NetParameter's own ``state`` decides (TEST by default).
    ``level`` and ``stages`` complete the NetState as in Caffe.

    pycaffe: ``blobs``, ``params``, ``layers``, ``layer_dict``, ``inputs``, ``outputs``,
    ``top_names``, ``bottom_names``, ``_layer_names``, ``forward``, ``backward``, ``reshape``,
    ``copy_from``, ``save``, ``set_input_arrays``, ``before_forward``, ``after_forward``.

    PyTorch: ``net(data=tensor, ...)`` (``run``) returns the output tensors with autograd's graph;
    ``net.parameters()``, ``net.to(device)`` as for any module.
    """

    #: A solver may leave a parameter's diff as an alias of its history (``blob.alias_diff``):
    #: every path here that writes into a diff or hands it out calls ``blob.own_diff`` first.
    supports_diff_alias = True
    #: pycaffe's per-layer forward callbacks: (before, after) lists of fn(layer index), or None
    _layer_callbacks: tuple[list, list] | None = None
    #: ``use_cuda_graph``'s runner (caffe_compat.cuda_graph.GraphedPass), or None: eager passes
    _graphed = None
    #: the last pass was a forward replayed from a CUDA graph (no autograd graph for backward())
    _graph_forward = False
    #: Caffe's debug_info: log every layer's mean |data| after its forward and mean |diff| after
    #: its backward (``NetParameter.debug_info``; a solver sets it at display iterations when its
    #: own ``debug_info`` is true). Bottoms seen by the last forward, for the backward's log.
    debug_info: bool = False
    _debug_bottoms: dict | None = None

    def __init__(
        self,
        model,
        *args,
        weights: str | None = None,
        phase: int | None = None,
        level: int = 0,
        stages: Iterable[str] = (),
    ):
        super().__init__()
        # pycaffe's positional forms: Net(model, phase) and Net(model, weights, phase)
        if len(args) == 1:
            if isinstance(args[0], (str, os.PathLike)):
                weights = args[0]
            else:
                phase = args[0]
        elif len(args) == 2:
            weights, phase = args
        elif len(args) > 2:
            raise TypeError("Net(model, [weights,] phase): too many positional arguments")

        param, self.source = _load_net_param(model)
        if phase is not None:
            if phase not in (TRAIN, TEST):
                raise NetError(f"{self.source}: phase must be caffe_compat.TRAIN or TEST, got {phase!r}")
            param.state.phase = phase
        if level:
            param.state.level = level
        for s in stages:
            param.state.stage.append(s)
        self.phase = param.state.phase
        self.name = param.name
        self.force_backward = param.force_backward
        self.net_param = insert_splits(filter_net(param, self.source), self.source)
        self._split_source = _split_sources(self.net_param)
        self._build()
        dev = current_device()
        self._mode_device = dev  # the global mode (set_mode_gpu/cpu) this net last followed
        if dev.type != "cpu":
            self.to(dev)
        if weights is not None:
            self.copy_from(weights)
        self._compile_options: dict | None = None
        self._compiled_fn = None
        self.debug_info = bool(self.net_param.debug_info)
        on, options = compile_enabled()
        if on:
            self.compile(**options)

    # -----------------------------------------------------------------------------------------
    # construction

    def _build(self) -> None:
        """Build the plan (``caffe_compat.plan``) and expose it through pycaffe's names."""
        plan = build_plan(self.net_param, self.source, self.phase, self.force_backward, self._split_source)
        self.plan = plan
        steps = plan.steps
        self.add_module("layers", nn.ModuleList([s.layer for s in steps]))
        self._layer_list = [s.layer for s in steps]
        self._layer_names = [s.name for s in steps]
        self.blobs: OrderedDict[str, Blob] = plan.blobs
        self._exported_blobs: list[Blob] = []
        for b in plan.blobs.values():
            b._exports = self._exported_blobs
        self._bottoms = [s.bottoms for s in steps]
        self._tops = [s.tops for s in steps]
        self.inputs = plan.inputs
        self.outputs = plan.outputs
        self._layer_need_backward = [s.need_backward for s in steps]
        self._bottom_need_backward = [s.bottom_need_backward for s in steps]
        self._param_need_backward = [[p.need_backward for p in s.params] for s in steps]
        self._needs_grad_bottom = [s.grad_bottoms for s in steps]
        self._input_needs_grad = plan.input_needs_grad
        self.learnable_params: list[nn.Parameter] = [lp.param for lp in plan.learnable]
        self.params_lr: list[float] = [lp.lr_mult for lp in plan.learnable]
        self.params_weight_decay: list[float] = [lp.decay_mult for lp in plan.learnable]
        self._learnable_layer_of = [(lp.layer_name, lp.index) for lp in plan.learnable]
        self._diffs_cleared = False
        self._overwritten = False
        self._tape = False  # the blobs hold the autograd graph of a whole forward() (backward may use it)
        self._inplace_inputs: dict[int, list] = {}  # in-place layers' bottoms as the last forward read them
        self._recomputed = plan.recomputed
        self.layer_dict = OrderedDict(zip(self._layer_names, self._layer_list))
        self._param_blobs: dict[int, ParamBlob] = {}
        self.params: OrderedDict[str, list[ParamBlob]] = self._make_params()
        self.blob_loss_weights = OrderedDict((n, b.loss_weight) for n, b in self.blobs.items())
        self.top_names = OrderedDict(zip(self._layer_names, self._tops))
        self.bottom_names = OrderedDict(zip(self._layer_names, self._bottoms))
        self._device = torch.device("cpu")
        self._dtype = torch.float32

    def _make_params(self) -> OrderedDict:
        """pycaffe's ``net.params``: one ParamBlob per parameter tensor (a shared one is the same
        object under every layer that uses it)."""
        out = OrderedDict()
        for name, layer in zip(self._layer_names, self._layer_list):
            if len(layer.blobs):
                out[name] = [self._param_blob(p) for p in layer.blobs]
        return out

    def _param_blob(self, p: nn.Parameter) -> ParamBlob:
        pb = self._param_blobs.get(id(p))
        if pb is None or pb.param is not p:
            pb = self._param_blobs[id(p)] = ParamBlob(p)
        return pb

    # -----------------------------------------------------------------------------------------
    # devices

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        # a probe where the net is: .to(memory_format=...) or .to(dtype) keep the device
        probe = fn(torch.zeros(1, device=self._device, dtype=self._dtype))
        if probe.device.type == "cuda":
            apply_float32_numerics()
        self._device = probe.device
        self._dtype = probe.dtype if probe.is_floating_point() else self._dtype
        for b in self.blobs.values():
            b.to(self._device, self._dtype)
        return out

    def _readable(self, message: str) -> str:
        """``message`` with the inserted Split layers' top names replaced by the blobs they copy."""
        for top, blob in self._split_source.items():
            if repr(top) in message:
                message = message.replace(repr(top), repr(blob))
        return message

    def _readable_error(self, e: CaffeError) -> CaffeError:
        message = self._readable(str(e))
        return e if message == str(e) else type(e)(message).with_traceback(e.__traceback__)

    def _sync_mode(self) -> None:
        """Follow a change of the global mode (pycaffe's set_mode_gpu/cpu) since the last call;
        a net the user moved with ``.to(device)`` stays there until the mode changes."""
        dev = current_device()
        if dev != self._mode_device:
            self._mode_device = dev
            if dev != self._device:
                self.to(dev)

    # -----------------------------------------------------------------------------------------
    # execution

    def _layer_index(self, name: str | None, default: int) -> int:
        if name is None:
            return default
        try:
            return self._layer_names.index(name)
        except ValueError:
            raise NetError(f"{self.source}: no layer named {name!r}") from None

    def _run_layers(self, start: int, end: int, caffe_grads: bool = True, overwrite: bool = False) -> None:
        """Run layers ``start``..``end``.

        ``overwrite``: in-place layers that can (``forward_inplace``, e.g. ReLU) write into their
        bottom's tensor when it was made in this pass by a layer whose backward does not need its
        output (``top_overwritable``: Convolution, InnerProduct). Without autograd this is always
        safe; with autograd (``forward_backward``) it only loses the diffs of such blobs, which
        ``forward_backward`` does not compute.
        """
        grad_on = torch.is_grad_enabled()
        overwrite = overwrite or not grad_on
        # autocast's bf16/fp16 tops stay so (autocast exists for CPU and CUDA devices only)
        low = self._device.type in ("cpu", "cuda") and torch.is_autocast_enabled(self._device.type)
        fresh: set[str] = set()  # blobs whose tensor a top_overwritable layer made in this pass
        # Module.__call__ only when someone hooked a module: otherwise forward directly (cheaper)
        hooked = bool(_module_mod._global_forward_hooks or _module_mod._global_forward_pre_hooks)
        dev, dtype = self._device, self._dtype
        overwrote = False  # set on self once, after the loop (Module.__setattr__ is slow)
        callbacks = self._layer_callbacks
        debug = self.debug_info
        if debug:
            self._debug_bottoms = {}
        steps = self.plan.steps
        keep_inplace = self._inplace_inputs
        for li in range(start, end + 1):
            step = steps[li]
            if callbacks is not None:
                for fn in callbacks[0]:
                    fn(li)
            if step.is_input:  # a net input: set by the caller
                if debug:
                    self._forward_debug_info(li)
                if callbacks is not None:
                    for fn in callbacks[1]:
                        fn(li)
                continue
            layer, bnames, bblobs, tnames, tblobs = (
                step.layer,
                step.bottoms,
                step.bottom_blobs,
                step.tops,
                step.top_blobs,
            )
            needs_grad, inplace_tops, can_inplace, overwritable = (
                step.grad_bottoms,
                step.inplace,
                step.can_inplace,
                step.overwritable,
            )
            bottoms = []
            detached = False
            for j, blob in enumerate(bblobs):
                t = blob._data
                if t is None or t.shape != blob._shape:  # Blob.tensor's check, inlined (hot loop)
                    t = blob.tensor
                if grad_on and t.requires_grad:
                    if caffe_grads:
                        if not needs_grad[j]:
                            t = t.detach()
                            detached = True
                    elif (len(layer.param.propagate_down) and not layer.param.propagate_down[j]) or (
                        not layer.allow_force_backward(j)
                    ):
                        t = t.detach()
                        detached = True
                bottoms.append(t)
            if step.any_inplace:  # what Caffe's in-place layers keep of their bottom for backward
                keep_inplace[li] = bottoms
            inplace = overwrite and can_inplace and not detached and bnames[0] in fresh
            overwritable = overwrite and overwritable
            try:
                if inplace:
                    fresh.discard(bnames[0])
                    overwrote = overwrote or grad_on
                    tops = layer.forward_inplace(*bottoms)
                elif hooked or layer._forward_hooks or layer._forward_pre_hooks:
                    tops = layer(*bottoms)
                else:
                    tops = layer.forward(*bottoms)
            except CaffeError as e:
                raise self._readable_error(e) from None
            except Exception as e:
                raise LayerError(
                    f"{e} (while running layer {self._layer_names[li]!r} ({layer.type}) with bottom "
                    f"shapes {[list(t.shape) for t in bottoms]})"
                ) from e
            for j, blob in enumerate(tblobs):
                top = tops[j]
                if top.device != dev or (
                    top.dtype is not dtype and top.is_floating_point() and not (low and top.dtype in _LOW_PRECISION)
                ):
                    # data layers produce their batches on the CPU, in float32
                    top = top.to(dev, dtype, non_blocking=True)
                    tops = (*tops[:j], top, *tops[j + 1 :])
                blob._data = top  # Blob.set_tensor, inlined (hot loop)
                if top.shape != blob._shape:
                    blob._shape = tuple(top.shape)
                if inplace_tops[j]:
                    fresh.discard(tnames[j])
                else:
                    blob._grad_tensor = top
                    if overwritable:
                        fresh.add(tnames[j])
                    else:
                        fresh.discard(tnames[j])
            if debug:
                self._debug_bottoms[li] = bottoms
                self._forward_debug_info(li)
            if callbacks is not None:
                for fn in callbacks[1]:
                    fn(li)
        if overwrote:
            self._overwritten = True

    def _prepare_inputs(self, whole: bool = True) -> None:
        """Before a pass: host copies back to the device, the inputs' autograd flags set.
        ``whole``: the pass runs every layer (the blobs it computes need no copy back)."""
        self._sync_mode()
        grad_on = torch.is_grad_enabled()
        if _blob.uses_host_mirror(self._device) and _blob.host_copies_out():
            _blob.sync_host_copies("data", recomputed=self._recomputed if whole else ())
        self._tape = False
        for blob in self._exported_blobs:  # what views wrote since the last pass is what layers read
            store = blob._store
            # (a tensor made since the store last mirrored it, e.g. by a data layer, is newer)
            if store is not None and blob._data is blob._synced and store.shape == blob._shape:
                blob._data = blob._synced = store
        for b in self.inputs:
            blob = self.blobs[b]
            t = blob.tensor
            if t.grad_fn is not None:  # an in-place layer wrote into this input last time
                t = t.detach()
                blob._data = t
            want = grad_on and self._input_needs_grad[b]
            if t.requires_grad != want:
                t.requires_grad_(want)
            blob._grad_tensor = t
        if self._graph_forward:
            self._graph_forward = False

    def _loss(self) -> torch.Tensor | float:
        """Σ loss_weight · Σ(blob) over the blobs with a loss weight (0.0 if none); a single
        scalar loss of weight 1 is returned as it is (no extra autograd nodes)."""
        loss = 0.0
        for b in self.blobs.values():
            if b.loss_weight and b._data is not None:
                t = b._data.float() if b._data.dtype in _LOW_PRECISION else b._data
                term = t if t.dim() == 0 else t.sum()
                if b.loss_weight != 1.0:
                    term = b.loss_weight * term
                loss = term if isinstance(loss, float) else loss + term
        return loss

    def forward(self, blobs: list[str] | None = None, start: str | None = None, end: str | None = None, **kwargs):
        """pycaffe's ``forward``: set inputs from ``kwargs``, run layers ``start``..``end``.

        Returns ``{blob: ndarray}`` for the outputs (or the tops of ``end``) and ``blobs``.
        """
        for name, arr in kwargs.items():
            if name not in self.blobs:
                raise NetError(f"forward(): {name!r} is not a blob of net {self.name!r}")
            blob = self.blobs[name]
            arr = np.asarray(arr)
            if tuple(arr.shape) != blob.shape:
                if arr.size == blob.count and arr.shape[:1] == blob.shape[:1]:
                    arr = arr.reshape(blob.shape)
                else:
                    raise NetError(
                        f"forward(): input {name!r} has shape {list(arr.shape)}, the blob is "
                        f"{list(blob.shape)}; reshape the blob first (net.blobs[{name!r}].reshape(...))"
                    )
            blob.data[...] = arr
        s = self._layer_index(start, 0)
        e = self._layer_index(end, len(self.layers) - 1)
        graphed, named = self._graphed, start is not None or end is not None
        if graphed is not None and not named and not graphed.runs_eagerly():
            graphed.check_call(1.0)
            graphed.forward(lambda: self._eager_forward(s, e, named))
        else:
            self._eager_forward(s, e, named)
        self._publish()
        self._diffs_cleared = False
        outs = list(self._tops[e]) if end is not None else list(self.outputs)
        for b in blobs or ():
            if b not in outs:
                outs.append(b)
        return {b: self.blobs[b].data for b in outs}

    def _eager_forward(self, s: int, e: int, named: bool) -> None:
        """``forward``'s pass over layers ``s``..``e``, layer by layer (or compiled when no
        ``start``/``end`` was ``named``)."""
        self._prepare_inputs(whole=s == 0 and e == len(self.layers) - 1)
        self._overwritten = False
        if (
            self._compile_options is not None
            and self._layer_callbacks is None  # per-layer callbacks need the layer-by-layer pass
            and not self.debug_info
            and not torch.is_grad_enabled()
            and not named
        ):
            self._run_compiled()
            self._verify_compiled_checks()
        else:
            self._run_layers(s, e)
            # a whole pass with autograd: its graph serves backward() until a blob changes
            if torch.is_grad_enabled() and s == 0 and e == len(self.layers) - 1:
                self._tape = [(b, b._data, b._data._version) for b in self.blobs.values() if b._data is not None]

    def _publish(self) -> None:
        """After a pass: the blobs whose data views were handed out get the pass's values."""
        for blob in self._exported_blobs:
            blob.publish()

    def _batch(self, inputs: dict[str, np.ndarray]):
        """Split ``{name: N x ...}`` into batches of the blobs' batch size, the last one padded
        with zeros (pycaffe's ``Net._batch``)."""
        first = next(iter(inputs))
        batch_size = self.blobs[first].shape[0]
        n = len(inputs[first])
        for name, arr in inputs.items():
            if len(arr) != n:
                raise NetError(f"{name!r} has {len(arr)} items, {first!r} has {n}: give every input the same count")
        for start in range(0, n, batch_size):
            batch = {}
            for name, arr in inputs.items():
                chunk = np.asarray(arr[start : start + batch_size])
                if len(chunk) < batch_size:
                    pad = np.zeros((batch_size - len(chunk),) + chunk.shape[1:], dtype=chunk.dtype)
                    chunk = np.concatenate([chunk, pad])
                batch[name] = chunk
            yield batch

    def forward_all(self, blobs: list[str] | None = None, **kwargs) -> dict[str, np.ndarray]:
        """pycaffe's ``forward_all``: ``forward`` over inputs of any length, in batches of the
        net's batch size; returns ``{blob: N x ...}`` for the outputs and ``blobs``. With no
        inputs, one plain ``forward`` (the net's data layers feed it)."""
        names = list(dict.fromkeys(list(self.outputs) + list(blobs or [])))
        if not kwargs:
            outs = self.forward(blobs=list(blobs or []))
            return {k: np.array(outs[k], copy=True) for k in names}
        collected: dict[str, list[np.ndarray]] = {k: [] for k in names}
        for batch in self._batch(kwargs):
            outs = self.forward(blobs=list(blobs or []), **batch)
            for k in names:
                collected[k].extend(np.array(outs[k], copy=True))
        n = len(next(iter(kwargs.values())))
        return {k: np.asarray(v)[:n] for k, v in collected.items()}

    def forward_backward_all(
        self, blobs: list[str] | None = None, diffs: list[str] | None = None, **kwargs
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """pycaffe's ``forward_backward_all``: inputs (named after ``inputs``) and output diffs
        (named after ``outputs``) of any length, in batches; returns ``(outs, diffs)``."""
        fwd = {k: v for k, v in kwargs.items() if k in self.inputs}
        bwd = {k: v for k, v in kwargs.items() if k in self.outputs}
        out_names = list(dict.fromkeys(list(self.outputs) + list(blobs or [])))
        diff_names = list(dict.fromkeys(list(self.inputs) + list(diffs or [])))
        outs_all: dict[str, list[np.ndarray]] = {k: [] for k in out_names}
        diffs_all: dict[str, list[np.ndarray]] = {k: [] for k in diff_names}
        fb = self._batch(fwd) if fwd else iter(lambda: {}, None)
        bb = self._batch(bwd) if bwd else iter(lambda: {}, None)
        n = len(next(iter(fwd.values()))) if fwd else (len(next(iter(bwd.values()))) if bwd else 1)
        batches = -(-n // self.blobs[(list(fwd) or list(bwd) or self.inputs)[0]].shape[0])
        for _, f, b in zip(range(batches), fb, bb):
            o = self.forward(blobs=list(blobs or []), **f)
            d = self.backward(diffs=list(diffs or []), **b)
            for k in out_names:
                outs_all[k].extend(np.array(o[k], copy=True))
            for k in diff_names:
                diffs_all[k].extend(np.array(d[k], copy=True))
        return (
            {k: np.asarray(v)[:n] for k, v in outs_all.items()},
            {k: np.asarray(v)[:n] for k, v in diffs_all.items()},
        )

    def _forward_loss(self) -> torch.Tensor | float:
        self._prepare_inputs()
        self._overwritten = False
        if self._compile_options is None or self._layer_callbacks is not None or self.debug_info:
            # debug_info logs each layer's bottom diff: every layer keeps its own bottom tensor
            self._run_layers(0, len(self.layers) - 1, overwrite=not self.debug_info)
        else:
            self._run_compiled()
        return self._loss()

    # -- Caffe's debug_info ------------------------------------------------------------------------

    def set_debug_info(self, on: bool) -> None:
        """Caffe's Net::set_debug_info (what a solver does at each iteration)."""
        on = bool(on)
        if self.debug_info is not on:  # a solver calls it every iteration: no Module.__setattr__ then
            self.debug_info = on

    def _param_display_name(self, li: int, k: int) -> str:
        specs = self.layers[li].param.param
        return specs[k].name if k < len(specs) and specs[k].name else str(k)

    def _forward_debug_info(self, li: int) -> None:
        """Caffe's ForwardDebugInfo: mean |value| of each top, then of each parameter blob."""
        name = self._layer_names[li]
        for b in self._tops[li]:
            log.info("    [Forward] Layer %s, top blob %s data: %s", name, b, fmt(_abs_mean(self.blobs[b]._data)))
        for k, p in enumerate(self.layers[li].blobs):
            log.info(
                "    [Forward] Layer %s, param blob %s data: %s",
                name,
                self._param_display_name(li, k),
                fmt(_abs_mean(p)),
            )

    def _backward_with_debug_info(self, loss: torch.Tensor, params: list) -> None:
        """The backward of a training pass, logging Caffe's BackwardDebugInfo for each layer from
        the last to the first: the mean |diff| of every bottom it backpropagates to (the gradient
        of the tensor that layer read, so in-place chains show each step) and of each parameter
        it learns. The parameter gradients go to the diffs as in the plain backward."""
        bottoms, where = [], []
        for li, ts in self._debug_bottoms.items():
            for j, t in enumerate(ts):
                if self._layer_need_backward[li] and self._bottom_need_backward[li][j] and t.requires_grad:
                    where.append((li, j, len(bottoms)))
                    bottoms.append(t)
        grads = torch.autograd.grad([loss], bottoms + params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads[len(bottoms) :]):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        diff_of = {(li, j): grads[i] for li, j, i in where}
        for li in range(len(self.layers) - 1, -1, -1):
            if not self._layer_need_backward[li] or li not in self._debug_bottoms:
                continue
            name, layer = self._layer_names[li], self.layers[li]
            for j, b in enumerate(self._bottoms[li]):
                if not self._bottom_need_backward[li][j]:
                    continue
                g = diff_of.get((li, j))
                mean = _abs_mean(g) if g is not None else 0.0
                log.info("    [Backward] Layer %s, bottom blob %s diff: %s", name, b, fmt(mean))
            for k, p in enumerate(layer.blobs):
                if not (layer.blobs_have_gradient and self._param_need_backward[li][k]):
                    continue
                mean = _abs_mean(p.grad) if p.grad is not None else 0.0
                log.info("    [Backward] Layer %s, param blob %d diff: %s", name, k, fmt(mean))

    def _all_params_debug_info(self) -> None:
        """Caffe's Backward(): L1 and L2 norms of all learnable parameters' data and diffs."""
        f32 = np.float32
        asum_data = asum_diff = sumsq_data = sumsq_diff = f32(0)
        for p in self.learnable_params:
            d = p.detach().float()
            g = p.grad.detach().float() if p.grad is not None else torch.zeros_like(d)
            asum_data = f32(asum_data + f32(d.abs().sum().item()))
            asum_diff = f32(asum_diff + f32(g.abs().sum().item()))
            sumsq_data = f32(sumsq_data + f32((d * d).sum().item()))
            sumsq_diff = f32(sumsq_diff + f32((g * g).sum().item()))
        log.error(
            "    [Backward] All net params (data, diff): L1 norm = (%s, %s); L2 norm = (%s, %s)",
            fmt(asum_data),
            fmt(asum_diff),
            fmt(np.sqrt(sumsq_data)),
            fmt(np.sqrt(sumsq_diff)),
        )

    # -- pycaffe's per-layer callbacks -----------------------------------------------------------

    def before_forward(self, fn: Callable[[int], None]) -> None:
        """pycaffe's ``Net.before_forward``: call ``fn(i)`` before layer ``i`` runs, in every
        forward pass (net inputs included, as Caffe calls it for its Input layers). The net then
        runs layer by layer even when compiled."""
        self._add_layer_callback(0, fn)

    def after_forward(self, fn: Callable[[int], None]) -> None:
        """pycaffe's ``Net.after_forward``: call ``fn(i)`` after layer ``i`` has run (its tops are
        set), in every forward pass."""
        self._add_layer_callback(1, fn)

    def before_backward(self, fn) -> None:
        """pycaffe's ``Net.before_backward``: not available (see ``after_backward``)."""
        self._refuse_backward_callback("before_backward", fn)

    def after_backward(self, fn) -> None:
        """pycaffe's ``Net.after_backward``. An ``NCCL`` object (``solver.net.after_backward(nccl)``
        for Caffe's ``layer_wise_reduce``) is accepted: its solver already reduces each bucket of
        gradients as soon as the backward pass has produced it. A function of the layer index is
        refused: the backward pass is one autograd pass over the net, with no point between two
        layers' backward to call it at; ``solver.add_callback(on_start, on_gradients)`` runs code
        once the gradients are complete."""
        self._refuse_backward_callback("after_backward", fn)

    def _add_layer_callback(self, which: int, fn) -> None:
        if not callable(fn):
            raise NetError(f"net {self.name!r}: a layer callback must be a function of the layer index, got {fn!r}")
        if self._layer_callbacks is None:
            self._layer_callbacks = ([], [])
        self._layer_callbacks[which].append(fn)

    def _refuse_backward_callback(self, what: str, fn) -> None:
        if getattr(fn, "is_caffe_compat_nccl", False):
            return
        raise NetError(
            f"net {self.name!r}: {what}(fn) is not supported: caffe_compat's backward is one autograd "
            "pass, with no call between two layers' backward; use before_forward/after_forward for "
            "per-layer forward hooks, or solver.add_callback(on_start, on_gradients) to run code once "
            "the gradients are complete"
        )

    # -- opt-in torch.compile ------------------------------------------------------------------

    def compile(self, enable: bool = True, **options) -> Net:
        """Opt in to ``torch.compile`` of the net's layers (``options`` go to ``torch.compile``).

        Used by ``forward_backward`` (the solvers' pass) and by ``forward()`` of the whole net
        under ``torch.no_grad``; other calls (pycaffe ``forward`` + ``backward``, ``start``/``end``,
        ``run``) stay eager. Layers without bottoms (data layers, Input) run eagerly first, the rest
        as one compiled function of their input blobs; every blob is still set after the pass.
        The first call compiles (seconds to minutes; a new input shape compiles again). If
        compilation fails, a warning is logged and the net runs uncompiled from then on.
        Departures: the compiled kernels may fuse and reorder float32 arithmetic (results agree
        with the uncompiled net to ~1e-5 relative, not bit for bit); Dropout draws its mask from
        the compiled code's random stream; after a compiled ``forward_backward`` call
        ``forward()`` before ``backward()`` (as after the in-place pass).
        ``net.compile(False)`` turns it off. Returns the net.
        """
        self._compile_options = dict(options) if enable else None
        self._compiled_fn = None
        return self

    def use_cuda_graph(self, enable: bool = True, warmup: int = 2, graph_factory=None) -> Net:
        """Opt-in, on a GPU: ``forward_backward`` (and a solver's training passes) and whole
        ``forward()`` passes replayed from CUDA graphs, recorded once, instead of running each
        layer's Python every pass (``backward()`` right after a replayed ``forward()`` raises). At
        small batches the host's Python bounds a pass on a GPU; the graph removes it. The first
        ``warmup`` passes run eagerly, the next one captures; after a new input shape or
        parameter storage one pass runs eagerly and the next captures again. The kernels are the eager pass's (the same float32 values),
        except Dropout's masks (the graph's own random offsets). Conditions and details:
        ``caffe_compat.cuda_graph``; a layer the graph cannot replay raises ``NetError`` here.
        ``graph_factory``: a stand-in for ``torch.cuda.CUDAGraph`` (the CPU tests). Returns the net.
        """
        if enable:
            from caffe_compat.cuda_graph import GraphedPass

            self._graphed = GraphedPass(self, warmup, graph_factory)
        else:
            self._graphed = None
        return self

    def _first_compiled_layer(self) -> int:
        k = 0
        while k < len(self.layers) and not self._bottoms[k]:
            k += 1
        return k

    def _compiled_layers(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        env = dict(feeds)
        grad_on = torch.is_grad_enabled()
        out = {}
        for li in range(self._first_compiled_layer(), len(self.layers)):
            bottoms = []
            for j, b in enumerate(self._bottoms[li]):
                t = env[b]
                bottoms.append(t.detach() if grad_on and not self._needs_grad_bottom[li][j] else t)
            tops = self.layers[li](*bottoms)
            for j, name in enumerate(self._tops[li]):
                env[name] = out[name] = tops[j]
        return out

    def _run_compiled(self) -> None:
        """One pass through the compiled layers; if compiling fails, a warning, the rest of this
        pass eagerly and the net uncompiled from then on."""
        k = self._first_compiled_layer()
        if k:
            self._run_layers(0, k - 1, overwrite=True)
        if self._compiled_fn is None:
            made: set[str] = set()
            self._compiled_feeds = []
            for li in range(k, len(self.layers)):
                self._compiled_feeds += [
                    b for b in self._bottoms[li] if b not in made and b not in self._compiled_feeds
                ]
                made.update(self._tops[li])
            self._compiled_fn = torch.compile(self._compiled_layers, **self._compile_options)
        feeds = {b: self.blobs[b].tensor for b in self._compiled_feeds}
        _loss_layers._net_compiles = True
        try:
            tops = self._compiled_fn(feeds)
        except Exception as e:  # noqa: BLE001  (any compiler failure: fall back to eager)
            log.warning(
                "torch.compile of net %r failed (%s: %s); running it uncompiled", self.name, type(e).__name__, e
            )
            self._compile_options = None
            self._compiled_fn = None
            if k < len(self.layers):
                self._run_layers(k, len(self.layers) - 1, overwrite=True)
            return
        finally:
            _loss_layers._net_compiles = False
        dev = self._device
        for name, t in tops.items():
            if t.device != dev:  # pragma: no cover
                t = t.to(dev)
            self.blobs[name].set_tensor(t, t)
        if torch.is_grad_enabled():
            self._overwritten = True
        # the loss layers' label ranges, computed in the graph: copied to the host behind the pass
        self._compiled_checks = []
        for layer in self.layers[k:]:
            recorded = layer.__dict__.pop("_label_range", None)
            if recorded is not None:
                values, classes = recorded
                self._compiled_checks.append((layer, values.to("cpu", non_blocking=True, copy=True), classes, None))

    def _verify_compiled_checks(self) -> None:
        """Raise for a bad label of the last compiled pass (waiting for the copies first)."""
        checks, self._compiled_checks = getattr(self, "_compiled_checks", []), []
        if checks and self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()
        self._verify_labels(checks)

    def _verify_labels(self, checks: list) -> None:
        """Raise for the first bad label in the loss layers' records (host copies, complete)."""
        try:
            _loss_layers.verify_deferred(checks)
        except CaffeError as e:
            raise self._readable_error(e) from None

    def backward(self, diffs: list[str] | None = None, start: str | None = None, end: str | None = None, **kwargs):
        """pycaffe's ``backward``: set output diffs from ``kwargs``, backpropagate from layer
        ``start`` down to layer ``end`` (the whole net by default).

        As in Caffe, it is a function of what the blobs hold now: each layer's backward reads its
        bottoms' and tops' data and its tops' diffs, writes its bottoms' diffs (set, not
        accumulated) and adds into its parameters' diffs. When the last ``forward()`` ran the
        whole net under autograd and no blob was written since, its graph is used (one autograd
        call); otherwise each layer's forward is recomputed from the blobs (``Layer.recompute``:
        the last forward's Dropout masks and BatchNorm statistics) and differentiated.
        Returns ``{blob: diff ndarray}`` for the inputs (or the bottoms of ``end``) and ``diffs``.
        """
        for name, arr in kwargs.items():
            if name not in self.outputs:
                raise NetError(f"backward(): {name!r} is not an output of net {self.name!r}")
            self.blobs[name].diff[...] = np.asarray(arr).reshape(self.blobs[name].shape)
        s = self._layer_index(start, len(self.layers) - 1)
        e = self._layer_index(end, 0)
        mirrored = _blob.uses_host_mirror(self._device) and _blob.host_copies_out()
        if mirrored:
            _blob.sync_host_copies("diff")
        if start is None and end is None and self._tape_usable():
            self._backward_on_tape()
        else:
            if mirrored:  # (data written on the host since: the graph, which keeps it, is not used)
                _blob.sync_host_copies("data")
            self._backward_from_blobs(s, e)
        self._fill_missing_diffs()
        self._diffs_cleared = False
        outs = list(self._bottoms[e]) if end is not None else list(self.inputs)
        for b in diffs or ():
            if b not in outs:
                outs.append(b)
        return {b: self.blobs[b].diff for b in outs}

    def _tape_usable(self) -> bool:
        """Whether the autograd graph of the last forward still describes the blobs."""
        if not self._tape or self._overwritten or self._graph_forward:
            return False
        # a blob's tensor replaced or written in place since (e.g. a host copy sent back)
        if any(b._data is not t or t._version != v for b, t, v in self._tape):
            return False
        return not any(b.written_since_pass() for b in self._exported_blobs)

    def _backward_on_tape(self) -> None:
        """The whole backward as one autograd call over the last forward's graph, seeded with the
        outputs' diffs (the loss weight for loss blobs)."""
        root_names = [o for o in self.outputs if self.force_backward or self.blobs[o].loss_weight]
        # loss-weighted tops consumed by later layers (rare: Split takes them otherwise)
        root_names += [b for b, blob in self.blobs.items() if blob.loss_weight and b not in root_names]
        roots, grads = [], []
        for b in root_names:
            blob = self.blobs[b]
            t = blob._data
            if t is None or not t.requires_grad:
                continue
            roots.append(t)
            grads.append(blob.diff_tensor.to(t.dtype))
        targets, target_blobs = [], []
        for blob in self.blobs.values():
            gt = blob._grad_tensor
            if gt is not None and gt.requires_grad:
                targets.append(gt)
                target_blobs.append(blob)
        params = [p for p in self.learnable_params if p.requires_grad]
        if not roots or not (targets or params):
            return
        gs = torch.autograd.grad(roots, targets + params, grads, allow_unused=True, retain_graph=True)
        for blob, g in zip(target_blobs, gs[: len(targets)]):
            if g is not None:
                blob.set_diff(g)
        self._add_param_grads(params, gs[len(targets) :])

    @staticmethod
    def _add_param_grads(params: list, grads) -> None:
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    _blob.own_diff(p)
                    if p.grad is None:
                        p.grad = torch.zeros_like(p.data)
                    p.grad.add_(g)

    def _backward_from_blobs(self, start: int, end: int) -> None:
        """Caffe's BackwardFromTo over the blobs: layers ``start`` down to ``end``, each
        recomputed from its bottoms' current data under autograd and differentiated against its
        tops' current diffs (see ``backward``)."""
        steps = self.plan.steps
        with torch.enable_grad():
            for li in range(start, end - 1, -1):
                step = steps[li]
                if step.need_backward and not step.is_input:
                    self._backward_step(step)

    def _backward_step(self, step) -> None:
        layer, want = step.layer, step.grad_bottoms
        params = [p for p in layer.blobs if p.requires_grad]
        if not any(want) and not params:
            return
        kept = self._inplace_inputs.get(step.index) if step.any_inplace else None
        bottoms = []
        for j, blob in enumerate(step.bottom_blobs):
            x = None
            if kept is not None and step.bottoms[j] in step.tops and tuple(kept[j].shape) == blob.shape:
                x = kept[j]  # Caffe's in-place layers keep what they read (BatchNorm, Scale)
            x = (x if x is not None else blob.current()).detach()
            bottoms.append(x.requires_grad_() if want[j] else x)
        top_diffs = [b.diff_tensor for b in step.top_blobs]
        try:
            tops = layer.recompute(bottoms, [b.current().detach() for b in step.top_blobs])
        except CaffeError as e:
            raise self._readable_error(e) from None
        except Exception as e:
            raise LayerError(f"{e} (while running layer {step.name!r} ({layer.type}) backward)") from e
        roots, seeds = [], []
        for t, d in zip(tops, top_diffs):
            if t.requires_grad:
                roots.append(t)
                seeds.append(d.to(t.dtype))
        targets = [x for x, w in zip(bottoms, want) if w] + params
        gs = torch.autograd.grad(roots, targets, seeds, allow_unused=True) if roots else [None] * len(targets)
        k = 0
        for j, blob in enumerate(step.bottom_blobs):
            if want[j]:
                g = gs[k]
                k += 1
                blob.set_diff(g if g is not None else torch.zeros(blob.shape, dtype=blob._dtype, device=self._device))
        self._add_param_grads(params, gs[k:])

    def forward_backward(self, loss_scale: float = 1.0) -> float:
        """Caffe's ForwardBackward for solvers: forward with the loss, backward into param diffs.

        Parameter gradients accumulate into each learnable blob's ``.grad`` (its diff).
        Under ``caffe_compat.mode.set_precision("bf16"|"fp16")`` the forward runs in
        ``torch.autocast`` (float32 parameters and diffs; the net's outputs are made float32
        again). ``loss_scale``: backpropagate ``loss_scale * loss`` (fp16 loss scaling; the
        solver unscales); the returned loss is unscaled.
        """
        return self.forward_backward_pending(loss_scale).value()

    def forward_backward_pending(self, loss_scale: float = 1.0) -> PendingLoss:
        """``forward_backward`` whose loss is read later: on a GPU the pass is only queued, and
        the loss value (with the loss layers' deferred label checks) is copied to the host
        asynchronously; ``.value()`` waits for that copy alone, not for work queued after the
        pass. A solver reads it one iteration late, so the GPU never waits for the host.
        After ``use_cuda_graph()`` the pass is replayed from a CUDA graph."""
        graphed = self._graphed
        if graphed is not None:
            graphed.check_call(loss_scale)
            if not graphed.runs_eagerly():
                pending = graphed.forward_backward(lambda: self._eager_forward_backward(loss_scale))
                self._publish()
                return pending
        return self._eager_forward_backward(loss_scale)

    def _eager_forward_backward(self, loss_scale: float) -> PendingLoss:
        low = autocast_dtype()
        # on a GPU the loss layers' label checks are read back with the loss (one synchronisation
        # per pass, at its end, made by PendingLoss.value()); the compiled path's graph computes
        # the label ranges as tensors, collected after it
        defer = _loss_layers.deferred_label_checks() if self._compile_options is None else contextlib.nullcontext()
        with torch.enable_grad(), defer as checks:
            if low is None:
                loss = self._forward_loss()
            else:
                with torch.autocast(self._device.type, dtype=low):
                    loss = self._forward_loss()
                for o in self.outputs:  # pycaffe's .data cannot show bf16
                    b = self.blobs[o]
                    if b._data is not None and b._data.dtype in _LOW_PRECISION:
                        b.set_tensor(b._data.float())
            params = [p for p in self.learnable_params if p.requires_grad]
            if isinstance(loss, torch.Tensor) and loss.requires_grad and params:
                for p in params:
                    if self._diffs_cleared and not _blob.diff_is_exported(p):
                        # Let autograd hand over its gradient tensors instead of adding them to zeros.
                        p.grad = None
                    else:  # autograd adds into the diffs in place
                        _blob.own_diff(p)
                scaled = loss * loss_scale if loss_scale != 1.0 else loss
                if self.debug_info and self._debug_bottoms is not None:
                    self._backward_with_debug_info(scaled, params)
                else:
                    torch.autograd.backward([scaled], inputs=params)
        self._fill_missing_diffs()
        self._publish()
        if self.debug_info:
            self._all_params_debug_info()
        self._diffs_cleared = False
        if checks is None:  # the compiled path: the ranges its graph computed
            checks, self._compiled_checks = getattr(self, "_compiled_checks", []), []
        return PendingLoss(self, loss, checks)

    def sync_host_params(self) -> None:
        """Send parameter values and diffs written through ``net.params[...]`` on a GPU back to
        the device (a no-op on the CPU, where those are views)."""
        if _blob.uses_host_mirror(self._device) and _blob.host_copies_out():
            _blob.sync_host_copies(None)

    def clear_param_diffs(self) -> None:
        """Zero every learnable blob's diff (Caffe's ClearParamDiffs).

        A diff whose NumPy view was handed out (``net.params[...][i].diff``) is zeroed in place,
        so the view sees it. Others are zeroed lazily: each ``.grad`` is dropped and comes back as
        zeros when read or after the next ``forward_backward``/``backward``, which then take
        autograd's gradient tensors as they are instead of adding them to zeros.
        """
        self.sync_host_params()
        for p in self.learnable_params:
            _blob.clear_diff(p)
        self._diffs_cleared = True

    def _fill_missing_diffs(self) -> None:
        for p in self.learnable_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p.data)

    def run(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable forward for PyTorch users: input tensors in, output tensors out.

        Every input that requires grad gets gradients through the whole net (as with
        ``force_backward``), except where the prototxt sets ``propagate_down: false`` or into
        loss layers' labels.
        """
        self._sync_mode()
        for name, t in inputs.items():
            if name not in self.blobs:
                raise NetError(f"run(): {name!r} is not a blob of net {self.name!r}")
            self.blobs[name].set_tensor(t, t)
        for b in self.inputs:
            if b not in inputs:
                self.blobs[b].sync_to_device("data")
        self._run_layers(0, len(self.layers) - 1, caffe_grads=False)
        outs = {b: self.blobs[b]._data for b in self.outputs}
        for name, t in inputs.items():
            # the blob keeps the values, not the caller's tensor (a later pycaffe forward may
            # change a blob's requires_grad flag or write into it)
            if self.blobs[name]._data is t:
                self.blobs[name].set_tensor(t.detach().clone(), None)
        return outs

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.run(**inputs)

    def reshape(self) -> None:
        """Propagate input shapes through the net (Caffe's Net::Reshape)."""
        for li, layer in enumerate(self.layers):
            if getattr(layer, "is_net_input", False):
                continue
            shapes = [self.blobs[b].shape for b in self._bottoms[li]]
            try:
                tshapes = layer.top_shapes(shapes)
            except CaffeError:
                raise
            except Exception as e:
                raise LayerError(
                    f"layer {self._layer_names[li]!r} ({layer.type}): cannot reshape to bottom shapes "
                    f"{[list(s) for s in shapes]}: {e}"
                ) from e
            for t, shp in zip(self._tops[li], tshapes):
                blob = self.blobs[t]
                if blob.shape != tuple(shp):
                    blob._shape = tuple(shp)
                    blob._data = None

    def set_input_arrays(self, data, labels, layer: int | str = 0) -> None:
        """pycaffe's ``set_input_arrays`` for a MemoryData layer (the first layer by default)."""
        li = layer if isinstance(layer, int) else self._layer_index(layer, 0)
        target = self.layers[li]
        if not hasattr(target, "set_input_arrays"):
            raise NetError(
                f"set_input_arrays(): layer {self._layer_names[li]!r} ({target.type}) is not a MemoryData layer"
            )
        target.set_input_arrays(data, labels)

    # -----------------------------------------------------------------------------------------
    # weights

    def copy_from(self, path) -> None:
        """Load weights by layer name (Caffe's CopyTrainedLayersFrom; .caffemodel or .h5).

        Layers absent from this net are skipped; a blob count or shape mismatch raises, naming
        the layer, the blob index and both shapes.
        """
        from caffe_compat import io as cio

        path = os.fspath(path)
        if path.endswith(".h5"):
            self._copy_from_hdf5(path)
            return
        src = cio.read_caffemodel(path)
        self.copy_from_proto(src, path)

    def copy_from_proto(self, src, source: str = "<NetParameter>") -> None:
        from caffe_compat import io as cio

        layers = src.layer
        for lp in layers:
            if lp.name not in self.layer_dict:
                log.info("Ignoring source layer %s", lp.name)
                continue
            target = self.layer_dict[lp.name]
            if len(lp.blobs) != len(target.blobs):
                raise NetError(
                    f"{source}: layer {lp.name!r}: the weights have {len(lp.blobs)} blob(s), the net's "
                    f"layer has {len(target.blobs)}: incompatible number of blobs"
                )
            for k, bp in enumerate(lp.blobs):
                arr = cio.blob_to_array(bp)
                p = target.blobs[k]
                if not _shapes_match(bp, arr.shape, tuple(p.shape)):
                    raise NetError(
                        f"{source}: cannot copy param {k} weights from layer {lp.name!r}; shape mismatch. "
                        f"Source param shape is {list(arr.shape)}; target param shape is "
                        f"{list(p.shape)}. To learn this layer's parameters from scratch rather than "
                        f"copying from a saved net, rename the layer."
                    )
                with torch.no_grad():
                    p.data.copy_(torch.from_numpy(np.ascontiguousarray(arr).reshape(tuple(p.shape))))

    def _copy_from_hdf5(self, path: str) -> None:
        import h5py

        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise NetError(f"{path}: cannot be read as Caffe HDF5 weights ({e})") from None
        with f:
            if "data" not in f:
                raise NetError(f"{path}: not a Caffe HDF5 weights file (no 'data' group)")
            g = f["data"]
            for lname in g:
                if lname not in self.layer_dict:
                    log.info("Ignoring source layer %s", lname)
                    continue
                target = self.layer_dict[lname]
                lg = g[lname]
                if len(lg) == 0:
                    continue
                if len(lg) > len(target.blobs):
                    raise NetError(
                        f"{path}: layer {lname!r}: {len(lg)} blob(s) in the file, {len(target.blobs)} in the net"
                    )
                for k in range(len(target.blobs)):
                    if str(k) not in lg:  # a shared parameter, written under its owner
                        continue
                    arr = np.asarray(lg[str(k)])
                    p = target.blobs[k]
                    if arr.size != p.numel():
                        raise NetError(
                            f"{path}: layer {lname!r} blob {k}: shape {list(arr.shape)} in the file, "
                            f"{list(p.shape)} in the net"
                        )
                    with torch.no_grad():
                        p.data.copy_(torch.from_numpy(arr.astype(np.float32).reshape(tuple(p.shape))))

    def share_trained_layers_with(self, other: Net) -> None:
        """Use ``other``'s parameter tensors for layers of the same name (Caffe's ShareTrainedLayersWith)."""
        for name, layer in other.layer_dict.items():
            if name not in self.layer_dict or not len(layer.blobs):
                continue
            mine = self.layer_dict[name]
            if len(mine.blobs) != len(layer.blobs):
                raise NetError(f"layer {name!r}: {len(mine.blobs)} blobs here, {len(layer.blobs)} in the trained net")
            for k, p in enumerate(layer.blobs):
                if tuple(p.shape) != tuple(mine.blobs[k].shape):
                    raise NetError(
                        f"layer {name!r} blob {k}: shape {list(mine.blobs[k].shape)} here, "
                        f"{list(p.shape)} in the trained net"
                    )
                mine.blobs[k] = p
        self.params = OrderedDict(
            (n, [ParamBlob(p) for p in layer.blobs])
            for n, layer in zip(self._layer_names, self.layers)
            if len(layer.blobs)
        )

    def share_with(self, other: Net) -> None:
        """pycaffe's ``Net.share_with``: use ``other``'s trained parameters for the layers of the
        same name (``share_trained_layers_with``)."""
        self.share_trained_layers_with(other)

    def load_hdf5(self, path) -> None:
        """pycaffe's ``Net.load_hdf5``: copy weights from Caffe's HDF5 format (``save_hdf5``),
        whatever the file's extension (Caffe's CopyTrainedLayersFromHDF5)."""
        self._copy_from_hdf5(os.fspath(path))

    # -- pycaffe's index-based internals (scripts written against _caffe use them) -------------

    @property
    def _blob_names(self) -> list[str]:
        return list(self.blobs)

    @property
    def _blob_loss_weights(self) -> list[float]:
        return [self.blobs[b].loss_weight for b in self.blobs]

    def _blob_ids(self, names) -> list[int]:
        index = {b: i for i, b in enumerate(self.blobs)}
        return [index[b] for b in names]

    @property
    def _inputs(self) -> list[int]:
        return self._blob_ids(self.inputs)

    @property
    def _outputs(self) -> list[int]:
        return self._blob_ids(self.outputs)

    def _bottom_ids(self, i: int) -> list[int]:
        return self._blob_ids(self._bottoms[i])

    def _top_ids(self, i: int) -> list[int]:
        return self._blob_ids(self._tops[i])

    def _forward(self, start: int, end: int) -> float:
        """Caffe's ForwardFromTo(start, end) by layer index; returns the loss of those layers."""
        self.forward(start=self._layer_names[start], end=self._layer_names[end])
        loss = 0.0
        for li in range(start, end + 1):
            for b in self._tops[li]:
                weight = self.blobs[b].loss_weight
                if weight:
                    loss += weight * float(np.sum(self.blobs[b].data))
        return loss

    def _backward(self, start: int, end: int) -> None:
        """Caffe's BackwardFromTo(start, end) by layer index (``start`` >= ``end``)."""
        self.backward(start=self._layer_names[start], end=self._layer_names[end])

    def _set_input_arrays(self, data, labels) -> None:
        self.set_input_arrays(data, labels)

    def to_proto(self, write_diff: bool = False):
        """The net as Caffe's Net::ToProto writes it: every layer (splits and inputs included)
        with its parameters and blobs (``shape`` + float ``data``)."""
        from caffe_compat import io as cio

        out = caffe_pb2.NetParameter()
        out.name = self.name
        for layer in self.layers:
            nl = out.layer.add()
            nl.CopyFrom(layer.param)
            del nl.blobs[:]
            for p in layer.blobs:
                diff = None
                if write_diff:
                    diff = (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu().numpy()
                nl.blobs.add().CopyFrom(cio.array_to_blob(p.detach().cpu().numpy(), diff))
        return out

    def save(self, path, write_diff: bool = False) -> None:
        """Write the weights as a binary .caffemodel (atomically), as pycaffe's ``net.save``."""
        from caffe_compat import io as cio

        cio.write_caffemodel(self.to_proto(write_diff), os.fspath(path))

    def save_hdf5(self, path, write_diff: bool = False) -> None:
        """Write the weights in Caffe's HDF5 format (Net::ToHDF5): a group ``data/<layer>`` for
        every layer, holding datasets ``0, 1, ...`` for the parameters the layer owns (a shared
        parameter is written once, under its owner); ``diff/...`` alike when ``write_diff``."""
        from caffe_compat.solvers.state import atomic_h5_write

        def fill(f) -> None:
            written: set[int] = set()
            g = f.create_group("data")
            gd = f.create_group("diff") if write_diff else None
            for name, layer in zip(self._layer_names, self.layers):
                lg = g.create_group(name)
                dg = gd.create_group(name) if gd is not None else None
                for k, p in enumerate(layer.blobs):
                    if id(p) in written:
                        continue
                    written.add(id(p))
                    lg.create_dataset(str(k), data=p.detach().cpu().numpy())
                    if dg is not None:
                        grad = p.grad if p.grad is not None else torch.zeros_like(p)
                        dg.create_dataset(str(k), data=grad.detach().cpu().numpy())

        atomic_h5_write(path, fill)

    def __repr__(self) -> str:
        return f"Net({self.name!r}, {len(self.layers)} layers, phase={'TRAIN' if self.phase == TRAIN else 'TEST'})"


def _shapes_match(bp, src_shape: tuple, dst_shape: tuple) -> bool:
    if tuple(src_shape) == tuple(dst_shape):
        return True
    legacy = any(bp.HasField(f) for f in ("num", "channels", "height", "width"))
    if legacy and len(dst_shape) <= 4:
        padded = (1,) * (4 - len(dst_shape)) + tuple(dst_shape)
        return tuple(src_shape) == padded
    return False
