"""Layers of Caffe's forks that published models use (MobileNet/ShuffleNet ports, PSPNet,
SegNet/ENet, SENet, YOLO ports): ReLU6, Interp, Upsample, BN, ShuffleChannel, the two depthwise
convolution types and Axpy. Detection layers (Proposal, ROIPooling, PSROIPooling) live in
``detection.py``.

Each class says which fork (repository and commit) its semantics and parameters follow; the
field numbers are in caffe.proto's fork block and docs/layers.md ("Field numbers of the forks").
"""

from __future__ import annotations

import torch

from caffe_compat.layers.base import Layer, register_layer
from caffe_compat.layers.conv import ConvolutionLayer
from caffe_compat.layers.fork_fields import fork_param
from caffe_compat.proto import caffe_pb2

__all__ = [
    "ReLU6Layer",
    "InterpLayer",
    "UpsampleLayer",
    "BNLayer",
    "ShuffleChannelLayer",
    "ConvolutionDepthwiseLayer",
    "DepthwiseConvolutionLayer",
    "AxpyLayer",
]

#: LayerParameter numbers another fork gave these messages (fork_fields.fork_param).
_INTERP_ALT = (143,)  # hszhao/PSPNet @ c479f4f, DeepLab-v2: BVLC's input_param
_UPSAMPLE_ALT = (137,)  # alexgkendall/caffe-segnet @ 03d1e9f: BVLC's embed_param


@register_layer("ReLU6")
class ReLU6Layer(Layer):
    """``y = min(max(x, 0), 6)``; gradient ``dy`` where ``0 < x < 6``, 0 elsewhere.

    The MobileNet-v2 ports' ReLU6 (as the conformance fixtures' fork build has it, matched by
    ``forks/layers/relu6``): no parameters. Bottom: any shape. Top: same shape.
    """

    fork = "MobileNet-v2 ports"

    exact_num_bottom = 1
    exact_num_top = 1

    def forward(self, x):
        return (_ReLU6.apply(x),)


class _ReLU6(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(0.0, 6.0)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy * ((x > 0) & (x < 6)).to(dy.dtype)


@register_layer("Interp")
class InterpLayer(Layer):
    """PSPNet's / DeepLab's Interp: resize every ``(H, W)`` plane, bilinear with the corners
    aligned (``src = dst · (h_in − 1) / (h_out − 1)``, Caffe's float32 ratio, index truncated)
    or nearest neighbour (``src = floor(dst · ratio + 0.5)``).

    Follows hszhao/PSPNet @ 88d0b3e (``src/caffe/interp_layer.cpp``, ``util/interp.cpp``).
    Parameters (``interp_param``): exactly one of ``zoom_factor`` (``out = in + (in − 1)(z − 1)``),
    ``shrink_factor`` (``out = (in − 1) / s + 1``), ``height`` and ``width`` together, or a
    second bottom (its height and width); ``pad_beg``/``pad_end`` 0 (≤ 0: crop ``−pad_beg``
    rows/columns at the top-left and ``−pad_end`` at the bottom-right first; ``in`` above is the
    cropped size); ``interp_type`` ``"bilinear"`` (or ``"nearest_neighbor"``).
    Bottom: ``(N, C, H, W)`` [, reference]. Top: ``(N, C, H_out, W_out)``.
    Backward: the adjoint of the interpolation (the fork's ``interp2_backward``), to bottom 0 only.
    A binary net with the parameter at PSPNet @ c479f4f's number 143 (BVLC's ``input_param``) is
    read too (``fork_fields``).
    """

    fork = "PSPNet/DeepLab"

    min_bottom = 1
    max_bottom = 2
    exact_num_top = 1

    def setup(self, bottom_shapes):
        p = fork_param(self.param, "interp_param", _INTERP_ALT)
        self.p = p
        specs = int(p.HasField("zoom_factor")) + int(p.HasField("shrink_factor"))
        specs += int(p.HasField("height") and p.HasField("width")) + int(len(bottom_shapes) == 2)
        if specs != 1:
            raise self.error(
                "give the output size exactly one way: interp_param.zoom_factor, shrink_factor, "
                f"height and width, or a second bottom ({specs} given)"
            )
        if p.pad_beg > 0 or p.pad_end > 0:
            raise self.error(f"interp_param.pad_beg/pad_end must be <= 0 (cropping), got {p.pad_beg}/{p.pad_end}")
        if p.interp_type not in ("bilinear", "nearest_neighbor"):
            raise self.error(f"interp_param.interp_type {p.interp_type!r}: use 'bilinear' or 'nearest_neighbor'")
        if p.HasField("zoom_factor") and p.zoom_factor < 1:
            raise self.error(f"interp_param.zoom_factor must be >= 1, got {p.zoom_factor}")
        if p.HasField("shrink_factor") and p.shrink_factor < 1:
            raise self.error(f"interp_param.shrink_factor must be >= 1, got {p.shrink_factor}")
        for s in bottom_shapes:
            if len(s) != 4:
                raise self.error(f"bottoms must be 4-D (N, C, H, W), got {list(s)}")
        self.nearest = p.interp_type == "nearest_neighbor"
        self.out_size(bottom_shapes)

    def out_size(self, bottom_shapes) -> tuple[int, int, int, int]:
        """``(h_eff, w_eff, h_out, w_out)``: the cropped input size and the output size."""
        p = self.p
        h_in, w_in = bottom_shapes[0][2:]
        h_eff, w_eff = h_in + p.pad_beg + p.pad_end, w_in + p.pad_beg + p.pad_end
        if p.HasField("zoom_factor"):
            z = p.zoom_factor
            h_out, w_out = h_eff + (h_eff - 1) * (z - 1), w_eff + (w_eff - 1) * (z - 1)
        elif p.HasField("shrink_factor"):
            s = p.shrink_factor
            h_out, w_out = (h_eff - 1) // s + 1, (w_eff - 1) // s + 1
        elif p.HasField("height") and p.HasField("width"):
            h_out, w_out = p.height, p.width
        else:
            h_out, w_out = bottom_shapes[1][2:]
        if min(h_eff, w_eff, h_out, w_out) <= 0:
            raise self.error(f"empty input ({h_eff}x{w_eff} after cropping) or output ({h_out}x{w_out})")
        return h_eff, w_eff, h_out, w_out

    def _plan(self, h_eff, w_eff, h_out, w_out, device):
        def axis(n_in, n_out):
            # the fork's float32 arithmetic: ratio and position are floats, the index truncated
            r = torch.tensor((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0, dtype=torch.float32)
            pos = r * torch.arange(n_out, dtype=torch.float32)
            if self.nearest:
                return torch.floor(pos + 0.5).long(), None, None
            i0 = pos.long()
            i1 = i0 + (i0 < n_in - 1).long()
            lam = pos - i0.to(torch.float32)
            return i0, i1, lam

        return tuple(None if t is None else t.to(device) for t in (*axis(h_eff, h_out), *axis(w_eff, w_out)))

    def forward(self, *bottoms):
        x = bottoms[0]
        h_eff, w_eff, h_out, w_out = self.out_size([tuple(b.shape) for b in bottoms])
        b0 = -self.p.pad_beg
        x = x[:, :, b0 : b0 + h_eff, b0 : b0 + w_eff]
        if (h_eff, w_eff) == (h_out, w_out):  # the fork's special case: a copy (of the crop)
            return (x.clone(memory_format=torch.contiguous_format),)
        key = (h_eff, w_eff, h_out, w_out, x.device)
        hi0, hi1, hl, wi0, wi1, wl = self.per_shape("_interp_plan", key, lambda: self._plan(*key))
        if self.nearest:
            return (x.index_select(2, hi0).index_select(3, wi0),)
        hl = hl.to(x.dtype)[:, None]
        wl = wl.to(x.dtype)
        rows = x.index_select(2, hi0) * (1 - hl) + x.index_select(2, hi1) * hl
        return (rows.index_select(3, wi0) * (1 - wl) + rows.index_select(3, wi1) * wl,)


@register_layer("Upsample")
class UpsampleLayer(Layer):
    """Upsample, in the two forms published models use.

    **SegNet's mask form** (two bottoms: values and the pooling mask, the second top of a MAX
    ``Pooling``): ``top[n, c].flat[mask[n, c, i]] = x[n, c, i]``, zeros elsewhere; backward
    ``dx[n, c, i] = dtop[n, c].flat[mask[n, c, i]]`` (a gather: an index two inputs share gives
    both the same diff, as the fork's loop does). Follows alexgkendall/caffe-segnet @ 03d1e9f
    (``src/caffe/layers/upsample_layer.cpp``). Parameters (``upsample_param``): ``upsample_h``
    and ``upsample_w`` (the top's size, both > 1), else ``scale`` 2 (or ``scale_h`` and
    ``scale_w``, each > 1) with ``pad_out_h``/``pad_out_w`` false (subtract 1 from the top's
    height/width; only with a scale of 2): top ``H·scale_h − pad_out_h``. A mask index outside
    the top raises.

    **The YOLO ports' nearest form** (one bottom): every pixel repeated ``scale × scale`` times,
    top ``(N, C, H·scale, W·scale)``; backward the sum over each block. Follows
    ChenYingpeng/caffe-yolov3 (``upsample_layer.cpp``): only ``scale`` is read (must be ≥ 1;
    our default 2 is SegNet's, the YOLO port's own default is 1).

    A binary SegNet net with the parameter at SegNet's number 137 (BVLC's ``embed_param``) is
    read too (``fork_fields``; its ``scale_w`` comes back as 0/1 there, see docs/layers.md).
    """

    fork = "SegNet, YOLO ports"

    min_bottom = 1
    max_bottom = 2
    exact_num_top = 1

    def setup(self, bottom_shapes):
        p = fork_param(self.param, "upsample_param", _UPSAMPLE_ALT)
        self.mask_form = len(bottom_shapes) == 2
        for s in bottom_shapes:
            if len(s) != 4:
                raise self.error(f"bottoms must be 4-D (N, C, H, W), got {list(s)}")
        if not self.mask_form:
            for f in ("scale_h", "scale_w", "upsample_h", "upsample_w", "pad_out_h", "pad_out_w"):
                if p.HasField(f):
                    raise self.error(
                        f"upsample_param.{f} belongs to SegNet's mask form (two bottoms: values and the "
                        "pooling mask); the one-bottom nearest form reads only scale"
                    )
            if p.scale < 1:
                raise self.error(f"upsample_param.scale must be >= 1, got {p.scale}")
            self.scale = int(p.scale)
            return
        if bottom_shapes[0] != bottom_shapes[1]:
            raise self.error(
                f"the mask (bottom 1, {list(bottom_shapes[1])}) must have the shape of the values "
                f"(bottom 0, {list(bottom_shapes[0])})"
            )
        if p.HasField("upsample_h") and p.HasField("upsample_w"):
            if p.upsample_h <= 1 or p.upsample_w <= 1:
                raise self.error("upsample_param.upsample_h and upsample_w must be > 1")
            self.fixed = (int(p.upsample_h), int(p.upsample_w))
            return
        if p.HasField("scale_h") != p.HasField("scale_w") or (p.HasField("scale_h") and p.HasField("scale")):
            raise self.error("give upsample_h and upsample_w, or scale, or scale_h and scale_w")
        self.fixed = None
        self.scale_hw = (int(p.scale_h), int(p.scale_w)) if p.HasField("scale_h") else (int(p.scale),) * 2
        if min(self.scale_hw) <= 1:
            raise self.error(f"upsample_param scale must be > 1 in the mask form, got {self.scale_hw}")
        self.pad_out = (int(p.pad_out_h), int(p.pad_out_w))
        for pad, s, f in zip(self.pad_out, self.scale_hw, ("h", "w")):
            if pad and s != 2:
                raise self.error(f"upsample_param.pad_out_{f} needs a scale of 2 along that axis (got {s})")

    def top_size(self, shape) -> tuple[int, int]:
        if not self.mask_form:
            return shape[2] * self.scale, shape[3] * self.scale
        if self.fixed is not None:
            return self.fixed
        return shape[2] * self.scale_hw[0] - self.pad_out[0], shape[3] * self.scale_hw[1] - self.pad_out[1]

    def forward(self, *bottoms):
        x = bottoms[0]
        ho, wo = self.top_size(tuple(x.shape))
        if not self.mask_form:
            if self.scale == 1:
                return (x.clone(),)
            return (x.repeat_interleave(self.scale, dim=2).repeat_interleave(self.scale, dim=3),)
        if x.device.type == "meta":
            return (x.new_empty((x.shape[0], x.shape[1], ho, wo)),)
        return (_MaskUnpool.apply(x, bottoms[1].detach(), ho, wo, self),)


class _MaskUnpool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, ho, wo, layer):
        n, c = x.shape[:2]
        idx = mask.reshape(n, c, -1).to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= ho * wo):
            raise layer.error(
                f"a mask index ({int(idx.min())}..{int(idx.max())}) is outside the {ho}x{wo} top: the "
                "upsample size must match the input of the pooling layer that made the mask"
            )
        top = x.new_zeros((n, c, ho * wo))
        top.scatter_(2, idx, x.reshape(n, c, -1))
        ctx.save_for_backward(idx)
        ctx.in_shape = x.shape
        return top.reshape(n, c, ho, wo)

    @staticmethod
    def backward(ctx, dtop):
        (idx,) = ctx.saved_tensors
        n, c = dtop.shape[:2]
        dx = dtop.reshape(n, c, -1).gather(2, idx).reshape(ctx.in_shape)
        return dx, None, None, None, None


@register_layer("BN")
class BNLayer(Layer):
    """SegNet's / ENet's BN: per-channel scale and shift after (LEARN) or without (INFERENCE) a
    normalization by the batch's statistics.

    LEARN: ``y = scale · (x − μ) / sqrt(σ² + 1e-9) + shift`` with ``μ``, ``σ²`` the mean and
    the biased variance (``E[x²] − μ²``) over N, H, W of this batch, in TRAIN and TEST alike
    (the fork keeps no running statistics: its ``compute_bn_statistics.py`` folds them into a
    net in INFERENCE mode). INFERENCE: ``y = scale · x + shift``. Backward: autograd of these
    formulas, which is the fork's hand-written backward (LEARN: the full batch-norm gradient).

    Follows alexgkendall/caffe-segnet @ 03d1e9f (``src/caffe/layers/bn_layer.cpp``); ENet's own
    fork (TimoSaemann/caffe-enet) was not read: its nets load as far as they use these fields.
    Parameters (``bn_param``): ``bn_mode`` LEARN,
    ``scale_filler``, ``shift_filler`` (unset: constant 0, as Caffe's default filler).
    Blobs: scale ``(1, C, 1, 1)``, shift ``(1, C, 1, 1)``. Bottom: ``(N, C, H, W)``; top: same.
    Differences: extra tops (the fork's optional batch mean/variance tops) are refused.
    PSPNet's ``BN`` (bn_param at 152, four blobs, running statistics) is a different layer and
    is not supported.
    """

    fork = "SegNet"

    exact_num_bottom = 1
    exact_num_top = 1
    #: the fork's fixed epsilon (var_eps_ in LayerSetUp)
    VAR_EPS = 1e-9

    def setup(self, bottom_shapes):
        p = self.param.bn_param
        if len(bottom_shapes[0]) != 4:
            raise self.error(f"bottom must be 4-D (N, C, H, W), got {list(bottom_shapes[0])}")
        self.learn = p.bn_mode == caffe_pb2.BNParameter.LEARN
        c = bottom_shapes[0][1]
        self.add_blob((1, c, 1, 1), p.scale_filler)
        self.add_blob((1, c, 1, 1), p.shift_filler)

    def forward(self, x):
        scale, shift = self.blobs[0], self.blobs[1]
        if not self.learn:
            return (x * scale + shift,)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = (x * x).mean(dim=(0, 2, 3), keepdim=True) - mean * mean
        return ((x - mean) / torch.sqrt(var + self.VAR_EPS) * scale + shift,)


@register_layer("ShuffleChannel")
class ShuffleChannelLayer(Layer):
    """ShuffleNet's channel shuffle: view the channels as ``(group, C/group)``, transpose to
    ``(C/group, group)``: top channel ``j·group + i`` is bottom channel ``i·(C/group) + j``.
    Backward: the inverse permutation.

    Follows farmingyard/ShuffleNet (``shuffle_channel_layer.cpp``). Parameters
    (``shuffle_channel_param``): ``group`` 1 (must divide C). Bottom ``(N, C, ...)``; top same.
    """

    fork = "ShuffleNet"

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom_shapes):
        g = self.param.shuffle_channel_param.group
        s = bottom_shapes[0]
        if len(s) < 2:
            raise self.error(f"bottom needs a channel axis, got {list(s)}")
        if g < 1 or s[1] % g:
            raise self.error(f"shuffle_channel_param.group ({g}) must divide the bottom's {s[1]} channels")
        self.group = int(g)

    def forward(self, x):
        n, c = x.shape[:2]
        rest = x.shape[2:]
        y = x.reshape(n, self.group, c // self.group, *rest).transpose(1, 2)
        return (y.reshape(n, c, *rest),)


class _DepthwiseConvolution(ConvolutionLayer):
    """Convolution with ``group`` = the bottom's channels (set here, whatever the prototxt's
    ``group`` is when 1; another value is refused): the numerics of BVLC's Convolution."""

    def setup(self, bottom_shapes):
        cp = self.param.convolution_param
        ndim = len(bottom_shapes[0])
        axis = cp.axis + ndim if cp.axis < 0 else cp.axis
        if not 0 <= axis < ndim:
            raise self.error(f"convolution_param.axis {cp.axis} is out of range for a {ndim}-D bottom")
        channels = bottom_shapes[0][axis]
        if cp.group not in (1, channels):
            raise self.error(
                f"convolution_param.group {cp.group}: a depthwise convolution has one group per channel "
                f"({channels}); leave group unset"
            )
        param = type(self.param)()
        param.CopyFrom(self.param)
        param.convolution_param.group = channels
        self.param = param
        super().setup(bottom_shapes)


@register_layer("ConvolutionDepthwise")
class ConvolutionDepthwiseLayer(_DepthwiseConvolution):
    """The MobileNet ports' ``ConvolutionDepthwise`` (farmingyard/caffe-mobilenet,
    ``conv_dw_layer.cpp``, used by MobileNet-SSD ports): a Convolution with one group per
    channel (``num_output`` a multiple of C, usually C). Parameters: ``convolution_param`` as
    Convolution; blobs weight ``(O, 1, kh, kw)``, bias ``(O,)``."""

    fork = "MobileNet ports"


@register_layer("DepthwiseConvolution")
class DepthwiseConvolutionLayer(_DepthwiseConvolution):
    """``DepthwiseConvolution`` (yonghenglh6/DepthwiseConvolution, a faster kernel for MobileNet
    ports): a Convolution with one group per channel; parameters and blobs as
    ``ConvolutionDepthwise``."""

    fork = "MobileNet ports"


@register_layer("Axpy")
class AxpyLayer(Layer):
    """SENet's Axpy: ``top = a · x + y`` with ``a`` one scalar per (n, c).

    Follows hujie-frank/SENet (``axpy_layer.cpp``). Bottoms: ``a`` ``(N, C)`` or
    ``(N, C, 1, 1)``, ``x`` ``(N, C, H, W)``, ``y`` same shape as ``x``. Top: shape of ``x``.
    Backward: ``da = Σ_hw x · dtop``, ``dx = a · dtop``, ``dy = dtop``. No parameters.
    """

    fork = "SENet"

    exact_num_bottom = 3
    exact_num_top = 1

    def setup(self, bottom_shapes):
        a, x, y = bottom_shapes
        if len(x) < 2 or x != y:
            raise self.error(f"bottoms 1 and 2 (x, y) must have one shape, got {list(x)} and {list(y)}")
        if tuple(a[:2]) != tuple(x[:2]) or any(d != 1 for d in a[2:]) or len(a) < 2:
            raise self.error(
                f"bottom 0 (a) must be (N, C) or (N, C, 1, 1) with x's N, C = {list(x[:2])}, got {list(a)}"
            )
        self.a_shape = (x[0], x[1]) + (1,) * (len(x) - 2)

    def forward(self, a, x, y):
        return (a.reshape(self.a_shape) * x + y,)
