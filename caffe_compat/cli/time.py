"""Benchmark a net layer by layer: ``caffe time`` (BVLC/caffe tools/caffe.cpp ``time()``).

    python tools/time.py --model train_val.prototxt --iterations 50 [--gpu 0] [--phase TEST]

Builds the net (TRAIN phase unless ``--phase TEST``), does one clean forward and backward,
then times ``--iterations`` (50) forward-backward passes and logs Caffe's lines:
``Iteration: j forward-backward time: t ms.``, per layer ``<name>\\tforward: t ms.`` and
``<name>\\tbackward: t ms.`` (averages), ``Average Forward pass``, ``Average Backward pass``,
``Average Forward-Backward``, ``Total Time``.

Forward times come from hooks around each layer; the backward pass is one autograd call, so a
layer's backward time is measured from the moment the gradient of its outputs is ready to the
moment the gradients of its inputs and parameters are (on GPU each mark synchronizes the
device, which slows the run a little). Errors print one line and exit with status 1.
"""

from __future__ import annotations

import logging
import sys
import time as _time

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

__all__ = ["main", "build_parser", "benchmark"]

log = logging.getLogger("caffe_compat")


def build_parser(prog: str = "time.py") -> ArgumentParser:
    p = ArgumentParser(
        prog=prog, description="Time a Caffe net's forward and backward (caffe time).", python_layers=True
    )
    p.add_argument("--model", default="", help="the net definition (.prototxt)")
    p.add_argument("--iterations", type=int, default=50, help="number of timed passes (50)")
    p.add_argument("--gpu", default="", help="GPU id; CPU when omitted")
    p.add_argument("--phase", default="TRAIN", choices=["TRAIN", "TEST"], help="net phase (TRAIN)")
    p.add_argument("--level", type=int, default=0, help="NetState level")
    p.add_argument("--stage", default="", help="NetState stages, comma-separated")
    return p


class _LayerClock:
    """Hooks that time each layer's forward, and its share of the backward pass."""

    def __init__(self, net):
        self.net = net
        self.n = len(net.layers)
        self.forward_ms = [0.0] * self.n
        self.backward_ms = [0.0] * self.n
        self.cuda = any(p.is_cuda for layer in net.layers for p in layer.parameters()) or (
            getattr(net, "_device", torch.device("cpu")).type == "cuda"
        )
        self._t0: dict[int, float] = {}
        self._bw_start: dict[int, float] = {}
        self._bw_end: dict[int, float] = {}
        self._tensor_handles: list = []
        self._module_handles = []
        for i, layer in enumerate(net.layers):
            self._module_handles.append(layer.register_forward_pre_hook(self._pre(i)))
            self._module_handles.append(layer.register_forward_hook(self._post(i)))

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return _time.perf_counter()

    def _mark_start(self, i):
        def hook(grad):
            self._bw_start.setdefault(i, self.now())

        return hook

    def _mark_end(self, i):
        def hook(grad):
            self._bw_end[i] = self.now()

        return hook

    def _pre(self, i):
        def hook(module, inputs):
            for t in inputs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    self._tensor_handles.append(t.register_hook(self._mark_end(i)))
            self._t0[i] = self.now()

        return hook

    def _post(self, i):
        def hook(module, inputs, outputs):
            self.forward_ms[i] += (self.now() - self._t0[i]) * 1e3
            outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            for t in outs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    self._tensor_handles.append(t.register_hook(self._mark_start(i)))
            return None

        return hook

    def arm_params(self) -> None:
        for i, layer in enumerate(self.net.modules_by_name.values()):
            for p in layer.blobs:
                if p.requires_grad:
                    self._tensor_handles.append(p.register_hook(self._mark_end(i)))

    def end_iteration(self) -> None:
        for i, start in self._bw_start.items():
            end = self._bw_end.get(i)
            if end is not None and end >= start:
                self.backward_ms[i] += (end - start) * 1e3
        self._bw_start.clear()
        self._bw_end.clear()
        for h in self._tensor_handles:
            h.remove()
        self._tensor_handles.clear()

    def close(self) -> None:
        self.end_iteration()
        for h in self._module_handles:
            h.remove()


def benchmark(net, iterations: int) -> dict:
    """Time ``iterations`` forward-backward passes; log Caffe's lines; return the averages (ms)."""
    log.info("Performing Forward")
    net.forward()
    loss = np.float32(0)
    for name, blob in net.blobs.items():
        w = net.blob_loss_weights.get(name, 0.0)
        if w:
            loss = np.float32(loss + np.float32(w) * np.float32(np.sum(np.asarray(blob.data, dtype=np.float32))))
    log.info("Initial loss: %s", fmt(loss))
    log.info("Performing Backward")
    net.backward()
    log.info("*** Benchmark begins ***")
    log.info("Testing for %d iterations.", iterations)
    clock = _LayerClock(net)
    forward_total = backward_total = 0.0
    total_start = clock.now()
    try:
        for j in range(iterations):
            it_start = clock.now()
            clock.arm_params()
            net.forward()
            fw_end = clock.now()
            forward_total += (fw_end - it_start) * 1e3
            net.backward()
            bw_end = clock.now()
            backward_total += (bw_end - fw_end) * 1e3
            clock.end_iteration()
            log.info("Iteration: %d forward-backward time: %s ms.", j + 1, fmt((bw_end - it_start) * 1e3))
    finally:
        clock.close()
    total_ms = (clock.now() - total_start) * 1e3
    log.info("Average time per layer: ")
    names = list(net._layer_names)
    for i, name in enumerate(names):
        log.info("%10s\tforward: %s ms.", name, fmt(clock.forward_ms[i] / iterations))
        log.info("%10s\tbackward: %s ms.", name, fmt(clock.backward_ms[i] / iterations))
    log.info("Average Forward pass: %s ms.", fmt(forward_total / iterations))
    log.info("Average Backward pass: %s ms.", fmt(backward_total / iterations))
    log.info("Average Forward-Backward: %s ms.", fmt(total_ms / iterations))
    log.info("Total Time: %s ms.", fmt(total_ms))
    log.info("*** Benchmark ends ***")
    return {
        "forward_ms": dict(zip(names, [t / iterations for t in clock.forward_ms])),
        "backward_ms": dict(zip(names, [t / iterations for t in clock.backward_ms])),
        "forward_pass_ms": forward_total / iterations,
        "backward_pass_ms": backward_total / iterations,
        "total_ms": total_ms,
    }


def _time_net(args) -> int:
    from caffe_compat.net import TEST, TRAIN, Net

    if not args.model:
        raise UsageError("Need a model definition to time (--model net.prototxt)")
    if args.iterations < 1:
        raise UsageError(f"--iterations must be >= 1 (got {args.iterations})")
    select_device(parse_gpus(args.gpu), log)
    from caffe_compat import mode

    if mode.current_device().type == "cpu":
        mode.cache_cpu_allocations()  # as the solvers do: no page faults per pass
    phase = TRAIN if args.phase == "TRAIN" else TEST
    net = Net(args.model, phase=phase, level=args.level, stages=stages_from_flag(args.stage))
    net.disable_output_files()  # timing only looks: HDF5Output layers write nothing
    benchmark(net, args.iterations)
    return 0


@exits_130_on_interrupt("time.py")
def main(argv: list[str] | None = None, prog: str = "time.py") -> int:
    """``prog``: the name in usage and error lines (``caffe time`` when run as the caffe binary's command)."""
    setup_logging()
    try:
        args = build_parser(prog).parse_args(argv)
        enable_python_layers(args)
        return _time_net(args)
    except (CaffeError, OSError) as e:
        return report_error(prog, e)


if __name__ == "__main__":
    sys.exit(main())
