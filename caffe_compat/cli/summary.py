"""Print a net's summary (layers, bottoms -> tops, top shapes, parameters, FLOPs), optionally draw it.

    python tools/summary.py deploy.prototxt [--batch 1] [--draw net.png] [--rankdir LR]

The same as ``python -m caffe_compat summary``.
"""

from __future__ import annotations

import sys

try:  # run as a script: tools/ is sys.path[0]; _common puts this checkout first on sys.path
    import _common  # noqa: F401
except ImportError:  # imported as the package (console scripts, tests)
    import tools._common  # noqa: F401

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from caffe_compat.__main__ import main as cc_main

    return cc_main(["summary", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
