"""The bottom layer of reading Caffe's files, shared by ``caffe_compat.io``, ``pycaffe_io`` and
the data readers: bounded reads of regular files, parsing and checking a binary protobuf
message, and ``BlobProto`` <-> NumPy array. ``caffe_compat.io`` re-exports every public name
here; import them from there (this module exists so that ``pycaffe_io`` and ``caffe_compat.data``
need not import ``io``, which imports them: no import cycle).
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from google.protobuf import message as _message
from google.protobuf import unknown_fields as _unknown_fields

from caffe_compat.errors import FormatError
from caffe_compat.proto import caffe_pb2

__all__ = [
    "MAX_BINARY_PROTO_BYTES",
    "MAX_PROTOTXT_BYTES",
    "MAX_BLOB_COUNT",
    "MAX_BLOB_AXES",
    "check_regular_file",
    "read_regular_file",
    "read_blobproto",
    "check_blob_shape",
    "check_blob",
    "blob_to_array",
    "array_to_blob",
]

M = TypeVar("M", bound=_message.Message)

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------
# Regular files, read within limits

#: Caffe's ``kProtoReadBytesLimit`` (INT_MAX): the largest binary message it reads.
MAX_BINARY_PROTO_BYTES = 2**31 - 1
#: The largest text prototxt we parse. Protobuf's text parser needs ~160 bytes of memory per
#: byte of input, so 32 MiB of text is ~5 GB; nets and solvers are a few hundred kB.
MAX_PROTOTXT_BYTES = 32 << 20
#: The most elements one blob may declare (Caffe's ``Blob::Reshape`` checks ``count <= INT_MAX``).
MAX_BLOB_COUNT = 2**31 - 1
#: The most axes one blob may declare (Caffe's ``kMaxBlobAxes``).
MAX_BLOB_AXES = 32


def _kind_of(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_regular_file(path: PathLike, what: str, max_bytes: int | None = None, *, error=FormatError) -> int:
    """Refuse at once a ``path`` that is missing, a directory, a FIFO, a device or a socket, or
    (with ``max_bytes``) larger than that; returns its size. Nothing is opened, so a FIFO cannot
    block. ``what`` says what was expected; ``error`` is the exception class raised."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file (expected {what}; relative paths are read from {os.getcwd()!r})") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    kind = _kind_of(st.st_mode)
    if kind is not None:
        raise error(f"{path}: is {kind}, not a regular file (expected {what})")
    if max_bytes is not None and st.st_size > max_bytes:
        raise error(
            f"{path}: is {st.st_size} bytes, more than the {max_bytes} bytes {what} may have; "
            "this is not such a file, or it is corrupt"
        )
    return st.st_size


def read_regular_file(path: PathLike, what: str, max_bytes: int, *, error=FormatError) -> bytes:
    """The bytes of the regular file ``path`` (see ``check_regular_file``), reading at most
    ``max_bytes``: the file is opened non-blocking and checked again on its descriptor, so a
    FIFO swapped in after the check neither blocks nor streams without end."""
    check_regular_file(path, what, max_bytes, error=error)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        kind = _kind_of(st.st_mode)
        if kind is not None:
            raise error(f"{path}: is {kind}, not a regular file (expected {what})")
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise error(f"{path}: is more than the {max_bytes} bytes {what} may have")
    return data


def _read_bytes(path: PathLike, what: str, max_bytes: int = MAX_BINARY_PROTO_BYTES) -> bytes:
    return read_regular_file(Path(path), what, max_bytes)


# ---------------------------------------------------------------------------------------------
# Binary messages


def _looks_binary(data: bytes) -> bool:
    head = data[:512]
    return b"\x00" in head or sum(b < 9 or 13 < b < 32 for b in head) > len(head) // 10


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        # a cut in the middle of a multi-byte character at the end is fine
        try:
            head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return len(head) >= 16 and all(b >= 32 or b in (9, 10, 13) for b in head)


_MAGIC = (
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (snapshot_format: HDF5 is not supported here)"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"PK\x03\x04", "a zip archive (a PyTorch .pt/.pth checkpoint?)"),
    (b"\x80\x02", "a Python pickle"),
    (b"\x93NUMPY", "a NumPy .npy file"),
)


def _what_it_looks_like(data: bytes) -> str:
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return f"; it looks like {name}"
    if _looks_like_text(data):
        return "; it looks like a text file (a .prototxt? read it with read_net/read_prototxt)"
    return ""


def _parse_binary(data: bytes, message_cls: type[M], path: PathLike, what: str) -> M:
    msg = message_cls()
    if not data:
        raise FormatError(f"{path}: empty file (expected {what})")
    try:
        msg.ParseFromString(data)
    except _message.DecodeError as exc:
        raise FormatError(
            f"{path}: not a valid {what}: the protobuf data is truncated or corrupt ({exc}){_what_it_looks_like(data)}"
        ) from None
    # A field number of the schema arriving with another wire type means the bytes are some
    # other message (a .solverstate read as a .caffemodel...); unknown numbers are tolerated
    # (forks of Caffe add fields).
    known = message_cls.DESCRIPTOR.fields_by_number
    clashes = sorted({f.field_number for f in _unknown_fields.UnknownFieldSet(msg) if f.field_number in known})
    if clashes:
        names = ", ".join(f"{known[n].name} ({n})" for n in clashes)
        fields = "field" if len(clashes) == 1 else "fields"
        raise FormatError(
            f"{path}: not a {what}: {fields} {names} stored with the wrong wire type for "
            f"{message_cls.DESCRIPTOR.full_name}{_what_it_looks_like(data)}"
        )
    if not msg.ListFields():
        raise FormatError(
            f"{path}: not a {what}: it decodes to no known {message_cls.DESCRIPTOR.full_name} "
            f"field{_what_it_looks_like(data)}"
        )
    return msg


def read_blobproto(path: PathLike) -> caffe_pb2.BlobProto:
    """Read a binary ``BlobProto`` (``.binaryproto``: mean files, infogain matrices)."""
    what = "Caffe .binaryproto (binary BlobProto)"
    data = _read_bytes(path, what)
    blob = _parse_binary(data, caffe_pb2.BlobProto, path, what)
    check_blob_shape(blob, f"{path}: BlobProto")
    return blob


# ---------------------------------------------------------------------------------------------
# Blobs <-> arrays


def _blob_shape(blob: caffe_pb2.BlobProto) -> tuple[int, ...]:
    # As Caffe's Blob::FromProto: any legacy dim set means the 4-D (num, channels, height, width).
    if blob.HasField("num") or blob.HasField("channels") or blob.HasField("height") or blob.HasField("width"):
        return (blob.num, blob.channels, blob.height, blob.width)
    return tuple(int(d) for d in blob.shape.dim)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``buf[pos:]`` and the position after it."""
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, pos


def _packed_field(number: int, payload: bytes) -> bytes:
    """Wire bytes of a packed repeated field (``payload``: the raw little-endian values)."""
    if not payload:
        return b""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _packed_values(blob: caffe_pb2.BlobProto, number: int, dtype: str) -> np.ndarray | None:
    """The values of the repeated float/double field ``number`` of ``blob``, read straight from
    its wire bytes (a large caffemodel's weights never become Python floats). None when the
    field is stored unpacked (then the caller reads it through protobuf)."""
    buf = blob.SerializeToString()
    view = memoryview(buf)
    pos, end, chunks = 0, len(buf), []
    while pos < end:
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 2:
            length, pos = _read_varint(buf, pos)
            if field == number:
                chunks.append(view[pos : pos + length])
            pos += length
        elif field == number:
            return None  # unpacked values: let protobuf read them
        elif wire_type == 0:
            _, pos = _read_varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            return None
    return np.frombuffer(b"".join(chunks), dtype=dtype).astype(np.dtype(dtype).newbyteorder("="))


def check_blob_shape(blob: caffe_pb2.BlobProto, what: str = "blob", *, error=FormatError) -> tuple[int, ...]:
    """The shape of ``blob`` (see ``blob_to_array``), refused before anything is allocated when
    it has more than ``MAX_BLOB_AXES`` axes, a negative dimension or more than
    ``MAX_BLOB_COUNT`` elements (Caffe's ``Blob::Reshape`` limits). ``what`` names the blob."""
    if len(blob.shape.dim) > MAX_BLOB_AXES:
        raise error(f"{what}: shape has {len(blob.shape.dim)} axes; Caffe allows at most {MAX_BLOB_AXES}")
    shape = _blob_shape(blob)
    if any(d < 0 for d in shape):
        raise error(f"{what}: negative dimension in shape {shape}")
    count = math.prod(shape)
    if count > MAX_BLOB_COUNT:
        raise error(
            f"{what}: shape {list(shape)} declares {count} elements, more than the {MAX_BLOB_COUNT} a blob may "
            "hold (Caffe's INT_MAX); the file is corrupt"
        )
    return shape


def _blob_value_field(blob: caffe_pb2.BlobProto, diff: bool) -> tuple[str, int]:
    """The field ``blob_to_array`` reads and how many values it holds."""
    doubles = blob.double_diff if diff else blob.double_data
    if len(doubles) > 0:
        return ("double_diff" if diff else "double_data"), len(doubles)
    return ("diff" if diff else "data"), len(blob.diff if diff else blob.data)


def check_blob(blob: caffe_pb2.BlobProto, what: str = "blob", *, error=FormatError) -> tuple[int, ...]:
    """``check_blob_shape``, and the number of stored values must equal the shape's count."""
    shape = check_blob_shape(blob, what, error=error)
    field, n = _blob_value_field(blob, False)
    count = math.prod(shape)
    if n != count:
        raise error(f"{what}: shape {shape} needs {count} values but '{field}' holds {n}")
    return shape


def blob_to_array(blob: caffe_pb2.BlobProto, *, diff: bool = False, what: str = "blob") -> np.ndarray:
    """The values of ``blob`` as a NumPy array of the blob's shape.

    ``double_data`` is used when non-empty (array float64), else ``data`` (float32); with
    ``diff=True`` the same for ``double_diff`` / ``diff``. The shape is the legacy
    (num, channels, height, width) when any of those is set, else ``shape.dim`` (empty: a
    0-d scalar), as Caffe's ``Blob::FromProto``. The shape is checked first
    (``check_blob_shape``); the number of values must equal the shape's count; otherwise
    ``FormatError`` (``what`` names the blob in the message).
    """
    shape = check_blob_shape(blob, what)
    count = math.prod(shape)
    field, n = _blob_value_field(blob, diff)
    if n != count:
        raise FormatError(f"{what}: shape {shape} needs {count} values but '{field}' holds {n}")
    if field.startswith("double"):
        values = _packed_values(blob, 9 if diff else 8, "<f8")
        if values is None:
            values = np.array(blob.double_diff if diff else blob.double_data, dtype=np.float64)
    else:
        floats = blob.diff if diff else blob.data
        values = _packed_values(blob, 6 if diff else 5, "<f4") if n else np.zeros(0, np.float32)
        if values is None:
            values = np.array(floats, dtype=np.float32)
    return values.reshape(shape)


def array_to_blob(
    arr: np.ndarray | Sequence[float],
    diff: np.ndarray | Sequence[float] | None = None,
    *,
    double: bool = False,
) -> caffe_pb2.BlobProto:
    """A ``BlobProto`` holding ``arr`` as Caffe writes it: ``shape`` + packed float32 ``data``.

    ``diff`` (same shape) goes to ``diff``. With ``double=True`` the values go to
    ``double_data`` / ``double_diff`` in float64 instead.
    """
    a = np.asarray(arr)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(int(d) for d in a.shape)
    dtype = "<f8" if double else "<f4"
    wire = [blob.SerializeToString(), _packed_field(8 if double else 5, a.astype(dtype).tobytes())]
    if diff is not None:
        d = np.asarray(diff)
        if d.shape != a.shape:
            raise ValueError(f"array_to_blob: diff shape {d.shape} differs from data shape {a.shape}")
        wire.append(_packed_field(9 if double else 6, d.astype(dtype).tobytes()))
    # the packed fields are assembled as bytes and parsed once: no Python float per value
    blob.ParseFromString(b"".join(wire))
    return blob
