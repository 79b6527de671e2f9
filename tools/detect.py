#!/usr/bin/env python3
"""detect: run an SSD deploy net on an image, draw the boxes and print them as JSON. From a checkout: ``python tools/detect.py --help``; installed: the ``caffe-detect`` console script.

A thin wrapper: the tool is :mod:`caffe_compat.cli.detect` (see there). Run as a script, it
imports the caffe_compat of the checkout it sits in (the folder above ``tools/``), installed or
not, even when another copy is installed; imported, it changes nothing.
"""

import os
import sys


def main(argv=None) -> int:
    from caffe_compat.cli.detect import main as run

    return run(argv)


if __name__ == "__main__":
    # sys.path[0] is this folder: replace it by the checkout's root (not at import time)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while torch and the package are still being imported
        print("detect: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
