"""Reading and writing Caffe's files.

Text (``.prototxt``): nets (``NetParameter``) and solvers (``SolverParameter``), parsed with
protobuf's text format; a parse error raises ``PrototxtError`` whose message starts with
``file:line:column:``, names the offending field or token and suggests the fix.

Binary (protobuf wire format): ``.caffemodel`` (``NetParameter``), ``.binaryproto``
(``BlobProto``, e.g. mean files) and ``.solverstate`` (``SolverState``). A file that is
truncated or is not a Caffe message raises ``FormatError`` naming the file and what was
expected. Writers are atomic: a temporary file in the same folder, fsync, ``os.replace``.

Nets and solvers are upgraded on read exactly as Caffe does (``caffe_compat.upgrade``), so V0/V1
definitions and weights come back in the current format.

Every file is checked to be a regular file before it is opened (a FIFO, a device or a directory
is refused at once, naming it) and read up to a limit: ``MAX_BINARY_PROTO_BYTES`` (Caffe's
``kProtoReadBytesLimit``) for binary messages, ``MAX_PROTOTXT_BYTES`` for text. Blob shapes are
checked (``MAX_BLOB_AXES``, ``MAX_BLOB_COUNT``) before any array is made.

Deliberate differences from Caffe: Caffe aborts (``CHECK``) where we raise, and our messages name
the file, line, column, layer and field. A ``.caffemodel`` is checked whole when read: a blob of
any layer whose value count does not match its shape is refused (Caffe checks only the layers it
copies), so weights are never loaded partially.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf import text_format

from caffe_compat.errors import FormatError, PrototxtError
from caffe_compat.proto import caffe_pb2
from caffe_compat.rawio import (  # the layer below this module; its public names are io's too
    MAX_BINARY_PROTO_BYTES,
    MAX_BLOB_AXES,
    MAX_BLOB_COUNT,
    MAX_PROTOTXT_BYTES,
    _looks_binary,
    _parse_binary,
    _read_bytes,
    _what_it_looks_like,
    array_to_blob,
    blob_to_array,
    check_blob,
    check_blob_shape,
    check_regular_file,
    read_blobproto,
    read_regular_file,
)

__all__ = [
    "Transformer",
    "array_to_blobproto",
    "array_to_datum",
    "arraylist_to_blobprotovector_str",
    "arraylist_to_blobprotovecor_str",
    "blobproto_to_array",
    "blobprotovector_str_to_arraylist",
    "datum_to_array",
    "load_image",
    "oversample",
    "resize_image",
    "atomic_write",
    "atomic_write_bytes",
    "check_regular_file",
    "read_regular_file",
    "check_blob_shape",
    "check_blob",
    "remove_stale_temporaries",
    "parse_prototxt",
    "read_prototxt",
    "write_prototxt",
    "message_to_text",
    "read_net",
    "read_net_text",
    "write_net",
    "read_solver",
    "read_solver_text",
    "write_solver",
    "read_caffemodel",
    "read_caffemodel_h5",
    "read_h5_dataset",
    "write_caffemodel",
    "read_blobproto",
    "write_blobproto",
    "blob_to_array",
    "array_to_blob",
    "read_solverstate",
    "MAX_BINARY_PROTO_BYTES",
    "MAX_PROTOTXT_BYTES",
    "MAX_BLOB_COUNT",
    "MAX_BLOB_AXES",
    "write_solverstate",
]

M = TypeVar("M", bound=_message.Message)

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------
# Raw file access


_TMP_RE = re.compile(r"^\..+\.(\d+)\.[A-Za-z0-9_]+\.tmp$")
_SWEPT: set[str] = set()


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's), or cannot tell: keep its file
    return True


def remove_stale_temporaries(folder: PathLike) -> list[str]:
    """Remove the temporaries of interrupted atomic writes in ``folder``: files named
    ``.<name>.<pid>.<random>.tmp`` (as ``atomic_write`` names them) whose process ``pid`` no
    longer exists. Files of live processes and every other file are kept. Returns the paths
    removed. ``atomic_write`` calls it once per folder per process, so the next snapshot written
    into a folder cleans what a killed run left there."""
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TMP_RE.match(name)
        if m is None or _process_alive(int(m.group(1))):
            continue
        full = os.path.join(folder, name)
        try:
            if os.path.isfile(full) and not os.path.islink(full):
                os.unlink(full)
                removed.append(full)
        except OSError:
            continue
    return removed


def _umask() -> int:
    """The process's umask: read from /proc where there is one (``os.umask`` can only read it by
    setting it, which other threads would see for a moment)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Create ``path`` atomically: ``write(tmp)`` writes the whole file at the temporary path
    ``tmp`` (in the destination folder), which is then fsynced and renamed over ``path`` with
    ``os.replace``. Readers see the old file or the new one, never a partial write, even if the
    process dies midway.

    The temporary is named ``.<name>.<pid>.<random>.tmp``; the first write into a folder removes
    the temporaries there whose process is gone (``remove_stale_temporaries``). The file gets
    the permissions of an ordinary new file under the user's umask (0644 under umask 022, as
    Caffe's ``fopen``), not the temporary's 0600."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FormatError(f"{path}: cannot write: folder {str(folder)!r} does not exist")
    key = os.path.realpath(folder)
    if key not in _SWEPT:
        _SWEPT.add(key)
        remove_stale_temporaries(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable where the platform allows it
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_write``)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


# ---------------------------------------------------------------------------------------------
# Text format


def read_prototxt(path: PathLike, message_cls: type[M]) -> M:
    """Parse the text-format file ``path`` into a new ``message_cls`` (no upgrade)."""
    data = _read_bytes(path, f"a text {message_cls.DESCRIPTOR.full_name} (.prototxt)", MAX_PROTOTXT_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        hint = (
            "; this looks like a binary protobuf (a .caffemodel?), not a text .prototxt" if _looks_binary(data) else ""
        )
        raise PrototxtError(
            f"{path}:{_line_col_of_offset(data, exc.start)}: not UTF-8 text "
            f"(expected a text {message_cls.DESCRIPTOR.full_name}){hint}"
        ) from None
    return parse_prototxt(text, message_cls, filename=str(path))


def parse_prototxt(text: str, message_cls: type[M], filename: str = "<string>") -> M:
    """Parse text-format ``text`` into a new ``message_cls``.

    Raises ``PrototxtError`` with ``filename:line:column:`` first, the field or token at fault,
    the message type it belongs to and a hint (closest field or enum name, expected type).
    """
    if len(text) > MAX_PROTOTXT_BYTES:
        raise PrototxtError(
            f"{filename}: {len(text)} characters of text, more than the {MAX_PROTOTXT_BYTES} a prototxt may have "
            f"(protobuf's text parser needs ~160 bytes of memory per byte); a net or solver is a few hundred kB"
        )
    msg = message_cls()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        raise PrototxtError(_describe_parse_error(exc, text, msg.DESCRIPTOR, filename)) from None
    return msg


_INTEGRAL_FLOAT_RE = re.compile(r"^(\s*[A-Za-z_][A-Za-z0-9_]*: -?[0-9]+)\.0$", re.MULTILINE)


def message_to_text(message: _message.Message) -> str:
    """``message`` in text format as Caffe's C++ printer writes it.

    Python's printer writes integral floats as ``1.0`` where C++ writes ``1``; we write ``1``
    so that upgraded files match Caffe's byte for byte. (Quoted strings are never touched: the
    pattern only matches unquoted numbers.)
    """
    return _INTEGRAL_FLOAT_RE.sub(r"\1", text_format.MessageToString(message))


def write_prototxt(message: _message.Message, path: PathLike) -> None:
    """Write ``message`` in text format (as Caffe's ``WriteProtoToTextFile``), atomically."""
    atomic_write_bytes(path, message_to_text(message).encode("utf-8"))


def read_net(path: PathLike) -> caffe_pb2.NetParameter:
    """Read a net definition (.prototxt) and upgrade it as Caffe does (V0/V1, inputs, ...)."""
    from caffe_compat.upgrade import upgrade_net

    net = read_prototxt(path, caffe_pb2.NetParameter)
    return upgrade_net(net, source=str(path))


def read_net_text(text: str, filename: str = "<string>") -> caffe_pb2.NetParameter:
    """Parse a net definition given as text and upgrade it as Caffe does."""
    from caffe_compat.upgrade import upgrade_net

    net = parse_prototxt(text, caffe_pb2.NetParameter, filename=filename)
    return upgrade_net(net, source=filename)


def write_net(net_param: caffe_pb2.NetParameter, path: PathLike) -> None:
    """Write a net definition as text (.prototxt), atomically."""
    write_prototxt(net_param, path)


def read_solver(path: PathLike) -> caffe_pb2.SolverParameter:
    """Read a solver definition and upgrade it as Caffe does.

    ``solver_type`` (enum) becomes ``type`` (string); an unset ``snapshot_prefix`` becomes the
    solver file's path without extension, and a prefix naming a folder gets the solver file's
    stem appended (BVLC master's ``UpgradeSnapshotPrefixProperty``).
    """
    from caffe_compat.upgrade import upgrade_solver

    solver = read_prototxt(path, caffe_pb2.SolverParameter)
    return upgrade_solver(solver, source=str(path))


def read_solver_text(text: str, filename: str = "<string>") -> caffe_pb2.SolverParameter:
    """Parse a solver definition given as text; upgrade ``solver_type`` (not the prefix)."""
    from caffe_compat.upgrade import upgrade_solver

    solver = parse_prototxt(text, caffe_pb2.SolverParameter, filename=filename)
    return upgrade_solver(solver, source=None)


def write_solver(solver_param: caffe_pb2.SolverParameter, path: PathLike) -> None:
    """Write a solver definition as text, atomically."""
    write_prototxt(solver_param, path)


# ---------------------------------------------------------------------------------------------
# Binary format


def read_caffemodel(path: PathLike) -> caffe_pb2.NetParameter:
    """Read trained weights (binary ``NetParameter``) and upgrade them as Caffe does.

    V1 ``layers`` (and V0) become ``layer``; blob contents are left as stored (legacy
    num/channels/height/width dims and ``double_data`` are kept; see ``blob_to_array``).
    Raises ``FormatError`` for a truncated or non-Caffe file.
    """
    from caffe_compat.upgrade import upgrade_net

    what = "Caffe .caffemodel (binary NetParameter)"
    data = _read_bytes(path, what)
    net = _parse_binary(data, caffe_pb2.NetParameter, path, what)
    if not net.layer and not net.layers:
        raise FormatError(f"{path}: not a usable {what}: it holds no layers{_what_it_looks_like(data)}")
    net = upgrade_net(net, source=str(path))
    for i, layer in enumerate(net.layer):
        for k, blob in enumerate(layer.blobs):
            check_blob(blob, f"{path}: layer {layer.name or i!r} ({layer.type}) blob {k}")
    return net


def _h5_error(path: PathLike, where: str, exc: BaseException) -> FormatError:
    text = str(exc) or type(exc).__name__
    return FormatError(f"{path}: {where}: HDF5 error ({text}); the file is corrupt or not Caffe HDF5 weights")


def read_h5_dataset(path: PathLike, dataset, what: str, *, error: type[Exception] = FormatError) -> np.ndarray:
    """Read a numeric HDF5 ``dataset`` of the file ``path`` as a NumPy array, refusing (with
    ``error`` naming the file and ``what``) a string, compound or other non-numeric type, more
    than ``MAX_BLOB_AXES`` axes or ``MAX_BLOB_COUNT`` elements (checked before reading), and
    turning h5py's errors ("Can't synchronously read data"...) into ``error``."""
    try:
        dtype, shape = dataset.dtype, tuple(dataset.shape or ())
    except Exception as exc:  # h5py raises OSError, RuntimeError, KeyError... on corrupt files
        raise error(f"{path}: {what}: HDF5 error ({exc}); the file is corrupt") from None
    if dtype.kind not in "fiu" or dtype.fields is not None or dtype.subdtype is not None:
        raise error(f"{path}: {what} has type {dtype}; only float and integer datasets can be read")
    if len(shape) > MAX_BLOB_AXES:
        raise error(f"{path}: {what} has {len(shape)} axes; Caffe allows at most {MAX_BLOB_AXES}")
    if math.prod(shape) > MAX_BLOB_COUNT:
        raise error(f"{path}: {what} has shape {list(shape)}, more than the {MAX_BLOB_COUNT} elements a blob may hold")
    try:
        return np.asarray(dataset[()])
    except Exception as exc:
        raise error(f"{path}: {what}: cannot read it: HDF5 error ({exc}); the file is corrupt") from None


def _read_h5_weights(f, path: PathLike, what: str, layers, out: dict, at: list[str]) -> None:
    """The body of ``read_caffemodel_h5``; ``at[0]`` says what is being read, for h5py's errors."""
    import h5py

    if "data" not in f or not isinstance(f.get("data"), h5py.Group):
        raise FormatError(f"{path}: not {what}: no 'data' group (Caffe's Net::ToHDF5 writes one)")
    g = f["data"]
    for lname in list(g.keys()):
        where = at[0] = f"layer {lname!r}"
        link = g.get(lname, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise FormatError(f"{path}: {where} is a {type(link).__name__}, not a group of blobs")
        lg = g[lname]
        if not isinstance(lg, h5py.Group):
            raise FormatError(f"{path}: {where} is a dataset, not a group of blobs (data/{lname}/0, 1, ...)")
        blobs: dict[int, np.ndarray] = {}
        for bname in list(lg.keys()):
            bwhere = at[0] = f"{where} blob {bname!r}"
            if not bname.isdigit() or (bname != "0" and bname.startswith("0")):
                raise FormatError(
                    f"{path}: {bwhere}: blobs are named 0, 1, ... (their index); incompatible number of blobs"
                )
            blink = lg.get(bname, getlink=True)
            if not isinstance(blink, h5py.HardLink):
                target = getattr(blink, "path", "")
                raise FormatError(
                    f"{path}: {bwhere} is a {type(blink).__name__} to {target!r}, not a stored blob; "
                    "incompatible number of blobs"
                )
            ds = lg[bname]
            if not isinstance(ds, h5py.Dataset):
                raise FormatError(f"{path}: {bwhere} is a group, not a dataset; incompatible number of blobs")
            arr = read_h5_dataset(path, ds, f"{bwhere} (dataset data/{lname}/{bname})")
            blobs[int(bname)] = np.ascontiguousarray(arr, dtype=np.float32)
        if layers is not None and lname in layers:
            n, shared = layers[lname]
            if blobs and (len(blobs) > n or max(blobs) >= n):
                raise FormatError(
                    f"{path}: layer {lname!r}: incompatible number of blobs: the file has "
                    f"{sorted(blobs)}, the net's layer has {n} blob(s)"
                )
            missing = [k for k in range(n) if k not in blobs and k not in shared]
            if missing:
                raise FormatError(
                    f"{path}: layer {lname!r}: incompatible number of blobs: blob {missing[0]} is missing "
                    f"(the net's layer has {n}; only a blob shared with another layer may be absent)"
                )
        out[lname] = blobs


def read_caffemodel_h5(
    path: PathLike, layers: Mapping[str, tuple[int, Collection[int]]] | None = None
) -> dict[str, dict[int, np.ndarray]]:
    """Read Caffe's HDF5 weights (``.caffemodel.h5``, ``Net::ToHDF5``): group ``data``, one
    group per layer, datasets ``"0"``, ``"1"``... (one per blob). Returns ``{layer: {index:
    float32 array}}`` in the file's order, every blob read and checked before anything is
    returned, so a caller never loads such a file partially.

    Refused with ``FormatError`` naming the file, layer and blob, as Caffe's "Incompatible number
    of blobs": a path that is not a regular file, no ``data`` group, a layer entry that is not a
    group, a blob name that is not an index, a soft or external link (dangling or not), a string
    or compound dataset, a shape past the blob limits, and any HDF5 read error. A missing index
    is absent from the layer's dict: Caffe allows that only for a parameter shared with another
    layer. ``layers`` (the net's: ``{name: (number of blobs, indices of the blobs it shares from
    another layer)}``) applies Caffe's checks: a file layer of that name with more blobs than the
    net's, or without one of its blobs that it does not share, is refused. Layers of the file
    absent from ``layers`` are still read and checked (a file is taken whole or not at all).
    """
    import h5py

    what = "Caffe HDF5 weights (.caffemodel.h5)"
    check_regular_file(path, what)
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise FormatError(f"{path}: cannot be read as {what} ({exc})") from None
    out: dict[str, dict[int, np.ndarray]] = {}
    at = ["group 'data'"]
    with f:
        try:
            _read_h5_weights(f, path, what, layers, out, at)
        except FormatError:
            raise
        except Exception as exc:  # h5py's errors on a damaged file: OSError, RuntimeError, TypeError...
            raise _h5_error(path, at[0], exc) from None
    return out


def write_caffemodel(net_param: caffe_pb2.NetParameter, path: PathLike) -> None:
    """Write trained weights (binary ``NetParameter``), atomically."""
    atomic_write_bytes(path, net_param.SerializeToString())


def write_blobproto(blob: caffe_pb2.BlobProto, path: PathLike) -> None:
    """Write a binary ``BlobProto``, atomically."""
    atomic_write_bytes(path, blob.SerializeToString())


def read_solverstate(path: PathLike) -> caffe_pb2.SolverState:
    """Read a binary ``SolverState`` (``.solverstate``)."""
    what = "Caffe .solverstate (binary SolverState)"
    data = _read_bytes(path, what)
    state = _parse_binary(data, caffe_pb2.SolverState, path, what)
    for k, blob in enumerate(state.history):
        check_blob(blob, f"{path}: history blob {k}")
    return state


def write_solverstate(state: caffe_pb2.SolverState, path: PathLike) -> None:
    """Write a binary ``SolverState``, atomically."""
    atomic_write_bytes(path, state.SerializeToString())


# ---------------------------------------------------------------------------------------------
# Blobs <-> arrays


# ---------------------------------------------------------------------------------------------
# Parse-error messages


def _line_col_of_offset(data: bytes, offset: int) -> str:
    line = data.count(b"\n", 0, offset) + 1
    col = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return f"{line}:{col}"


_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"?|'(?:[^'\\\n]|\\.)*'?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>[-+]?[0-9.][0-9A-Za-z_.+-]*)
  | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)

_TYPE_NAMES = {
    _descriptor.FieldDescriptor.TYPE_DOUBLE: "double",
    _descriptor.FieldDescriptor.TYPE_FLOAT: "float",
    _descriptor.FieldDescriptor.TYPE_INT64: "int64",
    _descriptor.FieldDescriptor.TYPE_UINT64: "uint64",
    _descriptor.FieldDescriptor.TYPE_INT32: "int32",
    _descriptor.FieldDescriptor.TYPE_FIXED64: "fixed64",
    _descriptor.FieldDescriptor.TYPE_FIXED32: "fixed32",
    _descriptor.FieldDescriptor.TYPE_BOOL: "bool",
    _descriptor.FieldDescriptor.TYPE_STRING: "string",
    _descriptor.FieldDescriptor.TYPE_BYTES: "bytes",
    _descriptor.FieldDescriptor.TYPE_UINT32: "uint32",
    _descriptor.FieldDescriptor.TYPE_SFIXED32: "sfixed32",
    _descriptor.FieldDescriptor.TYPE_SFIXED64: "sfixed64",
    _descriptor.FieldDescriptor.TYPE_SINT32: "sint32",
    _descriptor.FieldDescriptor.TYPE_SINT64: "sint64",
}


def _type_name(field: _descriptor.FieldDescriptor) -> str:
    if field.type == _descriptor.FieldDescriptor.TYPE_ENUM:
        return f"enum {field.enum_type.full_name}"
    if field.type in (_descriptor.FieldDescriptor.TYPE_MESSAGE, _descriptor.FieldDescriptor.TYPE_GROUP):
        return f"message {field.message_type.full_name}"
    return _TYPE_NAMES.get(field.type, "?")


def _context_at(
    text: str, offset: int, root: _descriptor.Descriptor
) -> tuple[_descriptor.Descriptor | None, str | None]:
    """The message type being parsed at ``offset`` and the last field name set there."""
    stack: list[_descriptor.Descriptor | None] = [root]
    key: str | None = None
    pending: str | None = None  # an identifier that may be a field name (followed by ':' or '{')
    pos = 0
    while pos < offset:
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            break
        pos = m.end()
        kind = m.lastgroup
        tok = m.group()
        if kind in ("ws", "comment"):
            continue
        if kind == "ident":
            pending = tok
            continue
        if kind == "punct" and tok == ":":
            if pending is not None:
                key = pending
            pending = None
            continue
        if kind == "punct" and tok in "{<":
            name = pending if pending is not None else key
            cur = stack[-1]
            sub = None
            if cur is not None and name is not None:
                f = cur.fields_by_name.get(name)
                if f is not None and f.message_type is not None:
                    sub = f.message_type
            stack.append(sub)
            key = None
            pending = None
            continue
        if kind == "punct" and tok in "}>":
            if len(stack) > 1:
                stack.pop()
            key = None
            pending = None
            continue
        pending = None
    return stack[-1], key


def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(name.lower(), [c.lower() for c in candidates], n=1, cutoff=0.6)
        if close:
            close = [c for c in candidates if c.lower() == close[0]]
    return close[0] if close else ""


def _describe_parse_error(exc: text_format.ParseError, text: str, root: _descriptor.Descriptor, filename: str) -> str:
    line, col = exc.GetLine(), exc.GetColumn()
    raw = str(exc)
    m = re.match(r"^\d+:\d+ : ", raw)
    body = raw[m.end() :] if m else raw
    lines = text.split("\n")
    if line is not None and 1 <= line <= len(lines):
        src = lines[line - 1]
        for quoted in (f"'{src}': ", f"'{src.rstrip()}': "):
            if body.startswith(quoted):
                body = body[len(quoted) :]
                break
        else:
            body = re.sub(r"^'.*?': ", "", body, count=1)
    loc = f"{filename}:{line}:{col}" if line is not None else filename
    offset = len(text)
    if line is not None and col is not None and 1 <= line <= len(lines):
        offset = sum(len(s) + 1 for s in lines[: line - 1]) + max(col - 1, 0)
    desc, key = _context_at(text, offset, root)
    pool = root.file.pool

    m = re.match(r'Message type "([\w.]+)" has no field named "(\w+)"', body)
    if m:
        type_name, field = m.groups()
        try:
            mdesc = pool.FindMessageTypeByName(type_name)
            names = [f.name for f in mdesc.fields]
        except KeyError:
            names = []
        guess = _suggest(field, names)
        hint = f"; did you mean '{guess}'?" if guess else ""
        extra = ""
        if not guess and type_name == "caffe.NetParameter":
            layer_fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
            if field in layer_fields:
                extra = f" ('{field}' is a field of a layer: put it inside a layer {{ ... }} block)"
        return f"{loc}: unknown field '{field}' in message {type_name}{hint}{extra}"

    m = re.match(r'Enum type "([\w.]+)" has no value named (\S+?)\.?$', body)
    if m:
        enum_name, value = m.groups()
        try:
            values = [v.name for v in pool.FindEnumTypeByName(enum_name).values]
        except KeyError:
            values = []
        guess = _suggest(value, values)
        field_part = f" for field '{key}'" if key else ""
        hint = f"; did you mean {guess}?" if guess else ""
        return (
            f"{loc}: '{value}' is not a value of enum {enum_name}{field_part}{hint} (valid values: {', '.join(values)})"
        )

    m = re.match(r'Message type "([\w.]+)" should not have multiple "(\w+)" fields', body)
    if m:
        type_name, field = m.groups()
        return f"{loc}: field '{field}' of message {type_name} is given more than once but is not repeated; keep one"

    value_error = re.match(
        r"(Couldn't parse (?:integer|float|double|unsigned integer)|Value out of range|"
        r"Expected string but found|Expected \"true\" or \"false\"|Invalid value)(.*)$",
        body,
    )
    if value_error:
        field_desc = desc.fields_by_name.get(key) if (desc is not None and key) else None
        token = text[offset:].split("\n", 1)[0].strip()
        tm = _TOKEN_RE.match(token) if token else None
        token = tm.group() if tm else token
        where = ""
        if field_desc is not None:
            where = f" for field '{key}' ({_type_name(field_desc)}) of message {desc.full_name}"
        elif key:
            where = f" for field '{key}'"
        reason = body.rstrip(".")
        hint = ""
        if field_desc is not None and field_desc.type == _descriptor.FieldDescriptor.TYPE_STRING:
            hint = "; strings must be in double quotes"
        elif field_desc is not None and field_desc.type == _descriptor.FieldDescriptor.TYPE_ENUM:
            hint = f"; valid values: {', '.join(v.name for v in field_desc.enum_type.values)}"
        elif field_desc is not None and field_desc.type == _descriptor.FieldDescriptor.TYPE_BOOL:
            hint = "; use true or false"
        elif "out of range" in reason and field_desc is not None:
            hint = f"; {_type_name(field_desc)} cannot hold it"
        return f"{loc}: invalid value {token}{where}: {reason}{hint}"

    context = f" (in message {desc.full_name})" if desc is not None else ""
    m = re.match(r'Expected "(.)"\.?$', body)
    tok = _TOKEN_RE.match(text, offset) if offset < len(text) else None
    after = text[tok.end() :] if tok is not None and tok.lastgroup != "ws" else text[offset:]
    if m and not re.sub(r"#[^\n]*", "", after).strip():
        return f"{loc}: unexpected end of file: expected '{m.group(1)}' to close a block{context}"
    m = re.match(r"Expected identifier or number, got (.*)\.$", body, re.DOTALL)
    if m:
        got = m.group(1)
        if got in ("}", ">") and desc is root:
            return f"{loc}: unexpected '{got}': there is no open block to close"
        shown = repr(got) if not got.isprintable() or not got.strip() else f"'{got}'"
        return f"{loc}: expected a field name, found {shown}{context}"
    return f"{loc}: {body.rstrip('.')}{context}"


# pycaffe's caffe.io helpers (defined in caffe_compat/pycaffe_io.py)
from caffe_compat.pycaffe_io import (  # noqa: E402
    Transformer,
    array_to_blobproto,
    array_to_datum,
    arraylist_to_blobprotovecor_str,
    arraylist_to_blobprotovector_str,
    blobproto_to_array,
    blobprotovector_str_to_arraylist,
    datum_to_array,
    load_image,
    oversample,
    resize_image,
)
