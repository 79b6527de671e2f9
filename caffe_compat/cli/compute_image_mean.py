"""Compute the mean image of an LMDB or a LevelDB of Datum records, as Caffe's compute_image_mean.

    python tools/compute_image_mean.py [--backend lmdb|leveldb] INPUT_DB [OUTPUT_FILE] [--text_output FILE]

``--backend`` defaults to lmdb, as in Caffe; LevelDBs are read by the pure-Python
:class:`~caffe_compat.data.leveldb_db.LevelDBReader`.

Every record (raw uint8 ``data``, ``float_data``, or encoded, decoded with its native channels)
must have the first record's size. The sum is accumulated in float32 record by record and
divided by the count, as Caffe does, so the mean is bit-identical to Caffe's. OUTPUT_FILE gets a
binary ``BlobProto`` with legacy dims num=1, channels, height, width (Caffe's layout), usable as
``transform_param.mean_file``. The per-channel means are printed ("mean_value channel [c]: v"),
the values to use for ``mean_value``; ``--text_output`` (not in Caffe) also writes the BlobProto
in protobuf text format.
"""

from __future__ import annotations

import logging
import sys

import numpy as np

from caffe_compat.cli._common import ArgumentParser, exits_130_on_interrupt, report_error
from caffe_compat.data.leveldb_db import LevelDBReader
from caffe_compat.data.lmdb_db import LMDBReader
from caffe_compat.data.transformer import datum_to_array
from caffe_compat.errors import CaffeError, DataError
from caffe_compat.proto import caffe_pb2

__all__ = ["compute_mean", "main"]

log = logging.getLogger("compute_image_mean")


_BACKENDS = {"lmdb": LMDBReader, "leveldb": LevelDBReader}


def compute_mean(db_path: str, backend: str = "lmdb") -> np.ndarray:
    """The float32 C×H×W mean of every Datum in the database ``db_path`` (``backend``: lmdb or leveldb)."""
    if backend not in _BACKENDS:
        raise DataError(f"backend {backend!r} is unknown; use lmdb or leveldb")
    reader = _BACKENDS[backend](db_path, what="INPUT_DB")
    try:
        total = None
        count = 0
        datum = caffe_pb2.Datum()
        for key, value in reader:
            where = f"{db_path} key {key.decode('utf-8', 'replace')!r}"
            try:
                datum.ParseFromString(value)
            except Exception as e:  # protobuf's DecodeError
                raise DataError(f"{where}: record is not a Datum ({e})") from None
            x = datum_to_array(datum, where=where)
            if total is None:
                total = np.zeros(x.shape, dtype=np.float32)
            elif x.shape != total.shape:
                raise DataError(
                    f"{where}: record is {'×'.join(map(str, x.shape))}, the first is "
                    f"{'×'.join(map(str, total.shape))}; every image must have one size "
                    f"(convert_imageset --resize_height/--resize_width)"
                )
            total += x.astype(np.float32)
            count += 1
            if count % 10000 == 0:
                log.info("Processed %d files.", count)
    finally:
        reader.close()
    log.info("Processed %d files.", count)
    return total / np.float32(count)


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="compute_image_mean",
        description="Compute the mean image of an LMDB or a LevelDB of Datum records.",
        allow_abbrev=False,
    )
    p.add_argument("input_db", metavar="INPUT_DB", help="LMDB or LevelDB directory")
    p.add_argument("output_file", metavar="OUTPUT_FILE", nargs="?", help="mean .binaryproto to write")
    p.add_argument("--backend", "-backend", default="lmdb", help="lmdb (default) or leveldb")
    p.add_argument("--text_output", default=None, help="also write the mean as a text-format BlobProto")
    return p


@exits_130_on_interrupt("compute_image_mean")
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = _parser().parse_args(argv)
        backend = args.backend.lower()
        if backend not in _BACKENDS:
            raise CaffeError(f"--backend {args.backend!r} is unknown; use lmdb or leveldb")
        mean = compute_mean(args.input_db, backend)
        c, h, w = mean.shape
        blob = caffe_pb2.BlobProto(num=1, channels=c, height=h, width=w)
        blob.data.extend(mean.ravel().tolist())
        if args.output_file:
            from caffe_compat.io import write_blobproto

            log.info("Write to %s", args.output_file)
            write_blobproto(blob, args.output_file)
        if args.text_output:
            from google.protobuf import text_format

            with open(args.text_output, "w", encoding="utf-8") as f:
                f.write(text_format.MessageToString(blob))
        channel_means = mean.reshape(c, -1).mean(axis=1, dtype=np.float64)
        for i, v in enumerate(channel_means):
            print(f"mean_value channel [{i}]: {v:g}")
    except (CaffeError, OSError) as e:
        return report_error("compute_image_mean", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
