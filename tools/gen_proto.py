"""Regenerate ``caffe_compat/proto/caffe_pb2.py`` from ``caffe.proto``.

    python tools/gen_proto.py           # rewrite the committed caffe_pb2.py
    python tools/gen_proto.py --check   # exit 1 if the committed file is stale

Uses the protoc bundled with grpcio-tools (``python -m grpc_tools.protoc``), so no system
protoc is needed. The generated module checks its gencode version against the protobuf
runtime at import time; see the header of caffe_pb2.py for the version it was made with.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["PROTO_DIR", "generate", "main"]

PROTO_DIR = Path(__file__).resolve().parent.parent / "caffe_compat" / "proto"
PROTO_FILE = PROTO_DIR / "caffe.proto"
PB2_FILE = PROTO_DIR / "caffe_pb2.py"


def generate() -> bytes:
    """Run protoc on caffe.proto in a temporary folder and return the generated module."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={PROTO_DIR}",
            f"--python_out={out}",
            PROTO_FILE.name,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROTO_DIR)
        if proc.returncode != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILE}:\n{proc.stderr.strip()}")
        return (Path(out) / "caffe_pb2.py").read_bytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="only check that the committed caffe_pb2.py is current"
    )
    args = parser.parse_args(argv)
    try:
        fresh = generate()
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    current = PB2_FILE.read_bytes() if PB2_FILE.exists() else None
    if args.check:
        if current != fresh:
            print(
                f"{PB2_FILE} is stale: run `python tools/gen_proto.py` to regenerate it",
                file=sys.stderr,
            )
            return 1
        return 0
    if current != fresh:
        tmp = PB2_FILE.with_name(PB2_FILE.name + ".tmp")
        tmp.write_bytes(fresh)
        os.replace(tmp, PB2_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
