"""Stop training at the first non-finite loss or gradient, and say where it came from.

Caffe trains on through NaN and Inf: every later iteration computes NaN, and its snapshots hold
NaN weights. Here (``Solver.nan_policy = "stop"``, the default; ``tools/train.py --nan_policy``)
the run stops with a ``NonFiniteError`` naming the iteration and the first layer in net order
whose weights, top data or parameter gradient holds a NaN or an Inf, and never writes a snapshot
of non-finite weights, so the last good snapshot stays the newest. ``nan_policy = "continue"``
is Caffe's behaviour.

What is checked, and what it costs:

- the loss of every iteration, the value the solver reads anyway (nothing more on the host);
  a non-finite loss stops the run before that iteration's update (on a GPU, where the loss is
  read once the next iteration is queued, after it: the weights are then not snapshotted);
- the gradients, through a value computed anyway: the sum of squares of ``clip_gradients``. A
  non-finite gradient without clipping turns the weights non-finite in its update, which the
  next iteration's loss shows (the message then names the update's iteration) and which the
  check before every snapshot and at the end of ``solve`` catches (one pass over the weights,
  as the snapshot's own);
- ``Solver.nan_check_gradients = True`` (opt-in): one multi-tensor reduction over all the
  gradients before every update, which stops the run before a non-finite gradient is applied.
  It reads every gradient once more: about 24 ms for AlexNet's 61 M parameters on 2 CPU cores,
  17 % of a batch-1 iteration there, hence not the default.

Under fp16 loss scaling (``LossScaler``) non-finite gradients are expected and skip the update:
only the weights are checked then.

The search for the layer runs only once the check has fired (host copies of every top and
parameter; its cost does not matter then).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from caffe_compat.errors import SolverError

__all__ = ["NonFiniteError", "NonFiniteGuard", "NAN_POLICIES", "first_non_finite"]

NAN_POLICIES = ("stop", "continue")


class NonFiniteError(SolverError):
    """Training met a NaN or an Inf (``nan_policy: stop``); the message says where."""


def _bad(array) -> str | None:
    """``"nan"``, ``"inf"`` or ``"nan and inf"`` for an array holding such values, else None."""
    if array is None:
        return None
    a = np.asarray(array)
    if a.size == 0 or np.isfinite(a).all():
        return None
    kinds = [k for k, f in (("nan", np.isnan), ("inf", np.isinf)) if f(a).any()]
    return " and ".join(kinds)


def first_non_finite(net, weights: bool = True) -> str | None:
    """The first layer in net order whose weights (``weights``), top data or parameter gradient
    hold a NaN or an Inf, described (``layer 'conv2' (Convolution): top 'conv2' holds nan``);
    None when there is none."""
    if not hasattr(net, "_layer_names") or not hasattr(net, "top_names"):
        return None  # a net of another kind: nothing to search
    params = getattr(net, "params", {})
    for li, layer in enumerate(net.layers):
        name = net._layer_names[li]
        what = f"layer {name!r} ({getattr(layer, 'type', '?')})"
        blobs = list(params.get(name, [])) if hasattr(params, "get") else []
        checks = []
        if weights:
            checks += [(f"parameter {j} (its data)", b.data) for j, b in enumerate(blobs)]
        checks += [(f"top {t!r}", net.blobs[t].data) for t in net.top_names.get(name, []) if t in net.blobs]
        checks += [(f"the gradient of parameter {j}", b.diff) for j, b in enumerate(blobs)]
        for label, array in checks:
            kind = _bad(array)
            if kind:
                return f"{what}: {label} holds {kind}"
    return None


def _weights_finite(params: list[torch.Tensor]) -> bool:
    tensors = [p.detach() for p in params if p.numel()]
    if not tensors:
        return True
    # the max-norm: NaN and Inf survive it, and it cannot overflow
    return bool(torch.isfinite(torch.stack([n.float().cpu() for n in torch._foreach_norm(tensors, math.inf)])).all())


class NonFiniteGuard:
    """The checks of ``solver`` (see the module docstring); each raises ``NonFiniteError`` when
    ``solver.nan_policy`` is ``"stop"`` and does nothing under ``"continue"``."""

    def __init__(self, solver):
        self.solver = solver
        #: the path of the last snapshot written (the message names it)
        self.last_snapshot: str | None = None

    @property
    def active(self) -> bool:
        policy = self.solver.nan_policy
        if policy not in NAN_POLICIES:
            raise SolverError(f"{self.solver.source}: nan_policy {policy!r} is not one of {', '.join(NAN_POLICIES)}")
        return policy == "stop"

    def loss(self, it: int, loss) -> None:
        """The loss of iteration ``it``, read by the solver."""
        if not self.active or self.solver.loss_scaler is not None or math.isfinite(float(loss)):
            return
        net = self.solver.net
        if not _weights_finite(net.learnable_params) and it > 0:
            where = first_non_finite(net)
            raise self._error(
                it - 1,
                f"a non-finite gradient made the weights non-finite in its update ({where}); "
                f"iteration {it}'s loss is {float(loss)}",
            )
        raise self._error(
            it, f"the loss is {float(loss)}; first non-finite value in net order: {first_non_finite(net)}"
        )

    def gradients(self, sumsq) -> None:
        """The gradients' sum of squares (a float, or a tensor from ``UpdateEngine.gradient_sumsq``)
        before the update of the current iteration."""
        if sumsq is None or not self.active or self.solver.loss_scaler is not None:
            return
        value = float(sumsq)
        if math.isfinite(value):
            return
        where = first_non_finite(self.solver.net, weights=False)
        if where is None:
            where = "no single value: the sum of squares overflowed float32"
        raise self._error(
            self.solver.iter,
            f"the gradients are non-finite (sum of squares {value}); first non-finite value in net order: {where}",
        )

    def weights(self, doing: str) -> None:
        """Before ``doing`` (a snapshot, the end of training): the weights must be finite."""
        if not self.active:
            return
        net = self.solver.net
        if _weights_finite(net.learnable_params):
            return
        it = self.solver.iter
        raise self._error(
            it - 1,
            f"a non-finite gradient made the weights non-finite in its update ({first_non_finite(net)}); not {doing}",
        )

    def _error(self, it: int, what: str) -> NonFiniteError:
        last = self.last_snapshot or "none in this run"
        return NonFiniteError(
            f"{self.solver.source}: iteration {it}: {what}. Training stopped (nan_policy: stop); no snapshot "
            f"of non-finite weights was written (the last snapshot: {last}). Look at the data and the learning "
            "rate, or train on as Caffe does with --nan_policy continue (solver.nan_policy = 'continue')"
        )
