"""pycaffe's imperative semantics: the blobs are the state (BVLC/caffe src/caffe/net.cpp
``ForwardFromTo``/``BackwardFromTo`` read and write the blobs; python/caffe/_caffe.cpp hands out
``blob.data``/``blob.diff`` as NumPy arrays over the blob's own memory).

- an array held from ``.data``/``.diff`` is a view of storage that lives as long as the blob:
  forward and backward write into it;
- ``backward()`` is a function of what the blobs hold when it is called (data, and the diffs the
  user set), with or without a forward before it, over any ``start``/``end`` range;
- ``clear_param_diffs()`` zeroes the diffs in place (Caffe's ``ClearParamDiffs``).

The layer cases are real Caffe's arrays (tests/fixtures/caffe_reference/layers): backward from the
blobs must give Caffe's diffs without the autograd graph of a forward.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from tests.conftest import CAFFE_REF

RTOL, ATOL = 1e-4, 1e-5  # the fixtures' tolerance
CASES = sorted(p.name for p in (CAFFE_REF / "layers").iterdir() if p.is_dir() and not p.name.startswith("forward_only"))
# Caffe's in-place BatchNorm/Scale keep a copy of what they read in Forward (x_norm_, temp_): their
# backward without a forward has nothing to read, in Caffe too
_NEEDS_FORWARD = {"BatchNorm", "Scale", "Bias", "Python", "Dropout"}


def _open(case: str):
    d = CAFFE_REF / "layers" / case
    ref = np.load(d / "blobs.npz")
    phase = caffe.TRAIN if case == "batchnorm_train" else caffe.TEST
    old = os.getcwd()
    os.chdir(d)
    try:
        caffe.set_random_seed(1)
        net = caffe.Net("net.prototxt", "weights.caffemodel", phase)
    finally:
        os.chdir(old)
    return net, ref


def _set_topdiffs(net, ref) -> None:
    for k in ref.files:
        if k.startswith("topdiff__"):
            net.blobs[k[len("topdiff__") :]].diff[...] = ref[k]


def _diff_mismatches(net, ref) -> list[str]:
    fails = []
    for k in ref.files:
        kind, _, rest = k.partition("__")
        if kind == "diff":
            ours = net.blobs[rest].diff
        elif kind == "pdiff":
            layer, _, i = rest.rpartition("__")
            ours = net.params[layer][int(i)].diff
        else:
            continue
        if ours.shape != ref[k].shape or not np.allclose(ours, ref[k], rtol=RTOL, atol=ATOL):
            fails.append(k)
    return fails


@pytest.mark.parametrize("case", CASES)
def test_ranged_backward_after_forward_matches_caffe(case):
    """``backward(start=last, end=first)`` (Caffe's BackwardFromTo over the whole range: each
    layer from the blobs) gives every diff real Caffe gave."""
    net, ref = _open(case)
    for b in net.inputs:
        net.blobs[b].data[...] = ref["data__" + b]
    net.forward()
    _set_topdiffs(net, ref)
    names = list(net._layer_names)
    net.backward(start=names[-1], end=names[0])
    fails = _diff_mismatches(net, ref)
    assert not fails, f"{case}: {fails[:8]}"


def _backward_needs_forward(net) -> bool:
    return any(layer.type in _NEEDS_FORWARD for layer in net.layers) and any(
        set(net._bottoms[i]) & set(net._tops[i]) for i in range(len(net.layers))
    )


@pytest.mark.parametrize("case", CASES)
def test_backward_without_forward_reads_the_blobs(case):
    """No forward at all: every blob's data set from Caffe's arrays (as a pycaffe script may),
    the top diffs set, ``backward()``: Caffe's diffs (its Backward reads only the blobs)."""
    net, ref = _open(case)
    if case == "batchnorm_train" or _backward_needs_forward(net):
        pytest.skip("in-place BatchNorm/Scale/Dropout read what their forward kept, in Caffe too")
    for k in ref.files:
        if k.startswith("data__"):
            net.blobs[k[len("data__") :]].data[...] = ref[k]
    _set_topdiffs(net, ref)
    net.backward()
    fails = _diff_mismatches(net, ref)
    assert not fails, f"{case}: {fails[:8]}"


NET = """
name: "state"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "act" type: "TanH" bottom: "ip1" top: "act" }
layer { name: "ip2" type: "InnerProduct" bottom: "act" top: "ip2"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
force_backward: true
"""


@pytest.fixture
def net(tmp_path):
    p = tmp_path / "net.prototxt"
    p.write_text(NET)
    caffe.set_random_seed(3)
    return caffe.Net(str(p), caffe.TEST)


def _np_forward(net, x):
    w1, b1 = net.params["ip1"][0].data, net.params["ip1"][1].data
    w2, b2 = net.params["ip2"][0].data, net.params["ip2"][1].data
    act = np.tanh(x @ w1.T + b1)
    return act, act @ w2.T + b2


def test_held_arrays_see_the_next_forward(net):
    """pycaffe's net_surgery pattern: arrays fetched once, then forward again with new inputs."""
    rng = np.random.default_rng(0)
    data, act, out = net.blobs["data"].data, net.blobs["act"].data, net.blobs["ip2"].data
    for _ in range(3):
        x = rng.standard_normal((2, 3)).astype(np.float32)
        data[...] = x
        net.forward()
        want_act, want_out = _np_forward(net, x)
        np.testing.assert_allclose(act, want_act, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
        assert np.shares_memory(out, net.blobs["ip2"].data)


def test_held_diff_arrays_see_the_next_backward(net):
    rng = np.random.default_rng(1)
    ddata, dw = net.blobs["data"].diff, net.params["ip1"][0].diff
    for _ in range(2):
        x = rng.standard_normal((2, 3)).astype(np.float32)
        g = rng.standard_normal((2, 2)).astype(np.float32)
        net.blobs["data"].data[...] = x
        net.forward()
        net.clear_param_diffs()
        net.blobs["ip2"].diff[...] = g
        net.backward()
        act, _ = _np_forward(net, x)
        dact = g @ net.params["ip2"][0].data
        dip1 = dact * (1 - act**2)
        np.testing.assert_allclose(ddata, dip1 @ net.params["ip1"][0].data, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dw, dip1.T @ x, rtol=1e-5, atol=1e-6)


def test_backward_reads_data_written_after_the_forward(net):
    """Caffe's backward reads the blobs as they are now: an intermediate written between forward
    and backward is what ip2's weight gradient multiplies."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 6
    net.blobs["data"].data[...] = x
    net.forward()
    new_act = np.full((2, 4), 0.25, np.float32)
    net.blobs["act"].data[...] = new_act
    g = np.array([[1.0, -2.0], [0.5, 3.0]], np.float32)
    net.blobs["ip2"].diff[...] = g
    net.clear_param_diffs()
    net.backward()
    np.testing.assert_allclose(net.params["ip2"][0].diff, g.T @ new_act, rtol=1e-6)
    # TanH's backward reads its top (Caffe: 1 - top²), now 0.25 everywhere
    dact = g @ net.params["ip2"][0].data
    np.testing.assert_allclose(net.blobs["ip1"].diff, dact * (1 - 0.25**2), rtol=1e-5, atol=1e-6)


def test_backward_over_a_range_sets_the_bottom_diff(net):
    x = np.ones((2, 3), np.float32)
    net.blobs["data"].data[...] = x
    net.forward()
    g = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    net.blobs["ip2"].diff[...] = g
    out = net.backward(start="ip2", end="ip2")
    assert list(out) == ["act"]
    np.testing.assert_allclose(out["act"], g @ net.params["ip2"][0].data, rtol=1e-6)
    # then the rest, from what the blobs hold (act's diff as ip2 left it)
    net.backward(start="act", end="ip1")
    act, _ = _np_forward(net, x)
    want = (g @ net.params["ip2"][0].data * (1 - act**2)) @ net.params["ip1"][0].data
    np.testing.assert_allclose(net.blobs["data"].diff, want, rtol=1e-5, atol=1e-6)


def test_backward_with_no_forward_on_a_fresh_net(net):
    """A net just built: backward from the blobs' zeros and the diff set on the output."""
    g = np.ones((2, 2), np.float32)
    net.blobs["ip2"].diff[...] = g
    out = net.backward()
    # act = 0 -> TanH' = 1; ip1's diff = g W2, data's = g W2 W1
    w1, w2 = net.params["ip1"][0].data, net.params["ip2"][0].data
    np.testing.assert_allclose(out["data"], g @ w2 @ w1, rtol=1e-5, atol=1e-6)


def test_clear_param_diffs_zeroes_held_arrays_in_place(net):
    d = net.params["ip1"][0].diff
    net.blobs["data"].data[...] = 1.0
    net.forward()
    net.blobs["ip2"].diff[...] = 1.0
    net.backward()
    assert np.abs(d).sum() > 0
    net.clear_param_diffs()
    assert np.abs(d).sum() == 0
    assert np.shares_memory(d, net.params["ip1"][0].diff)


def test_forward_backward_keeps_a_held_diff_array(net, tmp_path):
    """The solvers' pass adds into a diff whose view was handed out (not a new tensor)."""
    d = net.params["ip2"][0].diff
    net.clear_param_diffs()
    net.blobs["data"].data[...] = 1.0
    net.forward()
    net.blobs["ip2"].diff[...] = 1.0
    net.backward()
    np.testing.assert_allclose(d, net.params["ip2"][0].diff)
    assert np.abs(d).sum() > 0


def test_held_arrays_die_at_a_reshape_as_in_caffe(net):
    """Caffe reallocates on a reshape that grows the blob; a new view is needed then."""
    net.blobs["data"].reshape(5, 3)
    net.reshape()
    net.blobs["data"].data[...] = 1.0
    out = net.forward()
    assert out["ip2"].shape == (5, 2)
    assert net.blobs["ip2"].data.shape == (5, 2)


def test_solver_loop_with_a_held_loss_array(tmp_path):
    """``solver.step`` with an array held from the loss blob: it shows each iteration's loss."""
    (tmp_path / "net.prototxt").write_text(
        """
name: "t"
layer { name: "data" type: "DummyData" top: "data" top: "target"
        dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 }
                           data_filler { type: "gaussian" } data_filler { type: "gaussian" } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "target" top: "loss" }
"""
    )
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 5\ndisplay: 0\n'
    )
    caffe.set_random_seed(5)
    solver = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    held = solver.net.blobs["loss"].data
    seen = []
    for _ in range(3):
        solver.step(1)
        seen.append(float(held))
        assert float(held) == pytest.approx(float(solver.net.blobs["loss"].data.copy()))
    assert len(set(seen)) == 3


def test_diffs_stay_views_of_the_parameters_storage(net):
    w = net.params["ip1"][0].data
    before = w.copy()
    with torch.no_grad():
        net.modules_by_name["ip1"].blobs[0].mul_(2)
    np.testing.assert_allclose(w, before * 2)


def test_layer_blobs_are_the_params_blobs(net):
    """pycaffe (_caffe.cpp): ``Layer.blobs`` is the layer's vector of Blobs, the same objects as
    ``net.params[name]``, with NumPy ``data``/``diff``."""
    names = list(net._layer_names)
    for i, name in enumerate(names):
        layer = net.layers[i]
        assert layer.type == net.layer_dict[name].type
        if name in net.params:
            assert len(layer.blobs) == len(net.params[name])
            for a, b in zip(layer.blobs, net.params[name]):
                assert a is b
                assert isinstance(a.diff, np.ndarray) and isinstance(a.data, np.ndarray)
        else:
            assert list(layer.blobs) == []
    net.layers[names.index("ip1")].blobs[0].data[...] = 0.5
    np.testing.assert_array_equal(net.params["ip1"][0].data, 0.5)


def test_diff_written_by_hand_after_a_clear_is_what_the_update_applies(tmp_path):
    """pycaffe: clear_param_diffs(), write one diff by hand, apply_update(): Caffe's SGD moves that
    parameter by lr x diff and the others not at all (their diffs are zeros, not missing)."""
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.5\nlr_policy: "fixed"\nmomentum: 0\nmax_iter: 1\n'
    )
    caffe.set_random_seed(4)
    solver = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    net = solver.net
    before = {n: [b.data.copy() for b in bs] for n, bs in net.params.items()}
    net.clear_param_diffs()
    net.params["ip2"][0].diff[...] = 2.0
    solver.apply_update()
    np.testing.assert_allclose(net.params["ip2"][0].data, before["ip2"][0] - 0.5 * 2.0, rtol=1e-6)
    for n, bs in net.params.items():
        for i, b in enumerate(bs):
            if (n, i) != ("ip2", 0):
                np.testing.assert_array_equal(b.data, before[n][i])
