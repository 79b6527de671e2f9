"""Net: a Caffe NetParameter interpreted into PyTorch layers, behind pycaffe's Net API.

The net is three pieces (docs/architecture.md):

- the **plan** (``caffe_compat.plan``): what Caffe's ``Net::Init`` decides — the layers filtered
  by the NetState, Split layers inserted, each layer built on its bottoms' shapes, in-place tops,
  loss weights, parameter sharing and multipliers, which layers and bottoms need a backward pass;
- the **runners** (``caffe_compat.runners``): the ways to execute the plan (eager, observed for
  callbacks and ``debug_info``, compiled, CUDA graphs); ``Net._runner`` picks one per pass;
- this **façade**: pycaffe's API over the plan's blobs (``blobs``, ``params``, ``forward``,
  ``backward``, ``reshape``, ``copy_from``, ``save``...) and the ``nn.Module`` view
  (``net.to``, ``net.parameters()``, ``net(data=tensor)``).

As in pycaffe the blobs are the state: ``forward``/``backward`` read and write them, and arrays
handed out of ``.data``/``.diff`` stay views of the blobs' storage (``caffe_compat.blob``).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import partial

import numpy as np
import torch
from torch import nn

from caffe_compat import blob as _blob
from caffe_compat import layers as _layers  # noqa: F401  (registers every layer type)
from caffe_compat import weights as _weights
from caffe_compat.blob import Blob, ParamBlob
from caffe_compat.errors import CaffeError, LayerError, NetError
from caffe_compat.mode import apply_float32_numerics, compile_enabled, current_device
from caffe_compat.plan import build_plan, filter_net, insert_splits, split_sources, state_meets_rule
from caffe_compat.proto import caffe_pb2
from caffe_compat.pycaffe_layer import LayerView
from caffe_compat.pycaffe_net import PycaffeCalls
from caffe_compat.runners import CompiledRunner, DebugRunner, PendingLoss, Runner, RunState
from caffe_compat.runners.inference import InferenceRunner

__all__ = ["Net", "PendingLoss", "filter_net", "insert_splits", "state_meets_rule", "TRAIN", "TEST"]

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


def _load_net_param(model, source_hint: str | None = None):
    from caffe_compat import io as cio

    if isinstance(model, caffe_pb2.NetParameter):
        from caffe_compat.upgrade import net_needs_upgrade, upgrade_net

        source = source_hint or "<NetParameter>"
        p = caffe_pb2.NetParameter()
        p.CopyFrom(model)
        # a NetParameter a solver (or read_net) already upgraded is not upgraded again
        return (upgrade_net(p, source) if net_needs_upgrade(p) else p), source
    path = os.fspath(model)
    return cio.read_net(path), path


class Net(PycaffeCalls, nn.Module):
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

    For solvers: ``learnable_params`` (owners, in Caffe's order) with ``params_lr`` and
    ``params_weight_decay``; ``forward_backward[_pending]()``; ``clear_param_diffs()``;
    ``share_trained_layers_with(train_net)``; ``to_proto()``; ``blob_loss_weights``.
    """

    #: A solver may lend a parameter's diff its history (``ParamDiff.lend``): every writer of a
    #: diff here asks its owner (``caffe_compat.blob.diff_owner``), which keeps that safe.
    supports_diff_alias = True

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
        self._definition = param.SerializeToString()  # what a copy is built from (``__deepcopy__``)
        self.net_param = insert_splits(filter_net(param, self.source), self.source)
        self._build()
        dev = current_device()
        self._mode_device = dev  # the global mode (set_mode_gpu/cpu) this net last followed
        if dev.type != "cpu":
            self.to(dev)
        if weights is not None:
            self.copy_from(weights)
        self.debug_info = bool(self.net_param.debug_info)
        on, options = compile_enabled()
        if on:
            self.compile(**options)

    # -----------------------------------------------------------------------------------------
    # construction

    def _build(self) -> None:
        """Build the plan (``caffe_compat.plan``) and expose it through pycaffe's names."""
        split_source = split_sources(self.net_param)
        plan = build_plan(self.net_param, self.source, self.phase, self.force_backward, split_source)
        self.plan = plan
        steps = plan.steps
        self.add_module("layers", nn.ModuleList([s.layer for s in steps]))
        self._state = RunState(plan, self.name, self.force_backward, split_source)
        for b in plan.blobs.values():
            b._exports = self._state.exported
        self._eager = InferenceRunner(self._state)  # eager, with an inference program for deploy nets
        self._debug = DebugRunner(self._state)
        self._fast: Runner = self._eager  # what whole passes use: eager, compiled or CUDA graphs
        self._layer_names = [s.name for s in steps]
        self.blobs: OrderedDict[str, Blob] = plan.blobs
        self._bottoms = [s.bottoms for s in steps]
        self._tops = [s.tops for s in steps]
        self.inputs = plan.inputs
        self.outputs = plan.outputs
        self.learnable_params: list[nn.Parameter] = [lp.param for lp in plan.learnable]
        self.params_lr: list[float] = [lp.lr_mult for lp in plan.learnable]
        self.params_weight_decay: list[float] = [lp.decay_mult for lp in plan.learnable]
        #: the Layer modules by name (what the net computes with; pycaffe sees ``layer_dict``)
        self.modules_by_name = OrderedDict((s.name, s.layer) for s in steps)
        self._layer_views = [LayerView(s.layer, partial(self._layer_blobs, s.layer)) for s in steps]
        self.layer_dict = OrderedDict(zip(self._layer_names, self._layer_views))
        self._param_blobs: dict[int, ParamBlob] = {}
        self.params: OrderedDict[str, list[ParamBlob]] = self._make_params()
        self.blob_loss_weights = OrderedDict((n, b.loss_weight) for n, b in self.blobs.items())
        self.top_names = OrderedDict(zip(self._layer_names, self._tops))
        self.bottom_names = OrderedDict(zip(self._layer_names, self._bottoms))

    @property
    def layers(self) -> list[LayerView]:
        """pycaffe's ``net.layers``: each layer with ``blobs`` as pycaffe's Blobs (the same
        objects as ``net.params[name]``); ``.module`` is the ``Layer`` itself."""
        return self._layer_views

    def _layer_blobs(self, layer) -> list[ParamBlob]:
        return [self._param_blob(p) for p in layer.blobs]

    def _make_params(self) -> OrderedDict:
        """pycaffe's ``net.params``: one ParamBlob per parameter tensor (a shared one is the same
        object under every layer that uses it)."""
        out = OrderedDict()
        for step in self.plan.steps:
            if len(step.layer.blobs):
                out[step.name] = [self._param_blob(p) for p in step.layer.blobs]
        return out

    def _param_blob(self, p: nn.Parameter) -> ParamBlob:
        pb = self._param_blobs.get(id(p))
        if pb is None or pb.param is not p:
            pb = self._param_blobs[id(p)] = ParamBlob(p)
        return pb

    # -- the run state, seen from outside ----------------------------------------------------------

    @property
    def debug_info(self) -> bool:
        """Caffe's debug_info: log every layer's mean |data| after its forward and mean |diff|
        after its backward (``NetParameter.debug_info``; a solver sets it at display iterations
        when its own ``debug_info`` is true)."""
        return self._state.debug_info

    @debug_info.setter
    def debug_info(self, on: bool) -> None:
        self._state.debug_info = bool(on)

    def set_debug_info(self, on: bool) -> None:
        """Caffe's Net::set_debug_info (what a solver does at each iteration)."""
        self._state.debug_info = bool(on)

    @property
    def _device(self) -> torch.device:
        return self._state.device

    @property
    def _dtype(self) -> torch.dtype:
        return self._state.dtype

    @property
    def _graphed(self):
        """The CUDA-graph runner (``use_cuda_graph``), or None."""
        return self._fast if self._fast.kind == "cuda_graph" else None

    @property
    def _compile_options(self) -> dict | None:
        return self._fast.options if isinstance(self._fast, CompiledRunner) and not self._fast.failed else None

    @property
    def _overwritten(self) -> bool:
        return self._state.overwritten

    @property
    def _diffs_cleared(self) -> bool:
        return self._state.diffs_cleared

    # -----------------------------------------------------------------------------------------
    # copies

    def __deepcopy__(self, memo) -> Net:
        """``copy.deepcopy(net)`` (EMA and SWA helpers, a kept best model): a second net built
        from the same definition (``Net(model, phase, level, stages)``), with copies of the
        parameters' values (shared ones shared again; not their diffs), of the blobs' shapes and
        data, the device, dtype, runner options and layer callbacks; nothing is shared with
        this net. Data layers start again from their first record, Python layers are set up
        again."""
        other = _rebuild_net(self._definition, self.source, _copy_state(self))
        other._state.before = list(self._state.before)
        other._state.after = list(self._state.after)
        memo[id(self)] = other
        return other

    def __reduce__(self):
        # pickle (``torch.save(net)``) as ``__deepcopy__`` without the callbacks; loading runs
        # the layers' setup again, so Python layers need their opt-in where it is loaded
        return (_rebuild_net, (self._definition, self.source, _copy_state(self)))

    # -----------------------------------------------------------------------------------------
    # devices

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        st = self._state
        # a probe where the net is: .to(memory_format=...) or .to(dtype) keep the device
        probe = fn(torch.zeros(1, device=st.device, dtype=st.dtype))
        if probe.device.type == "cuda":
            apply_float32_numerics()
        st.device = probe.device
        st.dtype = probe.dtype if probe.is_floating_point() else st.dtype
        st.tape = None
        for b in self.blobs.values():
            b.to(st.device, st.dtype)
        return out

    def _sync_mode(self) -> None:
        """Follow a change of the global mode (pycaffe's set_mode_gpu/cpu) since the last call;
        a net the user moved with ``.to(device)`` stays there until the mode changes."""
        dev = current_device()
        if dev != self._mode_device:
            self._mode_device = dev
            if dev != self._state.device:
                self.to(dev)

    # -----------------------------------------------------------------------------------------
    # execution

    def _runner(self, whole: bool) -> Runner:
        """The runner of a pass: the observed one while callbacks or debug_info need each layer,
        else for whole passes the net's fast runner (eager, compiled or CUDA graphs)."""
        st = self._state
        if st.before or st.after or st.debug_info:
            return self._debug
        return self._fast if whole else self._eager

    def _layer_index(self, name: str | None, default: int) -> int:
        return self.plan.step_index(name, default)

    def forward(self, blobs: list[str] | None = None, start: str | None = None, end: str | None = None, **kwargs):
        """pycaffe's ``forward``: set inputs from ``kwargs``, run layers ``start``..``end``
        (Caffe's ForwardFromTo). Returns ``{blob: ndarray}`` for the outputs (or the tops of
        ``end``) and ``blobs``."""
        if kwargs and set(kwargs) != set(self.inputs):  # pycaffe's check and words
            raise NetError(
                f"Input blob arguments do not match net inputs. (forward() of net {self.name!r} got "
                f"{sorted(kwargs)}; give exactly its inputs {list(self.inputs)})"
            )
        for name, arr in kwargs.items():
            self._set_input(name, arr)
        s = self._layer_index(start, 0)
        e = self._layer_index(end, len(self.plan.steps) - 1)
        self._sync_mode()
        self._runner(start is None and end is None).forward(s, e)
        self._state.publish()
        self._state.diffs_cleared = False
        outs = list(self._tops[e]) if end is not None else list(self.outputs)
        for b in blobs or ():
            if b not in outs:
                outs.append(b)
        return {b: self.blobs[b].data for b in outs}

    def _set_input(self, name: str, arr) -> None:
        blob = self.blobs[name]
        arr = np.asarray(arr)
        if arr.shape[:1] != blob.shape[:1]:
            raise NetError(
                f"Input is not batch sized ({name!r} has {arr.shape[0] if arr.ndim else 'no'} items, the "
                f"net's batch is {blob.shape[0] if blob.shape else 'none'}; net.blobs[{name!r}].reshape(...) "
                "first, or use forward_all)"
            )
        if tuple(arr.shape) != blob.shape:
            if arr.size == blob.count:
                arr = arr.reshape(blob.shape)
            else:
                raise NetError(
                    f"forward(): input {name!r} has shape {list(arr.shape)}, the blob is "
                    f"{list(blob.shape)}; reshape the blob first (net.blobs[{name!r}].reshape(...))"
                )
        blob.data[...] = arr

    def backward(self, diffs: list[str] | None = None, start: str | None = None, end: str | None = None, **kwargs):
        """pycaffe's ``backward``: set output diffs from ``kwargs``, backpropagate from layer
        ``start`` down to layer ``end`` (the whole net by default; Caffe's BackwardFromTo).

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
        s = self._layer_index(start, len(self.plan.steps) - 1)
        e = self._layer_index(end, 0)
        self._eager.backward(s, e, whole=start is None and end is None)
        self._state.fill_missing_diffs()
        self._state.diffs_cleared = False
        outs = list(self._bottoms[e]) if end is not None else list(self.inputs)
        for b in diffs or ():
            if b not in outs:
                outs.append(b)
        return {b: self.blobs[b].diff for b in outs}

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
        self._sync_mode()
        pending = self._runner(True).train_pass(loss_scale)
        self._state.publish()
        return pending

    def sync_host_params(self) -> None:
        """Before an update: parameter values and diffs written through ``net.params[...]`` on a
        GPU back to the device (on the CPU those are views), and the diffs a clear dropped
        present again as zeros (a diff written by hand after ``clear_param_diffs`` updates its
        parameter, the others none)."""
        if _blob.uses_host_mirror(self._state.device) and _blob.host_copies_out():
            _blob.sync_host_copies(None)
        self._state.fill_missing_diffs()

    def clear_param_diffs(self) -> None:
        """Zero every learnable blob's diff (Caffe's ClearParamDiffs).

        A diff whose NumPy view was handed out (``net.params[...][i].diff``) is zeroed in place,
        so the view sees it. Others are zeroed lazily: each ``.grad`` is dropped and comes back as
        zeros when read or after the next ``forward_backward``/``backward``, which then take
        autograd's gradient tensors as they are instead of adding them to zeros.
        """
        if _blob.uses_host_mirror(self._state.device) and _blob.host_copies_out():
            _blob.sync_host_copies(None)
        for p in self.learnable_params:
            _blob.diff_owner(p).clear()
        self._state.diffs_cleared = True

    def gradient_witness(self) -> list:
        """Per learnable parameter (``learnable_params`` order): a ``Certificate`` that its diff
        is finite, from the bounds the training passes since the last clear recorded, or None:
        read the diff itself (``caffe_compat.runners.grad_witness``; a solver's check)."""
        return self._state.witness.certificates()

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
        self._state.tape = None
        self._eager.run_differentiable()
        outs = {b: self.blobs[b]._data for b in self.outputs}
        for name, t in inputs.items():
            # the blob keeps the values, not the caller's tensor (a later pycaffe forward may
            # change a blob's requires_grad flag or write into it)
            if self.blobs[name]._data is t:
                self.blobs[name].set_tensor(t.detach().clone(), None)
        self._state.publish()
        return outs

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.run(**inputs)

    def reshape(self) -> None:
        """Propagate input shapes through the net (Caffe's Net::Reshape)."""
        for step in self.plan.steps:
            if step.is_input:
                continue
            shapes = [b.shape for b in step.bottom_blobs]
            try:
                tshapes = step.layer.top_shapes(shapes)
            except CaffeError:
                raise
            except Exception as e:
                raise LayerError(
                    f"layer {step.name!r} ({step.layer.type}): cannot reshape to bottom shapes "
                    f"{[list(s) for s in shapes]}: {e}"
                ) from e
            for blob, shp in zip(step.top_blobs, tshapes):
                if blob.shape != tuple(shp):
                    blob._shape = tuple(shp)
                    blob._data = None
        self._state.tape = None

    def set_input_arrays(self, data, labels, layer: int | str = 0) -> None:
        """pycaffe's ``set_input_arrays`` for a MemoryData layer (the first layer by default)."""
        li = layer if isinstance(layer, int) else self._layer_index(layer, 0)
        self.plan.steps[li].layer.set_input_arrays(data, labels)

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
        (self._state.before if which == 0 else self._state.after).append(fn)

    def _refuse_backward_callback(self, what: str, fn) -> None:
        if getattr(fn, "is_caffe_compat_nccl", False):
            return
        raise NetError(
            f"net {self.name!r}: {what}(fn) is not supported: caffe_compat's backward is one autograd "
            "pass, with no call between two layers' backward; use before_forward/after_forward for "
            "per-layer forward hooks, or solver.add_callback(on_start, on_gradients) to run code once "
            "the gradients are complete"
        )

    # -- opt-in speed paths ------------------------------------------------------------------------

    def compile(self, enable: bool = True, **options) -> Net:
        """Opt in to ``torch.compile`` of the net's layers (``options`` go to ``torch.compile``;
        ``caffe_compat.runners.compiled``).

        Used by ``forward_backward`` (the solvers' pass) and by ``forward()`` of the whole net
        under ``torch.no_grad``; other calls (pycaffe ``forward`` + ``backward``, ``start``/``end``,
        ``run``) stay eager. The first call compiles (seconds to minutes; a new input shape
        compiles again). If compilation fails, a warning is logged and the net runs uncompiled
        from then on. Departures: the compiled kernels may fuse and reorder float32 arithmetic
        (results agree with the uncompiled net to ~1e-5 relative, not bit for bit); Dropout
        draws its mask from the compiled code's random stream. ``net.compile(False)`` turns it
        off. Excludes ``use_cuda_graph``. Returns the net.
        """
        if enable and self._graphed is not None:
            raise NetError(f"{self.source}: CUDA graphs and Net.compile exclude each other; use one of them")
        self._fast = CompiledRunner(self._state, options) if enable else self._eager
        return self

    def disable_output_files(self, disable: bool = True) -> Net:
        """Layers that write files as they run (``HDF5Output``) write nothing (``disable``) or
        write again: for tools that run a net only to look at it or time it (``caffe time``), so
        that the files the net names are never created, truncated or appended to. Returns the net."""
        for layer in self.modules_by_name.values():
            layer.writes_files = not disable
        return self

    def use_inference_program(self, enable: bool = True) -> Net:
        """Whole forward passes of a net that computes no gradient run on the CPU as an inference
        program (the default: packed oneDNN convolutions with the in-place BatchNorm/Scale/ReLU
        after them folded in; ``caffe_compat.runners.inference``), which agrees with the
        layer-by-layer pass to float32 rounding. ``enable=False`` runs every layer's own forward,
        as the other runners do. Returns the net."""
        self._eager.program_enabled = bool(enable)
        return self

    def use_channels_last_training(self, enable: bool = True) -> Net:
        """Training passes on the CPU in float32 hand the convolutions channels-last bottoms and
        keep that layout through the layers that take it (the default: oneDNN convolves them
        without reordering, ResNet-50's forward+backward in ~0.86 of the time), which agrees
        with the contiguous pass to float32 rounding; every blob pycaffe reads is C-contiguous.
        ``enable=False`` keeps every tensor contiguous. Returns the net."""
        self._eager.trains_channels_last = bool(enable)
        return self

    def use_cuda_graph(self, enable: bool = True, warmup: int = 2, graph_factory=None) -> Net:
        """Opt-in, on a GPU: ``forward_backward`` (and a solver's training passes) and whole
        ``forward()`` passes replayed from CUDA graphs, recorded once, instead of running each
        layer's Python every pass. At small batches the host's Python bounds a pass on a GPU;
        the graph removes it. The first ``warmup`` passes run eagerly, the next one captures;
        after a new input shape or parameter storage one pass runs eagerly and the next captures
        again. The kernels are the eager pass's (the same float32 values), except Dropout's
        masks (the graph's own random offsets). Conditions and details:
        ``caffe_compat.runners.cuda_graph``; a layer the graph cannot replay raises ``NetError``
        here. ``graph_factory``: a stand-in for ``torch.cuda.CUDAGraph`` (the CPU tests).
        Excludes ``compile``. Returns the net.
        """
        if not enable:
            self._fast = self._eager
            return self
        if self._compile_options is not None:
            raise NetError(f"{self.source}: CUDA graphs and Net.compile exclude each other; use one of them")
        from caffe_compat.runners.cuda_graph import GraphRunner

        self._fast = GraphRunner(self._state, warmup, graph_factory)
        return self

    # -----------------------------------------------------------------------------------------
    # weights

    def copy_from(self, path) -> None:
        """Load weights by layer name (Caffe's CopyTrainedLayersFrom; .caffemodel or .h5).

        Layers absent from this net are skipped; a blob count or shape mismatch raises, naming
        the layer, the blob index and both shapes.
        """
        from caffe_compat import io as cio

        path = os.fspath(path)
        cio.check_regular_file(path, "Caffe weights (.caffemodel or .caffemodel.h5)")  # a FIFO must not block
        if path.endswith(".h5"):
            _weights.copy_from_hdf5(self.modules_by_name, path)
        else:
            _weights.copy_from_proto(self.modules_by_name, cio.read_caffemodel(path), path)
        self._state.tape = None

    def copy_from_proto(self, src, source: str = "<NetParameter>") -> None:
        _weights.copy_from_proto(self.modules_by_name, src, source)
        self._state.tape = None

    def load_hdf5(self, path) -> None:
        """pycaffe's ``Net.load_hdf5``: copy weights from Caffe's HDF5 format (``save_hdf5``),
        whatever the file's extension (Caffe's CopyTrainedLayersFromHDF5)."""
        from caffe_compat import io as cio

        path = os.fspath(path)
        cio.check_regular_file(path, "Caffe HDF5 weights")
        _weights.copy_from_hdf5(self.modules_by_name, path)

    def share_trained_layers_with(self, other: Net) -> None:
        """Use ``other``'s parameter tensors for layers of the same name (Caffe's ShareTrainedLayersWith)."""
        for name, layer in other.modules_by_name.items():
            if name not in self.modules_by_name or not len(layer.blobs):
                continue
            mine = self.modules_by_name[name]
            if len(mine.blobs) != len(layer.blobs):
                raise NetError(f"layer {name!r}: {len(mine.blobs)} blobs here, {len(layer.blobs)} in the trained net")
            for k, p in enumerate(layer.blobs):
                if tuple(p.shape) != tuple(mine.blobs[k].shape):
                    raise NetError(
                        f"layer {name!r} blob {k}: shape {list(mine.blobs[k].shape)} here, "
                        f"{list(p.shape)} in the trained net"
                    )
                mine.blobs[k] = p
        self.params = self._make_params()

    def share_with(self, other: Net) -> None:
        """pycaffe's ``Net.share_with``: use ``other``'s trained parameters for the layers of the
        same name (``share_trained_layers_with``)."""
        self.share_trained_layers_with(other)

    def to_proto(self, write_diff: bool = False):
        """The net as Caffe's Net::ToProto writes it (every layer with its blobs)."""
        return _weights.to_proto(self.name, self.modules_by_name.values(), write_diff)

    def save(self, path, write_diff: bool = False) -> None:
        """Write the weights as a binary .caffemodel (atomically), as pycaffe's ``net.save``."""
        from caffe_compat import io as cio

        cio.write_caffemodel(self.to_proto(write_diff), os.fspath(path))

    def save_hdf5(self, path, write_diff: bool = False) -> None:
        """Write the weights in Caffe's HDF5 format (Net::ToHDF5), atomically."""
        _weights.save_hdf5(path, self._layer_names, self.modules_by_name.values(), write_diff)

    def __repr__(self) -> str:
        return f"Net({self.name!r}, {len(self.plan.steps)} layers, phase={'TRAIN' if self.phase == TRAIN else 'TEST'})"


def _copy_state(net: Net) -> dict:
    """What a copy of ``net`` takes over (``Net.__deepcopy__``, pickling): parameter values in
    layer order, blob shapes and data, device, dtype and runner options."""
    st = net._state
    graphed = net._graphed
    with torch.no_grad():
        return {
            "params": [_blob.raw_data(p).clone() for layer in net.modules_by_name.values() for p in layer.blobs],
            "blobs": {n: b._data.detach().clone() for n, b in net.blobs.items() if b._data is not None},
            "shapes": {n: b._shape for n, b in net.blobs.items()},
            "device": st.device,
            "dtype": st.dtype,
            "mode_device": net._mode_device,
            "program": net._eager.program_enabled,
            "channels_last_training": net._eager.trains_channels_last,
            "debug_info": st.debug_info,
            "compile": net._compile_options,
            "cuda_graph": (graphed.warmup, graphed.graph_factory) if graphed is not None else None,
        }


def _rebuild_net(definition: bytes, source: str, state: dict) -> Net:
    """The copy ``Net.__deepcopy__`` / unpickling makes (see there)."""
    param = caffe_pb2.NetParameter()
    param.ParseFromString(definition)
    net = Net(param)
    net.source = source
    dst = [p for layer in net.modules_by_name.values() for p in layer.blobs]
    src = state["params"]
    if len(dst) != len(src) or any(d.shape != s.shape for d, s in zip(dst, src)):
        raise NetError(
            f"{source}: the copy's learnable blobs differ from the original's (a layer whose setup "
            "makes other blobs, e.g. a Python layer): build the net again and copy_from its weights"
        )
    net.to(device=state["device"], dtype=state["dtype"])
    net._mode_device = state["mode_device"]
    with torch.no_grad():
        for d, s in zip(dst, src):
            d.copy_(s)
    for name, shape in state["shapes"].items():
        net.blobs[name]._shape = shape
    for name, t in state["blobs"].items():
        net.blobs[name]._data = t.to(net._state.device)
    net._eager.program_enabled = state["program"]
    net._eager.trains_channels_last = state["channels_last_training"]
    net._state.debug_info = state["debug_info"]
    options = state["compile"]
    net.compile(options is not None, **(options or {}))  # (also off where the global switch is on)
    if state["cuda_graph"] is not None:
        net.use_cuda_graph(True, *state["cuda_graph"])
    return net
