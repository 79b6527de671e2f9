"""Is the data layer the bottleneck? Data-layer throughput against the AlexNet landmark
regressor's appetite, on this machine.

    python benchmarks/bench_data_vs_regressor.py [--iters 6] [--batches 30]

1. The regressor (prototxt/dental_landmarks_train_val.prototxt, the paper app's net, 224×224,
   batch 16) trains through the project's SGD solver on a temporary HDF5 file in the shape
   tools/prepare_dental.py writes: images/s it consumes, with its real HDF5Data layer, and with
   that layer replaced by an Input layer (no data cost at all): the difference is what data
   loading costs a training iteration.
2. Each data layer alone, as fast as it can go (prefetch on where the layer has it):
   HDF5Data at 3×224×224, and Data (LMDB, PNG-encoded 256×256) / ImageData (PNG files) with
   Caffe's usual 227 crop, mirror and mean values — the ImageNet-style input path.

Prints images/s and the ratio data/regressor: above 1 the data layer keeps up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import cv2
import h5py
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from google.protobuf import text_format  # noqa: E402

import caffe_compat as caffe  # noqa: E402
from caffe_compat import io as cio  # noqa: E402
from caffe_compat.cli import convert_imageset  # noqa: E402
from caffe_compat.layers.base import layer_class  # noqa: E402
from caffe_compat.proto import caffe_pb2  # noqa: E402

__all__ = ["main"]


def _regressor_param(h5list: str, use_input: bool, batch: int) -> caffe_pb2.NetParameter:
    net = cio.read_net(os.path.join(ROOT, "prototxt", "dental_landmarks_train_val.prototxt"))
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    for lp in net.layer:
        if lp.type == "HDF5Data":
            if any(r.phase == caffe_pb2.TEST for r in lp.include):
                continue
            nl = out.layer.add()
            if use_input:
                nl.name, nl.type = "data", "Input"
                nl.top.extend(lp.top)
                nl.input_param.shape.add().dim.extend([batch, 3, 224, 224])
                nl.input_param.shape.add().dim.extend([batch, 8])
            else:
                nl.CopyFrom(lp)
                del nl.include[:]
                nl.hdf5_data_param.source = h5list
                nl.hdf5_data_param.batch_size = batch
        else:
            out.layer.add().CopyFrom(lp)
    return out


def _train_rate(net_param, iters: int, batch: int) -> float:
    sp = caffe_pb2.SolverParameter()
    text_format.Parse('base_lr: 0.0001 lr_policy: "fixed" momentum: 0.9 weight_decay: 0.0005 type: "SGD"', sp)
    sp.net_param.CopyFrom(net_param)
    sp.max_iter = iters + 2
    solver = caffe.get_solver(sp)
    solver.step(2)  # warm up
    t = time.perf_counter()
    solver.step(iters)
    return iters * batch / (time.perf_counter() - t)


def _layer_rate(text: str, batches: int, batch: int) -> float:
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    layer = layer_class(param.type)(param, [], caffe_pb2.TRAIN)
    layer.forward()
    t = time.perf_counter()
    for _ in range(batches):
        layer.forward()
    rate = batches * batch / (time.perf_counter() - t)
    if hasattr(layer, "close"):
        layer.close()
    return rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=6, help="timed regressor iterations")
    p.add_argument("--batches", type=int, default=30, help="timed data-layer batches")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images", type=int, default=128)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    cwd = os.getcwd()
    print(f"# torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            with h5py.File("train.h5", "w") as f:
                f["data"] = rng.normal(0, 50, (args.images, 3, 224, 224)).astype(np.float32)
                f["landmarks"] = rng.uniform(0, 1, (args.images, 8)).astype(np.float32)
            with open("train.txt", "w") as f:
                f.write("train.h5\n")
            os.mkdir("img")
            with open("list.txt", "w") as f:
                for i in range(args.images):
                    cv2.imwrite(f"img/{i}.png", rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
                    f.write(f"{i}.png {i % 10}\n")
            convert_imageset.main(["--encoded", "img/", "list.txt", "db"])

            with_data = _train_rate(_regressor_param("train.txt", False, args.batch), args.iters, args.batch)
            no_data = _train_rate(_regressor_param("train.txt", True, args.batch), args.iters, args.batch)
            tp = "transform_param { crop_size: 227 mirror: true mean_value: 104 mean_value: 117 mean_value: 123 }"
            rates = {
                "HDF5Data 3x224x224": _layer_rate(
                    f'name: "d" type: "HDF5Data" top: "data" top: "landmarks" hdf5_data_param {{ source: "train.txt" '
                    f"batch_size: {args.batch} shuffle: true }}",
                    args.batches,
                    args.batch,
                ),
                "Data LMDB PNG 227 crop": _layer_rate(
                    f'name: "d" type: "Data" top: "data" top: "label" {tp} data_param {{ source: "db" backend: LMDB '
                    f"batch_size: {args.batch} }}",
                    args.batches,
                    args.batch,
                ),
                "ImageData PNG 227 crop": _layer_rate(
                    f'name: "d" type: "ImageData" top: "data" top: "label" {tp} image_data_param {{ source: "list.txt" '
                    f'root_folder: "img/" batch_size: {args.batch} }}',
                    args.batches,
                    args.batch,
                ),
            }
        finally:
            os.chdir(cwd)
    print(f"regressor training, real HDF5Data layer : {with_data:8.1f} images/s")
    print(f"regressor training, Input (no data cost): {no_data:8.1f} images/s")
    print(f"data loading's share of an iteration    : {max(0.0, 1 - with_data / no_data) * 100:6.1f} %")
    print(f"{'data layer alone':26s} {'images/s':>10s} {'x regressor':>12s}")
    for name, r in rates.items():
        print(f"{name:26s} {r:10.1f} {r / with_data:11.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
