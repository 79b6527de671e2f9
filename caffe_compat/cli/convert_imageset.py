"""Convert a list of images to an LMDB of Caffe ``Datum`` records, as Caffe's convert_imageset.

    python tools/convert_imageset.py [flags] ROOTFOLDER/ LISTFILE DB_NAME

LISTFILE has lines ``subfolder1/file1.JPEG 7`` (path relative to ROOTFOLDER, which is prepended
as a plain string, then the integer label). Each image becomes one record with key
``%08d_<path>`` (its 0-based line index and path as written) holding a Datum:

- raw (default): uint8 C×H×W pixels in OpenCV's BGR order (``--gray``: one channel);
- ``--encoded`` / ``--encode_type EXT``: the image file itself when it needs no resize and its
  extension matches the encoding (Caffe's ReadFileToDatum), otherwise the decoded (and resized)
  image re-encoded with ``cv2.imencode('.EXT')``; without ``--encode_type`` the extension of each
  file is used.

``--resize_height``/``--resize_width`` resize with OpenCV bilinear when both are positive;
``--shuffle`` shuffles the lines first (``--seed``, ours, makes it reproducible);
``--check_size`` checks that every raw record has the first one's size. Images that cannot be
read are skipped with a warning naming the file and line (as Caffe). Flags may also be written
with one dash, as gflags allows (``-gray``).
"""

from __future__ import annotations

import logging
import os
import sys

import cv2
import numpy as np

from caffe_compat.cli._common import ArgumentParser, exits_130_on_interrupt, report_error
from caffe_compat.data.image_list import read_image_list
from caffe_compat.data.lmdb_db import LEVELDB_HELP, LMDBWriter
from caffe_compat.errors import CaffeError
from caffe_compat.proto import caffe_pb2

__all__ = ["main", "image_to_datum"]

log = logging.getLogger("convert_imageset")


def _match_ext(path: str, encoding: str) -> bool:
    ext = path.rsplit(".", 1)[-1].lower() if "." in path else path.lower()
    enc = encoding.lower()
    return ext == enc or (enc == "jpg" and ext == "jpeg")


def image_to_datum(
    path: str, label: int, resize_height: int = 0, resize_width: int = 0, is_color: bool = True, encoding: str = ""
) -> caffe_pb2.Datum | None:
    """Caffe's ``ReadImageToDatum``: the Datum for one image file, or None if it cannot be read."""
    img = cv2.imread(path, cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE) if os.path.isfile(path) else None
    if img is None:
        return None
    resize = resize_height > 0 and resize_width > 0
    if resize:
        img = cv2.resize(img, (resize_width, resize_height))
    datum = caffe_pb2.Datum(label=label)
    if encoding:
        # Caffe's test is `(channels == 3) == is_color && !height && !width && matchExt`; the first
        # part always holds (the image was read with the colour flag), so it is omitted here.
        if resize_height == 0 and resize_width == 0 and _match_ext(path, encoding):
            with open(path, "rb") as f:
                datum.data = f.read()
        else:
            ok, buf = cv2.imencode("." + encoding, img)
            if not ok:
                raise CaffeError(f"OpenCV cannot encode images as {encoding!r} (--encode_type)")
            datum.data = buf.tobytes()
        datum.encoded = True
        return datum
    chw = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
    datum.channels, datum.height, datum.width = (int(d) for d in chw.shape)
    datum.data = np.ascontiguousarray(chw).tobytes()
    return datum


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="convert_imageset",
        description="Convert a set of images to an LMDB of Caffe Datum records.",
        allow_abbrev=False,
    )
    p.add_argument("root_folder", metavar="ROOTFOLDER", help="prefix of every path in LISTFILE (end it with '/')")
    p.add_argument("list_file", metavar="LISTFILE", help="lines 'path label'")
    p.add_argument("db_name", metavar="DB_NAME", help="the LMDB directory to create (must not exist)")
    p.add_argument("--gray", "-gray", action="store_true", help="read images as grayscale")
    p.add_argument("--shuffle", "-shuffle", action="store_true", help="shuffle the lines")
    p.add_argument("--backend", "-backend", default="lmdb", help="lmdb (writing leveldb is not supported)")
    p.add_argument("--resize_width", "-resize_width", type=int, default=0, help="width to resize to (0: none)")
    p.add_argument("--resize_height", "-resize_height", type=int, default=0, help="height to resize to (0: none)")
    p.add_argument("--check_size", "-check_size", action="store_true", help="check all raw records have one size")
    p.add_argument("--encoded", "-encoded", action="store_true", help="store encoded images")
    p.add_argument("--encode_type", "-encode_type", default="", help="encoding (png, jpg...); implies --encoded")
    p.add_argument("--seed", type=int, default=None, help="seed of --shuffle (not in Caffe)")
    return p


def convert(args) -> int:
    if args.backend.lower() != "lmdb":
        raise CaffeError(
            f"--backend {args.backend}: {LEVELDB_HELP}"
            if args.backend.lower() == "leveldb"
            else f"--backend {args.backend!r} is unknown; use lmdb"
        )
    if (args.resize_height > 0) != (args.resize_width > 0) or min(args.resize_height, args.resize_width) < 0:
        log.warning("--resize_height and --resize_width both need to be positive to resize; not resizing")
    entries = read_image_list(args.list_file, what="LISTFILE")
    if args.shuffle:
        log.info("Shuffling data")
        order = np.random.default_rng(args.seed).permutation(len(entries))
        entries = [entries[i] for i in order]
    log.info("A total of %d images.", len(entries))
    if args.encode_type and not args.encoded:
        log.info("encode_type specified, assuming encoded=true.")
    encoded = args.encoded or bool(args.encode_type)
    data_size = None
    skipped = 0
    with LMDBWriter(args.db_name) as db:
        for line_id, (path, label, lineno) in enumerate(entries):
            enc = args.encode_type
            if encoded and not enc:
                if "." not in path:
                    log.warning("Failed to guess the encoding of %r", path)
                enc = path.rsplit(".", 1)[-1].lower()
            datum = image_to_datum(
                args.root_folder + path, label, args.resize_height, args.resize_width, not args.gray, enc
            )
            if datum is None:
                log.warning(
                    "%s:%d: could not open or decode %r; skipped", args.list_file, lineno, args.root_folder + path
                )
                skipped += 1
                continue
            if args.check_size and not datum.encoded:
                if data_size is None:
                    data_size = len(datum.data)
                elif len(datum.data) != data_size:
                    raise CaffeError(
                        f"{args.list_file}:{lineno}: {path!r} gives {len(datum.data)} bytes, the first image "
                        f"{data_size} (--check_size); resize with --resize_height/--resize_width"
                    )
            db.put(f"{line_id:08d}_{path}".encode(), datum.SerializeToString())
            if db.count % 1000 == 0:
                log.info("Processed %d files.", db.count)
        count = db.count
    log.info("Processed %d files%s.", count, f" ({skipped} skipped)" if skipped else "")
    return 0


@exits_130_on_interrupt("convert_imageset")
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return convert(_parser().parse_args(argv))
    except (CaffeError, OSError) as e:
        return report_error("convert_imageset", e)


if __name__ == "__main__":
    sys.exit(main())
