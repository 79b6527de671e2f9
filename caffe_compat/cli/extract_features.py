"""Write the values of some blobs of a net, item by item, to LMDBs of ``Datum`` records, as Caffe's
``extract_features`` tool.

    python tools/extract_features.py PRETRAINED.caffemodel NET.prototxt BLOB1[,BLOB2,...] \\
        DB1[,DB2,...] NUM_MINI_BATCHES lmdb [CPU|GPU] [DEVICE_ID]

Builds the net in TEST phase (its data layers supply the inputs), loads the weights and runs
``NUM_MINI_BATCHES`` forward passes. After each pass, every item ``n`` of each named blob becomes
one record of that blob's database: key ``%010d`` (the item's running index in that database),
value a ``Datum`` with ``channels``/``height``/``width`` of the blob's legacy 4-D shape and the
item's values in ``float_data``. One database per blob, created new (an existing path is an
error), committed every 1000 records. Only LMDB is written (``leveldb``: an error saying how to
convert). Errors print one line and exit with status 1.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import torch

from caffe_compat.cli._common import (
    ArgumentParser,
    UsageError,
    exits_130_on_interrupt,
    parse_gpus,
    report_error,
    select_device,
)
from caffe_compat.data.lmdb_db import LEVELDB_HELP, LMDBWriter
from caffe_compat.errors import CaffeError
from caffe_compat.proto import caffe_pb2
from caffe_compat.solvers.log import setup_logging

__all__ = ["main", "build_parser", "extract_features"]

log = logging.getLogger("caffe_compat")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="extract_features.py",
        description="Extract blobs of a net into LMDBs of Datum records (Caffe's extract_features).",
        python_layers=True,
    )
    p.add_argument("pretrained_net_param", help="the weights (.caffemodel)")
    p.add_argument("feature_extraction_proto_file", help="the net (.prototxt), with data layers")
    p.add_argument("extract_feature_blob_names", help="blob names, comma-separated")
    p.add_argument("save_feature_dataset_names", help="one new database path per blob, comma-separated")
    p.add_argument("num_mini_batches", help="forward passes to run")
    p.add_argument("db_type", help="lmdb (leveldb is not supported)")
    p.add_argument("mode", nargs="?", default="CPU", help="CPU (default) or GPU")
    p.add_argument("device_id", nargs="?", default="0", help="the GPU's id with GPU (0)")
    return p


def extract_features(net, blob_names: list[str], writers: list[LMDBWriter], num_mini_batches: int) -> list[int]:
    """Run ``num_mini_batches`` forwards of ``net``; put every item of ``blob_names[i]`` into
    ``writers[i]`` as a Datum. Returns the number of records written per blob."""
    counts = [0] * len(blob_names)
    datum = caffe_pb2.Datum()
    with torch.no_grad():
        for _ in range(num_mini_batches):
            net.forward()
            for i, name in enumerate(blob_names):
                blob = net.blobs[name]
                if len(blob.shape) > 4:
                    raise UsageError(
                        f"blob {name!r} has {len(blob.shape)} axes {tuple(blob.shape)}; Datum records hold at most 4"
                    )
                # Caffe's legacy (num, channels, height, width): the blob's own accessors
                num, channels, height, width = blob.num, blob.channels, blob.height, blob.width
                items = np.asarray(blob.data, dtype=np.float32).reshape(num, -1)
                for n in range(num):
                    datum.Clear()
                    datum.channels, datum.height, datum.width = channels, height, width
                    datum.float_data.extend(items[n].tolist())
                    writers[i].put(f"{counts[i]:010d}".encode(), datum.SerializeToString())
                    counts[i] += 1
                    if counts[i] % 1000 == 0:
                        log.info("Extracted features of %d query images for feature blob %s", counts[i], name)
    return counts


def _extract(args) -> int:
    from caffe_compat.net import TEST, Net

    blob_names = args.extract_feature_blob_names.split(",")
    db_names = args.save_feature_dataset_names.split(",")
    if len(blob_names) != len(db_names):
        raise UsageError(f"{len(blob_names)} blob names but {len(db_names)} dataset names: give one database per blob")
    try:
        num_mini_batches = int(args.num_mini_batches)
    except ValueError:
        raise UsageError(f"num_mini_batches {args.num_mini_batches!r} is not an integer") from None
    if num_mini_batches < 0:
        raise UsageError(f"num_mini_batches must be >= 0 (got {num_mini_batches})")
    db_type = args.db_type.lower()
    if db_type != "lmdb":
        raise UsageError(
            f"db_type {args.db_type}: {LEVELDB_HELP}"
            if db_type == "leveldb"
            else f"db_type {args.db_type!r} is unknown; use lmdb"
        )
    if args.mode.upper() not in ("CPU", "GPU"):
        raise UsageError(f"mode {args.mode!r}: give CPU or GPU")
    select_device(parse_gpus(args.device_id) if args.mode.upper() == "GPU" else [], log)
    net = Net(args.feature_extraction_proto_file, phase=TEST)
    net.copy_from(args.pretrained_net_param)
    for name in blob_names:
        if name not in net.blobs:
            raise UsageError(f"Unknown feature blob name {name!r} in the network {args.feature_extraction_proto_file}")
    writers = []
    try:
        for path in db_names:
            log.info("Opening dataset %s", path)
            writers.append(LMDBWriter(path))
        log.info("Extracting Features")
        counts = extract_features(net, blob_names, writers, num_mini_batches)
    finally:
        for w in writers:
            w.close()
    for name, count in zip(blob_names, counts):
        log.info("Extracted features of %d query images for feature blob %s", count, name)
    log.info("Successfully extracted the features!")
    return 0


@exits_130_on_interrupt("extract_features.py")
def main(argv: list[str] | None = None) -> int:
    setup_logging(program="extract_features")
    try:
        return _extract(build_parser().parse_args(argv))
    except (CaffeError, OSError) as e:
        return report_error("extract_features.py", e)


if __name__ == "__main__":
    sys.exit(main())
