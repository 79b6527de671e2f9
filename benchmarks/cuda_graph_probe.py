"""Probe: can our AlexNet training step be captured in one CUDA graph, and what would it gain?

    python benchmarks/cuda_graph_probe.py [--batches 1,10] [--iters 50] [--reps 5]
    python benchmarks/cuda_graph_probe.py --cpu_dry_run      # the step and the checks, eagerly, on the CPU

A measurement for the next session with a GPU, not a feature: at batches 1-10 the host's Python
bounds the eager training pass (docs/benchmarks.md, session 6), and a CUDA graph replays the whole
pass (forward, backward, our SGD update) without the host. The captured step is
``net._forward_loss()``, ``torch.autograd.backward`` into the parameters and
``solver.apply_update()`` (lr policy "fixed": the rate is a constant of the graph). For the
capture the loss layers' label check is replaced by nothing (a host read cannot be captured; the
labels here are valid): a product version would copy the labels to pinned memory inside the
graph and check them after each replay.

Prints, per batch: whether capture worked (else the exception), the largest parameter difference
between k replays and k eager steps of the same net without Dropout (from the same weights; the
fixtures' tolerance is rtol 1e-4), then times per iteration (median of ``--reps`` rounds of
``--iters`` iterations): our eager ``solver.step(1)``, our graph replay, the hand-written model
eager and replayed from its own graph, and the ratios to the hand-written eager model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_alexnet import NUM_CLASSES, TorchAlexNet, alexnet_param  # noqa: E402
from bench_overhead import mean_call_us  # noqa: E402

from caffe_compat import mode  # noqa: E402
from caffe_compat.layers import loss as loss_layers  # noqa: E402
from caffe_compat.net import TRAIN, Net  # noqa: E402
from caffe_compat.proto import caffe_pb2  # noqa: E402
from caffe_compat.solvers import SGDSolver  # noqa: E402


def _ours(batch: int, device: torch.device, x, y, dropout: bool = True):
    p = alexnet_param(batch, True)
    if not dropout:  # in place: removing them keeps the wiring
        keep = [layer for layer in p.layer if layer.type != "Dropout"]
        del p.layer[:]
        p.layer.extend(keep)
    net = Net(p, phase=TRAIN)
    net.to(device)
    net.blobs["data"].data[...] = x.cpu().numpy()
    net.blobs["label"].data[...] = y.cpu().numpy()
    sp = caffe_pb2.SolverParameter(
        base_lr=0.01, lr_policy="fixed", momentum=0.9, weight_decay=5e-4, display=0, max_iter=10**9
    )
    solver = SGDSolver(sp, source="<probe>", net=net, device=device)
    return net, solver


def _our_step(net, solver) -> None:
    """One training iteration without host reads: forward, backward into the parameters, update."""
    params = [p for p in net.learnable_params if p.requires_grad]
    loss = net._forward_loss()
    torch.autograd.backward([loss], inputs=params)
    solver.apply_update()


def _clear_grads(net) -> None:
    for p in net.learnable_params:
        p.grad = None


def _capture(step, clear, device: torch.device, warmup: int = 3):
    """torch's whole-network capture recipe: warm up on a side stream, capture one step."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            clear()
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def _median_ms(fn, device: torch.device, iters: int, reps: int) -> float:
    """Median over ``reps`` rounds of the mean milliseconds per call (bench_overhead's timing)."""
    return statistics.median(mean_call_us(fn, iters, device) for _ in range(reps)) / 1e3


def _snapshot(net, solver):
    return [p.detach().clone() for p in net.learnable_params], [h.detach().clone() for h in solver.history]


def _restore(net, solver, saved) -> None:
    with torch.no_grad():
        for p, v in zip(net.learnable_params, saved[0]):
            p.copy_(v)
        for h, v in zip(solver.history, saved[1]):
            h.copy_(v)


def _max_rel_diff(a, b) -> float:
    worst = 0.0
    for u, v in zip(a, b):
        worst = max(worst, float(((u - v).abs() / (v.abs() + 1e-6)).max()))
    return worst


def check_replay(batch: int, device: torch.device, x, y, k: int = 3, graphs: bool = True) -> float:
    """Largest relative difference of the parameters after k replays against k eager steps, from
    the same weights, on the net without Dropout (``graphs=False``: eager against eager)."""
    net, solver = _ours(batch, device, x, y, dropout=False)
    start = _snapshot(net, solver)
    for _ in range(k):
        _clear_grads(net)
        _our_step(net, solver)
    eager = [p.detach().clone() for p in net.learnable_params]
    _restore(net, solver, start)
    if graphs:
        graph = _capture(lambda: _our_step(net, solver), lambda: _clear_grads(net), device)
        _restore(net, solver, start)  # the warm-up steps ran; the capture did not
        for _ in range(k):
            graph.replay()
    else:
        for _ in range(k):
            _clear_grads(net)
            _our_step(net, solver)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return _max_rel_diff([p.detach() for p in net.learnable_params], eager)


def _torch_side(device: torch.device, x, y):
    """The hand-written model's training step (forward, backward, SGD) and its gradient reset."""
    model = TorchAlexNet().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    xd, yd = x.to(device), y.to(device)

    def step() -> None:
        F.cross_entropy(model(xd), yd).backward()
        opt.step()

    return step, lambda: opt.zero_grad(set_to_none=True)


def _torch_capture_works(device: torch.device, x, y) -> str:
    """Whether the hand-written model's training step captures (in a fresh CUDA context state)."""
    try:
        step, clear = _torch_side(device, x, y)
        _capture(step, clear, device).replay()
        torch.cuda.synchronize(device)
        return "captures"
    except Exception as e:  # noqa: BLE001
        return f"fails too ({type(e).__name__}: {str(e).splitlines()[0][:200]})"


def _probe_batch(batch: int, device: torch.device, iters: int, reps: int) -> str:
    """One row of the table (or the reason the capture failed)."""
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 227, 227), torch.randint(0, NUM_CLASSES, (batch,))
    try:
        diff = check_replay(batch, device, x, y)
    except Exception as e:  # noqa: BLE001 - the probe reports what failed
        # where (our frames last), and whether the hand-written model's step captures at this batch
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "caffe_compat" in f.filename][-4:]
        where = "; ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames)
        return (
            f"{batch:5d}  FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}\n#   at {where or '?'}\n"
            f"#   the hand-written model's step at this batch: {_torch_capture_works(device, x, y)}"
        )
    net, solver = _ours(batch, device, x, y)
    eager_ms = _median_ms(lambda: solver.step(1), device, iters, reps)
    graph = _capture(lambda: _our_step(net, solver), lambda: _clear_grads(net), device)
    graph_ms = _median_ms(graph.replay, device, iters, reps)

    torch_step, torch_clear = _torch_side(device, x, y)

    def torch_eager() -> None:
        torch_clear()
        torch_step()

    torch_ms = _median_ms(torch_eager, device, iters, reps)
    tgraph = _capture(torch_step, torch_clear, device)
    tgraph_ms = _median_ms(tgraph.replay, device, iters, reps)
    return (
        f"{batch:5d}  {'ok':>7}  {diff:12.2e}  {eager_ms:13.2f}  {graph_ms:13.2f}  {torch_ms:14.2f}  "
        f"{tgraph_ms:14.2f}  {eager_ms / torch_ms:11.3f}  {graph_ms / torch_ms:11.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,10")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cpu_dry_run", action="store_true", help="no CUDA: run the step and the check eagerly")
    args = ap.parse_args(argv)
    # the capture cannot read labels back to the host: no label check (the labels are valid)
    loss_layers._check_label_range = lambda layer, labels, valid, n, raw=None: labels
    if args.cpu_dry_run:
        device = torch.device("cpu")
        torch.manual_seed(0)
        x, y = torch.randn(2, 3, 227, 227), torch.randint(0, NUM_CLASSES, (2,))
        print(
            f"# cpu dry run: eager against eager, max relative difference {check_replay(2, device, x, y, 2, False):.2e}"
        )
        net, solver = _ours(2, device, x, y)
        _clear_grads(net)
        _our_step(net, solver)
        print("# cpu dry run: one step with Dropout ran")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to probe (use --cpu_dry_run to check the script)")
        return 1
    mode.set_mode_gpu()
    device = torch.device("cuda", 0)
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print(
        "batch  capture  max_rel_diff  ours_eager_ms  ours_graph_ms  torch_eager_ms  torch_graph_ms  eager_ratio  graph_ratio"
    )
    for batch in [int(b) for b in args.batches.split(",")]:
        print(_probe_batch(batch, device, args.iters, args.reps), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
