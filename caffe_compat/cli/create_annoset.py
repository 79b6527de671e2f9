"""Write an LMDB of SSD's ``AnnotatedDatum`` records from a list of images and VOC XML files,
as SSD's ``scripts/create_annoset.py`` does by running ``convert_annoset``.

    python tools/create_annoset.py --anno-type detection --label-map-file labelmap.prototxt \\
        [--encode-type jpg] ROOT LISTFILE OUTDIR [EXAMPLEDIR]

LISTFILE (detection): lines ``images/0001.jpg annotations/0001.xml`` (paths relative to ROOT,
joined as a plain prefix as SSD does); classification: ``images/0001.jpg 3``. Each line becomes
one record with key ``%08d_<image path>`` (0-based line index) holding an AnnotatedDatum whose
``datum`` is the image as convert_imageset stores it (raw BGR uint8 C×H×W, or encoded with
``--encoded``/``--encode-type``; ``--resize-height``/``--resize-width`` resize first) and, for
detection, type BBOX and the XML's objects grouped by label (``--label-map-file``: a LabelMap
prototxt mapping each ``name`` to its ``label``; boxes normalized by the XML's size).

Flags follow SSD's script (weiliu89/caffe ssd 4817bf8b): ``--redo`` (replace OUTDIR),
``--anno-type``, ``--label-type`` (xml; json and txt are refused), ``--backend`` (lmdb),
``--check-size``, ``--encode-type``, ``--encoded``, ``--gray``, ``--label-map-file``,
``--resize-height``, ``--resize-width``, ``--shuffle`` (``--seed``, ours), ``--check-label``
(refuse a name given twice in the label map). ``--min-dim``/``--max-dim`` are refused when not
0. With EXAMPLEDIR, a link EXAMPLEDIR/<name of OUTDIR> to OUTDIR is made, as the script does.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys

import numpy as np

from caffe_compat.cli._common import ArgumentParser, report_error
from caffe_compat.cli.convert_imageset import image_to_datum
from caffe_compat.data.annotated import make_annotated_datum, name_to_label, read_label_map
from caffe_compat.data.lmdb_db import LMDBWriter
from caffe_compat.errors import CaffeError
from caffe_compat.proto import caffe_pb2

__all__ = ["main"]

log = logging.getLogger("create_annoset")


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="create_annoset", description="Create an LMDB of SSD AnnotatedDatum records.")
    p.add_argument("root", help="the folder every path of LISTFILE is relative to")
    p.add_argument("listfile", help="lines 'image annotation' (detection) or 'image label' (classification)")
    p.add_argument("outdir", help="the LMDB directory to create")
    p.add_argument("exampledir", nargs="?", default=None, help="where to put a link to OUTDIR (optional)")
    p.add_argument("--redo", action="store_true", help="replace OUTDIR if it exists")
    p.add_argument("--anno-type", default="classification", choices=["classification", "detection"])
    p.add_argument("--label-type", default="xml", help="xml (json and txt are not implemented)")
    p.add_argument("--backend", default="lmdb", help="lmdb")
    p.add_argument("--check-size", action="store_true", help="check all raw records have one size")
    p.add_argument("--encode-type", default="", help="encoding (png, jpg...); implies --encoded")
    p.add_argument("--encoded", action="store_true", help="store encoded images")
    p.add_argument("--gray", action="store_true", help="read images as grayscale")
    p.add_argument("--label-map-file", default="", help="LabelMap prototxt (detection)")
    p.add_argument("--min-dim", type=int, default=0)
    p.add_argument("--max-dim", type=int, default=0)
    p.add_argument("--resize-height", type=int, default=0)
    p.add_argument("--resize-width", type=int, default=0)
    p.add_argument("--shuffle", action="store_true", help="shuffle the lines")
    p.add_argument("--check-label", action="store_true", help="refuse a name given twice in the label map")
    p.add_argument("--seed", type=int, default=None, help="seed of --shuffle (not in SSD)")
    return p


def _read_list(path: str) -> list[tuple[str, str, int]]:
    entries = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise CaffeError(f"{path}:{lineno}: expected 'image annotation', got {line.strip()!r}")
            entries.append((parts[0], parts[1], lineno))
    return entries


def create(args) -> int:
    if args.backend.lower() != "lmdb":
        raise CaffeError(f"--backend {args.backend!r}: only lmdb is written")
    if args.label_type != "xml":
        raise CaffeError(f"--label-type {args.label_type!r} is not implemented; write VOC XML annotations")
    if args.min_dim or args.max_dim:
        raise CaffeError("--min-dim/--max-dim are not implemented; use --resize-height/--resize-width")
    detection = args.anno_type == "detection"
    labels: dict[str, int] = {}
    if detection:
        if not args.label_map_file:
            raise CaffeError("--anno-type detection needs --label-map-file (a LabelMap prototxt)")
        labels = name_to_label(read_label_map(args.label_map_file), strict=args.check_label)
    if os.path.exists(args.outdir):
        if not args.redo:
            raise CaffeError(f"{args.outdir} exists; pass --redo to replace it")
        shutil.rmtree(args.outdir)
    entries = _read_list(args.listfile)
    if args.shuffle:
        order = np.random.default_rng(args.seed).permutation(len(entries))
        entries = [entries[i] for i in order]
    encoded = args.encoded or bool(args.encode_type)
    data_size = None
    with LMDBWriter(args.outdir) as db:
        for line_id, (image, second, lineno) in enumerate(entries):
            enc = args.encode_type
            if encoded and not enc:
                enc = image.rsplit(".", 1)[-1].lower() if "." in image else ""
            label = -1 if detection else int(second)
            datum = image_to_datum(args.root + image, label, args.resize_height, args.resize_width, not args.gray, enc)
            if datum is None:
                log.warning("%s:%d: could not open or decode %r; skipped", args.listfile, lineno, args.root + image)
                continue
            if args.check_size and not datum.encoded:
                if data_size is None:
                    data_size = len(datum.data)
                elif len(datum.data) != data_size:
                    raise CaffeError(f"{args.listfile}:{lineno}: {image!r} has another size than the first image")
            if detection:
                try:
                    record = make_annotated_datum(args.root + image, args.root + second, labels, datum=datum)
                except CaffeError as e:
                    raise CaffeError(f"{args.listfile}:{lineno}: {e}") from None
            else:
                record = caffe_pb2.AnnotatedDatum()
                record.datum.CopyFrom(datum)
            db.put(f"{line_id:08d}_{image}".encode(), record.SerializeToString())
        count = db.count
    log.info("Processed %d files.", count)
    if args.exampledir:
        os.makedirs(args.exampledir, exist_ok=True)
        link = os.path.join(args.exampledir, os.path.basename(os.path.normpath(args.outdir)))
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.abspath(args.outdir), link)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return create(_parser().parse_args(argv))
    except (CaffeError, OSError) as e:
        return report_error("create_annoset", e)


if __name__ == "__main__":
    sys.exit(main())
