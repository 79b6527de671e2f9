"""``python -m caffe_compat summary NET.prototxt [--draw out.dot|png] [--rankdir LR] [--phase TEST]``
``python -m caffe_compat run SCRIPT.py [ARGS...]``
``python -m caffe_compat --version``

``summary`` builds the net (the prototxt's fillers give the weights; no data is read for deploy nets),
prints its summary table (``caffe_compat.summary``: layers, bottoms -> tops, top shapes,
parameter counts, FLOPs, totals) and optionally draws it (``caffe_compat.draw``; a .png/.svg
needs Graphviz's ``dot``, else a .dot file is written next to it).

``run`` runs a script written for pycaffe as it is: ``import caffe`` (and ``caffe.proto``,
``caffe.io``, ...) give caffe_compat (``caffe_compat.install_as_caffe``; refused when a real Caffe
is importable), the script runs as ``__main__`` with ``sys.argv = [SCRIPT, ARGS...]``.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from caffe_compat import __version__

    p = argparse.ArgumentParser(prog="python -m caffe_compat", description="caffe_compat command-line helpers")
    p.add_argument("--version", action="version", version=f"caffe-compat {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="print a net's layers, shapes, parameters and FLOPs")
    s.add_argument("model", help="the net definition (.prototxt)")
    s.add_argument("--phase", choices=["TRAIN", "TEST"], default="TEST", help="phase to build (default TEST)")
    s.add_argument("--batch", type=int, default=0, help="set the inputs' batch size first")
    s.add_argument("--splits", action="store_true", help="list the Split layers Caffe inserts")
    s.add_argument("--draw", default="", help="also draw the net into this file (.dot, .png, .svg...)")
    s.add_argument("--rankdir", default="LR", choices=["LR", "TB", "BT", "RL"], help="drawing direction")
    r = sub.add_parser("run", help="run a pycaffe script unchanged ('import caffe' gives caffe_compat)")
    r.add_argument("script", help="the Python script")
    r.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    return p


def run_script(args) -> int:
    import os
    import runpy

    import caffe_compat
    from caffe_compat.errors import CaffeError

    if not os.path.isfile(args.script):
        raise CaffeError(f"{args.script}: no such script")
    if not caffe_compat.install_as_caffe():
        raise CaffeError(
            "a real Caffe is importable ('import caffe' finds it): run the script with it, or remove it "
            "from the Python path to run it on caffe_compat"
        )
    sys.argv = [args.script, *args.args]
    script_dir = os.path.dirname(os.path.abspath(args.script))
    if script_dir not in sys.path:
        sys.path.insert(0, script_dir)  # as `python SCRIPT.py` does
    runpy.run_path(args.script, run_name="__main__")
    return 0


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
        if args.command == "run":
            return run_script(args)
    except (CaffeError, OSError) as e:
        print(f"python -m caffe_compat {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
