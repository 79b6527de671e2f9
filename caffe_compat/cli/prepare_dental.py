"""Prepare dental radiographs for the CAE and the landmark regressor (docs/paper.md).

    python tools/prepare_dental.py                         # synthetic data (108 images, 54 annotated)
    python tools/prepare_dental.py --data my_xrays/        # my_xrays/landmarks.csv + the images
    python tools/prepare_dental.py --data my_xrays/ --csv labels.csv --size 224 --seed 0 --out data/dental

Makes the half-images (the left half, and the right half mirrored onto the left with its
landmarks 5-8 becoming 1-4), resizes them to ``--size``, splits by image with ``--seed``
(CAE: 1/10 of the images held out; regressor: 1/5 of the annotated images) and writes into
``--out`` (default ``data/dental``, what the shipped prototxts and solvers read, relative to the
repository root): ``cae_{train,val}.h5/.txt``, ``landmarks_{train,val}.h5/.txt``, ``halves.csv``
(what converts predictions back to mm), ``meta.json`` (and ``mean.npy`` with ``--mean train``) and
an empty ``snapshots/``. Without
``--data`` the synthetic radiographs are generated into ``<out>/raw`` first. Run the tools from
the repository root. Errors print one line per problem and exit with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from caffe_compat.cli._common import exits_130_on_interrupt, report_error
from caffe_compat.dental.dataset import prepare, read_dataset
from caffe_compat.dental.generator import generate_dataset
from caffe_compat.dental.nets import DEFAULT_DATA_DIR
from caffe_compat.errors import CaffeError
from caffe_compat.solvers.log import setup_logging

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prepare_dental.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="", help="folder of radiographs (+ landmarks.csv); synthetic when omitted")
    p.add_argument("--csv", default="", help="the landmark CSV (default <data>/landmarks.csv)")
    p.add_argument("--out", default=DEFAULT_DATA_DIR, help=f"output folder (default {DEFAULT_DATA_DIR})")
    p.add_argument("--size", type=int, default=224, help="half-image size after resizing (default 224)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits and of the synthetic data")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the mean-subtracted intensities (default 1, as bvlc_alexnet expects; "
        "the from-scratch presets use 0.015625)",
    )
    p.add_argument(
        "--mean",
        choices=("imagenet", "train"),
        default="imagenet",
        help="subtract Caffe's ImageNet channel mean (default) or the training halves' mean image "
        "(written to mean.npy)",
    )
    p.add_argument("--num-images", type=int, default=108, help="synthetic: number of radiographs")
    p.add_argument("--num-annotated", type=int, default=54, help="synthetic: how many carry landmarks")
    return p


@exits_130_on_interrupt("prepare_dental.py")
def main(argv: list[str] | None = None) -> int:
    setup_logging(program="prepare_dental")
    args = build_parser().parse_args(argv)
    try:
        data = args.data
        if not data:
            data = os.path.join(args.out, "raw")
            generate_dataset(data, args.num_images, args.num_annotated, seed=args.seed)
        samples = read_dataset(data, args.csv or None)
        prepared = prepare(samples, args.out, size=args.size, seed=args.seed, scale=args.scale, mean=args.mean)
    except (CaffeError, OSError, ValueError) as e:
        if "\n" in str(e):  # one line per malformed row
            print(f"prepare_dental.py: error: {e}", file=sys.stderr)
            return 1
        return report_error("prepare_dental.py", e)
    counts = {k: sum(1 for r in prepared.halves if r["split"] == k) for k in prepared.lists}
    print(
        f"prepared {len(samples)} images into {prepared.out_dir}: "
        + ", ".join(f"{k} {v} halves" for k, v in counts.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
