"""Train a net with a Caffe solver: ``caffe train`` (BVLC/caffe tools/caffe.cpp ``train()``).

    python tools/train.py --solver solver.prototxt [--weights a.caffemodel[,b.caffemodel]]
    python tools/train.py --solver solver.prototxt --snapshot snap_iter_1000.solverstate
    python tools/train.py --solver solver.prototxt --gpu 0

Flags as Caffe's: ``--solver``, ``--weights`` (finetune; comma-separated list, loaded into the
train and test nets; replaces the solver's ``weights``), ``--snapshot`` (resume from a
``.solverstate`` or ``.solverstate.h5``; not together with ``--weights``), ``--gpu`` (``0``,
``0,1``, ``all``; only one GPU for now), ``--level``, ``--stage`` (train net state),
``--sigint_effect`` / ``--sighup_effect`` (``stop``, ``snapshot``, ``none``; defaults ``stop`` and
``snapshot``). Additions: ``--iterations N`` sets ``max_iter``; ``--model M`` trains the net in
``M`` instead of the solver's (``net: M``). Without ``--gpu``, ``solver_mode: GPU`` in the solver
file uses GPU ``device_id`` when CUDA is available and the CPU otherwise (with a warning).

The log is Caffe's, in glog's format, on stderr. Errors print one line and exit with status 1.
"""

from __future__ import annotations

import logging
import sys

try:
    from tools._common import ArgumentParser, UsageError, parse_gpus, report_error, select_device, stages_from_flag
except ImportError:  # run as a script: tools/ is sys.path[0]
    from _common import ArgumentParser, UsageError, parse_gpus, report_error, select_device, stages_from_flag

from caffe_compat import io as cio
from caffe_compat.errors import CaffeError
from caffe_compat.proto import caffe_pb2
from caffe_compat.solvers import SignalHandler, solver_class
from caffe_compat.solvers.log import setup_logging

__all__ = ["main", "build_parser"]

log = logging.getLogger("caffe_compat")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train.py", description="Train a Caffe net with a solver (caffe train).")
    p.add_argument("--solver", default="", help="the solver definition (.prototxt)")
    p.add_argument("--weights", default="", help="weights to finetune from: a.caffemodel[,b.caffemodel...]")
    p.add_argument("--snapshot", default="", help="a .solverstate to resume training from")
    p.add_argument("--gpu", default="", help="GPU id(s): 0, 0,1 or all; CPU when omitted")
    p.add_argument("--iterations", type=int, default=None, help="override the solver's max_iter")
    p.add_argument("--model", default="", help="train this net instead of the solver's net")
    p.add_argument("--level", type=int, default=0, help="the train net's NetState level")
    p.add_argument("--stage", default="", help="the train net's NetState stages, comma-separated")
    p.add_argument("--sigint_effect", default="stop", choices=["stop", "snapshot", "none"])
    p.add_argument("--sighup_effect", default="snapshot", choices=["stop", "snapshot", "none"])
    return p


def _train(args) -> int:
    if not args.solver:
        raise UsageError("Need a solver definition to train (--solver solver.prototxt)")
    if args.snapshot and args.weights:
        raise UsageError(
            "Give a snapshot to resume training or weights to finetune but not both (--snapshot / --weights)"
        )
    param = cio.read_solver(args.solver)
    param.train_state.level = args.level
    for s in stages_from_flag(args.stage):
        param.train_state.stage.append(s)
    if args.model:
        for f in ("net", "net_param", "train_net", "train_net_param"):
            param.ClearField(f)
        param.net = args.model
    if args.iterations is not None:
        if args.iterations < 0:
            raise UsageError(f"--iterations must be >= 0 (got {args.iterations})")
        param.max_iter = args.iterations
    gpu_flag = args.gpu
    if not gpu_flag and param.HasField("solver_mode") and param.solver_mode == caffe_pb2.SolverParameter.GPU:
        import torch

        if torch.cuda.is_available():
            gpu_flag = str(param.device_id)
        else:
            log.warning("solver_mode: GPU in %s but no CUDA device is available; using the CPU", args.solver)
    select_device(parse_gpus(gpu_flag), log)
    if args.snapshot:
        param.ClearField("weights")
    elif args.weights:
        param.ClearField("weights")
        param.weights.append(args.weights)
    solver = solver_class(param.type)(param, source=args.solver)
    with SignalHandler(args.sigint_effect, args.sighup_effect) as handler:
        solver.set_action_function(handler.action)
        if args.snapshot:
            log.info("Resuming from %s", args.snapshot)
            solver.restore(args.snapshot)
        log.info("Starting Optimization")
        solver.solve()
    log.info("Optimization Done.")
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        args = build_parser().parse_args(argv)
        return _train(args)
    except (CaffeError, OSError) as e:
        return report_error("train.py", e)


if __name__ == "__main__":
    sys.exit(main())
