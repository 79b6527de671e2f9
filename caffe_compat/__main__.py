"""``python -m caffe_compat summary NET.prototxt [--draw out.dot|png] [--rankdir LR] [--phase TEST]``

Builds the net (the prototxt's fillers give the weights; no data is read for deploy nets),
prints its summary table (``caffe_compat.summary``: layers, bottoms -> tops, top shapes,
parameter counts, FLOPs, totals) and optionally draws it (``caffe_compat.draw``; a .png/.svg
needs Graphviz's ``dot``, else a .dot file is written next to it).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m caffe_compat", description="caffe_compat command-line helpers")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="print a net's layers, shapes, parameters and FLOPs")
    s.add_argument("model", help="the net definition (.prototxt)")
    s.add_argument("--phase", choices=["TRAIN", "TEST"], default="TEST", help="phase to build (default TEST)")
    s.add_argument("--batch", type=int, default=0, help="set the inputs' batch size first")
    s.add_argument("--splits", action="store_true", help="list the Split layers Caffe inserts")
    s.add_argument("--draw", default="", help="also draw the net into this file (.dot, .png, .svg...)")
    s.add_argument("--rankdir", default="LR", choices=["LR", "TB", "BT", "RL"], help="drawing direction")
    return p


def run_summary(args) -> int:
    import caffe_compat as caffe
    from caffe_compat import draw, summary

    phase = caffe.TRAIN if args.phase == "TRAIN" else caffe.TEST
    net = caffe.Net(args.model, phase)
    if args.batch:
        for b in net.inputs:
            net.blobs[b].reshape(args.batch, *net.blobs[b].shape[1:])
        net.reshape()
    rows = summary.summarize(net, splits=args.splits)
    print(summary.format_summary(rows, title=f"net {net.name!r} ({args.model}, {args.phase})"))
    if args.draw:
        written = draw.draw_net_to_file(net, args.draw, rankdir=args.rankdir)
        print(f"drew the net into {written}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from caffe_compat.errors import CaffeError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "summary":
            return run_summary(args)
    except (CaffeError, OSError) as e:
        print(f"python -m caffe_compat {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
