"""The GPU's host-mirror semantics of ``.data``/``.diff`` (Caffe's SyncedMemory rule), exercised
on the CPU by making every tensor use host copies instead of views."""

from __future__ import annotations

import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat import blob as blob_mod
from tests.conftest import CAFFE_REF
from tests.test_conformance_layers import CASES, mismatches, replay_case


@pytest.fixture
def mirrored(monkeypatch):
    monkeypatch.setattr(blob_mod, "uses_host_mirror", lambda device: True)


@pytest.mark.parametrize("case", CASES)
def test_layer_cases_match_caffe_through_host_copies(mirrored, case):
    net, ref, backward = replay_case(case)
    fails = mismatches(case, net, ref, backward)
    assert not fails, f"{case}: {fails[:8]}"


def test_solver_with_param_reads_and_writes_between_steps(mirrored, in_dir):
    d = CAFFE_REF / "solvers" / "sgd_step"
    ref = np.load(d / "trajectory.npz")
    with in_dir(d):
        caffe.set_random_seed(7)
        solver = caffe.get_solver("solver.prototxt")
        solver.net.copy_from("init.caffemodel")
        for it in range(1, 11):
            for ps in solver.net.params.values():  # reading must not undo the next update
                for p in ps:
                    _ = p.data.sum() + p.diff.sum()
            solver.step(1)
            if it in (1, 5, 10):
                for name, ps in solver.net.params.items():
                    for i, p in enumerate(ps):
                        np.testing.assert_allclose(p.data, ref[f"iter{it}__{name}__{i}"], rtol=1e-4, atol=1e-6)


def test_numpy_writes_reach_the_device_copy(mirrored, tmp_path):
    p = tmp_path / "n.prototxt"
    p.write_text(
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 } }\n'
    )
    net = caffe.Net(str(p), caffe.TEST)
    net.params["ip"][0].data[...] = 1.0  # written through a host copy
    net.params["ip"][1].data[...] = 0.5
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    net.blobs["x"].data[...] = x
    y = net.forward()["y"]
    np.testing.assert_allclose(y, x.sum(1, keepdims=True) + 0.5 + np.zeros((2, 2)), rtol=1e-6)
    # the device tensor itself holds the written weights
    assert float(net.modules_by_name["ip"].blobs[0].detach().sum()) == pytest.approx(6.0)


def test_a_whole_pass_drops_host_copies_of_the_blobs_it_recomputes(mirrored, tmp_path):
    """A host copy of a computed blob is not sent back before a pass that replaces the blob (on
    a GPU a copy and a wait for nothing); a partial pass that reads the blob still gets it."""
    p = tmp_path / "n.prototxt"
    p.write_text(
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 } }\n'
        'layer { name: "relu" type: "ReLU" bottom: "y" top: "y" }\n'
        'layer { name: "scale" type: "Power" bottom: "y" top: "z" power_param { scale: 2 } }\n'
    )
    net = caffe.Net(str(p), caffe.TEST)
    net.params["ip"][0].data[...] = 1.0
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    net.blobs["x"].data[...] = x
    net.forward()
    handed_out = net.blobs["y"]._data
    net.blobs["y"].data[...] = -7.0  # written into the host copy of a blob the next pass computes
    net.blobs["x"].data[...] = x + 1  # an input: must reach the device
    out = net.forward()
    np.testing.assert_allclose(out["z"], 2 * np.maximum((x + 1).sum(1, keepdims=True) + np.zeros((2, 2)), 0))
    assert float(handed_out.min()) != -7.0, "the host copy of a recomputed blob was copied back"
    assert not blob_mod.host_copies_out() or net.blobs["y"] not in blob_mod._outstanding
    # a pass from the ReLU on reads "y": the written copy goes back first
    net.blobs["y"].data[...] = -3.0
    out = net.forward(start="relu")
    np.testing.assert_allclose(out["z"], np.zeros((2, 2)))
    net.blobs["y"].data[...] = 3.0
    np.testing.assert_allclose(net.forward(start="scale")["z"], np.full((2, 2), 6.0))
