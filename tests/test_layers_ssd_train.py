"""SSD's and py-faster-rcnn's training layers: SmoothL1Loss (both forms) and MultiBoxLoss.

References: real Caffe's arrays for SSD's two-bottom SmoothL1Loss (tests/fixtures/caffe_reference/
forks/smooth_l1_loss, from /work/shared/conformance/forks), NumPy transcriptions of the forks'
formulas written here (weiliu89/caffe ssd 4817bf8b smooth_L1_loss_layer.cpp, multibox_loss_layer.cpp,
bbox_util.cpp; rbgirshick/caffe-fast-rcnn 0dcd397b smooth_L1_loss_layer.cu), and gradchecks in
float64 where the forward's choices (matching, mining) are fixed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffe_compat as caffe
from caffe_compat.errors import LayerError
from caffe_compat.layers import layer_class
from caffe_compat.proto import caffe_pb2
from tests.conftest import CAFFE_REF

RTOL, ATOL = 1e-4, 1e-5  # the conformance README's tolerance
FORKS = CAFFE_REF / "forks" / "layers"  # the layout of /work/shared/conformance/forks


def _layer(text: str, shapes):
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(text, lp)
    if not lp.top:
        lp.top.append("loss")
    return layer_class(lp.type)(lp, shapes, caffe_pb2.TRAIN)


# -- SmoothL1Loss: real Caffe (SSD's two-bottom form) ---------------------------------------------


def test_smooth_l1_ssd_matches_caffe_fixture():
    """The whole net (Input, Input, SmoothL1Loss with loss_weight 0.5, force_backward) replayed on
    Caffe's inputs: the loss and the diffs of both bottoms (SSD's AllowForceBackward reaches the
    target too)."""
    d = FORKS / "smooth_l1_loss"
    ref = np.load(d / "blobs.npz")
    old = os.getcwd()
    os.chdir(d)
    try:
        net = caffe.Net("net.prototxt", "weights.caffemodel", caffe.TEST)
        for b in net.inputs:
            net.blobs[b].data[...] = ref["data__" + b]
        net.forward()
        net.backward()
    finally:
        os.chdir(old)
    checked = 0
    for k in ref.files:
        kind, _, blob = k.partition("__")
        if kind in ("data", "diff"):
            ours = getattr(net.blobs[blob], kind)
            assert ours.shape == ref[k].shape, k
            np.testing.assert_allclose(ours, ref[k], rtol=RTOL, atol=ATOL, err_msg=k)
            checked += 1
    assert checked == 6


# -- SmoothL1Loss: both forks' formulas in NumPy --------------------------------------------------


def _np_smooth_l1(pred, target, w_in=None, w_out=None, sigma=1.0, ssd=False):
    """Loss and gradients to (pred, target) as each fork's kernels compute them."""
    s2 = np.float64(np.float32(sigma)) ** 2
    d = pred - target
    if w_in is not None:
        d = w_in * d
    e = np.where(np.abs(d) < 1 / s2, 0.5 * d * d * s2, np.abs(d) - 0.5 / s2)
    if w_out is not None:
        e = w_out * e
    num = pred.shape[0]
    loss = e.sum() / num
    f1 = np.where(np.abs(d) < 1 / s2, s2 * d, np.sign(d))
    if not ssd:  # py-faster-rcnn multiplies by both weights; SSD by neither
        if w_in is not None:
            f1 = f1 * w_in
        if w_out is not None:
            f1 = f1 * w_out
    return loss, f1 / num, -f1 / num


def _run(layer, arrays, loss_weight=1.0):
    ts = [torch.tensor(a, requires_grad=(i < 2)) for i, a in enumerate(arrays)]
    (loss,) = layer(*ts)
    (loss * loss_weight).backward()
    return loss.item(), ts[0].grad.numpy(), ts[1].grad.numpy()


@pytest.mark.parametrize(
    "form, text, nb, sigma",
    [
        ("ssd", "", 2, 1.0),
        ("ssd", "", 3, 1.0),
        ("frcnn", "smooth_l1_loss_param { sigma: 3 }", 2, 3.0),
        ("frcnn", "smooth_l1_loss_param { sigma: 3 }", 4, 3.0),
        ("frcnn", "", 4, 1.0),  # four bottoms are py-faster-rcnn's even without the param
    ],
)
def test_smooth_l1_forms_match_forks(form, text, nb, sigma):
    rng = np.random.default_rng(3)
    shape = (3, 8, 2, 1)
    arrays = [rng.normal(0, 1.2, shape), rng.normal(0, 1.2, shape)]
    arrays += [rng.uniform(-0.5, 2, shape) for _ in range(nb - 2)]
    layer = _layer(f'name: "l" type: "SmoothL1Loss" {text}', [shape] * nb)
    assert layer.faster_rcnn == (form == "frcnn")
    loss, g0, g1 = _run(layer, arrays, loss_weight=0.7)
    w_in = arrays[2] if nb > 2 else None
    w_out = arrays[3] if nb > 3 else None
    ref_loss, r0, r1 = _np_smooth_l1(*arrays[:2], w_in, w_out, sigma=sigma, ssd=form == "ssd")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g0, 0.7 * r0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g1, 0.7 * r1, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("text, nb", [("", 2), ("smooth_l1_loss_param { sigma: 2 }", 2), ("", 4)])
def test_smooth_l1_gradcheck(text, nb):
    """Where the fork's gradient is the derivative of its loss (both forms without weights,
    py-faster-rcnn's with weights), torch's gradcheck agrees with it in float64."""
    rng = np.random.default_rng(4)
    shape = (2, 3, 2, 2)
    pred = torch.tensor(rng.normal(0, 1, shape), requires_grad=True)
    # keep |d| away from the kink at 1/sigma^2, where the numeric derivative is undefined
    target = torch.tensor(pred.detach().numpy() + rng.choice([-2.1, -0.3, 0.2, 1.7], shape), requires_grad=True)
    ws = [torch.tensor(rng.uniform(0.5, 1.5, shape)) for _ in range(nb - 2)]
    layer = _layer(f'name: "l" type: "SmoothL1Loss" {text}', [shape] * nb)
    assert torch.autograd.gradcheck(lambda a, b: layer(a, b, *ws)[0], (pred, target), eps=1e-6, atol=1e-7)


def test_smooth_l1_ssd_weights_gradient_is_not_the_derivative():
    """SSD's 3-bottom backward leaves out the weight: twice the weight gives the same gradient
    where |w d| stays beyond 1, while the loss changes."""
    layer = _layer('name: "l" type: "SmoothL1Loss"', [(1, 2)] * 3)
    pred, target = np.array([[3.0, -4.0]]), np.zeros((1, 2))
    l1, g1, _ = _run(layer, [pred, target, np.full((1, 2), 1.0)])
    l2, g2, _ = _run(layer, [pred, target, np.full((1, 2), 2.0)])
    assert l2 > l1
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(g1, [[1.0, -1.0]])


def test_smooth_l1_refusals():
    with pytest.raises(LayerError, match="2 bottoms or 4"):
        _layer('name: "l" type: "SmoothL1Loss" smooth_l1_loss_param { sigma: 2 }', [(2, 4)] * 3)
    with pytest.raises(LayerError, match="channels/height/width"):
        _layer('name: "l" type: "SmoothL1Loss"', [(2, 4), (2, 5)])
    with pytest.raises(LayerError, match="at most 4"):
        _layer('name: "l" type: "SmoothL1Loss"', [(2, 4)] * 5)


def test_smooth_l1_param_parses_with_fork_field_number():
    """py-faster-rcnn's smooth_l1_loss_param is field 8266712 of LayerParameter, as in its fork."""
    field = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name["smooth_l1_loss_param"]
    assert field.number == 8266712
    assert caffe_pb2.SmoothL1LossParameter().sigma == 1.0


# -- MultiBoxLoss: an independent NumPy transcription of SSD's algorithm --------------------------

_MB = caffe_pb2.MultiBoxLossParameter


def _iou(a, b) -> float:
    """JaccardOverlap of two normalized boxes (0 when they do not overlap)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _ref_match(priors, boxes, per_prediction: bool, threshold: float, ignore_cross: bool = False):
    """MatchBBox with label -1, one prior and one gt at a time as SSD's loops go."""
    num_p = len(priors)
    match, best = [-1] * num_p, [0.0] * num_p
    pairs = {}
    for p in range(num_p):
        if ignore_cross and any(v < 0 or v > 1 for v in priors[p]):
            match[p] = -2
            continue
        for j, b in enumerate(boxes):
            o = _iou(priors[p], b)
            if o > 1e-6:
                best[p] = max(best[p], o)
                pairs[p, j] = o
    pool = list(range(len(boxes)))
    while pool:
        pick = (-1, -1, -1.0)
        for p in range(num_p):
            if match[p] != -1:
                continue
            for j in pool:
                if (p, j) in pairs and pairs[p, j] > pick[2]:
                    pick = (p, j, pairs[p, j])
        if pick[0] == -1:
            break
        match[pick[0]], best[pick[0]] = pick[1], pick[2]
        pool.remove(pick[1])
    if per_prediction:
        for p in range(num_p):
            if match[p] != -1:
                continue
            bj, bo = -1, -1.0
            for j in range(len(boxes)):
                if (p, j) in pairs and pairs[p, j] >= threshold and pairs[p, j] > bo:
                    bj, bo = j, pairs[p, j]
            if bj != -1:
                match[p], best[p] = bj, bo
    return match, best


def _ref_encode(prior, var, g, code="CENTER_SIZE"):
    """EncodeBBox with the variances in the box (pass ones to leave them out)."""
    pw, ph = prior[2] - prior[0], prior[3] - prior[1]
    gw, gh = g[2] - g[0], g[3] - g[1]
    if code == "CORNER":
        return np.array([(g[k] - prior[k]) / var[k] for k in range(4)])
    if code == "CORNER_SIZE":
        return np.array([(g[k] - prior[k]) / (pw, ph, pw, ph)[k] / var[k] for k in range(4)])
    return np.array(
        [
            ((g[0] + g[2]) / 2 - (prior[0] + prior[2]) / 2) / pw / var[0],
            ((g[1] + g[3]) / 2 - (prior[1] + prior[3]) / 2) / ph / var[1],
            np.log(gw / pw) / var[2],
            np.log(gh / ph) / var[3],
        ]
    )


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _ref_multibox(loc, conf, prior, gt, cfg):
    """SSD's MultiBoxLoss forward and backward (top diff 1), loop by loop: (loss, dloc, dconf)."""
    n, c = loc.shape[0], cfg["num_classes"]
    num_p = prior.shape[2] // 4
    lc = 1 if cfg["share_location"] else c
    pb = prior.reshape(2, num_p, 4)[0].astype(np.float64)
    pv = prior.reshape(2, num_p, 4)[1].astype(np.float64)
    loc = loc.reshape(n, num_p, lc, 4).astype(np.float64)
    conf = conf.reshape(n, num_p, c).astype(np.float64)
    gts = {}
    for row in gt.reshape(-1, 8).astype(np.float64):
        if row[0] == -1 or (not cfg["use_difficult_gt"] and row[7]):
            continue
        gts.setdefault(int(row[0]), []).append((int(row[1]), row[3:7]))
    logistic = cfg["conf_loss_type"] == _MB.LOGISTIC

    def conf_loss(x, label):
        if logistic:
            t = np.eye(c)[label]
            return -np.sum(t * np.log(_sigmoid(x)) + (1 - t) * np.log(1 - _sigmoid(x))), _sigmoid(x) - t
        p = _softmax(x)
        return -np.log(p[label]), p - np.eye(c)[label]

    matches, labels_of, chosen = {}, {}, []  # chosen: (image, prior, label) entering the confidence loss
    for i in range(n):
        if i not in gts:
            if cfg["mining_type"] == _MB.NONE:
                chosen += [(i, p, cfg["bg"]) for p in range(num_p)]
            continue
        boxes = [b for _, b in gts[i]]
        m, best = _ref_match(
            pb, boxes, cfg["match_type"] == _MB.PER_PREDICTION, cfg["overlap_threshold"], cfg["ignore_cross"]
        )
        matches[i] = m
        obj = cfg["bg"] + 1 if cfg["agnostic"] else None  # map_object_to_agnostic: every object one class
        labels = [(obj or gts[i][m[p]][0]) if m[p] > -1 else cfg["bg"] for p in range(num_p)]
        labels_of[i] = labels
        if cfg["mining_type"] == _MB.NONE:
            chosen += [(i, p, labels[p]) for p in range(num_p)]
            continue
        chosen += [(i, p, labels[p]) for p in range(num_p) if m[p] > -1]
        eligible = [p for p in range(num_p) if m[p] == -1 and best[p] < cfg["neg_overlap"]]
        num_pos = sum(1 for p in range(num_p) if m[p] > -1)
        k = min(int(num_pos * cfg["neg_pos_ratio"]), len(eligible))
        ranked = sorted(eligible, key=lambda p: -conf_loss(conf[i, p], cfg["bg"])[0])
        chosen += [(i, p, cfg["bg"]) for p in ranked[:k]]
    num_matches = sum(1 for m in matches.values() for j in m if j > -1)
    norm = {
        caffe_pb2.LossParameter.VALID: num_matches,
        caffe_pb2.LossParameter.BATCH_SIZE: n,
        caffe_pb2.LossParameter.FULL: n * num_p,
        caffe_pb2.LossParameter.NONE: 1,
    }[cfg["normalization"]]
    norm = max(1, norm)
    loss, dloc, dconf = 0.0, np.zeros_like(loc), np.zeros_like(conf)
    for i, m in matches.items():
        for p in range(num_p):
            if m[p] <= -1:
                continue
            label = gts[i][m[p]][0]
            j = 0 if cfg["share_location"] else label  # the loc prediction of the gt's class
            var = np.ones(4) if cfg["var_in_target"] else pv[p]
            t = _ref_encode(pb[p], var, gts[i][m[p]][1], cfg["code"])
            d = loc[i, p, j] - t
            scale = 1 / pv[p] if cfg["var_in_target"] else np.ones(4)  # both sides divided by the variance
            if cfg["bp_inside"]:  # a prior corner outside the image: the prediction replaced by the target
                d = np.where((pb[p] < 0) | (pb[p] > 1), 0.0, d)
                scale = np.where((pb[p] < 0) | (pb[p] > 1), 0.0, scale)
            d = d * (1 / pv[p] if cfg["var_in_target"] else 1)
            if cfg["loc_loss_type"] == _MB.SMOOTH_L1:
                loss += cfg["loc_weight"] * np.sum(np.where(np.abs(d) < 1, 0.5 * d * d, np.abs(d) - 0.5)) / norm
                dloc[i, p, j] = cfg["loc_weight"] * np.where(np.abs(d) < 1, d, np.sign(d)) * scale / norm
            else:
                loss += cfg["loc_weight"] * np.sum(d * d) / 2 / norm
                dloc[i, p, j] = cfg["loc_weight"] * d * scale / norm
    if logistic and cfg["mining_type"] == _MB.NONE:
        # SSD's EncodeConfPrediction without mining: one flat target array of N*P*C values set
        # to the background id, a 1 at i*P + p*C + label for a matched prior (its pointer moves
        # by P per image, not P*C), against all scores in order
        flat = np.full(n * num_p * c, float(cfg["bg"]))
        for i, m in matches.items():
            for p in range(num_p):
                if m[p] > -1:
                    flat[i * num_p + p * c + labels_of[i][p]] = 1
        x = conf.reshape(-1)
        loss += -np.sum(flat * np.log(_sigmoid(x)) + (1 - flat) * np.log(1 - _sigmoid(x))) / norm
        dconf = ((_sigmoid(x) - flat) / norm).reshape(conf.shape)
        chosen = []
    for i, p, label in chosen:
        value, grad = conf_loss(conf[i, p], label)
        loss += value / norm
        dconf[i, p] += grad / norm
    return loss, dloc.reshape(n, -1), dconf.reshape(n, -1), num_matches


def _ssd_case(seed: int, n: int = 3, num_classes: int = 4, loc_classes: int = 1):
    """Priors on a 4x4 grid in two sizes (32 priors, SSD's variances), ground truth for images 0
    and 1 (one difficult box), none for image 2, and random predictions."""
    rng = np.random.default_rng(seed)
    boxes = []
    for y in range(4):
        for x in range(4):
            cx, cy = (x + 0.5) / 4, (y + 0.5) / 4
            for s in (0.25, 0.45):
                boxes.append([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2])
    num_p = len(boxes)
    prior = np.concatenate([np.array(boxes), np.tile([0.1, 0.1, 0.2, 0.2], (num_p, 1))]).reshape(1, 2, num_p * 4)
    rows = [
        [0, 1, 0, 0.10, 0.12, 0.42, 0.47, 0],
        [0, 2, 1, 0.55, 0.50, 0.93, 0.88, 0],
        [1, 3, 0, 0.30, 0.20, 0.70, 0.66, 0],
        [1, 1, 1, 0.05, 0.60, 0.30, 0.95, 1],
    ]
    gt = np.array(rows, np.float64).reshape(1, 1, len(rows), 8)
    loc = rng.normal(0, 1.0, (n, num_p * loc_classes * 4))
    conf = rng.normal(0, 1.5, (n, num_p * num_classes))
    return loc, conf, prior, gt


_DEFAULTS = {
    "num_classes": 4,
    "bg": 0,
    "match_type": _MB.PER_PREDICTION,
    "overlap_threshold": 0.5,
    "mining_type": _MB.MAX_NEGATIVE,
    "neg_pos_ratio": 3.0,
    "neg_overlap": 0.5,
    "loc_loss_type": _MB.SMOOTH_L1,
    "conf_loss_type": _MB.SOFTMAX,
    "normalization": caffe_pb2.LossParameter.VALID,
    "loc_weight": 1.0,
    "use_difficult_gt": True,
    "share_location": True,
    "code": "CENTER_SIZE",
    "var_in_target": False,
    "bp_inside": False,
    "ignore_cross": False,
    "agnostic": False,
}

_CASES = {
    "defaults": {},
    "bipartite": {"match_type": _MB.BIPARTITE, "overlap_threshold": 0.3},
    "threshold_0.3_ratio_2": {"overlap_threshold": 0.3, "neg_pos_ratio": 2.0, "neg_overlap": 0.3},
    "no_mining": {"mining_type": _MB.NONE},
    "l2_loc_weight_2": {"loc_loss_type": _MB.L2, "loc_weight": 2.0},
    "logistic": {"conf_loss_type": _MB.LOGISTIC},
    "logistic_no_mining": {"conf_loss_type": _MB.LOGISTIC, "mining_type": _MB.NONE},
    "batch_size": {"normalization": caffe_pb2.LossParameter.BATCH_SIZE, "use_difficult_gt": False},
    "full": {"normalization": caffe_pb2.LossParameter.FULL},
    "none": {"normalization": caffe_pb2.LossParameter.NONE, "mining_type": _MB.NONE},
    "corner": {"code": "CORNER", "overlap_threshold": 0.3},
    "corner_size_variance_in_target": {"code": "CORNER_SIZE", "var_in_target": True},
    "center_size_variance_in_target": {"var_in_target": True, "loc_loss_type": _MB.L2},
    "bp_inside_corner": {"code": "CORNER", "bp_inside": True, "overlap_threshold": 0.3},
    "ignore_cross_boundary": {"ignore_cross": True, "overlap_threshold": 0.3},
    "per_class_locations": {"share_location": False, "mining_type": _MB.NONE, "overlap_threshold": 0.3},
    # ground-truth labels 1..3 with 2 classes: SSD's mining would abort on them, so no mining
    "agnostic": {"agnostic": True, "num_classes": 2, "overlap_threshold": 0.3, "mining_type": _MB.NONE},
}


def _multibox_layer(cfg, shapes):
    names = {caffe_pb2.LossParameter.NormalizationMode.Name(cfg["normalization"])}
    text = f"""name: "mbox_loss" type: "MultiBoxLoss" top: "loss"
      loss_param {{ normalization: {names.pop()} }}
      multibox_loss_param {{
        num_classes: {cfg["num_classes"]} background_label_id: {cfg["bg"]}
        share_location: {str(cfg["share_location"]).lower()} code_type: {cfg["code"]}
        encode_variance_in_target: {str(cfg["var_in_target"]).lower()} bp_inside: {str(cfg["bp_inside"]).lower()}
        ignore_cross_boundary_bbox: {str(cfg["ignore_cross"]).lower()}
        map_object_to_agnostic: {str(cfg["agnostic"]).lower()}
        match_type: {_MB.MatchType.Name(cfg["match_type"])} overlap_threshold: {cfg["overlap_threshold"]}
        mining_type: {_MB.MiningType.Name(cfg["mining_type"])} neg_pos_ratio: {cfg["neg_pos_ratio"]}
        neg_overlap: {cfg["neg_overlap"]} use_prior_for_matching: true
        loc_loss_type: {_MB.LocLossType.Name(cfg["loc_loss_type"])} loc_weight: {cfg["loc_weight"]}
        conf_loss_type: {_MB.ConfLossType.Name(cfg["conf_loss_type"])}
        use_difficult_gt: {str(cfg["use_difficult_gt"]).lower()}
      }}"""
    return _layer(text, shapes)


@pytest.mark.parametrize("case", sorted(_CASES))
def test_multibox_loss_matches_numpy_ssd(case):
    cfg = {**_DEFAULTS, **_CASES[case]}
    loc, conf, prior, gt = _ssd_case(7, 3, cfg["num_classes"], 1 if cfg["share_location"] else cfg["num_classes"])
    ref_loss, ref_dloc, ref_dconf, num_matches = _ref_multibox(loc, conf, prior, gt, cfg)
    assert num_matches >= 3  # the case does match priors (else it would test little)
    layer = _multibox_layer(cfg, [loc.shape, conf.shape, prior.shape, gt.shape])
    tl, tc = torch.tensor(loc, requires_grad=True), torch.tensor(conf, requires_grad=True)
    (loss,) = layer(tl, tc, torch.tensor(prior), torch.tensor(gt))
    loss.backward()
    np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tl.grad.numpy(), ref_dloc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tc.grad.numpy(), ref_dconf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "case", ["defaults", "no_mining", "logistic", "logistic_no_mining", "l2_loc_weight_2", "per_class_locations"]
)
def test_multibox_loss_gradcheck(case):
    """With the matching (priors and ground truth are constants) and the mined negatives fixed
    (random scores: no near-ties for a 1e-6 step to reorder), the gradient is the loss's."""
    cfg = {**_DEFAULTS, **_CASES[case]}
    loc, conf, prior, gt = _ssd_case(11, 2, cfg["num_classes"], 1 if cfg["share_location"] else cfg["num_classes"])
    layer = _multibox_layer(cfg, [loc.shape, conf.shape, prior.shape, gt.shape])
    args = (torch.tensor(loc, requires_grad=True), torch.tensor(conf, requires_grad=True))
    pt, gtt = torch.tensor(prior), torch.tensor(gt)
    assert torch.autograd.gradcheck(lambda a, b: layer(a, b, pt, gtt)[0], args, eps=1e-6, atol=1e-6, fast_mode=True)


def test_multibox_loss_mining_selects_hardest_negatives():
    """MAX_NEGATIVE: with neg_pos_ratio 1 each image with ground truth gets as many negatives as
    positives, the ones of highest background loss: raising one unmatched prior's object score
    moves it into the confidence loss (its conf diff turns non-zero)."""
    cfg = {**_DEFAULTS, "neg_pos_ratio": 1.0}
    loc, conf, prior, gt = _ssd_case(seed=5)
    layer = _multibox_layer(cfg, [loc.shape, conf.shape, prior.shape, gt.shape])

    def conf_grad(conf):
        tc = torch.tensor(conf, requires_grad=True)
        (loss,) = layer(torch.tensor(loc), tc, torch.tensor(prior), torch.tensor(gt))
        loss.backward()
        return tc.grad.numpy().reshape(3, -1, 4)

    g = conf_grad(conf)
    matched = _ref_match(prior.reshape(2, -1, 4)[0], [r[3:7] for r in gt[0, 0, :2]], True, 0.5)[0]
    used = np.abs(g[0]).sum(axis=1) > 0
    assert used.sum() == 2 * sum(1 for j in matched if j > -1)
    assert not np.abs(g[2]).any()  # image 2 has no ground truth: no negatives mined there
    p = int(np.flatnonzero(~used & (np.array(matched) == -1))[0])
    bumped = conf.copy().reshape(3, -1, 4)
    bumped[0, p, 1] += 20.0
    assert np.abs(conf_grad(bumped.reshape(3, -1))[0, p]).sum() > 0


def test_multibox_loss_refusals():
    shapes = [(1, 8), (1, 4), (1, 2, 8), (1, 1, 1, 8)]
    with pytest.raises(LayerError, match="num_classes"):
        _layer('name: "m" type: "MultiBoxLoss" multibox_loss_param { }', shapes)
    with pytest.raises(LayerError, match="mining_type"):
        _layer(
            'name: "m" type: "MultiBoxLoss" multibox_loss_param { num_classes: 2 mining_type: HARD_EXAMPLE }', shapes
        )
    with pytest.raises(LayerError, match="use_prior_for_matching"):
        _layer(
            'name: "m" type: "MultiBoxLoss" multibox_loss_param { num_classes: 2 use_prior_for_matching: false }',
            shapes,
        )
    loc, conf, prior, gt = _ssd_case(1, 1, num_classes=2)
    layer = _multibox_layer({**_DEFAULTS, "num_classes": 2}, [loc.shape, conf.shape, prior.shape, gt.shape])
    with pytest.raises(LayerError, match="outside \\[0, num_classes = 2\\)"):
        layer(*(torch.tensor(a) for a in (loc, conf, prior, gt)))
    with pytest.raises(LayerError, match="need 2 priors"):
        _layer('name: "m" type: "MultiBoxLoss" multibox_loss_param { num_classes: 3 }', shapes)
