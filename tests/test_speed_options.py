"""Speed options keep Caffe's numbers: in-place ReLU, the fused LRN, lazy diff clearing, tune_cpu,
the chunked solver update (bit for bit); the opt-ins (torch.compile, bf16/fp16 autocast with loss
scaling, channels_last) stay within stated tolerances.

Correctness only; timings live in benchmarks/bench_alexnet.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.layers.norm import lrn_across_channels
from caffe_compat.mode import physical_cores, tune_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 2 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1" lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 } }
layer { name: "ip1" type: "InnerProduct" bottom: "norm1" top: "ip1"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 7 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu2" type: "ReLU" bottom: "ip1" top: "ip1" relu_param { negative_slope: 0.1 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def _net(tmp_path, seed=3):
    p = tmp_path / "small.prototxt"
    p.write_text(NET)
    caffe.set_random_seed(seed)
    net = caffe.Net(str(p), caffe.TRAIN)
    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.standard_normal((2, 3, 9, 9))
    net.blobs["label"].data[...] = [1, 3]
    return net


def test_forward_backward_with_inplace_relu_matches_plain_autograd(tmp_path):
    net = _net(tmp_path)
    net.clear_param_diffs()
    loss = net.forward_backward()
    assert net._overwritten  # the ReLUs ran in place on the conv / inner-product tops
    # the same net through pycaffe's forward + backward (no in-place): same loss and diffs
    ref = _net(tmp_path)
    ref.clear_param_diffs()
    out = ref.forward()
    ref.backward()
    assert loss == pytest.approx(float(out["loss"]), rel=1e-6)
    for name in ("conv1", "ip1", "ip2"):
        for a, b in zip(net.params[name], ref.params[name]):
            np.testing.assert_allclose(a.diff, b.diff, rtol=1e-5, atol=1e-7, err_msg=name)
    # the in-place blob holds the ReLU output, as in Caffe
    np.testing.assert_allclose(net.blobs["conv1"].data, ref.blobs["conv1"].data, rtol=1e-6, atol=0)
    assert (net.blobs["conv1"].data >= 0).all()


def test_backward_after_forward_backward_reads_the_blobs(tmp_path):
    """Caffe's Backward after ForwardBackward reads the blobs (the in-place ReLUs left their
    outputs there): the same diffs as backward after a plain forward."""
    net = _net(tmp_path)
    net.forward_backward()
    net.clear_param_diffs()
    net.backward()
    after_fb = {n: b.diff.copy() for n, b in net.blobs.items()}
    after_fb.update({f"{n}/{i}": p.diff.copy() for n, ps in net.params.items() for i, p in enumerate(ps)})
    net.forward()
    net.clear_param_diffs()
    net.backward()
    assert np.abs(after_fb["conv1/0"]).sum() > 0 and np.abs(after_fb["norm1"]).sum() > 0
    for name, b in net.blobs.items():
        np.testing.assert_allclose(after_fb[name], b.diff, rtol=1e-5, atol=1e-7, err_msg=name)
    for n, ps in net.params.items():
        for i, p in enumerate(ps):
            np.testing.assert_allclose(after_fb[f"{n}/{i}"], p.diff, rtol=1e-5, atol=1e-7, err_msg=f"{n}/{i}")


def test_no_grad_forward_runs_inplace_and_matches(tmp_path):
    net = _net(tmp_path)
    ref = net.forward()["loss"].copy()
    conv_ref = net.blobs["conv1"].data.copy()
    with torch.no_grad():
        out = net.forward()["loss"]
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=0)
    np.testing.assert_allclose(net.blobs["conv1"].data, conv_ref, rtol=1e-6, atol=0)


def test_clear_param_diffs_reads_as_zeros_and_accumulates(tmp_path):
    net = _net(tmp_path)
    net.clear_param_diffs()
    assert all(float(np.abs(p.diff).sum()) == 0.0 for ps in net.params.values() for p in ps)
    net.clear_param_diffs()
    net.forward_backward()
    once = [p.diff.copy() for ps in net.params.values() for p in ps]
    assert all(p.grad is not None for p in net.learnable_params)
    net.forward_backward()  # no clear: Caffe accumulates
    twice = [p.diff for ps in net.params.values() for p in ps]
    for a, b in zip(once, twice):
        np.testing.assert_allclose(b, 2 * a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta", [0.75, 0.5, 1.0, 0.6])
def test_lrn_fast_powers_match_formula(beta):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 4, dtype=torch.float64)
    size, alpha, k = 5, 0.3, 1.5
    sq = torch.nn.functional.pad(x * x, (0, 0, 0, 0, 2, 2))
    win = sum(sq[:, i : i + 7] for i in range(size))
    ref = x * (k + alpha / size * win) ** -beta
    y = lrn_across_channels(x, size, alpha, beta, k)
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-12, atol=1e-14)
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: lrn_across_channels(t, size, alpha, beta, k), (xg,), eps=1e-6, atol=1e-7)


def test_lrn_float32_fast_path_close_to_pow():
    torch.manual_seed(1)
    x = torch.randn(2, 16, 5, 5) * 10
    y = lrn_across_channels(x, 5, 1e-4, 0.75, 1.0)
    ref = lrn_across_channels(x.double(), 5, 1e-4, 0.75, 1.0)
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)


def test_solver_caches_cpu_allocations_once(tmp_path, monkeypatch):
    import platform

    from caffe_compat import mode

    monkeypatch.setattr(mode, "_allocations_cached", [])
    monkeypatch.setenv("CAFFE_COMPAT_CPU_MALLOC", "default")
    assert mode.cache_cpu_allocations() is False  # the opt-out is honoured, and remembered
    monkeypatch.setenv("CAFFE_COMPAT_CPU_MALLOC", "")
    assert mode.cache_cpu_allocations() is False
    monkeypatch.setattr(mode, "_allocations_cached", [])
    threads = torch.get_num_threads()
    _solver(tmp_path, "SGD")  # a CPU solver applies it, leaving the thread count alone
    assert mode._allocations_cached == [platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"]
    assert torch.get_num_threads() == threads


def test_tune_cpu_sets_threads():
    before = torch.get_num_threads()
    try:
        applied = tune_cpu(threads=1, cache_allocations=True)
        assert applied["threads"] == 1 and torch.get_num_threads() == 1
        assert isinstance(applied["cache_allocations"], bool)
        assert 1 <= physical_cores() <= (torch.get_num_interop_threads() + 10**6)
    finally:
        torch.set_num_threads(before)


# -- opt-ins: fused solver update, torch.compile, mixed precision, channels_last -------------------

SOLVER_TYPES = {
    "SGD": "momentum: 0.9",
    "Nesterov": "momentum: 0.9",
    "AdaGrad": "",
    "RMSProp": "rms_decay: 0.95",
    "AdaDelta": "momentum: 0.95 delta: 1e-6",
    "Adam": "momentum: 0.9 momentum2: 0.999",
}


def _solver(tmp_path, stype, extra="", fused=True, chunk=37, foreach=False, device=None):
    from google.protobuf import text_format

    from caffe_compat.proto import caffe_pb2
    from caffe_compat.solvers.base import solver_class

    net = _net(tmp_path)
    sp = text_format.Parse(
        f'base_lr: 0.05 lr_policy: "fixed" weight_decay: 0.01 type: "{stype}" {SOLVER_TYPES[stype]} {extra}',
        caffe_pb2.SolverParameter(),
    )
    if device is not None:
        net.to(device)
    solver = solver_class(stype)(sp, source="<test>", net=net, **({} if device is None else {"device": device}))
    solver.fused_update = fused
    solver.update_chunk = chunk
    solver.foreach_update = foreach
    return solver


@pytest.mark.parametrize("stype", sorted(SOLVER_TYPES))
@pytest.mark.parametrize("extra", ["", 'regularization_type: "L1" iter_size: 2 clip_gradients: 0.1'])
def test_fused_update_is_bit_identical(tmp_path, stype, extra):
    # chunks of 37 elements: vector/scalar tails fall elsewhere than in whole-tensor kernels
    runs = []
    # chunked (CPU), whole tensors one by one, whole tensors through foreach operations (GPU)
    for fused, foreach in ((True, False), (False, False), (False, True)):
        solver = _solver(tmp_path, stype, extra, fused=fused, foreach=foreach)
        solver.step(3)
        runs.append(
            (
                [p.detach().clone() for p in solver.net.learnable_params],
                [p.grad.clone() for p in solver.net.learnable_params],
                [h.clone() for h in solver.history],
            )
        )
    for other in runs[1:]:
        for a, b in zip(sum(runs[0], []), sum(other, [])):
            assert torch.equal(a, b)  # weights, the update left in the diffs, and the history
    assert any(float(h.abs().sum()) > 0 for h in runs[0][2])


def _count_kernel_calls(monkeypatch) -> list[int]:
    """SGD's fused-kernel calls from now on (the size of each call's group), recorded in a list."""
    from caffe_compat.solvers import update_engine

    calls: list[int] = []
    real = update_engine._fused_sgd
    monkeypatch.setattr(update_engine, "_fused_sgd", lambda *a: calls.append(len(a[0])) or real(*a))
    return calls


@pytest.mark.parametrize(
    "extra,kernel_used",
    [
        ("", True),
        ("iter_size: 2", True),
        ('lr_policy: "step" stepsize: 1 gamma: 0.3', True),  # a new rate every iteration
        ("momentum: 0", False),  # the kernel keeps no history at momentum 0: chunked
        ("base_lr: 1e-12", False),  # 1 - (1 - rate) != rate in double: the kernel would use another rate
        ('regularization_type: "L1"', False),
    ],
)
def test_sgd_fused_kernel_is_bit_identical(tmp_path, monkeypatch, extra, kernel_used):
    """SGD's CPU update through torch._fused_sgd_ (vector part) plus the chunked operations
    (each parameter's last numel % 16 elements) gives the chunked path's values bit for bit."""
    from caffe_compat.solvers import update_engine

    # this machine's torch: the kernel's vector loop reproduces the chunked operations
    assert update_engine.fused_sgd_matches(torch.device("cpu"), whole=False)
    calls = _count_kernel_calls(monkeypatch)
    from google.protobuf import text_format

    runs = []
    for kernel in (True, False):
        solver = _solver(tmp_path, "SGD", chunk=37)
        text_format.Merge(extra, solver.param)  # over the helper's fixed policy and momentum
        solver.fused_kernel = kernel
        solver.step(3)
        runs.append(
            [p.detach().clone() for p in solver.net.learnable_params]
            + [p.grad.clone() for p in solver.net.learnable_params]
            + [h.clone() for h in solver.history]
        )
        if kernel:
            assert bool(calls) == kernel_used
            # the diff is the history, as after the chunked update
            assert all(p.grad is solver.history[i] for i, p in enumerate(solver.net.learnable_params))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert any(float(h.abs().sum()) > 0 for h in runs[0][-6:])


def test_sgd_fused_kernel_in_channels_last_is_bit_identical(tmp_path, monkeypatch):
    """channels_last weights, diffs and histories go to the kernel as their memory order."""

    calls = _count_kernel_calls(monkeypatch)
    runs = []
    for kernel in (True, False):
        solver = _solver(tmp_path, "SGD", chunk=37)
        solver.net.to(memory_format=torch.channels_last)
        solver.history = [
            h.contiguous(memory_format=torch.channels_last) if h.dim() == 4 else h for h in solver.history
        ]
        solver.fused_kernel = kernel
        solver.step(3)
        params = solver.net.learnable_params
        assert params[0].is_contiguous(memory_format=torch.channels_last) and not params[0].is_contiguous()
        assert solver.engine.flat_views(0) is not None  # the conv weight is one dense piece of memory: kernel-able
        runs.append([p.detach().clone() for p in params] + [h.clone() for h in solver.history])
    assert calls
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_sgd_fused_kernel_probe_survives_a_kernel_that_raises(monkeypatch):
    from caffe_compat.solvers import update_engine

    def broken(*args, **kwargs):
        raise RuntimeError("no such kernel for this device")

    monkeypatch.setattr(update_engine, "_FUSED_SGD_MATCHES", {})
    monkeypatch.setattr(torch, "_fused_sgd_", broken)
    assert update_engine.fused_sgd_matches(torch.device("cpu"), whole=False) is False


def test_sgd_fused_kernel_falls_back_when_it_differs(tmp_path, monkeypatch):
    from caffe_compat.solvers import update_engine

    monkeypatch.setattr(update_engine, "_FUSED_SGD_MATCHES", {("cpu", None, False): False})
    monkeypatch.setattr(update_engine, "_fused_sgd", lambda *a: pytest.fail("the kernel was used"))
    solver = _solver(tmp_path, "SGD", chunk=37)
    solver.step(2)
    ref = _solver(tmp_path, "SGD", chunk=37)
    ref.fused_kernel = False
    ref.step(2)
    for a, b in zip(solver.net.learnable_params, ref.net.learnable_params):
        assert torch.equal(a.detach(), b.detach())


def _sgd_whole_kernel_runs(tmp_path, monkeypatch, device, extra=""):
    """SGD through the foreach path twice on ``device``: with the whole-tensor fused kernel
    (taken whether or not the probe agrees) and with the foreach operations."""
    from google.protobuf import text_format

    from caffe_compat.solvers import update_engine

    calls = _count_kernel_calls(monkeypatch)
    runs = []
    for kernel in (True, False):
        monkeypatch.setitem(update_engine._FUSED_SGD_MATCHES, (device.type, device.index, True), kernel)
        solver = _solver(tmp_path, "SGD", fused=False, foreach=True, device=device)
        text_format.Merge(extra, solver.param)
        solver.fused_kernel = kernel
        solver.step(3)
        params = solver.net.learnable_params
        assert all(p.grad is solver.history[i] for i, p in enumerate(params))
        runs.append([p.detach().cpu() for p in params] + [h.cpu() for h in solver.history])
    # per step 2 groups: (decay 0.01, rate 0.05) and ip1's bias (lr_mult 2, decay_mult 0)
    assert len(calls) == 2 * 3
    return runs


@pytest.mark.parametrize("extra", ["", "iter_size: 2"])
def test_sgd_whole_tensor_kernel_on_cpu_is_close(tmp_path, monkeypatch, extra):
    """The GPU's update path (foreach) through torch._fused_sgd_ on whole tensors, forced on the
    CPU, where the kernel's scalar tail rounds differently (so the probe keeps it off here): the
    same update to the last bits."""
    a, b = _sgd_whole_kernel_runs(tmp_path, monkeypatch, torch.device("cpu"), extra)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)
    assert any(not torch.equal(x, y) for x, y in zip(a, b))  # the tails: this path was really taken


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sgd_whole_tensor_kernel_on_cuda(tmp_path, monkeypatch):
    """On a GPU the whole-tensor kernel is used only where the probe finds it bit-identical to the
    foreach operations; then a training run through it equals one through them, bit for bit."""
    from caffe_compat.solvers import update_engine

    device = torch.device("cuda", torch.cuda.current_device())
    matches = update_engine.fused_sgd_matches(device, whole=True)
    print(f"torch._fused_sgd_ bit-identical to the foreach operations on {device}: {matches}")
    if not matches:
        pytest.skip("the kernel rounds differently on this GPU: the solver keeps the foreach operations")
    a, b = _sgd_whole_kernel_runs(tmp_path, monkeypatch, device)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_fused_update_leaves_update_in_diff(tmp_path):
    solver = _solver(tmp_path, "SGD", chunk=1 << 15)
    w0 = [p.detach().clone() for p in solver.net.learnable_params]
    solver.step(1)
    for i, (p, w) in enumerate(zip(solver.net.learnable_params, w0)):
        torch.testing.assert_close(w - p.detach(), p.grad, rtol=1e-5, atol=1e-7)
        assert torch.equal(p.grad, solver.history[i])  # SGD's update is its history V


@pytest.mark.parametrize("fused,foreach", [(True, False), (False, False), (False, True)])
def test_sgd_diff_aliases_history_until_written(tmp_path, fused, foreach):
    """The SGD update (chunked, whole tensors, foreach) leaves the diff as an alias of the history
    (no copy); reading, writing or accumulating into the diff never changes the history."""
    solver = _solver(tmp_path, "SGD", fused=fused, chunk=1 << 15, foreach=foreach)
    net = solver.net
    solver.step(2)
    n = len(net.learnable_params)
    assert all(p.grad is solver.history[i] for i, p in enumerate(net.learnable_params))
    hist = [h.clone() for h in solver.history[:n]]
    # pycaffe's diff: the update value, as a copy of its own once handed out
    d = net.params["ip1"][0].diff
    np.testing.assert_array_equal(d, hist[2].numpy())
    d[...] = 123.0
    assert torch.equal(solver.history[2], hist[2])
    # accumulating backward passes (no clear_param_diffs) add to the update value, as in Caffe
    net.forward()
    net.backward()
    net.forward_backward()
    for i, p in enumerate(net.learnable_params):
        assert torch.equal(solver.history[i], hist[i]), i
        assert p.grad is not solver.history[i]
    # the next step still follows the copying update of a net without the alias exactly
    solver.step(1)
    ref = _solver(tmp_path, "SGD", fused=False)
    type(ref.net).supports_diff_alias = False
    try:
        ref.step(3)
    finally:
        type(ref.net).supports_diff_alias = True
    for a, b in zip(net.learnable_params, ref.net.learnable_params):
        assert torch.equal(a.detach(), b.detach())
    for a, b in zip(solver.history, ref.history):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fused,foreach", [(True, False), (False, False), (False, True)])
def test_duck_typed_net_gets_no_alias(tmp_path, fused, foreach):
    solver = _solver(tmp_path, "SGD", fused=fused, chunk=1 << 15, foreach=foreach)
    type(solver.net).supports_diff_alias = False
    try:
        solver.step(1)
        assert all(p.grad is not h for p, h in zip(solver.net.learnable_params, solver.history))
        assert all(torch.equal(p.grad, h) for p, h in zip(solver.net.learnable_params, solver.history))
    finally:
        type(solver.net).supports_diff_alias = True


def test_loss_scaler_skips_step_on_inf_and_halves_scale(tmp_path):
    from caffe_compat.solvers.base import LossScaler

    solver = _solver(tmp_path, "SGD")
    solver.loss_scaler = LossScaler(init_scale=1024.0, growth_interval=2)
    params = solver.net.learnable_params
    # a finite step: diffs are unscaled before the update
    solver.net.clear_param_diffs()
    solver.net.forward_backward(loss_scale=1024.0)
    scaled = [p.grad.clone() for p in params]
    ref = _solver(tmp_path, "SGD")
    ref.net.clear_param_diffs()
    ref.net.forward_backward()
    for g, r in zip(scaled, ref.net.learnable_params):
        torch.testing.assert_close(g / 1024.0, r.grad, rtol=1e-5, atol=1e-8)
    w0 = [p.detach().clone() for p in params]
    solver.apply_update()
    ref.apply_update()
    for p, r in zip(params, ref.net.learnable_params):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-7)
    assert solver.loss_scaler.scale == 1024.0 and solver.loss_scaler.good_steps == 1
    # an injected inf: no update, history unchanged, scale halved
    w1 = [p.detach().clone() for p in params]
    h1 = [h.clone() for h in solver.history]
    solver.net.clear_param_diffs()
    solver.net.forward_backward(loss_scale=1024.0)
    params[0].grad.view(-1)[3] = float("inf")
    solver.apply_update()
    for p, w in zip(params, w1):
        assert torch.equal(p.detach(), w)
    for h, h0 in zip(solver.history, h1):
        assert torch.equal(h, h0)
    assert solver.loss_scaler.scale == 512.0 and solver.loss_scaler.skipped == 1
    assert not any(torch.equal(p.detach(), w) for p, w in zip(params, w0))
    # growth after growth_interval finite steps in a row
    for _ in range(2):
        solver.net.clear_param_diffs()
        solver.net.forward_backward(loss_scale=solver.loss_scaler.scale)
        solver.apply_update()
    assert solver.loss_scaler.scale == 1024.0


def test_fp16_precision_turns_on_loss_scaling_in_solver(tmp_path):
    from caffe_compat import mode

    mode.set_precision("fp16")
    try:
        solver = _solver(tmp_path, "SGD")
        assert solver.loss_scaler is not None and solver.loss_scaler.scale == 2.0**16
    finally:
        mode.set_precision("fp32")
    assert _solver(tmp_path, "SGD").loss_scaler is None
    with pytest.raises(caffe.errors.CaffeError, match="fp32"):
        mode.set_precision("fp8")


def test_bf16_autocast_training_close_to_fp32(tmp_path):
    from caffe_compat import mode

    ref = _net(tmp_path)
    ref.clear_param_diffs()
    loss_ref = ref.forward_backward()
    net = _net(tmp_path)
    mode.set_precision("bf16")
    try:
        net.clear_param_diffs()
        loss = net.forward_backward()
    finally:
        mode.set_precision("fp32")
    # bf16 keeps 8 significant bits: ~0.4 % per rounding, a few roundings deep
    assert loss == pytest.approx(loss_ref, rel=3e-2)
    assert net.blobs["loss"].data.dtype == np.float32
    for p, r in zip(net.learnable_params, ref.learnable_params):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
        scale = float(r.grad.abs().max())
        torch.testing.assert_close(p.grad, r.grad, rtol=0.1, atol=0.05 * scale)


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",  # dynamo's graph + AOT autograd, no C++ compiler: ~3 s
        pytest.param(
            "inductor",  # generated C++ kernels: ~40 s with a cold cache, hence opt-in
            marks=pytest.mark.skipif(
                not os.environ.get("CAFFE_COMPAT_TEST_INDUCTOR"), reason="set CAFFE_COMPAT_TEST_INDUCTOR=1 (slow)"
            ),
        ),
    ],
)
def test_compile_matches_eager(tmp_path, backend):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available in this torch build")
    from torch import _dynamo

    _dynamo.reset()
    ref = _net(tmp_path)
    ref.clear_param_diffs()
    loss_ref = ref.forward_backward()
    net = _net(tmp_path).compile(backend=backend)
    net.clear_param_diffs()
    loss = net.forward_backward()
    if net._compile_options is None:
        pytest.skip("torch.compile failed on this platform (the net fell back to eager; see the warning)")
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    for p, r in zip(net.learnable_params, ref.learnable_params):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(net.blobs["norm1"].data, ref.blobs["norm1"].data, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        out = net.forward()["loss"]
    np.testing.assert_allclose(out, loss_ref, rtol=1e-5, atol=0)
    # backward() after the compiled pass reads the blobs, as after an eager one
    net.forward_backward()
    net.clear_param_diffs()
    ref.forward_backward()
    ref.clear_param_diffs()
    net.backward()
    ref.backward()
    for name in ("conv1", "ip1", "ip2"):
        for a, b in zip(net.params[name], ref.params[name]):
            np.testing.assert_allclose(a.diff, b.diff, rtol=1e-4, atol=1e-6, err_msg=name)


def _alexnet_train(tmp_path, batch: int = 2):
    """prototxt/alexnet_deploy.prototxt for training: a label Input, SoftmaxWithLoss for Softmax."""
    from caffe_compat import io as cio
    from caffe_compat.proto import caffe_pb2

    p = cio.read_net(os.path.join(REPO, "prototxt", "alexnet_deploy.prototxt"))
    p.layer[0].input_param.shape[0].dim[0] = batch
    label = p.layer.insert(1, caffe_pb2.LayerParameter(name="label", type="Input", top=["label"]))  # noqa: F841
    p.layer[1].input_param.shape.add().dim.extend([batch])
    last = p.layer[-1]
    last.type, last.name = "SoftmaxWithLoss", "loss"
    del last.top[:]
    last.bottom.append("label")
    last.top.append("loss")
    path = tmp_path / "alexnet_train.prototxt"
    path.write_text(str(p))
    net = caffe.Net(str(path), caffe.TRAIN)
    net.blobs["label"].data[...] = 7
    return net


@pytest.mark.parametrize("which", ["small", "alexnet_train", "alexnet_deploy", "dental_cae_deploy"])
def test_compiled_pass_is_one_graph(tmp_path, which):
    """Net.compile traces the whole pass (every layer, the label checks) as one graph: a graph
    break would split it (on a GPU with CUDA graphs: many small graphs and host syncs)."""
    from torch import _dynamo

    _dynamo.reset()
    if which == "small":
        net = _net(tmp_path)
    elif which == "alexnet_train":
        net = _alexnet_train(tmp_path)
    else:
        net = caffe.Net(os.path.join(REPO, "prototxt", f"{which}.prototxt"), caffe.TEST)
    net.compile(backend="eager", fullgraph=True)  # fullgraph: a graph break is an error (then eager)
    if which in ("small", "alexnet_train"):
        net.clear_param_diffs()
        assert np.isfinite(net.forward_backward())
    else:
        with torch.no_grad():
            net.forward()
    assert net._compile_options is not None  # did not fall back to eager


def test_compiled_pass_checks_labels(tmp_path):
    """Under Net.compile the loss layers' label checks leave the graph as tensors and are read
    after the pass: a bad label is still our error, before any update."""
    from torch import _dynamo

    from caffe_compat.errors import LayerError

    _dynamo.reset()
    net = _net(tmp_path).compile(backend="eager", fullgraph=True)
    net.blobs["label"].data[...] = [1, 4]
    net.clear_param_diffs()
    with pytest.raises(LayerError, match=r"layer 'loss'.*label value 4 in bottom 'label' is out of range"):
        net.forward_backward()
    with torch.no_grad(), pytest.raises(LayerError, match=r"label value 4 in bottom 'label'"):
        net.forward()
    net.blobs["label"].data[...] = [1, 3]
    ref = _net(tmp_path)
    assert net.forward_backward() == pytest.approx(ref.forward_backward(), rel=1e-6)
    assert net._compile_options is not None


def test_compiled_passes_do_not_recompile(tmp_path):
    """The runner hands the label-checking layers ``LabelChecks.TRACED`` for each compiled call
    (an attribute torch.compile guards on): passes after the first of each kind reuse the graph."""
    from torch import _dynamo
    from torch._dynamo.testing import CompileCounter

    _dynamo.reset()
    counter = CompileCounter()
    net = _net(tmp_path).compile(backend=counter, fullgraph=True)

    def passes():
        net.clear_param_diffs()
        net.forward_backward()
        with torch.no_grad():
            net.forward()
        net.forward_backward()

    passes()
    first = counter.frame_count
    assert first >= 1
    for _ in range(3):
        passes()
    assert counter.frame_count == first
    assert net._compile_options is not None


def test_compile_failure_falls_back_with_warning(tmp_path, monkeypatch):
    ref = _net(tmp_path)
    loss_ref = ref.forward_backward()
    net = _net(tmp_path).compile()

    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    import logging

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # other tests may turn off propagation to caplog's root handler
    logger = logging.getLogger("caffe_compat")
    logger.addHandler(handler)
    try:
        loss = net.forward_backward()
    finally:
        logger.removeHandler(handler)
    assert any("torch.compile of net 'small' failed" in r.getMessage() for r in records)
    assert net._compile_options is None
    assert loss == pytest.approx(loss_ref, rel=1e-6)


def test_channels_last_matches(tmp_path):
    ref = _net(tmp_path)
    ref.clear_param_diffs()
    loss_ref = ref.forward_backward()
    net = _net(tmp_path).to(memory_format=torch.channels_last)
    assert net.learnable_params[0].is_contiguous(memory_format=torch.channels_last)
    net.clear_param_diffs()
    loss = net.forward_backward()
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    for p, r in zip(net.learnable_params, ref.learnable_params):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(net.blobs["norm1"].data, ref.blobs["norm1"].data, rtol=1e-5, atol=1e-6)


def test_memory_format_or_dtype_change_keeps_the_device(tmp_path):
    """``net.to(memory_format=...)`` after ``net.to(device)`` stays on that device (it had moved
    the blobs back to the CPU: every channels_last case failed in GPU mode). The meta device
    stands in for a GPU."""
    net = _net(tmp_path).to("meta")
    net.to(memory_format=torch.channels_last)
    net.to(torch.float64)
    assert net._device.type == "meta" and net._dtype == torch.float64
    params = list(net.parameters())  # (the meta move replaced the Parameter objects)
    assert params and all(p.device.type == "meta" for p in params)
    assert params[0].is_contiguous(memory_format=torch.channels_last)
    assert {b._data.device.type for b in net.blobs.values() if b._data is not None} == {"meta"}


def test_train_tool_precision_flag(tmp_path, in_dir):
    from caffe_compat import mode
    from caffe_compat.cli import train

    (tmp_path / "net.prototxt").write_text(
        NET.replace(
            'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }\n'
            'layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 2 } } }',
            'layer { name: "data" type: "DummyData" top: "data" top: "label" dummy_data_param {'
            ' shape { dim: 2 dim: 3 dim: 9 dim: 9 } shape { dim: 2 } data_filler { type: "gaussian" }'
            ' data_filler { type: "constant" value: 1 } } }',
        )
    )
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 0.01 lr_policy: "fixed" momentum: 0.9 max_iter: 2 snapshot_after_train: false'
    )
    with in_dir(tmp_path):
        assert train.main(["--solver", "solver.prototxt", "--precision", "bf16"]) == 0
    assert mode.precision() == "fp32"  # restored after training


@pytest.mark.parametrize("extra", ["", "iter_size: 2 clip_gradients: 0.1"])
def test_compiled_sgd_update_matches(tmp_path, extra):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available in this torch build")
    runs = []
    for compiled in (True, False):
        solver = _solver(tmp_path, "SGD", extra, chunk=1 << 18)
        solver.compiled_update = compiled
        solver.compiled_update_options = {"backend": "aot_eager", "dynamic": True}  # no C++ compiler: fast
        solver.step(3)
        assert solver.compiled_update == compiled  # did not fall back
        runs.append(([p.detach().clone() for p in solver.net.learnable_params], [h.clone() for h in solver.history]))
    for a, b in zip(sum(runs[0], []), sum(runs[1], [])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "foreach,extra,expected", [(True, "", True), (False, "", False), (True, 'regularization_type: "L1"', False)]
)
def test_sgd_foreach_update_is_taken_when_asked(tmp_path, monkeypatch, foreach, extra, expected):
    calls = []
    real = torch._foreach_sub_
    monkeypatch.setattr(torch, "_foreach_sub_", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    solver = _solver(tmp_path, "SGD", extra, fused=False, foreach=foreach)
    solver.step(2)
    assert bool(calls) == expected  # L1 needs sign(W): parameter by parameter


def test_label_check_under_a_users_own_compile_reads_the_host(tmp_path):
    """Outside Net.compile (a user's torch.compile of net.run) nothing collects ranges left on
    the layers, so the loss layer keeps its host check there: a bad label is still our error."""
    from torch import _dynamo

    from caffe_compat.errors import LayerError

    _dynamo.reset()
    net = _net(tmp_path)
    net.blobs["label"].data[...] = [1, 4]
    run = torch.compile(net.run, backend="eager")
    with pytest.raises(LayerError, match=r"label value 4 in bottom 'label' is out of range"):
        run(data=torch.from_numpy(np.array(net.blobs["data"].data)))
    assert not any(layer.label_record is not None for layer in net.modules_by_name.values())
