"""Score a trained net: ``caffe test`` (BVLC/caffe tools/caffe.cpp ``test()``).

    python tools/test.py --model train_val.prototxt --weights net.caffemodel --iterations 100

Builds the net in TEST phase (``--level``, ``--stage`` complete its NetState), loads
``--weights``, runs ``--iterations`` (50) forward passes and logs, as Caffe,
``Batch i, <output> = v`` for every element of every output, ``Loss: <mean loss>`` and then
``<output> = <mean>`` (with `` (* w = w*mean loss)`` for loss outputs). ``--gpu 0`` runs on
that GPU (an error without CUDA); ``--cuda_graph`` with it replays the forward passes from a CUDA
graph (``Net.use_cuda_graph``). Errors print one line and exit with status 1.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import torch

from caffe_compat.cli._common import (
    ArgumentParser,
    UsageError,
    enable_python_layers,
    exits_130_on_interrupt,
    parse_gpus,
    report_error,
    select_device,
    stages_from_flag,
)
from caffe_compat.errors import CaffeError
from caffe_compat.solvers.log import fmt, setup_logging

__all__ = ["main", "build_parser", "score"]

log = logging.getLogger("caffe_compat")


def build_parser(prog: str = "test.py") -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Score a Caffe net over N batches (caffe test).", python_layers=True)
    p.add_argument("--model", default="", help="the net definition (.prototxt)")
    p.add_argument("--weights", default="", help="the trained weights (.caffemodel or .h5)")
    p.add_argument("--iterations", type=int, default=50, help="number of batches (50)")
    p.add_argument("--gpu", default="", help="GPU id; CPU when omitted")
    p.add_argument("--level", type=int, default=0, help="NetState level")
    p.add_argument("--stage", default="", help="NetState stages, comma-separated")
    p.add_argument(
        "--cuda_graph",
        action="store_true",
        help="with --gpu: replay the forward passes from a CUDA graph (the same kernels, less host time)",
    )
    return p


def score(net, iterations: int) -> tuple[float, list[tuple[str, float, float]]]:
    """Run ``iterations`` forwards; log Caffe's lines. Returns (mean loss, [(name, mean, weight)])."""
    f32 = np.float32
    scores: list[np.ndarray] | None = None
    loss = f32(0)
    with torch.no_grad():
        for i in range(iterations):
            outputs = net.forward()
            iter_loss = f32(0)
            for name, blob in net.blobs.items():
                w = net.blob_loss_weights.get(name, 0.0)
                if w:
                    iter_loss = f32(iter_loss + f32(w) * f32(np.sum(np.asarray(blob.data, dtype=np.float32))))
            loss = f32(loss + iter_loss)
            vals = [np.array(outputs[o], dtype=np.float32).ravel() for o in net.outputs]
            for name, v in zip(net.outputs, vals):
                for x in v:
                    log.info("Batch %d, %s = %s", i, name, fmt(x))
            if scores is None:
                scores = vals
            else:
                for acc, v in zip(scores, vals):
                    acc += v
    loss = f32(loss / f32(iterations))
    log.info("Loss: %s", fmt(loss))
    results = []
    for name, acc in zip(net.outputs, scores or []):
        w = f32(net.blob_loss_weights.get(name, 0.0))
        for x in acc:
            mean = f32(x / f32(iterations))
            extra = f" (* {fmt(w)} = {fmt(f32(w * mean))} loss)" if w else ""
            log.info("%s = %s%s", name, fmt(mean), extra)
            results.append((name, float(mean), float(w)))
    return float(loss), results


def _test(args) -> int:
    from caffe_compat.net import TEST, Net

    if not args.model:
        raise UsageError("Need a model definition to score (--model net.prototxt)")
    if not args.weights:
        raise UsageError("Need model weights to score (--weights net.caffemodel)")
    if args.iterations < 1:
        raise UsageError(f"--iterations must be >= 1 (got {args.iterations})")
    gpus = parse_gpus(args.gpu)
    if args.cuda_graph and not gpus:
        raise UsageError("--cuda_graph needs --gpu (CUDA graphs replay GPU work)")
    select_device(gpus, log)
    net = Net(args.model, phase=TEST, level=args.level, stages=stages_from_flag(args.stage))
    net.copy_from(args.weights)
    if args.cuda_graph:
        net.use_cuda_graph()
        log.info("Forward passes replayed from a CUDA graph (--cuda_graph)")
    log.info("Running for %d iterations.", args.iterations)
    score(net, args.iterations)
    return 0


@exits_130_on_interrupt("test.py")
def main(argv: list[str] | None = None, prog: str = "test.py") -> int:
    """``prog``: the name in usage and error lines (``caffe test`` when run as the caffe binary's command)."""
    setup_logging()
    try:
        args = build_parser(prog).parse_args(argv)
        enable_python_layers(args)
        return _test(args)
    except (CaffeError, OSError) as e:
        return report_error(prog, e)


if __name__ == "__main__":
    sys.exit(main())
