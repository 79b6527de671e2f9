"""Reproduce the paper: CAE fine-tuning of AlexNet on dental X-ray halves, then landmark regression.

    python tools/reproduce_paper.py                                 # preset quick, synthetic data
    python tools/reproduce_paper.py --preset smoke --out runs/
    python tools/reproduce_paper.py --preset paper --gpu 0 \\
        --imagenet-weights models/bvlc_alexnet/bvlc_alexnet.caffemodel --data my_xrays/

Steps: data (``--data`` folder + landmarks.csv, else synthetic radiographs) → half-images →
CAE training → surgery (conv1-5 and fc6 into the regressor) → the 4 regressor configurations
({no CAE, CAE} × {fc6 frozen, fc6 fine-tuned}) → evaluation in mm. Every run writes a new folder
``<out>/run-<date>-<time>[-n]`` (never an earlier one): Table II (md, csv, json), the learning
curves, CAE reconstructions and landmark figures (PNG), caffemodels, surgery reports and the log.
Presets: ``smoke`` (tiny, under a minute), ``quick`` (default: about 7-12 min on 2 free CPU
cores, much longer when they are shared), ``paper`` (the paper's 224×224 AlexNet, for a GPU).
The expected time is printed at start; on a terminal a progress bar follows the run, elsewhere
one line per stage with the time left. ``--write-doc docs/paper.md`` puts the run's Table II
into the page (``--from-run RUN_DIR``: from a finished run). See docs/paper.md.
"""

from __future__ import annotations

import argparse
import sys

from caffe_compat.cli._common import exits_130_on_interrupt, parse_gpus, report_error
from caffe_compat.dental.pipeline import EXPECTED_TIME, PRESETS, run_reproduction
from caffe_compat.errors import CaffeError
from caffe_compat.solvers.log import setup_logging

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reproduce_paper.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/paper", help="where the run folder is created (default runs/paper)")
    p.add_argument("--data", default="", help="folder of radiographs with landmarks.csv (default: synthetic)")
    p.add_argument("--csv", default="", help="the landmark CSV (default <data>/landmarks.csv)")
    p.add_argument("--imagenet-weights", default="", help="bvlc_alexnet.caffemodel (see models/bvlc_alexnet/readme.md)")
    p.add_argument("--gpu", default="", help="GPU id; CPU when omitted")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="scale of the run (default quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, splits and fillers")
    p.add_argument(
        "--write-doc",
        default="",
        metavar="PAGE",
        help="after the run, write its Table II into PAGE (docs/paper.md) between the page's table2 markers",
    )
    p.add_argument(
        "--from-run",
        default="",
        metavar="RUN_DIR",
        help="with --write-doc: take the table from this finished run folder instead of running",
    )
    p.add_argument(
        "--cuda_graph",
        action="store_true",
        help="with --gpu: replay the training passes from CUDA graphs (the same kernels, less host time)",
    )
    return p


@exits_130_on_interrupt("reproduce_paper.py")
def main(argv: list[str] | None = None) -> int:
    setup_logging(program="reproduce_paper")
    args = build_parser().parse_args(argv)
    try:
        if args.from_run:
            if not args.write_doc:
                raise ValueError("--from-run RUN_DIR only goes with --write-doc PAGE")
            from caffe_compat.dental.paper_doc import write_doc

            write_doc(args.from_run, args.write_doc)
            print(f"wrote Table II of {args.from_run} into {args.write_doc}")
            return 0
        gpus = parse_gpus(args.gpu)
        if args.cuda_graph and not gpus:
            raise ValueError("--cuda_graph needs --gpu (CUDA graphs replay GPU work)")
        from caffe_compat.extras import require

        require("matplotlib", "reproduce_paper.py (its figures)")
        print(
            f"reproduce_paper.py: preset {args.preset}: expect {EXPECTED_TIME[args.preset][1]}; "
            f"the run folder goes under {args.out}",
            file=sys.stderr,
            flush=True,
        )
        result = run_reproduction(
            args.out,
            args.preset,
            data_dir=args.data or None,
            csv_path=args.csv or None,
            imagenet_weights=args.imagenet_weights or None,
            gpu=gpus[0] if gpus else None,
            seed=args.seed,
            cuda_graph=args.cuda_graph,
        )
    except (CaffeError, OSError, ValueError) as e:
        return report_error("reproduce_paper.py", e)
    with open(result.tables["md"], encoding="utf-8") as f:
        print(f.read())
    print(f"run folder: {result.run_dir}")
    if args.write_doc:
        from caffe_compat.dental.paper_doc import write_doc

        try:
            write_doc(result.run_dir, args.write_doc)
        except (CaffeError, OSError) as e:
            return report_error("reproduce_paper.py", e)
        print(f"wrote its Table II into {args.write_doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
