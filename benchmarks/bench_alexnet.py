"""AlexNet speed: caffe_compat's Net against a hand-written PyTorch AlexNet, side by side.

    python benchmarks/bench_alexnet.py [--batches 1,2,4,10,16,32,64] [--reps 3] [--device cpu|cuda]
                                       [--threads N] [--channels_last] [--baseline_channels_last]
                                       [--compile] [--precision fp32|bf16|fp16] [--fused_update on|chunked|off|compile]
                                       [--baseline_same] [--fwd_api forward|run] [--profile] [--memory]
                                       [--no_label_check] [--lrn_window auto|slices|reduction]
                                       [--loss_read late|now] [--host_reads pycaffe|both|none]
                                       [--cuda_graph]

Both models have BVLC AlexNet's topology (``prototxt/alexnet_deploy.prototxt``: grouped convs,
LRN, ceil-mode max pooling, dropout) and are timed in one process, alternating, on the same
input; the figure is the median over ``--reps`` alternating rounds of the mean over
``--iters`` calls (after ``--warmup`` calls). Three measurements per batch size:

- ``fwd``: inference forward (TEST phase; ``torch.no_grad`` on both sides — our
  ``net.forward()`` and the baseline's ``softmax(model.eval()(x))``, the deploy net's Softmax
  included on both sides since session 6; ``--fwd_api run``: our
  ``net.run(data=x)``, which returns tensors instead of pycaffe's NumPy arrays, i.e. no host copy
  and no synchronisation per call on a GPU);
- ``fwd+bwd``: TRAIN-phase forward with a SoftmaxWithLoss / ``cross_entropy`` loss, then the
  backward into the parameters (ours: ``net.forward_backward()``; the baseline:
  ``loss.backward()``);
- ``iter``: one full solver iteration (ours: ``solver.step(1)`` of Caffe's SGD with momentum 0.9,
  weight decay 5e-4 and AlexNet's lr_mult/decay_mult; the baseline: ``zero_grad``, forward,
  backward, ``torch.optim.SGD(momentum=0.9, weight_decay=5e-4).step()``). On a GPU our solver
  reads each iteration's loss once the next one is queued (``--loss_read now``: at once, i.e. the
  host waits for the device every iteration, as before session 6).

``--cuda_graph`` (a GPU): our passes (``fwd``, ``fwd_bwd``, and in ``iter`` the solver's pass; the
update stays eager) replay CUDA graphs (``Net.use_cuda_graph``); with ``--baseline_same`` the
hand-written calls are captured too (torch's whole-network recipe, the optimizer step inside the
``iter`` graph), else the baseline stays eager.

What each side reads back to the host per call (``--host_reads``; it matters on a GPU, where a
read waits for the device and stops the host from queuing the next call ahead of it):

- ``pycaffe`` (default, the measurement before session 9): ours through the APIs above, which read
  the outputs (``forward()``) or the loss (``forward_backward()``; the solver, late), the baseline
  reads nothing;
- ``both``: the baseline reads what ours reads: ``softmax(...).cpu().numpy()`` and
  ``loss.item()`` after the backward (``iter``: ours with ``--loss_read now``, the baseline's
  ``loss.item()`` every iteration);
- ``none``: neither side reads: ours ``net.run(data=x)`` (tensors out) and
  ``net.forward_backward_pending()`` (the loss left unread); ``iter`` as ``pycaffe`` (Caffe's solver
  reads every iteration's loss, ours late).

The two symmetric settings time the same work on both sides, i.e. the interpreter's overhead.

Ratios are ours / baseline (below 1: we are faster). The baseline is idiomatic PyTorch
(``nn.Conv2d(groups=2)``, ``nn.LocalResponseNorm``, ``nn.MaxPool2d(ceil_mode=True)``,
``nn.ReLU(inplace=True)``, ``nn.Dropout``, ``nn.Linear``); options that speed up our side and
that the baseline could use too (channels_last) are reported for the baseline as well.
Opt-ins on our side (docs/benchmarks.md): ``--compile`` (``Net.compile()``; ``--compile_mode``
e.g. ``reduce-overhead`` for CUDA graphs; the first call's compile time is printed), ``--precision bf16|fp16`` (``caffe_compat.mode.set_precision``: autocast
with fp32 master weights; fp16 adds loss scaling), ``--channels_last``, ``--fused_update off``
(the whole-tensor update instead of the chunked one), ``--fused_update chunked`` (SGD's chunked
operations instead of its fused kernel: the default before session 8), ``--fused_update compile`` (the opt-in
``torch.compile``'d SGD update). ``--baseline_same`` gives the baseline the
same compile / autocast / channels_last treatment (``torch.compile(model)``, ``torch.autocast``);
by default it stays the plain float32 eager model the issue's targets are measured against.
Each batch also prints ``iter / torch fwd_bwd`` (the issue's training-iteration target: <= 0.62).
``--memory`` adds the peak resident memory of a training step for each side (each in a fresh
subprocess, on the CPU) or the peak CUDA allocation (on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from caffe_compat import io as cio  # noqa: E402
from caffe_compat import mode as cmode  # noqa: E402
from caffe_compat.net import TEST, TRAIN, Net  # noqa: E402
from caffe_compat.proto import caffe_pb2  # noqa: E402
from caffe_compat.solvers import SGDSolver  # noqa: E402

__all__ = ["main", "alexnet_param", "TorchAlexNet"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "prototxt", "alexnet_deploy.prototxt")
NUM_CLASSES = 1000


# ---------------------------------------------------------------------------------------------
# the two models


def alexnet_param(batch: int, train: bool) -> caffe_pb2.NetParameter:
    """prototxt/alexnet_deploy.prototxt with input batch ``batch``; for training, a ``label``
    Input and SoftmaxWithLoss replace the final Softmax."""
    p = cio.read_net(DEPLOY)
    data = p.layer[0]
    data.input_param.shape[0].dim[0] = batch
    if train:
        label = caffe_pb2.LayerParameter(name="label", type="Input", top=["label"])
        label.input_param.shape.add().dim.extend([batch])
        p.layer.insert(1, label)
        last = p.layer[-1]
        assert last.type == "Softmax", last.type
        last.type = "SoftmaxWithLoss"
        last.name = "loss"
        del last.top[:]
        last.bottom.append("label")
        last.top.append("loss")
    return p


ALEXNET_WIDTHS = {"conv1": 96, "conv2": 256, "conv3": 384, "conv4": 384, "conv5": 256, "fc6": 4096, "fc7": 4096}


class TorchAlexNet(nn.Module):
    """BVLC AlexNet written the way a PyTorch user would write it (``widths``: the layers' output
    channels, ``ALEXNET_WIDTHS`` by default; ``pool5_size``: pool5's spatial size, 6 at 227x227)."""

    def __init__(self, num_classes: int = NUM_CLASSES, widths: dict | None = None, pool5_size: int = 6):
        super().__init__()
        w = widths or ALEXNET_WIDTHS
        self.features = nn.Sequential(
            nn.Conv2d(3, w["conv1"], 11, stride=4),
            nn.ReLU(inplace=True),
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(w["conv1"], w["conv2"], 5, padding=2, groups=2),
            nn.ReLU(inplace=True),
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(w["conv2"], w["conv3"], 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w["conv3"], w["conv4"], 3, padding=1, groups=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(w["conv4"], w["conv5"], 3, padding=1, groups=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, ceil_mode=True),
        )
        self.classifier = nn.Sequential(
            nn.Linear(w["conv5"] * pool5_size * pool5_size, w["fc6"]),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(w["fc6"], w["fc7"]),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(w["fc7"], num_classes),
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


# ---------------------------------------------------------------------------------------------
# the measured callables


# Real Caffe 1.0 (OpenBLAS) on BVLC AlexNet, batch 10, float32, 2 cores with AVX-512: the anchors
# of issue 8, measured outside this project (Caffe no longer builds here).
CAFFE_FWD_MS = 191.0
CAFFE_FWD_BWD_MS = 401.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sgd_solver(net: Net, device: torch.device, source: str = "<bench>") -> SGDSolver:
    """Caffe's SGD as the benchmarks train: lr 0.01 (fixed), momentum 0.9, weight decay 5e-4 (the
    hand-written model's ``torch.optim.SGD`` settings), no display, no end."""
    sp = caffe_pb2.SolverParameter(
        base_lr=0.01, lr_policy="fixed", momentum=0.9, weight_decay=5e-4, display=0, max_iter=10**9
    )
    return SGDSolver(sp, source=source, net=net, device=device)


class Ours:
    """Our side: a TEST net for inference, a TRAIN net under Caffe's SGD solver for training."""

    def __init__(
        self,
        batch: int,
        device: torch.device,
        x: torch.Tensor,
        y: torch.Tensor,
        test: bool = True,
        opts: argparse.Namespace | None = None,
    ):
        self.test_net = Net(alexnet_param(batch, False), phase=TEST) if test else None
        self.train_net = Net(alexnet_param(batch, True), phase=TRAIN)
        if device.type != "cpu":
            self.train_net.to(device)
            if test:
                self.test_net.to(device)
        for net in (self.train_net, self.test_net):
            if net is not None and opts is not None:
                if opts.channels_last:
                    net.to(memory_format=torch.channels_last)
                if opts.compile:
                    net.compile(**({"mode": opts.compile_mode} if opts.compile_mode else {}))
        self.solver = sgd_solver(self.train_net, device)
        if opts is not None:
            self.solver.lag_loss_read = getattr(opts, "loss_read", "late") == "late"
            if getattr(opts, "host_reads", "pycaffe") == "both":
                self.solver.lag_loss_read = False
            self.solver.fused_update = opts.fused_update != "off"
            self.solver.compiled_update = opts.fused_update == "compile"
            self.solver.fused_kernel = opts.fused_update == "on"
            if getattr(opts, "cuda_graph", False):  # forward_backward and the solver's passes: one graph
                self.solver.cuda_graph = True
                self.solver._use_cuda_graph(True)
        self.fwd_api = getattr(opts, "fwd_api", "forward") if opts is not None else "forward"
        self.reads = getattr(opts, "host_reads", "pycaffe") if opts is not None else "pycaffe"
        if self.reads == "none":
            self.fwd_api = "run"
        self.x = x.to(device)
        # inputs written once (a data layer would write them each iteration on both sides)
        if test:
            self.test_net.blobs["data"].data[...] = x.cpu().numpy()
        self.train_net.blobs["data"].data[...] = x.cpu().numpy()
        self.train_net.blobs["label"].data[...] = y.cpu().numpy()
        if opts is not None and getattr(opts, "cuda_graph", False):
            if test:
                self.test_net.use_cuda_graph(True)
            for _ in range(3):  # the eager warm-up passes and the captures, before any timing
                self.fwd_bwd()
                if test:
                    self.fwd()

    def fwd(self) -> None:
        with torch.no_grad():
            if self.fwd_api == "run":  # tensors out (no host copies of the outputs on a GPU)
                self.test_net.run(data=self.x)
            else:  # pycaffe's forward: NumPy outputs (on a GPU: copied to the host, a sync)
                self.test_net.forward()

    def fwd_bwd(self) -> None:
        self.train_net.clear_param_diffs()
        if self.reads == "none":  # the loss left unread, as the baseline leaves its own
            self.train_net.forward_backward_pending()
        else:
            self.train_net.forward_backward()

    def iter(self) -> None:
        self.solver.step(1)


class Baseline:
    """The hand-written model (``model``; ``TorchAlexNet()`` by default) under torch.optim.SGD."""

    def __init__(
        self,
        device: torch.device,
        x: torch.Tensor,
        y: torch.Tensor,
        channels_last: bool,
        compile: bool = False,
        amp: torch.dtype | None = None,
        compile_mode: str = "",
        reads: bool = False,
        graph: bool = False,
        model: nn.Module | None = None,
    ):
        self.model = (TorchAlexNet() if model is None else model).to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=fmt)
        self.x = x.to(device).contiguous(memory_format=fmt)
        self.y = y.to(device).long()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.call = (
            torch.compile(self.model, **({"mode": compile_mode} if compile_mode else {})) if compile else self.model
        )
        self.device, self.amp = device, amp
        self.reads = reads  # read the outputs / the loss on the host, as ours does (--host_reads both)
        # --cuda_graph --baseline_same: the training calls replayed from graphs (torch's recipe)
        self.graphs = {"fwd": None, "fwd_bwd": None, "iter": None} if graph else None

    def _graphed(self, what: str) -> None:
        """Replay ``what``'s CUDA graph, capturing it at the first call (after warm-up calls on
        the capture's side stream); the loss is a static tensor, read like the eager one."""
        g = self.graphs[what]
        if g is None:
            step = what == "iter"

            def body() -> torch.Tensor:
                if what == "fwd":
                    with torch.no_grad():
                        return torch.softmax(self.call(self.x), dim=1)
                loss = self._loss()
                loss.backward()
                if step:
                    self.opt.step()
                return loss

            self.model.train(what != "fwd")
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.opt.zero_grad(set_to_none=True)
                    body()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.opt.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss = body()
            g = self.graphs[what] = (graph, loss)
        g[0].replay()
        if self.reads:
            g[1].cpu().numpy() if what == "fwd" else g[1].item()

    def _loss(self) -> torch.Tensor:
        if self.amp is None:
            return F.cross_entropy(self.call(self.x), self.y)
        # no cast cache under a CUDA graph (torch's rule for autocast in captures)
        with torch.autocast(self.device.type, dtype=self.amp, cache_enabled=self.graphs is None):
            return F.cross_entropy(self.call(self.x).float(), self.y)

    def fwd(self) -> None:
        if self.graphs is not None:
            return self._graphed("fwd")
        self.model.eval()
        with torch.no_grad():  # the deploy net ends with Softmax ("prob"): the same work here
            prob = torch.softmax(self.call(self.x), dim=1)
            if self.reads:
                prob.cpu().numpy()

    def fwd_bwd(self) -> None:
        if self.graphs is not None:
            return self._graphed("fwd_bwd")
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss()
        loss.backward()
        if self.reads:
            loss.item()

    def iter(self) -> None:
        if self.graphs is not None:
            return self._graphed("iter")
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss()
        loss.backward()
        if self.reads:
            loss.item()
        self.opt.step()


def _time(fn, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters * 1e3


# ---------------------------------------------------------------------------------------------
# memory: one training step per side in a fresh process


def _vm_hwm_mb() -> float:
    # VmHWM belongs to this process's address space (ru_maxrss would carry the parent's over exec)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_child(side: str, batch: int) -> None:
    before = _vm_hwm_mb()
    runner = _make_side(side, batch, torch.device("cpu"))
    for _ in range(2):
        runner.iter()
    print(json.dumps({"before_mb": before, "peak_mb": _vm_hwm_mb()}))


def _make_side(side: str, batch: int, device: torch.device, opts: argparse.Namespace | None = None):
    """One side for a memory measurement (``opts``: only ``--cuda_graph`` [with ``--baseline_same``])."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 227, 227)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    graph = opts is not None and opts.cuda_graph
    if side == "ours":
        ours = Ours(batch, device, x, y, test=False)
        if graph:
            ours.solver.cuda_graph = True
        return ours
    return Baseline(device, x, y, False, graph=graph and opts.baseline_same)


def _peak_cuda(side: str, batch: int, device: torch.device, opts: argparse.Namespace | None = None) -> float:
    """Peak CUDA allocation (MB) of two training steps (with ``--cuda_graph``: four, the graph
    captured at the third), the model's parameters included."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    runner = _make_side(side, batch, device, opts)
    for _ in range(4 if opts is not None and opts.cuda_graph else 2):
        runner.iter()
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    del runner
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def _peak_rss(side: str, batch: int, threads: int, no_tune: bool) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--_memchild", side, "--batches", str(batch)]
    out = subprocess.run(
        cmd + (["--no_tune"] if no_tune else []),
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


# ---------------------------------------------------------------------------------------------


def print_machine(device: torch.device, tuned: dict) -> None:
    """The header lines every run prints: torch, device, threads, CPUs, load average, whether
    ``tune_cpu`` cached allocations, the GPU's name."""
    load = os.getloadavg()
    print(
        f"# torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"cpus {os.cpu_count()}, load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(f"# tune_cpu malloc caching (process-wide: both sides): {tuned['cache_allocations']}")
    if device.type == "cuda":
        print(f"# {torch.cuda.get_device_name(device)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,2,4,10,16,32,64")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--iters", type=int, default=0, help="timed calls per round (0: by batch size)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per physical core)")
    p.add_argument(
        "--no_tune", action="store_true", help="skip caffe_compat.mode.tune_cpu (malloc caching; both sides)"
    )
    p.add_argument("--what", default="fwd,fwd_bwd,iter")
    p.add_argument("--baseline_channels_last", action="store_true")
    p.add_argument("--compile", action="store_true", help="our nets: Net.compile() (torch.compile)")
    p.add_argument(
        "--compile_mode", default="", help="torch.compile's mode for --compile (e.g. reduce-overhead: CUDA graphs)"
    )
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="our training precision")
    p.add_argument("--channels_last", action="store_true", help="our nets in channels_last")
    p.add_argument(
        "--fused_update",
        default="on",
        choices=["on", "chunked", "off", "compile"],
        help="our solver's update: default (on: SGD's fused kernel, else chunked), chunked operations only "
        "(chunked, the default before session 8), whole tensors (off), torch.compile'd",
    )
    p.add_argument(
        "--baseline_same", action="store_true", help="baseline too: torch.compile / autocast / channels_last"
    )
    p.add_argument(
        "--fwd_api",
        default="forward",
        choices=["forward", "run"],
        help="our fwd: pycaffe's net.forward() (NumPy outputs) or net.run(data=tensor) (tensors out)",
    )
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables for every batch")
    p.add_argument(
        "--no_label_check",
        action="store_true",
        help="measurement only: skip the loss layers' label range check (on a GPU a host sync per pass)",
    )
    p.add_argument(
        "--lrn_window",
        default="auto",
        choices=["auto", "slices", "reduction"],
        help="how our LRN sums its channel windows (auto: slices on the CPU, one reduction elsewhere)",
    )
    p.add_argument(
        "--loss_read",
        default="late",
        choices=["late", "now"],
        help="our solver on a GPU: read an iteration's loss once the next is queued (late), or at once",
    )
    p.add_argument(
        "--host_reads",
        default="pycaffe",
        choices=["pycaffe", "both", "none"],
        help="host reads per call: ours through pycaffe's APIs, the baseline none (pycaffe); the same on both "
        "sides (both: outputs / loss read each call; none: nothing read, ours through net.run and "
        "forward_backward_pending)",
    )
    p.add_argument(
        "--cuda_graph",
        action="store_true",
        help="ours: training passes replayed from a CUDA graph (Net.use_cuda_graph); with --baseline_same the "
        "hand-written training calls too (torch's whole-network capture)",
    )
    p.add_argument("--memory", action="store_true", help="peak memory of a training step (CPU: RSS)")
    p.add_argument("--_memchild", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    tuned = {"threads": torch.get_num_threads(), "cache_allocations": False}
    if args.no_tune:  # our solvers would otherwise cache allocations themselves (process-wide)
        os.environ["CAFFE_COMPAT_CPU_MALLOC"] = "default"
    if args.device == "cpu" and not args.no_tune:
        tuned = cmode.tune_cpu(args.threads or None)
    elif args.threads:
        torch.set_num_threads(args.threads)
    if args.no_label_check:  # what the check's host synchronisation costs, nothing else
        from caffe_compat.layers import loss as loss_layers

        loss_layers._check_label_range = lambda *a, **k: None
    if args.lrn_window != "auto":  # same bits on the CPU either way; measures the kernels' cost
        from caffe_compat.layers import norm

        norm.WINDOW_BY_REDUCTION = args.lrn_window == "reduction"
    if args._memchild:
        _peak_rss_child(args._memchild, batches[0])
        return 0

    device = torch.device(args.device)
    if device.type == "cuda":
        cmode.set_mode_gpu()
        cmode.set_device(device.index or 0)
    whats = args.what.split(",")
    cmode.set_precision(args.precision)
    amp = cmode.autocast_dtype() if args.baseline_same else None
    base_cl = args.baseline_channels_last or (args.baseline_same and args.channels_last)
    base_compile = args.baseline_same and args.compile
    print_machine(device, tuned)
    print(
        f"# median of {args.reps} alternating rounds; ms per call; ratio = ours / baseline"
        + ("; baseline channels_last" if base_cl else "")
    )
    print(
        f"# ours: precision {args.precision}, compile {args.compile}, channels_last {args.channels_last}, "
        f"fused_update {args.fused_update}, cuda_graph {args.cuda_graph}; baseline: precision "
        f"{args.precision if amp else 'fp32'}, compile {base_compile}, cuda_graph {args.cuda_graph and args.baseline_same}; "
        f"host reads {args.host_reads}"
    )
    header = (
        f"{'batch':>5} {'what':>8} {'ours ms':>9} {'torch ms':>9} {'ratio':>6} {'ours img/s':>10} {'torch img/s':>11}"
    )
    print(header)
    results = []
    for batch in batches:
        torch.manual_seed(0)
        x = torch.randn(batch, 3, 227, 227)
        y = torch.randint(0, NUM_CLASSES, (batch,))
        ours = Ours(batch, device, x, y, opts=args)
        base = Baseline(
            device,
            x,
            y,
            base_cl,
            compile=base_compile,
            amp=amp,
            compile_mode=args.compile_mode,
            reads=args.host_reads == "both",
            graph=args.cuda_graph and args.baseline_same,
        )
        iters = args.iters or max(2, min(10, 40 // batch))
        if args.compile:  # the first calls compile (forward, forward+backward): time them once
            for name, runner in (("ours", ours), ("torch", base)):
                if name == "torch" and not base_compile:
                    continue
                for what in whats:
                    t0 = time.perf_counter()
                    getattr(runner, what)()
                    _sync(device)
                    print(f"# {name} {what}: first call (compiles) {time.perf_counter() - t0:.1f} s", flush=True)
        per_batch = {}
        if args.profile:
            _profile(ours, base, whats)
        for what in whats:
            t_ours, t_base = [], []
            for _ in range(args.reps):
                t_ours.append(_time(getattr(ours, what), device, args.warmup, iters))
                t_base.append(_time(getattr(base, what), device, args.warmup, iters))
            mo, mb = statistics.median(t_ours), statistics.median(t_base)
            results.append({"batch": batch, "what": what, "ours_ms": mo, "torch_ms": mb})
            per_batch[what] = (mo, mb)
            print(
                f"{batch:>5} {what:>8} {mo:>9.1f} {mb:>9.1f} {mo / mb:>6.3f} "
                f"{batch / mo * 1e3:>10.1f} {batch / mb * 1e3:>11.1f}",
                flush=True,
            )
        if "iter" in per_batch and "fwd_bwd" in per_batch:
            load = os.getloadavg()
            print(
                f"# batch {batch}: ours iter / torch fwd_bwd = {per_batch['iter'][0] / per_batch['fwd_bwd'][1]:.3f} "
                f"(target <= 0.62); load avg {load[0]:.2f}",
                flush=True,
            )
        if batch == 10 and args.device == "cpu":  # issue 8's anchors: real Caffe 1.0, 2 vCPUs, batch 10
            for what, anchor in (("fwd", CAFFE_FWD_MS), ("iter", CAFFE_FWD_BWD_MS)):
                if what in per_batch:
                    print(
                        f"# batch 10: ours {what} / Caffe 1.0 {'forward' if what == 'fwd' else 'forward+backward'} "
                        f"({anchor:.0f} ms on a 2-vCPU machine of this kind) = {per_batch[what][0] / anchor:.3f}"
                        + (" (target <= 0.70)" if what == "iter" else ""),
                        flush=True,
                    )
        del ours, base
    if args.memory:
        for batch in batches:
            if device.type == "cpu":
                mo = _peak_rss("ours", batch, torch.get_num_threads(), args.no_tune)
                mb = _peak_rss("torch", batch, torch.get_num_threads(), args.no_tune)
                what = "peak RSS"
            else:
                mo, mb = _peak_cuda("ours", batch, device, args), _peak_cuda("torch", batch, device, args)
                what = "peak CUDA allocation"
            print(
                f"# {what} of a training step, batch {batch}: ours {mo:.0f} MB, torch {mb:.0f} MB, ratio {mo / mb:.3f}"
            )
    load = os.getloadavg()
    print(f"# load avg at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


_SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _profile(ours: Ours, base: Baseline, whats: list[str]) -> None:
    """torch.profiler tables of one call per side; on a GPU sorted by kernel time, with a summary
    line: the call's wall time, the GPU's busy time, GPU operations and host synchronisations."""
    from torch.profiler import ProfilerActivity, profile

    cuda = ours.x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for what in whats:
        for name, runner in (("ours", ours), ("torch", base)):
            fn = getattr(runner, what)
            fn()
            _sync(ours.x.device)
            t0 = time.perf_counter()
            with profile(activities=activities) as prof:
                fn()
                _sync(ours.x.device)
            wall = (time.perf_counter() - t0) * 1e3
            print(f"## profile {name} {what}")
            if not cuda:
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
                continue
            events = prof.events()
            gpu_ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.time_range.elapsed_us() for e in gpu_ops) / 1e3
            syncs = {k: sum(1 for e in events if e.name == k) for k in _SYNC_EVENTS}
            copies = [e for e in events if e.name.startswith("cudaMemcpy")]
            print(
                f"# {name} {what}: wall {wall:.2f} ms (profiled), GPU busy {busy:.2f} ms, GPU ops {len(gpu_ops)}, "
                f"syncs {syncs}, cudaMemcpy* calls {len(copies)}"
            )
            for e in copies:  # which operations copied between host and device
                chain, parent = [], e.cpu_parent
                while parent is not None and len(chain) < 4:
                    chain.append(parent.name)
                    parent = parent.cpu_parent
                print(f"#   {e.name} <- {' <- '.join(chain) or '?'}")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14))


if __name__ == "__main__":
    sys.exit(main())
