"""The inference layers of Wei Liu's SSD fork of Caffe: Normalize, Permute, PriorBox and
DetectionOutput.

Fork and commit followed: weiliu89/caffe, branch ``ssd``, commit 4817bf8b
(src/caffe/layers/normalize_layer.cpp, permute_layer.cpp, prior_box_layer.cpp,
detection_output_layer.cpp, src/caffe/util/bbox_util.cpp). Their parameters are the fork's
``norm_param`` (206), ``permute_param`` (202), ``prior_box_param`` (203) and
``detection_output_param`` (204) of caffe.proto.

Box layout shared by the three box layers: a prior blob is ``(1, 2, P·4)``, channel 0 the
priors' ``[xmin, ymin, xmax, ymax]`` in coordinates normalized by the image size, channel 1
their four variances; location predictions are ``(N, P·L·4)`` (L = 1 with ``share_location``,
else one box per class), confidences ``(N, P·C)``, prior-major.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from caffe_compat.layers.base import Layer, register_layer
from caffe_compat.proto import caffe_pb2

__all__ = [
    "NormalizeLayer",
    "PermuteLayer",
    "PriorBoxLayer",
    "DetectionOutputLayer",
    "prior_boxes",
    "decode_boxes",
    "nms_fast",
]

_CODE = caffe_pb2.PriorBoxParameter
_FLT_MAX = float(np.finfo(np.float32).max)


# ---------------------------------------------------------------------------------------------
# Normalize


@register_layer("Normalize")
class NormalizeLayer(Layer):
    """SSD's L2 normalization with a learned scale (weiliu89/caffe ssd@4817bf8b,
    normalize_layer.cpp).

    ``across_spatial`` (default true): ``top[n] = x[n] / sqrt(Σ_{c,h,w} x[n]² + eps)``;
    otherwise per position ``top[n,:,h,w] = x[n,:,h,w] / sqrt(eps + Σ_c x[n,c,h,w]²)``. The
    result is multiplied by the scale blob: one value (``channel_shared``, default true; a 0-axis
    blob, as SSD stores it) or one per channel (shape ``(C,)``), filled by ``scale_filler``
    (unset: constant 1). ``eps`` defaults to 1e-10. Bottom: 2 to 4 axes ``(N, C[, H[, W]])``;
    the top has the bottom's shape.

    Backward is SSD's formula, not the autograd of the forward: with ``u = x/norm``, ``g`` the
    top's diff, ``s`` the scale and sums over what the norm sums over,
    ``bottom_diff = (g − x·Σ(x·g)/norm²)/norm · s``. It is the exact gradient when the scale is
    shared (or all channels' scales are equal); with per-channel scales SSD leaves the scale
    out of the sum (the exact one has ``Σ(x·s·g)``), and so does this layer, to give the
    gradients SSD-trained models were trained with. The scale's diff is ``Σ u·g`` (per channel,
    or in all); SSD computes it as ``Σ top·g / s`` (NaN for a zero scale), the same for s ≠ 0.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom_shapes):
        p = self.param.norm_param
        shape = bottom_shapes[0]
        if not 2 <= len(shape) <= 4:
            raise self.error(f"the bottom must have 2 to 4 axes (N, C[, H[, W]]), got shape {list(shape)}")
        self.across_spatial = p.across_spatial
        self.channel_shared = p.channel_shared
        self.eps = p.eps
        filler = p.scale_filler if p.HasField("scale_filler") else None
        blob_shape = () if self.channel_shared else (shape[1],)
        self.add_blob(blob_shape, filler, value=None if filler is not None else 1.0)

    def forward(self, x):
        scale = self.blobs[0]
        if not self.channel_shared and scale.numel() != x.shape[1]:
            raise self.error(
                f"the scale blob has {scale.numel()} values for {x.shape[1]} channels "
                "(channel_shared: false needs one per channel)"
            )
        shape = () if self.channel_shared else (1, -1) + (1,) * (x.dim() - 2)
        return (_Normalize.apply(x, scale, self.across_spatial, self.eps, shape),)


class _Normalize(torch.autograd.Function):
    """SSD's Normalize forward and its backward formula (see ``NormalizeLayer``)."""

    @staticmethod
    def forward(ctx, x, scale, across_spatial: bool, eps: float, shape):
        dims = tuple(range(1, x.dim())) if across_spatial else (1,)
        norm = torch.sqrt((x * x).sum(dim=dims, keepdim=True) + eps)
        unit = x / norm
        s = scale.to(x.dtype).reshape(shape)
        ctx.save_for_backward(x, norm, unit, s)
        ctx.dims = dims
        ctx.scale_dtype = scale.dtype
        return unit * s

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, norm, unit, s = ctx.saved_tensors
        gx = gs = None
        if ctx.needs_input_grad[0]:
            dot = (x * g).sum(dim=ctx.dims, keepdim=True)
            gx = (g - x * dot / (norm * norm)) / norm * s
        if ctx.needs_input_grad[1]:
            ug = unit * g
            if s.dim() == 0:
                gs = ug.sum()
            else:
                gs = ug.sum(dim=tuple(d for d in range(g.dim()) if d != 1))
            gs = gs.to(ctx.scale_dtype)
        return gx, gs, None, None, None


# ---------------------------------------------------------------------------------------------
# Permute


@register_layer("Permute")
class PermuteLayer(Layer):
    """SSD's axis permutation (weiliu89/caffe ssd@4817bf8b, permute_layer.cpp).

    ``permute_param.order`` lists the bottom axis each top axis takes, e.g. ``0 2 3 1`` for NCHW
    to NHWC; axes it leaves out follow in their original order (no order: the identity). An
    order must be below the bottom's axis count and must not repeat. ``top.shape[i] =
    bottom.shape[order[i]]``. Backward scatters the top's diff back (the autograd of the
    permutation).
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom_shapes):
        n = len(bottom_shapes[0])
        order: list[int] = []
        for o in self.param.permute_param.order:
            if o >= n:
                raise self.error(f"permute_param.order {o} is not below the bottom's {n} axes")
            if o in order:
                raise self.error(f"permute_param.order repeats axis {o}")
            order.append(int(o))
        order += [i for i in range(n) if i not in order]
        self.order = tuple(order)
        self.need_permute = self.order != tuple(range(n))

    def forward(self, x):
        if x.dim() != len(self.order):
            raise self.error(f"set up for {len(self.order)} axes, got a bottom of shape {list(x.shape)}")
        if not self.need_permute:
            return (x.view(x.shape),)
        return (x.permute(self.order).contiguous(),)


# ---------------------------------------------------------------------------------------------
# PriorBox


def _aspect_ratios(param) -> list[float]:
    """1 first, then each given ratio not already present (within 1e-6) and, with ``flip``, its
    inverse; as float32, SSD's ``vector<float>``."""
    ratios = [1.0]
    for ar in param.aspect_ratio:
        ar = float(np.float32(ar))
        if any(abs(ar - r) < 1e-6 for r in ratios):
            continue
        ratios.append(ar)
        if param.flip:
            ratios.append(float(np.float32(1.0 / ar)))
    return ratios


def prior_boxes(
    layer_hw: tuple[int, int],
    img_hw: tuple[float, float],
    step_hw: tuple[float, float],
    min_sizes: list[float],
    max_sizes: list[float],
    aspect_ratios: list[float],
    offset: float,
    clip: bool,
    variances: list[float],
) -> np.ndarray:
    """SSD's PriorBox top ``(1, 2, H·W·P·4)`` as float32 (the arithmetic of prior_box_layer.cpp:
    centers in float, sizes truncated to integers, normalization in double).

    Per cell (row-major), per min size: the square of side min_size; with max sizes, the square
    of side sqrt(min_size·max_size); then one box per aspect ratio ar ≠ 1 of width
    min_size·sqrt(ar) and height min_size/sqrt(ar).
    """
    lh, lw = layer_hw
    img_h, img_w = img_hw
    f32 = np.float32
    step_h, step_w = f32(step_hw[0]), f32(step_hw[1])
    sizes: list[tuple[float, float]] = []  # (box_width, box_height) per prior, float32 values
    for s, min_size in enumerate(min_sizes):
        ms = int(min_size)  # SSD stores the size in an int
        sizes.append((float(f32(ms)), float(f32(ms))))
        if max_sizes:
            side = float(f32(math.sqrt(ms * int(max_sizes[s]))))
            sizes.append((side, side))
        for ar in aspect_ratios:
            if abs(ar - 1.0) < 1e-6:
                continue
            r = f32(math.sqrt(ar))
            sizes.append((float(f32(f32(ms) * r)), float(f32(f32(ms) / r))))
    bw = np.array([w for w, _ in sizes], np.float64)
    bh = np.array([h for _, h in sizes], np.float64)
    cx = ((np.arange(lw, dtype=f32) + f32(offset)) * step_w).astype(np.float64)
    cy = ((np.arange(lh, dtype=f32) + f32(offset)) * step_h).astype(np.float64)
    cxg = np.broadcast_to(cx[None, :, None], (lh, lw, len(sizes)))
    cyg = np.broadcast_to(cy[:, None, None], (lh, lw, len(sizes)))
    boxes = np.stack(
        [
            (cxg - bw / 2.0) / img_w,
            (cyg - bh / 2.0) / img_h,
            (cxg + bw / 2.0) / img_w,
            (cyg + bh / 2.0) / img_h,
        ],
        axis=-1,
    ).astype(f32)
    if clip:
        boxes = np.clip(boxes, f32(0), f32(1))
    var = np.broadcast_to(np.asarray(variances if len(variances) == 4 else variances * 4, f32), boxes.shape)
    return np.stack([boxes.reshape(-1), np.ascontiguousarray(var).reshape(-1)])[None]


@register_layer("PriorBox")
class PriorBoxLayer(Layer):
    """SSD's default boxes of one feature map (weiliu89/caffe ssd@4817bf8b, prior_box_layer.cpp).

    Bottoms: the feature map ``(N, C, H, W)`` and the image blob ``(N, C', img_h, img_w)``; top
    ``(1, 2, H·W·P·4)`` (see ``prior_boxes``), the same for every image. Fields (caffe.proto
    defaults): ``min_size`` (one or more, required, > 0; SSD truncates each to an integer),
    ``max_size`` (none, or one per min_size, each greater), ``aspect_ratio`` (1 always first;
    repeats within 1e-6 dropped), ``flip`` (true: add 1/ar), ``clip`` (false: clamp boxes to
    [0, 1]), ``variance`` (none: 0.1; one; or four, each > 0), ``img_size`` or ``img_h``/
    ``img_w`` (unset: the image bottom's size), ``step`` or ``step_h``/``step_w`` (unset: image
    size / feature size), ``offset`` (0.5). P = (number of aspect ratios)·(number of min sizes)
    + (number of max sizes). No backward: the top does not depend on the bottoms' values.
    """

    exact_num_bottom = 2
    exact_num_top = 1

    def setup(self, bottom_shapes):
        p = self.param.prior_box_param
        if len(p.min_size) == 0:
            raise self.error("prior_box_param.min_size must be given (one or more)")
        if any(s <= 0 for s in p.min_size):
            raise self.error(f"prior_box_param.min_size must be positive, got {list(p.min_size)}")
        self.min_sizes = [float(s) for s in p.min_size]
        self.max_sizes = [float(s) for s in p.max_size]
        if self.max_sizes:
            if len(self.max_sizes) != len(self.min_sizes):
                raise self.error(
                    f"prior_box_param gives {len(self.max_sizes)} max_size for {len(self.min_sizes)} "
                    "min_size: give one max_size per min_size, or none"
                )
            for lo, hi in zip(self.min_sizes, self.max_sizes):
                if not hi > lo:
                    raise self.error(f"prior_box_param.max_size {hi:g} must be greater than min_size {lo:g}")
        self.aspect_ratios = _aspect_ratios(p)
        self.num_priors = len(self.aspect_ratios) * len(self.min_sizes) + len(self.max_sizes)
        self.clip = p.clip
        var = [float(v) for v in p.variance]
        if len(var) > 1 and len(var) != 4:
            raise self.error(f"prior_box_param.variance: give one or four values, got {len(var)}")
        if any(v <= 0 for v in var):
            raise self.error(f"prior_box_param.variance must be positive, got {var}")
        self.variances = var or [0.1]
        if p.HasField("img_h") or p.HasField("img_w"):
            if p.HasField("img_size"):
                raise self.error("prior_box_param: give img_size or img_h/img_w, not both")
            if p.img_h <= 0 or p.img_w <= 0:
                raise self.error("prior_box_param.img_h and img_w must both be given and positive")
            self.img_hw = (p.img_h, p.img_w)
        elif p.HasField("img_size"):
            if p.img_size <= 0:
                raise self.error("prior_box_param.img_size must be positive")
            self.img_hw = (p.img_size, p.img_size)
        else:
            self.img_hw = (0, 0)
        if p.HasField("step_h") or p.HasField("step_w"):
            if p.HasField("step"):
                raise self.error("prior_box_param: give step or step_h/step_w, not both")
            if not (p.step_h > 0 and p.step_w > 0):
                raise self.error("prior_box_param.step_h and step_w must both be given and positive")
            self.step_hw = (p.step_h, p.step_w)
        elif p.HasField("step"):
            if not p.step > 0:
                raise self.error("prior_box_param.step must be positive")
            self.step_hw = (p.step, p.step)
        else:
            self.step_hw = (0.0, 0.0)
        self.offset = p.offset
        self._check_shapes(bottom_shapes)

    def _check_shapes(self, bottom_shapes):
        for i, s in enumerate(bottom_shapes):
            if len(s) != 4:
                raise self.error(f"bottom {i} must be 4-D (N, C, H, W), got shape {list(s)}")

    def _priors(self, feat_shape, img_shape) -> np.ndarray:
        lh, lw = int(feat_shape[2]), int(feat_shape[3])
        if self.img_hw[0] == 0 or self.img_hw[1] == 0:
            img_h, img_w = int(img_shape[2]), int(img_shape[3])
        else:
            img_h, img_w = self.img_hw
        if self.step_hw[0] == 0 or self.step_hw[1] == 0:
            step = (float(np.float32(img_h) / np.float32(lh)), float(np.float32(img_w) / np.float32(lw)))
        else:
            step = self.step_hw
        return prior_boxes(
            (lh, lw),
            (img_h, img_w),
            step,
            self.min_sizes,
            self.max_sizes,
            self.aspect_ratios,
            self.offset,
            self.clip,
            self.variances,
        )

    def top_shapes(self, bottom_shapes):
        self._check_shapes(bottom_shapes)
        return [(1, 2, int(bottom_shapes[0][2]) * int(bottom_shapes[0][3]) * self.num_priors * 4)]

    def forward(self, feat, img):
        key = (tuple(feat.shape), tuple(img.shape))
        arr = self.per_shape("_prior_plan", key, lambda: self._priors(key[0], key[1]))
        return (torch.from_numpy(arr).to(device=feat.device, dtype=feat.dtype),)


# ---------------------------------------------------------------------------------------------
# DetectionOutput


def decode_boxes(
    loc: np.ndarray, priors: np.ndarray, variances: np.ndarray, code_type: int, variance_encoded_in_target: bool
) -> np.ndarray:
    """SSD's DecodeBBox on float32 arrays: ``loc`` ``(..., P, 4)`` against ``priors`` and
    ``variances`` ``(P, 4)``; returns ``(..., P, 4)`` boxes ``[xmin, ymin, xmax, ymax]``.

    CORNER: prior corner + var·loc. CENTER_SIZE: center = prior center + var·loc·prior size,
    size = prior size·exp(var·loc). CORNER_SIZE: prior corner + var·loc·prior size. With
    ``variance_encoded_in_target`` the variances are taken as 1.
    """
    f32 = np.float32
    loc = loc.astype(f32, copy=False)
    var = np.ones_like(variances, dtype=f32) if variance_encoded_in_target else variances.astype(f32)
    if code_type == _CODE.CORNER:
        return (priors + var * loc).astype(f32)
    pw = priors[:, 2] - priors[:, 0]
    ph = priors[:, 3] - priors[:, 1]
    if code_type == _CODE.CENTER_SIZE:
        pcx = (priors[:, 0] + priors[:, 2]) / f32(2)
        pcy = (priors[:, 1] + priors[:, 3]) / f32(2)
        cx = var[:, 0] * loc[..., 0] * pw + pcx
        cy = var[:, 1] * loc[..., 1] * ph + pcy
        w = np.exp(var[:, 2] * loc[..., 2]) * pw
        h = np.exp(var[:, 3] * loc[..., 3]) * ph
        half_w, half_h = w.astype(np.float64) / 2.0, h.astype(np.float64) / 2.0
        cx, cy = cx.astype(np.float64), cy.astype(np.float64)
        return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1).astype(f32)
    if code_type == _CODE.CORNER_SIZE:
        size = np.stack([pw, ph, pw, ph], axis=-1)
        return (priors + var * loc * size).astype(f32)
    raise ValueError(f"unknown code_type {code_type}")


def _box_sizes(b: np.ndarray) -> np.ndarray:
    """SSD's BBoxSize of normalized boxes: width·height, 0 for an inverted box."""
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    return np.where((w < 0) | (h < 0), np.float32(0), w * h).astype(np.float32)


def _overlaps(b: np.ndarray, sizes: np.ndarray, i: int, others: np.ndarray) -> np.ndarray:
    """SSD's JaccardOverlap of box ``i`` with the boxes ``others`` (float32 arithmetic; boxes
    that do not intersect, touching ones included, overlap 0)."""
    a = b[i]
    o = b[others]
    disjoint = (o[:, 0] > a[2]) | (o[:, 2] < a[0]) | (o[:, 1] > a[3]) | (o[:, 3] < a[1])
    iw = np.minimum(o[:, 2], a[2]) - np.maximum(o[:, 0], a[0])
    ih = np.minimum(o[:, 3], a[3]) - np.maximum(o[:, 1], a[1])
    hit = ~disjoint & (iw > 0) & (ih > 0)
    inter = (iw * ih).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / (sizes[i] + sizes[others] - inter)
    return np.where(hit, iou, np.float32(0))


def nms_fast(
    boxes: np.ndarray, scores: np.ndarray, score_threshold: float, nms_threshold: float, eta: float, top_k: int
) -> list[int]:
    """SSD's ApplyNMSFast: the indices of ``boxes`` kept, highest score first.

    Candidates: scores strictly above ``score_threshold``, sorted by score descending (stable:
    equal scores keep their index order), the first ``top_k`` (-1: all). A candidate is kept when
    its overlap with every kept box is at most the threshold; with ``eta`` < 1 the threshold is
    multiplied by eta after each kept box while it is above 0.5.
    """
    cand = np.nonzero(scores > np.float32(score_threshold))[0]
    cand = cand[np.argsort(-scores[cand], kind="stable")]
    if -1 < top_k < len(cand):
        cand = cand[:top_k]
    sizes = _box_sizes(boxes)
    kept: list[int] = []
    thr = np.float32(nms_threshold)
    for idx in cand:
        if kept and not bool(np.all(_overlaps(boxes, sizes, int(idx), np.asarray(kept)) <= thr)):
            continue
        kept.append(int(idx))
        if eta < 1 and thr > 0.5:
            thr = np.float32(thr * np.float32(eta))
    return kept


@register_layer("DetectionOutput")
class DetectionOutputLayer(Layer):
    """SSD's detection output: decode, per-class NMS, keep the best (weiliu89/caffe
    ssd@4817bf8b, detection_output_layer.cpp ``Forward_cpu`` and bbox_util.cpp).

    Bottoms: ``loc`` ``(N, P·L·4)``, ``conf`` ``(N, P·C)`` (probabilities, prior-major), the
    priors ``(1, 2, P·4)`` (PriorBox). Fields: ``num_classes`` C (required), ``share_location``
    (true: L = 1, one box per prior for all classes; false: L = C), ``background_label_id``
    (0; skipped), ``code_type`` (CORNER, CENTER_SIZE, CORNER_SIZE; see ``decode_boxes``),
    ``variance_encoded_in_target`` (false), ``nms_param`` (``nms_threshold`` 0.3, ``top_k``
    unset = all, ``eta`` 1; see ``nms_fast``), ``confidence_threshold`` (unset: -FLT_MAX;
    scores must be strictly above it), ``keep_top_k`` (-1: all).

    Per image, per class other than the background: NMS of the decoded boxes (not clipped) with
    that class's scores. If the image has more than keep_top_k detections, the keep_top_k
    highest scores over all classes are kept. Top ``[1, 1, D, 7]``: rows ``[image, label,
    score, xmin, ymin, xmax, ymax]``, images in order, within an image labels ascending, within
    a label by score descending. With no detection in the whole batch, Caffe's convention: the
    top is ``[1, 1, N, 7]`` of -1 except column 0, the image index. No backward (SSD has none).

    Not supported (refused at setup, naming the field): ``save_output_param.output_directory``
    (writing result files) and ``visualize`` (an OpenCV window). ``save_file`` is unused by SSD's
    CPU forward and ignored here too. Difference: equal scores in the keep_top_k selection keep
    the order (label, then NMS order), where SSD's ``std::sort`` leaves them unspecified.
    """

    exact_num_bottom = 3
    exact_num_top = 1

    def setup(self, bottom_shapes):
        p = self.param.detection_output_param
        if not p.HasField("num_classes"):
            raise self.error("detection_output_param.num_classes must be given")
        self.num_classes = int(p.num_classes)
        self.share_location = p.share_location
        self.num_loc_classes = 1 if self.share_location else self.num_classes
        self.background_label_id = int(p.background_label_id)
        if self.share_location and self.background_label_id == -1:
            raise self.error(
                "background_label_id -1 with share_location true: SSD then finds no location "
                "predictions (its shared boxes carry label -1); use share_location false or another "
                "background_label_id"
            )
        self.code_type = p.code_type
        self.variance_encoded_in_target = p.variance_encoded_in_target
        self.keep_top_k = int(p.keep_top_k)
        self.confidence_threshold = p.confidence_threshold if p.HasField("confidence_threshold") else -_FLT_MAX
        self.nms_threshold = p.nms_param.nms_threshold
        if self.nms_threshold < 0:
            raise self.error(f"nms_param.nms_threshold must be non-negative, got {self.nms_threshold:g}")
        self.eta = p.nms_param.eta
        if not 0 < self.eta <= 1:
            raise self.error(f"nms_param.eta must be in (0, 1], got {self.eta:g}")
        self.top_k = int(p.nms_param.top_k) if p.nms_param.HasField("top_k") else -1
        if p.save_output_param.output_directory:
            raise self.error(
                "save_output_param.output_directory (writing detections to files) is not supported: "
                "remove save_output_param and write the top [1, 1, D, 7] yourself"
            )
        if p.visualize:
            raise self.error("visualize: true (an OpenCV window) is not supported: remove it (tools/detect.py draws)")
        self._num_priors(bottom_shapes)

    def _num_priors(self, bottom_shapes) -> int:
        loc, conf, prior = bottom_shapes
        if len(prior) < 3:
            raise self.error(f"bottom 2 (the priors) must be (1, 2, P*4), got shape {list(prior)}")
        if loc[0] != conf[0]:
            raise self.error(f"loc and conf disagree on the batch size: {list(loc)} vs {list(conf)}")
        num_priors = int(prior[2]) // 4
        if len(loc) < 2 or loc[1] != num_priors * self.num_loc_classes * 4:
            raise self.error(
                f"loc has shape {list(loc)}: expected (N, {num_priors * self.num_loc_classes * 4}) for "
                f"{num_priors} priors x {self.num_loc_classes} location classes x 4"
            )
        if len(conf) < 2 or conf[1] != num_priors * self.num_classes:
            raise self.error(
                f"conf has shape {list(conf)}: expected (N, {num_priors * self.num_classes}) for "
                f"{num_priors} priors x {self.num_classes} classes"
            )
        return num_priors

    def top_shapes(self, bottom_shapes):
        self._num_priors(bottom_shapes)
        return [(1, 1, 1, 7)]  # Caffe's Reshape; the forward sets the number of detections

    def forward(self, loc, conf, prior):
        num_priors = self._num_priors([tuple(loc.shape), tuple(conf.shape), tuple(prior.shape)])
        n = loc.shape[0]
        nc, nl = self.num_classes, self.num_loc_classes
        loc_a = loc.detach().to("cpu", torch.float32).numpy().reshape(n, num_priors, nl, 4)
        conf_a = conf.detach().to("cpu", torch.float32).numpy().reshape(n, num_priors, nc)
        prior_a = prior.detach().to("cpu", torch.float32).numpy().reshape(-1)
        priors = prior_a[: num_priors * 4].reshape(num_priors, 4)
        variances = prior_a[num_priors * 4 : num_priors * 8].reshape(num_priors, 4)
        if self.code_type != _CODE.CORNER and (
            np.any(priors[:, 2] - priors[:, 0] <= 0) or np.any(priors[:, 3] - priors[:, 1] <= 0)
        ):
            raise self.error("a prior box has zero or negative width or height (SSD aborts on it)")
        rows: list[list[float]] = []
        for i in range(n):
            decoded = {}
            for c in range(nl):
                label = -1 if self.share_location else c
                if label == self.background_label_id:
                    continue
                decoded[label] = decode_boxes(
                    loc_a[i, :, c], priors, variances, self.code_type, self.variance_encoded_in_target
                )
            indices: dict[int, list[int]] = {}
            for c in range(nc):
                if c == self.background_label_id:
                    continue
                boxes = decoded[-1 if self.share_location else c]
                indices[c] = nms_fast(
                    boxes, conf_a[i, :, c], self.confidence_threshold, self.nms_threshold, self.eta, self.top_k
                )
            total = sum(len(v) for v in indices.values())
            if -1 < self.keep_top_k < total:
                pairs = [(float(conf_a[i, j, c]), c, j) for c, js in indices.items() for j in js]
                order = sorted(range(len(pairs)), key=lambda k: -pairs[k][0])[: self.keep_top_k]
                indices = {}
                for k in order:
                    _, c, j = pairs[k]
                    indices.setdefault(c, []).append(j)
            for c in sorted(indices):
                boxes = decoded[-1 if self.share_location else c]
                for j in indices[c]:
                    rows.append([i, c, float(conf_a[i, j, c]), *boxes[j].tolist()])
        if rows:
            out = np.asarray(rows, np.float32)
        else:
            out = np.full((n, 7), -1, np.float32)
            out[:, 0] = np.arange(n)
        return (torch.from_numpy(out.reshape(1, 1, -1, 7)).to(device=loc.device, dtype=loc.dtype),)
