"""Draw a net definition, with Caffe's draw_net.py flags.

    python tools/draw_net.py input_net_proto_file output_image_file [--rankdir LR] [--phase ALL]
        [--display_lrm]

The output format follows the file's extension (.png, .svg, .pdf... through Graphviz's ``dot``;
.dot/.gv/.raw: the DOT text). Without ``dot`` installed an image is written as a .dot file next
to the requested name. ``--phase`` TRAIN or TEST keeps that phase's layers; ALL (default) all.
"""

from __future__ import annotations

import sys

from caffe_compat.cli._common import ArgumentParser, enable_python_layers, exits_130_on_interrupt, report_error
from caffe_compat.errors import CaffeError

__all__ = ["main", "build_parser"]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="draw_net.py", description="Draw a network graph (Caffe's draw_net.py).", python_layers=True
    )
    p.add_argument("input_net_proto_file", help="input network prototxt file")
    p.add_argument("output_image_file", help="output image file")
    p.add_argument("--rankdir", default="LR", help="one of TB (top-bottom), BT, LR (left-right), RL")
    p.add_argument("--phase", default="ALL", help="which network phase to draw: TRAIN, TEST or ALL (default)")
    p.add_argument("--display_lrm", action="store_true", help="show the learning-rate multipliers of learning layers")
    return p


@exits_130_on_interrupt("draw_net.py")
def main(argv: list[str] | None = None) -> int:
    prog = "draw_net.py"
    try:
        args = build_parser().parse_args(argv)
        enable_python_layers(args)
        from caffe_compat import draw
        from caffe_compat import io as cio
        from caffe_compat.proto import caffe_pb2

        phases = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST, "ALL": None}
        if args.phase.upper() not in phases:
            raise CaffeError(f"--phase {args.phase!r}: use TRAIN, TEST or ALL")
        net = cio.read_net(args.input_net_proto_file)
        print(f"Drawing net to {args.output_image_file}")
        written = draw.draw_net_to_file(
            net, args.output_image_file, args.rankdir, phases[args.phase.upper()], args.display_lrm
        )
        if written != args.output_image_file:
            print(f"Graphviz's dot is not installed: wrote the DOT text to {written}")
        return 0
    except (CaffeError, OSError) as e:
        return report_error(prog, e)


if __name__ == "__main__":
    sys.exit(main())
