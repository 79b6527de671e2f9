"""Convolution and Deconvolution (BVLC/caffe src/caffe/layers/base_conv_layer.cpp, conv_layer.cpp,
deconv_layer.cpp), on torch's ``conv{1,2,3}d`` / ``conv_transpose{1,2,3}d``; Im2col
(im2col_layer.cpp, src/caffe/util/im2col.cpp) on strided views."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from caffe_compat.layers.base import Layer, register_layer

__all__ = ["ConvolutionLayer", "DeconvolutionLayer", "Im2colLayer", "deconv2d_by_phases"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_DECONV = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _spatial(layer, cp, name, name_h, name_w, default):
    """Caffe's rule: ``<name>`` repeated (once or once per spatial axis) or ``<name>_h/_w``."""
    nsp = layer.num_spatial
    vals = list(getattr(cp, name))
    has_h, has_w = cp.HasField(name_h), cp.HasField(name_w)
    if has_h or has_w:
        if nsp != 2:
            raise layer.error(f"{name_h} & {name_w} can only be used for 2-D convolution")
        if vals:
            raise layer.error(f"give either {name} or {name_h}/{name_w}, not both")
        if default is None and not (has_h and has_w):
            raise layer.error(f"for a non-square kernel both {name_h} and {name_w} are required")
        return (
            getattr(cp, name_h) if has_h else default,
            getattr(cp, name_w) if has_w else default,
        )
    if not vals:
        if default is None:
            raise layer.error(f"convolution_param.{name} (or {name_h} and {name_w}) is required")
        return (default,) * nsp
    if len(vals) not in (1, nsp):
        raise layer.error(f"{name} must be given once, or once per spatial axis ({nsp}); got {len(vals)} values")
    return tuple(vals[i if len(vals) > 1 else 0] for i in range(nsp))


def _geometry(layer, cp) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """kernel, stride, pad, dilation per spatial axis from ``convolution_param``, validated
    (Convolution, Deconvolution and Im2col read them alike; ``layer.num_spatial`` is set)."""
    nsp = layer.num_spatial
    kernel = _spatial(layer, cp, "kernel_size", "kernel_h", "kernel_w", None)
    stride = _spatial(layer, cp, "stride", "stride_h", "stride_w", 1)
    pad = _spatial(layer, cp, "pad", "pad_h", "pad_w", 0)
    if len(cp.dilation) not in (0, 1, nsp):
        raise layer.error(
            f"dilation must be given once, or once per spatial axis ({nsp}); got {len(cp.dilation)} values"
        )
    dilation = tuple(cp.dilation[i if len(cp.dilation) > 1 else 0] if cp.dilation else 1 for i in range(nsp))
    for name, vals in (("kernel_size", kernel), ("stride", stride), ("dilation", dilation)):
        if any(v <= 0 for v in vals):
            raise layer.error(f"convolution_param.{name} must be > 0, got {list(vals)}")
    return kernel, stride, pad, dilation


def end_pads(layer, sizes, out) -> tuple[int, ...]:
    """Padding after each spatial axis (of ``sizes``) for which floor-mode windows give Caffe's
    ``out`` windows per axis: the pad, or more where Caffe's truncating output size counts a last
    window that overhangs the padded axis (Convolution, Im2col, their ONNX exports)."""
    return tuple(
        max(p, (o - 1) * s + d * (k - 1) + 1 - p - n)
        for n, o, k, s, p, d in zip(sizes, out, layer.kernel, layer.stride, layer.pad, layer.dilation)
    )


class _BaseConvolution(Layer):
    """What Convolution and Deconvolution share: parameter parsing, checks and blobs.

    Several bottoms are allowed (each gives the top of the same index, all with the same weights);
    Caffe requires them to have one shape.
    """

    min_bottom = 1
    min_top = 1
    #: The backward needs the bottom and the weights, not the top: an in-place layer after this
    #: one may overwrite the top (``EagerRunner.run_steps``).
    top_overwritable = True
    #: Deconvolution: weights stored (C_in, O/g, k...) and the output grows.
    reverse = False

    def setup(self, bottom_shapes):
        cp = self.param.convolution_param
        if len(self.param.top) != len(bottom_shapes):
            raise self.error(
                f"needs as many tops as bottoms (one top per bottom), got {len(bottom_shapes)} "
                f"bottom(s) and {len(self.param.top)} top(s)"
            )
        shape0 = bottom_shapes[0]
        for i, s in enumerate(bottom_shapes[1:], 1):
            if s != shape0:
                raise self.error(f"all bottoms must have the same shape: bottom 0 is {shape0}, bottom {i} is {s}")
        ndim = len(shape0)
        axis = cp.axis + ndim if cp.axis < 0 else cp.axis
        if not 0 <= axis < ndim:
            raise self.error(f"convolution_param.axis {cp.axis} is out of range for a {ndim}-D bottom {shape0}")
        self.axis = axis
        nsp = ndim - axis - 1
        if nsp not in _CONV:
            raise self.error(
                f"bottom {shape0} has {nsp} spatial axes after axis {axis}; only 1, 2 or 3 are "
                "supported (set convolution_param.axis to the channel axis)"
            )
        self.num_spatial = nsp

        self.kernel, self.stride, self.pad, self.dilation = _geometry(self, cp)

        if not cp.HasField("num_output") or cp.num_output == 0:
            raise self.error("convolution_param.num_output is required and must be > 0")
        self.num_output = cp.num_output
        self.channels = shape0[axis]
        self.group = cp.group
        if self.group == 0:
            raise self.error("convolution_param.group must be > 0")
        if self.channels % self.group:
            raise self.error(
                f"the bottom's {self.channels} channels are not divisible by convolution_param.group ({self.group})"
            )
        if self.num_output % self.group:
            raise self.error(
                f"convolution_param.num_output ({self.num_output}) must be a multiple of "
                f"convolution_param.group ({self.group})"
            )
        if self.reverse:
            wshape = (self.channels, self.num_output // self.group, *self.kernel)
        else:
            wshape = (self.num_output, self.channels // self.group, *self.kernel)
        self.bias_term = cp.bias_term
        self.add_blob(wshape, cp.weight_filler)
        if self.bias_term:
            self.add_blob((self.num_output,), cp.bias_filler)
        self._check_output(shape0)

    def _out_size(self, size, k, s, p, d):
        raise NotImplementedError

    def _check_output(self, shape):
        for i, n in enumerate(shape[self.axis + 1 :]):
            out = self._out_size(n, self.kernel[i], self.stride[i], self.pad[i], self.dilation[i])
            if out <= 0:
                raise self.error(
                    f"spatial axis {i} of size {n} gives an output of size {out} with kernel "
                    f"{self.kernel[i]}, stride {self.stride[i]}, pad {self.pad[i]}, dilation "
                    f"{self.dilation[i]}"
                )

    def top_shapes(self, bottom_shapes):
        """Caffe's output-size rule per spatial axis (no forward pass needed)."""
        tops = []
        for shape in bottom_shapes:
            spatial = tuple(
                self._out_size(n, self.kernel[i], self.stride[i], self.pad[i], self.dilation[i])
                for i, n in enumerate(shape[self.axis + 1 :])
            )
            tops.append((*shape[: self.axis], self.num_output, *spatial))
        return tops

    def _conv_one(self, op, x, weight, bias):
        lead = x.shape[: self.axis]
        if self.axis != 1:
            x = x.reshape(-1, *x.shape[self.axis :])
        if x.shape[1] != self.channels:
            raise self.error(f"expected {self.channels} channels at axis {self.axis}, got shape {tuple(x.shape)}")
        y = op(x, weight, bias, stride=self.stride, padding=self.pad, dilation=self.dilation, groups=self.group)
        if self.axis != 1:
            y = y.reshape(*lead, *y.shape[1:])
        return y

    def _run(self, op, bottoms):
        blobs = self.blobs
        weight = blobs[0]
        bias = blobs[1] if self.bias_term else None
        x = bottoms[0]
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
            bias = bias.to(x.dtype) if bias is not None else None
        if len(bottoms) == 1 and self.axis == 1 and x.dim() == 2 + self.num_spatial and x.shape[1] == self.channels:
            # the common case, without _conv_one's reshapes and checks
            return (
                op(x, weight, bias, stride=self.stride, padding=self.pad, dilation=self.dilation, groups=self.group),
            )
        return tuple(self._conv_one(op, x, weight, bias) for x in bottoms)


@register_layer("Convolution")
class ConvolutionLayer(_BaseConvolution):
    """Caffe's Convolution: cross-correlation of each bottom with ``num_output`` filters.

    ``y[n, o] = b[o] + Σ_{c in group(o)} Σ_k W[o, c, k] · x[n, g·C/g + c, s·i + d·k − p]``

    Parameters (``convolution_param``): ``num_output`` (required), ``kernel_size`` (required;
    once or once per spatial axis, or ``kernel_h``/``kernel_w``), ``stride`` 1, ``pad`` 0,
    ``dilation`` 1 (same repetition rules; ``stride_h/_w``, ``pad_h/_w`` for 2-D), ``group`` 1,
    ``bias_term`` true, ``weight_filler``/``bias_filler`` (unset: constant 0), ``axis`` 1 (the
    channel axis; earlier axes are batch axes, later ones spatial). ``engine`` and
    ``force_nd_im2col`` do not change the result and are ignored.

    Blobs: weight ``(O, C/g, k...)``, bias ``(O,)`` when ``bias_term``.

    Bottoms/tops: one or more bottoms ``(N, C, S1[, S2[, S3]])`` of one shape, each giving the top
    of the same index ``(N, O, S1'...)`` with ``S' = (S + 2p − (d(k−1)+1)) / s + 1`` in C's
    integer division (truncation toward zero): a kernel extent that overhangs the padded bottom by
    less than a stride still gives one output, the overhang read as zeros (Caffe's im2col skips
    positions outside the bottom), e.g. AlexNet's 11×11 stride-4 ``conv1`` on an 8×8 input gives
    1×1 (a floor division would give none).

    Differences from Caffe: 1 to 3 spatial axes only (Caffe's im2col takes any number).
    """

    #: (``Layer.accepts_channels_last``, ``wants_channels_last``) oneDNN convolves channels-last
    #: tensors without reordering them, and its top stays channels-last
    accepts_channels_last = True
    wants_channels_last = True

    def flops(self, bottom_shapes, top_shapes) -> int:
        """``2 · top_count · (C/group) · Πkernel``: the multiply-adds (×2); the bias is not counted."""
        return 2 * sum(math.prod(s) for s in top_shapes) * (self.channels // self.group) * math.prod(self.kernel)

    def _out_size(self, size, k, s, p, d):
        return conv_out_size(size, k, s, p, d)

    def tail_pads(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Zeros to add after each spatial axis of a bottom of these sizes so that a floor-mode
        convolution gives Caffe's output size (0 unless the kernel extent overhangs the padded
        axis, where Caffe's truncating division still counts one output)."""
        out = [
            self._out_size(n, k, s, p, d)
            for n, k, s, p, d in zip(spatial, self.kernel, self.stride, self.pad, self.dilation)
        ]
        return tuple(e - p for e, p in zip(end_pads(self, spatial, out), self.pad))

    def forward(self, *bottoms):
        shape = bottoms[0].shape
        pads = self.per_shape("_tail_plan", shape, lambda: self.tail_pads(tuple(shape[self.axis + 1 :])))
        if any(pads):
            # F.pad lists the last axis first: (before, after) per axis
            widths = [w for extra in reversed(pads) for w in (0, extra)]
            bottoms = tuple(F.pad(b, widths) for b in bottoms)
        return self._run(_CONV[self.num_spatial], bottoms)


@register_layer("Deconvolution")
class DeconvolutionLayer(_BaseConvolution):
    """Caffe's Deconvolution: the transpose (gradient) of Convolution, used for upsampling.

    Same parameters as Convolution (``convolution_param``); ``num_output`` is the number of
    output channels. Blobs: weight ``(C_in, O/g, k...)`` (torch's ConvTranspose layout), bias
    ``(O,)``. Top size per spatial axis: ``S' = s(S − 1) + d(k − 1) + 1 − 2p`` (Caffe has no
    output_padding). A ``bilinear`` weight filler with ``group = C`` and lr_mult 0 gives fixed
    bilinear upsampling.

    Differences from Caffe: 1 to 3 spatial axes only.
    """

    reverse = True

    def flops(self, bottom_shapes, top_shapes) -> int:
        """``2 · bottom_count · (num_output/group) · Πkernel``: the multiply-adds (×2), no bias."""
        k = math.prod(self.kernel)
        return 2 * sum(math.prod(s) for s in bottom_shapes) * (self.num_output // self.group) * k

    def _out_size(self, size, k, s, p, d):
        return s * (size - 1) + d * (k - 1) + 1 - 2 * p

    def forward(self, *bottoms):
        x = bottoms[0]
        if self._by_phases(x):
            return self._run(deconv2d_by_phases, bottoms)
        return self._run(_DECONV[self.num_spatial], bottoms)

    def _by_phases(self, x: torch.Tensor) -> bool:
        """Whether this layer runs as one convolution over the stride's output phases
        (``deconv2d_by_phases``), decided once per input shape: on the CPU, 2-D, no dilation,
        each kernel size a multiple of its stride ≥ 2 (every phase has the same taps: no
        multiplications by padding zeros), and where oneDNN's transposed convolution is slow
        (``benchmarks/bench_deconv.py``): few output channels without groups (≤ 4, e.g. an
        auto-encoder's reconstruction of an image; a depthwise ×2 upsampling is not faster) or a
        large upsampling factor (s_h·s_w ≥ 64, e.g. FCN's ``upscore``), on a top of at least
        ``PHASES_MIN_TOP`` values. Not inside torch.compile (its graph keeps the transposed
        convolution)."""
        if torch.compiler.is_compiling():
            return False
        return self.per_shape(
            "_phases_plan", (x.shape, x.device.type, x.dtype, PHASES_MIN_TOP), lambda: self._phases_pay(x)
        )

    def _phases_pay(self, x: torch.Tensor) -> bool:
        if (
            x.device.type != "cpu"
            or x.dtype not in (torch.float32, torch.float64)
            or self.num_spatial != 2
            or tuple(self.dilation) != (1, 1)
            or x.dim() != 4
        ):
            return False
        (sh, sw), (kh, kw), (ph, pw) = self.stride, self.kernel, self.pad
        if sh < 2 or sw < 2 or kh % sh or kw % sw:
            return False
        if sh * sw < 64 and (self.group != 1 or self.num_output > 4):
            return False
        ho, wo = self._out_size(x.shape[2], kh, sh, ph, 1), self._out_size(x.shape[3], kw, sw, pw, 1)
        return x.shape[0] * self.num_output * ho * wo >= PHASES_MIN_TOP


#: The smallest top (values) a Deconvolution runs by phases at (below it torch's transposed
#: convolution is as fast, or faster: the phase path has more operations).
PHASES_MIN_TOP = 1 << 16


def deconv2d_by_phases(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """``F.conv_transpose2d`` (no output padding, no dilation) computed as one ordinary
    convolution over the stride's phases, then interleaved (a pixel shuffle): the output pixel ``(Y·s + r)``
    of the uncropped transposed convolution gets ``Σ_t x[Y − t] · w[r + s·t]``, i.e. phase ``r``
    is a correlation of x with the taps ``w[r::s]`` reversed, padded by T − 1 (``T = ceil(k / s)``
    taps; kernels shorter than ``T·s`` are padded with zeros). The s_h·s_w phases of each output
    channel are the channels of one convolution, which oneDNN runs far faster than its
    transposed convolution when there are few output channels. The same sums in another order
    (float32 results differ in the last bits)."""
    if tuple(dilation) != (1, 1):
        raise ValueError("deconv2d_by_phases: dilation must be 1")
    (sh, sw), (ph, pw) = tuple(stride), tuple(padding)
    h, w_ = x.shape[-2:]
    cin, og, kh, kw = weight.shape
    th, tw = -(-kh // sh), -(-kw // sw)
    wp = weight
    if th * sh != kh or tw * sw != kw:
        wp = F.pad(weight, (0, tw * sw - kw, 0, th * sh - kh))
    # (cin, og, t, r, u, q) -> taps reversed -> (cin, og, r, q, t, u): phase (r, q) of channel o
    wp = wp.reshape(cin, og, th, sh, tw, sw).flip(2, 4).permute(0, 1, 3, 5, 2, 4)
    cg = cin // groups
    wc = wp.reshape(groups, cg, og * sh * sw, th, tw).transpose(1, 2).reshape(groups * og * sh * sw, cg, th, tw)
    y = F.conv2d(x, wc, None, 1, (th - 1, tw - 1), 1, groups)
    # interleave the phases (pixel_shuffle's values for s_h = s_w, ~3x faster than it here)
    m, _, yh, yw = y.shape
    y = y.reshape(m, groups * og, sh, sw, yh, yw).permute(0, 1, 4, 2, 5, 3).reshape(m, groups * og, yh * sh, yw * sw)
    ho, wo = (h - 1) * sh - 2 * ph + kh, (w_ - 1) * sw - 2 * pw + kw
    y = y[:, :, ph : ph + ho, pw : pw + wo]
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y.contiguous()


def _c_div(a: int, b: int) -> int:
    """C's integer division (truncation toward zero), as Caffe's int arithmetic does it."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Caffe's convolution (and im2col) output size along one axis, in C's integer division:
    ``(size + 2p − (d(k − 1) + 1)) / s + 1``."""
    return _c_div(size + 2 * p - (d * (k - 1) + 1), s) + 1


@register_layer("Im2col")
class Im2colLayer(Layer):
    """Caffe's Im2col: every kernel window of the bottom laid out as a column, as Convolution does
    internally before its matrix product.

    ``y[n, (c·K + k), o_1, ..., o_m] = x[n, c, o_1·s_1 − p_1 + k_1·d_1, ..., o_m·s_m − p_m + k_m·d_m]``
    (0 where that position falls outside the bottom), with ``(k_1, ..., k_m)`` the kernel offset,
    ``k`` its row-major flat index (the last spatial axis fastest) and ``K = Π kernel``: the top's
    channel index runs over the bottom channels slowest, then the kernel offsets.

    Parameters (``convolution_param``): ``kernel_size`` (required; once or once per spatial axis,
    or ``kernel_h`` + ``kernel_w`` for 2-D), ``stride`` 1, ``pad`` 0, ``dilation`` 1 (same
    repetition rules; ``stride_h/_w``, ``pad_h/_w`` for 2-D), ``axis`` 1 (the channel axis:
    earlier axes are batch axes, every later one is spatial, any number of them).
    ``force_nd_im2col`` (false) picks Caffe's N-D code path for 2-D bottoms, which gives the same
    values; ``num_output``, ``group``, ``bias_term``, the fillers and ``engine`` are not used by
    Im2col (nor by Caffe's).

    Bottom ``(N..., C, S_1, ..., S_m)``; top ``(N..., C·Π k_i, O_1, ..., O_m)`` with
    ``O_i = (S_i + 2p_i − (d_i(k_i − 1) + 1)) / s_i + 1`` in C's integer division (truncated
    toward zero: a kernel extent that overhangs the padded bottom by less than a stride still
    gives one window, of zeros where it overhangs). Backward: Caffe's col2im, each column entry
    added back to the bottom position it came from (overlapping windows accumulate, padding
    positions are dropped).

    Differences from Caffe: an output size ≤ 0 and a dilation of 0 raise (Caffe makes an empty
    top or aborts, resp. reads the same pixel for every kernel offset).
    """

    moves_data_only = True

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom_shapes):
        cp = self.param.convolution_param
        shape = bottom_shapes[0]
        ndim = len(shape)
        if not -ndim <= cp.axis < ndim:
            raise self.error(
                f"convolution_param.axis {cp.axis} is out of range for a {ndim}-D bottom {shape} "
                f"(valid: {-ndim} to {ndim - 1})"
            )
        self.axis = cp.axis + ndim if cp.axis < 0 else cp.axis
        self.num_spatial = ndim - self.axis - 1
        if self.num_spatial < 1:
            raise self.error(
                f"bottom {shape} has no spatial axis after the channel axis {self.axis} "
                "(set convolution_param.axis to the channel axis)"
            )
        self._ndim = ndim
        # Caffe reads a missing stride_h/stride_w as 0 (a division by zero); our Convolution's
        # helper would give it 1, so refuse it here
        if cp.HasField("stride_h") != cp.HasField("stride_w"):
            raise self.error("give both convolution_param.stride_h and stride_w, not only one")
        # the parsing rules are Convolution's (Caffe's Im2col and BaseConvolution share them)
        self.kernel, self.stride, self.pad, self.dilation = _geometry(self, cp)
        self.top_shapes(bottom_shapes)

    def _out_sizes(self, shape) -> tuple[int, ...]:
        if len(shape) != self._ndim:
            raise self.error(f"the bottom must have {self._ndim} axes as at setup, got shape {tuple(shape)}")
        out = []
        for i, n in enumerate(shape[self.axis + 1 :]):
            k, s, p, d = self.kernel[i], self.stride[i], self.pad[i], self.dilation[i]
            o = conv_out_size(n, k, s, p, d)
            if o <= 0:
                raise self.error(
                    f"spatial axis {i} of size {n} gives an output of size {o} with kernel {k}, stride {s}, "
                    f"pad {p}, dilation {d}"
                )
            out.append(o)
        return tuple(out)

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        out = self._out_sizes(shape)
        return [(*shape[: self.axis], shape[self.axis] * math.prod(self.kernel), *out)]

    def forward(self, x):
        out = self._out_sizes(x.shape)
        axis, nsp = self.axis, self.num_spatial
        lead, C, sizes = tuple(x.shape[:axis]), x.shape[axis], tuple(x.shape[axis + 1 :])
        x = x.reshape(math.prod(lead), C, *sizes)
        ends = end_pads(self, sizes, out)
        # F.pad lists the last axis first: (before, after) per axis
        x = F.pad(x, [w for i in reversed(range(nsp)) for w in (self.pad[i], ends[i])])
        for i in range(nsp):  # (B, C, O_1..O_m, E_1..E_m): windows of extent E = d(k − 1) + 1
            ext = self.dilation[i] * (self.kernel[i] - 1) + 1
            x = x.unfold(2 + i, ext, self.stride[i]).narrow(2 + i, 0, out[i])
        x = x[(Ellipsis, *(slice(None, None, d) for d in self.dilation))]  # the dilated taps
        x = x.permute(0, 1, *range(2 + nsp, 2 + 2 * nsp), *range(2, 2 + nsp))  # (B, C, k_1..k_m, O_1..O_m)
        return (x.reshape(*lead, C * math.prod(self.kernel), *out),)
