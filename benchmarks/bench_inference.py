"""CPU inference: our Net against onnxruntime (on our own ONNX export) and OpenCV dnn, four nets.

    python benchmarks/bench_inference.py [--nets alexnet,resnet50,mobilenet,squeezenet]
        [--batches 1,10] [--runs 15] [--warmup 3] [--threads 0] [--ours forward,run]
        [--settle 0.05] [--block 5]

Each net is a deploy prototxt shipped with the tests (AlexNet from the model zoo, ResNet-50,
MobileNet v1 and SqueezeNet 1.1 from the real-world set) with seeded random weights
(``randomize_params``), saved as a .caffemodel (which OpenCV reads) and exported to ONNX by
``caffe_compat.export.onnx`` (which onnxruntime runs). For each net and batch size every engine
runs ``--warmup`` times untimed, then the engines take ``--runs`` turns each (round robin, so that
a change of load hits all of them alike) on the same random input. A turn is a ``--settle`` sleep,
one untimed call (it absorbs what switching engines costs: the previous engine's spinning worker
threads, caches it evicted) and ``--block`` timed calls back to back: the steady state of a
program that runs batch after batch. ``--block 1`` times the single call right after the sleep
instead: a request that arrives at an idle process (torch's OpenMP workers then pay for waking
up, onnxruntime's much less), the protocol before session 13. The table gives
each engine's median and its ratio to onnxruntime's (ours / onnxruntime: below 1.00 we are
faster), and the largest difference of each output to our Net's, relative to its scale.

Our Net is timed as a pycaffe script calls it: ``net.forward(data=x)`` with a NumPy array in and
the output blob's NumPy array out (``--ours forward``); ``--ours run`` adds ``net.run(data=t)``,
tensors in and out. ``--threads`` sets torch's, onnxruntime's and OpenCV's thread counts (0: each
library's default). The 1-minute load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cv2  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

import caffe_compat as caffe  # noqa: E402
from caffe_compat.export import onnx as ox  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_onnx import _medians_ms  # noqa: E402

__all__ = ["main", "NETS"]

_REF = os.path.join(ROOT, "tests", "fixtures", "caffe_reference")
NETS = {
    "alexnet": os.path.join(_REF, "zoo", "bvlc_alexnet", "deploy.prototxt"),
    "resnet50": os.path.join(_REF, "realworld", "resnet50", "deploy.prototxt"),
    "mobilenet": os.path.join(_REF, "realworld", "mobilenet", "deploy.prototxt"),
    "squeezenet": os.path.join(_REF, "realworld", "squeezenet11", "deploy.prototxt"),
}


def _engines(name: str, proto: str, batch: int, tmp: str, threads: int, ours_modes: list[str]):
    """(label, function) pairs for one net at one batch size, and the input array."""
    net = caffe.Net(proto, caffe.TEST)
    ox.randomize_params(net, seed=0)
    inp, out = net.inputs[0], net.outputs[-1]
    shape = (batch,) + tuple(net.blobs[inp].data.shape[1:])
    net.blobs[inp].reshape(*shape)
    net.reshape()
    weights = os.path.join(tmp, f"{name}.caffemodel")
    net.save(weights)
    onnx_path = os.path.join(tmp, f"{name}_{batch}.onnx")
    ox.export_onnx(net, onnx_path, check=False)
    x = np.random.default_rng(batch).standard_normal(shape).astype(np.float32)
    xt = torch.from_numpy(x)

    engines = []
    if "forward" in ours_modes:
        engines.append(("ours: net.forward(data=x)", lambda: net.forward(**{inp: x})[out]))
    if "run" in ours_modes:

        def run():
            with torch.no_grad():
                return net.run(**{inp: xt})[out]

        engines.append(("ours: net.run (tensors)", run))
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    engines.append(("onnxruntime (our ONNX export)", lambda: sess.run([out], {inp: x})[0]))
    cvnet = cv2.dnn.readNetFromCaffe(proto, weights)

    def opencv():
        cvnet.setInput(x, inp)
        return cvnet.forward(out)

    engines.append(("OpenCV dnn (our caffemodel)", opencv))
    return engines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default=",".join(NETS), help="comma-separated: " + ", ".join(NETS))
    ap.add_argument("--batches", default="1,10", help="comma-separated batch sizes")
    ap.add_argument("--runs", type=int, default=15, help="turns per engine, net and batch")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs of each engine first")
    ap.add_argument("--threads", type=int, default=0, help="threads for every engine (0: defaults)")
    ap.add_argument("--ours", default="forward", help="comma-separated: forward, run")
    ap.add_argument("--settle", type=float, default=0.05, help="seconds of sleep before each engine's turn")
    ap.add_argument(
        "--block", type=int, default=5,
        help="timed calls per turn after one untimed call (steady state); 1: one call per turn, cold",
    )  # fmt: skip
    args = ap.parse_args(argv)
    nets = [n for n in args.nets.split(",") if n]
    unknown = [n for n in nets if n not in NETS]
    if unknown:
        ap.error(f"unknown net(s) {', '.join(unknown)}; choose from {', '.join(NETS)}")
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    caffe.set_mode_cpu()

    turn = f"{args.block} timed calls after an untimed one" if args.block > 1 else "one timed call"
    print(
        f"CPU forward, float32: median over {args.runs} interleaved turns of {turn} per engine, "
        f"{args.settle:g} s of sleep before each turn, after {args.warmup} warm-up runs (ms)"
    )
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__}, "
        f"OpenCV {cv2.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start"
    )
    header = f"{'net':<10} {'batch':>5}  {'engine':<30}  {'median ms':>10}  {'vs ORT':>7}  {'max rel diff':>12}"
    print(header)
    print("-" * len(header))
    tmp = tempfile.mkdtemp(prefix="bench_inference_")
    for name in nets:
        for n in batches:
            engines = _engines(name, NETS[name], n, tmp, args.threads, args.ours.split(","))
            ref = np.array(engines[0][1](), copy=True)
            scale = float(np.abs(ref).max()) or 1.0
            diffs = []
            for _, fn in engines:
                got = fn()
                got = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
                diffs.append(float(np.abs(got.reshape(ref.shape) - ref).max()) / scale)
            medians = _medians_ms([fn for _, fn in engines], args.runs, args.warmup, args.settle, args.block)
            ort_ms = medians[[label for label, _ in engines].index("onnxruntime (our ONNX export)")]
            for (label, _), ms, diff in zip(engines, medians, diffs):
                print(f"{name:<10} {n:>5}  {label:<30}  {ms:>10.2f}  {ms / ort_ms:>6.2f}x  {diff:>12.2e}")
            sys.stdout.flush()
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
