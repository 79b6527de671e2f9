"""Train a net with a Caffe solver: ``caffe train`` (BVLC/caffe tools/caffe.cpp ``train()``).

    python tools/train.py --solver solver.prototxt [--weights a.caffemodel[,b.caffemodel]]
    python tools/train.py --solver solver.prototxt --snapshot snap_iter_1000.solverstate
    python tools/train.py --solver solver.prototxt --gpu 0

Flags as Caffe's: ``--solver``, ``--weights`` (finetune; comma-separated list, loaded into the
train and test nets; replaces the solver's ``weights``), ``--snapshot`` (resume from a
``.solverstate`` or ``.solverstate.h5``; not together with ``--weights``), ``--gpu`` (``0``,
``0,1``, ``all``), ``--level``, ``--stage`` (train net state),
``--sigint_effect`` / ``--sighup_effect`` (``stop``, ``snapshot``, ``none``; defaults ``stop`` and
``snapshot``). Additions: ``--sigterm_effect`` (default ``stop``: a pre-empted job writes its
final snapshot and exits 0, where Caffe dies without one; in one process only: those of a
multi-process run keep SIGTERM's default, with which their launcher ends them when a peer
fails); ``--nan_policy stop|continue`` (default ``stop``: a NaN/Inf loss or gradient ends
training with status 1, naming the iteration and the layer, and no snapshot of non-finite
weights is written; ``continue``: Caffe's behaviour; see ``caffe_compat.solvers.nonfinite``);
``--iterations N`` sets ``max_iter``; ``--model M`` trains the net in ``M`` instead of the
solver's (``net: M``); speed opt-ins that depart from Caffe's float32 order
of operations (docs/benchmarks.md): ``--precision bf16|fp16`` (autocast, float32 master weights;
fp16 with loss scaling), ``--channels_last`` (the nets' 4-D parameters in NHWC too: CPU
float32 training passes run the convolutions' activations in NHWC by default), ``--compile``
(``torch.compile`` of the nets; the first iterations compile). ``--cuda_graph`` (one GPU)
replays each training pass from a CUDA graph: the same kernels, without the per-layer Python that
bounds small batches on a GPU (``caffe_compat.cuda_graph``). Without ``--gpu``, ``solver_mode: GPU`` in the solver
file uses GPU ``device_id`` when CUDA is available and the CPU otherwise (with a warning).

Several GPUs (Caffe's multi-GPU training, see docs/multi_gpu.md): ``--gpu 0,1`` or ``--gpu all``
starts one process per GPU joined with NCCL; every process runs ``batch_size`` on its own share
of the data, gradients are averaged, rank 0 logs, tests and snapshots. ``--cpu-procs N``
(an addition) does the same with N CPU processes and gloo, for testing without GPUs. Under
``torchrun`` (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set, WORLD_SIZE > 1) each process joins
torchrun's group: with ``--gpu`` (or ``solver_mode: GPU`` and CUDA) rank uses GPU
``ids[LOCAL_RANK]`` (``--gpu all``: GPU ``LOCAL_RANK``) with NCCL, otherwise the CPU with gloo.

The log is Caffe's, in glog's format, on stderr; with ``GLOG_log_dir`` set also in glog's files
there (``caffe.INFO`` links to the newest, as Caffe's; ``tools/parse_log.py`` reads it).
``GLOG_minloglevel`` filters as glog's. Errors print one line and exit with status 1; Ctrl-C
before the first iteration (while the nets are built) prints one line and exits with status 130.
"""

from __future__ import annotations

import logging
import os
import sys

from caffe_compat import io as cio
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
from caffe_compat.proto import caffe_pb2
from caffe_compat.solvers import SignalHandler, distributed, solver_class
from caffe_compat.solvers.log import setup_logging

__all__ = ["main", "build_parser"]

log = logging.getLogger("caffe_compat")


def build_parser(prog: str = "train.py") -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Train a Caffe net with a solver (caffe train).", python_layers=True)
    p.add_argument("--solver", default="", help="the solver definition (.prototxt)")
    p.add_argument("--weights", default="", help="weights to finetune from: a.caffemodel[,b.caffemodel...]")
    p.add_argument("--snapshot", default="", help="a .solverstate to resume training from")
    p.add_argument("--gpu", default="", help="GPU id(s): 0, 0,1 or all (one process per GPU); CPU when omitted")
    p.add_argument(
        "--cpu-procs",
        dest="cpu_procs",
        type=int,
        default=0,
        help="train with N processes on the CPU (gloo), as N GPUs would: for testing without GPUs",
    )
    p.add_argument("--iterations", type=int, default=None, help="override the solver's max_iter")
    p.add_argument("--model", default="", help="train this net instead of the solver's net")
    p.add_argument("--level", type=int, default=0, help="the train net's NetState level")
    p.add_argument("--stage", default="", help="the train net's NetState stages, comma-separated")
    p.add_argument("--sigint_effect", default="stop", choices=["stop", "snapshot", "none"])
    p.add_argument("--sighup_effect", default="snapshot", choices=["stop", "snapshot", "none"])
    p.add_argument(
        "--sigterm_effect",
        default="stop",
        choices=["stop", "snapshot", "none"],
        help="what SIGTERM (a cluster's pre-emption) does: stop (with the final snapshot), snapshot, none",
    )
    p.add_argument(
        "--nan_policy",
        default="stop",
        choices=["stop", "continue"],
        help="a NaN/Inf loss or gradient: stop (an error naming the layer; no snapshot) or continue (Caffe's)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="training precision: fp32 (Caffe's), or bf16/fp16 autocast with fp32 weights (fp16: loss scaling)",
    )
    p.add_argument(
        "--channels_last",
        action="store_true",
        help="keep the nets' 4-D parameters in channels_last (NHWC) too, a speed opt-in; CPU float32 training passes "
        "already run the convolutions' activations in it (docs/benchmarks.md)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the nets (opt-in; the first iterations compile)"
    )
    p.add_argument(
        "--cuda_graph",
        action="store_true",
        help="one GPU: replay each training pass from a CUDA graph (the same kernels without the per-layer Python)",
    )
    return p


def _solver_param(args) -> caffe_pb2.SolverParameter:
    """The solver file with the command line's overrides."""
    param = cio.read_solver(args.solver)
    param.train_state.level = args.level
    for s in stages_from_flag(args.stage):
        param.train_state.stage.append(s)
    if args.model:
        for f in ("net", "net_param", "train_net", "train_net_param"):
            param.ClearField(f)
        param.net = args.model
    if args.iterations is not None:
        param.max_iter = args.iterations
    if args.snapshot:
        param.ClearField("weights")
    elif args.weights:
        param.ClearField("weights")
        param.weights.append(args.weights)
    return param


def _gpu_flag(args, param: caffe_pb2.SolverParameter) -> str:
    if args.gpu or not (param.HasField("solver_mode") and param.solver_mode == caffe_pb2.SolverParameter.GPU):
        return args.gpu
    import torch

    if torch.cuda.is_available():
        return "all" if distributed.launched_by_torchrun() else str(param.device_id)
    log.warning("solver_mode: GPU in %s but no CUDA device is available; using the CPU", args.solver)
    return ""


def _run(args, param: caffe_pb2.SolverParameter) -> int:
    """Build the solver and train (in this process, which may be one rank of several)."""
    from caffe_compat import mode

    before, compile_before = mode.precision(), mode.compile_enabled()
    mode.set_precision(getattr(args, "precision", "fp32"))
    if getattr(args, "compile", False):
        mode.set_compile(True, **compile_before[1])
    try:
        solver = solver_class(param.type, args.solver)(param, source=args.solver)
        solver.nan_policy = getattr(args, "nan_policy", "stop")
        if getattr(args, "channels_last", False):
            import torch

            for net in [solver.net, *solver.test_nets]:
                net.to(memory_format=torch.channels_last)
            log.info("Nets in channels_last memory format (--channels_last)")
        if getattr(args, "cuda_graph", False):
            solver.cuda_graph = True
        # one process alone: the processes of --gpu 0,1 / --cpu-procs / torchrun keep SIGTERM's
        # default, with which their launcher ends them when a peer fails
        sigterm = getattr(args, "sigterm_effect", "stop") if not distributed.is_distributed() else None
        with SignalHandler(args.sigint_effect, args.sighup_effect, sigterm) as handler:
            solver.set_action_function(handler.action)
            if args.snapshot:
                log.info("Resuming from %s", args.snapshot)
                solver.restore(args.snapshot)
            log.info("Starting Optimization")
            solver.solve()
    finally:
        mode.set_precision(before)
        mode.set_compile(compile_before[0], **compile_before[1])
    log.info("Optimization Done.")
    return 0


def _worker(rank: int, world_size: int, args, gpus: list[int]) -> int:
    """One process of ``--gpu 0,1`` / ``--cpu-procs N`` (started by ``distributed.launch``)."""
    setup_logging()
    distributed.quiet_non_root_logging()
    try:
        select_device(gpus[rank : rank + 1], log)
        return _run(args, _solver_param(args))
    except (CaffeError, OSError) as e:
        return report_error(f"train.py (rank {rank})", e)


def _train_torchrun(args, param: caffe_pb2.SolverParameter, gpus: list[int]) -> int:
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    device_id = None
    if gpus:
        if local_rank >= len(gpus):
            raise UsageError(
                f"--gpu {args.gpu}: torchrun started local rank {local_rank} but only {len(gpus)} GPU id(s) "
                "are given; give one id per process on this node (or --gpu all)"
            )
        device_id = gpus[local_rank]
    distributed.init_from_env("nccl" if gpus else "gloo", device_id)
    import torch.distributed as dist

    try:
        distributed.quiet_non_root_logging()
        select_device([device_id] if device_id is not None else [], log)
        status = _run(args, param)
        dist.barrier()  # no rank tears the group down while a peer is in its last collective
        return status
    finally:
        dist.destroy_process_group()


def _train(args) -> int:
    if not args.solver:
        raise UsageError("Need a solver definition to train (--solver solver.prototxt)")
    if args.snapshot and args.weights:
        raise UsageError(
            "Give a snapshot to resume training or weights to finetune but not both (--snapshot / --weights)"
        )
    if args.iterations is not None and args.iterations < 0:
        raise UsageError(f"--iterations must be >= 0 (got {args.iterations})")
    if args.cpu_procs < 0:
        raise UsageError(f"--cpu-procs must be >= 1 (got {args.cpu_procs})")
    if args.cpu_procs and args.gpu:
        raise UsageError("--cpu-procs trains on the CPU; it cannot be combined with --gpu")
    param = _solver_param(args)
    gpus = parse_gpus(_gpu_flag(args, param))
    if distributed.launched_by_torchrun():
        if args.cpu_procs > 1:
            raise UsageError("--cpu-procs starts its own processes; under torchrun use torchrun --nproc-per-node")
        return _train_torchrun(args, param, gpus)
    if len(gpus) > 1 or args.cpu_procs > 1:
        if gpus:
            log.info("Using GPUs %s", ", ".join(map(str, gpus)))
            n, backend = len(gpus), "nccl"
        else:
            log.info("Using %d CPU processes (gloo)", args.cpu_procs)
            n, backend = args.cpu_procs, "gloo"
        return distributed.launch(_worker, n, (args, gpus), backend=backend, devices=gpus or None)
    select_device(gpus, log)
    return _run(args, param)


@exits_130_on_interrupt("train.py")
def main(argv: list[str] | None = None, prog: str = "train.py") -> int:
    """``prog``: the name in usage and error lines (``caffe train`` when run as the caffe binary's command)."""
    setup_logging()
    try:
        args = build_parser(prog).parse_args(argv)
        enable_python_layers(args)
        return _train(args)
    except (CaffeError, OSError) as e:
        status = report_error(prog, e)
        if "data/dental" in str(e) and not os.path.isdir("data/dental"):
            print(
                "train.py: hint: the paper app's solvers read data/dental/, which is not there yet: "
                "run `python tools/prepare_dental.py` from the repository root first (docs/paper.md)",
                file=sys.stderr,
            )
        return status
    except KeyboardInterrupt:  # Ctrl-C before the solver's signal handler is installed
        print(
            "train.py: interrupted (SIGINT) during start-up, before the first iteration; nothing was written",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
