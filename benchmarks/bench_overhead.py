"""The interpreter's per-call overhead: a tiny AlexNet, ours against the hand-written model.

    python benchmarks/bench_overhead.py [--device cpu|cuda] [--reps 5] [--calls 200] [--cpu_paths]
                                        [--loss_read late|now] [--host_reads pycaffe|both|none] [--cprofile N]
                                        [--cuda_graph]

BVLC AlexNet's topology (grouped convs, LRN, ceil-mode pooling, dropout, SoftmaxWithLoss) with
every layer made tiny (widths 8/16/24/24/16, fc 64/64/10, a 67x67 input, batch 1), so that the
time of a call is almost all dispatch: Python, module and autograd bookkeeping and one kernel
launch per operation. On a GPU at small batches this is what separates a Caffe interpreter from
a hand-written model (docs/benchmarks.md: ratio ~1.6 at batches 1-10 on an H200), and it can be
measured on a CPU: by default the CPU run takes the code paths a GPU takes (no oneDNN
InnerProduct, no channels_last max pooling, the LRN over the whole batch, the SGD update through
foreach operations, host copies behind ``.data``/``.diff``), ``--cpu_paths`` keeps the CPU's own. One thread unless ``--threads``.

``--cuda_graph`` (a GPU): our passes replayed from CUDA graphs (``Net.use_cuda_graph``; what is
left is the host work around a replay), the baseline eager. ``--host_reads`` as in bench_alexnet.py: ``pycaffe`` (default) ours reads its outputs / loss
through pycaffe's APIs and the baseline nothing; ``both``: the baseline reads them too; ``none``:
neither (ours through ``net.run`` and ``forward_backward_pending``; ``iter`` unchanged).

Prints, for ``fwd`` / ``fwd_bwd`` / ``iter`` (as in bench_alexnet.py), the median over ``--reps``
alternating rounds of the mean time of ``--calls`` calls, ours and the baseline's, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_alexnet import TorchAlexNet, alexnet_param, sgd_solver  # noqa: E402

from caffe_compat.net import TEST, TRAIN, Net  # noqa: E402
from caffe_compat.proto import caffe_pb2  # noqa: E402

WIDTHS = {"conv1": 8, "conv2": 16, "conv3": 24, "conv4": 24, "conv5": 16, "fc6": 64, "fc7": 64}
NUM_CLASSES = 10
SIZE = 67


def mean_call_us(fn, calls: int, device: torch.device) -> float:
    """Mean microseconds per call of ``fn`` over ``calls`` calls, after ``calls / 10`` warm-up
    calls (on a GPU: from an idle device to the end of the last call's work)."""
    for _ in range(max(calls // 10, 2)):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / calls * 1e6


def tiny_param(train: bool) -> caffe_pb2.NetParameter:
    p = alexnet_param(1, train)
    dims = p.layer[0].input_param.shape[0].dim
    dims[2] = dims[3] = SIZE
    widths = {**WIDTHS, "fc8": NUM_CLASSES}
    for layer in p.layer:
        width = widths.get(layer.name)
        if width is not None:
            sub = layer.convolution_param if layer.type == "Convolution" else layer.inner_product_param
            sub.num_output = width
    return p


def _gpu_paths_on_cpu() -> None:
    """Make a CPU run take the paths a GPU run takes (the CPU-only kernels off, pycaffe's
    ``.data``/``.diff`` as host copies kept in step with the tensors)."""
    import caffe_compat.blob as blob
    import caffe_compat.layers.norm as norm
    import caffe_compat.layers.pooling as pooling

    blob.uses_host_mirror = lambda device: True

    norm._LRN_CHUNK_VALUES = 1 << 62
    norm.WINDOW_BY_REDUCTION = True
    torch.backends.mkldnn.enabled = False  # oneDNN's InnerProduct

    def plain_max_pool(x, kernel, stride, pad, ceil, want_indices):
        if want_indices:
            return F.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil, return_indices=True)
        return (F.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil),)

    pooling._max_pool = plain_max_pool


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cprofile", type=int, default=0, help="then print cProfile's top N functions per side")
    p.add_argument("--cpu_paths", action="store_true", help="CPU run: keep the CPU-only kernels")
    p.add_argument(
        "--loss_read", default="late", choices=["late", "now"], help="our solver on a GPU: loss read late or at once"
    )
    p.add_argument("--host_reads", default="pycaffe", choices=["pycaffe", "both", "none"])
    p.add_argument("--cuda_graph", action="store_true", help="ours: passes replayed from CUDA graphs (a GPU)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    gpu_paths = device.type != "cpu" or not args.cpu_paths
    if device.type == "cpu" and gpu_paths:
        _gpu_paths_on_cpu()
    torch.manual_seed(0)
    x = torch.randn(1, 3, SIZE, SIZE)
    y = torch.tensor([3.0])

    test_net, train_net = Net(tiny_param(False), phase=TEST), Net(tiny_param(True), phase=TRAIN)
    for net in (test_net, train_net):
        net.to(device)
        net.blobs["data"].data[...] = x.numpy()
    train_net.blobs["label"].data[...] = y.numpy()
    solver = sgd_solver(train_net, device)
    solver.fused_update = not gpu_paths
    solver.lag_loss_read = args.loss_read == "late" and args.host_reads != "both"
    solver.foreach_update = gpu_paths  # on CUDA the default; on the CPU forced to take the GPU path
    if args.cuda_graph:  # the train net's passes (fwd_bwd and the solver's) and the test net's forward
        solver.cuda_graph = True
        solver._use_cuda_graph(True)
        test_net.use_cuda_graph()

    model = TorchAlexNet(NUM_CLASSES, WIDTHS, pool5_size=1).to(device)  # the same tiny net, hand-written
    # torch's SGD takes multi-tensor (foreach) kernels on CUDA by default: the same on the CPU here
    foreach = True if gpu_paths else None
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=foreach)
    xd, yd = x.to(device), y.to(device).long()

    reads, xin = args.host_reads, x.to(device)

    def ours_fwd():
        with torch.no_grad():
            if reads == "none":
                test_net.run(data=xin)
            else:
                test_net.forward()

    def ours_fwd_bwd():
        train_net.clear_param_diffs()
        if reads == "none":
            train_net.forward_backward_pending()
        else:
            train_net.forward_backward()

    def torch_fwd():
        model.eval()
        with torch.no_grad():  # our TEST net ends with Softmax ("prob"): the same work here
            prob = torch.softmax(model(xd), dim=1)
            if reads == "both":
                prob.cpu().numpy()

    def torch_fwd_bwd():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xd), yd)
        loss.backward()
        if reads == "both":
            loss.item()

    def torch_iter():
        torch_fwd_bwd()
        opt.step()

    def per_call_us(fn) -> float:
        return mean_call_us(fn, args.calls, device)

    paths = "GPU paths" if gpu_paths else "CPU paths"
    print(
        f"# tiny AlexNet, batch 1, {SIZE}x{SIZE}, device {device} ({paths}), {torch.get_num_threads()} thread(s), "
        f"host reads {reads}"
    )
    print(f"{'what':>8} {'ours us':>9} {'torch us':>9} {'ratio':>6}")
    pairs = (
        ("fwd", ours_fwd, torch_fwd),
        ("fwd_bwd", ours_fwd_bwd, torch_fwd_bwd),
        ("iter", lambda: solver.step(1), torch_iter),
    )
    for name, ours, base in pairs:
        a, b = [], []
        for _ in range(args.reps):
            a.append(per_call_us(ours))
            b.append(per_call_us(base))
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{name:>8} {ma:9.0f} {mb:9.0f} {ma / mb:6.2f}")
    if args.cprofile:
        _cprofile(pairs[1:], args.calls, args.cprofile, device)
    return 0


def _cprofile(pairs, calls: int, top: int, device: torch.device) -> None:
    """Where the host's time goes: cProfile's functions by their own time, ``calls`` calls each."""
    import cProfile
    import io
    import pstats

    for name, ours, base in pairs:
        for side, fn in (("ours", ours), ("torch", base)):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
            lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
            print(f"## cProfile {side} {name}, {calls} calls")
            print("\n".join(ln[:160] for ln in lines[3:]))


if __name__ == "__main__":
    sys.exit(main())
