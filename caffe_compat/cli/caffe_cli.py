"""The ``caffe`` binary's command line: ``caffe <command> <args>`` (BVLC/caffe tools/caffe.cpp).

    caffe train -solver solver.prototxt [-weights w.caffemodel] [-gpu 0]
    caffe test -model train_val.prototxt -weights w.caffemodel -iterations 100
    caffe time -model train_val.prototxt -iterations 10
    caffe device_query -gpu 0

Installed as the ``caffe`` console script (from a checkout: ``python tools/caffe_cli.py``), so shell
scripts written for Caffe (``caffe train -solver ... 2>&1 | tee log``) run unchanged. ``train``,
``test`` and ``time`` are ``caffe_compat.cli.train``, ``.test`` and ``.time`` with the same flags (gflags' one-dash
spelling accepted); ``device_query`` prints the GPU's properties as torch reports them.
"""

from __future__ import annotations

import logging
import sys

from caffe_compat.cli._common import ArgumentParser, UsageError, exits_130_on_interrupt, parse_gpus, report_error
from caffe_compat.errors import CaffeError
from caffe_compat.solvers.log import setup_logging

__all__ = ["main", "device_query", "USAGE"]

log = logging.getLogger("caffe_compat")

USAGE = """caffe: command line brew
usage: caffe <command> <args>

commands:
  train           train or finetune a model
  test            score a model
  device_query    show GPU diagnostic information
  time            benchmark model execution time

each command takes --help"""


def device_query(argv: list[str]) -> int:
    """Caffe's ``device_query``: the properties of each GPU named by ``-gpu`` (ids, or ``all``)."""
    p = ArgumentParser(prog="caffe device_query", description="Show GPU diagnostic information.")
    p.add_argument("--gpu", default="", help="GPU id(s): 0, 0,1 or all")
    args = p.parse_args(argv)
    if not args.gpu:
        raise UsageError("Need a device ID to query (-gpu 0, -gpu 0,1 or -gpu all)")
    import torch

    setup_logging()
    gpus = parse_gpus(args.gpu)
    log.info("Querying GPUs %s", args.gpu)
    for gpu in gpus:
        props = torch.cuda.get_device_properties(gpu)
        rows = [
            ("Device id", gpu),
            ("Major revision number", props.major),
            ("Minor revision number", props.minor),
            ("Name", props.name),
            ("Total global memory", props.total_memory),
            ("Number of multiprocessors", props.multi_processor_count),
        ]
        for name in ("warp_size", "max_threads_per_multi_processor", "L2_cache_size", "is_integrated"):
            if hasattr(props, name):
                rows.append((name.replace("_", " ").capitalize(), getattr(props, name)))
        for name, value in rows:
            log.info("%-30s%s", f"{name}:", value)
    return 0


@exits_130_on_interrupt("caffe")
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, file=sys.stderr)
        return 0 if argv else 1
    command, rest = argv[0], argv[1:]
    if command == "train":
        from caffe_compat.cli import train

        return train.main(rest, prog="caffe train")
    if command == "test":
        from caffe_compat.cli import test

        return test.main(rest, prog="caffe test")
    if command == "time":
        from caffe_compat.cli import time as time_tool

        return time_tool.main(rest, prog="caffe time")
    if command == "device_query":
        try:
            return device_query(rest)
        except (CaffeError, OSError) as e:
            return report_error("caffe device_query", e)
    print(f"caffe: unknown action: {command}\n\n{USAGE}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
