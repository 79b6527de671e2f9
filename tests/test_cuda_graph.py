"""Training passes replayed from a CUDA graph (``Net.use_cuda_graph``, ``Solver.cuda_graph``).

On the CPU a stand-in for ``torch.cuda.CUDAGraph`` re-runs the recorded pass and writes its
results into the tensors of the capture, as a replay does: the bookkeeping around the graph
(inputs copied into the graph's tensors, gradients handed over or added, the blobs bound to the
graph's tensors, captures again) is checked against eager passes. The real graphs: the CUDA tests
at the end (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat import blob as blob_mod
from caffe_compat import mode
from caffe_compat.errors import NetError, SolverError
from caffe_compat.net import Net
from caffe_compat.proto import caffe_pb2
from caffe_compat.solvers import SGDSolver
from caffe_compat.solvers.base import LossScaler

# conv, ReLU in place, LRN, max pooling, InnerProduct: between a data layer and a loss (NET) or
# an Input and a Softmax (DEPLOY)
LAYERS = """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "norm" type: "LRN" bottom: "conv" top: "norm" lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 } }
layer { name: "pool" type: "Pooling" bottom: "norm" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
"""

NET = (
    """
name: "g"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 dim: 9 dim: 9 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "uniform" min: 0 max: 2.99 } } }
"""
    + LAYERS
    + 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n'
)

INPUT_NET = """
name: "h"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 5 } } }
layer { name: "t" type: "Input" top: "t" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""


class ReplayingGraph:
    """A CPU stand-in for a CUDA graph: the capture runs the pass once (the tensors it makes
    become the graph's), a replay runs it again and copies its results into those tensors."""

    instances: list[ReplayingGraph] = []

    def __init__(self, device):
        self.replays = 0
        ReplayingGraph.instances.append(self)

    def capture(self, body, collect):
        self.body, self.collect = body, collect
        with torch.random.fork_rng(devices=[]):  # a capture draws no random numbers (Dropout's come at replays)
            result = body()
        self.tensors = collect(result)
        return result

    def replay(self):
        new = self.collect(self.body())
        with torch.no_grad():
            for old, t in zip(self.tensors, new):
                if old is not t:
                    old.copy_(t)
        self.replays += 1


def stand_in_graphs(monkeypatch) -> list:
    """Make ``Net.use_cuda_graph`` build its graphs with the ``ReplayingGraph`` stand-in (for the
    tools and solvers that call it); returns the nets it turned graphs on for, in order."""
    real, graphed = Net.use_cuda_graph, []

    def use(self, enable=True, warmup=2, graph_factory=None):
        if enable:
            graphed.append(self)
        return real(self, enable, warmup, ReplayingGraph)

    monkeypatch.setattr(Net, "use_cuda_graph", use)
    return graphed


def _solver(tmp_path, graphed: bool, iter_size: int = 1, seed: int = 5):
    net_file = tmp_path / "net.prototxt"
    net_file.write_text(NET)
    sp = caffe_pb2.SolverParameter(
        net=str(net_file), base_lr=0.05, lr_policy="step", gamma=0.5, stepsize=3, momentum=0.9,
        weight_decay=1e-3, max_iter=100, display=0, iter_size=iter_size, random_seed=seed,
    )  # fmt: skip
    solver = SGDSolver(sp, source="<test>")
    if graphed:
        solver.net.use_cuda_graph(True, warmup=2, graph_factory=ReplayingGraph)
    return solver


def _state(solver):
    return [p.detach().clone() for p in solver.net.learnable_params] + [h.clone() for h in solver.history]


@pytest.mark.parametrize("iter_size", [1, 2])
def test_graphed_training_equals_eager_bit_for_bit(tmp_path, iter_size):
    losses = {}
    states = {}
    for graphed in (False, True):
        solver = _solver(tmp_path, graphed, iter_size)
        seen = []
        solver.loss_observers.append(lambda it, loss, seen=seen: seen.append(loss))
        solver.step(7)
        losses[graphed], states[graphed] = seen, _state(solver)
        if graphed:
            g = solver.net._graphed
            assert g.captures == 1
            assert ReplayingGraph.instances[-1].replays == 7 * iter_size - 2  # after 2 eager passes
            diffs = {n: [p.diff.copy() for p in ps] for n, ps in solver.net.params.items()}
        else:
            eager_diffs = {n: [p.diff.copy() for p in ps] for n, ps in solver.net.params.items()}
    assert losses[True] == losses[False]
    for a, b in zip(states[True], states[False]):
        assert torch.equal(a, b)
    for n in diffs:  # Caffe's diff after the update (the update value)
        for a, b in zip(diffs[n], eager_diffs[n]):
            np.testing.assert_array_equal(a, b)


def test_graphed_bf16_training_equals_eager(tmp_path):
    """Under bf16 autocast the captured pass runs in autocast as the eager one (outputs made
    float32 again inside the graph): the same trajectory."""
    mode.set_precision("bf16")
    try:
        states, losses = {}, {}
        for graphed in (False, True):
            solver = _solver(tmp_path, graphed)
            seen = []
            solver.loss_observers.append(lambda it, loss, seen=seen: seen.append(loss))
            solver.step(5)
            states[graphed], losses[graphed] = _state(solver), seen
            if graphed:
                assert solver.net._graphed.captures == 1
                assert solver.net.blobs["loss"].data.dtype == np.float32
    finally:
        mode.set_precision("fp32")
    assert losses[True] == losses[False]
    for a, b in zip(states[True], states[False]):
        assert torch.equal(a, b)


def test_blobs_after_a_graphed_pass_show_that_pass(tmp_path):
    """The net's blobs are the graph's tensors after a replay, even after an eager pass
    (debug_info runs eagerly) rebound them; the values equal an eager net's, pass for pass."""
    seen = {}
    for graphed in (False, True):
        solver = _solver(tmp_path, graphed)
        seen[graphed] = []
        for it in range(6):
            solver.net.set_debug_info(it == 4)
            solver.net.clear_param_diffs()
            solver.net.forward_backward()
            seen[graphed].append({n: solver.net.blobs[n].data.copy() for n in ("data", "conv", "norm", "ip", "loss")})
            if graphed and it == 4:
                assert solver.net._graphed.captures == 1  # the eager pass did not capture
    for it, (a, b) in enumerate(zip(seen[True], seen[False])):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"pass {it}, blob {name}")


@pytest.mark.parametrize("clear", [True, False])
def test_diff_views_held_across_graphed_passes_show_each_pass(tmp_path, clear):
    """A diff array held from ``net.params[...][i].diff`` is a view of the diff's storage: after
    each replayed pass it shows that pass's diff (after a clear, or accumulated without one), as
    in an eager net; the solver's trajectory with such views held is the eager one."""
    seen = {}
    for graphed in (False, True):
        solver = _solver(tmp_path, graphed)
        net = solver.net
        held = [p.diff for ps in net.params.values() for p in ps]
        seen[graphed] = []
        for _ in range(5):
            if clear:
                net.clear_param_diffs()
            net.forward_backward()
            fresh = [p.diff for ps in net.params.values() for p in ps]
            for h, f in zip(held, fresh):
                np.testing.assert_array_equal(h, f)
            seen[graphed].append([h.copy() for h in held])
        if graphed:
            assert net._graphed.captures == 1
        solver.step(4)
        seen[graphed].append([h.copy() for h in held] + [p.detach().clone().numpy() for p in net.learnable_params])
    for a, b in zip(seen[True], seen[False]):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_inputs_written_through_host_copies_reach_the_graph(tmp_path, monkeypatch):
    """Input blobs written through pycaffe's host copies (a GPU's ``.data``), a reshape that
    captures again, and diffs that accumulate without a clear, as in eager passes."""
    monkeypatch.setattr(blob_mod, "uses_host_mirror", lambda device: True)
    p = tmp_path / "h.prototxt"
    p.write_text(INPUT_NET)
    rng = np.random.default_rng(0)
    caffe.set_random_seed(3)
    eager = caffe.Net(str(p), caffe.TRAIN)
    caffe.set_random_seed(3)
    graphed = caffe.Net(str(p), caffe.TRAIN).use_cuda_graph(True, warmup=1, graph_factory=ReplayingGraph)
    for it in range(8):
        if it == 5:
            for n in (eager, graphed):
                n.blobs["x"].reshape(3, 5)
                n.blobs["t"].reshape(3, 3)
                n.reshape()
        shape = eager.blobs["x"].shape
        x = rng.standard_normal(shape).astype(np.float32)
        t = rng.standard_normal((shape[0], 3)).astype(np.float32)
        losses = []
        for n in (eager, graphed):
            if it % 3 != 2:  # every third pass adds to the previous pass's diffs
                n.clear_param_diffs()
            n.blobs["x"].data[...] = x
            n.blobs["t"].data[...] = t
            losses.append(n.forward_backward())
        assert losses[0] == losses[1]
        for a, b in zip(eager.params["ip"], graphed.params["ip"]):
            np.testing.assert_array_equal(a.diff, b.diff)
        np.testing.assert_array_equal(eager.blobs["y"].data, graphed.blobs["y"].data)
        # one eager warm-up pass, the capture at pass 1; the new shape runs eagerly once (pass 5:
        # a layer's per-shape state is made outside a capture), then captures again (pass 6)
        assert graphed._graphed.captures == (0 if it < 1 else 1 if it < 6 else 2), it


DEPLOY = (
    'name: "d"\n'
    'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }\n'
    + LAYERS
    + 'layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }\n'
)


def test_graphed_forward_equals_eager(tmp_path, monkeypatch):
    """pycaffe's whole ``forward()`` replayed from its own graph (inputs through host copies, a
    reshape capturing again); partial passes stay eager; ``backward()`` after a replayed forward
    backpropagates from the blobs."""
    monkeypatch.setattr(blob_mod, "uses_host_mirror", lambda device: True)
    p = tmp_path / "d.prototxt"
    p.write_text("force_backward: true\n" + DEPLOY)
    caffe.set_random_seed(2)
    eager = caffe.Net(str(p), caffe.TEST)
    caffe.set_random_seed(2)
    graphed = caffe.Net(str(p), caffe.TEST).use_cuda_graph(True, warmup=1, graph_factory=ReplayingGraph)
    rng = np.random.default_rng(1)
    for it in range(6):
        if it == 4:
            for n in (eager, graphed):
                n.blobs["data"].reshape(3, 3, 9, 9)
        x = rng.standard_normal(eager.blobs["data"].shape).astype(np.float32)
        a, b = eager.forward(data=x), graphed.forward(data=x)
        np.testing.assert_array_equal(a["prob"], b["prob"])
        np.testing.assert_array_equal(eager.blobs["pool"].data, graphed.blobs["pool"].data)
    assert graphed._graphed.captures == 2
    # backward() after a replayed forward reads the blobs (each layer recomputed from them), as
    # Caffe's backward does: the eager net's diffs
    g = rng.standard_normal(eager.blobs["prob"].shape).astype(np.float32)
    want = eager.backward(prob=g)["data"]
    assert np.abs(want).sum() > 0
    np.testing.assert_allclose(graphed.backward(prob=g)["data"], want, rtol=1e-5, atol=1e-7)
    captures = graphed._graphed.captures
    out = graphed.forward(end="pool")  # a partial pass: eager, and backward() works after it
    np.testing.assert_array_equal(out["pool"], eager.forward(end="pool")["pool"])
    assert graphed._graphed.captures == captures
    graphed.blobs["pool"].diff[...] = 1.0
    assert set(graphed.backward(start="pool")) == {"data"}  # runs (a deploy net's diffs are all zero)


@pytest.mark.parametrize("name", ["cifar10_quick", "lenet", "mobilenet", "squeezenet11", "resnet50"])
def test_real_world_deploy_nets_graph_their_forward(name):
    """Real-world deploy nets (BatchNorm/Scale, depthwise convolutions, Concat, Split, in-place
    layers): a replayed forward gives the eager outputs, bit for bit, for new inputs each pass."""
    from tests.conftest import CAFFE_REF

    deploy = str(CAFFE_REF / "realworld" / name / "deploy.prototxt")
    nets = []
    for graphed in (False, True):
        caffe.set_random_seed(9)
        net = caffe.Net(deploy, caffe.TEST)
        # the reference: every layer's own forward, the kernels the graph replays
        nets.append(
            net.use_cuda_graph(True, warmup=1, graph_factory=ReplayingGraph)
            if graphed
            else net.use_inference_program(False)
        )
    rng = np.random.default_rng(0)
    for _ in range(3):
        inputs = {b: rng.standard_normal(nets[0].blobs[b].shape).astype(np.float32) for b in nets[0].inputs}
        outs = [net.forward(**inputs) for net in nets]
        for k in outs[0]:
            np.testing.assert_array_equal(outs[1][k], outs[0][k], err_msg=f"{name}: {k}")
    assert nets[1]._graphed.captures == 1


def test_a_train_net_keeps_one_graph_per_kind_of_pass(tmp_path):
    """``forward()`` and ``forward_backward()`` of one net: two graphs, each equal to eager."""
    seen = {}
    for graphed in (False, True):
        solver = _solver(tmp_path, graphed)
        net = solver.net
        seen[graphed] = []
        for _ in range(4):
            net.clear_param_diffs()
            seen[graphed].append(net.forward_backward())
            seen[graphed].append(float(net.forward()["loss"]))
        if graphed:
            assert net._graphed.captures == 2
    assert seen[True] == seen[False]


def test_a_parameter_given_new_storage_captures_again(tmp_path):
    states = {}
    for graphed in (False, True):
        s = _solver(tmp_path, graphed)
        s.step(4)
        w = s.net.modules_by_name["ip"].blobs[0]
        w.data = w.data.clone()  # new storage (as a restore or .to() can give)
        s.step(3)
        states[graphed] = _state(s)
        if graphed:
            assert s.net._graphed.captures == 2
    for a, b in zip(states[True], states[False]):
        assert torch.equal(a, b)


def test_layers_a_graph_cannot_replay_are_refused(tmp_path, monkeypatch):
    late = tmp_path / "late.prototxt"
    late.write_text(
        INPUT_NET + 'layer { name: "late" type: "DummyData" top: "z" dummy_data_param { shape { dim: 1 } } }\n'
    )
    with pytest.raises(NetError, match=r"layer 'late' \(DummyData\) has no bottoms but comes after"):
        caffe.Net(str(late), caffe.TRAIN).use_cuda_graph()
    (tmp_path / "graph_py_layer.py").write_text(
        "import caffe\n"
        "class L(caffe.Layer):\n"
        "    def setup(self, bottom, top): pass\n"
        "    def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)\n"
        "    def forward(self, bottom, top): top[0].data[...] = bottom[0].data\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CAFFE_COMPAT_ALLOW_PYTHON_LAYERS", "1")
    py = tmp_path / "py.prototxt"
    py.write_text(
        INPUT_NET.replace(
            'layer { name: "loss"',
            'layer { name: "py" type: "Python" bottom: "y" top: "y2" '
            'python_param { module: "graph_py_layer" layer: "L" } }\nlayer { name: "loss"',
        )
    )
    with pytest.raises(NetError, match=r"layer 'py' \(Python\) runs Python code of its own, which would happen once"):
        caffe.Net(str(py), caffe.TRAIN).use_cuda_graph()
    out = tmp_path / "out.prototxt"
    out.write_text(
        INPUT_NET + 'layer { name: "save" type: "HDF5Output" bottom: "y" bottom: "t" '
        f'hdf5_output_param {{ file_name: "{tmp_path / "o.h5"}" }} }}\n'
    )
    with pytest.raises(NetError, match=r"layer 'save' \(HDF5Output\) writes its bottoms to a file"):
        caffe.Net(str(out), caffe.TRAIN).use_cuda_graph()


def test_what_a_graph_needs_is_checked_per_pass(tmp_path):
    p = tmp_path / "h.prototxt"
    p.write_text(INPUT_NET)
    net = caffe.Net(str(p), caffe.TRAIN).use_cuda_graph()  # the real graphs: need a CUDA device
    with pytest.raises(NetError, match="CUDA graphs need the net on a CUDA device"):
        net.forward_backward()
    net.use_cuda_graph(graph_factory=ReplayingGraph)
    with pytest.raises(NetError, match="loss scale 8.0"):
        net.forward_backward(loss_scale=8.0)
    with pytest.raises(NetError, match="Net.compile exclude each other"):  # one fast runner at a time
        net.compile()


def test_solver_refuses_a_graph_with_loss_scaling(tmp_path):
    solver = _solver(tmp_path, False)
    solver.loss_scaler = LossScaler()
    solver.cuda_graph = True
    with pytest.raises(SolverError, match="CUDA graphs are not supported with fp16 loss scaling"):
        solver.step(1)


def test_solver_refuses_a_graph_with_several_processes(tmp_path):
    solver = _solver(tmp_path, False)
    solver.world_size = 2  # as a rank of a 2-process training would have
    solver.cuda_graph = True
    with pytest.raises(SolverError, match="not supported with training with several processes"):
        solver.step(1)


def test_solver_switch_turns_the_graph_on_and_off(tmp_path, monkeypatch):
    solver = _solver(tmp_path, False)
    solver.cuda_graph = True
    stand_in_graphs(monkeypatch)
    solver.step(3)
    assert solver.net._graphed is not None and solver.net._graphed.captures == 1
    solver.cuda_graph = False
    solver.step(1)
    assert solver.net._graphed is None


def test_a_test_net_the_graph_cannot_replay_stays_eager(tmp_path, caplog, monkeypatch):
    net_file = tmp_path / "net.prototxt"
    net_file.write_text(NET)
    sp = caffe_pb2.SolverParameter(
        net=str(net_file), base_lr=0.01, lr_policy="fixed", max_iter=10, display=0, random_seed=1,
        test_iter=[1], test_interval=2,
    )  # fmt: skip
    solver = SGDSolver(sp, source="<test>")
    train_net, test_net = solver.net, solver.test_nets[0]
    stand_in_graphs(monkeypatch)

    def refuse(on, warmup=2):
        raise NetError("layer 'py' is a Python layer")

    test_net.use_cuda_graph = refuse
    solver.cuda_graph = True
    with caplog.at_level("INFO", logger="caffe_compat"):
        solver.step(4)
    assert "Test net #0 runs eagerly: layer 'py' is a Python layer" in caplog.text
    assert train_net._graphed.captures == 1 and test_net._graphed is None


# -- the real CUDA graphs ----------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("iter_size,precision", [(1, "fp32"), (2, "fp32"), (1, "bf16")])
def test_cuda_graph_training_matches_eager(tmp_path, iter_size, precision):
    torch.backends.cudnn.deterministic = True
    mode.set_precision(precision)
    try:
        states, losses = {}, {}
        for graphed in (False, True):
            caffe.set_mode_gpu()
            solver = _solver(tmp_path, False, iter_size)
            solver.cuda_graph = graphed
            seen = []
            solver.loss_observers.append(lambda it, loss, seen=seen: seen.append(loss))
            solver.step(8)
            solver.smoothed_loss  # noqa: B018 - reads the last loss
            states[graphed], losses[graphed] = [t.cpu() for t in _state(solver)], seen
            if graphed:
                assert solver.net._graphed.captures == 1
        np.testing.assert_allclose(losses[True], losses[False], rtol=1e-6)
        for a, b in zip(states[True], states[False]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    finally:
        torch.backends.cudnn.deterministic = False
        mode.set_precision("fp32")
        caffe.set_mode_cpu()


@cuda
def test_cuda_graph_reports_a_bad_label(tmp_path):
    p = tmp_path / "c.prototxt"
    p.write_text(
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 5 } } }\n'
        'layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 2 } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 3 } }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "y" bottom: "label" top: "loss" }\n'
    )
    caffe.set_mode_gpu()
    try:
        net = caffe.Net(str(p), caffe.TRAIN).use_cuda_graph(True, warmup=1)
        net.blobs["x"].data[...] = 1.0
        for _ in range(3):  # eager, captured, replayed
            net.blobs["label"].data[...] = [0, 2]
            assert np.isfinite(net.forward_backward())
        assert net._graphed.captures == 1
        net.blobs["label"].data[...] = [1, 7]
        with pytest.raises(caffe.CaffeError, match="label value 7 in bottom 'label'"):
            net.forward_backward()
        net.blobs["label"].data[...] = [1, 2]  # good labels again: the same graph
        assert np.isfinite(net.forward_backward())
        assert net._graphed.captures == 1
        for _ in range(3):  # the forward pass: its own graph, its checks read at once
            assert np.isfinite(net.forward()["loss"])
        net.blobs["label"].data[...] = [9, 0]
        with pytest.raises(caffe.CaffeError, match="label value 9 in bottom 'label'"):
            net.forward()
        assert net._graphed.captures == 2
    finally:
        caffe.set_mode_cpu()


@cuda
def test_cuda_graph_captures_again_after_a_reshape(tmp_path):
    """A new batch size after the capture: one eager pass (SoftmaxWithLoss makes its per-shape
    normalizer on the device then, which a capture could not), then a new graph; the losses and
    diffs follow an eager net's."""
    p = tmp_path / "c.prototxt"
    p.write_text(
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 5 } } }\n'
        'layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 2 } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"\n'
        '  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "y" bottom: "label" top: "loss" }\n'
    )
    caffe.set_mode_gpu()
    try:
        nets = []
        for graphed in (False, True):
            caffe.set_random_seed(4)
            net = caffe.Net(str(p), caffe.TRAIN)
            nets.append(net.use_cuda_graph(True, warmup=1) if graphed else net)
        rng = np.random.default_rng(0)
        for it in range(7):
            if it == 3:
                for net in nets:
                    net.blobs["x"].reshape(3, 5)
                    net.blobs["label"].reshape(3)
                    net.reshape()
            n = nets[0].blobs["x"].shape[0]
            x, label = rng.standard_normal((n, 5)).astype(np.float32), rng.integers(0, 3, n).astype(np.float32)
            losses = []
            for net in nets:
                net.clear_param_diffs()
                net.blobs["x"].data[...] = x
                net.blobs["label"].data[...] = label
                losses.append(net.forward_backward())
            np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)
            np.testing.assert_allclose(nets[1].params["ip"][0].diff, nets[0].params["ip"][0].diff, rtol=1e-5, atol=1e-7)
        assert nets[1]._graphed.captures == 2
    finally:
        caffe.set_mode_cpu()
