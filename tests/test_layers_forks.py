"""Layers of Caffe's forks (caffe_compat.layers.forks / detection): the real-Caffe fork fixtures
(``forks/layers/relu6``, ``forward_only_faster_rcnn_proposal``), NumPy transcriptions of the
forks' loops, float64 gradchecks of every backward, the Python-layer form of Proposal and the
re-reading of a fork's parameters under another fork's field number."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffe_compat as caffe
from caffe_compat.errors import CaffeError, LayerError
from caffe_compat.layers import layer_class
from caffe_compat.proto import caffe_pb2
from tests.conftest import CAFFE_REF
from tests.test_conformance_layers import replay_case

FIX_RTOL, FIX_ATOL = 1e-4, 1e-5  # the fixture README's tolerance
RTOL, ATOL = 1e-5, 1e-6  # float64 NumPy references against float32 layers
FORK_CASES = sorted(p.name for p in (CAFFE_REF / "forks" / "layers").iterdir() if p.is_dir())


def make_layer(type_name, bottom_shapes, params: str = "", phase=caffe_pb2.TEST, ntop: int = 1):
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(params, lp)
    lp.name, lp.type = "l", type_name
    for i in range(len(bottom_shapes)):
        lp.bottom.append(f"b{i}")
    for i in range(ntop):
        lp.top.append(f"t{i}")
    return layer_class(type_name)(lp, [tuple(s) for s in bottom_shapes], phase)


def gradcheck(layer, inputs, which):
    """float64 gradcheck of ``layer`` w.r.t. the inputs listed in ``which`` (and its blobs)."""
    layer = layer.double()
    ts = [torch.tensor(np.asarray(x, np.float64), requires_grad=(i in which)) for i, x in enumerate(inputs)]
    params = list(layer.blobs)

    def f(*args):
        return layer(*args[: len(ts)])

    assert torch.autograd.gradcheck(f, (*ts, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


# -- the real-Caffe fork fixtures -----------------------------------------------------------


@pytest.mark.parametrize("case", FORK_CASES)
def test_fork_case_matches_caffe(case):
    net, ref, backward = replay_case(case, folder="forks/layers")
    checked = 0
    for k in ref.files:
        kind, _, rest = k.partition("__")
        if kind == "topdiff" or (not backward and kind in ("diff", "pdiff")):
            continue
        if kind in ("param", "pdiff"):
            layer, _, i = rest.rpartition("__")
            ours = getattr(net.params[layer][int(i)], "data" if kind == "param" else "diff")
        else:
            ours = getattr(net.blobs[rest], kind)
        assert ours.shape == ref[k].shape, (k, ours.shape, ref[k].shape)
        np.testing.assert_allclose(ours, ref[k], rtol=FIX_RTOL, atol=FIX_ATOL, err_msg=f"{case}: {k}")
        checked += 1
    assert checked >= 2


def test_relu6_gradcheck_away_from_kinks():
    x = np.random.default_rng(0).uniform(-3, 9, size=(2, 3, 4))
    x = np.where(np.abs(x) < 0.05, 0.3, x)
    x = np.where(np.abs(x - 6) < 0.05, 5.5, x)
    gradcheck(make_layer("ReLU6", [x.shape]), [x], {0})


# -- Proposal ----------------------------------------------------------------------------------


def _py_faster_rcnn_proposals(cls, bbox, im_info, feat_stride, scales, pre, post, thresh, min_size):
    """py-faster-rcnn's proposal_layer.forward (TEST), transcribed loop by loop in float64."""
    base = 16
    anchors = []
    for r in (0.5, 1.0, 2.0):
        ws = np.round(np.sqrt(base * base / r))
        hs = np.round(ws * r)
        for s in scales:
            w, h = ws * s, hs * s
            anchors.append([7.5 - (w - 1) / 2, 7.5 - (h - 1) / 2, 7.5 + (w - 1) / 2, 7.5 + (h - 1) / 2])
    a = len(anchors)
    hh, ww = cls.shape[2:]
    cand = []
    for y in range(hh):
        for x in range(ww):
            for k in range(a):
                x1, y1, x2, y2 = np.array(anchors[k]) + [x * feat_stride, y * feat_stride] * 2
                dx, dy, dw, dh = bbox[0, 4 * k : 4 * k + 4, y, x].astype(np.float64)
                w, h = x2 - x1 + 1, y2 - y1 + 1
                cx, cy = x1 + 0.5 * w + dx * w, y1 + 0.5 * h + dy * h
                pw, ph = math.exp(dw) * w, math.exp(dh) * h
                box = [cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2]
                box = [min(max(v, 0), (im_info[1] if i % 2 == 0 else im_info[0]) - 1) for i, v in enumerate(box)]
                if box[2] - box[0] + 1 >= min_size * im_info[2] and box[3] - box[1] + 1 >= min_size * im_info[2]:
                    cand.append((float(cls[0, a + k, y, x]), box))
    cand.sort(key=lambda t: -t[0])
    cand = cand[:pre]
    kept = []
    for s, b in cand:
        ok = True
        for _, kb in kept:
            iw = max(0.0, min(b[2], kb[2]) - max(b[0], kb[0]) + 1)
            ih = max(0.0, min(b[3], kb[3]) - max(b[1], kb[1]) + 1)
            inter = iw * ih
            area = lambda q: (q[2] - q[0] + 1) * (q[3] - q[1] + 1)  # noqa: E731
            if inter / (area(b) + area(kb) - inter) > thresh:
                ok = False
                break
        if ok:
            kept.append((s, b))
    return np.array([[0.0, *b] for _, b in kept[:post]]), np.array([s for s, _ in kept[:post]])


def _proposal_inputs(h=5, w=7, seed=0):
    rng = np.random.default_rng(seed)
    cls = rng.uniform(0, 1, size=(1, 18, h, w)).astype(np.float32)
    bbox = rng.uniform(-0.3, 0.3, size=(1, 36, h, w)).astype(np.float32)
    im_info = np.array([[h * 16.0, w * 16.0, 1.0]], np.float32)
    return cls, bbox, im_info


PY_PROPOSAL = """name: "rpn"
layer { name: "cls" type: "Input" top: "cls" input_param { shape { dim: 1 dim: 18 dim: 5 dim: 7 } } }
layer { name: "bbox" type: "Input" top: "bbox" input_param { shape { dim: 1 dim: 36 dim: 5 dim: 7 } } }
layer { name: "im_info" type: "Input" top: "im_info" input_param { shape { dim: 1 dim: 3 } } }
layer { name: "proposal" type: "Python" bottom: "cls" bottom: "bbox" bottom: "im_info" top: "rois" top: "scores"
  python_param { module: "rpn.proposal_layer" layer: "ProposalLayer" param_str: %s } }
"""


def test_python_proposal_form_runs_natively_without_user_code(tmp_path, monkeypatch):
    from caffe_compat.layers import python as pylayers
    from caffe_compat.layers.detection import ProposalLayer

    monkeypatch.delenv("CAFFE_COMPAT_ALLOW_PYTHON_LAYERS", raising=False)
    pylayers.allow_python_layers(False)
    # a module of that name that must never be imported
    (tmp_path / "rpn").mkdir()
    (tmp_path / "rpn" / "__init__.py").write_text("raise RuntimeError('user code ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = tmp_path / "net.prototxt"
    p.write_text(PY_PROPOSAL % "\"'feat_stride': 16\"")
    net = caffe.Net(str(p), caffe.TEST)
    assert "rpn" not in sys.modules
    assert [type(m) for m in net.modules() if type(m).__name__ == "ProposalLayer"] == [ProposalLayer]
    cls, bbox, im_info = _proposal_inputs()
    net.blobs["cls"].data[...] = cls
    net.blobs["bbox"].data[...] = bbox
    net.blobs["im_info"].data[...] = im_info
    net.forward()
    rois, scores = _py_faster_rcnn_proposals(cls, bbox, im_info[0], 16, (8, 16, 32), 6000, 300, 0.7, 16)
    assert net.blobs["rois"].data.shape == rois.shape
    np.testing.assert_allclose(net.blobs["rois"].data, rois, rtol=RTOL, atol=1e-4)
    np.testing.assert_allclose(net.blobs["scores"].data[:, 0], scores, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "param_str, scales",
    [("\"{'feat_stride': 16, 'scales': [4, 8]}\"", (4, 8)), ('"feat_stride: 16\\nscales: [2, 4]"', (2, 4))],
)
def test_python_proposal_param_str_literal_and_yaml(tmp_path, param_str, scales):
    p = tmp_path / "net.prototxt"
    text = PY_PROPOSAL.replace("dim: 18", f"dim: {6 * len(scales)}").replace("dim: 36", f"dim: {12 * len(scales)}")
    p.write_text(text % param_str)
    net = caffe.Net(str(p), caffe.TEST)
    layer = [m for m in net.modules() if type(m).__name__ == "ProposalLayer"][0]
    assert layer.scales == [float(s) for s in scales] and layer.feat_stride == 16


def test_python_proposal_param_str_is_never_evaluated(tmp_path):
    p = tmp_path / "net.prototxt"
    marker = tmp_path / "ran"
    p.write_text(PY_PROPOSAL % f"\"__import__('pathlib').Path('{marker}').touch()\"")
    with pytest.raises(CaffeError, match="param_str"):
        caffe.Net(str(p), caffe.TEST)
    assert not marker.exists()


def test_other_python_layers_still_need_the_opt_in(tmp_path, monkeypatch):
    from caffe_compat.layers import python as pylayers

    monkeypatch.delenv("CAFFE_COMPAT_ALLOW_PYTHON_LAYERS", raising=False)
    pylayers.allow_python_layers(False)
    p = tmp_path / "net.prototxt"
    p.write_text((PY_PROPOSAL % '""').replace("rpn.proposal_layer", "rpn.other_layer"))
    with pytest.raises(CaffeError, match="opt in|Opt in"):
        caffe.Net(str(p), caffe.TEST)


def test_proposal_gives_bottoms_no_gradient():
    cls, bbox, im_info = _proposal_inputs()
    layer = make_layer(
        "Proposal",
        [cls.shape, bbox.shape, im_info.shape],
        "proposal_param { ratio: 0.5 ratio: 1 ratio: 2 scale: 8 scale: 16 scale: 32 }",
    )
    ts = [torch.tensor(v, requires_grad=True) for v in (cls, bbox, im_info)]
    (rois,) = layer(*ts)
    assert not rois.requires_grad and rois.shape[1] == 5


# -- ROIPooling / PSROIPooling -------------------------------------------------------------------


def _c_round(v):
    return math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)


def _roi_pool_ref(x, rois, ph, pw, ss):
    """caffe-fast-rcnn's ROIPoolingLayer::Forward_cpu, loop by loop."""
    n, c, h, w = x.shape
    out = np.zeros((len(rois), c, ph, pw))
    for r, (b, x1, y1, x2, y2) in enumerate(rois):
        sw, sh, ew, eh = (_c_round(v * ss) for v in (x1, y1, x2, y2))
        rh, rw = max(eh - sh + 1, 1), max(ew - sw + 1, 1)
        bh, bw = np.float32(rh) / np.float32(ph), np.float32(rw) / np.float32(pw)
        for i in range(ph):
            for j in range(pw):
                hs = min(max(int(math.floor(np.float32(i) * bh)) + sh, 0), h)
                he = min(max(int(math.ceil(np.float32(i + 1) * bh)) + sh, 0), h)
                ws = min(max(int(math.floor(np.float32(j) * bw)) + sw, 0), w)
                we = min(max(int(math.ceil(np.float32(j + 1) * bw)) + sw, 0), w)
                if he > hs and we > ws:
                    out[r, :, i, j] = x[int(b), :, hs:he, ws:we].max(axis=(1, 2))
    return out


def _rois(n_img=2, r=6, size=(64, 48), seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(r):
        x1, y1 = rng.uniform(-4, size[0] * 0.7), rng.uniform(-4, size[1] * 0.7)
        out.append([rng.integers(n_img), x1, y1, x1 + rng.uniform(0, 30), y1 + rng.uniform(0, 30)])
    out.append([0, 60, 40, 70, 50])  # partly outside the map
    return np.array(out, np.float32)


@pytest.mark.parametrize("ph, pw, ss", [(2, 3, 0.25), (3, 3, 0.125), (1, 1, 0.5)])
def test_roi_pooling_forward_matches_the_fork_loop(ph, pw, ss):
    x = np.random.default_rng(0).normal(size=(2, 3, 12, 16)).astype(np.float32)
    rois = _rois()
    layer = make_layer(
        "ROIPooling",
        [x.shape, rois.shape],
        f"roi_pooling_param {{ pooled_h: {ph} pooled_w: {pw} spatial_scale: {ss} }}",
    )
    (y,) = layer(torch.tensor(x), torch.tensor(rois))
    np.testing.assert_allclose(y.numpy(), _roi_pool_ref(x, rois, ph, pw, ss), rtol=RTOL, atol=ATOL)
    assert layer.top_shapes([x.shape, rois.shape]) == [(len(rois), 3, ph, pw)]


def test_roi_pooling_backward_routes_to_each_bins_maximum():
    x = np.random.default_rng(2).normal(size=(1, 2, 8, 8))
    rois = np.array([[0, 0, 0, 31, 31], [0, 8, 4, 27, 30]], np.float64)
    layer = make_layer(
        "ROIPooling", [x.shape, rois.shape], "roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 0.25 }"
    )
    gradcheck(layer, [x, rois], {0})
    xt = torch.tensor(x, requires_grad=True)
    (y,) = layer(xt, torch.tensor(rois))
    y.sum().backward()
    # every top element sends exactly 1 to one bottom position
    assert float(xt.grad.sum()) == pytest.approx(y.numel()) and set(np.unique(xt.grad.numpy())) <= {0.0, 1.0, 2.0}


def _psroi_ref(x, rois, ss, dim, k):
    """R-FCN's PSROIPoolingForward, loop by loop."""
    n, c, h, w = x.shape
    out = np.zeros((len(rois), dim, k, k))
    f = np.float32
    for r, (b, x1, y1, x2, y2) in enumerate(rois):
        sw, sh = f(_c_round(x1)) * f(ss), f(_c_round(y1)) * f(ss)
        ew, eh = f(_c_round(x2) + 1.0) * f(ss), f(_c_round(y2) + 1.0) * f(ss)
        rw, rh = max(ew - sw, f(0.1)), max(eh - sh, f(0.1))
        bh, bw = rh / f(k), rw / f(k)
        for o in range(dim):
            for i in range(k):
                for j in range(k):
                    hs = min(max(int(math.floor(f(i) * bh + sh)), 0), h)
                    he = min(max(int(math.ceil(f(i + 1) * bh + sh)), 0), h)
                    ws = min(max(int(math.floor(f(j) * bw + sw)), 0), w)
                    we = min(max(int(math.ceil(f(j + 1) * bw + sw)), 0), w)
                    if he > hs and we > ws:
                        out[r, o, i, j] = x[int(b), (o * k + i) * k + j, hs:he, ws:we].mean()
    return out


@pytest.mark.parametrize("dim, k, ss", [(2, 3, 0.25), (3, 2, 0.125)])
def test_psroi_pooling_forward_matches_the_fork_loop(dim, k, ss):
    x = np.random.default_rng(0).normal(size=(2, dim * k * k, 12, 16)).astype(np.float32)
    rois = _rois()
    layer = make_layer(
        "PSROIPooling",
        [x.shape, rois.shape],
        f"psroi_pooling_param {{ spatial_scale: {ss} output_dim: {dim} group_size: {k} }}",
    )
    (y,) = layer(torch.tensor(x), torch.tensor(rois))
    np.testing.assert_allclose(y.numpy(), _psroi_ref(x, rois, ss, dim, k), rtol=RTOL, atol=ATOL)


def test_psroi_pooling_gradcheck_and_channel_check():
    x = np.random.default_rng(3).normal(size=(2, 8, 6, 7))
    rois = np.array([[0, 0, 0, 20, 18], [1, 4, 8, 27, 22], [0, 13, 2, 30, 30]], np.float64)
    params = "psroi_pooling_param { spatial_scale: 0.25 output_dim: 2 group_size: 2 }"
    gradcheck(make_layer("PSROIPooling", [x.shape, rois.shape], params), [x, rois], {0})
    with pytest.raises(LayerError, match="output_dim"):
        make_layer("PSROIPooling", [(1, 9, 6, 7), rois.shape], params)


# -- Interp --------------------------------------------------------------------------------------


def _interp_ref(x, h_out, w_out, pad_beg=0, pad_end=0, nearest=False):
    """hszhao/PSPNet's caffe_cpu_interp2 / nninterp2 (float32 ratios), loop by loop."""
    n, c, h, w = x.shape
    he, we = h + pad_beg + pad_end, w + pad_beg + pad_end
    x = x[:, :, -pad_beg : -pad_beg + he, -pad_beg : -pad_beg + we]
    if (he, we) == (h_out, w_out):
        return x.copy()
    f = np.float32
    rh = f(he - 1) / f(h_out - 1) if h_out > 1 else f(0)
    rw = f(we - 1) / f(w_out - 1) if w_out > 1 else f(0)
    out = np.zeros((n, c, h_out, w_out))
    for i in range(h_out):
        hr = f(rh * f(i))
        for j in range(w_out):
            wr = f(rw * f(j))
            if nearest:
                out[:, :, i, j] = x[:, :, int(math.floor(hr + 0.5)), int(math.floor(wr + 0.5))]
                continue
            h0, w0 = int(hr), int(wr)
            h1, w1 = h0 + (h0 < he - 1), w0 + (w0 < we - 1)
            lh, lw = hr - h0, wr - w0
            out[:, :, i, j] = (1 - lh) * ((1 - lw) * x[:, :, h0, w0] + lw * x[:, :, h0, w1]) + lh * (
                (1 - lw) * x[:, :, h1, w0] + lw * x[:, :, h1, w1]
            )
    return out


@pytest.mark.parametrize(
    "params, size",
    [
        ("zoom_factor: 3", None),
        ("shrink_factor: 2", None),
        ("height: 9 width: 4", (9, 4)),
        ("height: 1 width: 1", (1, 1)),
        ("zoom_factor: 2 pad_beg: -1 pad_end: -1", None),
        ("shrink_factor: 3 pad_end: -2", None),
        ("height: 5 width: 8 pad_beg: 0", (5, 8)),
        ("height: 11 width: 13 interp_type: 'nearest_neighbor'", (11, 13)),
    ],
)
def test_interp_every_size_mode_matches_the_fork_loop(params, size):
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 7)).astype(np.float32)
    lp = caffe_pb2.InterpParameter()
    text_format.Parse(params, lp)
    he, we = 6 + lp.pad_beg + lp.pad_end, 7 + lp.pad_beg + lp.pad_end
    if lp.HasField("zoom_factor"):
        size = (he + (he - 1) * (lp.zoom_factor - 1), we + (we - 1) * (lp.zoom_factor - 1))
    elif lp.HasField("shrink_factor"):
        size = ((he - 1) // lp.shrink_factor + 1, (we - 1) // lp.shrink_factor + 1)
    layer = make_layer("Interp", [x.shape], f"interp_param {{ {params} }}")
    (y,) = layer(torch.tensor(x))
    ref = _interp_ref(x, *size, lp.pad_beg, lp.pad_end, nearest=lp.interp_type == "nearest_neighbor")
    np.testing.assert_allclose(y.numpy(), ref, rtol=RTOL, atol=ATOL)
    assert layer.top_shapes([x.shape]) == [(2, 3, *size)]


def test_interp_second_bottom_gives_the_size_and_gradcheck():
    x = np.random.default_rng(1).normal(size=(1, 2, 4, 5))
    ref = np.zeros((1, 7, 9, 3))
    layer = make_layer("Interp", [x.shape, ref.shape])
    assert layer.top_shapes([x.shape, ref.shape]) == [(1, 2, 9, 3)]
    gradcheck(layer, [x, ref], {0})
    gradcheck(make_layer("Interp", [x.shape], "interp_param { zoom_factor: 2 pad_beg: -1 }"), [x], {0})
    gradcheck(
        make_layer("Interp", [x.shape], "interp_param { height: 6 width: 9 interp_type: 'nearest_neighbor' }"), [x], {0}
    )


@pytest.mark.parametrize(
    "params, match",
    [
        ("", "exactly one way"),
        ("zoom_factor: 2 height: 3 width: 3", "exactly one way"),
        ("zoom_factor: 2 pad_beg: 1", "<= 0"),
    ],
)
def test_interp_refuses_ambiguous_or_padding_specs(params, match):
    with pytest.raises(LayerError, match=match):
        make_layer("Interp", [(1, 2, 4, 5)], f"interp_param {{ {params} }}")


# -- Upsample ------------------------------------------------------------------------------------


def _pool_with_mask(x, k=2, s=2):
    pool = make_layer("Pooling", [x.shape], f"pooling_param {{ pool: MAX kernel_size: {k} stride: {s} }}", ntop=2)
    y, mask = pool(torch.tensor(x))
    return y.numpy(), mask.numpy()


@pytest.mark.parametrize(
    "shape, params, top_hw",
    [
        ((2, 3, 8, 6), "scale: 2", (8, 6)),
        ((1, 2, 7, 5), "scale: 2 pad_out_h: true pad_out_w: true", (7, 5)),
        ((1, 2, 7, 5), "upsample_h: 7 upsample_w: 5", (7, 5)),
        ((1, 2, 8, 8), "scale_h: 2 scale_w: 2", (8, 8)),
    ],
)
def test_upsample_mask_form_scatters_to_the_pooling_argmax(shape, params, top_hw):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    v, mask = _pool_with_mask(x)
    layer = make_layer("Upsample", [v.shape, mask.shape], f"upsample_param {{ {params} }}")
    (y,) = layer(torch.tensor(v), torch.tensor(mask))
    ref = np.zeros((shape[0], shape[1], top_hw[0] * top_hw[1]))
    for n in range(shape[0]):
        for c in range(shape[1]):
            for i, idx in enumerate(mask[n, c].ravel()):
                ref[n, c, int(idx)] = v[n, c].ravel()[i]
    np.testing.assert_array_equal(y.numpy(), ref.reshape(shape[0], shape[1], *top_hw))
    # unpooling puts every pooled maximum back where it came from
    back = np.where(y.numpy() != 0, x[:, :, : top_hw[0], : top_hw[1]], 0)
    np.testing.assert_array_equal(back, y.numpy())


def test_upsample_mask_backward_is_a_gather_even_for_shared_indices():
    v = np.random.default_rng(1).normal(size=(1, 1, 2, 2))
    mask = np.array([[[[0, 5], [5, 15]]]], np.float64)  # index 5 used twice
    layer = make_layer("Upsample", [v.shape, mask.shape], "upsample_param { scale: 2 }").double()
    vt = torch.tensor(v, requires_grad=True)
    (y,) = layer(vt, torch.tensor(mask))
    g = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    y.backward(g)
    np.testing.assert_array_equal(vt.grad.numpy().ravel(), [0, 5, 5, 15])
    mask2 = np.array([[[[0, 6], [9, 15]]]], np.float64)
    gradcheck(make_layer("Upsample", [v.shape, mask.shape], "upsample_param { scale: 2 }"), [v, mask2], {0})


def test_upsample_mask_index_out_of_range_names_the_layer():
    layer = make_layer("Upsample", [(1, 1, 2, 2)] * 2, "upsample_param { scale: 2 }")
    with pytest.raises(LayerError, match="outside the 4x4 top"):
        layer(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 16.0))


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_upsample_nearest_form_repeats_pixels(scale):
    x = np.random.default_rng(2).normal(size=(2, 3, 4, 5))
    layer = make_layer("Upsample", [x.shape], f"upsample_param {{ scale: {scale} }}")
    (y,) = layer(torch.tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(y.numpy(), np.repeat(np.repeat(x, scale, 2), scale, 3), rtol=RTOL, atol=ATOL)
    gradcheck(layer, [x], {0})


def test_upsample_nearest_form_refuses_mask_fields():
    with pytest.raises(LayerError, match="mask form"):
        make_layer("Upsample", [(1, 2, 3, 3)], "upsample_param { upsample_h: 6 upsample_w: 6 }")


# -- BN (SegNet) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["LEARN", "INFERENCE"])
@pytest.mark.parametrize("phase", [caffe_pb2.TRAIN, caffe_pb2.TEST])
def test_segnet_bn_modes(mode, phase):
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(3, 4, 5, 6))
    params = (
        f"bn_param {{ bn_mode: {mode} scale_filler {{ type: 'uniform' min: 0.5 max: 2 }} "
        "shift_filler { type: 'uniform' min: -1 max: 1 } }"
    )
    layer = make_layer("BN", [x.shape], params, phase=phase)
    assert [tuple(b.shape) for b in layer.blobs] == [(1, 4, 1, 1)] * 2
    scale, shift = (b.detach().double().numpy() for b in layer.blobs)
    if mode == "LEARN":  # batch statistics in both phases, variance E[x²] − E[x]², eps 1e-9
        mu = x.mean(axis=(0, 2, 3), keepdims=True)
        var = (x**2).mean(axis=(0, 2, 3), keepdims=True) - mu**2
        ref = scale * (x - mu) / np.sqrt(var + 1e-9) + shift
    else:
        ref = scale * x + shift
    (y,) = layer(torch.tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-4, atol=1e-5)
    gradcheck(layer, [x[:2, :, :3, :3]], {0})


def test_segnet_bn_defaults_to_learn_and_constant_zero_fillers():
    layer = make_layer("BN", [(2, 3, 2, 2)])
    assert layer.learn and all(float(b.detach().abs().sum()) == 0 for b in layer.blobs)


# -- ShuffleChannel, depthwise convolution, Axpy ---------------------------------------------------


@pytest.mark.parametrize("group", [1, 2, 3, 6])
def test_shuffle_channel_permutation_and_inverse_gradient(group):
    x = np.random.default_rng(0).normal(size=(2, 6, 3, 2))
    layer = make_layer("ShuffleChannel", [x.shape], f"shuffle_channel_param {{ group: {group} }}")
    (y,) = layer(torch.tensor(x))
    cpg = 6 // group
    for j in range(cpg):
        for i in range(group):
            np.testing.assert_array_equal(y.numpy()[:, j * group + i], x[:, i * cpg + j])
    gradcheck(layer, [x], {0})
    with pytest.raises(LayerError, match="must divide"):
        make_layer("ShuffleChannel", [(1, 6, 2, 2)], "shuffle_channel_param { group: 4 }")


@pytest.mark.parametrize("type_name", ["ConvolutionDepthwise", "DepthwiseConvolution"])
@pytest.mark.parametrize("group", ["", "group: 4"])
def test_depthwise_types_are_convolution_with_a_group_per_channel(type_name, group):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 7, 6)).astype(np.float32)
    fill = "weight_filler { type: 'gaussian' std: 1 } bias_filler { type: 'gaussian' std: 1 }"
    cp = "convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 %s " + fill + " }"
    dw = make_layer(type_name, [x.shape], cp % group)
    conv = make_layer("Convolution", [x.shape], cp % "group: 4")
    assert tuple(dw.blobs[0].shape) == (8, 1, 3, 3)
    for a, b in zip(dw.blobs, conv.blobs):
        b.data.copy_(a.data)
    np.testing.assert_array_equal(dw(torch.tensor(x))[0].detach().numpy(), conv(torch.tensor(x))[0].detach().numpy())
    gradcheck(dw, [x[:1, :, :4, :4]], {0})
    with pytest.raises(LayerError, match="one group per channel"):
        make_layer(type_name, [x.shape], "convolution_param { num_output: 8 kernel_size: 3 group: 2 }")


@pytest.mark.parametrize("a_shape", [(2, 3), (2, 3, 1, 1)])
def test_axpy(a_shape):
    rng = np.random.default_rng(0)
    a, x, y = rng.normal(size=a_shape), rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 4, 5))
    layer = make_layer("Axpy", [a.shape, x.shape, y.shape])
    (top,) = layer(*(torch.tensor(v) for v in (a, x, y)))
    np.testing.assert_allclose(top.numpy(), a.reshape(2, 3, 1, 1) * x + y, rtol=RTOL, atol=ATOL)
    gradcheck(layer, [a, x, y], {0, 1, 2})
    with pytest.raises(LayerError, match="bottom 0"):
        make_layer("Axpy", [(2, 4), x.shape, y.shape])


# -- another fork's field number -------------------------------------------------------------------


def _layer_bytes(name: str, type_name: str, number: int, payload: bytes) -> bytes:
    """A LayerParameter as another fork's caffe would write it: ``payload`` under ``number``."""
    head = caffe_pb2.LayerParameter(name=name, type=type_name, bottom=["b0"], top=["t0"]).SerializeToString()

    def varint(v):
        out = b""
        while True:
            b, v = v & 0x7F, v >> 7
            out += bytes([b | (0x80 if v else 0)])
            if not v:
                return out

    return head + varint(number << 3 | 2) + varint(len(payload)) + payload


def test_pspnet_interp_param_at_143_is_read_as_interp_param():
    payload = caffe_pb2.InterpParameter(height=9, width=11).SerializeToString()
    lp = caffe_pb2.LayerParameter()
    lp.ParseFromString(_layer_bytes("interp", "Interp", 143, payload))
    assert lp.HasField("input_param") and not lp.HasField("interp_param")  # what BVLC's number makes of it
    layer = layer_class("Interp")(lp, [(1, 2, 4, 5)], caffe_pb2.TEST)
    assert layer.top_shapes([(1, 2, 4, 5)]) == [(1, 2, 9, 11)]


def test_segnet_upsample_param_at_137_is_read_as_upsample_param():
    payload = caffe_pb2.UpsampleParameter(upsample_h=7, upsample_w=5).SerializeToString()
    lp = caffe_pb2.LayerParameter()
    lp.ParseFromString(_layer_bytes("up", "Upsample", 137, payload))
    lp.bottom.append("mask")
    layer = layer_class("Upsample")(lp, [(1, 2, 4, 3)] * 2, caffe_pb2.TEST)
    assert layer.top_shapes([(1, 2, 4, 3)] * 2) == [(1, 2, 7, 5)]


def test_opencv_proposal_param_at_201_is_read_as_proposal_param():
    payload = caffe_pb2.ProposalParameter(feat_stride=8, ratio=[1.0], scale=[4.0, 8.0]).SerializeToString()
    lp = caffe_pb2.LayerParameter()
    lp.ParseFromString(_layer_bytes("proposal", "Proposal", 201, payload))
    lp.bottom.extend(["b1", "b2"])
    layer = layer_class("Proposal")(lp, [(1, 4, 3, 3), (1, 8, 3, 3), (1, 3)], caffe_pb2.TEST)
    assert layer.feat_stride == 8 and layer.scales == [4.0, 8.0] and len(layer.anchors) == 2


def test_fork_field_numbers_in_our_schema():
    f = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    numbers = {
        n: f[n].number
        for n in (
            "roi_pooling_param",
            "psroi_pooling_param",
            "interp_param",
            "upsample_param",
            "bn_param",
            "shuffle_channel_param",
            "proposal_param",
        )
    }
    assert numbers == {
        "roi_pooling_param": 8266711,
        "psroi_pooling_param": 10002,
        "interp_param": 163,
        "upsample_param": 149,
        "bn_param": 45,
        "shuffle_channel_param": 164,
        "proposal_param": 1000,
    }
    assert f["input_param"].number == 143 and f["embed_param"].number == 137  # BVLC keeps its numbers


def test_unknown_fork_type_hint_lists_the_known_fork_types(tmp_path):
    p = tmp_path / "net.prototxt"
    p.write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }\n'
        'layer { name: "dcn" type: "DeformableConvolution" bottom: "data" top: "out" }\n'
    )
    with pytest.raises(LayerError) as e:
        caffe.Net(str(p), caffe.TEST)
    msg = str(e.value)
    assert "'DeformableConvolution'" in msg and "'dcn'" in msg
    for fork_type in ("Interp", "ROIPooling", "ShuffleChannel", "Upsample"):
        assert fork_type in msg.split("forks' types")[1]
    assert "PSPNet" in msg and "R-FCN" in msg
