"""Caffe's protobuf schema: ``from caffe_compat.proto import caffe_pb2``.

``caffe.proto`` holds BVLC Caffe's messages with BVLC's field names and numbers;
``caffe_pb2.py`` is generated from it by ``tools/gen_proto.py`` and committed.
"""

from __future__ import annotations

from caffe_compat.proto import caffe_pb2

__all__ = ["caffe_pb2"]
