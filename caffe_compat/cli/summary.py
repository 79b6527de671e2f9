"""Print a net's summary (layers, bottoms -> tops, top shapes, parameters, FLOPs), optionally draw it.

    python tools/summary.py deploy.prototxt [--batch 1] [--draw net.png] [--rankdir LR]

The same as ``python -m caffe_compat summary``.
"""

from __future__ import annotations

import sys

from caffe_compat.cli._common import exits_130_on_interrupt

__all__ = ["main"]


@exits_130_on_interrupt("summary.py")
def main(argv: list[str] | None = None) -> int:
    from caffe_compat.__main__ import main as cc_main

    return cc_main(["summary", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
