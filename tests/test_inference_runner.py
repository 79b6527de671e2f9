"""The inference runner (caffe_compat/runners/inference.py): whole passes of nets that compute no
gradient run as packed oneDNN convolutions with the in-place BatchNorm/Scale/ReLU folded in. They
must give every blob the layer-by-layer pass gives it, within Caffe's conformance tolerance, and
leave pycaffe's view of the blobs as it was."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.export import onnx as ox
from caffe_compat.runners.eager import EagerRunner
from caffe_compat.runners.inference import IN_PLACE, ConvKernel, InferenceRunner, build_program
from tests.layer_replay import assert_close_scaled as _close

HERE = os.path.dirname(os.path.abspath(__file__))
REF = os.path.join(HERE, "fixtures", "caffe_reference")
NETS = {
    "resnet50": os.path.join(REF, "realworld", "resnet50", "deploy.prototxt"),
    "mobilenet": os.path.join(REF, "realworld", "mobilenet", "deploy.prototxt"),
    "squeezenet": os.path.join(REF, "realworld", "squeezenet11", "deploy.prototxt"),
    "alexnet": os.path.join(REF, "zoo", "bvlc_alexnet", "deploy.prototxt"),
}

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs torch's oneDNN")


def _net(name: str, size: int | None = None) -> caffe.Net:
    net = caffe.Net(NETS[name], caffe.TEST)
    ox.randomize_params(net, seed=1)
    inp = net.inputs[0]
    shape = list(net.blobs[inp].shape)
    shape[0] = 1 if name == "resnet50" else 2  # (ResNet-50's 7×7 pool5 needs 224×224 inputs)
    if size is not None:
        shape[2:] = [size, size]
    net.blobs[inp].reshape(*shape)
    net.reshape()
    return net


def _eager_blobs(net) -> dict[str, np.ndarray]:
    """Every blob after a layer-by-layer pass (the eager runner on the same state)."""
    with torch.no_grad():
        EagerRunner(net._state).forward(0, len(net.plan.steps) - 1)
    return {name: blob.tensor.contiguous().numpy().copy() for name, blob in net.blobs.items()}


@pytest.mark.parametrize(
    "name,size,folded",
    [("resnet50", None, ("BatchNorm", "Scale", "ReLU")), ("mobilenet", 64, ("BatchNorm", "Scale", "ReLU")),
     ("squeezenet", 67, ("ReLU",)), ("alexnet", None, ("ReLU",))],
)  # fmt: skip
def test_every_blob_matches_the_layer_by_layer_pass(name, size, folded):
    net = _net(name, size)
    runner = net._eager
    assert isinstance(runner, InferenceRunner) and runner.applies()
    kernels = [k for k in runner.program() if isinstance(k, ConvKernel)]
    absorbed = {s.layer.type for k in kernels for s in k.folded}
    assert set(folded) <= absorbed, f"{name}: folded {sorted(absorbed)}"
    x = np.random.default_rng(0).standard_normal(net.blobs[net.inputs[0]].shape).astype(np.float32)
    out = net.forward(**{net.inputs[0]: x})
    ours = {b: net.blobs[b].data.copy() for b in net.blobs}
    assert all(net.blobs[b].data.flags.c_contiguous for b in net.blobs)
    net.blobs[net.inputs[0]].data[...] = x
    ref = _eager_blobs(net)
    for b in net.blobs:
        _close(ours[b], ref[b], b)
    for b, v in out.items():
        _close(v, ref[b], b)


def test_relus_after_new_tensors_run_in_place_without_touching_other_blobs():
    """ResNet-50's ReLU after each residual sum, AlexNet's after fc6 and fc7, overwrite the sum's
    and the product's new tensors; the blobs those were computed from keep their values."""
    for name, expected in (("resnet50", "Eltwise"), ("alexnet", "InnerProduct")):
        net = _net(name)
        program = net._eager.program()
        steps = net.plan.steps
        in_place = [s for s, op in zip(steps, program) if op is IN_PLACE]
        assert in_place and all(s.layer.type == "ReLU" for s in in_place)
        makers = {t: s.layer.type for s in steps for t in s.tops if t not in s.bottoms}
        assert expected in {makers[s.bottoms[0]] for s in in_place}
        x = np.random.default_rng(3).standard_normal(net.blobs[net.inputs[0]].shape).astype(np.float32)
        net.forward(**{net.inputs[0]: x})
        ours = {b: net.blobs[b].data.copy() for b in net.blobs}
        net.blobs[net.inputs[0]].data[...] = x
        ref = _eager_blobs(net)
        for b in net.blobs:
            _close(ours[b], ref[b], b)
        if name == "resnet50":  # a residual sum's bottoms: the shortcut and the branch
            assert (ours["res2a_branch2c"] < 0).any() and (ours["res2a"] >= 0).all()


def test_new_weights_are_packed_again():
    net = _net("mobilenet", 32)
    x = np.random.default_rng(1).standard_normal(net.blobs["data"].shape).astype(np.float32)
    first = net.forward(data=x)[net.outputs[0]].copy()
    net.params["conv1"][0].data[...] *= -1.5  # through a pycaffe view
    net.params["conv1/bn"][1].data[...] += 0.25  # a folded BatchNorm's variance
    second = net.forward(data=x)[net.outputs[0]].copy()
    assert not np.allclose(first, second)
    ref = _eager_blobs(net)
    _close(second, ref[net.outputs[0]], net.outputs[0])


@pytest.mark.parametrize("how", ["temporary", "kept", "assigned"])
def test_writes_through_param_data_are_packed_again(how):
    """``param.data`` writes move no version counter (torch's rule); the program still sees them:
    a temporary ``p.data.mul_()``, a write through a ``.data`` tensor kept across passes, and a
    tensor assigned to ``p.data`` then written in place."""
    net = _net("mobilenet", 32)
    conv = net.layer_dict["conv1"].module.blobs[0]  # the torch parameters, as a torch script holds them
    bn_var = net.layer_dict["conv1/bn"].module.blobs[1]
    x = np.random.default_rng(1).standard_normal(net.blobs["data"].shape).astype(np.float32)
    out = net.outputs[0]
    first = net.forward(data=x)[out].copy()
    versions = (conv._version, bn_var._version)
    if how == "temporary":
        conv.data.mul_(-1.5)
        bn_var.data.add_(0.25)
    elif how == "kept":
        w = conv.data
        net.forward(data=x)  # packed again while ``w`` lives: its values are compared from now on
        w.mul_(-1.5)
    else:
        w = conv.detach().clone()
        conv.data = w
        net.forward(data=x)
        w.mul_(-1.5)
    assert (conv._version, bn_var._version) == versions  # nothing a version counter shows
    second = net.forward(data=x)[out].copy()
    assert not np.allclose(first, second)
    _close(second, _eager_blobs(net)[out], out)
    if how == "kept":  # once the kept tensor is gone, the packed weights hold its last values
        del w
        third = net.forward(data=x)[out].copy()
        np.testing.assert_array_equal(third, second)


def test_a_partial_pass_after_it_reads_contiguous_blobs():
    net = _net("squeezenet", 67)
    x = np.random.default_rng(2).standard_normal(net.blobs["data"].shape).astype(np.float32)
    net.forward(data=x)
    assert net._state.channels_last, "the program left no channels-last top: nothing tested"
    full = net.blobs[net.outputs[0]].data.copy()
    # from the layer after the first convolution on: the eager runner reads the stored tops
    start = net._layer_names[2]
    net.forward(start=start)
    assert not net._state.channels_last
    _close(net.blobs[net.outputs[0]].data, full, net.outputs[0])


def test_nets_that_backpropagate_or_observe_stay_eager():
    proto = NETS["squeezenet"]
    assert build_program(caffe.Net(proto, caffe.TEST).plan) is not None
    text = "force_backward: true\n" + open(proto).read()
    path = os.path.join(os.environ.get("PYTEST_TMPDIR", "/tmp"), "squeezenet_fb.prototxt")
    with open(path, "w") as f:
        f.write(text)
    assert build_program(caffe.Net(path, caffe.TEST).plan) is None
    net = _net("squeezenet", 67)
    seen = []
    handle = net._eager.state.plan.steps[1].layer.register_forward_hook(lambda *a: seen.append(1))
    net.forward(data=np.zeros(net.blobs["data"].shape, np.float32))
    handle.remove()
    assert seen == [1]  # a hooked convolution still runs as a module
    assert net._eager.applies()
    assert not net.use_inference_program(False)._eager.applies()


def _cases():
    for folder in ("layers", os.path.join("forks", "layers")):
        root = os.path.join(REF, folder)
        for case in sorted(os.listdir(root)) if os.path.isdir(root) else ():
            if os.path.exists(os.path.join(root, case, "net.prototxt")):
                yield folder, case


def test_layout_neutral_layers_give_the_same_values_for_channels_last_bottoms():
    """``Layer.layout_neutral`` is a promise: on every real-Caffe layer case (BVLC's and the
    forks'), each such layer's forward on channels-last copies of its 4-D bottoms equals its
    forward on the contiguous ones, bit for bit."""
    checked = set()
    for folder, case in _cases():
        d = os.path.join(REF, folder, case)
        ref = np.load(os.path.join(d, "blobs.npz"))
        old = os.getcwd()
        os.chdir(d)
        try:
            caffe.set_random_seed(1)
            net = caffe.Net("net.prototxt", "weights.caffemodel", caffe.TEST)
            for b in net.inputs:
                net.blobs[b].data[...] = ref["data__" + b]
            with torch.no_grad():
                EagerRunner(net._state).forward(0, len(net.plan.steps) - 1)
                for step in net.plan.steps:
                    layer = step.layer
                    bottoms = [blob.tensor.contiguous() for blob in step.bottom_blobs]
                    if not layer.layout_neutral or step.is_input or not any(t.dim() == 4 for t in bottoms):
                        continue
                    if layer.type == "Dropout" and layer.phase == caffe.TRAIN:
                        continue  # (draws a new mask each call)
                    cl = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in bottoms]
                    for a, b in zip(layer.forward(*bottoms), layer.forward(*cl)):
                        assert torch.equal(a, b), f"{case}: layer {step.name!r} ({layer.type})"
                    checked.add(layer.type)
        finally:
            os.chdir(old)
    assert {"ReLU", "Pooling", "Eltwise", "Concat", "Split"} <= checked, sorted(checked)


def test_a_new_thread_count_packs_again():
    """oneDNN chooses the packed weight layout for the thread count too: weights packed for two
    threads and run on one would be reordered at every call."""
    net = _net("squeezenet", 67)
    x = np.random.default_rng(4).standard_normal(net.blobs["data"].shape).astype(np.float32)
    first = net.forward(data=x)[net.outputs[0]].copy()
    kernel = next(k for k in net._eager.program() if isinstance(k, ConvKernel))
    packed = kernel._packed
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        second = net.forward(data=x)[net.outputs[0]].copy()
        assert kernel._packed is not packed
    finally:
        torch.set_num_threads(threads)
    _close(second, first, net.outputs[0])
