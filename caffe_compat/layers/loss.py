"""Caffe's loss layers and Accuracy.

Every loss layer here has ``is_loss = True``: its top 0 is a 0-d tensor (Caffe's loss blob has
shape ``()``) and the net multiplies it by ``loss_weight`` (1 by default for loss layers); the
layer itself never applies a weight. Label-like bottoms never receive a gradient (they are
detached; Caffe aborts when asked to propagate to them).

Where Caffe's backward is not the autograd of its forward (the ``FLT_MIN`` / ``kLOG_THRESHOLD``
clamps, ContrastiveLoss's ``1e-4`` in the denominator) the gradient is written out in a
``torch.autograd.Function`` so that it is exactly the one Caffe computes.

Labels are read like Caffe's ``static_cast<int>(label)``: truncated toward zero. The layers that
index by label (``checks_labels``) raise naming the layer, the bottom and the value for a label
outside ``[0, classes)``; when is the runner's choice for the pass (``layer.label_checks``, see
``caffe_compat.layers.base.LabelChecks``), never a module global.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from caffe_compat.errors import CaffeError
from caffe_compat.io import blob_to_array, read_blobproto
from caffe_compat.layers.base import LabelChecks, Layer, register_layer, scalar_tensor
from caffe_compat.proto import caffe_pb2

__all__ = [
    "EuclideanLossLayer",
    "SoftmaxWithLossLayer",
    "SigmoidCrossEntropyLossLayer",
    "HingeLossLayer",
    "InfogainLossLayer",
    "ContrastiveLossLayer",
    "MultinomialLogisticLossLayer",
    "AccuracyLayer",
    "FLT_MIN",
    "LOG_THRESHOLD",
]

#: C's FLT_MIN: SoftmaxWithLoss clamps probabilities to it before the log (for any Dtype).
FLT_MIN = 1.17549435082228750797e-38
#: Caffe's kLOG_THRESHOLD (loss_layer.hpp): MultinomialLogistic/Infogain clamp probabilities to it.
LOG_THRESHOLD = 1e-20
#: Caffe's loss at one position when p_label < FLT_MIN: -log(FLT_MIN) (87.3365), in any dtype.
_NEG_LOG_FLT_MIN = -math.log(FLT_MIN)
# torch's reduction codes for the nll_loss operators
_REDUCTION_NONE, _REDUCTION_MEAN = 0, 1
# Target value nll_loss skips: where ignore_label's positions go (never a class index).
_IGNORED = -100
#: The constant ContrastiveLoss adds to the distance in its backward (not in its forward).
_CONTRASTIVE_EPS = 1e-4

_NORM = caffe_pb2.LossParameter


# -- helpers ------------------------------------------------------------------------------------


def _count(shape) -> int:
    return math.prod([int(d) for d in shape])


def _bottom_name(layer: Layer, index: int) -> str:
    bottoms = layer.param.bottom
    return repr(bottoms[index]) if index < len(bottoms) else f"#{index}"


def _canonical_axis(layer: Layer, axis: int, ndim: int, field: str) -> int:
    if not -ndim <= axis < ndim:
        raise layer.error(f"{field} = {axis} is out of range for a {ndim}-D bottom {_bottom_name(layer, 0)}")
    return axis % ndim


def _as_labels(label: Tensor) -> Tensor:
    """Caffe's ``static_cast<int>(label)``: truncation toward zero, no gradient."""
    return label.detach().to(torch.long)


def _defers(layer: Layer, labels: Tensor) -> bool:
    """Whether this check is left for the runner (``LabelChecks.DEFER``, labels off the CPU)."""
    return layer.label_checks is LabelChecks.DEFER and labels.device.type != "cpu"


def verify_deferred(records: list[tuple[Layer, Tensor, int, int | None]]) -> None:
    """Raise like ``_check_label_range`` for the first record whose labels leave ``[0, classes)``.
    A record ``(layer, values, classes, ignore)`` is a layer's ``label_record`` as the runner
    took it, its tensor on the host once its copy is complete: either the labels as given or
    their [min, max] (ignored positions counted as 0); both are truncated toward zero here,
    positions equal to ``ignore`` skipped."""
    for layer, values, num_classes, ignore in records:
        ints = values.reshape(-1).to(torch.long).tolist()  # toward zero, as _as_labels (NaN: a bad label too)
        if ignore is not None:
            ints = [v for v in ints if v != ignore]
        if ints:
            lo, hi = min(ints), max(ints)
            if lo < 0 or hi >= num_classes:
                _label_error(layer, lo if lo < 0 else hi, num_classes)


# Labels up to this many values are checked on the host from a copy of themselves (one copy, no
# reduction kernels); more, through their [min, max] computed on the device.
_RAW_LABEL_CHECK = 4096


def _label_error(layer: Layer, value: int, num_classes: int):
    hint = " or set loss_param.ignore_label to skip it" if layer.is_loss else ""  # not Accuracy
    raise layer.error(
        f"label value {value} in bottom {_bottom_name(layer, 1)} is out of range: "
        f"labels must be integers in [0, {num_classes}); fix the labels{hint}"
    )


def _counted_range(labels: Tensor, valid: Tensor | None) -> Tensor:
    """[min, max] of the labels on the device, ignored positions counted as 0 (always in range)."""
    counted = labels if valid is None else torch.where(valid, labels, torch.zeros_like(labels))
    return torch.stack(torch.aminmax(counted))


def _check_label_range(
    layer: Layer,
    labels: Tensor,
    valid: Tensor | None,
    num_classes: int,
    raw: Tensor | None = None,
    ignore_label: int | None = None,
) -> Tensor:
    """Raise naming the layer when a (non-ignored) label is outside ``[0, num_classes)``; returns
    the labels to index with. When depends on the layer's ``label_checks`` for this pass (``LabelChecks``,
    set by the runner): at once on the host (``NOW``); or, for ``DEFER`` on a GPU and ``TRACED``
    inside torch.compile's graph, the labels (or their range) left on the layer as its
    ``label_record`` for the runner to verify after the pass, before any update, and the labels
    returned clamped into range. ``raw``: the label bottom as given (a copy of it is recorded when
    it is small); ``ignore_label``: the layer's ignore_label when it has one (such labels are not
    checked)."""
    if labels.device.type == "meta" or labels.numel() == 0:
        return labels
    if layer.label_checks is LabelChecks.TRACED and torch.compiler.is_compiling():
        # inside Net.compile's graph: no host read (a graph break); the range leaves the graph
        # as a tensor on the layer, and the runner checks it after the compiled pass
        layer.label_record = (_counted_range(labels, valid), num_classes, None)
        return labels.clamp(0, num_classes - 1)
    if _defers(layer, labels):
        ignore = ignore_label
        if raw is not None and raw.numel() <= _RAW_LABEL_CHECK:
            values = raw.detach()
        else:
            values, ignore = _counted_range(labels, valid), None
        if not (values.is_cuda and torch.cuda.is_current_stream_capturing()):
            values = values.to("cpu", non_blocking=True, copy=True)
        # else: a CUDA graph's capture (runners/cuda_graph.py), which copies them after each replay
        layer.label_record = (values, num_classes, ignore)
        return labels.clamp(0, num_classes - 1)
    if valid is None:
        if labels.device.type == "cpu" and labels.numel() <= _RAW_LABEL_CHECK:
            values = labels.reshape(-1).tolist()  # a few labels: no reduction kernels
            lo, hi = min(values), max(values)
        else:  # one reduction and one host read (a GPU synchronises once)
            lo, hi = torch.stack(torch.aminmax(labels)).tolist()
        if 0 <= lo and hi < num_classes:
            return labels
    bad = (labels < 0) | (labels >= num_classes)
    if valid is not None:
        bad = bad & valid
    if bool(bad.any()):
        _label_error(layer, int(labels[bad][0]), num_classes)
    return labels


def _check_first_dims(layer: Layer, bottom_shapes: list[tuple[int, ...]]) -> None:
    """Caffe's LossLayer::Reshape: data and label must have the same first dimension."""
    a, b = bottom_shapes[0], bottom_shapes[1]
    if len(a) == 0 or len(b) == 0 or a[0] != b[0]:
        raise layer.error(
            f"bottoms {_bottom_name(layer, 0)} {a} and {_bottom_name(layer, 1)} {b} must have "
            "the same first (batch) dimension"
        )


def _check_one_label_per_item(layer: Layer, shapes) -> None:
    """Bottom 1 holds one label per item of bottom 0 (HingeLoss, MultinomialLogisticLoss)."""
    _check_first_dims(layer, shapes)
    if _count(shapes[1]) != shapes[0][0]:
        raise layer.error(f"bottom {_bottom_name(layer, 1)} {shapes[1]} must hold one label per item ({shapes[0][0]})")


def _normalization(loss_param, default: int) -> int:
    """``normalization`` if set, else legacy ``normalize`` (true: VALID, false: BATCH_SIZE), else default."""
    if loss_param.HasField("normalization"):
        return loss_param.normalization
    if loss_param.HasField("normalize"):
        return _NORM.VALID if loss_param.normalize else _NORM.BATCH_SIZE
    return default


def _normalizer_count(mode: int, outer: int, inner: int) -> float:
    """Caffe's LossLayer::GetNormalizer where the labels do not decide it (at least 1)."""
    n = {_NORM.FULL: outer * inner, _NORM.VALID: outer * inner, _NORM.BATCH_SIZE: outer, _NORM.NONE: 1}[mode]
    return max(1.0, float(n))


def _normalizer(mode: int, outer: int, inner: int, valid: Tensor | None, like: Tensor) -> Tensor:
    """Caffe's LossLayer::GetNormalizer, as a 0-d tensor of ``like``'s dtype on its device; at
    least 1. Known without the labels (every mode but VALID with a mask), it is a cached tensor:
    no host-to-device copy per call."""
    if mode == _NORM.VALID and valid is not None:
        return torch.clamp(valid.sum().to(like.dtype), min=1.0)
    return scalar_tensor(_normalizer_count(mode, outer, inner), like.dtype, like.device)


# -- autograd functions with Caffe's backward ---------------------------------------------------


class _SoftmaxLossFunction(torch.autograd.Function):
    """Caffe's SoftmaxWithLoss on torch's fused kernels: the forward is ``log_softmax`` and a
    per-position ``nll_loss`` (``-log p`` at the label, 0 where the target is ``ignore_index``),
    each clamped to ``-log(FLT_MIN)`` as Caffe clamps ``p`` to ``FLT_MIN``, summed and divided
    by the normalizer; the backward is ``nll_loss``'s and ``log_softmax``'s:
    ``(p - onehot) * g / normalizer``, 0 at ignored positions, whatever the clamp did (Caffe's
    gradient). Two dispatched operations backward, four or five forward (on a GPU at small
    batches each costs host time).

    x: (outer, C) with target (outer,), or (outer, C, inner, 1) with target (outer, inner, 1),
    long, in [0, C) or ``ignore_index``; normalizer: a 0-d tensor; mean: the normalizer is the
    number of positions (one ``mean`` instead of a sum and a division)."""

    @staticmethod
    def forward(ctx, x, target, normalizer, ignore_index: int, mean: bool):
        logp = torch.log_softmax(x, 1)
        if normalizer.dtype != logp.dtype:  # autocast: log_softmax runs in float32
            normalizer = normalizer.to(logp.dtype)
        nll = torch.ops.aten.nll_loss_forward if x.dim() == 2 else torch.ops.aten.nll_loss2d_forward
        per, _ = nll(logp, target, None, _REDUCTION_NONE, ignore_index)
        per = per.clamp_max_(_NEG_LOG_FLT_MIN)
        loss = per.mean() if mean else torch.div(per.sum(), normalizer)
        ctx.save_for_backward(logp, target, normalizer)
        ctx.ignore_index = ignore_index
        ctx.x_dtype = x.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logp, target, normalizer = ctx.saved_tensors
        nll = torch.ops.aten.nll_loss_backward if logp.dim() == 2 else torch.ops.aten.nll_loss2d_backward
        # -grad_loss / normalizer at each counted label: reduction "mean" over our normalizer
        picked = nll(grad_loss, logp, target, None, _REDUCTION_MEAN, ctx.ignore_index, normalizer)
        if ctx.x_dtype != logp.dtype:
            # autocast ran log_softmax in float32 on bf16/fp16 scores: the gradient in float32,
            # then in the scores' dtype (CUDA's kernel takes a float16 input dtype, not bfloat16)
            dx = torch._log_softmax_backward_data(picked, logp, 1, logp.dtype).to(ctx.x_dtype)
        else:
            dx = torch._log_softmax_backward_data(picked, logp, 1, ctx.x_dtype)
        return dx, None, None, None, None


class _SigmoidCrossEntropyFunction(torch.autograd.Function):
    """Stable ``-[t log s + (1-t) log(1-s)]`` summed over valid items; grad ``(s - t)/normalizer``."""

    @staticmethod
    def forward(ctx, x, target, valid, normalizer):
        pos = (x >= 0).to(x.dtype)
        per_item = -(x * (target - pos) - torch.log1p(torch.exp(x - 2 * x * pos)))
        loss = torch.where(valid, per_item, torch.zeros_like(per_item)).sum() / normalizer
        ctx.save_for_backward(x, target, valid, normalizer)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, target, valid, normalizer = ctx.saved_tensors
        grad = (torch.sigmoid(x) - target) * valid.to(x.dtype) * (grad_loss / normalizer)
        return grad, None, None, None


class _ContrastiveFunction(torch.autograd.Function):
    """a, b: (N, C); similar: (N,) bool. Returns the loss; grads to a and -grad to b."""

    @staticmethod
    def forward(ctx, a, b, similar, margin: float, legacy: bool):
        n = a.shape[0]
        diff = a - b
        dist_sq = (diff * diff).sum(dim=1)
        if legacy:
            dissimilar = torch.clamp(margin - dist_sq, min=0.0)
        else:
            dissimilar = torch.clamp(margin - torch.sqrt(dist_sq), min=0.0) ** 2
        loss = torch.where(similar, dist_sq, dissimilar).sum() / n / 2
        ctx.save_for_backward(diff, dist_sq, similar)
        ctx.margin, ctx.legacy = margin, legacy
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        diff, dist_sq, similar = ctx.saved_tensors
        n = diff.shape[0]
        if ctx.legacy:
            mdist = ctx.margin - dist_sq
            beta = torch.full_like(dist_sq, -1.0)
        else:
            dist = torch.sqrt(dist_sq)
            mdist = ctx.margin - dist
            beta = -mdist / (dist + _CONTRASTIVE_EPS)
        zero = torch.zeros_like(dist_sq)
        coef = torch.where(similar, torch.ones_like(dist_sq), torch.where(mdist > 0, beta, zero))
        grad_a = (grad_loss / n) * coef.unsqueeze(1) * diff
        return grad_a, -grad_a, None, None, None


class _MultinomialLogisticFunction(torch.autograd.Function):
    """prob: (N, dim); target: (N, 1) long. ``-sum log(max(p_label, 1e-20)) / N``."""

    @staticmethod
    def forward(ctx, prob, target):
        p = torch.clamp(prob.gather(1, target), min=LOG_THRESHOLD)
        loss = -torch.log(p).sum() / prob.shape[0]
        ctx.save_for_backward(p, target)
        ctx.shape = prob.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        p, target = ctx.saved_tensors
        n = ctx.shape[0]
        grad = torch.zeros(ctx.shape, dtype=p.dtype, device=p.device)
        grad.scatter_(1, target, -(grad_loss / n) / p)
        return grad, None


class _InfogainFunction(torch.autograd.Function):
    """prob: (N, dim); h_rows: (N, dim) = H[label]. ``-sum H[l,k] log(max(p,1e-20)) / N``."""

    @staticmethod
    def forward(ctx, prob, h_rows):
        p = torch.clamp(prob, min=LOG_THRESHOLD)
        loss = -(h_rows * torch.log(p)).sum() / prob.shape[0]
        ctx.save_for_backward(p, h_rows)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        p, h_rows = ctx.saved_tensors
        return -(grad_loss / p.shape[0]) * h_rows / p, None


# -- layers -------------------------------------------------------------------------------------


@register_layer("EuclideanLoss")
class EuclideanLossLayer(Layer):
    """``E = sum((a - b)^2) / (2N)``, N = a.shape[0].

    Bottoms: a and b with the same first dimension and the same count per item (b is viewed in
    a's shape). Top: the 0-d loss. Gradient to BOTH bottoms: ``±(a - b)/N`` (times the loss
    weight); unlike other loss layers, force_backward reaches bottom 1 too (Caffe's
    EuclideanLossLayer::AllowForceBackward is always true).
    """

    exact_num_bottom = 2
    exact_num_top = 1
    is_loss = True

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        self._check(bottom_shapes)

    def _check(self, shapes) -> None:
        _check_first_dims(self, shapes)
        if _count(shapes[0][1:]) != _count(shapes[1][1:]):
            raise self.error(
                f"bottoms {_bottom_name(self, 0)} {shapes[0]} and {_bottom_name(self, 1)} {shapes[1]} "
                "must have the same number of values per item"
            )

    def allow_force_backward(self, bottom_index: int) -> bool:
        return True

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor]:
        self._check([tuple(a.shape), tuple(b.shape)])
        diff = a - b.reshape(a.shape)
        return ((diff * diff).sum() / a.shape[0] / 2,)


@register_layer("SoftmaxWithLoss")
class SoftmaxWithLossLayer(Layer):
    """Softmax over ``softmax_param.axis`` followed by the multinomial logistic loss.

    ``loss = -sum_{valid i} log(max(p[i, label_i], FLT_MIN)) / normalizer``

    Parameters: ``softmax_param.axis`` (1); ``loss_param.ignore_label`` (unset: none ignored);
    ``loss_param.normalization`` (VALID): FULL = outer*inner, VALID = number of non-ignored
    labels, BATCH_SIZE = outer, NONE = 1, each at least 1; the legacy ``loss_param.normalize``
    is read only when ``normalization`` is unset (true: VALID, false: BATCH_SIZE).

    Bottoms: scores (…, C, …) with C at ``axis``; labels with ``outer * inner`` values
    (outer = product of the dims before axis, inner = after), integers in [0, C) or ignore_label.
    Tops: the 0-d loss; optionally the probabilities (scores' shape; Caffe ignores a gradient
    arriving on it, so it carries none). Gradient: ``(p - onehot(label)) / normalizer`` (0 at
    ignored positions), unaffected by the FLT_MIN clamp.
    """

    exact_num_bottom = 2
    min_top = 1
    max_top = 2
    is_loss = True
    checks_labels = True

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        lp = self.param.loss_param
        self.axis_param = self.param.softmax_param.axis
        self.has_ignore_label = lp.HasField("ignore_label")
        self.ignore_label = lp.ignore_label
        self.normalization = _normalization(lp, lp.normalization)
        _check_first_dims(self, bottom_shapes)
        self._dims(bottom_shapes[0], _count(bottom_shapes[1]))

    def _dims(self, shape: tuple[int, ...], label_count: int) -> tuple[int, int, int, int]:
        axis = _canonical_axis(self, self.axis_param, len(shape), "softmax_param.axis")
        outer, channels, inner = _count(shape[:axis]), shape[axis], _count(shape[axis + 1 :])
        if label_count != outer * inner:
            raise self.error(
                f"bottom {_bottom_name(self, 1)} has {label_count} labels but the scores {shape} with "
                f"softmax axis {axis} need outer*inner = {outer * inner}; give one label per position"
            )
        return axis, outer, channels, inner

    def _plan(self, x: Tensor, label: Tensor) -> tuple:
        """(outer, channels, inner, (normalizer, whether it is the number of positions) or None
        when the mask decides it), kept per input shape, dtype and device (per-call host time
        counts on a GPU)."""

        def plan() -> tuple:
            _, outer, channels, inner = self._dims(tuple(x.shape), label.numel())
            fixed = None
            if not self.has_ignore_label:
                n = _normalizer_count(self.normalization, outer, inner)
                fixed = (scalar_tensor(n, x.dtype, x.device), n == outer * inner)
            return outer, channels, inner, fixed

        return self.per_shape("_shape_plan", (x.shape, label.numel(), x.dtype, x.device), plan)

    def forward(self, x: Tensor, label: Tensor) -> tuple[Tensor, ...]:
        outer, channels, inner, fixed = self._plan(x, label)
        labels = _as_labels(label).reshape((outer, inner, 1) if inner > 1 else (outer,))
        valid = labels != self.ignore_label if self.has_ignore_label else None  # None: no mask
        labels = _check_label_range(
            self, labels, valid, channels, raw=label, ignore_label=self.ignore_label if self.has_ignore_label else None
        )
        if inner > 1:
            scores = x.reshape(outer, channels, inner, 1)
        else:  # (outer, C) as given: no view, nor its node in the backward
            scores = x if x.dim() == 2 else x.reshape(outer, channels)
        if fixed is not None:
            loss = _SoftmaxLossFunction.apply(scores, labels, fixed[0], _IGNORED, fixed[1])
        else:  # ignored positions: nll_loss's ignore_index, the normalizer from the mask
            target = torch.where(valid, labels, _IGNORED)
            normalizer = _normalizer(self.normalization, outer, inner, valid, x)
            loss = _SoftmaxLossFunction.apply(scores, target, normalizer, _IGNORED, False)
        if self.num_tops > 1:  # Caffe's probabilities; a gradient arriving on them is ignored
            return loss, torch.softmax(scores.detach(), 1).reshape(x.shape)
        return (loss,)


@register_layer("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLossLayer(Layer):
    """Cross-entropy of sigmoid(x) against targets t in [0, 1], in the stable form.

    ``loss = -sum_{valid} [x (t - [x >= 0]) - log(1 + exp(x - 2x[x >= 0]))] / normalizer``

    Parameters: ``loss_param.ignore_label`` (unset: none; an item is ignored when
    ``int(t) == ignore_label``); ``loss_param.normalization``, which here defaults to BATCH_SIZE
    when neither it nor the legacy ``normalize`` is set. FULL = N*count(1); VALID = the number
    of non-ignored items (N*count(1) without ignore_label); BATCH_SIZE = N; NONE = 1; at least 1.
    Bottoms: scores x and targets t of the same count, same first dimension. Top: 0-d loss.
    Gradient: ``(sigmoid(x) - t) / normalizer`` to x (0 at ignored items), none to t.
    """

    exact_num_bottom = 2
    exact_num_top = 1
    is_loss = True

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        lp = self.param.loss_param
        self.has_ignore_label = lp.HasField("ignore_label")
        self.ignore_label = lp.ignore_label
        self.normalization = _normalization(lp, _NORM.BATCH_SIZE)
        self._check(bottom_shapes)

    def _check(self, shapes) -> None:
        _check_first_dims(self, shapes)
        if _count(shapes[0]) != _count(shapes[1]):
            raise self.error(
                f"scores {shapes[0]} and targets {shapes[1]} (bottom {_bottom_name(self, 1)}) must have the same count"
            )

    def forward(self, x: Tensor, target: Tensor) -> tuple[Tensor]:
        self._check([tuple(x.shape), tuple(target.shape)])
        t = target.detach().reshape(x.shape).to(x.dtype)
        if self.has_ignore_label:
            valid = _as_labels(t) != self.ignore_label
        else:
            valid = torch.ones(x.shape, dtype=torch.bool, device=x.device)
        outer = x.shape[0]
        normalizer = _normalizer(self.normalization, outer, x.numel() // max(outer, 1), valid, x)
        return (_SigmoidCrossEntropyFunction.apply(x, t, valid, normalizer),)


@register_layer("HingeLoss")
class HingeLossLayer(Layer):
    """One-vs-all hinge loss.

    With x viewed as (N, D), D = count/N, and ``s[i, k] = -1`` if ``k == label_i`` else ``+1``:
    ``m = max(0, 1 + s x)``; L1: ``loss = sum(m) / N``; L2: ``loss = sum(m^2) / N``.

    Parameters: ``hinge_loss_param.norm`` (L1). Bottoms: scores (N, …) and N labels in [0, D).
    Top: 0-d loss. Gradient: ``s * [m > 0] / N`` (L1), ``2 s m / N`` (L2); none to the labels.
    """

    exact_num_bottom = 2
    exact_num_top = 1
    is_loss = True
    checks_labels = True

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        self.norm = self.param.hinge_loss_param.norm
        if self.norm not in (caffe_pb2.HingeLossParameter.L1, caffe_pb2.HingeLossParameter.L2):
            raise self.error(f"hinge_loss_param.norm = {self.norm} is unknown; use L1 or L2")
        self._check(bottom_shapes)

    def _check(self, shapes) -> None:
        _check_one_label_per_item(self, shapes)

    def forward(self, x: Tensor, label: Tensor) -> tuple[Tensor]:
        self._check([tuple(x.shape), tuple(label.shape)])
        n = x.shape[0]
        x2 = x.reshape(n, -1)
        labels = _as_labels(label).reshape(n, 1)
        labels = _check_label_range(self, labels, None, x2.shape[1], raw=label)
        sign = torch.ones_like(x2).scatter(1, labels, -1.0)
        # relu's gradient at 0 is 0, as Caffe's sign(0) in the L1 backward.
        margin = torch.relu(1 + sign * x2)
        if self.norm == caffe_pb2.HingeLossParameter.L1:
            return (margin.sum() / n,)
        return ((margin * margin).sum() / n,)


@register_layer("InfogainLoss")
class InfogainLossLayer(Layer):
    """Infogain loss of probabilities against labels, as in Caffe 1.0.

    With p viewed as (N, D), D = count/N: ``loss = -sum_i sum_k H[l_i, k] log(max(p[i,k], 1e-20)) / N``.

    H (D x D) comes from ``infogain_loss_param.source`` (a .binaryproto, path relative to the
    current working directory, read once at construction) or, when given, from a third bottom
    (D x D values, no gradient). Bottoms: probabilities (N, …), N labels in [0, D), [H].
    Top: 0-d loss. Gradient: ``-H[l_i, k] / (N max(p[i,k], 1e-20))`` to p only.

    Deliberate difference from Caffe master: bottom 0 is taken as probabilities, with no softmax,
    no ``axis`` and a fixed division by N, which is what Caffe 1.0 (the conformance build) does;
    ``infogain_loss_param.axis`` other than 1, ``loss_param.ignore_label`` and a
    ``loss_param.normalization`` other than BATCH_SIZE are refused rather than ignored.
    """

    min_bottom = 2
    max_bottom = 3
    exact_num_top = 1
    is_loss = True
    checks_labels = True

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        ip, lp = self.param.infogain_loss_param, self.param.loss_param
        if ip.axis != 1:
            raise self.error(
                f"infogain_loss_param.axis = {ip.axis} is not supported (Caffe 1.0's InfogainLoss "
                "flattens every axis after the first); remove it"
            )
        if lp.HasField("ignore_label"):
            raise self.error("loss_param.ignore_label is not supported by InfogainLoss (Caffe 1.0); remove it")
        if _normalization(lp, _NORM.BATCH_SIZE) != _NORM.BATCH_SIZE:
            raise self.error(
                "loss_param.normalization other than BATCH_SIZE is not supported by InfogainLoss "
                "(Caffe 1.0 divides by the batch size); remove it"
            )
        self.register_buffer("infogain", None, persistent=False)
        if len(bottom_shapes) < 3:
            if not ip.source:
                raise self.error(
                    "infogain_loss_param.source must name the .binaryproto holding H (or give H as bottom 2)"
                )
            if not os.path.isfile(ip.source):
                raise self.error(
                    f"infogain_loss_param.source {ip.source!r} not found (relative to the working "
                    f"directory {os.getcwd()!r}); run from the folder it is relative to or give an absolute path"
                )
            try:
                array = blob_to_array(read_blobproto(ip.source), what=f"infogain matrix {ip.source!r}")
            except CaffeError as exc:  # a corrupt file: say which one, for which layer
                raise self.error(f"cannot read the infogain matrix: {exc}") from exc
            self.infogain = torch.as_tensor(array, dtype=torch.float32).reshape(-1)
        self._check(bottom_shapes)

    def _check(self, shapes) -> None:
        _check_first_dims(self, shapes)
        n = shapes[0][0]
        dim = _count(shapes[0]) // n if n else 0
        if _count(shapes[1]) != n:
            raise self.error(f"bottom {_bottom_name(self, 1)} {shapes[1]} must hold one label per item ({n})")
        h_count = _count(shapes[2]) if len(shapes) > 2 else int(self.infogain.numel())
        if h_count != dim * dim:
            what = f"bottom {_bottom_name(self, 2)}" if len(shapes) > 2 else repr(self.param.infogain_loss_param.source)
            raise self.error(f"the infogain matrix ({what}) has {h_count} values; it must be {dim} x {dim}")

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0

    def forward(self, prob: Tensor, label: Tensor, *infogain: Tensor) -> tuple[Tensor]:
        shapes = [tuple(prob.shape), tuple(label.shape)] + [tuple(h.shape) for h in infogain]
        self._check(shapes)
        n = prob.shape[0]
        p2 = prob.reshape(n, -1)
        dim = p2.shape[1]
        h = infogain[0].detach() if infogain else self.infogain
        h = h.to(device=prob.device, dtype=prob.dtype).reshape(dim, dim)
        labels = _as_labels(label).reshape(n)
        labels = _check_label_range(self, labels, None, dim, raw=label)
        return (_InfogainFunction.apply(p2, h[labels]),)


@register_layer("ContrastiveLoss")
class ContrastiveLossLayer(Layer):
    """Contrastive loss of pairs (a_i, b_i) with similarity labels y_i (non-zero: similar).

    ``d_i^2 = ||a_i - b_i||^2``; ``loss = sum_i [y_i d_i^2 + (1 - y_i) D_i] / (2N)`` with
    ``D_i = max(margin - d_i, 0)^2``, or ``max(margin - d_i^2, 0)`` when ``legacy_version``.

    Parameters: ``contrastive_loss_param.margin`` (1.0), ``legacy_version`` (false).
    Bottoms: a and b (N, C[, 1, 1]), y with N values. Top: 0-d loss.
    Gradient (Caffe's, not autograd's): similar ``±(a-b)/N``; dissimilar with positive margin
    term ``∓(a-b) (margin - d) / (N (d + 1e-4))`` (legacy: ``∓(a-b)/N``). Both a and b receive a
    gradient (force_backward may reach b), y none.
    """

    exact_num_bottom = 3
    exact_num_top = 1
    is_loss = True

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        cp = self.param.contrastive_loss_param
        self.margin = float(cp.margin)
        self.legacy = bool(cp.legacy_version)
        self._check(bottom_shapes)

    def _check(self, shapes) -> None:
        _check_first_dims(self, shapes)
        a, b, y = shapes
        if _count(a) != _count(b) or _count(a[1:]) != _count(b[1:]):
            raise self.error(
                f"bottoms {_bottom_name(self, 0)} {a} and {_bottom_name(self, 1)} {b} must have the same shape"
            )
        if _count(y) != a[0]:
            raise self.error(f"bottom {_bottom_name(self, 2)} {y} must hold one similarity label per pair ({a[0]})")

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2

    def forward(self, a: Tensor, b: Tensor, sim: Tensor) -> tuple[Tensor]:
        self._check([tuple(a.shape), tuple(b.shape), tuple(sim.shape)])
        n = a.shape[0]
        similar = _as_labels(sim).reshape(n) != 0
        return (_ContrastiveFunction.apply(a.reshape(n, -1), b.reshape(n, -1), similar, self.margin, self.legacy),)


@register_layer("MultinomialLogisticLoss")
class MultinomialLogisticLossLayer(Layer):
    """Multinomial logistic loss of probabilities: ``loss = -sum_i log(max(p[i, l_i], 1e-20)) / N``.

    Bottoms: probabilities viewed as (N, D), D = count/N (e.g. a Softmax output) and N labels
    in [0, D). Top: 0-d loss. Gradient: ``-1/(N max(p[i, l_i], 1e-20))`` at the label entries,
    0 elsewhere (the clamp does not zero it); none to the labels.
    """

    exact_num_bottom = 2
    exact_num_top = 1
    is_loss = True
    checks_labels = True

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        self._check(bottom_shapes)

    def _check(self, shapes) -> None:
        _check_one_label_per_item(self, shapes)

    def forward(self, prob: Tensor, label: Tensor) -> tuple[Tensor]:
        self._check([tuple(prob.shape), tuple(label.shape)])
        n = prob.shape[0]
        p2 = prob.reshape(n, -1)
        labels = _as_labels(label).reshape(n, 1)
        labels = _check_label_range(self, labels, None, p2.shape[1], raw=label)
        return (_MultinomialLogisticFunction.apply(p2, labels),)


@register_layer("Accuracy")
class AccuracyLayer(Layer):
    """Top-k classification accuracy (not a loss layer; no gradient).

    With scores viewed as (outer, C, inner) around ``axis``, a position with label l is correct
    iff ``#{k != l : score_k >= score_l} < top_k`` (ties count against). ``top[0] = correct /
    counted`` (0 when nothing is counted); positions whose label equals ``ignore_label`` are not
    counted. Optional ``top[1]`` (shape (C,)): per-class accuracy, 0 for classes absent here.

    Parameters: ``accuracy_param.top_k`` (1, at most C), ``axis`` (1), ``ignore_label`` (unset).
    Bottoms: scores and outer*inner labels in [0, C). Tops: 0-d accuracy, [per-class (C,)].
    Difference from Caffe: force_backward never asks Accuracy for a gradient (Caffe would abort
    with "Not Implemented").
    """

    exact_num_bottom = 2
    min_top = 1
    max_top = 2
    checks_labels = True

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        ap = self.param.accuracy_param
        self.top_k = int(ap.top_k)
        self.axis_param = ap.axis
        self.has_ignore_label = ap.HasField("ignore_label")
        self.ignore_label = ap.ignore_label
        self._dims(bottom_shapes[0], _count(bottom_shapes[1]))

    def _dims(self, shape: tuple[int, ...], label_count: int) -> tuple[int, int, int]:
        axis = _canonical_axis(self, self.axis_param, len(shape), "accuracy_param.axis")
        outer, channels, inner = _count(shape[:axis]), shape[axis], _count(shape[axis + 1 :])
        if self.top_k > channels:
            raise self.error(f"accuracy_param.top_k = {self.top_k} exceeds the number of classes {channels}")
        if label_count != outer * inner:
            raise self.error(
                f"bottom {_bottom_name(self, 1)} has {label_count} labels but the scores {shape} with "
                f"axis {axis} need outer*inner = {outer * inner}; give one label per position"
            )
        return outer, channels, inner

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False

    def forward(self, x: Tensor, label: Tensor) -> tuple[Tensor, ...]:
        outer, channels, inner = self._dims(tuple(x.shape), label.numel())
        with torch.no_grad():
            scores = x.detach().reshape(outer, channels, inner)
            labels = _as_labels(label).reshape(outer, 1, inner)
            if self.has_ignore_label:
                valid = labels != self.ignore_label
            else:
                valid = torch.ones_like(labels, dtype=torch.bool)
            labels = _check_label_range(
                self,
                labels,
                valid,
                channels,
                raw=label,
                ignore_label=self.ignore_label if self.has_ignore_label else None,
            )
            target = torch.where(valid, labels, torch.zeros_like(labels))
            true_score = scores.gather(1, target)
            # Counts the true class itself too, hence the -1 (as Caffe's num_better_predictions).
            better = (scores >= true_score).sum(dim=1, keepdim=True) - 1
            correct = (better < self.top_k) & valid
            count = valid.sum().to(x.dtype)
            hits = correct.sum().to(x.dtype)
            zero = torch.zeros((), dtype=x.dtype, device=x.device)
            accuracy = torch.where(count > 0, hits / torch.clamp(count, min=1.0), zero)
            if self.num_tops < 2:
                return (accuracy,)
            flat = target.reshape(-1)
            per_class_n = torch.zeros(channels, dtype=x.dtype, device=x.device).scatter_add(
                0, flat, valid.reshape(-1).to(x.dtype)
            )
            per_class_hits = torch.zeros(channels, dtype=x.dtype, device=x.device).scatter_add(
                0, flat, correct.reshape(-1).to(x.dtype)
            )
            per_class = torch.where(
                per_class_n > 0, per_class_hits / torch.clamp(per_class_n, min=1.0), torch.zeros_like(per_class_n)
            )
            return accuracy, per_class
