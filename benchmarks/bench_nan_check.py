"""What the gradient check before every update costs: AlexNet solver iterations with
``nan_policy`` stop (the default: the loss, InnerProduct weights through their witnesses, every
other gradient summed) against ``continue`` (Caffe's: no check), and ``direct`` (stop with
``nan_check_gradients``: every gradient summed, no witnesses).

    python benchmarks/bench_nan_check.py [--batches 1,10] [--reps 5] [--iters 5] [--warmup 2]
                                         [--device cpu|cuda] [--threads N]

One solver (``bench_alexnet``'s: Caffe's SGD, momentum 0.9, weight decay 5e-4) per batch size;
the settings take turns on it, round after round, so that drifts of a shared machine hit them
alike. Each figure is the median over ``--reps`` rounds of the mean of ``--iters`` iterations
(``solver.step(1)``; after ``--warmup`` of them). Ratios are against ``continue``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_alexnet import NUM_CLASSES, alexnet_param, sgd_solver  # noqa: E402

from caffe_compat.net import TRAIN, Net  # noqa: E402

__all__ = ["main"]

SETTINGS = {"continue": ("continue", False), "stop": ("stop", False), "direct": ("stop", True)}


def _solver(batch: int, device: torch.device):
    net = Net(alexnet_param(batch, True), phase=TRAIN)
    if device.type != "cpu":
        net.to(device)
    gen = torch.Generator().manual_seed(0)
    net.blobs["data"].data[...] = torch.randn(tuple(net.blobs["data"].shape), generator=gen).numpy()
    net.blobs["label"].data[...] = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).numpy()
    return sgd_solver(net, device)


def _time(solver, setting: str, iters: int, warmup: int, device: torch.device) -> float:
    solver.nan_policy, solver.nan_check_gradients = SETTINGS[setting]
    solver.step(warmup)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    solver.step(iters)
    _ = solver.smoothed_loss  # reads the last loss (and its check) on a GPU
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / iters * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,10")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for batch in (int(b) for b in args.batches.split(",")):
        solver = _solver(batch, device)
        times: dict[str, list[float]] = {s: [] for s in SETTINGS}
        for _ in range(args.reps):
            for setting in SETTINGS:
                times[setting].append(_time(solver, setting, args.iters, args.warmup, device))
        base = statistics.median(times["continue"])
        cells = [f"{s} {statistics.median(t):.2f} ms ({statistics.median(t) / base:.4f})" for s, t in times.items()]
        print(f"batch {batch}: " + ", ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
