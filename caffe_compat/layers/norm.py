"""Normalization layers: LRN, BatchNorm, MVN (BVLC/caffe src/caffe/layers/lrn_layer.cpp,
batch_norm_layer.cpp, mvn_layer.cpp)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from caffe_compat.layers.base import Layer, register_layer, scalar_tensor
from caffe_compat.proto import caffe_pb2

__all__ = ["LRNLayer", "BatchNormLayer", "MVNLayer", "lrn_across_channels"]

_LRN = caffe_pb2.LRNParameter


# How the LRN sums its windows: None (default) adds shifted slices on the CPU (size − 1 vectorized
# additions, the fastest there at AlexNet's sizes) and reduces an unfolded view elsewhere (one
# kernel instead of size − 1 and one pass over memory instead of size − 1: what counts on a GPU).
# True / False force one way (the tests, and bench_overhead.py's GPU code paths on the CPU).
WINDOW_BY_REDUCTION: bool | None = None


def _window_sum_into(out: torch.Tensor, padded: torch.Tensor, size: int) -> None:
    """``out[:, c] = Σ_{d < size} padded[:, c + d]``: the sum over a window of ``size`` channels
    of a tensor stored with (size − 1)/2 zero channels on each side (``out`` has C channels)."""
    c = out.shape[1]
    if size == 1:
        out.copy_(padded[:, :c])
        return
    by_reduction = WINDOW_BY_REDUCTION
    if by_reduction if by_reduction is not None else out.device.type != "cpu":
        torch.sum(padded.unfold(1, size, 1), dim=-1, out=out)
        return
    torch.add(padded[:, 0:c], padded[:, 1 : 1 + c], out=out)
    for d in range(2, size):
        out.add_(padded[:, d : d + c])


def _pow_neg(scale: torch.Tensor, beta: float, out: torch.Tensor) -> torch.Tensor:
    """``scale^−β`` into ``out``; on the CPU β = 0.75 (AlexNet's, GoogLeNet's) as
    ``rsqrt(s)·√rsqrt(s)``, three cheap vector ops instead of a transcendental ``pow`` (within
    3e-7 relative); on a GPU one ``pow`` kernel (one launch instead of three)."""
    if scale.device.type != "cpu":
        return torch.pow(scale, -beta, out=out)
    if beta == 0.75:
        torch.rsqrt(scale, out=out)
        return out.mul_(out.sqrt())
    if beta == 0.5:
        return torch.rsqrt(scale, out=out)
    if beta == 1.0:
        return torch.reciprocal(scale, out=out)
    return torch.pow(scale, -beta, out=out)


# Images per step of the LRN's element-wise chain: about this many values at a time, so that
# its ~10 passes run in the CPU's cache (AlexNet's norm1 at batch 10: forward+backward 13.5 ->
# 10.4 ms). The same operations on every element, hence the same values as whole tensors.
_LRN_CHUNK_VALUES = 1 << 18


def _lrn_step(x: torch.Tensor) -> int:
    """Images per step of the LRN chain (the whole batch off the CPU)."""
    n = x.shape[0]
    if x.device.type != "cpu" or n <= 1:
        return max(n, 1)
    return max(1, _LRN_CHUNK_VALUES // max(1, x[0].numel()))


def _pieces(step: int, n: int, *tensors: torch.Tensor):
    """``tensors`` cut into ``step`` images at a time along the batch axis (no views for one piece)."""
    if step >= n:
        return [tensors]
    return [tuple(t[i : i + step] for t in tensors) for i in range(0, n, step)]


def _buffer_like(x: torch.Tensor, lead: tuple[int, int], zero: bool = False) -> torch.Tensor:
    """A buffer of shape ``lead + x.shape[2:]`` in ``x``'s memory format (channels_last or not),
    so that the element-wise chain runs on like-strided tensors."""
    fmt = torch.contiguous_format
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    t = torch.empty(lead + tuple(x.shape[2:]), dtype=x.dtype, device=x.device, memory_format=fmt)
    return t.zero_() if zero else t


def _lrn_forward(x, size, alpha, beta, k, for_backward: bool):
    """``(y, scale^−β, y/scale)``; without ``for_backward`` the last is None (not computed)."""
    if torch.compiler.is_compiling():
        y, powed, over = _lrn_traced_forward(x, size, alpha, beta, k)
        return y, powed, over if for_backward else None
    n, c, pad = x.shape[0], x.shape[1], (size - 1) // 2
    step = _lrn_step(x)
    padded = _buffer_like(x, (min(step, n), c + size - 1), zero=True)
    y, powed, over = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    k_t = scalar_tensor(float(k), x.dtype)  # on the CPU: no host-to-device copy on a GPU
    for xs, ys, r, sc in _pieces(step, n, x, y, powed, over):
        buf = padded[: xs.shape[0]] if step < n else padded
        torch.mul(xs, xs, out=buf[:, pad : pad + c])
        _window_sum_into(sc, buf, size)
        torch.add(k_t, sc, alpha=alpha / size, out=sc)  # scale = k + (α/n)·Σ x²
        _pow_neg(sc, beta, r)
        torch.mul(r, xs, out=ys)
        if for_backward:
            torch.div(ys, sc, out=sc)  # y / scale, in the scale's place
    return y, powed, over if for_backward else None


def _window_sum(padded: torch.Tensor, size: int) -> torch.Tensor:
    """``_window_sum_into`` without ``out=``: a new tensor (what torch.compile can trace)."""
    return padded.unfold(1, size, 1).sum(dim=-1)


def _pad_channels(t: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad(t, (0, 0, 0, 0, pad, pad))


def _lrn_traced_forward(x, size, alpha, beta, k):
    """``_lrn_forward`` in out-of-place operations (inside torch.compile's graph, which cannot
    write through ``out=`` into slices): ``(y, scale^−β, y/scale)``."""
    scale = torch.add(k, _window_sum(_pad_channels(x * x, (size - 1) // 2), size), alpha=alpha / size)
    powed = torch.pow(scale, -beta)
    y = powed * x
    return y, powed, y / scale


def _lrn_traced_backward(g, x, powed, over, size, alpha, beta):
    acc = _window_sum(_pad_channels(g * over, (size - 1) // 2), size)
    return torch.addcmul(g * powed, x, acc, value=-2.0 * alpha * beta / size)


class _LRNAcross(torch.autograd.Function):
    """Fused ACROSS_CHANNELS LRN.

    Forward: ``scale = k + (α/n)·Σ_window x²``, ``y = x·scale^−β``. Backward (Caffe's):
    ``dx = g·scale^−β − (2αβ/n)·x·Σ_window(g·y/scale)``; the forward keeps ``scale^−β`` and
    ``y/scale`` for it (with x: three tensors, the top being kept alive by the net anyway), so the
    backward is a product, a window sum and a multiply-add. Window sums add shifted slices of a
    copy with zero channels on both sides (Caffe's ``padded_square``). On the CPU the chain runs
    ``_lrn_step`` images at a time (in cache).
    """

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        y, powed, over = _lrn_forward(x, size, alpha, beta, k, for_backward=True)
        ctx.save_for_backward(x, powed, over)
        ctx.consts = (size, alpha, beta)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, powed, over = ctx.saved_tensors
        size, alpha, beta = ctx.consts
        if torch.compiler.is_compiling():
            return _lrn_traced_backward(g, x, powed, over, size, alpha, beta), None, None, None, None
        n, c, pad = x.shape[0], x.shape[1], (size - 1) // 2
        step = _lrn_step(x)
        padded = _buffer_like(x, (min(step, n), c + size - 1), zero=True)
        acc = _buffer_like(x, (min(step, n), c))
        dx = torch.empty_like(x)
        for gs, d, xs, r, q in _pieces(step, n, g, dx, x, powed, over):
            m = gs.shape[0]
            buf, a = (padded[:m], acc[:m]) if step < n else (padded, acc)
            torch.mul(gs, q, out=buf[:, pad : pad + c])
            _window_sum_into(a, buf, size)
            torch.mul(gs, r, out=d)
            d.addcmul_(xs, a, value=-2.0 * alpha * beta / size)
        return dx, None, None, None, None


def lrn_across_channels(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """``y = x · (k + (α/n)·Σ_{window of n channels} x²)^−β`` on a 4-D tensor, with Caffe's backward."""
    if x.device.type == "meta":
        return torch.empty_like(x)
    if not (x.requires_grad and torch.is_grad_enabled()):  # inference: no autograd node, no y/scale
        return _lrn_forward(x, size, alpha, beta, k, for_backward=False)[0]
    return _LRNAcross.apply(x, size, alpha, beta, k)


@register_layer("LRN")
class LRNLayer(Layer):
    """Caffe's Local Response Normalization.

    Parameters (``lrn_param``): ``local_size`` n = 5 (odd), ``alpha`` 1, ``beta`` 0.75, ``k`` 1,
    ``norm_region`` ACROSS_CHANNELS | WITHIN_CHANNEL.

    - ACROSS_CHANNELS: ``y = x · (k + (α/n)·Σ_{c' = c−(n−1)/2}^{c+(n−1)/2} x_{c'}²)^−β`` (channels
      outside [0, C) count as zero). Fused forward/backward saving only x and the scale.
    - WITHIN_CHANNEL: ``y = x · (1 + (α/n²)·Σ_{n×n window} x²)^−β`` (zero padding, divisor always
      n²). **k is ignored**: Caffe builds this mode from Power/Pooling/Power/Eltwise layers with a
      fixed shift of 1.

    Bottom ``(N, C, H, W)``; top the same shape. ``engine`` is ignored.
    """

    exact_num_bottom = 1
    exact_num_top = 1
    #: (``Layer.accepts_channels_last``) the across-channels chain keeps its bottom's layout
    #: (``_buffer_like``), the within-channel one pools
    accepts_channels_last = True

    def flops(self, bottom_shapes, top_shapes) -> int:
        """``count · (local_size + 3)`` across channels, ``count · (local_size² + 3)`` within."""
        n = self.size if self.region == _LRN.ACROSS_CHANNELS else self.size * self.size
        return math.prod(bottom_shapes[0]) * (n + 3)

    def setup(self, bottom_shapes):
        lp = self.param.lrn_param
        if lp.local_size % 2 != 1:
            raise self.error(f"lrn_param.local_size must be odd, got {lp.local_size}")
        if len(bottom_shapes[0]) != 4:
            raise self.error(
                f"the bottom must have 4 axes (num, channels, height, width), got shape {bottom_shapes[0]}"
            )
        self.size = lp.local_size
        self.alpha = lp.alpha
        self.beta = lp.beta
        self.k = lp.k
        self.region = lp.norm_region

    def top_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])]

    def forward(self, x):
        if self.region == _LRN.ACROSS_CHANNELS:
            return (lrn_across_channels(x, self.size, self.alpha, self.beta, self.k),)
        pad = (self.size - 1) // 2
        mean_sq = F.avg_pool2d(x * x, self.size, stride=1, padding=pad, count_include_pad=True)
        return (x * (1.0 + self.alpha * mean_sq).pow(-self.beta),)


@register_layer("BatchNorm")
class BatchNormLayer(Layer):
    """Caffe's BatchNorm: normalizes each channel (axis 1) over the batch and spatial axes; no affine
    part (follow it with ``Scale { bias_term: true }``).

    Parameters (``batch_norm_param``): ``use_global_stats`` (unset: true in TEST, false in
    TRAIN), ``moving_average_fraction`` λ = 0.999, ``eps`` 1e-5.

    Blobs (never learned; shapes ``(C,)``, ``(C,)``, ``(1,)``, zero-initialised): the mean
    accumulator, the variance accumulator and the scale factor s.

    - Batch statistics (``use_global_stats`` false): with μ, σ² the batch mean and biased variance
      over the m = count/C values of each channel, ``y = (x − μ)/√(σ² + eps)``; the forward then
      updates, in place: ``s ← λs + 1``, ``acc_μ ← λ·acc_μ + μ``,
      ``acc_σ² ← λ·acc_σ² + m/(m−1)·σ²`` (factor 1 when m = 1). The gradient goes through the
      batch statistics.
    - Global statistics: ``μ = acc_μ/s``, ``σ² = acc_σ²/s`` (both 0 when s = 0, so ``y = x/√eps``),
      ``y = (x − μ)/√(σ² + eps)``.

    Bottom ``(N, C, ...)`` (a 1-D bottom is one channel); top the same shape. Like Caffe, a
    ``param {}`` spec given for a statistics blob must have ``lr_mult: 0``; missing specs are
    added with ``lr_mult: 0`` to this layer's own copy of its LayerParameter.
    """

    exact_num_bottom = 1
    exact_num_top = 1
    blobs_have_gradient = False
    #: (``Layer.accepts_channels_last``) ``batch_norm`` takes any layout
    accepts_channels_last = True

    def flops(self, bottom_shapes, top_shapes) -> int:
        """``2 · count``: subtract the mean, divide by the deviation."""
        return 2 * math.prod(bottom_shapes[0])

    def setup(self, bottom_shapes):
        bp = self.param.batch_norm_param
        shape = bottom_shapes[0]
        if len(shape) == 0:
            raise self.error("the bottom must have at least one axis")
        self.use_global_stats = bp.use_global_stats if bp.HasField("use_global_stats") else self.phase == caffe_pb2.TEST
        self.fraction = bp.moving_average_fraction
        self.eps = bp.eps
        self.channels = 1 if len(shape) == 1 else shape[1]
        for i, spec in enumerate(self.param.param[:3]):
            if spec.lr_mult != 0:
                raise self.error(
                    f"param {i} has lr_mult {spec.lr_mult}: the statistics blobs cannot be learned "
                    "(set lr_mult: 0 or remove the param spec)"
                )
        if len(self.param.param) < 3:
            own = type(self.param)()
            own.CopyFrom(self.param)
            while len(own.param) < 3:
                own.param.add().lr_mult = 0.0
            self.param = own
        self.add_blob((self.channels,))
        self.add_blob((self.channels,))
        self.add_blob((1,))

    def top_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])]

    def _as_nc(self, x):
        if x.dim() == 1:
            return x.reshape(-1, 1)
        if x.shape[1] != self.channels:
            raise self.error(f"expected {self.channels} channels at axis 1, got shape {tuple(x.shape)}")
        return x

    def forward(self, x):
        return self._normalize(x, update=True)

    def channel_affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """With global statistics: ``a = 1/√(σ² + eps)``, ``c = −μ·a`` (μ, σ² the accumulators
        divided by the scale factor s, 0 when s = 0), in float64."""
        if not self.use_global_stats:
            return None
        mean_acc, var_acc, s = (b.detach().double() for b in self.blobs)
        f = 0.0 if float(s[0]) == 0.0 else 1.0 / float(s[0])
        a = 1.0 / (var_acc * f + self.eps).sqrt()
        return a, -mean_acc * f * a

    def recompute(self, bottoms, tops):
        """The same normalisation (batch statistics in training) without updating the
        accumulators a second time."""
        return self._normalize(bottoms[0], update=False)

    def forward_with_affine(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None):
        """The forward (statistics updated alike) followed by the per-channel affine map
        ``y·scale + shift`` of a Scale layer working in place on the top (``scale``, ``shift``:
        its parameters, one value per channel), in one ``batch_norm`` op where the bottom has
        channels at axis 1: one pass over the data instead of three, forward and backward, and
        the same values to float32 rounding (torch applies ``x·(scale/σ) + (shift − μ·scale/σ)``)."""
        return self._normalize(x, update=True, affine=(scale, shift))

    def _normalize(self, x, update: bool, affine: tuple | None = None):
        xc = self._as_nc(x)
        fused = affine if affine is not None and xc is x else (None, None)
        mean_acc, var_acc, s = self.blobs
        if self.use_global_stats:
            with torch.no_grad():
                factor = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
                mean = (mean_acc * factor).to(x.dtype)
                var = (var_acc * factor).to(x.dtype)
            y = F.batch_norm(xc, mean, var, *fused, training=False, eps=self.eps)
            return (_apply_affine(_as_shape(y, x), affine, fused),)
        m = xc.numel() // self.channels
        if m > 1:
            mean = torch.zeros(self.channels, dtype=x.dtype, device=x.device)
            var = torch.ones(self.channels, dtype=x.dtype, device=x.device)
            # momentum 1 makes torch leave the batch mean and the m/(m-1)-unbiased variance there
            y = F.batch_norm(xc, mean, var, *fused, training=True, momentum=1.0, eps=self.eps)
        else:
            fused = (None, None)
            dims = [d for d in range(xc.dim()) if d != 1]
            mu = xc.mean(dim=dims, keepdim=True)
            d = xc - mu
            y = d / ((d * d).mean(dim=dims, keepdim=True) + self.eps).sqrt()
            mean = mu.detach().reshape(-1)
            var = torch.zeros_like(mean)  # one value per channel: variance 0, factor 1
        y = _apply_affine(_as_shape(y, x), affine, fused)
        if not update:
            return (y,)
        with torch.no_grad():
            s.mul_(self.fraction).add_(1.0)
            mean_acc.mul_(self.fraction).add_(mean.to(mean_acc.dtype))
            var_acc.mul_(self.fraction).add_(var.to(var_acc.dtype))
        return (y,)


def _as_shape(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` in ``x``'s shape; ``y`` itself where it has it (a same-shape reshape is a view, and an
    in-place ReLU on a view makes autograd rebuild the whole base in its backward)."""
    return y if y.shape == x.shape else y.reshape(x.shape)


def _apply_affine(y: torch.Tensor, affine: tuple | None, fused: tuple) -> torch.Tensor:
    """``y·scale + shift`` along axis 1 (a 1-D ``y`` is one channel), unless ``batch_norm``
    applied it already (``fused`` holds the parameters it was given)."""
    if affine is None or fused[0] is not None:
        return y
    scale, shift = affine
    view = (1, -1) + (1,) * (y.dim() - 2) if y.dim() > 1 else (-1,)
    y = y * scale.view(view)
    return y + shift.view(view) if shift is not None else y


class _MVNVariance(torch.autograd.Function):
    """``y = (x − mean)/(std + eps)`` per row of a 2-D tensor, with Caffe's backward
    ``dx = (g − mean(g) − mean(g·y)·y)/(std + eps)`` (finite even for a constant row)."""

    @staticmethod
    def forward(ctx, x, eps):
        d = x - x.mean(dim=1, keepdim=True)
        sd = (d * d).mean(dim=1, keepdim=True).sqrt_().add_(eps)
        y = d / sd
        ctx.save_for_backward(y, sd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        y, sd = ctx.saved_tensors
        gx = g - g.mean(dim=1, keepdim=True) - (g * y).mean(dim=1, keepdim=True) * y
        return gx / sd, None


@register_layer("MVN")
class MVNLayer(Layer):
    """Caffe's Mean-Variance Normalization.

    Parameters (``mvn_param``): ``normalize_variance`` true, ``across_channels`` false, ``eps``
    1e-9. Each group — one (n, c) plane, or with ``across_channels`` all of sample n — becomes
    ``y = x − mean``, and with ``normalize_variance`` ``y = (x − mean)/(std + eps)`` where
    ``std = √(mean((x − mean)²))``: **eps is added to the standard deviation**, not the variance.
    The backward is Caffe's, ``(g − mean(g) − mean(g·y)·y)/(std + eps)``, which is the exact
    gradient up to the eps term.

    Bottom ``(N, C, ...)`` (Caffe: up to 4 axes, ``num`` = axis 0, ``channels`` = axis 1); top the
    same shape.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom_shapes):
        mp = self.param.mvn_param
        shape = bottom_shapes[0]
        if not 1 <= len(shape) <= 4:
            raise self.error(f"the bottom must have 1 to 4 axes (Caffe's num/channels/height/width), got {shape}")
        self.normalize_variance = mp.normalize_variance
        self.across_channels = mp.across_channels
        self.eps = mp.eps

    def top_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])]

    def forward(self, x):
        if self.across_channels or x.dim() < 2:
            rows = x.shape[0]
        else:
            rows = x.shape[0] * x.shape[1]
        x2 = x.reshape(rows, -1)
        if self.normalize_variance:
            if x.device.type == "meta":
                return (torch.empty_like(x),)
            y = _MVNVariance.apply(x2, self.eps)
        else:
            y = x2 - x2.mean(dim=1, keepdim=True)
        return (y.reshape(x.shape),)
