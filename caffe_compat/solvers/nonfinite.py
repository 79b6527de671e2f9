"""Stop training at the first non-finite loss or gradient, and say where it came from.

Caffe trains on through NaN and Inf: every later iteration computes NaN, and its snapshots hold
NaN weights. Here (``Solver.nan_policy = "stop"``, the default; ``tools/train.py --nan_policy``)
the run stops with a ``NonFiniteError`` naming the iteration and the first layer in net order
whose weights, top data or parameter gradient holds a NaN or an Inf, and never writes a snapshot
of non-finite weights, so the last good snapshot stays the newest. ``nan_policy = "continue"``
is Caffe's behaviour.

What is checked, and what it costs:

- the loss of every iteration, the value the solver reads anyway (nothing more on the host);
  a non-finite loss stops the run before that iteration's update;
- every gradient, before every update (``check_gradients``), from one small tensor computed on
  the device and read back once (``GradientCheck``): for each InnerProduct weight, its gradient
  witnesses (``caffe_compat.runners.grad_witness``: ``max|top diff| * max|bottom data|`` per
  layer and pass, recorded by the eager training pass, which bound every entry of the gradient
  away from overflow); for every other parameter (convolutions, biases, BatchNorm...; and every
  one after a pass that records no witness: a CUDA graph's replay, a compiled forward, a
  gradient exchange between processes, a diff written since), the sum of its gradient, which a
  NaN or an Inf makes non-finite. AlexNet: 58.6 M of its 61 M parameters are witnessed (their
  records: three reductions over fc6-fc8's bottoms and top diffs, 0.2 M values at batch 10); the
  check reads the other 2.4 M, about 0.2 ms on 2 CPU cores, 0.25 % of a batch-1 iteration there
  (``benchmarks/bench_nan_check.py`` times whole iterations with and without it). When an item fails, the gradients it
  covers are read themselves: a bound or a sum that overflowed on finite gradients (values near
  ``FLT_MAX``) is a false alarm and training goes on; otherwise the run stops before the update.
  With ``clip_gradients`` the clipping's sum of squares (in double precision, computed anyway)
  is the check instead. ``Solver.nan_check_gradients = True`` sums every gradient, witnesses
  unused: about 8 ms for AlexNet there (about 10 % of a batch-1 iteration);
- on a GPU, where the solver reads an iteration's loss once the next iteration is queued so that
  the device never waits for the host, both are read then too: the check's values are copied to
  the host without waiting, and read with the loss. A failed check then stops the run after the update it would have
  prevented, naming its iteration, and only if the suspect parameters' weights are now
  non-finite (a NaN or an Inf in a gradient makes its weights so under every solver rule);
  nothing of them is snapshotted (``snapshot`` reads the pending losses and checks first);
- the weights, before every snapshot and at the end of ``solve`` (one pass over them, as the
  snapshot's own).

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
from caffe_compat.solvers.log import logger

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


def _host(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy()


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
        # (the tensors, not ``b.diff``: handing out a view of a diff costs its gradient witness)
        checks += [(f"the gradient of parameter {j}", _host(b.param.grad)) for j, b in enumerate(blobs)]
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


class GradientCheck:
    """The check of the diffs of ``net``'s learnable parameters before an update: one value per
    item, computed on the device as one tensor and read back at once (``suspects``):

    - a parameter without a certificate (``Net.gradient_witness``; every one with ``direct``):
      the sum of its diff, non-finite when an element is (a sum of finite values that overflows
      is a false alarm that ``NonFiniteGuard`` clears by reading the diff);
    - each term ``(rows, max|D|, max|X|, largest)`` of a certificate: ``max|D| * max|X|`` in
      float64, which must stay below ``largest / (4 * rows * terms)``.
    """

    def __init__(self, net, direct: bool):
        params = net.learnable_params
        witness = getattr(net, "gradient_witness", None)
        certificates = witness() if witness is not None and not direct else [None] * len(params)
        sums, positions, limits = [], [], []
        maxd, maxx, term_positions, term_limits = [], [], [], []
        for i, (p, cert) in enumerate(zip(params, certificates)):
            g = p.grad
            if g is None or not g.numel():
                continue
            if cert is None:
                sums.append(g.sum())
                positions.append(i)
                limits.append(math.inf)
                continue
            largest_diff = float(torch.finfo(g.dtype).max)
            for rows, d, x, largest in cert.terms:
                maxd.append(d)
                maxx.append(x)
                term_positions.append(i)
                term_limits.append(min(largest, largest_diff) / (4.0 * max(rows, 1) * len(cert.terms)))
        parts = []
        if sums:
            parts.append(torch.stack(sums).double())
        if maxd:
            parts.append(torch.stack(maxd).double() * torch.stack(maxx).double())
        #: the learnable position of each value
        self.positions = positions + term_positions
        self.limits = np.array(limits + term_limits, dtype=np.float64)
        self.values = torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else None)
        self._event = None

    def read_later(self) -> None:
        """Start the values' copy to the host behind the work queued (a GPU); ``suspects`` waits
        for that copy alone."""
        if self.values is not None and self.values.is_cuda:
            device = self.values.device
            self.values = self.values.to("cpu", non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(device))

    def suspects(self) -> list[int]:
        """The learnable positions, in order, whose value fails."""
        if self.values is None:
            return []
        if self._event is not None:
            self._event.synchronize()
        values = self.values.cpu().numpy()
        with np.errstate(invalid="ignore"):
            failed = ~(np.abs(values) < self.limits)
        return sorted({self.positions[k] for k in np.flatnonzero(failed)})


class NonFiniteGuard:
    """The checks of ``solver`` (see the module docstring); each raises ``NonFiniteError`` when
    ``solver.nan_policy`` is ``"stop"`` and does nothing under ``"continue"``."""

    def __init__(self, solver):
        self.solver = solver
        #: the path of the last snapshot written (the message names it)
        self.last_snapshot: str | None = None
        #: (iteration, GradientCheck) read with that iteration's loss (a GPU: see ``check_gradients``)
        self._pending: list[tuple[int, GradientCheck]] = []

    @property
    def active(self) -> bool:
        policy = self.solver.nan_policy
        if policy not in NAN_POLICIES:
            raise SolverError(f"{self.solver.source}: nan_policy {policy!r} is not one of {', '.join(NAN_POLICIES)}")
        return policy == "stop"

    def loss(self, it: int, loss) -> None:
        """The loss of iteration ``it``, read by the solver; then the gradient checks of the
        iterations up to ``it`` that were read with their loss."""
        if not self.active or self.solver.loss_scaler is not None:
            self._pending.clear()
            return
        net = self.solver.net
        if not math.isfinite(float(loss)):
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
        while self._pending and self._pending[0][0] <= it:
            self._decide_late(*self._pending.pop(0))

    def check_gradients(self, defer: bool = False) -> None:
        """Before the update of the current iteration (without clipping, whose sum of squares is
        the check then: ``gradients``): every diff, through one ``GradientCheck``. ``defer``
        (the solver reads this iteration's loss late, a GPU): its values are read with the loss,
        once the update is queued (``loss``)."""
        s = self.solver
        if not self.active or s.loss_scaler is not None:
            return
        check = GradientCheck(s.net, direct=s.nan_check_gradients)
        if defer:
            check.read_later()
            self._pending.append((s.iter, check))
            return
        suspects = check.suspects()
        if not suspects:
            return
        params = s.net.learnable_params
        if all(bool(torch.isfinite(params[i].grad).all()) for i in suspects):
            logger.debug("Iteration %d: the gradient check's bound failed, the diffs are finite: training on", s.iter)
            return
        raise self._error(
            s.iter,
            f"the gradients are non-finite; first non-finite value in net order: "
            f"{first_non_finite(s.net, weights=False)}",
        )

    def forget(self) -> None:
        """Drop the checks not read yet (``step`` ended by an error: their losses go unread too)."""
        self._pending.clear()

    def _decide_late(self, it: int, check: GradientCheck) -> None:
        """A check of iteration ``it`` read after its update: a suspect whose weights are now
        non-finite (a non-finite diff makes them so under every solver rule) stops the run."""
        suspects = check.suspects()
        if not suspects:
            return
        params = self.solver.net.learnable_params
        if _weights_finite([params[i] for i in suspects]):
            return  # a bound or a sum that overflowed: the diffs were finite
        raise self._error(
            it,
            "the gradients are non-finite; read with the loss (a GPU), after the update, which made the "
            f"weights non-finite: {first_non_finite(self.solver.net)}",
        )

    def gradients(self, sumsq) -> None:
        """With clipping: the gradients' sum of squares (in double precision: finite exactly
        when every diff is) before the update of the current iteration."""
        if sumsq is None or not self.active or self.solver.loss_scaler is not None:
            return
        value = float(sumsq)
        if math.isfinite(value):
            return
        raise self._error(
            self.solver.iter,
            f"the gradients are non-finite (sum of squares {value}); first non-finite value in net order: "
            f"{first_non_finite(self.solver.net, weights=False)}",
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
