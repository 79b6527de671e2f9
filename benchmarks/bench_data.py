"""Throughput of the Data (LMDB) and ImageData layers, with and without prefetching.

    python benchmarks/bench_data.py [--images 256] [--size 96] [--batch 32] [--batches 40] [--step_ms 20]

Writes synthetic PNG images to a temporary folder, converts them to an encoded LMDB with
tools/convert_imageset.py, then times ``forward()`` of each layer (crop 80, mirror, mean_value,
TRAIN) while a simulated training step of ``--step_ms`` milliseconds runs between batches. With
prefetching the wait per batch should drop to ~0 whenever decoding keeps up with the step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from google.protobuf import text_format  # noqa: E402

from caffe_compat.cli import convert_imageset  # noqa: E402
from caffe_compat.layers.base import layer_class  # noqa: E402
from caffe_compat.proto import caffe_pb2  # noqa: E402

__all__ = ["main"]


def _layer(text: str):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    return layer_class(param.type)(param, [], caffe_pb2.TRAIN)


def _time(layer, batches: int, step_s: float) -> tuple[float, float]:
    layer.forward()  # warm up (starts the prefetch thread)
    waited = 0.0
    t0 = time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        layer.forward()
        waited += time.perf_counter() - t
        time.sleep(step_s)  # the training step the prefetch overlaps with
    total = time.perf_counter() - t0
    if hasattr(layer, "close"):
        layer.close()
    return waited / batches * 1e3, total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--step_ms", type=float, default=20.0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        os.mkdir("img")
        with open("list.txt", "w") as f:
            for i in range(args.images):
                cv2.imwrite(f"img/{i}.png", rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
                f.write(f"{i}.png {i % 10}\n")
        convert_imageset.main(["--encoded", "img/", "list.txt", "db"])
        tp = "transform_param { crop_size: 80 mirror: true mean_value: 104 mean_value: 117 mean_value: 123 }"
        for prefetch in (0, 4):
            layers = {
                "Data(LMDB, PNG)": f'name: "d" type: "Data" top: "data" top: "label" {tp} data_param {{ source: "db" '
                f"backend: LMDB batch_size: {args.batch} prefetch: {prefetch} }}",
                "ImageData(PNG)": f'name: "d" type: "ImageData" top: "data" top: "label" {tp} image_data_param {{ '
                f'source: "list.txt" root_folder: "img/" batch_size: {args.batch} }} data_param {{ prefetch: {prefetch} }}',
            }
            for name, text in layers.items():
                wait_ms, total = _time(_layer(text), args.batches, args.step_ms / 1e3)
                print(
                    f"{name:16s} prefetch={prefetch}: wait {wait_ms:7.2f} ms/batch, "
                    f"{args.batches * args.batch / total:8.0f} images/s with a {args.step_ms:g} ms step"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
