"""SSD's inference layers (weiliu89/caffe ssd@4817bf8b): Normalize, Permute, PriorBox,
DetectionOutput. Real-Caffe fork fixtures replayed through the Net as the BVLC cases are;
gradchecks in float64; PriorBox and DetectionOutput against plain-loop transcriptions of SSD's
prior_box_layer.cpp and bbox_util.cpp written here; the fork's field numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffe_compat as caffe
from caffe_compat.errors import LayerError
from caffe_compat.layers import layer_class
from caffe_compat.proto import caffe_pb2
from tests.conftest import CAFFE_REF
from tests.test_conformance_layers import GPU, mismatches, replay_case

RTOL, ATOL = 1e-4, 1e-5  # the fixture README's tolerance
FORKS = CAFFE_REF / "forks" / "layers"
SSD_CASES = [
    "ssd_normalize",
    "ssd_permute_flatten_concat",
    "forward_only_ssd_priorbox",
    "forward_only_ssd_detection_output",
]


# ---------------------------------------------------------------------------------------------
# real Caffe (a build with SSD's layers), replayed as tests/test_conformance_layers.py does


def replay_fork_case(case: str):
    return replay_case(case, gpu=GPU, folder="forks/layers")


@pytest.mark.parametrize("case", SSD_CASES)
def test_ssd_fork_case_matches_caffe(case):
    net, ref, backward = replay_fork_case(case)
    fails = mismatches(case, net, ref, backward)
    assert not fails, f"{case}: {len(fails)} arrays differ from real Caffe: {fails[:8]}"


def test_detection_output_case_count_and_order():
    """The detections' count and row order are Caffe's (mismatches compares shapes too; this
    states it on its own, with the rows' image/label columns)."""
    net, ref, _ = replay_fork_case("forward_only_ssd_detection_output")
    ours, theirs = net.blobs["det"].data, ref["data__det"]
    assert ours.shape == theirs.shape == (1, 1, 24, 7)
    np.testing.assert_array_equal(ours[0, 0, :, :2], theirs[0, 0, :, :2])
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# caffe.proto: SSD's field numbers


def test_ssd_field_numbers():
    f = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    want = {
        "annotated_data_param": 200,
        "multibox_loss_param": 201,
        "permute_param": 202,
        "prior_box_param": 203,
        "detection_output_param": 204,
        "detection_evaluate_param": 205,
        "norm_param": 206,
        "video_data_param": 207,
    }
    assert {k: f[k].number for k in want} == want
    t = caffe_pb2.TransformationParameter.DESCRIPTOR.fields_by_name
    assert {k: t[k].number for k in ("resize_param", "noise_param", "emit_constraint", "crop_h", "crop_w")} == {
        "resize_param": 8,
        "noise_param": 9,
        "emit_constraint": 10,
        "crop_h": 11,
        "crop_w": 12,
    }
    assert t["distort_param"].number == 13 and t["expand_param"].number == 14
    d = caffe_pb2.DetectionOutputParameter()
    assert (d.share_location, d.keep_top_k, d.code_type) == (True, -1, caffe_pb2.PriorBoxParameter.CORNER)
    assert d.nms_param.nms_threshold == pytest.approx(0.3) and d.nms_param.eta == 1.0
    n = caffe_pb2.NormalizeParameter()
    assert (n.across_spatial, n.channel_shared) == (True, True) and n.eps == pytest.approx(1e-10)
    assert caffe_pb2.PriorBoxParameter().offset == 0.5 and caffe_pb2.PriorBoxParameter().flip
    assert caffe_pb2.MultiBoxLossParameter().neg_pos_ratio == 3.0
    assert caffe_pb2.NormalizedBBox.DESCRIPTOR.fields_by_name["size"].number == 8


def test_net_spec_writes_ssd_layers_as_model_libs_does():
    """SSD's model_libs.py builds its nets with NetSpec keyword arguments (no *_param)."""
    from caffe_compat import layers as L

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 32, 32]))
    n.norm = L.Normalize(n.data, scale_filler=dict(type="constant", value=20), across_spatial=False)
    n.perm = L.Permute(n.norm, order=[0, 2, 3, 1])
    n.pb = L.PriorBox(n.norm, n.data, min_size=8.0, aspect_ratio=[2.0], flip=True, variance=[0.1, 0.1, 0.2, 0.2])
    proto = n.to_proto()
    norm, perm, pb = proto.layer[1:]
    assert (norm.norm_param.across_spatial, norm.norm_param.scale_filler.value) == (False, 20)
    assert list(perm.permute_param.order) == [0, 2, 3, 1]
    assert list(pb.prior_box_param.aspect_ratio) == [2.0] and len(pb.prior_box_param.variance) == 4
    net = caffe.Net(proto, caffe.TEST)
    assert net.blobs["pb"].shape == (1, 2, 32 * 32 * 3 * 4)


def test_ssd_layer_wire_bytes():
    """norm_param is field 206 on the wire: tag (206 << 3 | 2) as a varint, 0xf2 0x0c."""
    lp = caffe_pb2.LayerParameter(name="n", type="Normalize")
    lp.norm_param.across_spatial = False
    raw = lp.SerializeToString()
    assert b"\xf2\x0c" in raw
    back = caffe_pb2.LayerParameter.FromString(raw)
    assert back.norm_param.across_spatial is False


# ---------------------------------------------------------------------------------------------
# Normalize


def _layer(text: str, bottom_shapes):
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(text, lp)
    if not lp.top:
        lp.top.append("top")
    return layer_class(lp.type)(lp, bottom_shapes, caffe_pb2.TEST)


def _normalize(across: bool, shared: bool, shape, seed=0):
    layer = _layer(
        f'name: "n" type: "Normalize" bottom: "x" top: "y" norm_param {{ across_spatial: {str(across).lower()} '
        f'channel_shared: {str(shared).lower()} scale_filler {{ type: "gaussian" mean: 2 std: 0.5 }} }}',
        [shape],
    )
    torch.manual_seed(seed)
    return layer.double()


def _caffe_normalize_backward(x, s, g, across, eps):
    """normalize_layer.cpp Backward_cpu, per image, in NumPy."""
    out = np.empty_like(x)
    for n in range(x.shape[0]):
        xn, gn = x[n], g[n]
        if across:
            norm = math.sqrt((xn * xn).sum() + eps)
            a = (xn * gn).sum()
            d = (gn - xn * a / norm / norm) / norm
        else:
            norm = np.sqrt((xn * xn).sum(axis=0, keepdims=True) + eps)
            a = (xn * gn).sum(axis=0, keepdims=True)
            d = (gn - xn * a / norm**2) / norm
        out[n] = d * (s if s.ndim == 0 else s.reshape((-1,) + (1,) * (x.ndim - 2)))
    return out


@pytest.mark.parametrize("across", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 6)])
def test_normalize_shared_scale_gradcheck(across, shape):
    layer = _normalize(across, True, shape)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x)[0], (x,), eps=1e-6, atol=1e-7, rtol=1e-5)
    # and the scale's gradient
    assert torch.autograd.gradcheck(
        lambda s: _with_scale(layer, x.detach(), s),
        (layer.blobs[0].detach().clone().requires_grad_(True),),
        eps=1e-6,
        atol=1e-7,
        rtol=1e-5,
    )


def _with_scale(layer, x, s):
    from caffe_compat.layers.ssd import _Normalize

    shape = () if layer.channel_shared else (1, -1) + (1,) * (x.dim() - 2)
    return _Normalize.apply(x, s, layer.across_spatial, layer.eps, shape)


@pytest.mark.parametrize("across", [True, False])
def test_normalize_per_channel_backward_is_ssds(across):
    """Per-channel scales: the bottom diff is SSD's formula (NumPy transcription above), which
    is not the exact gradient; the scale's diff is exact (gradcheck)."""
    shape = (2, 4, 3, 3)
    layer = _normalize(across, False, shape, seed=1)
    assert tuple(layer.blobs[0].shape) == (4,)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(shape, dtype=torch.float64)
    (y,) = layer(x)
    y.backward(g)
    s = layer.blobs[0].detach().numpy()
    ref = _caffe_normalize_backward(x.detach().numpy(), s, g.numpy(), across, layer.eps)
    np.testing.assert_allclose(x.grad.numpy(), ref, rtol=1e-10, atol=1e-12)
    # with distinct scales this differs from the exact gradient (SSD's choice, kept)
    exact = torch.autograd.grad((x / _norm(x, across) * layer.blobs[0].detach().reshape(1, -1, 1, 1) * g).sum(), x)[0]
    assert not np.allclose(exact.numpy(), ref, rtol=1e-3, atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda s: _with_scale(layer, x.detach(), s),
        (layer.blobs[0].detach().clone().requires_grad_(True),),
        eps=1e-6,
        atol=1e-7,
        rtol=1e-5,
    )


def _norm(x, across):
    dims = tuple(range(1, x.dim())) if across else (1,)
    return torch.sqrt((x * x).sum(dim=dims, keepdim=True) + 1e-10)


def test_normalize_forward_formula_and_default_scale():
    """No scale_filler: scale 1; the top is x / sqrt(Σ_c x² + eps) per position (NumPy)."""
    layer = _layer('name: "n" type: "Normalize" norm_param { across_spatial: false }', [(2, 3, 2, 2)])
    assert tuple(layer.blobs[0].shape) == () and float(layer.blobs[0].detach()) == 1.0
    x = np.random.default_rng(0).normal(size=(2, 3, 2, 2)).astype(np.float32)
    (y,) = layer(torch.from_numpy(x))
    ref = x / np.sqrt((x.astype(np.float64) ** 2).sum(axis=1, keepdims=True) + 1e-10)
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-6, atol=1e-7)


def test_normalize_rejects_5d():
    with pytest.raises(LayerError, match="2 to 4 axes"):
        _layer('name: "n" type: "Normalize"', [(1, 2, 3, 4, 5)])


# ---------------------------------------------------------------------------------------------
# Permute


def test_permute_shapes_gradcheck_and_errors():
    layer = _layer('name: "p" type: "Permute" permute_param { order: 0 order: 3 }', [(2, 3, 4, 5)])
    assert layer.order == (0, 3, 1, 2)  # the missing axes follow in their order
    assert layer.top_shapes([(2, 3, 4, 5)]) == [(2, 5, 3, 4)]
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    (y,) = layer(x)
    np.testing.assert_array_equal(y.detach().numpy(), np.transpose(x.detach().numpy(), (0, 3, 1, 2)))
    assert torch.autograd.gradcheck(lambda x: layer(x)[0], (x,), eps=1e-6, atol=1e-7)
    ident = _layer('name: "p" type: "Permute"', [(2, 3)])
    assert ident.need_permute is False and ident.top_shapes([(2, 3)]) == [(2, 3)]
    with pytest.raises(LayerError, match="repeats axis 1"):
        _layer('name: "p" type: "Permute" permute_param { order: 1 order: 1 }', [(2, 3, 4)])
    with pytest.raises(LayerError, match="order 3 is not below"):
        _layer('name: "p" type: "Permute" permute_param { order: 3 }', [(2, 3, 4)])


# ---------------------------------------------------------------------------------------------
# PriorBox: against a loop transcription of prior_box_layer.cpp


def _ref_priors(lh, lw, img_h, img_w, step_h, step_w, min_sizes, max_sizes, ars, flip, clip, variance, offset):
    ratios = [1.0]
    for ar in ars:
        if any(abs(ar - r) < 1e-6 for r in ratios):
            continue
        ratios.append(ar)
        if flip:
            ratios.append(1.0 / ar)
    out = []
    for h in range(lh):
        for w in range(lw):
            cx, cy = (w + offset) * step_w, (h + offset) * step_h
            for s, ms in enumerate(min_sizes):
                ms = int(ms)
                sizes = [(ms, ms)]
                if max_sizes:
                    side = math.sqrt(ms * int(max_sizes[s]))
                    sizes.append((side, side))
                sizes += [(ms * math.sqrt(r), ms / math.sqrt(r)) for r in ratios if abs(r - 1) >= 1e-6]
                for bw, bh in sizes:
                    out += [(cx - bw / 2) / img_w, (cy - bh / 2) / img_h, (cx + bw / 2) / img_w, (cy + bh / 2) / img_h]
    out = np.array(out)
    if clip:
        out = np.clip(out, 0, 1)
    var = np.tile(variance if len(variance) == 4 else variance * 4, len(out) // 4)
    return np.stack([out, var])[None]


@pytest.mark.parametrize(
    "text, feat, img, expect",
    [
        (  # image size from the bottom, default step, two min sizes with max sizes, a repeated ratio
            "min_size: 30 min_size: 50.7 max_size: 60 max_size: 90 aspect_ratio: 2 aspect_ratio: 2 "
            "aspect_ratio: 0.5 aspect_ratio: 3 flip: true clip: true variance: 0.1 variance: 0.1 variance: 0.2 "
            "variance: 0.2",
            (1, 8, 5, 7),
            (1, 3, 100, 140),
            dict(img=(100, 140), step=(20.0, 20.0), mins=[30, 50.7], maxs=[60, 90], ars=[2, 2, 0.5, 3]),
        ),
        (  # img_size and step_h/step_w, offset, no flip, one variance, no clip
            "min_size: 16 aspect_ratio: 2 flip: false img_size: 64 step_h: 6 step_w: 9 offset: 0.25 variance: 0.3",
            (2, 4, 3, 4),
            (2, 3, 10, 10),
            dict(img=(64, 64), step=(6.0, 9.0), mins=[16], maxs=[], ars=[2]),
        ),
        (  # img_h/img_w, default variance 0.1
            "min_size: 8 img_h: 30 img_w: 50",
            (1, 1, 2, 3),
            (1, 3, 1, 1),
            dict(img=(30, 50), step=(15.0, 50 / 3), mins=[8], maxs=[], ars=[]),
        ),
    ],
)
def test_prior_box_matches_loop_reference(text, feat, img, expect):
    layer = _layer(f'name: "pb" type: "PriorBox" prior_box_param {{ {text} }}', [feat, img])
    p = layer.param.prior_box_param
    (top,) = layer(torch.zeros(feat), torch.zeros(img))
    ref = _ref_priors(
        feat[2],
        feat[3],
        *expect["img"],
        *expect["step"],
        expect["mins"],
        expect["maxs"],
        expect["ars"],
        p.flip,
        p.clip,
        list(p.variance) or [0.1],
        p.offset,
    )
    assert layer.top_shapes([feat, img]) == [tuple(ref.shape)] == [tuple(top.shape)]
    np.testing.assert_allclose(top.numpy(), ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "text, msg",
    [
        ("aspect_ratio: 2", "min_size must be given"),
        ("min_size: 10 max_size: 5", "must be greater than min_size"),
        ("min_size: 10 variance: 0.1 variance: 0.2", "one or four"),
        ("min_size: 10 img_size: 10 img_h: 5 img_w: 5", "not both"),
        ("min_size: 10 step: 4 step_h: 2 step_w: 2", "not both"),
    ],
)
def test_prior_box_errors_name_the_field(text, msg):
    with pytest.raises(LayerError, match=msg):
        _layer(f'name: "pb" type: "PriorBox" prior_box_param {{ {text} }}', [(1, 1, 2, 2), (1, 3, 8, 8)])


# ---------------------------------------------------------------------------------------------
# DetectionOutput: against a loop transcription of bbox_util.cpp


def _ref_decode(prior, var, loc, code, in_target):
    if in_target:
        var = [1.0] * 4
    if code == "CORNER":
        return [prior[k] + var[k] * loc[k] for k in range(4)]
    pw, ph = prior[2] - prior[0], prior[3] - prior[1]
    if code == "CORNER_SIZE":
        return [prior[k] + var[k] * loc[k] * (pw, ph)[k % 2] for k in range(4)]
    cx = var[0] * loc[0] * pw + (prior[0] + prior[2]) / 2
    cy = var[1] * loc[1] * ph + (prior[1] + prior[3]) / 2
    w, h = math.exp(var[2] * loc[2]) * pw, math.exp(var[3] * loc[3]) * ph
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _ref_size(b):
    return 0.0 if b[2] < b[0] or b[3] < b[1] else (b[2] - b[0]) * (b[3] - b[1])


def _ref_iou(a, b):
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return 0.0
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (_ref_size(a) + _ref_size(b) - inter)


def _ref_nms(boxes, scores, conf_thr, nms_thr, eta, top_k):
    cand = sorted([(s, i) for i, s in enumerate(scores) if s > conf_thr], key=lambda t: -t[0])
    if top_k > -1:
        cand = cand[:top_k]
    kept, thr = [], nms_thr
    for _, i in cand:
        if all(_ref_iou(boxes[i], boxes[k]) <= thr for k in kept):
            kept.append(i)
            if eta < 1 and thr > 0.5:
                thr *= eta
    return kept


def _ref_detection_output(loc, conf, prior, nc, share, bg, code, in_target, conf_thr, nms_thr, eta, top_k, keep):
    n, npri = loc.shape[0], prior.shape[2] // 4
    nl = 1 if share else nc
    pr = prior[0, 0].reshape(npri, 4)
    pv = prior[0, 1].reshape(npri, 4)
    rows = []
    for i in range(n):
        lo = loc[i].reshape(npri, nl, 4)
        sc = conf[i].reshape(npri, nc)
        dec = {}
        for c in range(nl):
            label = -1 if share else c
            if label != bg:
                dec[label] = [_ref_decode(pr[p], pv[p], lo[p, c], code, in_target) for p in range(npri)]
        idx = {}
        for c in range(nc):
            if c != bg:
                idx[c] = _ref_nms(dec[-1 if share else c], sc[:, c].tolist(), conf_thr, nms_thr, eta, top_k)
        if keep > -1 and sum(map(len, idx.values())) > keep:
            pairs = sorted([(sc[j, c], c, j) for c in idx for j in idx[c]], key=lambda t: -t[0])[:keep]
            idx = {}
            for _, c, j in pairs:
                idx.setdefault(c, []).append(j)
        for c in sorted(idx):
            for j in idx[c]:
                rows.append([i, c, sc[j, c], *dec[-1 if share else c][j]])
    if not rows:
        return np.array([[i] + [-1] * 6 for i in range(n)], np.float64).reshape(1, 1, n, 7)
    return np.array(rows).reshape(1, 1, -1, 7)


def _det_inputs(seed, n, npri, nc, nl):
    rng = np.random.default_rng(seed)
    cx, cy = rng.uniform(0.1, 0.9, npri), rng.uniform(0.1, 0.9, npri)
    w, h = rng.uniform(0.1, 0.4, npri), rng.uniform(0.1, 0.4, npri)
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    var = np.tile([0.1, 0.1, 0.2, 0.2], (npri, 1))
    prior = np.stack([boxes.reshape(-1), var.reshape(-1)])[None].astype(np.float32)
    loc = rng.normal(0, 1, (n, npri * nl * 4)).astype(np.float32)
    logits = rng.normal(0, 2, (n, npri, nc))
    conf = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).reshape(n, -1).astype(np.float32)
    return loc, conf, prior


@pytest.mark.parametrize(
    "code, share, bg, in_target, eta, top_k, keep, conf_thr",
    [
        ("CENTER_SIZE", True, 0, False, 1.0, 30, 10, 0.05),
        ("CORNER", True, 0, False, 0.8, -1, -1, 0.1),
        ("CORNER_SIZE", False, 0, True, 1.0, 20, 15, 0.02),
        ("CENTER_SIZE", False, -1, False, 0.9, 40, 25, None),
        ("CORNER", False, 2, True, 1.0, -1, 5, 0.2),
    ],
)
def test_detection_output_matches_loop_reference(code, share, bg, in_target, eta, top_k, keep, conf_thr):
    n, npri, nc = 2, 40, 4
    nl = 1 if share else nc
    loc, conf, prior = _det_inputs(7, n, npri, nc, nl)
    if code == "CORNER":
        loc *= 0.3
    thr = f"confidence_threshold: {conf_thr}" if conf_thr is not None else ""
    text = (
        f'name: "det" type: "DetectionOutput" detection_output_param {{ num_classes: {nc} '
        f"share_location: {str(share).lower()} background_label_id: {bg} code_type: {code} "
        f"variance_encoded_in_target: {str(in_target).lower()} keep_top_k: {keep} {thr} "
        f"nms_param {{ nms_threshold: 0.45 eta: {eta} {f'top_k: {top_k}' if top_k > -1 else ''} }} }}"
    )
    layer = _layer(text, [loc.shape, conf.shape, prior.shape])
    (top,) = layer(torch.from_numpy(loc), torch.from_numpy(conf), torch.from_numpy(prior))
    ref = _ref_detection_output(
        loc.astype(np.float64),
        conf.astype(np.float64),
        prior.astype(np.float64),
        nc,
        share,
        bg,
        code,
        in_target,
        conf_thr if conf_thr is not None else -3.4e38,
        0.45,
        eta,
        top_k,
        keep,
    )
    assert ref.shape[2] > 3  # the case has detections
    assert top.shape == ref.shape
    np.testing.assert_array_equal(top.numpy()[..., :2], ref[..., :2])
    np.testing.assert_allclose(top.numpy(), ref, rtol=RTOL, atol=ATOL)


def test_detection_output_empty_is_caffes_convention():
    """Nothing above the threshold: top [1, 1, N, 7], -1 everywhere but the image index."""
    loc, conf, prior = _det_inputs(3, 3, 10, 3, 1)
    layer = _layer(
        'name: "det" type: "DetectionOutput" detection_output_param { num_classes: 3 confidence_threshold: 0.999 '
        "code_type: CENTER_SIZE }",
        [loc.shape, conf.shape, prior.shape],
    )
    (top,) = layer(torch.from_numpy(loc), torch.from_numpy(conf), torch.from_numpy(prior))
    want = np.full((1, 1, 3, 7), -1, np.float32)
    want[0, 0, :, 0] = [0, 1, 2]
    np.testing.assert_array_equal(top.numpy(), want)


@pytest.mark.parametrize(
    "text, shapes, msg",
    [
        ("", [(1, 40), (1, 30), (1, 2, 40)], "num_classes must be given"),
        ("num_classes: 3", [(1, 44), (1, 30), (1, 2, 40)], "loc has shape"),
        ("num_classes: 3", [(1, 40), (1, 33), (1, 2, 40)], "conf has shape"),
        ("num_classes: 3 nms_param { eta: 0 }", [(1, 40), (1, 30), (1, 2, 40)], "eta must be in"),
        ("num_classes: 3 visualize: true", [(1, 40), (1, 30), (1, 2, 40)], "visualize"),
        (
            'num_classes: 3 save_output_param { output_directory: "/tmp/x" }',
            [(1, 40), (1, 30), (1, 2, 40)],
            "output_directory",
        ),
    ],
)
def test_detection_output_errors_name_the_field(text, shapes, msg):
    with pytest.raises(LayerError, match=msg):
        _layer(f'name: "det" type: "DetectionOutput" detection_output_param {{ {text} }}', shapes)


# ---------------------------------------------------------------------------------------------
# ONNX export (caffe_compat/export/onnx_ssd.py), run in onnxruntime against the Net


@pytest.mark.parametrize(
    "norm",
    [
        "across_spatial: true channel_shared: true",
        "across_spatial: false channel_shared: false",
        "across_spatial: true channel_shared: false",
        "across_spatial: false channel_shared: true eps: 0.001",
    ],
)
def test_onnx_normalize_permute_priorbox(norm):
    from tests.test_export_onnx import _assert_exports, _input, _net

    text = (
        _input("data", (2, 3, 32, 40))
        + _input("feat", (2, 5, 4, 5))
        + f'layer {{ name: "n" type: "Normalize" bottom: "feat" top: "n" norm_param {{ {norm} '
        'scale_filler { type: "gaussian" mean: 10 std: 2 } } }\n'
        'layer { name: "p" type: "Permute" bottom: "n" top: "p" permute_param { order: 0 order: 2 order: 3 order: 1 } }\n'
        'layer { name: "pid" type: "Permute" bottom: "p" top: "pid" }\n'
        'layer { name: "pb" type: "PriorBox" bottom: "n" bottom: "data" top: "pb" prior_box_param { min_size: 8 '
        "max_size: 16 aspect_ratio: 2 aspect_ratio: 3 flip: true clip: true variance: 0.1 variance: 0.1 "
        "variance: 0.2 variance: 0.2 } }\n"
    )
    net = _net(text)
    model = _assert_exports(net)
    ops = {n.op_type for n in model.graph.node}
    assert "Transpose" in ops and "Sqrt" in ops
    # the priors are one initializer holding the layer's top
    (init,) = [i for i in model.graph.initializer if i.name.startswith("pb/")]
    import onnx.numpy_helper

    net.forward()
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(init), net.blobs["pb"].data)


def test_onnx_refuses_detection_output_by_name():
    from caffe_compat.export import onnx as ox
    from tests.test_export_onnx import _input, _net

    loc, conf, prior = _det_inputs(0, 1, 10, 3, 1)
    text = (
        _input("loc", loc.shape)
        + _input("conf", conf.shape)
        + _input("prior", prior.shape)
        + 'layer { name: "detection_out" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" '
        'top: "det" detection_output_param { num_classes: 3 } }\n'
    )
    with pytest.raises(ox.OnnxExportError, match=r"'detection_out' \(DetectionOutput\).*NonMaxSuppression"):
        ox.export_onnx(_net(text))
    assert "DetectionOutput" not in ox.exportable_types()
