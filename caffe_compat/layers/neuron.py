"""Caffe's neuron layers: elementwise functions of one bottom, top shaped like the bottom.

Every layer here takes exactly one bottom and gives one top of the same shape. Gradients are
torch autograd through ``forward`` except where Caffe's backward is not the derivative autograd
would take (BNLL at 0, Power where its base is 0): those use a ``torch.autograd.Function`` with
Caffe's formula.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from caffe_compat.layers.base import Layer, register_layer

__all__ = [
    "ReLULayer",
    "PReLULayer",
    "SigmoidLayer",
    "TanHLayer",
    "ELULayer",
    "AbsValLayer",
    "BNLLLayer",
    "PowerLayer",
    "ExpLayer",
    "LogLayer",
    "ThresholdLayer",
    "DropoutLayer",
    "ClipLayer",
    "SwishLayer",
]

# Caffe's kBNLL_THRESHOLD: the backward clamps its exponent to this value.
_BNLL_THRESHOLD = 50.0


class _NeuronLayer(Layer):
    """One bottom, one top of the same shape."""

    exact_num_bottom = 1
    exact_num_top = 1


@register_layer("ReLU")
class ReLULayer(_NeuronLayer):
    """Rectified linear unit, optionally leaky.

    ``y = x if x > 0 else negative_slope * x``;
    Caffe's gradient ``dy * ((x > 0) + negative_slope * (x <= 0))`` (slope at exactly 0).

    Parameters (``relu_param``): ``negative_slope`` (0). ``engine`` is accepted and ignored
    (every engine computes the same function).

    Bottom: any shape. Top: same shape.

    Computed with ``F.relu`` / ``F.leaky_relu``, whose gradients are Caffe's (at x = 0:
    0, resp. ``negative_slope``). ``forward_inplace`` overwrites the bottom; the net calls it
    for an in-place ReLU (top == bottom) when nothing else needs the bottom's old values.
    """

    layout_neutral = True

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        self.negative_slope = float(self.param.relu_param.negative_slope)

    def fused_activation(self) -> tuple[str, list]:
        """oneDNN's ``relu``, or ``leaky_relu`` with the negative slope."""
        return ("relu", [None]) if self.negative_slope == 0.0 else ("leaky_relu", [self.negative_slope])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.negative_slope == 0.0:
            return (F.relu(x),)
        return (F.leaky_relu(x, self.negative_slope),)

    def forward_inplace(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``forward`` writing into ``x`` (the net decides when that is safe)."""
        if self.negative_slope == 0.0:
            return (F.relu_(x),)
        if self.negative_slope > 0.0:
            return (F.leaky_relu_(x, self.negative_slope),)
        return self.forward(x)  # torch's in-place leaky ReLU has no backward for a negative slope


@register_layer("PReLU")
class PReLULayer(_NeuronLayer):
    """Parametric ReLU: ``y = x if x > 0 else a_c * x`` with a learned slope per channel.

    Parameters (``prelu_param``): ``filler`` (unset: constant 0.25), ``channel_shared`` (false).

    Blobs: ``[a]``, shape ``(C,)`` with C = bottom.shape[1], or shape ``()`` (a scalar, as
    Caffe makes it) when ``channel_shared``.

    Bottom: ``(N, C, ...)`` with at least 2 axes. Top: same shape. Gradient of ``a_c``:
    ``sum(dy * x * (x <= 0))`` over all but the channel axis.
    """

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.prelu_param
        shape = bottom_shapes[0]
        if len(shape) < 2:
            raise self.error(f"bottom must have at least 2 axes, like (N, C); got shape {shape}")
        self.channel_shared = bool(p.channel_shared)
        blob_shape = () if self.channel_shared else (shape[1],)
        if p.HasField("filler"):
            self.add_blob(blob_shape, p.filler)
        else:
            self.add_blob(blob_shape, value=0.25)

    def top_shapes(self, bottom_shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        shape = tuple(bottom_shapes[0])
        if not self.channel_shared and (len(shape) < 2 or shape[1] != self.blobs[0].shape[0]):
            raise self.error(
                f"bottom {shape} does not have the {self.blobs[0].shape[0]} channels (axis 1) of the "
                f"slope blob: the channel count cannot change after setup"
            )
        return [shape]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.blobs[0]
        if not self.channel_shared:
            if x.dim() < 2 or x.shape[1] != a.shape[0]:
                raise self.error(
                    f"bottom has {x.shape[1] if x.dim() > 1 else 'no'} channels (axis 1) but the "
                    f"slope blob has {a.shape[0]}: the channel count cannot change after setup"
                )
            a = a.reshape((a.shape[0],) + (1,) * (x.dim() - 2))
        return (torch.where(x > 0, x, x * a),)


@register_layer("Sigmoid")
class SigmoidLayer(_NeuronLayer):
    """``y = 1 / (1 + exp(-x))``; gradient ``dy * y * (1 - y)``.

    Parameters (``sigmoid_param``): ``engine`` only (ignored). Bottom: any shape. Top: same.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (torch.sigmoid(x),)


@register_layer("TanH")
class TanHLayer(_NeuronLayer):
    """``y = tanh(x)``; gradient ``dy * (1 - y^2)``.

    Parameters (``tanh_param``): ``engine`` only (ignored). Bottom: any shape. Top: same.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (torch.tanh(x),)


@register_layer("ELU")
class ELULayer(_NeuronLayer):
    """Exponential linear unit: ``y = x if x > 0 else alpha * (exp(x) - 1)``.

    Gradient ``dy if x > 0 else dy * (y + alpha)`` (so ``alpha * dy`` at x = 0).
    Parameters (``elu_param``): ``alpha`` (1). Bottom: any shape. Top: same shape.
    """

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        self.alpha = float(self.param.elu_param.alpha)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # exp of min(x, 0): the unused branch must not overflow (inf * 0 = NaN in backward).
        neg = self.alpha * (torch.exp(torch.clamp(x, max=0)) - 1)
        return (torch.where(x > 0, x, neg),)


@register_layer("AbsVal")
class AbsValLayer(_NeuronLayer):
    """``y = |x|``; gradient ``dy * sign(x)`` with sign(0) = 0. Bottom: any shape. Top: same."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (torch.abs(x),)


class _BNLLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.where(x > 0, x + torch.log1p(torch.exp(-x)), torch.log1p(torch.exp(x)))

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        e = torch.exp(torch.clamp(x, max=_BNLL_THRESHOLD))
        return dy * e / (e + 1)


@register_layer("BNLL")
class BNLLLayer(_NeuronLayer):
    """Binomial normal log likelihood (softplus) in Caffe's stable form.

    ``y = x + log(1 + exp(-x)) if x > 0 else log(1 + exp(x))``;
    gradient ``dy * e / (e + 1)`` with ``e = exp(min(x, 50))`` (0.5 at x = 0).
    Bottom: any shape. Top: same shape.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (_BNLLFunction.apply(x),)


def _c_pow(base: float, exponent: float) -> float:
    """C's pow for the constant top of Power: NaN (not an exception) for a negative base
    with a non-integer exponent, 1 for exponent 0."""
    if exponent == 0:
        return 1.0
    try:
        return math.pow(base, exponent)
    except (ValueError, ZeroDivisionError):
        return math.nan if base < 0 else math.inf


class _PowerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, power: float, scale: float, shift: float) -> torch.Tensor:
        ctx.power, ctx.scale, ctx.shift = power, scale, shift
        diff_scale = power * scale
        if diff_scale == 0:
            ctx.save_for_backward(x, x)
            return torch.full_like(x, _c_pow(shift, power))
        base = x
        if scale != 1:
            base = base * scale
        if shift != 0:
            base = base + shift
        y = base if power == 1 else torch.pow(base, power)
        ctx.save_for_backward(x, y)
        return y if y is not x else x.clone()

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, y = ctx.saved_tensors
        power, scale, shift = ctx.power, ctx.scale, ctx.shift
        diff_scale = power * scale
        if diff_scale == 0 or power == 1:
            grad = torch.full_like(x, diff_scale)
        elif power == 2:
            grad = (diff_scale * scale) * x + diff_scale * shift
        elif shift == 0:
            # Caffe: power * y / x, NaN where x == 0.
            grad = power * (y / x)
        else:
            # Caffe: diff_scale * y / (shift + scale * x), NaN where the base is 0.
            grad = diff_scale * (y / (x * scale + shift))
        return dy * grad, None, None, None


@register_layer("Power")
class PowerLayer(_NeuronLayer):
    """``y = (shift + scale * x) ^ power``.

    Parameters (``power_param``): ``power`` (1), ``scale`` (1), ``shift`` (0).

    Gradient as Caffe computes it: ``power * scale == 0`` gives 0 (the top is then the
    constant ``shift ^ power``, 1 when power is 0); ``power == 1`` gives ``scale``;
    ``power == 2`` gives ``2 * scale * (shift + scale * x)``; otherwise
    ``power * scale * y / (shift + scale * x)``. Like Caffe this last form is NaN where the base
    is exactly 0 (autograd would give 0 or inf there): a faithful copy, not a fix.

    Bottom: any shape. Top: same shape.
    """

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.power_param
        self.power = float(p.power)
        self.scale = float(p.scale)
        self.shift = float(p.shift)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (_PowerFunction.apply(x, self.power, self.scale, self.shift),)


def _log_of_base(layer: Layer, base: float) -> float:
    """ln(base) for Exp/Log, with base -1 meaning e; Caffe refuses bases <= 0."""
    if base == -1:
        return 1.0
    if not base > 0:
        raise layer.error(f"base must be strictly positive, or -1 for base e; got {base}")
    return math.log(base)


@register_layer("Exp")
class ExpLayer(_NeuronLayer):
    """``y = base ^ (shift + scale * x)``, computed as ``base^shift * exp(ln(base) * scale * x)``.

    Parameters (``exp_param``): ``base`` (-1 = e; otherwise must be > 0), ``scale`` (1),
    ``shift`` (0). Gradient ``dy * y * ln(base) * scale``. Bottom: any shape. Top: same shape.
    """

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.exp_param
        log_base = _log_of_base(self, float(p.base))
        self.inner_scale = log_base * float(p.scale)
        self.outer_scale = 1.0 if p.shift == 0 else math.exp(log_base * float(p.shift))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = torch.exp(x * self.inner_scale) if self.inner_scale != 1 else torch.exp(x)
        if self.outer_scale != 1:
            y = y * self.outer_scale
        return (y,)


@register_layer("Log")
class LogLayer(_NeuronLayer):
    """``y = log_base(shift + scale * x)``.

    Parameters (``log_param``): ``base`` (-1 = e; otherwise must be > 0 and != 1), ``scale`` (1),
    ``shift`` (0). Gradient ``dy * scale / (ln(base) * (shift + scale * x))``.
    Bottom: any shape. Top: same shape.
    """

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.log_param
        log_base = _log_of_base(self, float(p.base))
        if log_base == 0:
            raise self.error("base 1 has no logarithm (ln(1) = 0): use another base, or -1 for e")
        self.base_scale = 1.0 / log_base
        self.scale = float(p.scale)
        self.shift = float(p.shift)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.scale != 1:
            x = x * self.scale
        if self.shift != 0:
            x = x + self.shift
        y = torch.log(x)
        if self.base_scale != 1:
            y = y * self.base_scale
        return (y,)


@register_layer("Threshold")
class ThresholdLayer(_NeuronLayer):
    """``y = 1 if x > threshold else 0``.

    Parameters (``threshold_param``): ``threshold`` (0).

    Caffe has no backward for this layer (it aborts if asked); here the top is not connected
    to the bottom's graph, so no gradient flows through it. Bottom: any shape. Top: same.
    """

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        self.threshold = float(self.param.threshold_param.threshold)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return ((x.detach() > self.threshold).to(x.dtype),)


@register_layer("Dropout")
class DropoutLayer(_NeuronLayer):
    """Dropout, by the layer's phase.

    TRAIN: ``y = x * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` drawn anew each forward from
    torch's global RNG (the same distribution as Caffe's, not the same bits); gradient
    ``dy * m / (1 - p)``. TEST: ``y = x`` (a copy, as Caffe copies; in place, x itself). On a GPU, when ``1/(1 - p)``
    is a power of two (p = 0.5, 0.75...), torch's fused dropout kernel draws the mask (same values:
    products by a power of two are exact).

    Parameters (``dropout_param``): ``dropout_ratio`` p (0.5), must lie in [0, 1).
    Bottom: any shape. Top: same shape.
    """

    #: (``Layer.layout_neutral``) the same values for a channels-last bottom
    layout_neutral = True

    def flops(self, bottom_shapes, top_shapes) -> int:
        """``count`` in TRAIN (the mask and scale), 0 in TEST (a copy)."""
        return sum(math.prod(s) for s in top_shapes) if self.train_phase else 0

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        from caffe_compat.proto import caffe_pb2

        self.ratio = float(self.param.dropout_param.dropout_ratio)
        if not 0.0 <= self.ratio < 1.0:
            raise self.error(f"dropout_param.dropout_ratio must be in [0, 1); got {self.ratio}")
        self.scale = 1.0 / (1.0 - self.ratio)
        self.train_phase = self.phase == caffe_pb2.TRAIN
        p = self.param
        self._in_place = len(p.top) == 1 and len(p.bottom) == 1 and p.top[0] == p.bottom[0]
        mantissa, _ = math.frexp(self.scale)
        self._fused_ok = mantissa == 0.5 and self.ratio > 0.0  # scale 2, 4, 8...: exact in any order

    def top_shapes(self, bottom_shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return [tuple(bottom_shapes[0])]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.train_phase:
            # Caffe copies bottom to top; in place (top = bottom) that copy changes nothing
            return (x,) if self._in_place else (x.clone(),)
        if self._fused_ok and x.is_cuda:
            # one fused kernel (mask and product) with a 1-byte mask kept for the backward; a
            # power-of-two scale makes x/(1-p), x·scale and (x·m)·scale the same bits
            y = F.dropout(x, self.ratio, True)
            self._last = (None, y)
            return (y,)
        keep = torch.full_like(x, 1.0 - self.ratio)
        # m·scale is 0 or scale, so x·(m·scale) equals Caffe's (x·m)·scale bit for bit
        mask = torch.bernoulli(keep).mul_(self.scale)
        self._last = (mask, None)
        return (x * mask,)

    def recompute(self, bottoms, tops):
        """The last forward's mask again (Caffe's backward reads its ``rand_vec_``); after the
        fused CUDA kernel, which keeps no mask, the mask is where the top is non-zero."""
        (x,) = bottoms
        last = self.__dict__.get("_last")
        if not self.train_phase or last is None:
            return self.forward(x)
        mask, y = last
        if mask is None:
            mask = (y.detach() != 0).to(x.dtype) * self.scale
        if mask.shape != x.shape:
            raise self.error(
                f"backward: the last forward's mask has shape {list(mask.shape)}, the bottom {list(x.shape)}"
            )
        return (x * mask,)


@register_layer("Clip")
class ClipLayer(_NeuronLayer):
    """``y = max(min, min(x, max))``; gradient ``dy * (min <= x <= max)``.

    Parameters (``clip_param``): ``min``, ``max`` (both required). Deliberate difference:
    ``min > max`` is refused here (Caffe would output ``min`` everywhere).
    Bottom: any shape. Top: same shape.
    """

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.clip_param
        if not (p.HasField("min") and p.HasField("max")):
            raise self.error("clip_param needs both min and max")
        self.min = float(p.min)
        self.max = float(p.max)
        if self.min > self.max:
            raise self.error(f"clip_param.min ({self.min}) is greater than clip_param.max ({self.max})")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (torch.clamp(x, self.min, self.max),)


@register_layer("Swish")
class SwishLayer(_NeuronLayer):
    """``y = x * sigmoid(beta * x)``; gradient ``dy * (beta * y + s * (1 - beta * y))``, s the sigmoid.

    Parameters (``swish_param``): ``beta`` (1). Bottom: any shape. Top: same shape.
    """

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        self.beta = float(self.param.swish_param.beta)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x * torch.sigmoid(x * self.beta),)
