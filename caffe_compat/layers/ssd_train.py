"""The training layers of Caffe's detection forks: SSD's ``MultiBoxLoss`` and ``AnnotatedData``,
and ``SmoothL1Loss`` in both its fork forms (SSD's and py-faster-rcnn's).

Which source each follows:

- SSD: weiliu89/caffe, branch ``ssd``, commit 4817bf8b (2018-01-02):
  ``src/caffe/layers/multibox_loss_layer.cpp``, ``smooth_L1_loss_layer.cpp``,
  ``annotated_data_layer.cpp`` and ``src/caffe/util/bbox_util.cpp`` (GetGroundTruth,
  GetPriorBBoxes, GetLocPredictions, MatchBBox, FindMatches, MineHardExamples, EncodeBBox,
  EncodeLocPrediction, ComputeConfLoss, EncodeConfPrediction).
- py-faster-rcnn: rbgirshick/caffe-fast-rcnn commit 0dcd397b (the submodule of
  rbgirshick/py-faster-rcnn): ``src/caffe/layers/smooth_L1_loss_layer.cu`` (its only
  implementation; the CPU path is NOT_IMPLEMENTED there) and ``smooth_l1_loss_param`` = 8266712.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from caffe_compat.layers.base import Layer, register_layer, scalar_tensor
from caffe_compat.layers.data import _PrefetchingDataLayer
from caffe_compat.layers.loss import (
    _IGNORED,
    _normalization,
    _normalizer_count,
    _SigmoidCrossEntropyFunction,
    _SoftmaxLossFunction,
)
from caffe_compat.proto import caffe_pb2

__all__ = [
    "SmoothL1LossLayer",
    "MultiBoxLossLayer",
    "AnnotatedDataLayer",
    "match_bboxes",
    "encode_bboxes",
    "jaccard_overlaps",
]

#: C's FLT_MIN: SSD's ComputeConfLoss clamps the softmax probability to it before the log.
_FLT_MIN = 1.17549435082228750797e-38


def _legacy_chw(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Caffe's channels(), height(), width() of a blob of at most 4 axes (1 for a missing axis)."""
    s = tuple(shape) + (1,) * (4 - len(shape))
    return s[1], s[2], s[3]


# -- SmoothL1Loss -------------------------------------------------------------------------------


class _SmoothL1Function(torch.autograd.Function):
    """Both forks' SmoothL1Loss with their own backward.

    ``d = w_in * (pred - target)`` (``w_in`` optional), ``e = f(d)`` with
    ``f(x) = 0.5 * sigma2 * x^2`` if ``|x| < 1 / sigma2`` else ``|x| - 0.5 / sigma2``,
    ``e = w_out * e`` (optional), loss ``sum(e) / num``. Backward to pred and (negated) to
    target: ``f'(d) * g / num``, times ``w_in * w_out`` when ``weights_in_grad`` (py-faster-rcnn),
    not multiplied by the weights at all otherwise (SSD's 3-bottom form, as SSD computes it:
    not the derivative of its forward). Nothing flows to the weights."""

    @staticmethod
    def forward(ctx, pred, target, w_in, w_out, sigma2: float, num: int, weights_in_grad: bool):
        d = pred - target
        if w_in is not None:
            d = w_in * d
        a = d.abs()
        inside = a < 1.0 / sigma2
        e = torch.where(inside, 0.5 * sigma2 * d * d, a - 0.5 / sigma2)
        if w_out is not None:
            e = w_out * e
        ctx.save_for_backward(d, w_in, w_out)
        ctx.sigma2, ctx.num, ctx.weights_in_grad = sigma2, num, weights_in_grad
        return e.sum() / num

    @staticmethod
    def backward(ctx, grad_loss):
        d, w_in, w_out = ctx.saved_tensors
        sigma2 = ctx.sigma2
        g = torch.where(d.abs() < 1.0 / sigma2, sigma2 * d, torch.sign(d))
        if ctx.weights_in_grad:
            if w_in is not None:
                g = g * w_in
            if w_out is not None:
                g = g * w_out
        g = g * (grad_loss / ctx.num)
        return g, -g, None, None, None, None, None


def smooth_l1_loss(pred: Tensor, target: Tensor, w_in=None, w_out=None, *, sigma: float = 1.0, num: int = 1):
    """py-faster-rcnn's SmoothL1Loss (SSD's with ``sigma`` 1 and no weights): a 0-d tensor."""
    s = np.float32(sigma)
    return _SmoothL1Function.apply(pred, target, w_in, w_out, float(s * s), num, True)


@register_layer("SmoothL1Loss")
class SmoothL1LossLayer(Layer):
    """Fast R-CNN's smooth L1 loss, in the two forms its forks carry.

    ``loss = sum(w_out * f(w_in * (pred - target))) / N``, N = ``pred.shape[0]`` (Caffe's num),
    ``f(x) = 0.5 * sigma^2 * x^2`` if ``|x| < 1 / sigma^2``, else ``|x| - 0.5 / sigma^2``.

    How one class tells the two forms apart (Caffe's type string is the same):

    - **py-faster-rcnn** (rbgirshick/caffe-fast-rcnn 0dcd397b, ``smooth_L1_loss_layer.cu``) when
      the layer has ``smooth_l1_loss_param`` (field 8266712; ``sigma`` 1) or 4 bottoms: pred,
      target, and optionally both ``bbox_inside_weights`` (w_in) and ``bbox_outside_weights``
      (w_out) — 3 bottoms are refused there, as that fork refuses them. Gradient: the derivative
      of the loss, ``±f'(w_in d) * w_in * w_out * g / N``.
    - **SSD** (weiliu89/caffe ssd 4817bf8b, ``smooth_L1_loss_layer.cpp``) otherwise: pred,
      target and an optional third bottom of weights w (``d = w * (pred - target)``, no outside
      weights, sigma 1). Gradient as SSD computes it: ``±f'(w d) * g / N`` — without the factor
      ``w`` (so not the derivative of the forward when w is given).

    With 2 bottoms and sigma 1 the two forms compute the same loss and gradient. Bottoms:
    pred and target (and the weights) with the same num and the same channels/height/width
    (Caffe's legacy 4-D accessors). Top: the 0-d loss. Gradients go to pred and (negated) to
    target, never to the weights; force_backward reaches both pred and target (the forks'
    AllowForceBackward is true; for the weight bottoms, which never receive a diff, we answer
    false, which leaves their diff at zero as in Caffe).
    """

    min_bottom = 2
    max_bottom = 4
    exact_num_top = 1
    is_loss = True

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        n = len(bottom_shapes)
        self.faster_rcnn = self.param.HasField("smooth_l1_loss_param") or n == 4
        if self.faster_rcnn:
            if n == 3:
                raise self.error(
                    "py-faster-rcnn's SmoothL1Loss (smooth_l1_loss_param given) takes 2 bottoms or 4 "
                    "(pred, target, inside weights, outside weights), got 3; give both weight bottoms, or "
                    "drop smooth_l1_loss_param for SSD's form with one weight bottom"
                )
            s = np.float32(self.param.smooth_l1_loss_param.sigma)
            self.sigma2 = float(s * s)
            if not self.sigma2 > 0:
                raise self.error(f"smooth_l1_loss_param.sigma = {float(s)} must be non-zero")
        else:
            self.sigma2 = 1.0
        self._check(bottom_shapes)

    def _check(self, shapes) -> None:
        if any(len(s) > 4 for s in shapes):
            raise self.error(f"bottoms must have at most 4 axes (Caffe's num/channels/height/width), got {shapes}")
        if shapes[0][:1] != shapes[1][:1]:
            raise self.error(f"pred {shapes[0]} and target {shapes[1]} must have the same num (first dimension)")
        for j in range(1, len(shapes)):
            if _legacy_chw(shapes[j]) != _legacy_chw(shapes[0]):
                raise self.error(
                    f"bottom {j} ({self.param.bottom[j] if j < len(self.param.bottom) else j!r}) has shape "
                    f"{shapes[j]}; it must have the channels/height/width of pred {shapes[0]}"
                )

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index < 2

    def forward(self, pred: Tensor, target: Tensor, *weights: Tensor) -> tuple[Tensor]:
        self._check([tuple(pred.shape), tuple(target.shape), *(tuple(w.shape) for w in weights)])
        t = target.reshape(pred.shape)
        ws = [w.detach().reshape(pred.shape) for w in weights]
        w_in = ws[0] if ws else None
        w_out = ws[1] if len(ws) > 1 else None
        num = pred.shape[0] if pred.dim() else 1
        return (_SmoothL1Function.apply(pred, t, w_in, w_out, self.sigma2, num, self.faster_rcnn),)


# -- SSD's box utilities (bbox_util.cpp) ---------------------------------------------------------


def jaccard_overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSD's JaccardOverlap (normalized boxes, float32) of every row of ``a`` (P, 4) with every
    row of ``b`` (G, 4): (P, G). Disjoint or touching boxes give 0; a box with xmax < xmin (or
    ymax < ymin) has size 0."""
    a = np.asarray(a, np.float32)[:, None, :]
    b = np.asarray(b, np.float32)[None, :, :]
    disjoint = (b[..., 0] > a[..., 2]) | (b[..., 2] < a[..., 0]) | (b[..., 1] > a[..., 3]) | (b[..., 3] < a[..., 1])
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    ok = ~disjoint & (iw > 0) & (ih > 0)

    def size(x):
        w, h = x[..., 2] - x[..., 0], x[..., 3] - x[..., 1]
        return np.where((w < 0) | (h < 0), np.float32(0), w * h)

    inter = np.where(ok, iw * ih, np.float32(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = inter / (size(a) + size(b) - inter)
    return np.where(ok, out, np.float32(0)).astype(np.float32)


def match_bboxes(
    gt: np.ndarray,
    priors: np.ndarray,
    match_type: int,
    overlap_threshold: float,
    ignore_cross_boundary: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """SSD's MatchBBox against all ground truth (label -1): (match index per prior, -1 none,
    -2 ignored cross-boundary prior; overlap per prior).

    Bipartite: repeatedly the (prior, gt) pair of largest overlap (> 1e-6) among unmatched priors
    and unused gts, first in (prior, gt) order on ties. PER_PREDICTION then gives each remaining
    prior its best gt of overlap >= overlap_threshold. A prior's overlap is its best overlap
    (> 1e-6), or the overlap of the pair that matched it."""
    num_p = len(priors)
    match = np.full(num_p, -1, np.int64)
    best = np.zeros(num_p, np.float32)
    if len(gt) == 0:
        return match, best
    ov = jaccard_overlaps(priors, gt)
    if ignore_cross_boundary:
        cross = ((priors < 0) | (priors > 1)).any(axis=1)
        match[cross] = -2
        ov[cross] = 0
    present = ov > 1e-6
    best = np.where(present, ov, 0).max(axis=1).astype(np.float32)
    pool = np.ones(len(gt), bool)
    while pool.any():
        cand = np.where(present & (match == -1)[:, None] & pool[None, :], ov, -1.0)
        k = int(np.argmax(cand))
        i, j = divmod(k, len(gt))
        if cand[i, j] < 0:
            break
        match[i] = j
        best[i] = ov[i, j]
        pool[j] = False
    if match_type == caffe_pb2.MultiBoxLossParameter.PER_PREDICTION:
        cand = np.where(present & (ov >= np.float32(overlap_threshold)), ov, -1.0)
        j = np.argmax(cand, axis=1)
        hit = (match == -1) & (cand[np.arange(num_p), j] >= 0)
        match[hit] = j[hit]
        best[hit] = ov[hit, j[hit]]
    return match, best


def encode_bboxes(priors: np.ndarray, variances: np.ndarray, gt: np.ndarray, code_type: int, in_target: bool):
    """SSD's EncodeBBox of ``gt`` (M, 4) against their priors (M, 4) with variances (M, 4):
    (M, 4) float32. ``in_target`` (encode_variance_in_target): the variances are left out here
    (the loss divides both sides by them)."""
    p = np.asarray(priors, np.float64)
    g = np.asarray(gt, np.float64)
    v = np.ones_like(p) if in_target else np.asarray(variances, np.float64)
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    if code_type == caffe_pb2.PriorBoxParameter.CORNER:
        out = (g - p) / v
    elif code_type == caffe_pb2.PriorBoxParameter.CENTER_SIZE:
        gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
        out = (
            np.stack(
                [
                    ((g[:, 0] + g[:, 2]) / 2 - (p[:, 0] + p[:, 2]) / 2) / pw,
                    ((g[:, 1] + g[:, 3]) / 2 - (p[:, 1] + p[:, 3]) / 2) / ph,
                    np.log(gw / pw),
                    np.log(gh / ph),
                ],
                axis=1,
            )
            / v
        )
    else:  # CORNER_SIZE
        out = (g - p) / np.stack([pw, ph, pw, ph], axis=1) / v
    return out.astype(np.float32)


# -- MultiBoxLoss ---------------------------------------------------------------------------------

_MB = caffe_pb2.MultiBoxLossParameter


@register_layer("MultiBoxLoss")
class MultiBoxLossLayer(Layer):
    """SSD's MultiBoxLoss: match priors to ground truth, mine hard negatives, then a location loss
    on the matched priors plus a confidence loss on the matched and mined ones.

    ``loss = loc_weight * L_loc / normalizer + L_conf / normalizer`` (each term only where the
    layer's ``propagate_down`` for that bottom is true; SSD sets [true, true, false, false] when
    the prototxt gives none), normalizer = LossLayer::GetNormalizer(``loss_param.normalization``
    (VALID; legacy ``normalize``), num, num_priors, num_matches), at least 1: VALID = number of
    matched priors, BATCH_SIZE = num, FULL = num * num_priors, NONE = 1.

    Bottoms: loc predictions (N, P * loc_classes * 4) (any shape with that count per image),
    confidences (N, P * num_classes), priors (1, 2, P * 4) (PriorBox's top: boxes then
    variances), ground truth (1, 1, G, 8) rows (item_id, label, instance_id, xmin, ymin, xmax,
    ymax, difficult); item_id -1 rows are skipped. Top: the 0-d loss.

    ``multibox_loss_param`` (SSD's defaults): ``num_classes`` (required), ``share_location``
    true, ``background_label_id`` 0, ``use_difficult_gt`` true, ``match_type`` PER_PREDICTION
    (or BIPARTITE), ``overlap_threshold`` 0.5, ``use_prior_for_matching`` true (false is
    refused), ``code_type`` CORNER (CENTER_SIZE, CORNER_SIZE), ``encode_variance_in_target``
    false, ``loc_loss_type`` SMOOTH_L1 (L2: EuclideanLoss on one item, sum/2), ``loc_weight`` 1,
    ``conf_loss_type`` SOFTMAX (sum of ``-log(max(p, FLT_MIN))``) or LOGISTIC (sigmoid
    cross-entropy summed over classes), ``mining_type`` MAX_NEGATIVE (``neg_pos_ratio`` 3,
    ``neg_overlap`` 0.5; NONE: every prior in the confidence loss; HARD_EXAMPLE and ``nms_param``
    are refused), ``map_object_to_agnostic``, ``ignore_cross_boundary_bbox``, ``bp_inside``.

    Matching and mining run on the host on detached copies (they choose indices; SSD runs them
    on the CPU too); the losses are torch operations on the gathered predictions, so the
    backward is SSD's: the loc/conf diffs of the chosen priors, zero elsewhere, nothing to the
    priors or the labels.

    Differences from SSD: ties in the hard-negative ranking are broken by prior index (SSD's
    ``std::sort`` leaves their order unspecified). Kept from SSD: with mining, an image without
    ground truth contributes no negatives; with LOGISTIC and no mining the targets of image i
    are written at offset ``i * P + j * C`` (SSD advances its target pointer by P per image).
    """

    exact_num_bottom = 4
    exact_num_top = 1
    is_loss = True

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.multibox_loss_param
        if not p.HasField("num_classes") or p.num_classes < 1:
            raise self.error("multibox_loss_param.num_classes is required (at least 1)")
        self.num_classes = int(p.num_classes)
        self.share_location = p.share_location
        self.loc_classes = 1 if self.share_location else self.num_classes
        self.background = int(p.background_label_id)
        self.mining = p.mining_type
        if p.HasField("do_neg_mining") and p.do_neg_mining != (self.mining != _MB.NONE):
            raise self.error(
                f"multibox_loss_param.do_neg_mining = {p.do_neg_mining} contradicts mining_type = "
                f"{_MB.MiningType.Name(self.mining)} (do_neg_mining is deprecated: drop it)"
            )
        for field, bad in (
            ("mining_type", self.mining == _MB.HARD_EXAMPLE),
            ("use_prior_for_matching", not p.use_prior_for_matching),
            ("nms_param", p.HasField("nms_param") and p.nms_param.nms_threshold > 0 and self.mining != _MB.NONE),
        ):
            if bad:
                raise self.error(
                    f"multibox_loss_param.{field} as given is not supported (HARD_EXAMPLE mining, decoded-"
                    "prediction matching and NMS during mining are not implemented); use mining_type "
                    "MAX_NEGATIVE or NONE and use_prior_for_matching true"
                )
        if self.mining != _MB.NONE and not self.share_location:
            raise self.error("negative mining needs multibox_loss_param.share_location true (as in SSD)")
        if p.conf_loss_type == _MB.SOFTMAX and not 0 <= self.background < self.num_classes:
            raise self.error(
                f"background_label_id {self.background} must be in [0, num_classes = {self.num_classes}) for SOFTMAX"
            )
        if p.map_object_to_agnostic and self.num_classes != (2 if self.background >= 0 else 1):
            raise self.error("map_object_to_agnostic needs num_classes 2 (1 without a background class)")
        lp = self.param.loss_param
        self.normalization = _normalization(lp, lp.normalization)
        pd = list(self.param.propagate_down) or [True, True, False, False]
        self.use_loc, self.use_conf = bool(pd[0]), bool(pd[1])
        self.mp = p
        self._check(bottom_shapes)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index < 2

    def _check(self, shapes) -> int:
        if len(shapes[2]) < 3 or len(shapes[3]) < 3:
            raise self.error(f"priors {shapes[2]} must be (1, 2, P*4) and ground truth {shapes[3]} (1, 1, G, 8)")
        num_priors = shapes[2][2] // 4
        n = shapes[0][0]
        if shapes[1][0] != n:
            raise self.error(f"loc {shapes[0]} and conf {shapes[1]} must have the same num")
        if math.prod(shapes[0][1:]) != num_priors * self.loc_classes * 4:
            raise self.error(
                f"loc predictions {shapes[0]} need {num_priors} priors * {self.loc_classes} * 4 values per image "
                f"(priors bottom {shapes[2]})"
            )
        if math.prod(shapes[1][1:]) != num_priors * self.num_classes:
            raise self.error(
                f"conf predictions {shapes[1]} need {num_priors} priors * num_classes {self.num_classes} values per image"
            )
        return num_priors

    def top_shapes(self, bottom_shapes):
        self._check(bottom_shapes)
        return [()]

    # -- the host part: ground truth, matching, mining -------------------------------------

    def _ground_truth(self, gt: np.ndarray) -> dict[int, np.ndarray]:
        """GetGroundTruth: item_id -> rows (label, xmin, ymin, xmax, ymax)."""
        out: dict[int, list] = {}
        for row in gt.reshape(-1, 8):
            item = int(row[0])
            if item == -1:
                continue
            label = int(row[1])
            if label == self.background:
                raise self.error(f"found the background label {label} in the ground truth (image {item})")
            if not self.mp.use_difficult_gt and bool(row[7]):
                continue
            out.setdefault(item, []).append([label, *row[3:7]])
        return {k: np.asarray(v, np.float32) for k, v in out.items()}

    def _plan(self, conf: np.ndarray, priors: np.ndarray, gts: dict[int, np.ndarray], num: int):
        """Matches (per image: label -> match indices), negatives per image, num_matches."""
        p = self.mp
        all_match, all_over = [], []
        for i in range(num):
            m: dict[int, np.ndarray] = {}
            o: dict[int, np.ndarray] = {}
            if i in gts:
                g = gts[i]
                idx, ov = match_bboxes(
                    g[:, 1:5], priors, p.match_type, p.overlap_threshold, p.ignore_cross_boundary_bbox
                )
                if self.share_location:
                    m[-1], o[-1] = idx, ov
                else:
                    labels = g[:, 0].astype(np.int64)
                    for c in range(self.loc_classes):
                        if c == self.background:
                            continue
                        mc = np.full_like(idx, -1)
                        hit = idx > -1
                        mc[hit] = np.where(labels[idx[hit]] == c, idx[hit], -1)
                        m[c], o[c] = mc, ov
            all_match.append(m)
            all_over.append(o)
        num_matches = sum(int((v > -1).sum()) for m in all_match for v in m.values())
        negs = [np.zeros(0, np.int64) for _ in range(num)]
        if self.mining == _MB.MAX_NEGATIVE:
            for i in range(num):
                if -1 not in all_match[i]:
                    continue  # no ground truth: SSD mines no negatives in this image
                idx, ov = all_match[i][-1], all_over[i][-1]
                labels = np.full(len(idx), self.background, np.int64)
                hit = idx > -1
                labels[hit] = gts[i][idx[hit], 0].astype(np.int64)
                if (labels < 0).any() or (labels >= self.num_classes).any():
                    raise self.error(
                        f"image {i}: a ground-truth label is outside [0, num_classes = {self.num_classes}) "
                        "(SSD's ComputeConfLoss aborts there); check the label map and num_classes"
                    )
                loss = self._conf_loss_per_prior(conf[i], labels)
                eligible = np.flatnonzero((idx == -1) & (ov < np.float32(p.neg_overlap)))
                num_pos = int(hit.sum())
                num_sel = min(int(np.float32(num_pos) * np.float32(p.neg_pos_ratio)), len(eligible))
                order = np.argsort(-loss[eligible], kind="stable")
                negs[i] = np.sort(eligible[order[:num_sel]])
        return all_match, negs, num_matches

    def _conf_loss_per_prior(self, conf: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """ComputeConfLoss for one image: (P,) losses, labels (P,) (background when unmatched)."""
        x = conf.reshape(-1, self.num_classes).astype(np.float64)
        if self.mp.conf_loss_type == _MB.SOFTMAX:
            e = np.exp(x - x.max(axis=1, keepdims=True))
            prob = e[np.arange(len(x)), labels] / e.sum(axis=1)
            return -np.log(np.maximum(prob, _FLT_MIN))
        t = (np.arange(self.num_classes)[None, :] == labels[:, None]).astype(np.float64)
        pos = (x >= 0).astype(np.float64)
        return -(x * (t - pos) - np.log1p(np.exp(x - 2 * x * pos))).sum(axis=1)

    # -- the device part: gathered predictions and the two losses -----------------------------

    def forward(self, loc: Tensor, conf: Tensor, prior: Tensor, gt: Tensor) -> tuple[Tensor]:
        num_priors = self._check([tuple(loc.shape), tuple(conf.shape), tuple(prior.shape), tuple(gt.shape)])
        num, nc, mp = loc.shape[0], self.num_classes, self.mp
        prior_h = prior.detach().to("cpu", torch.float32).numpy().reshape(-1)
        priors = prior_h[: num_priors * 4].reshape(num_priors, 4)
        variances = prior_h[num_priors * 4 : num_priors * 8].reshape(num_priors, 4)
        gts = self._ground_truth(gt.detach().to("cpu", torch.float32).numpy())
        conf_h = conf.detach().to("cpu", torch.float32).numpy().reshape(num, num_priors, nc)
        all_match, negs, num_matches = self._plan(conf_h, priors, gts, num)
        normalizer = max(1.0, float(_normalizer_count(self.normalization, num, num_priors)))
        if self.normalization == caffe_pb2.LossParameter.VALID:
            normalizer = float(max(1, num_matches))
        dev, dt = loc.device, loc.dtype
        loss = torch.zeros((), dtype=dt, device=dev)

        if self.use_loc and num_matches >= 1:
            img, pri, lab, gti = [], [], [], []
            for i in range(num):
                for label in sorted(all_match[i]):
                    idx = all_match[i][label]
                    js = np.flatnonzero(idx > -1)
                    img.append(np.full(len(js), i))
                    pri.append(js)
                    lab.append(np.full(len(js), 0 if self.share_location else label))
                    gti.append(gts[i][idx[js], 1:5])
            img, pri, lab = (np.concatenate(a) for a in (img, pri, lab))
            gt_boxes = np.concatenate(gti)
            if ((gt_boxes[:, 2] - gt_boxes[:, 0]) <= 0).any() or ((gt_boxes[:, 3] - gt_boxes[:, 1]) <= 0).any():
                raise self.error("a matched ground-truth box has zero or negative width or height (SSD's EncodeBBox)")
            enc = encode_bboxes(priors[pri], variances[pri], gt_boxes, mp.code_type, mp.encode_variance_in_target)
            loc_view = loc.reshape(num, num_priors, self.loc_classes, 4)
            index = [torch.as_tensor(a, device=dev) for a in (img, pri, lab)]
            pred = loc_view[index[0], index[1], index[2]]
            target = torch.as_tensor(enc, dtype=dt, device=dev)
            if mp.bp_inside:  # prior corners outside the image: the target in place of the prediction
                outside = torch.as_tensor((priors[pri] < 0) | (priors[pri] > 1), device=dev)
                pred = torch.where(outside, target, pred)
            if mp.encode_variance_in_target:
                v = torch.as_tensor(variances[pri], dtype=dt, device=dev)
                pred, target = pred / v, target / v
            if mp.loc_loss_type == _MB.SMOOTH_L1:
                loc_loss = smooth_l1_loss(pred.reshape(1, -1), target.reshape(1, -1), num=1)
            else:  # L2: Caffe's EuclideanLoss on one item
                diff = pred - target
                loc_loss = (diff * diff).sum() / 2
            loss = loss + loc_loss * (float(np.float32(mp.loc_weight)) / normalizer)

        if self.use_conf:
            conf_view = conf.reshape(num, num_priors, nc)
            logistic = mp.conf_loss_type == _MB.LOGISTIC
            agnostic = mp.map_object_to_agnostic
            if self.mining != _MB.NONE:
                img, pri, labels = [], [], []
                for i in range(num):
                    if i not in gts:
                        continue
                    for label in sorted(all_match[i]):
                        idx = all_match[i][label]
                        js = np.flatnonzero(idx > -1)
                        img.append(np.full(len(js), i))
                        pri.append(js)
                        glab = gts[i][idx[js], 0].astype(np.int64)
                        labels.append(np.full(len(js), self.background + 1) if agnostic else glab)
                    img.append(np.full(len(negs[i]), i))
                    pri.append(negs[i])
                    labels.append(np.full(len(negs[i]), -1))  # -1: a mined negative
                num_conf = sum(len(a) for a in pri)
                if num_conf >= 1:
                    img, pri, labels = (np.concatenate(a).astype(np.int64) for a in (img, pri, labels))
                    x = conf_view[torch.as_tensor(img, device=dev), torch.as_tensor(pri, device=dev)]
                    if logistic:
                        t = np.full((num_conf, nc), float(self.background), np.float32)
                        pos = labels >= 0
                        t[np.flatnonzero(pos), labels[pos]] = 1
                        if 0 <= self.background < nc:
                            t[np.flatnonzero(~pos), self.background] = 1
                    else:
                        t = np.where(labels >= 0, labels, self.background)
                    loss = loss + self._conf_loss(x, t, logistic) / normalizer
            else:
                x = conf_view.reshape(num * num_priors, nc)
                if logistic:
                    t = np.full(num * num_priors * nc, float(self.background), np.float32)
                else:
                    t = np.full(num * num_priors, self.background, np.int64)
                for i in range(num):
                    if i not in gts:
                        continue
                    for label in sorted(all_match[i]):
                        idx = all_match[i][label]
                        js = np.flatnonzero(idx > -1)
                        glab = gts[i][idx[js], 0].astype(np.int64)
                        if agnostic:
                            glab = np.full(len(js), self.background + 1)
                        if logistic:  # SSD's offset: i * P + j * C + label
                            t[i * num_priors + js * nc + glab] = 1
                        else:
                            t[i * num_priors + js] = glab
                loss = loss + self._conf_loss(x, t, logistic) / normalizer
        return (loss,)

    def _conf_loss(self, x: Tensor, t: np.ndarray, logistic: bool) -> Tensor:
        """The summed confidence loss of the gathered scores x (K, C) against targets t."""
        one = scalar_tensor(1.0, x.dtype, x.device)
        if logistic:
            target = torch.as_tensor(t.reshape(x.shape), dtype=x.dtype, device=x.device)
            valid = torch.ones(x.shape, dtype=torch.bool, device=x.device)
            return _SigmoidCrossEntropyFunction.apply(x, target, valid, one)
        if (t < 0).any() or (t >= x.shape[1]).any():
            raise self.error(f"a confidence label is outside [0, num_classes = {x.shape[1]})")
        target = torch.as_tensor(t, dtype=torch.long, device=x.device)
        return _SoftmaxLossFunction.apply(x, target, one, _IGNORED, False)


# -- AnnotatedData ----------------------------------------------------------------------------------


class _AnnotatedSource:
    """AnnotatedData batches from an LMDB of AnnotatedDatum records, cycling through the keys."""

    def __init__(self, layer: AnnotatedDataLayer, reader, skip: int, transformer, samplers, anno_type):
        self.reader, self.skip_records = reader, skip
        self.batch_size = int(layer.param.data_param.batch_size)
        self.transformer, self.samplers, self.anno_type = transformer, samplers, anno_type
        self.output_labels = len(layer.param.top) > 1
        self._records = None

    def skip(self, n_batches: int) -> None:
        for _ in range(n_batches):  # the same draws as the batches themselves
            self()

    def __call__(self) -> tuple[np.ndarray, ...]:
        from caffe_compat.data.annotated import label_rows, parse_annotated_datum
        from caffe_compat.errors import DataError

        if self._records is None:  # opened in the thread that iterates it
            self._records = self.reader.cycle(self.skip_records)
        images, all_groups, labels = [], [], []
        for _ in range(self.batch_size):
            key, value = next(self._records)
            where = f"{self.reader.path} key {key.decode('utf-8', 'replace')!r}"
            datum, anno_type, groups = parse_annotated_datum(value, where=where)
            if self.anno_type is not None and anno_type is None and self.output_labels:
                raise DataError(f"{where}: the record has no annotation type, the first record had one")
            x = self.transformer.decode(datum, where=where)
            x = self.transformer.distort(x, datum.encoded, where=where)
            x, groups = self.transformer.expand(x, datum.encoded, groups, where=where)
            if self.samplers:
                x, groups = self.transformer.sample(x, datum.encoded, groups, self.samplers, where=where)
            out, groups = self.transformer(x, datum.encoded, groups, where=where)
            if images and out.shape != images[0].shape:
                raise DataError(
                    f"{where}: the transformed image is {out.shape}, this batch's first {images[0].shape}; "
                    "records of one batch must transform to one size (give resize_param)"
                )
            images.append(out)
            all_groups.append(groups)
            labels.append(datum.label)
        data = np.stack(images)
        if not self.output_labels:
            return (data,)
        if self.anno_type is None:
            return data, np.asarray(labels, np.float32).reshape(-1, 1, 1, 1)
        return data, label_rows(all_groups)


def _layer_rngs() -> tuple[np.random.Generator, np.random.Generator]:
    """Independent NumPy Generators (transform, skip) for AnnotatedData, seeded from one draw of
    torch's global RNG (``caffe_compat.set_random_seed``). SSD's samplers draw a variable number
    of values per record, so they cannot use the Data layers' counter-based record streams."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    transform, skip = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    return transform, skip


@register_layer("AnnotatedData")
class AnnotatedDataLayer(_PrefetchingDataLayer):
    """SSD's AnnotatedData layer: images and their boxes from an LMDB of ``AnnotatedDatum``
    records (as ``tools/create_annoset.py`` writes them).

    ``data_param``: ``source``, ``batch_size`` (required), ``backend`` (LMDB; LevelDB is read too),
    ``rand_skip``, ``prefetch``. ``annotated_data_param``: ``batch_sampler`` (repeated: SSD's
    random crops: ``sampler`` scale and aspect-ratio ranges, ``sample_constraint``
    min/max Jaccard overlap and sample/object coverage, ``max_sample``, ``max_trials``;
    one of all samples found is used per image), ``label_map_file`` (read and checked; SSD only
    stores it), ``anno_type`` (replaces the records' type; BBOX is the only type).
    ``transform_param``: see :class:`~caffe_compat.data.annotated.AnnotatedTransformer`
    (distort_param, expand_param, WARP resize, emit_constraint, crop_size, mirror, mean, scale;
    noise_param is refused by name).

    Tops: data (batch_size, C, H, W) float32; optional label: with an annotation type
    ``(1, 1, num_boxes, 8)`` rows ``[item_id, group_label, instance_id, xmin, ymin, xmax, ymax,
    difficult]`` (boxes normalized to the transformed image; one row of -1 when the batch has no
    box; the number of rows changes from batch to batch), otherwise the Datum labels
    ``(batch_size, 1, 1, 1)``. At setup the label top is shaped from the first record.
    """

    min_top = 1
    max_top = 2

    def setup(self, bottom_shapes):
        from caffe_compat.data.annotated import AnnotatedTransformer, parse_annotated_datum, read_label_map
        from caffe_compat.data.lmdb_db import open_reader
        from caffe_compat.errors import DataError

        p, ap = self.param.data_param, self.param.annotated_data_param
        if p.batch_size <= 0:
            raise self.error("data_param.batch_size is required and must be positive")
        if not p.HasField("source"):
            raise self.error("data_param.source (the LMDB of AnnotatedDatum records) is required")
        transform_rng, skip_rng = _layer_rngs()
        try:
            if ap.label_map_file:
                read_label_map(ap.label_map_file)
            tp = self.param.transform_param
            if tp.HasField("resize_param") and tp.resize_param.resize_mode == caffe_pb2.ResizeParameter.FIT_SMALL_SIZE:
                if p.batch_size != 1:
                    raise DataError("resize_param FIT_SMALL_SIZE needs batch_size 1")
            reader = open_reader(p.backend, p.source)
            transformer = AnnotatedTransformer(tp, self.phase, transform_rng, where=f"layer {self.name!r}")
            key, value = reader.first()
            datum, anno_type, groups = parse_annotated_datum(value, where=f"{p.source} key {key!r}")
            if ap.HasField("anno_type"):
                anno_type = int(ap.anno_type)
            x = transformer.decode(datum, where=p.source)
            shape = transformer.output_shape(x.shape)
        except DataError as e:
            raise self._data_error(e) from e
        samplers = list(ap.batch_sampler)
        for i, bs in enumerate(samplers):
            if bs.max_trials <= 0:
                raise self.error(f"annotated_data_param.batch_sampler[{i}].max_trials must be positive")
        n = int(p.batch_size)
        label_shape = (n, 1, 1, 1)
        if anno_type is not None:
            label_shape = (1, 1, max(1, sum(len(a) for _, a in groups)), 8)
        self._shapes = [(n, *shape), label_shape][: len(self.param.top)]
        skip = int(skip_rng.integers(p.rand_skip)) if p.rand_skip else 0
        self._start_prefetch(_AnnotatedSource(self, reader, skip, transformer, samplers, anno_type), p.prefetch)
