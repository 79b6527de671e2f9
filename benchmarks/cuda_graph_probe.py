"""Check: AlexNet trained through CUDA graphs (``Solver.cuda_graph``) against eager training.

    python benchmarks/cuda_graph_probe.py [--batches 1,4,10] [--iters 6]
    python benchmarks/cuda_graph_probe.py --cpu_dry_run      # the script's plumbing, on the CPU

For each batch size: two solvers built from the same seed on BVLC AlexNet without Dropout (its
masks come from other random offsets in a graph), cuDNN in deterministic mode, ``--iters`` SGD
iterations each, one eager and one with ``solver.cuda_graph = True`` (two eager passes, then the
capture); prints the largest difference of any parameter relative to that parameter's largest
value, whether all are bit-identical, and the losses. Then AlexNet with Dropout, graphed: the
losses of ``--iters`` iterations (finite, and changing: the masks are drawn anew at each replay).
Timings: ``bench_alexnet.py --cuda_graph`` (session 10; this script replaced session 7's probe,
which captured the step by hand).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_alexnet import NUM_CLASSES, alexnet_param, sgd_solver  # noqa: E402

from caffe_compat import mode  # noqa: E402
from caffe_compat.net import TRAIN, Net  # noqa: E402
from caffe_compat.solvers import SGDSolver  # noqa: E402


def _solver(batch: int, device: torch.device, x, y, dropout: bool, graphed: bool, fake=None) -> SGDSolver:
    p = alexnet_param(batch, True)
    if not dropout:  # in place: removing them keeps the wiring
        keep = [layer for layer in p.layer if layer.type != "Dropout"]
        del p.layer[:]
        p.layer.extend(keep)
    mode.set_random_seed(1)
    net = Net(p, phase=TRAIN)
    net.to(device)
    net.blobs["data"].data[...] = x.numpy()
    net.blobs["label"].data[...] = y.numpy()
    solver = sgd_solver(net, device, "<probe>")
    if graphed and fake is not None:  # the CPU dry run: a stand-in for CUDA graphs
        net.use_cuda_graph(True, 2, fake)
    else:
        solver.cuda_graph = graphed
    return solver


def _train(solver: SGDSolver, iters: int) -> list[float]:
    losses: list[float] = []
    solver.loss_observers.append(lambda it, loss: losses.append(loss))
    solver.step(iters)
    solver.smoothed_loss  # noqa: B018 - reads the last loss
    return losses


def check(batch: int, device: torch.device, iters: int, fake=None) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 227, 227), torch.randint(0, NUM_CLASSES, (batch,)).float()
    runs = {}
    for graphed in (False, True):
        solver = _solver(batch, device, x, y, False, graphed, fake)
        losses = _train(solver, iters)
        runs[graphed] = ([p.detach().cpu().clone() for p in solver.net.learnable_params], losses)
        if graphed:
            captures = solver.net._graphed.captures
    worst = max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(runs[True][0], runs[False][0])
    )
    same = all(torch.equal(a, b) for a, b in zip(runs[True][0], runs[False][0]))
    print(
        f"batch {batch}: no Dropout, {iters} iterations, graph captured {captures}x: largest |graph - eager| / max|eager|"
    )
    print(f"  over the parameters {worst:.3g}; bit-identical {same}; losses equal {runs[True][1] == runs[False][1]}")
    print(f"  losses graph {[f'{v:.6g}' for v in runs[True][1]]}")
    print(f"  losses eager {[f'{v:.6g}' for v in runs[False][1]]}")
    dropout = _train(_solver(batch, device, x, y, True, True, fake), iters)
    print(f"  with Dropout, graphed: losses {[f'{v:.6g}' for v in dropout]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,4,10")
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--cpu_dry_run", action="store_true", help="no CUDA: graphs replaced by re-running the pass")
    args = ap.parse_args(argv)
    if args.cpu_dry_run:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tests.test_cuda_graph import ReplayingGraph

        check(2, torch.device("cpu"), 3, ReplayingGraph)
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device (use --cpu_dry_run to check the script)")
        return 1
    mode.set_mode_gpu()
    torch.backends.cudnn.deterministic = True
    device = torch.device("cuda", 0)
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}, cuDNN deterministic")
    for batch in [int(b) for b in args.batches.split(",")]:
        check(batch, device, args.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
