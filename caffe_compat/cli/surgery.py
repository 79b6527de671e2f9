"""Net surgery: copy named layers' weights between caffemodels, or into a net.

    # into a net (built from its prototxt, optionally first loaded with --weights); fc -> conv:
    python tools/surgery.py --source bvlc_alexnet.caffemodel --model fully_conv.prototxt \\
        --map conv1,conv2,conv3,conv4,conv5 --map fc6:fc6-conv,fc7:fc7-conv,fc8:fc8-conv --fc-to-conv \\
        --output fully_conv.caffemodel
    # between caffemodels (the destination's other layers are kept as they are):
    python tools/surgery.py --source cae.caffemodel --dest-weights regressor.caffemodel \\
        --map conv1,conv2,conv3,conv4,conv5,fc6 --output regressor_from_cae.caffemodel

``--map src:dst`` (repeatable, comma-separated; a plain name maps to itself; none: every layer
present in both). Shapes must match (``--fc-to-conv`` allows equal counts: InnerProduct weights
reshaped into Convolution weights); ``--allow-mismatch`` skips mismatching layers instead of
failing. The report (copied, skipped, left at filler) is printed and, with ``--report``, saved
as JSON. Errors print one line and exit with status 1.
"""

from __future__ import annotations

import sys

from caffe_compat import io as cio
from caffe_compat.cli._common import ArgumentParser, UsageError, exits_130_on_interrupt, report_error
from caffe_compat.errors import CaffeError
from caffe_compat.solvers.log import setup_logging
from caffe_compat.surgery import copy_layers, parse_mapping

__all__ = ["main", "build_parser"]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="surgery.py",
        description="Copy named layers' weights between caffemodels / into a net.",
        python_layers=True,
    )
    p.add_argument("--source", required=True, help="weights to copy from (.caffemodel or .caffemodel.h5)")
    p.add_argument("--model", default="", help="destination net (.prototxt); its weights start at the fillers")
    p.add_argument("--weights", default="", help="with --model: load these weights into it first")
    p.add_argument("--dest-weights", default="", help="destination caffemodel (instead of --model)")
    p.add_argument("--output", required=True, help="the .caffemodel to write")
    p.add_argument("--map", action="append", default=[], help="src:dst layer pairs (repeatable, comma-separated)")
    p.add_argument("--fc-to-conv", action="store_true", help="allow reshaping (InnerProduct -> Convolution)")
    p.add_argument("--allow-mismatch", action="store_true", help="skip layers whose shapes differ instead of failing")
    p.add_argument("--report", default="", help="also write the report as JSON here")
    return p


def _run(args) -> int:
    if bool(args.model) == bool(args.dest_weights):
        raise UsageError("give exactly one destination: --model net.prototxt or --dest-weights net.caffemodel")
    try:
        mapping = parse_mapping(args.map)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.model:
        from caffe_compat.net import TEST, Net

        dst = Net(args.model, TEST, weights=args.weights or None)
    else:
        dst = cio.read_caffemodel(args.dest_weights)
    report = copy_layers(args.source, dst, mapping, reshape=args.fc_to_conv, strict=not args.allow_mismatch)
    if args.model:
        dst.save(args.output)
    else:
        cio.write_caffemodel(dst, args.output)
    print(report.to_text())
    print(f"wrote {args.output}")
    if args.report:
        report.save(args.report)
    return 0


@exits_130_on_interrupt("surgery.py")
def main(argv: list[str] | None = None) -> int:
    setup_logging(program="surgery")
    try:
        return _run(build_parser().parse_args(argv))
    except (CaffeError, OSError, ValueError) as e:
        return report_error("surgery.py", e)


if __name__ == "__main__":
    sys.exit(main())
