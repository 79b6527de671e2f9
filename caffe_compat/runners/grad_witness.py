"""Gradient witnesses: a certificate, from two tiny reductions, that an InnerProduct weight's
gradient is finite, so that a solver can check every gradient before its update without reading
the big ones again (``caffe_compat.solvers.nonfinite``).

An InnerProduct layer's weight gradient is ``dW = D^T X`` (``transpose``: its transpose): ``D``
the top's diff (M x N), ``X`` the bottom's data (M x K), ``M`` the rows (the outer count). Each
entry is a sum of M products, each at most ``max|D| * max|X|`` in size; so when every entry of
``D`` and ``X`` is finite and ``M * max|D| * max|X|`` is well below the largest float (a margin
for rounding: the solver takes a quarter of it), every entry of ``dW`` is finite. ``max|X|`` is
M x K values and ``max|D|`` M x N, tiny next to the N x K of ``dW`` (AlexNet: fc6-fc8 hold
58.6 M of its 61 M parameters; at batch 10 their bottoms and tops are 0.2 M values). A NaN or
an Inf in ``D`` or ``X`` makes the bound NaN or Inf: it then fails, and the solver reads that
gradient itself.

A training pass through ``EagerRunner.train_pass`` records, for every InnerProduct step whose
weight is witnessed, ``max|X|`` as the step runs and ``max|D|`` from a hook on its top (a hook
registered before an in-place layer (ReLU, Dropout) writes over the top receives the gradient of
the value the InnerProduct produced: ``D`` itself). The bounds of the ``iter_size`` passes and of
every layer sharing the weight add up. A weight is witnessed only when every layer using it is an
InnerProduct using it as its weight; everything else (biases, convolutions, BatchNorm, ...) has
no witness and is checked directly.

The certificate is given only when it describes the diff as it is (``certificates``): the diff is
the tensor, at the version, that the last recorded pass left (any write since, or another kind of
pass: a CUDA graph's replay, a compiled forward, a gradient exchange between processes, a host
write through ``net.params``, changes it), its accumulation started from a cleared diff, and each
of its passes recorded ``max|X|`` and ``max|D|`` for every user (a hook that did not fire, e.g.
on a view of the layer's output written in place, leaves it without), and no NumPy view of the
diff was handed out (``net.params[...][i].diff`` on the CPU: a write through it changes no
version). Otherwise: None, check it directly. The runtime only records; deciding is the solver's.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from caffe_compat import blob as _blob
from caffe_compat.layers.common import InnerProductLayer

__all__ = ["Certificate", "GradientWitness"]


@dataclass
class Certificate:
    """A witnessed weight gradient: it is finite if, for every term ``(rows, max_d, max_x,
    largest)``, ``rows * max_d * max_x`` times the number of terms stays below ``largest / 4``
    (``largest``: the largest finite value of the arithmetic that made it). ``max_d``, ``max_x``:
    0-d tensors on the net's device."""

    terms: list[tuple[int, torch.Tensor, torch.Tensor, float]]


class GradientWitness:
    """The records of one net's training passes (see the module's doc)."""

    def __init__(self, plan):
        self.plan = plan
        self.recording = False
        #: step index -> learnable position, for the InnerProduct steps whose weight is witnessed
        self.watch: dict[int, int] = {}
        users: dict[int, list[int]] = {}
        position = {id(lp.param): i for i, lp in enumerate(plan.learnable)}
        unwitnessed: set[int] = set()
        for step in plan.steps:
            for k, p in enumerate(step.layer.blobs):
                i = position.get(id(p))
                if i is None:
                    continue
                if type(step.layer) is InnerProductLayer and k == 0:  # (a subclass may compute otherwise)
                    users.setdefault(i, []).append(step.index)
                else:
                    unwitnessed.add(i)
        for i, steps in users.items():
            if i not in unwitnessed:
                for s in steps:
                    self.watch[s] = i
        self._users = {i: steps for i, steps in users.items() if i not in unwitnessed}
        self._x: dict[int, tuple[int, torch.Tensor, float]] = {}  # this pass: step -> rows, max|X|, largest
        self._d: dict[int, torch.Tensor] = {}  # this pass: step -> max|D|
        self._fresh: dict[int, bool] = {}
        #: learnable position -> (terms since the diff was cleared, the diff, its version)
        self._kept: dict[int, tuple[list, weakref.ref, int]] = {}

    # -- a training pass ----------------------------------------------------------------------

    @contextmanager
    def training_pass(self, cleared: bool):
        """Around a training pass's forward and backward: ``start``, then ``finish``, or ``stop``
        if the pass raised."""
        self.start(cleared)
        try:
            yield
        except BaseException:
            self.stop()
            raise
        self.finish()

    def start(self, cleared: bool) -> None:
        """Before a training pass (``cleared``: the diffs were cleared since the last pass, and
        the pass takes autograd's gradients as they are where no view of the diff was handed
        out). Decides, per witnessed weight, whether the pass's bound adds to the kept ones or
        replaces them."""
        self.recording = bool(self.watch)
        self._x, self._d = {}, {}
        learnable = self.plan.learnable
        for i in self._users:
            p = learnable[i].param
            # (the pass drops a cleared diff of a learning parameter, see EagerRunner.train_pass)
            self._fresh[i] = p.grad is None or (cleared and p.requires_grad and not _blob.diff_owner(p).exported)
            if not self._fresh[i] and not self._current(i):
                self._kept.pop(i, None)

    def forward(self, step, x: torch.Tensor, top: torch.Tensor) -> None:
        """Step ``step`` (a watched InnerProduct) read ``x`` and made ``top``: ``max|X|`` now,
        ``max|D|`` when the backward reaches ``top``."""
        weight = self.plan.learnable[self.watch[step.index]].param
        if step.layer.blobs[0] is not weight or not top.requires_grad or not top.numel():
            return
        if not (x.is_floating_point() and top.is_floating_point()):
            return
        largest = min(torch.finfo(top.dtype).max, torch.finfo(x.dtype).max)
        self._x[step.index] = (top.numel() // top.shape[-1], x.detach().abs().amax(), largest)
        records, index = self._d, step.index  # (this pass's: a hook firing later writes into its own pass's)

        def seen(d: torch.Tensor) -> None:
            records[index] = d.detach().abs().amax()

        top.register_hook(seen)

    def finish(self) -> None:
        """After the pass's backward: each witnessed weight's bound (None where a user lacks a
        record) and its diff as the pass left it."""
        self.recording = False
        learnable = self.plan.learnable
        for i, steps in self._users.items():
            p = learnable[i].param
            kept = self._kept.pop(i, None)
            if p.grad is None or (kept is None and not self._fresh[i]):
                continue
            terms = [] if self._fresh[i] else kept[0]
            for s in steps:
                if s not in self._x or s not in self._d:
                    break
                rows, max_x, largest = self._x[s]
                terms = [*terms, (rows, self._d[s], max_x, largest)]
            else:
                self._kept[i] = (terms, weakref.ref(p.grad), p.grad._version)
        self._x, self._d = {}, {}

    def stop(self) -> None:
        """A pass that failed: nothing it recorded is kept (its diffs are checked directly)."""
        self.recording = False
        self._kept.clear()
        self._x, self._d = {}, {}

    # -- the solver's question ----------------------------------------------------------------

    def certificates(self) -> list[Certificate | None]:
        """Per learnable parameter (``Net.learnable_params`` order): a ``Certificate`` when its
        diff is witnessed as it is now, else None (check it directly)."""
        out: list[Certificate | None] = [None] * len(self.plan.learnable)
        for i in self._kept:
            if self._current(i):
                out[i] = Certificate(list(self._kept[i][0]))
        return out

    def _current(self, i: int) -> bool:
        """Whether parameter ``i``'s diff is the tensor, at the version, the last pass left, with
        no NumPy view of it handed out (a write through one changes no version)."""
        kept = self._kept.get(i)
        p = self.plan.learnable[i].param
        g = p.grad
        if kept is None or g is None or _blob.diff_owner(p).exported:
            return False
        return kept[1]() is g and g._version == kept[2]
