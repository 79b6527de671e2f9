"""Deconvolution on the CPU: the layer's phase path against torch's transposed convolution.

    python benchmarks/bench_deconv.py [--reps 7] [--calls 5] [--threads N]

For each geometry, the same Deconvolution computed by ``deconv2d_by_phases`` (one ordinary
convolution over the stride's output phases, interleaved, what the layer runs where it
pays: ``DeconvolutionLayer._by_phases``) and by ``F.conv_transpose2d`` (oneDNN's transposed
convolution), alternating in one process: forward (no autograd) and forward+backward (gradients
for the input, the weights and the bias). Prints the median over ``--reps`` rounds of the mean
of ``--calls`` calls, the ratio phases / transposed (below 1: the phase path is faster) and
whether the layer takes the phase path for that geometry.
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

from caffe_compat import mode as cmode  # noqa: E402
from caffe_compat.layers import layer_class  # noqa: E402
from caffe_compat.layers.conv import deconv2d_by_phases  # noqa: E402
from caffe_compat.proto import caffe_pb2  # noqa: E402

# (what, input (N, C, H, W), outputs, kernel, stride, pad, group)
GEOMETRIES = [
    ("dental CAE's last layer", (16, 48, 30, 30), 3, 12, 4, 0, 1),
    ("3 outputs, stride 2", (16, 64, 32, 32), 3, 4, 2, 1, 1),
    ("FCN-32s upscore", (1, 21, 16, 16), 21, 64, 32, 0, 1),
    ("FCN-8s upscore8", (1, 21, 70, 70), 21, 16, 8, 0, 1),
    ("bilinear x2, depthwise", (8, 64, 32, 32), 64, 4, 2, 1, 64),
    ("bilinear x8, depthwise (FCN)", (1, 21, 70, 70), 21, 16, 8, 0, 21),
    ("64 outputs, stride 2 (not taken)", (16, 64, 32, 32), 64, 4, 2, 1, 1),
]


def _takes_phases(shape, outputs, k, s, p, g) -> bool:
    lp = caffe_pb2.LayerParameter(name="up", type="Deconvolution", bottom=["x"], top=["up"])
    cp = lp.convolution_param
    cp.num_output, cp.group = outputs, g
    cp.kernel_size.append(k)
    cp.stride.append(s)
    cp.pad.append(p)
    layer = layer_class("Deconvolution", "up")(lp, [shape], caffe_pb2.TEST)
    return layer._by_phases(torch.empty(shape))


def _mean_ms(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="0: one per physical core (tune_cpu)")
    args = ap.parse_args(argv)
    cmode.tune_cpu(**({"threads": args.threads} if args.threads else {}))
    print(
        f"# torch {torch.__version__}, threads {torch.get_num_threads()}, float32; ms per call, median of {args.reps}"
    )
    print(f"{'geometry':34s} {'taken':>5s} {'what':>8s} {'phases':>8s} {'transp.':>8s} {'ratio':>6s}")
    gen = torch.Generator().manual_seed(0)
    for what, shape, outputs, k, s, p, g in GEOMETRIES:
        x = torch.randn(shape, generator=gen, requires_grad=True)
        w = torch.randn(shape[1], outputs // g, k, k, generator=gen, requires_grad=True)
        b = torch.randn(outputs, generator=gen, requires_grad=True)
        gy = torch.randn(F.conv_transpose2d(x, w, b, s, p, 0, g).shape, generator=gen)
        ops = {
            "phases": lambda x=x, w=w, b=b, s=s, p=p, g=g: deconv2d_by_phases(x, w, b, (s, s), (p, p), (1, 1), g),
            "transp.": lambda x=x, w=w, b=b, s=s, p=p, g=g: F.conv_transpose2d(x, w, b, s, p, 0, g),
        }

        def fwd(op):
            with torch.no_grad():
                op()

        def fwd_bwd(op, gy=gy, x=x, w=w, b=b):
            op().backward(gy)
            x.grad = w.grad = b.grad = None

        taken = "yes" if _takes_phases(shape, outputs, k, s, p, g) else "no"
        for name, run in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            times = {k_: [] for k_ in ops}
            for op in ops.values():
                run(op)  # warm-up
            for _ in range(args.reps):
                for k_, op in ops.items():
                    times[k_].append(_mean_ms(lambda op=op, run=run: run(op), args.calls))
            a, t = statistics.median(times["phases"]), statistics.median(times["transp."])
            print(f"{what:34s} {taken:>5s} {name:>8s} {a:8.2f} {t:8.2f} {a / t:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
