"""Region layers of the two-stage detectors: Faster R-CNN's ``Proposal`` (and py-faster-rcnn's
Python-layer form of it), ``ROIPooling`` (Fast/Faster R-CNN) and R-FCN's ``PSROIPooling``.

Rois are ``(R, 5)`` rows ``[batch index, x1, y1, x2, y2]`` in the image's pixel coordinates,
corners inclusive (a box ``[0, 0, 15, 15]`` is 16 pixels wide), as in the forks.
"""

from __future__ import annotations

import ast
import math

import numpy as np
import torch

from caffe_compat.layers.base import Layer, register_layer
from caffe_compat.layers.fork_fields import fork_param
from caffe_compat.proto import caffe_pb2

__all__ = [
    "ProposalLayer",
    "ROIPoolingLayer",
    "PSROIPoolingLayer",
    "generate_anchors",
    "proposal_anchors",
    "parse_param_str",
    "PY_FASTER_RCNN_PROPOSAL",
]

#: The py-faster-rcnn Python layer that ``Proposal`` replaces (python_param module, layer).
PY_FASTER_RCNN_PROPOSAL = ("rpn.proposal_layer", "ProposalLayer")
#: py-faster-rcnn's lib/fast_rcnn/config.py: RPN_PRE_NMS_TOP_N, RPN_POST_NMS_TOP_N,
#: RPN_NMS_THRESH, RPN_MIN_SIZE per phase.
_PY_FASTER_RCNN_CFG = {
    caffe_pb2.TRAIN: (12000, 2000, 0.7, 16),
    caffe_pb2.TEST: (6000, 300, 0.7, 16),
}
_PROPOSAL_ALT = (201,)  # OpenCV 4's opencv-caffe.proto: SSD's multibox_loss_param


def generate_anchors(base_size: int, ratios, scales) -> np.ndarray:
    """py-faster-rcnn's ``generate_anchors``: ``(len(ratios)·len(scales), 4)`` boxes
    ``[x1, y1, x2, y2]`` centred on the base box ``[0, 0, base−1, base−1]``, ratio-major.

    For each ratio ``r``: ``w = round(sqrt(base² / r))``, ``h = round(w · r)`` (NumPy's
    round-half-to-even); for each scale ``s``: ``w·s × h·s``; a box of size ``w × h`` around the
    centre ``c`` is ``[c − (w−1)/2, ..., c + (w−1)/2]``.
    """
    w0 = h0 = float(base_size)
    cx = cy = (base_size - 1) / 2.0
    out = []
    for r in ratios:
        ws = np.round(np.sqrt(w0 * h0 / r))
        hs = np.round(ws * r)
        for s in scales:
            w, h = ws * s, hs * s
            out.append([cx - 0.5 * (w - 1), cy - 0.5 * (h - 1), cx + 0.5 * (w - 1), cy + 0.5 * (h - 1)])
    return np.asarray(out, dtype=np.float64).reshape(-1, 4)


def proposal_anchors(base_size: int, ratios, scales) -> np.ndarray:
    """The anchors of the C++ ``Proposal`` layer the conformance fixtures were made with: an
    anchor's side is ``scale`` pixels (not ``base_size · scale`` as in py-faster-rcnn),
    ``w = round(scale / sqrt(r))``, ``h = round(scale · sqrt(r))`` (C's round), centred at
    ``(base_size − 1) / 2``; ratio-major like ``generate_anchors``."""
    c = (base_size - 1) / 2.0
    out = []
    for r in ratios:
        for s in scales:
            w = math.floor(s / math.sqrt(r) + 0.5)
            h = math.floor(s * math.sqrt(r) + 0.5)
            out.append([c - 0.5 * (w - 1), c - 0.5 * (h - 1), c + 0.5 * (w - 1), c + 0.5 * (h - 1)])
    return np.asarray(out, dtype=np.float64).reshape(-1, 4)


def parse_param_str(text: str, where: str) -> dict:
    """A Python layer's ``param_str`` as a dict, without running it: a Python literal
    (``"'feat_stride': 16"``, with or without the braces) by ``ast.literal_eval``, else YAML by
    ``yaml.safe_load`` (py-faster-rcnn reads it with ``yaml.load``)."""
    text = text.strip()
    if not text:
        return {}
    for candidate in (text, "{" + text + "}"):
        try:
            value = ast.literal_eval(candidate)
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, dict):
            return value
    try:
        import yaml

        value = yaml.safe_load(text)
    except Exception as e:  # yaml missing or not YAML either
        raise ValueError(f"{where}: param_str {text!r} is neither a Python dict literal nor YAML ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: param_str {text!r} is not a mapping")
    return value


@register_layer("Proposal")
class ProposalLayer(Layer):
    """Faster R-CNN's region proposals from the RPN's scores and box deltas.

    Follows py-faster-rcnn @ 54d2576 ``lib/rpn/proposal_layer.py`` (``generate_anchors.py``,
    ``bbox_transform_inv``, ``clip_boxes``, ``py_cpu_nms``), as a C++ ``Proposal`` layer that the
    conformance fixture ``forward_only_faster_rcnn_proposal`` checks:

    1. anchors (A of them, ratio-major) shifted by ``feat_stride · (x, y)`` at every cell,
       cell-major: K·A boxes. The ``Proposal`` type uses the fixture build's anchors
       (``proposal_anchors``: sides of ``scale`` pixels); the Python-layer form uses
       py-faster-rcnn's ``generate_anchors`` (sides of ``base_size · scale`` pixels);
    2. deltas ``bottom[1][0, 4a:4a+4, y, x]`` applied (``w = x2 − x1 + 1``, ``cx = x1 + w/2``,
       ``cx' = dx·w + cx``, ``w' = exp(dw)·w``, box ``[cx' − w'/2, cy' − h'/2, cx' + w'/2,
       cy' + h'/2]``), clipped to ``[0, im_w − 1] × [0, im_h − 1]``;
    3. boxes narrower or lower than ``min_size · im_scale`` (``x2 − x1 + 1``) dropped;
    4. sorted by foreground score (``bottom[0][0, A + a, y, x]``), the first ``pre_nms_topn``
       (≤ 0: all) kept, greedy NMS at IoU ``nms_thresh`` (``+1`` areas; a box is dropped when
       its overlap is greater than the threshold), the first ``post_nms_topn`` (≤ 0: all) kept.

    Parameters (``proposal_param``): ``feat_stride`` 16, ``base_size`` 16, ``min_size`` 16,
    ``ratio`` (unset: 0.5, 1, 2), ``scale`` (unset: 8, 16, 32), ``pre_nms_topn`` 6000,
    ``post_nms_topn`` 300, ``nms_thresh`` 0.7.

    **Python-layer form**: ``type: "Python"`` with ``python_param { module: "rpn.proposal_layer"
    layer: "ProposalLayer" param_str: "'feat_stride': 16" }`` builds this layer without importing
    or running any user code (no opt-in needed): ``param_str`` is parsed as a literal
    (``parse_param_str``; keys ``feat_stride``, ``scales``, ``ratios``, ``base_size``), the NMS
    settings are py-faster-rcnn's config for the phase (TRAIN 12000/2000/0.7/16, TEST
    6000/300/0.7/16).

    Bottoms: ``cls`` ``(1, 2A, H, W)``, ``bbox`` ``(1, 4A, H, W)``, ``im_info`` ``(1, 3)`` =
    [height, width, scale]. Tops: rois ``(R, 5)`` (batch index 0), optionally scores ``(R, 1)``;
    R depends on the data (the set-up shape is ``(1, 5)``, as the fork's ``reshape``).
    No backward (the fork's is empty): bottoms get no gradient. One image per batch, as the fork.
    """

    fork = "Faster R-CNN"

    exact_num_bottom = 3
    min_top = 1
    max_top = 2

    def setup(self, bottom_shapes):
        if self.param.type == "Python":
            self._setup_from_python_param()
        else:
            p = fork_param(self.param, "proposal_param", _PROPOSAL_ALT)
            self.feat_stride = int(p.feat_stride)
            self.base_size = int(p.base_size)
            self.min_size = float(p.min_size)
            self.ratios = [float(r) for r in p.ratio] or [0.5, 1.0, 2.0]
            self.scales = [float(s) for s in p.scale] or [8.0, 16.0, 32.0]
            self.pre_nms, self.post_nms, self.nms_thresh = (
                int(p.pre_nms_topn),
                int(p.post_nms_topn),
                float(p.nms_thresh),
            )
        if self.param.type == "Python":
            self.anchors = generate_anchors(self.base_size, self.ratios, self.scales)
        else:
            self.anchors = proposal_anchors(self.base_size, self.ratios, self.scales)
        a = len(self.anchors)
        cls, bbox, info = bottom_shapes
        if len(cls) != 4 or cls[1] != 2 * a:
            raise self.error(f"bottom 0 (scores) must be (1, 2A={2 * a}, H, W) for {a} anchors, got {list(cls)}")
        if len(bbox) != 4 or bbox[1] != 4 * a or bbox[2:] != cls[2:]:
            raise self.error(f"bottom 1 (deltas) must be (1, 4A={4 * a}, {cls[2]}, {cls[3]}), got {list(bbox)}")
        if cls[0] != 1:
            raise self.error(f"only single-image batches are supported (as py-faster-rcnn), got N={cls[0]}")
        if int(np.prod(info)) < 3:
            raise self.error(f"bottom 2 (im_info) must hold [height, width, scale], got shape {list(info)}")

    def _setup_from_python_param(self):
        pp = self.param.python_param
        where = f"layer {self.name!r} (Python {pp.module}.{pp.layer})"
        try:
            d = parse_param_str(pp.param_str, where)
        except ValueError as e:
            raise self.error(str(e)) from None
        known = {"feat_stride", "scales", "ratios", "base_size"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise self.error(f"param_str keys {unknown} are not read by {pp.module}.{pp.layer}; known: {sorted(known)}")
        self.feat_stride = int(d.get("feat_stride", 16))
        self.base_size = int(d.get("base_size", 16))
        self.scales = [float(s) for s in d.get("scales", (8, 16, 32))]
        self.ratios = [float(r) for r in d.get("ratios", (0.5, 1, 2))]
        phase = caffe_pb2.TRAIN if self.phase == caffe_pb2.TRAIN else caffe_pb2.TEST
        self.pre_nms, self.post_nms, self.nms_thresh, min_size = _PY_FASTER_RCNN_CFG[phase]
        self.min_size = float(min_size)

    def top_shapes(self, bottom_shapes):
        return [(1, 5), (1, 1)][: self.num_tops]

    def forward(self, cls, bbox, im_info):
        device = cls.device
        a = len(self.anchors)
        scores = cls.detach()[0, a:].permute(1, 2, 0).reshape(-1).double().cpu().numpy()
        deltas = bbox.detach()[0].permute(1, 2, 0).reshape(-1, 4).double().cpu().numpy()
        info = im_info.detach().reshape(-1)[:3].double().cpu().numpy()
        h, w = cls.shape[2:]
        sx, sy = np.meshgrid(np.arange(w) * self.feat_stride, np.arange(h) * self.feat_stride)
        shifts = np.stack([sx.ravel(), sy.ravel(), sx.ravel(), sy.ravel()], axis=1).astype(np.float64)
        anchors = (self.anchors[None, :, :] + shifts[:, None, :]).reshape(-1, 4)
        boxes = _apply_deltas(anchors, deltas)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, info[1] - 1)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, info[0] - 1)
        min_size = self.min_size * info[2]
        keep = np.where((boxes[:, 2] - boxes[:, 0] + 1 >= min_size) & (boxes[:, 3] - boxes[:, 1] + 1 >= min_size))[0]
        boxes, scores = boxes[keep], scores[keep]
        order = np.argsort(-scores, kind="stable")
        if self.pre_nms > 0:
            order = order[: self.pre_nms]
        boxes, scores = boxes[order], scores[order]
        keep = _nms(boxes, self.nms_thresh)
        if self.post_nms > 0:
            keep = keep[: self.post_nms]
        boxes, scores = boxes[keep], scores[keep]
        rois = np.concatenate([np.zeros((len(boxes), 1)), boxes], axis=1)
        tops = [torch.tensor(rois, dtype=cls.dtype, device=device)]
        if self.num_tops > 1:
            tops.append(torch.tensor(scores.reshape(-1, 1), dtype=cls.dtype, device=device))
        return tuple(tops)


def _apply_deltas(boxes: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    widths = boxes[:, 2] - boxes[:, 0] + 1.0
    heights = boxes[:, 3] - boxes[:, 1] + 1.0
    cx = boxes[:, 0] + 0.5 * widths
    cy = boxes[:, 1] + 0.5 * heights
    pcx = deltas[:, 0] * widths + cx
    pcy = deltas[:, 1] * heights + cy
    pw = np.exp(deltas[:, 2]) * widths
    ph = np.exp(deltas[:, 3]) * heights
    return np.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], axis=1)


def _nms(boxes: np.ndarray, thresh: float) -> np.ndarray:
    """Greedy NMS over boxes already in score order (py_cpu_nms): the kept indices, in order."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.arange(len(boxes))
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][ovr <= thresh]
    return np.asarray(keep, dtype=np.int64)


def _c_round(v: torch.Tensor) -> torch.Tensor:
    """C's round(): halves away from zero."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def _check_rois(layer: Layer, feat_shape, rois_shape) -> None:
    if len(feat_shape) != 4:
        raise layer.error(f"bottom 0 must be (N, C, H, W), got {list(feat_shape)}")
    if len(rois_shape) < 2 or rois_shape[1] != 5 or any(d != 1 for d in rois_shape[2:]):
        raise layer.error(f"bottom 1 (rois) must be (R, 5) rows [batch, x1, y1, x2, y2], got {list(rois_shape)}")


@register_layer("ROIPooling")
class ROIPoolingLayer(Layer):
    """Fast/Faster R-CNN's ROI max pooling.

    Follows rbgirshick/caffe-fast-rcnn (``src/caffe/layers/roi_pooling_layer.cpp`` / ``.cu``,
    faster-rcnn branch @ 0dcd397): a roi's corners are scaled and rounded
    (``round(x · spatial_scale)``, C's round), its size is ``max(end − start + 1, 1)``; bin
    ``(ph, pw)`` covers rows ``[floor(ph · h/PH), ceil((ph+1) · h/PH))`` offset by the start and
    clipped to the map; the top is the bin's maximum, 0 for an empty bin. Backward: each top
    diff goes to the position of its maximum (the fork's GPU backward; its CPU backward is not
    implemented); rois get no gradient.

    Parameters (``roi_pooling_param``): ``pooled_h``, ``pooled_w`` (both > 0), ``spatial_scale`` 1.
    Bottoms: features ``(N, C, H, W)``, rois ``(R, 5)``. Top: ``(R, C, pooled_h, pooled_w)``.
    Ties inside a bin: the first maximum in row-major order wins (the fork's strict ``>``).
    """

    fork = "Faster R-CNN"

    exact_num_bottom = 2
    exact_num_top = 1

    def setup(self, bottom_shapes):
        p = self.param.roi_pooling_param
        if p.pooled_h <= 0 or p.pooled_w <= 0:
            raise self.error(f"roi_pooling_param.pooled_h and pooled_w must be > 0, got {p.pooled_h}, {p.pooled_w}")
        self.ph, self.pw, self.spatial_scale = int(p.pooled_h), int(p.pooled_w), float(p.spatial_scale)
        _check_rois(self, bottom_shapes[0], bottom_shapes[1])

    def forward(self, x, rois):
        n, c, h, w = x.shape
        r = rois.shape[0]
        if x.device.type == "meta":
            return (x.new_empty((r, c, self.ph, self.pw)),)
        if r == 0:
            return (x.new_zeros((0, c, self.ph, self.pw)),)
        dev = x.device
        with torch.no_grad():
            rr = rois.detach().reshape(r, 5).float().to(dev)
            batch = rr[:, 0].long()
            if int(batch.min()) < 0 or int(batch.max()) >= n:
                raise self.error(f"a roi names image {int(batch.max())}, the batch has {n}")
            x1, y1, x2, y2 = (_c_round(rr[:, k] * self.spatial_scale).long() for k in range(1, 5))
            h0, h1 = _roi_bins(y1, torch.clamp(y2 - y1 + 1, min=1), self.ph, h)  # (R, PH)
            w0, w1 = _roi_bins(x1, torch.clamp(x2 - x1 + 1, min=1), self.pw, w)  # (R, PW)
            empty = (h1 <= h0)[:, :, None] | (w1 <= w0)[:, None, :]  # (R, PH, PW)
            bh, bw = max(int((h1 - h0).max()), 0), max(int((w1 - w0).max()), 0)
            xt = x.detach().permute(0, 2, 3, 1).contiguous()  # (N, H, W, C): a gathered cell is one contiguous row
            bi = batch[:, None, None]
            best = torch.full((r, self.ph, self.pw, c), float("-inf"), dtype=x.dtype, device=dev)
            off = torch.zeros((r, self.ph, self.pw, c), dtype=torch.int32, device=dev)
            # every offset inside a bin, rows then columns: a strictly greater value replaces the
            # kept one, so the first maximum in the fork's row-major scan wins
            for dh in range(bh):
                hp = h0 + dh
                for dw in range(bw):
                    wp = w0 + dw
                    valid = (hp < h1)[:, :, None] & (wp < w1)[:, None, :]  # (R, PH, PW)
                    vals = xt[bi, hp.clamp(max=h - 1)[:, :, None], wp.clamp(max=w - 1)[:, None, :]]
                    better = valid[..., None] & (vals > best)
                    best = torch.where(better, vals, best)
                    off = torch.where(better, dh * bw + dw, off)
            hpos = (h0[:, :, None, None] + off // max(bw, 1)).clamp(max=h - 1)
            wpos = (w0[:, None, :, None] + off % max(bw, 1)).clamp(max=w - 1)
            chan = torch.arange(c, device=dev)
        out = x[batch[:, None, None, None], chan, hpos, wpos].permute(0, 3, 1, 2)  # (R, C, PH, PW)
        empty = empty[:, None]
        return (torch.where(empty, torch.zeros((), dtype=x.dtype, device=dev), out),)


def _roi_bins(start: torch.Tensor, size: torch.Tensor, pooled: int, limit: int):
    """[begin, end) of each of ``pooled`` bins of rois starting at ``start`` with ``size`` cells,
    per roi, clipped to [0, limit] (the fork's float32 bin size, floor / ceil)."""
    bin_size = size.float() / float(pooled)
    i = torch.arange(pooled, dtype=torch.float32, device=start.device)
    lo = torch.floor(i[None] * bin_size[:, None]).long() + start[:, None]
    hi = torch.ceil((i[None] + 1) * bin_size[:, None]).long() + start[:, None]
    return lo.clamp(0, limit), hi.clamp(0, limit)


@register_layer("PSROIPooling")
class PSROIPoolingLayer(Layer):
    """R-FCN's position-sensitive ROI average pooling.

    Follows daijifeng001/caffe-rfcn (``psroi_pooling_layer.cu``, as in YuwenXiong/py-R-FCN):
    corners rounded then scaled (``x1' = round(x1) · s``, ``x2' = (round(x2) + 1) · s``), the roi
    ``max(x2' − x1', 0.1)`` wide; bin ``(i, j)`` of a k×k grid covers
    ``[floor(start + i · size/k), ceil(start + (i+1) · size/k))`` clipped to the map; top channel
    ``o``, bin ``(i, j)`` averages bottom channel ``(o · k + i) · k + j`` over the bin (0 for an
    empty bin). Backward: each top diff divided by the bin's area, added over the bin; rois get
    no gradient.

    Parameters (``psroi_pooling_param``, all required): ``spatial_scale``, ``output_dim``,
    ``group_size`` (k). Bottoms: ``(N, output_dim · k², H, W)``, rois ``(R, 5)``.
    Top: ``(R, output_dim, k, k)``.
    """

    fork = "R-FCN"

    exact_num_bottom = 2
    exact_num_top = 1

    def setup(self, bottom_shapes):
        p = self.param.psroi_pooling_param
        for f in ("spatial_scale", "output_dim", "group_size"):
            if not p.HasField(f):
                raise self.error(f"psroi_pooling_param.{f} is required")
        if p.output_dim <= 0 or p.group_size <= 0:
            raise self.error("psroi_pooling_param.output_dim and group_size must be > 0")
        self.k, self.dim, self.spatial_scale = int(p.group_size), int(p.output_dim), float(p.spatial_scale)
        _check_rois(self, bottom_shapes[0], bottom_shapes[1])
        if bottom_shapes[0][1] != self.dim * self.k * self.k:
            raise self.error(
                f"bottom 0 must have output_dim · group_size² = {self.dim * self.k * self.k} channels, "
                f"got {bottom_shapes[0][1]}"
            )

    def _masks(self, start, end, limit, device, dtype):
        size = torch.clamp(end - start, min=0.1)
        i = torch.arange(self.k, dtype=torch.float32)
        lo = torch.floor(start[:, None] + i[None] * (size[:, None] / self.k)).long().clamp(0, limit)
        hi = torch.ceil(start[:, None] + (i[None] + 1) * (size[:, None] / self.k)).long().clamp(0, limit)
        pos = torch.arange(limit)
        m = (pos[None, None] >= lo[:, :, None]) & (pos[None, None] < hi[:, :, None])  # (R, k, limit)
        return m.to(device=device, dtype=dtype), (hi - lo).clamp(min=0)

    def forward(self, x, rois):
        n, c, h, w = x.shape
        r = rois.shape[0]
        if x.device.type == "meta":
            return (x.new_empty((r, self.dim, self.k, self.k)),)
        rr = rois.detach().reshape(r, 5).float().cpu()
        s = torch.tensor(self.spatial_scale, dtype=torch.float32)
        x1 = _c_round(rr[:, 1]) * s
        y1 = _c_round(rr[:, 2]) * s
        x2 = (_c_round(rr[:, 3]) + 1.0) * s
        y2 = (_c_round(rr[:, 4]) + 1.0) * s
        hm, hn = self._masks(y1, y2, h, x.device, x.dtype)  # (R, k, H), (R, k)
        wm, wn = self._masks(x1, x2, w, x.device, x.dtype)  # (R, k, W), (R, k)
        area = (hn[:, :, None] * wn[:, None, :]).to(device=x.device, dtype=x.dtype)  # (R, k, k)
        batch = rr[:, 0].long()
        xs = x.reshape(n, self.dim, self.k, self.k, h, w)
        out = x.new_zeros((r, self.dim, self.k, self.k))
        for b in torch.unique(batch).tolist():
            if not 0 <= b < n:
                raise self.error(f"a roi names image {b}, the batch has {n}")
            sel = (batch == b).nonzero().flatten().to(x.device)
            sums = torch.einsum("rih,dijhw,rjw->rdij", hm[sel], xs[b], wm[sel])
            out = out.index_copy(0, sel, sums)
        safe = torch.where(area > 0, area, torch.ones_like(area))
        return (torch.where(area[:, None] > 0, out / safe[:, None], torch.zeros_like(out)),)
