"""CPU forward time of AlexNet: our Net, onnxruntime on its ONNX export, OpenCV on its caffemodel.

    python benchmarks/bench_onnx.py [--batches 1,10] [--runs 7] [--warmup 3] [--threads 0]

AlexNet is tests/fixtures/caffe_reference/zoo/bvlc_alexnet/deploy.prototxt with seeded random
weights (``randomize_params``), saved as a .caffemodel and exported to ONNX in a temporary
folder. For each batch size each engine runs ``--warmup`` times untimed, then ``--runs`` timed
forwards on the same random input, the engines taking turns (round robin) so that load changes
hit all of them alike; the table gives the medians and each engine's ratio to our Net (from one
run of this script) and the largest difference of each engine's output to our Net's, relative
to its scale. Our Net runs under ``torch.no_grad()``. ``--threads`` sets torch's,
onnxruntime's and OpenCV's thread counts (0: each library's default). The 1-minute load average
is printed: on a shared machine the numbers move with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

import caffe_compat as caffe  # noqa: E402
from caffe_compat.export import onnx as ox  # noqa: E402

__all__ = ["main"]

PROTO = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "tests", "fixtures", "caffe_reference", "zoo", "bvlc_alexnet", "deploy.prototxt",
)  # fmt: skip


def _medians_ms(fns: list, runs: int, warmup: int, settle: float = 0.0, block: int = 1) -> list[float]:
    """Median time of each function; runs interleave the functions (round robin) so that a
    change of the machine's load affects all of them alike. ``settle``: seconds of sleep before
    each turn (onnxruntime's and OpenCV's worker threads keep spinning for a while after a call
    and would otherwise take the cores from whichever engine runs next).

    ``block`` > 1: each turn is one untimed call, which takes whatever the switch from the other
    engine costs (their spinning threads, cold caches, sleeping worker threads), then ``block``
    timed calls back to back: an engine's steady state, as a program that runs batch after batch
    sees it. ``block`` = 1: one timed call per turn, right after the settle sleep: the cost of a
    call that arrives at an idle process."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            time.sleep(settle)
            if block > 1:
                fn()
            for _ in range(block):
                t = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - t)
    return [statistics.median(ts) * 1e3 for ts in times]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,10", help="comma-separated batch sizes")
    ap.add_argument("--runs", type=int, default=7, help="timed runs per engine and batch size")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs of each engine first")
    ap.add_argument("--threads", type=int, default=0, help="threads for every engine (0: defaults)")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)

    net = caffe.Net(PROTO, caffe.TEST)
    ox.randomize_params(net, seed=0)
    tmp = tempfile.mkdtemp(prefix="bench_onnx_")
    weights = os.path.join(tmp, "alexnet.caffemodel")
    net.save(weights)

    print(f"AlexNet forward on CPU: median of {args.runs} interleaved runs after {args.warmup} warm-up runs (ms)")
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__}, "
        f"OpenCV {cv2.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start"
    )
    header = f"{'batch':>5}  {'engine':<32}  {'median ms':>10}  {'vs Net':>7}  {'max rel diff':>12}"
    print(header)
    print("-" * len(header))
    for n in batches:
        net.blobs["data"].reshape(n, 3, 227, 227)
        net.reshape()
        x = np.random.default_rng(n).standard_normal((n, 3, 227, 227)).astype(np.float32)
        path = os.path.join(tmp, f"alexnet_{n}.onnx")
        ox.export_onnx(net, path, check=False)

        xt = torch.from_numpy(x)

        def ours(xt=xt):
            with torch.no_grad():
                return net.run(data=xt)["prob"]

        opts = ort.SessionOptions()
        if args.threads:
            opts.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

        def onnxrt(sess=sess, x=x):
            return sess.run(["prob"], {"data": x})[0]

        cvnet = cv2.dnn.readNetFromCaffe(PROTO, weights)

        def opencv(cvnet=cvnet, x=x):
            cvnet.setInput(x, "data")
            return cvnet.forward("prob")

        engines = (
            ("caffe_compat Net (torch, no_grad)", ours),
            ("onnxruntime (ONNX export)", onnxrt),
            ("OpenCV dnn (caffemodel)", opencv),
        )
        ref = ours().numpy()
        scale = float(np.abs(ref).max())
        diffs = []
        for _, fn in engines:
            out = fn()
            out = out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
            diffs.append(float(np.abs(out.reshape(ref.shape) - ref).max()) / scale)
        medians = _medians_ms([fn for _, fn in engines], args.runs, args.warmup)
        for (name, _), ms, diff in zip(engines, medians, diffs):
            print(f"{n:>5}  {name:<32}  {ms:>10.1f}  {ms / medians[0]:>6.2f}x  {diff:>12.2e}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
