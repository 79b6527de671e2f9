"""What every runner shares: the net's run state, the pass's bookkeeping, the interface.

A runner executes a :class:`~caffe_compat.plan.Plan` over its blobs. The interface is small:

- ``forward(start, end)``: Caffe's ``ForwardFromTo`` — compute the blobs of steps ``start`` to
  ``end`` (pycaffe's ``net.forward``; under autograd when grad mode is on);
- ``train_pass(loss_scale)``: a solver's pass — forward with the loss, backward into the
  learnable parameters' diffs; returns a :class:`PendingLoss`;
- ``backward(start, end)``: Caffe's ``BackwardFromTo`` over what the blobs hold (the tape of the
  last whole forward when it still describes them, else each layer recomputed from its bottoms).

Each runner owns its modes: autocast, capture, and how the layers that read class labels check
their range during its passes (``label_checks``: it hands them a ``LabelChecks`` for the pass and
takes back what they recorded), so that no module global changes what a layer does.

``RunState`` is the one object a runner and the ``Net`` façade share: the plan, where the net
lives, pycaffe's per-layer callbacks, and what the last pass left (the tape, whether in-place
layers overwrote blobs). A runner reads and writes it and the blobs; it never sees the ``Net``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from caffe_compat import blob as _blob
from caffe_compat.errors import CaffeError, LayerError
from caffe_compat.layers import loss as _loss_layers
from caffe_compat.layers.base import LabelChecks
from caffe_compat.plan import Plan, readable
from caffe_compat.runners.grad_witness import GradientWitness

__all__ = ["RunState", "Runner", "PendingLoss", "LOW_PRECISION"]

LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class RunState:
    """The execution state of one net (see the module's doc)."""

    plan: Plan
    name: str
    force_backward: bool
    split_source: dict[str, str]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    #: pycaffe's before_forward / after_forward callbacks: fn(layer index)
    before: list = field(default_factory=list)
    after: list = field(default_factory=list)
    #: Caffe's debug_info: per-layer mean |data| after forward, |diff| after backward
    debug_info: bool = False
    #: the next training pass may take autograd's gradients as they are (the diffs were cleared)
    diffs_cleared: bool = False
    #: the last pass let in-place layers overwrite blobs it read (forward_backward)
    overwritten: bool = False
    #: the last forward was replayed from a CUDA graph (no autograd graph)
    graph_forward: bool = False
    #: (blob, tensor, version) of every blob after a whole forward under autograd, or None
    tape: list | None = None
    #: blobs the inference runner left in channels-last layout (made contiguous before any
    #: other pass reads them: ``prepare_inputs``)
    channels_last: list = field(default_factory=list)
    #: (parameter, version) of the learnable parameters when the tape was kept
    tape_params: list = field(default_factory=list)
    #: in-place layers' bottoms as the last forward read them (Caffe's layers keep them)
    inplace_inputs: dict[int, list] = field(default_factory=dict)
    #: blobs whose data views were handed out (kept current after each pass)
    exported: list = field(default_factory=list)
    #: the training passes' gradient witnesses (``caffe_compat.runners.grad_witness``)
    witness: GradientWitness | None = None

    def __post_init__(self) -> None:
        if self.witness is None:
            self.witness = GradientWitness(self.plan)

    @property
    def source(self) -> str:
        return self.plan.source

    def readable_error(self, e: CaffeError) -> CaffeError:
        """``e`` with inserted Split tops named after the blobs they copy."""
        message = readable(str(e), self.split_source)
        return e if message == str(e) else type(e)(message).with_traceback(e.__traceback__)

    def forward_error(self, step, bottoms: list, e: Exception) -> Exception:
        """What a layer's forward that raised ``e`` raises from a runner's loop: a ``CaffeError``
        readable (``readable_error``), anything else as a ``LayerError`` naming the layer and its
        bottom shapes. (A Python layer's own exception is re-raised as it is, by the caller.)"""
        if isinstance(e, CaffeError):
            return self.readable_error(e)
        return LayerError(
            f"{e} (while running layer {step.name!r} ({step.layer.type}) with bottom "
            f"shapes {[list(t.shape) for t in bottoms]})"
        )

    # -- a pass's bookkeeping -----------------------------------------------------------------

    def prepare_inputs(self, whole: bool = True) -> None:
        """Before a pass: host copies back to the device, handed-out storage (with what views
        wrote into it) as the blobs' values, the inputs' autograd flags. ``whole``: the pass runs
        every layer (the blobs it computes need no copy back)."""
        plan = self.plan
        if _blob.uses_host_mirror(self.device) and _blob.host_copies_out():
            _blob.sync_host_copies("data", recomputed=plan.recomputed if whole else ())
        self.tape = None
        if self.channels_last:
            for blob in self.channels_last:
                t = blob._data
                if t is not None and not t.is_contiguous():
                    blob._data = t.contiguous()
            self.channels_last = []
        self.graph_forward = False
        for blob in self.exported:
            store = blob._store
            # (a tensor made since the store last mirrored it, e.g. by a data layer, is newer)
            if store is not None and blob._data is blob._synced and store.shape == blob._shape:
                blob._data = blob._synced = store
        grad_on = torch.is_grad_enabled()
        for name in plan.inputs:
            blob = plan.blobs[name]
            t = blob.tensor
            if t.grad_fn is not None:  # an in-place layer wrote into this input last time
                t = t.detach()
                blob._data = t
            want = grad_on and plan.input_needs_grad[name]
            if t.requires_grad != want:
                t.requires_grad_(want)
            blob._grad_tensor = t

    def publish(self) -> None:
        """After a pass: the blobs whose data views were handed out get the pass's values."""
        for blob in self.exported:
            blob.publish()

    def keep_tape(self) -> None:
        """After a whole forward under autograd: its graph serves ``backward()`` until a blob's
        tensor is replaced or written."""
        self.tape = [(b, b._data, b._data._version) for b in self.plan.blobs.values() if b._data is not None]
        self.tape_params = [(p, p._version) for p in (lp.param for lp in self.plan.learnable)]

    def tape_usable(self) -> bool:
        if not self.tape or self.overwritten or self.graph_forward:
            return False
        if any(b._data is not t or t._version != v for b, t, v in self.tape):
            return False
        if any(p._version != v for p, v in self.tape_params):
            return False  # weights updated since (the graph kept the old ones' place)
        return not any(b.written_since_pass() for b in self.exported)

    def loss(self) -> torch.Tensor | float:
        """Σ loss_weight · Σ(blob) over the blobs with a loss weight (0.0 if none); a single
        scalar loss of weight 1 is returned as it is (no extra autograd nodes)."""
        loss = 0.0
        for b in self.plan.blobs.values():
            if b.loss_weight and b._data is not None:
                t = b._data.float() if b._data.dtype in LOW_PRECISION else b._data
                term = t if t.dim() == 0 else t.sum()
                if b.loss_weight != 1.0:
                    term = b.loss_weight * term
                loss = term if isinstance(loss, float) else loss + term
        return loss

    def outputs_to_float32(self) -> None:
        """Outputs an autocast pass left in bf16/fp16 made float32 (pycaffe's ``.data``)."""
        for o in self.plan.outputs:
            b = self.plan.blobs[o]
            if b._data is not None and b._data.dtype in LOW_PRECISION:
                b.set_tensor(b._data.float())

    def fill_missing_diffs(self) -> None:
        """After a pass: a zero diff for each learnable parameter left without one."""
        for lp in self.plan.learnable:
            p = lp.param
            if p.grad is None:
                _blob.diff_owner(p).replace(torch.zeros_like(_blob.raw_data(p)))

    def verify_labels(self, checks: list) -> None:
        """Raise for the first bad label in the loss layers' records (host copies, complete)."""
        try:
            _loss_layers.verify_deferred(checks)
        except CaffeError as e:
            raise self.readable_error(e) from None


class PendingLoss:
    """The loss of a queued training pass: ``value()`` reads it — exactly, as a Python float —
    and raises for a bad label the pass's loss layers recorded (naming layer, bottom and value)
    before returning. On a CPU, or with nothing deferred and a loss on the CPU, the read is
    immediate; on a GPU the values travel to pinned host memory behind the pass, and ``value()``
    waits for that copy only."""

    __slots__ = ("_state", "_checks", "_value", "_host", "_event")

    def __init__(self, state: RunState, loss: torch.Tensor | float, checks: list):
        self._state, self._checks, self._value, self._event = state, checks, None, None
        self._host = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)
        device = self._host.device if isinstance(self._host, torch.Tensor) else state.device
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
            self._state.verify_labels(checks)
            self._value = float(self._host)  # exact: float32/64 -> double
        return self._value


class Runner:
    """One way to execute a plan (see the module's doc). Subclasses: ``EagerRunner`` (Caffe's
    layer-by-layer loop), ``DebugRunner`` (the same with pycaffe's callbacks and Caffe's
    ``debug_info`` logs), ``CompiledRunner`` (``torch.compile``), ``GraphRunner`` (CUDA graphs)."""

    #: a short name for logs and errors
    kind = "runner"

    def __init__(self, state: RunState):
        self.state = state
        #: the layers that check labels (``Layer.checks_labels``), in the order they run
        self.label_layers = [s.layer for s in state.plan.steps if s.layer.checks_labels]

    @contextlib.contextmanager
    def label_checks(self, mode: LabelChecks):
        """Within the block the label-checking layers check by ``mode`` (their ``label_checks``;
        the enclosing block's mode, or the layers' default, again after it). Yields a list that
        holds, once the block ends, the records they left (``Layer.label_record``), taken off
        them in the order they ran: ``(layer, values, classes, ignore)`` for
        ``RunState.verify_labels``."""
        layers = self.label_layers
        outer = [layer.__dict__.get("label_checks") for layer in layers]
        for layer in layers:
            layer.label_checks = mode
        records: list = []
        try:
            yield records
        finally:
            for layer, before in zip(layers, outer):
                if before is None:
                    del layer.label_checks  # the class default again
                else:
                    layer.label_checks = before
                record = layer.label_record
                if record is not None:
                    del layer.label_record
                    records.append((layer, *record))

    def forward(self, start: int, end: int) -> None:
        raise NotImplementedError

    def train_pass(self, loss_scale: float = 1.0) -> PendingLoss:
        raise NotImplementedError

    def backward(self, start: int, end: int, whole: bool) -> None:
        raise NotImplementedError
