"""Every real-Caffe layer case replayed through the whole Net (forward, every blob diff, every
parameter diff), as tests/fixtures/caffe_reference/README.md prescribes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from tests.conftest import CAFFE_REF

RTOL, ATOL = 1e-4, 1e-5
# On a machine with CUDA, CAFFE_COMPAT_TEST_GPU=1 replays every case in GPU mode too.
GPU = bool(os.environ.get("CAFFE_COMPAT_TEST_GPU"))
CASES = sorted(p.name for p in (CAFFE_REF / "layers").iterdir() if p.is_dir())


def _close(ours, ref) -> bool:
    ours = np.asarray(ours)
    if ours.shape != ref.shape and ours.size == ref.size:
        return False  # a shape difference is a failure, not something to reshape away
    return ours.shape == ref.shape and np.allclose(ours, ref, rtol=RTOL, atol=ATOL)


def replay_case(case: str, gpu: bool = False, channels_last: bool = False, folder: str = "layers"):
    """Build the case's net as the README says, set its inputs and top diffs from Caffe's arrays,
    run forward (and backward); returns ``(net, reference arrays, whether backward ran)``.
    ``channels_last``: the net's 4-D parameters in channels_last (the speed opt-in). ``folder``:
    the fixtures' folder of the case (``forks/layers`` for the forks' cases)."""
    d = CAFFE_REF / folder / case
    ref = np.load(d / "blobs.npz")
    phase = caffe.TRAIN if case == "batchnorm_train" else caffe.TEST
    backward = not case.startswith("forward_only")
    old = os.getcwd()
    os.chdir(d)
    if gpu:
        caffe.set_mode_gpu()
    try:
        caffe.set_random_seed(1)
        net = caffe.Net("net.prototxt", "weights.caffemodel", phase)
        if channels_last:
            net.to(memory_format=torch.channels_last)
        for b in net.inputs:
            net.blobs[b].data[...] = ref["data__" + b]
        out = net.forward()
        assert all(isinstance(v, np.ndarray) for v in out.values())
        if backward:
            for k in ref.files:
                if k.startswith("topdiff__"):
                    net.blobs[k[len("topdiff__") :]].diff[...] = ref[k]
            net.backward()
    finally:
        os.chdir(old)
        caffe.set_mode_cpu()
    return net, ref, backward


def mismatches(case: str, net, ref, backward: bool) -> list[str]:
    """Every reference array of the case that ours does not match, with its largest error."""
    fails = []
    checked = 0
    for k in ref.files:
        kind, _, rest = k.partition("__")
        if kind == "topdiff" or (not backward and kind in ("diff", "pdiff")):
            continue
        if kind in ("data", "diff"):
            assert rest in net.blobs, f"{case}: blob {rest!r} missing from net.blobs"
            ours = getattr(net.blobs[rest], kind)
        else:
            layer, _, i = rest.rpartition("__")
            assert layer in net.params, f"{case}: layer {layer!r} missing from net.params"
            p = net.params[layer][int(i)]
            ours = p.data if kind == "param" else p.diff
        checked += 1
        if not _close(ours, ref[k]):
            o = np.asarray(ours, dtype=np.float64)
            r = ref[k].astype(np.float64)
            err = float(np.max(np.abs(o - r))) if o.shape == r.shape else f"shape {o.shape} vs {r.shape}"
            fails.append(f"{k} (max abs err {err})")
    assert checked > 0
    return fails


@pytest.mark.parametrize("case", CASES)
def test_layer_case_matches_caffe(case):
    net, ref, backward = replay_case(case, gpu=GPU)
    fails = mismatches(case, net, ref, backward)
    assert not fails, f"{case}: {len(fails)} arrays differ from real Caffe: {fails[:8]}"


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("deconv")])
def test_deconv_case_matches_caffe_by_phases(case, monkeypatch):
    """Deconvolution's phase path (one convolution + pixel shuffle), forced (the cases are small,
    one is depthwise), stays within real Caffe's tolerance, forward and backward."""
    from caffe_compat.layers import conv

    used = []
    real = conv.deconv2d_by_phases
    monkeypatch.setattr(conv.DeconvolutionLayer, "_phases_pay", lambda self, x: True)
    monkeypatch.setattr(conv, "deconv2d_by_phases", lambda *a, **k: used.append(1) or real(*a, **k))
    net, ref, backward = replay_case(case)
    assert used
    fails = mismatches(case, net, ref, backward)
    assert not fails, f"{case} (by phases): {len(fails)} arrays differ from real Caffe: {fails[:8]}"


@pytest.mark.parametrize("case", CASES)
def test_layer_case_matches_caffe_in_channels_last(case):
    """The channels_last opt-in keeps every case within real Caffe's tolerance."""
    net, ref, backward = replay_case(case, gpu=GPU, channels_last=True)
    fails = mismatches(case, net, ref, backward)
    assert not fails, f"{case} (channels_last): {len(fails)} arrays differ from real Caffe: {fails[:8]}"
