"""Upgrade an old Caffe net definition or weights file to the current format.

    python tools/upgrade_net.py IN.prototxt OUT.prototxt
    python tools/upgrade_net.py --binary IN.caffemodel OUT.caffemodel
    python tools/upgrade_net.py --solver IN_solver.prototxt OUT_solver.prototxt

The counterpart of Caffe's ``upgrade_net_proto_text`` / ``upgrade_net_proto_binary``: V0 and
V1 layers, legacy data-transformation fields, net-level inputs and old BatchNorm param specs
are upgraded (``caffe_compat.upgrade.upgrade_net``); with ``--solver``, of
``upgrade_solver_proto_text``: the legacy ``solver_type`` enum becomes the ``type`` string
(``caffe_compat.upgrade.upgrade_solver``). The result is written atomically.
Errors print as one line and exit with status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys

from caffe_compat import io as caffe_io
from caffe_compat.cli._common import exits_130_on_interrupt
from caffe_compat.errors import CaffeError
from caffe_compat.proto import caffe_pb2
from caffe_compat.upgrade import net_needs_upgrade, upgrade_net, upgrade_solver

__all__ = ["main"]

log = logging.getLogger("upgrade_net")


@exits_130_on_interrupt("upgrade_net.py")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="upgrade_net.py", description="Upgrade a Caffe net (.prototxt), weights (.caffemodel) or solver."
    )
    parser.add_argument("input", help="the old .prototxt (or .caffemodel with --binary)")
    parser.add_argument("output", help="where to write the upgraded file")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--binary", action="store_true", help="the files are binary .caffemodel weights")
    kind.add_argument("--solver", action="store_true", help="the files are solver definitions (solver_type -> type)")
    args = parser.parse_args(argv)
    try:
        if args.solver:
            raw = caffe_io.read_prototxt(args.input, caffe_pb2.SolverParameter)
            if not raw.HasField("solver_type"):
                log.info("%s is already in the current format; copying it", args.input)
            caffe_io.write_solver(upgrade_solver(raw), args.output)
        elif args.binary:
            net = caffe_io.read_caffemodel(args.input)  # read_caffemodel upgrades
            caffe_io.write_caffemodel(net, args.output)
        else:
            raw = caffe_io.read_prototxt(args.input, caffe_pb2.NetParameter)
            if not net_needs_upgrade(raw):
                log.info("%s is already in the current format; copying it", args.input)
            net = upgrade_net(raw, source=args.input)
            caffe_io.write_net(net, args.output)
    except (CaffeError, OSError) as exc:
        print(f"upgrade_net.py: error: {exc}", file=sys.stderr)
        return 1
    log.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
