"""Pooling (BVLC/caffe src/caffe/layers/pooling_layer.cpp), with Caffe's output-size rule, and spatial
pyramid pooling (spp_layer.cpp) built from it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from caffe_compat.errors import LayerError
from caffe_compat.layers.base import Layer, register_layer
from caffe_compat.proto import caffe_pb2

__all__ = ["PoolingLayer", "SPPLayer", "caffe_pooled_size", "spp_level_geometry"]

_PP = caffe_pb2.PoolingParameter
_SPP = caffe_pb2.SPPParameter
_FLT_MAX = 3.4028234663852886e38
_FLT_MIN_F32 = 1.1754943508222875e-38  # C's FLT_MIN: Caffe's stochastic TEST pooling starts its sum there


class _MaxPoolChannelsLast(torch.autograd.Function):
    """``F.max_pool2d(..., return_indices=True)`` of a contiguous (NCHW) CPU tensor, computed by
    torch's channels_last kernel, which vectorizes over channels (AlexNet's pool1 at batch 10:
    11.5 ms in NCHW, 3.7 ms with both layout conversions). The same maxima and the same first-max
    indices (``h·W + w`` per plane) in NCHW; the backward is torch's NCHW scatter."""

    @staticmethod
    def forward(ctx, x, kernel, stride, pad, ceil):
        y, idx = F.max_pool2d(
            x.contiguous(memory_format=torch.channels_last), kernel, stride, pad, ceil_mode=ceil, return_indices=True
        )
        y, idx = y.contiguous(), idx.contiguous()
        ctx.save_for_backward(x, idx)
        ctx.cfg = (kernel, stride, pad, ceil)
        ctx.mark_non_differentiable(idx)
        return y, idx

    @staticmethod
    def backward(ctx, dy, _didx):
        x, idx = ctx.saved_tensors
        kernel, stride, pad, ceil = ctx.cfg
        dx = torch.ops.aten.max_pool2d_with_indices_backward(
            dy.contiguous(), x, list(kernel), list(stride), list(pad), [1, 1], ceil, idx
        )
        return dx, None, None, None, None


def _max_pool(x: torch.Tensor, kernel, stride, pad, ceil: bool, want_indices: bool):
    """torch's max pooling with indices (or without, if not wanted), through the channels_last
    kernel for contiguous CPU tensors with enough channels to vectorize over."""
    if x.device.type == "cpu" and x.dim() == 4 and x.shape[1] >= 16 and x.is_contiguous() and x.numel() > 0:
        y, idx = _MaxPoolChannelsLast.apply(x, tuple(kernel), tuple(stride), tuple(pad), bool(ceil))
        return (y, idx) if want_indices else (y,)
    if want_indices:
        return F.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil, return_indices=True)
    return (F.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil),)


def caffe_pooled_size(size: int, kernel: int, stride: int, pad: int, ceil: bool, any_pad: bool) -> int:
    """Caffe's pooled size along one axis.

    ``ceil((size + 2·pad − kernel) / stride) + 1`` (``floor`` with ``round_mode: FLOOR``); then,
    when the layer has any padding (``any_pad``: pad_h or pad_w non-zero), the last window must
    start inside the image plus its left padding, else it is dropped.
    """
    q = (size + 2 * pad - kernel) / stride
    out = (math.ceil(q) if ceil else math.floor(q)) + 1
    if any_pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _torch_pooled_size(size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    """torch's pooled size (aten pooling_output_shape), to know when torch's padding can be used."""
    out = (size + 2 * pad - kernel + (stride - 1 if ceil else 0)) // stride + 1
    if ceil and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _stochastic_pool(x: torch.Tensor, k, s, out: tuple[int, int], train: bool) -> torch.Tensor:
    """Caffe's StoPoolForwardTrain / StoPoolForwardTest (pooling_layer.cu) on every window."""
    n, c, H, W = x.shape
    Ho, Wo = out
    need_h, need_w = (Ho - 1) * s[0] + k[0], (Wo - 1) * s[1] + k[1]
    # windows clipped at the bottom/right edge: zeros change no sum and are never drawn first
    xp = F.pad(x, (0, max(0, need_w - W), 0, max(0, need_h - H)))[:, :, :need_h, :need_w]
    win = F.unfold(xp, k, stride=s).view(n, c, k[0] * k[1], Ho * Wo)
    if not train:
        y = (win * win).sum(2) / (win.sum(2) + _FLT_MIN_F32)
    else:
        with torch.no_grad():
            running = win.detach().cumsum(2)
            u = 1.0 - torch.rand((n, c, 1, Ho * Wo), dtype=x.dtype, device=x.device)  # (0, 1], as cuRAND
            picked = (running >= u * running[:, :, -1:, :]).to(torch.uint8).argmax(2, keepdim=True)
        y = win.gather(2, picked).squeeze(2)
    return y.view(n, c, Ho, Wo)


@register_layer("Pooling")
class PoolingLayer(Layer):
    """Caffe's Pooling: MAX, AVE or STOCHASTIC over ``kernel`` windows of each channel of a 4-D bottom.

    Parameters (``pooling_param``): ``pool`` MAX (default) | AVE | STOCHASTIC; ``kernel_size``
    or ``kernel_h`` + ``kernel_w`` (required unless ``global_pooling``); ``pad`` 0 or
    ``pad_h`` + ``pad_w``; ``stride`` 1 or ``stride_h`` + ``stride_w``; ``global_pooling``
    false (kernel = the bottom's H×W; pad must be 0 and stride 1); ``round_mode`` CEIL | FLOOR.
    ``pad < kernel`` is required when padding.

    Output size per axis: ``Ho = ceil((H + 2p − k)/s) + 1`` (FLOOR: floor), minus one when the
    layer pads (any axis) and ``(Ho − 1)·s ≥ H + p`` (the last window must start inside the image
    or its left padding). Window ``ph`` covers rows ``[ph·s − p, ph·s − p + k)``:

    - MAX: the largest real pixel in the window (padding never wins; the first maximum in
      row-major order on ties, which also receives the whole gradient). A window with no real
      pixel gives −FLT_MAX. Optional top 1 (MAX only): the argmax as the flat index ``h·W + w``
      into the bottom plane, as a float (−1 for an empty window).
    - AVE: the sum of the real pixels divided by ``(min(hend, H + p) − hstart)·(min(wend, W + p)
      − wstart)``, i.e. the divisor counts padding cells but not the ceil overhang past ``H + p``.

    Bottom ``(N, C, H, W)``; top(s) ``(N, C, Ho, Wo)``.

    Implementation: torch's ``max_pool2d`` / ``avg_pool2d(ceil_mode, count_include_pad=True)``
    where their window rule is Caffe's (``p ≤ k/2`` and torch's size equals Caffe's); otherwise
    explicit padding and Caffe's divisor. Torch differs from Caffe when ``p > k/2`` (torch refuses)
    and, without padding, when ``k < s`` leaves a last window starting past the image (torch drops
    it, Caffe keeps an empty window).

    - STOCHASTIC (Zeiler & Fergus; Caffe's GPU kernels, its CPU build has none): windows without
      padding (``pad`` must be 0), rows ``[ph·s, min(ph·s + k, H))``. TRAIN draws one position
      per window with probability ``x_i / Σ x`` (``u`` uniform in (0, 1], the first position whose
      running sum reaches ``u·Σ x``) and outputs its value; the gradient goes to that position.
      TEST outputs the probability-weighted mean ``Σ x_i² / (FLT_MIN + Σ x_i)``.

    Differences from Caffe: STOCHASTIC's draws come from torch's generator (seeded by
    ``set_random_seed``): Caffe's distribution, not its cuRAND stream; in TEST phase its
    backward is the gradient of the weighted mean (Caffe's TEST backward reads indices no TEST
    forward wrote). A NaN input wins a MAX window here (torch), where Caffe's ``>`` comparison
    skips it.
    """

    #: (``Layer.layout_neutral``) the same values for a channels-last bottom
    layout_neutral = True

    exact_num_bottom = 1
    min_top = 1
    max_top = 2

    def flops(self, bottom_shapes, top_shapes) -> int:
        """``top_count · Πkernel`` (global pooling: ``bottom_count``, one read of each value)."""
        if self.global_pooling:
            return math.prod(bottom_shapes[0])
        return math.prod(top_shapes[0]) * math.prod(self.kernel)

    def setup(self, bottom_shapes):
        pp = self.param.pooling_param
        if len(self.param.top) == 2 and pp.pool != _PP.MAX:
            raise self.error("a second top (the argmax mask) is only produced by pool: MAX")
        if len(bottom_shapes[0]) != 4:
            raise self.error(
                f"the bottom must have 4 axes (num, channels, height, width), got shape {bottom_shapes[0]}"
            )
        self.pool = pp.pool
        self._is_max = self.pool == _PP.MAX  # read on every forward: no protobuf look-ups there
        self._want_mask = len(self.param.top) == 2
        self.ceil = pp.round_mode == _PP.CEIL
        self.global_pooling = pp.global_pooling

        has_k, has_kh, has_kw = pp.HasField("kernel_size"), pp.HasField("kernel_h"), pp.HasField("kernel_w")
        if self.global_pooling:
            if has_k or has_kh or has_kw:
                raise self.error(
                    "with global_pooling: true the kernel is the bottom's H×W: remove kernel_size/kernel_h/kernel_w"
                )
            self.kernel = None
        else:
            if has_k and (has_kh or has_kw):
                raise self.error("give either kernel_size or kernel_h and kernel_w, not both")
            if not has_k and not (has_kh and has_kw):
                raise self.error("pooling_param.kernel_size (or both kernel_h and kernel_w) is required")
            self.kernel = (pp.kernel_size, pp.kernel_size) if has_k else (pp.kernel_h, pp.kernel_w)
            if min(self.kernel) <= 0:
                raise self.error(f"kernel dimensions must be > 0, got {self.kernel}")
        self.pad = self._pair(pp, "pad")
        self.stride = self._pair(pp, "stride")
        if min(self.stride) <= 0:
            raise self.error(f"stride must be > 0, got {self.stride}")
        if self.global_pooling and (self.pad != (0, 0) or self.stride != (1, 1)):
            raise self.error("with global_pooling: true only pad = 0 and stride = 1 are allowed")
        if self.pad != (0, 0) and not self.global_pooling:
            if self.pool == _PP.STOCHASTIC:
                raise self.error(
                    f"pool: STOCHASTIC with pad {self.pad}: Caffe's stochastic kernels ignore the padding "
                    "while its output size counts it; set pad to 0"
                )
            if self.pad[0] >= self.kernel[0] or self.pad[1] >= self.kernel[1]:
                raise self.error(f"pad {self.pad} must be smaller than kernel {self.kernel}")
        self._plans: dict[tuple[int, int], tuple] = {}
        self._plan(*bottom_shapes[0][2:])

    def _pair(self, pp, name):
        has, has_h, has_w = pp.HasField(name), pp.HasField(f"{name}_h"), pp.HasField(f"{name}_w")
        if has_h or has_w:
            if has or not (has_h and has_w):
                raise self.error(f"give either {name} or both {name}_h and {name}_w")
            return (getattr(pp, f"{name}_h"), getattr(pp, f"{name}_w"))
        v = getattr(pp, name)
        return (v, v)

    def _plan(self, H: int, W: int):
        """Output size and method for an H×W bottom (cached per size)."""
        plan = self._plans.get((H, W))
        if plan is not None:
            return plan
        k = (H, W) if self.global_pooling else self.kernel
        s, p = self.stride, self.pad
        any_pad = p != (0, 0)
        out = tuple(caffe_pooled_size(n, k[i], s[i], p[i], self.ceil, any_pad) for i, n in enumerate((H, W)))
        if min(out) <= 0:
            raise self.error(f"a {H}×{W} bottom gives an empty output {out} with kernel {k}, stride {s}, pad {p}")
        direct = all(
            2 * p[i] <= k[i] and _torch_pooled_size(n, k[i], s[i], p[i], self.ceil) == out[i]
            for i, n in enumerate((H, W))
        )
        # explicit path: pad left by p, right so that the last window fits; Caffe's AVE divisor
        right = tuple(max(0, (out[i] - 1) * s[i] + k[i] - p[i] - n) for i, n in enumerate((H, W)))
        spans = [
            [min(o * s[i] - p[i] + k[i], n + p[i]) - (o * s[i] - p[i]) for o in range(out[i])]
            for i, n in enumerate((H, W))
        ]
        plan = (k, out, direct, right, spans)
        self._plans[(H, W)] = plan
        return plan

    def top_shapes(self, bottom_shapes):
        n, c, h, w = bottom_shapes[0]
        _, (ho, wo), _, _, _ = self._plan(h, w)
        return [(n, c, ho, wo)] * len(self.param.top)

    def forward(self, x):
        H, W = x.shape[2], x.shape[3]
        k, (Ho, Wo), direct, right, spans = self._plan(H, W)
        s, p = self.stride, self.pad
        want_mask = self._want_mask
        if self._is_max:
            if direct:
                if want_mask:
                    y, idx = _max_pool(x, k, s, p, self.ceil, True)
                    return y, idx.to(x.dtype)
                return _max_pool(x, k, s, p, self.ceil, False)
            xp = F.pad(x, (p[1], right[1], p[0], right[0]), value=-math.inf)
            y, idx = _max_pool(xp, k, s, (0, 0), False, True)
            y, idx = y[:, :, :Ho, :Wo], idx[:, :, :Ho, :Wo]
            empty = y == -math.inf
            y = y.clamp_min(-_FLT_MAX)
            if not want_mask:
                return (y,)
            Wp = W + p[1] + right[1]
            h, w = idx // Wp - p[0], idx % Wp - p[1]
            mask = torch.where(empty, torch.full_like(idx, -1), h * W + w)
            return y, mask.to(x.dtype)
        if self.pool == _PP.STOCHASTIC:
            return (_stochastic_pool(x, k, s, (Ho, Wo), self.phase == caffe_pb2.TRAIN),)
        # AVE
        if direct:
            return (F.avg_pool2d(x, k, s, p, ceil_mode=self.ceil, count_include_pad=True),)
        xp = F.pad(x, (p[1], right[1], p[0], right[0]))
        total = F.avg_pool2d(xp, k, s, divisor_override=1)[:, :, :Ho, :Wo]
        div = torch.tensor(spans[0], dtype=x.dtype, device=x.device)[:, None] * torch.tensor(
            spans[1], dtype=x.dtype, device=x.device
        )
        return (total / div,)


# ---------------------------------------------------------------------------------------------
# SPP


def spp_level_geometry(size: int, bins: int) -> tuple[int, int]:
    """Kernel (which is also the stride) and pad of one SPP pyramid level along one axis.

    ``kernel = ceil(size / bins)``; the ``kernel·bins − size`` cells the windows overhang the
    axis are covered by padding ``pad = (kernel·bins − size + 1) // 2`` on each side.
    """
    kernel = -(-size // bins)
    pad = (kernel * bins - size + 1) // 2
    return kernel, pad


@register_layer("SPP")
class SPPLayer(Layer):
    """Caffe's SPP (spatial pyramid pooling): pooling over 1×1, 2×2, 4×4, ... grids of bins.

    Level ``l`` (``0 ≤ l < pyramid_height``) has ``b = 2^l`` bins per axis and pools the bottom
    with a Caffe Pooling of ``kernel = stride = ceil(H / b)`` and ``pad = (kernel·b − H + 1) // 2``
    (the same along W with W), so its output is ``b × b`` for every bottom size Caffe accepts
    (``spp_level_geometry``). Each level is our ``PoolingLayer``, hence Caffe's ceil output size,
    window clipping and AVE divisor (pad cells counted) exactly.

    Parameters (``spp_param``): ``pyramid_height`` (required, ≥ 1), ``pool`` MAX (default) | AVE
    | STOCHASTIC; ``engine`` (DEFAULT) does not change the result (Caffe's SPP builds its
    Pooling layers directly, whatever the engine).

    Bottom ``(N, C, H, W)``. Top:

    - ``pyramid_height == 1``: the single level's pooling, ``(N, C, 1, 1)``.
    - otherwise ``(N, C·Σ_l 4^l)``: each level flattened per item (channel, then row, then
      column) and the levels concatenated in order, level 0 (the global pooling) first.

    The levels are recomputed when the bottom's H×W changes (Caffe reshapes per forward).
    A level whose pad is not smaller than its kernel (a bottom smaller than the level's bins,
    e.g. H = 5 at 4 bins: kernel 2, pad 2) is refused, as Caffe's Pooling CHECK refuses it.

    Differences from Caffe: STOCHASTIC raises: the levels pad the bottom, which Caffe's
    stochastic kernels ignore while its output size counts it (its CPU build has no stochastic
    pooling at all).
    """

    exact_num_bottom = 1
    exact_num_top = 1
    #: How many bottom sizes keep their pyramid levels cached.
    _MAX_CACHED_SIZES = 64

    def flops(self, bottom_shapes, top_shapes) -> int:
        """One read of the bottom per pyramid level."""
        return len(self.levels_for(tuple(bottom_shapes[0]))) * math.prod(bottom_shapes[0])

    def setup(self, bottom_shapes):
        sp = self.param.spp_param
        if sp.pool == _SPP.STOCHASTIC:
            raise self.error(
                "spp_param.pool: STOCHASTIC is not supported: the pyramid levels pad the bottom, and Caffe's "
                "stochastic pooling kernels ignore padding while its output size counts it; use MAX or AVE"
            )
        if sp.pool not in (_SPP.MAX, _SPP.AVE):
            raise self.error(f"spp_param.pool {sp.pool} is not one of MAX, AVE")
        if sp.pyramid_height < 1:
            raise self.error("spp_param.pyramid_height is required and must be >= 1 (the number of pyramid levels)")
        self.pyramid_height = int(sp.pyramid_height)
        self._pool = _PP.MAX if sp.pool == _SPP.MAX else _PP.AVE
        self._levels: dict[tuple[int, int], list[PoolingLayer]] = {}
        self.levels_for(bottom_shapes[0])

    def levels_for(self, shape) -> list[PoolingLayer]:
        """The Pooling layer of every level for a bottom of this shape (cached per H×W)."""
        if len(shape) != 4:
            raise self.error(f"the bottom must have 4 axes (num, channels, height, width), got shape {tuple(shape)}")
        H, W = int(shape[2]), int(shape[3])
        levels = self._levels.get((H, W))
        if levels is not None:
            return levels
        if H <= 0 or W <= 0:
            raise self.error(f"the bottom's height and width must be > 0, got shape {tuple(shape)}")
        levels = []
        for level in range(self.pyramid_height):
            bins = 2**level
            (kh, ph), (kw, pw) = spp_level_geometry(H, bins), spp_level_geometry(W, bins)
            lp = caffe_pb2.LayerParameter(name=f"{self.name}/level{level}", type="Pooling", top=["pool"])
            pp = lp.pooling_param
            pp.pool = self._pool
            pp.kernel_h, pp.kernel_w = kh, kw
            pp.stride_h, pp.stride_w = kh, kw
            pp.pad_h, pp.pad_w = ph, pw
            try:
                levels.append(PoolingLayer(lp, [(int(shape[0]), int(shape[1]), H, W)], self.phase))
            except LayerError as e:
                raise self.error(
                    f"pyramid level {level} ({bins}×{bins} bins) of a {H}×{W} bottom needs kernel "
                    f"({kh}, {kw}), stride ({kh}, {kw}), pad ({ph}, {pw}), which Caffe's Pooling refuses "
                    f"({e}); the bottom is too small for pyramid_height {self.pyramid_height}"
                ) from None
        if len(self._levels) >= self._MAX_CACHED_SIZES:
            self._levels.clear()
        self._levels[(H, W)] = levels
        return levels

    def top_shapes(self, bottom_shapes):
        shape = bottom_shapes[0]
        levels = self.levels_for(shape)
        shapes = [lvl.top_shapes([tuple(shape)])[0] for lvl in levels]
        if self.pyramid_height == 1:
            return [shapes[0]]
        return [(shape[0], sum(math.prod(s[1:]) for s in shapes))]

    def forward(self, x):
        levels = self.levels_for(x.shape)
        if self.pyramid_height == 1:
            return levels[0].forward(x)
        return (torch.cat([lvl.forward(x)[0].flatten(1) for lvl in levels], dim=1),)
