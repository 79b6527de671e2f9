"""Run an SSD deploy net (a ``DetectionOutput`` top) on one image, draw the boxes and print them.

    python tools/detect.py --model deploy.prototxt --weights net.caffemodel --image photo.jpg \\
        --out boxes.png [--json boxes.json] [--threshold 0.5] [--mean 104,117,123] [--scale 1.0] \\
        [--swap_rb] [--labels labelmap.prototxt | --labels background,cat,dog] [--gpu 0]

The image is prepared as OpenCV's ``cv2.dnn.blobFromImage(image, scale, (W, H), mean, swap_rb)``
does for the net's input size: resized (bilinear) to W x H, then ``(pixel − mean) · scale``,
BGR unless ``--swap_rb``. Detections with a score at or above ``--threshold`` are drawn on the
original image (pixel boxes = normalized boxes × the image's width and height) and printed as
JSON: ``{"image": ..., "width": ..., "height": ..., "detections": [{"label", "name", "score",
"box": [xmin, ymin, xmax, ymax] in pixels, "box_normalized": [...]}, ...]}``, in the net's order.
"""

from __future__ import annotations

import json
import sys

from caffe_compat.cli._common import ArgumentParser, UsageError, parse_gpus, report_error, select_device
from caffe_compat.errors import CaffeError

__all__ = ["main", "build_parser", "prepare_image", "detections", "read_labels", "PALETTE"]

#: BGR box colours: label 1 (SSD's first class after the background) the first, and so on.
PALETTE = [(0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 128, 255), (255, 128, 0), (128, 0, 255)]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="detect.py", description="Detect objects with an SSD deploy net.", python_layers=True)
    p.add_argument("--model", required=True, help="the deploy prototxt (with a DetectionOutput layer)")
    p.add_argument("--weights", required=True, help="the .caffemodel")
    p.add_argument("--image", required=True, help="the image to run on")
    p.add_argument("--out", required=True, help="where to write the image with the boxes drawn (.png, .jpg)")
    p.add_argument("--json", default="", help="also write the detections to this JSON file")
    p.add_argument("--threshold", type=float, default=0.5, help="lowest score drawn and printed (default 0.5)")
    p.add_argument("--mean", default="0,0,0", help="per-channel mean subtracted, in the net's channel order")
    p.add_argument("--scale", type=float, default=1.0, help="multiplier applied after the mean (e.g. 0.007843)")
    p.add_argument("--swap_rb", action="store_true", help="feed RGB instead of OpenCV's BGR")
    p.add_argument(
        "--labels", default="", help="a LabelMap prototxt (SSD's labelmap_*.prototxt) or comma-separated names"
    )
    p.add_argument("--gpu", default="", help="GPU id; CPU when omitted")
    return p


def prepare_image(image, size_hw: tuple[int, int], mean, scale: float, swap_rb: bool):
    """``(1, 3, H, W)`` float32 as ``cv2.dnn.blobFromImage(image, scale, (W, H), mean, swap_rb)``."""
    import cv2
    import numpy as np

    h, w = size_hw
    if image.shape[:2] != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    x = image.astype(np.float32)
    if swap_rb:
        x = x[:, :, ::-1]
    x = (x - np.asarray(mean, np.float32)) * np.float32(scale)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def read_labels(spec: str) -> dict[int, str]:
    """Label names from a LabelMap prototxt (display_name, else name) or a comma-separated list."""
    if not spec:
        return {}
    from pathlib import Path

    if Path(spec).is_file():
        from google.protobuf import text_format

        from caffe_compat.proto import caffe_pb2

        lm = caffe_pb2.LabelMap()
        try:
            text_format.Parse(Path(spec).read_text(), lm)
        except text_format.ParseError as e:
            raise UsageError(f"--labels {spec}: not a LabelMap prototxt: {e}") from None
        return {int(i.label): i.display_name or i.name for i in lm.item}
    return dict(enumerate(s.strip() for s in spec.split(",")))


def detections(rows, width: int, height: int, threshold: float, names: dict[int, str]) -> list[dict]:
    """The rows ``[image, label, score, xmin, ymin, xmax, ymax]`` of a DetectionOutput top with a
    score at or above ``threshold`` (Caffe's empty rows, label -1, dropped), as dictionaries."""
    out = []
    for r in rows.reshape(-1, 7):
        label, score = int(r[1]), float(r[2])
        if label < 0 or score < threshold:
            continue
        norm = [float(v) for v in r[3:7]]
        out.append(
            {
                "image": int(r[0]),
                "label": label,
                "name": names.get(label, str(label)),
                "score": score,
                "box": [norm[0] * width, norm[1] * height, norm[2] * width, norm[3] * height],
                "box_normalized": norm,
            }
        )
    return out


def _draw(image, dets: list[dict]):
    import cv2

    palette = PALETTE
    canvas = image.copy()
    for d in dets:
        color = palette[(d["label"] - 1) % len(palette)]
        x0, y0, x1, y1 = (int(round(v)) for v in d["box"])
        cv2.rectangle(canvas, (x0, y0), (x1, y1), color, 2)
        text = f"{d['name']}: {d['score']:.2f}"
        ty = max(y0 - 4, 10)
        cv2.putText(canvas, text, (max(x0, 0), ty), cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, 1, cv2.LINE_AA)
    return canvas


def main(argv: list[str] | None = None) -> int:
    prog = "detect.py"
    try:
        args = build_parser().parse_args(argv)
        import logging

        import cv2

        import caffe_compat as caffe

        log = logging.getLogger("caffe_compat")
        try:
            mean = [float(v) for v in args.mean.split(",")]
        except ValueError:
            raise UsageError(f"--mean {args.mean!r}: give numbers separated by commas, e.g. 104,117,123") from None
        if len(mean) == 1:
            mean *= 3
        if len(mean) != 3:
            raise UsageError(f"--mean {args.mean!r}: give one value or three (one per channel)")
        gpus = parse_gpus(args.gpu)
        if gpus:
            select_device(gpus, log)
        image = cv2.imread(args.image, cv2.IMREAD_COLOR)
        if image is None:
            raise UsageError(f"--image {args.image}: cannot read it as an image")
        net = caffe.Net(args.model, caffe.TEST, weights=args.weights)
        det_tops = [
            net.top_names[n][0] for n, layer in zip(net._layer_names, net.layers) if layer.type == "DetectionOutput"
        ]
        if not det_tops:
            raise UsageError(f"--model {args.model}: the net has no DetectionOutput layer")
        if len(net.inputs) != 1:
            raise UsageError(f"--model {args.model}: the net must have one input (it has {list(net.inputs)})")
        shape = net.blobs[net.inputs[0]].shape
        if len(shape) != 4 or shape[1] != 3:
            raise UsageError(f"--model {args.model}: the input must be (N, 3, H, W), it is {list(shape)}")
        blob = prepare_image(image, (shape[2], shape[3]), mean, args.scale, args.swap_rb)
        net.blobs[net.inputs[0]].reshape(*blob.shape)
        net.reshape()
        out = net.forward(**{net.inputs[0]: blob})
        rows = out[det_tops[-1]] if det_tops[-1] in out else net.blobs[det_tops[-1]].data
        h, w = image.shape[:2]
        result = {
            "image": args.image,
            "width": w,
            "height": h,
            "detections": detections(rows, w, h, args.threshold, read_labels(args.labels)),
        }
        if not cv2.imwrite(args.out, _draw(image, result["detections"])):
            raise UsageError(f"--out {args.out}: OpenCV could not write it (use a .png or .jpg name)")
        text = json.dumps(result, indent=2)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")
        print(text)
        return 0
    except (CaffeError, OSError) as e:
        return report_error(prog, e)


if __name__ == "__main__":
    sys.exit(main())
