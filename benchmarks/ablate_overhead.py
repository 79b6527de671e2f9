"""Where our extra host time goes at small batches: the tiny AlexNet of bench_overhead.py with one
part of ours at a time replaced by PyTorch's own operation (measurement only: the replacements do
not keep Caffe's numerics), against the hand-written model.

    python benchmarks/ablate_overhead.py [--device cuda] [--reps 5] [--calls 200]

Variants: ``ours`` as shipped; ``dropout``: Dropout as ``F.dropout``; ``lrn``: LRN as
``F.local_response_norm``; ``loss``: SoftmaxWithLoss as ``F.cross_entropy`` (no label check);
``check``: no label check; ``all``: every replacement. Prints, per variant, the median over
``--reps`` round-robin rounds of the mean time of ``--calls`` training passes (``fwd``: the
training forward with the loss; ``fwd_bwd``: forward and backward into the parameters) and the
ratio to the hand-written model's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_overhead import (  # noqa: E402
    NUM_CLASSES,
    SIZE,
    WIDTHS,
    TorchAlexNet,
    _gpu_paths_on_cpu,
    mean_call_us,
    tiny_param,
)

from caffe_compat.layers import loss as loss_mod  # noqa: E402
from caffe_compat.layers.loss import SoftmaxWithLossLayer  # noqa: E402
from caffe_compat.layers.neuron import DropoutLayer  # noqa: E402
from caffe_compat.layers.norm import LRNLayer  # noqa: E402
from caffe_compat.net import TRAIN, Net  # noqa: E402


def _dropout(self, x):
    return (F.dropout(x, self.ratio, self.train_phase),)


def _lrn(self, x):
    return (F.local_response_norm(x, self.size, self.alpha, self.beta, self.k),)


def _loss(self, x, label):
    return (F.cross_entropy(x, label.long()),)


PATCHES = {
    "dropout": [(DropoutLayer, "forward", _dropout)],
    "lrn": [(LRNLayer, "forward", _lrn)],
    "loss": [(SoftmaxWithLossLayer, "forward", _loss)],
    "check": [(loss_mod, "_check_label_range", lambda layer, labels, valid, n, raw=None: labels)],
}
PATCHES["all"] = PATCHES["dropout"] + PATCHES["lrn"] + PATCHES["loss"]


class _Patched:
    """Apply a variant's replacements while its net runs."""

    def __init__(self, patches):
        self.patches, self.saved = patches, []

    def __enter__(self):
        self.saved = [(obj, name, getattr(obj, name)) for obj, name, _ in self.patches]
        for obj, name, fn in self.patches:
            setattr(obj, name, fn)

    def __exit__(self, *exc):
        for obj, name, fn in self.saved:
            setattr(obj, name, fn)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)
    if device.type == "cpu":
        _gpu_paths_on_cpu()
    torch.manual_seed(0)
    x = torch.randn(1, 3, SIZE, SIZE)
    y = torch.tensor([3.0])

    variants = {}
    for name in ["ours", *PATCHES]:
        net = Net(tiny_param(True), phase=TRAIN)
        net.to(device)
        net.blobs["data"].data[...] = x.numpy()
        net.blobs["label"].data[...] = y.numpy()
        variants[name] = (net, _Patched(PATCHES.get(name, [])))
    model = TorchAlexNet(NUM_CLASSES, WIDTHS, pool5_size=1).to(device)
    xd, yd = x.to(device), y.to(device).long()

    def timed(fn) -> float:
        return mean_call_us(fn, args.calls, device)

    def ours_fwd(net):
        def run():
            net.clear_param_diffs()
            with torch.enable_grad():
                net._eager.forward_loss()

        return run

    def ours_fwd_bwd(net):
        def run():
            net.clear_param_diffs()
            net.forward_backward_pending()

        return run

    def torch_fwd():
        model.train()
        F.cross_entropy(model(xd), yd)

    def torch_fwd_bwd():
        model.train()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xd), yd).backward()

    print(f"# tiny AlexNet, batch 1, {SIZE}x{SIZE}, device {device}; us per call, ratio to the hand-written model")
    for what, make, base in (("fwd", ours_fwd, torch_fwd), ("fwd_bwd", ours_fwd_bwd, torch_fwd_bwd)):
        times = {name: [] for name in [*variants, "torch"]}
        for _ in range(args.reps):
            for name, (net, patched) in variants.items():
                with patched:
                    times[name].append(timed(make(net)))
            times["torch"].append(timed(base))
        ref = statistics.median(times["torch"])
        for name, ts in times.items():
            m = statistics.median(ts)
            print(f"{what:>8} {name:>8} {m:8.0f} {m / ref:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
