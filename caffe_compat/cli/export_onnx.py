"""Export a Caffe net to ONNX and check it against onnxruntime.

    python tools/export_onnx.py --model deploy.prototxt --weights w.caffemodel --out m.onnx \\
        [--opset 13] [--dynamic-batch] [--batch 1] [--seed 0] [--tol 1e-4]

Builds the TEST-phase net, writes the ONNX graph (caffe_compat.export.onnx: one converter per
layer type), runs ``onnx.checker``, then runs the model in onnxruntime on a seeded random input
and prints, per output, the largest absolute difference to the net and that difference relative
to the output's scale (max |output|). Exits 1 when a relative difference exceeds ``--tol``
(naming the first layer whose top differs) or when a layer cannot be exported (naming it).
With ``--dynamic-batch`` the batch axis is symbolic and the check runs at two batch sizes.
Without ``--weights`` the prototxt's fillers give the weights.
"""

from __future__ import annotations

import sys

from caffe_compat.cli._common import ArgumentParser, enable_python_layers, exits_130_on_interrupt, report_error
from caffe_compat.errors import CaffeError

__all__ = ["main", "build_parser"]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="export_onnx.py", description="Export a Caffe net to ONNX and check it in onnxruntime.", python_layers=True
    )
    p.add_argument("--model", required=True, help="the net definition (deploy .prototxt)")
    p.add_argument("--weights", default="", help="trained weights (.caffemodel or .h5); default: the fillers")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 13)")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch axis symbolic ('N')")
    p.add_argument(
        "--batch", type=int, default=0, help="set the inputs' batch size before export (default: as in the prototxt)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random check input")
    p.add_argument("--tol", type=float, default=1e-4, help="largest accepted difference relative to the output's scale")
    return p


@exits_130_on_interrupt("export_onnx.py")
def main(argv: list[str] | None = None) -> int:
    prog = "export_onnx.py"
    try:
        args = build_parser().parse_args(argv)
        enable_python_layers(args)
        import caffe_compat as caffe
        from caffe_compat.extras import available, require

        require("onnx", "exporting to ONNX")
        check = available("onnxruntime")
        if not check:  # said before anything is written, not as a failure after it
            print(
                f"{prog}: note: onnxruntime is not installed, so the exported model is checked with "
                "onnx.checker only, not run against the net: pip install 'caffe-compat[onnx]' for the comparison"
            )
        from caffe_compat.export import onnx as ox

        net = caffe.Net(args.model, caffe.TEST, weights=args.weights or None)
        if args.batch:
            for b in net.inputs:
                shape = list(net.blobs[b].shape)
                net.blobs[b].reshape(args.batch, *shape[1:])
            net.reshape()
        opset = args.opset if args.opset is not None else ox.DEFAULT_OPSET
        model = ox.export_onnx(net, args.out, opset=opset, dynamic_batch=args.dynamic_batch)
        print(
            f"wrote {args.out}: {len(model.graph.node)} ONNX nodes from {len(net.layers)} layers, opset {opset}; "
            "onnx.checker: ok"
        )
        if not check:
            return 0
        batch = net.blobs[net.inputs[0]].shape[0] if net.inputs and net.blobs[net.inputs[0]].shape else None
        batches = [batch]
        if args.dynamic_batch and batch is not None:
            batches.append(batch + 1)
        worst = 0.0
        for n in batches:
            inputs = ox.random_inputs(net, args.seed, n)
            for d in ox.check_onnx(net, args.out, inputs):
                worst = max(worst, d.relative)
                print(
                    f"onnxruntime vs Net, batch {n}, output {d.name!r}: max |diff| = {d.max_abs_diff:.3e} "
                    f"(relative to max |output| {d.scale:.3e}: {d.relative:.3e})"
                )
            if not worst <= args.tol:
                where = ox.locate_divergence(net, model, inputs, tol=args.tol)
                detail = ""
                if where is not None:
                    lname, blob, d = where
                    layer = net.layer_dict[lname]
                    detail = (
                        f"; first differing layer {lname!r} ({layer.type}), top {blob!r}: max |diff| "
                        f"{d.max_abs_diff:.3e}, relative {d.relative:.3e}"
                    )
                print(
                    f"{prog}: error: onnxruntime differs from the net by {worst:.3e} > --tol {args.tol}{detail}",
                    file=sys.stderr,
                )
                return 1
        print(f"largest relative difference {worst:.3e} <= {args.tol}: ok")
        return 0
    except CaffeError as e:
        return report_error(prog, e)
    except Exception as e:  # onnx.checker / onnxruntime failures
        return report_error(prog, e)


if __name__ == "__main__":
    sys.exit(main())
