"""Replay one layer of a real-Caffe fixture net on Caffe's own bottoms: tops, bottom diffs and
parameter diffs against the fixture's arrays, at the fixture README's tolerance; and that
tolerance for comparing two ways of computing the same blobs (``assert_close_scaled``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format

from caffe_compat.layers import layer_class
from caffe_compat.proto import caffe_pb2

FIXTURES = Path(__file__).parent / "fixtures" / "caffe_reference" / "layers"
FIX_RTOL, FIX_ATOL = 1e-4, 1e-5  # the fixture README's tolerance


def assert_close_scaled(a, b, what: str) -> None:
    """``a`` equals ``b`` to float32 rounding at the fixture README's tolerance, the absolute part
    relative to ``b``'s scale (at least 1)."""
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, rtol=FIX_RTOL, atol=FIX_ATOL * scale, err_msg=what)


def load_case(case: str):
    net = caffe_pb2.NetParameter()
    text_format.Parse((FIXTURES / case / "net.prototxt").read_text(), net)
    weights = caffe_pb2.NetParameter()
    weights.ParseFromString((FIXTURES / case / "weights.caffemodel").read_bytes())
    blobs = dict(np.load(FIXTURES / case / "blobs.npz"))
    return net, {lp.name: lp for lp in weights.layer}, blobs


def consumer_names(net) -> dict[tuple[str, int], str]:
    """The blob each (layer, bottom index) reads in Caffe's net with Split layers inserted
    (no in-place layers in the cases replayed here)."""
    producer, consumers = {}, {}
    for lp in net.layer:
        for j, b in enumerate(lp.bottom):
            consumers.setdefault(b, []).append((lp.name, j))
        for k, t in enumerate(lp.top):
            producer[t] = (lp.name, k)
    names = {}
    for b, cons in consumers.items():
        for k, key in enumerate(cons):
            names[key] = b if len(cons) == 1 else f"{b}_{producer[b][0]}_{producer[b][1]}_split_{k}"
    return names


def replay_layer(case: str, layer_name: str, backward: bool = True) -> None:
    """Run one layer of a fixture net on Caffe's bottoms and compare tops, bottom diffs, param diffs."""
    net, weights, blobs = load_case(case)
    lp = next(lp for lp in net.layer if lp.name == layer_name)
    names = consumer_names(net)
    bottoms = [torch.tensor(blobs[f"data__{b}"], requires_grad=backward) for b in lp.bottom]
    layer = layer_class(lp.type)(
        lp, [tuple(t.shape) for t in bottoms], lp.phase if lp.HasField("phase") else caffe_pb2.TEST
    )
    for p, bp in zip(layer.blobs, weights[layer_name].blobs, strict=True):
        p.data.copy_(torch.tensor(np.array(bp.data, np.float32).reshape(tuple(bp.shape.dim))))
    tops = layer(*bottoms)
    assert layer.top_shapes([tuple(t.shape) for t in bottoms]) == [tuple(blobs[f"data__{t}"].shape) for t in lp.top]
    for t, name in zip(tops, lp.top, strict=True):
        np.testing.assert_allclose(
            t.detach().numpy(), blobs[f"data__{name}"], rtol=FIX_RTOL, atol=FIX_ATOL, err_msg=name
        )
    if not backward:
        return
    outs = [(t, torch.tensor(blobs[f"diff__{n}"])) for t, n in zip(tops, lp.top) if t.requires_grad]
    torch.autograd.backward([t for t, _ in outs], [g for _, g in outs])
    for j, (t, b) in enumerate(zip(bottoms, lp.bottom)):
        ref = blobs[f"diff__{names[(layer_name, j)]}"]
        got = t.grad.numpy() if t.grad is not None else np.zeros_like(ref)
        np.testing.assert_allclose(got, ref, rtol=FIX_RTOL, atol=FIX_ATOL, err_msg=f"diff of bottom {b}")
    for i, p in enumerate(layer.blobs):
        np.testing.assert_allclose(p.grad.numpy(), blobs[f"pdiff__{layer_name}__{i}"], rtol=FIX_RTOL, atol=FIX_ATOL)
