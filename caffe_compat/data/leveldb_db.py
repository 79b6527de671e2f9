"""LevelDB databases, read-only and in pure Python, as Caffe's ``db::LevelDB`` reads them.

A LevelDB is a directory. :class:`LevelDBReader` yields its live records in key order
(LevelDB's default bytewise comparator, the only one Caffe uses) without the LevelDB library,
without taking the directory's ``LOCK`` and without writing anything, streaming with bounded
memory: every table is read one block at a time and the sources are merged with a heap.

Format facts relied on (google/leveldb ``doc/impl.md``, ``doc/log_format.md``,
``doc/table_format.md``, ``db/version_edit.cc``, ``db/write_batch.cc``, ``db/dbformat.h``,
``table/format.cc``, ``table/block.cc``; google/snappy ``format_description.txt``):

- Directory: ``CURRENT`` holds the name of the live descriptor (``MANIFEST-NNNNNN``) and a
  newline. Tables are ``NNNNNN.ldb`` (``.sst`` before LevelDB 1.14), write-ahead logs
  ``NNNNNN.log``; ``LOCK``, ``LOG`` and ``LOG.old`` are not read.
- Log files (the write-ahead logs and the MANIFEST): 32 KiB blocks of records ``crc32c: u32 LE,
  length: u16 LE, type: u8, data``; types FULL 1, FIRST 2, MIDDLE 3, LAST 4 (fragments of one
  user record); a block's last <7 bytes are zero padding; a zero header (type 0, length 0) is
  preallocated space, skipped to the next block. The checksum covers the type byte and the data
  and is stored masked: ``((crc >> 15 | crc << 17) + 0xa282ead8) mod 2**32``. A log that ends in
  the middle of a record ends there (the writer died), as LevelDB's log reader treats it.
- MANIFEST records are VersionEdits: a sequence of varint32 tags with 1 comparator name
  (length-prefixed), 2 log number, 9 previous log number, 3 next file number, 4 last sequence
  (varint64 each), 5 compact pointer (level, internal key), 6 deleted file (level, number),
  7 new file (level, number, file size, smallest and largest internal key). Replaying them in
  order (each edit's deletions before its additions) gives the live tables of levels 0..6.
  The write-ahead logs still holding data are those numbered >= the log number or equal to the
  previous log number.
- Write-ahead log records are WriteBatches: ``sequence: u64 LE, count: u32 LE`` then ``count``
  entries, ``1 key value`` (Put) or ``0 key`` (Delete), key and value length-prefixed (varint32);
  the entries take sequences ``sequence, sequence + 1, ...``.
- Internal keys (tables, MANIFEST) are ``user_key + u64 LE (sequence << 8 | type)``, type 1 a
  value and 0 a deletion. They sort by user key ascending, then sequence descending; for each
  user key the newest entry wins and a deletion hides every older value.
- Tables: a 48-byte footer ``metaindex handle, index handle`` (BlockHandles: varint64 offset,
  varint64 size), zero padding to 40 bytes, magic ``0xdb4775248b80fb57`` (u64 LE). Each block is
  followed by a 5-byte trailer: compression type (0 none, 1 snappy; 2 zstd in LevelDB >= 1.23,
  not supported here) and the masked crc32c of the block and the type byte. The index block maps
  a separator key to each data block's handle, in order. A block is entries ``shared: varint32,
  non_shared: varint32, value_length: varint32, key[shared:], value`` (the key shares its first
  ``shared`` bytes with the previous key; 0 at restart points), then ``restarts: u32 LE[n]`` and
  ``n: u32 LE``. Level-0 tables may overlap one another; tables of one level >= 1 do not, and are
  read one after the other in the order of their smallest keys.
- Snappy (raw format): varint uncompressed length, then elements whose tag's two low bits say
  literal (00: length-1 in the upper six bits, or in 1-4 little-endian bytes after the tag when
  they are 60-63), copy with a 1-byte offset (01: length 4-11 in bits 2-4, offset's high 3 bits
  in bits 5-7 and low 8 in the next byte), a 2-byte (10) or a 4-byte (11) little-endian offset
  (length-1 in the upper six bits). A copy may overlap what it produces (offset < length).
  ``cramjam`` or ``python-snappy`` decompress when importable; :func:`snappy_decompress` is the
  pure-Python decoder otherwise.

Checksums: write-ahead log and MANIFEST records are always verified (LevelDB verifies them when
it recovers); table blocks only with ``verify_checksums=True``, as LevelDB's
``ReadOptions::verify_checksums`` (default off, and Caffe leaves it off). Structural damage
(truncated files, bad magic, block handles or entries out of range, keys out of order, corrupt
snappy data) is always detected. Deliberate differences from LevelDB: a log record with a bad
checksum raises instead of being dropped with a warning; compression types other than none and
snappy are refused; comparators other than ``leveldb.BytewiseComparator`` are refused.
"""

from __future__ import annotations

import heapq
import logging
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from caffe_compat.errors import DataError

__all__ = ["LevelDBReader", "crc32c", "is_leveldb", "snappy_decompress"]

log = logging.getLogger(__name__)

BYTEWISE_COMPARATOR = "leveldb.BytewiseComparator"
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_BLOCK_TRAILER_SIZE = 5
_LOG_BLOCK_SIZE = 32768
_LOG_HEADER_SIZE = 7
_NUM_LEVELS = 7
_TYPE_DELETION = 0
_TYPE_VALUE = 1
_LOG_FULL, _LOG_FIRST, _LOG_MIDDLE, _LOG_LAST = 1, 2, 3, 4
_COMPRESSION_NAMES = {2: "zstd"}

# Version-edit tags (db/version_edit.cc).
_TAG_COMPARATOR, _TAG_LOG_NUMBER, _TAG_NEXT_FILE, _TAG_LAST_SEQUENCE = 1, 2, 3, 4
_TAG_COMPACT_POINTER, _TAG_DELETED_FILE, _TAG_NEW_FILE, _TAG_PREV_LOG_NUMBER = 5, 6, 7, 9

_U32 = struct.Struct("<I")
_LOG_HEADER = struct.Struct("<IHB")

# One record of a source: (user key, -(sequence << 8 | type), value). Tuples order as LevelDB's
# internal keys: user key bytewise ascending, then the newest first.
_Entry = tuple[bytes, int, bytes]


class _Corrupt(Exception):
    """A structural problem inside one file; turned into a DataError naming the file."""


def _corrupt(path: str, msg: str) -> DataError:
    return DataError(
        f"LevelDB file {path!r}: {msg} (the database is damaged or was copied incompletely: "
        f"copy it again, or re-create it)"
    )


# -- CRC-32C ----------------------------------------------------------------------------------

_CRC_POLY = 0x82F63B78  # Castagnoli, bit-reversed


def _make_crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _CRC_POLY if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _make_crc_table()
_CRC_TABLE_NP = np.array(_CRC_TABLE, dtype=np.uint32)
_CRC_PARALLEL_MIN = 8192
_zero_shift_tables: dict[int, list[list[int]]] = {}


def _apply_shift(tables: list[list[int]], reg: int) -> int:
    t0, t1, t2, t3 = tables
    return t0[reg & 0xFF] ^ t1[(reg >> 8) & 0xFF] ^ t2[(reg >> 16) & 0xFF] ^ t3[reg >> 24]


def _shift_tables(log2_n: int) -> list[list[int]]:
    """Byte tables of the linear map "feed 2**log2_n zero bytes to the CRC register"."""
    tables = _zero_shift_tables.get(log2_n)
    if tables is not None:
        return tables
    if log2_n == 0:
        images = [_CRC_TABLE[(1 << b) & 0xFF] ^ ((1 << b) >> 8) for b in range(32)]
    else:
        half = _shift_tables(log2_n - 1)
        images = [_apply_shift(half, _apply_shift(half, 1 << b)) for b in range(32)]
    tables = []
    for k in range(4):
        t = [0] * 256
        for v in range(1, 256):
            low = (v & -v).bit_length() - 1
            t[v] = t[v & (v - 1)] ^ images[8 * k + low]
        tables.append(t)
    _zero_shift_tables[log2_n] = tables
    return tables


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli) of ``data``, continuing from ``crc`` (0 to start).

    Long inputs are cut into equal lanes whose CRC registers NumPy advances together; the lanes
    are then joined with the linear "feed n zero bytes" map (the register update is linear over
    GF(2)), which makes this several times faster than a byte loop.
    """
    reg = crc ^ 0xFFFFFFFF
    n = len(data)
    done = 0
    if n >= _CRC_PARALLEL_MIN:
        log2_lane = max(6, (int((n / 5) ** 0.5)).bit_length() - 1)
        lane = 1 << log2_lane
        lanes = n // lane
        cols = np.frombuffer(data, dtype=np.uint8, count=lanes * lane).reshape(lanes, lane).T.copy()
        regs = np.zeros(lanes, dtype=np.uint32)
        regs[0] = reg
        table = _CRC_TABLE_NP
        for j in range(lane):
            regs = table[(regs ^ cols[j]) & 0xFF] ^ (regs >> 8)
        shift = _shift_tables(log2_lane)
        reg = 0
        for r in regs.tolist():
            reg = _apply_shift(shift, reg) ^ r
        done = lanes * lane
    table = _CRC_TABLE
    for b in data[done:] if done else data:
        reg = table[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg ^ 0xFFFFFFFF


def _unmask_crc(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# -- Snappy -----------------------------------------------------------------------------------


def snappy_decompress(data: bytes) -> bytes:
    """Decompress raw (unframed) snappy ``data`` in pure Python; raises ``ValueError`` if corrupt."""
    n = len(data)
    length = 0
    pos = 0
    for shift in range(0, 35, 7):
        if pos >= n:
            raise ValueError("truncated uncompressed-length preamble")
        b = data[pos]
        pos += 1
        length |= (b & 0x7F) << shift
        if b < 0x80:
            break
    else:
        raise ValueError("uncompressed-length preamble longer than 5 bytes")
    if length >= 1 << 32:
        raise ValueError(f"uncompressed length {length} exceeds 2**32 - 1")
    out = bytearray()
    while pos < n:
        tag = data[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:
            size = tag >> 2
            if size >= 60:
                extra = size - 59
                if pos + extra > n:
                    raise ValueError(f"literal length bytes run past the end at offset {pos}")
                size = int.from_bytes(data[pos : pos + extra], "little")
                pos += extra
            size += 1
            if pos + size > n:
                raise ValueError(f"literal of {size} bytes runs past the end at offset {pos}")
            out += data[pos : pos + size]
            pos += size
        else:
            if kind == 1:
                if pos + 1 > n:
                    raise ValueError("truncated copy element")
                size = ((tag >> 2) & 7) + 4
                offset = ((tag >> 5) << 8) | data[pos]
                pos += 1
            else:
                width = 2 if kind == 2 else 4
                if pos + width > n:
                    raise ValueError("truncated copy element")
                size = (tag >> 2) + 1
                offset = int.from_bytes(data[pos : pos + width], "little")
                pos += width
            start = len(out) - offset
            if offset == 0 or start < 0:
                raise ValueError(f"copy offset {offset} is invalid at output position {len(out)}")
            if offset >= size:
                out += out[start : start + size]
            else:  # overlapping copy: the last `offset` bytes repeat
                pattern = out[start:]
                reps, rest = divmod(size, offset)
                out += pattern * reps + pattern[:rest]
        if len(out) > length:
            raise ValueError(f"output exceeds the {length} bytes announced")
    if len(out) != length:
        raise ValueError(f"output has {len(out)} bytes, {length} announced")
    return bytes(out)


_snappy_impl: Callable[[bytes], bytes] | None = None


def _find_snappy() -> Callable[[bytes], bytes]:
    try:
        import cramjam
    except ImportError:
        pass
    else:
        return lambda data: bytes(cramjam.snappy.decompress_raw(data))
    try:
        import snappy  # python-snappy
    except ImportError:
        pass
    else:
        if callable(getattr(snappy, "uncompress", None)):
            return snappy.uncompress
    return snappy_decompress


def _snappy() -> Callable[[bytes], bytes]:
    """cramjam's or python-snappy's decoder when importable, else :func:`snappy_decompress`."""
    global _snappy_impl
    if _snappy_impl is None:
        _snappy_impl = _find_snappy()
    return _snappy_impl


# -- Encodings --------------------------------------------------------------------------------


def _varint(buf: bytes, pos: int, limit: int, what: str) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= limit:
            raise _Corrupt(f"truncated {what}")
        if shift > 63:
            raise _Corrupt(f"malformed varint ({what})")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _slice(buf: bytes, pos: int, limit: int, what: str) -> tuple[bytes, int]:
    """A varint32 length-prefixed byte string."""
    size, pos = _varint(buf, pos, limit, what)
    if pos + size > limit:
        raise _Corrupt(f"truncated {what}")
    return buf[pos : pos + size], pos + size


def _split_internal_key(ikey: bytes, what: str) -> tuple[bytes, int]:
    if len(ikey) < 8:
        raise _Corrupt(f"internal key of {len(ikey)} bytes (< 8) in {what}")
    tag = int.from_bytes(ikey[-8:], "little")
    if tag & 0xFF > _TYPE_VALUE:
        raise _Corrupt(f"unknown value type {tag & 0xFF} in {what}")
    return ikey[:-8], -tag


# -- Log files --------------------------------------------------------------------------------


def _log_records(path: str) -> Iterator[bytes]:
    """The user records of a log file (a write-ahead log or a MANIFEST), checksums verified."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"LevelDB file {path!r} could not be read: {e}") from e
    n = len(data)
    pos = 0
    pending: bytearray | None = None
    while pos < n:
        left = _LOG_BLOCK_SIZE - pos % _LOG_BLOCK_SIZE
        if left < _LOG_HEADER_SIZE:  # block trailer
            pos += left
            continue
        if pos + _LOG_HEADER_SIZE > n:
            log.warning("LevelDB log %r ends inside a record header; its last bytes are ignored", path)
            pending = None
            break
        masked, size, rtype = _LOG_HEADER.unpack_from(data, pos)
        if rtype == 0 and size == 0:  # preallocated zeros: skip the rest of the block
            pos += left
            continue
        if _LOG_HEADER_SIZE + size > left:
            raise _corrupt(path, f"log record at offset {pos} has length {size}, beyond its 32 KiB block")
        end = pos + _LOG_HEADER_SIZE + size
        if end > n:
            log.warning("LevelDB log %r ends inside a record (the writer stopped); its last record is ignored", path)
            pending = None
            break
        if crc32c(data[pos + 6 : end]) != _unmask_crc(masked):
            raise _corrupt(path, f"log record at offset {pos} fails its checksum")
        payload = data[pos + _LOG_HEADER_SIZE : end]
        if rtype == _LOG_FULL:
            if pending is not None:
                raise _corrupt(path, f"record at offset {pos} starts before the previous one ended")
            yield payload
        elif rtype == _LOG_FIRST:
            if pending is not None:
                raise _corrupt(path, f"record at offset {pos} starts before the previous one ended")
            pending = bytearray(payload)
        elif rtype in (_LOG_MIDDLE, _LOG_LAST):
            if pending is None:
                raise _corrupt(path, f"record fragment at offset {pos} has no first fragment")
            pending += payload
            if rtype == _LOG_LAST:
                yield bytes(pending)
                pending = None
        else:
            raise _corrupt(path, f"unknown log record type {rtype} at offset {pos}")
        pos = end
    if pending is not None:
        log.warning("LevelDB log %r ends inside a fragmented record; its last record is ignored", path)


def _write_batch_entries(record: bytes, path: str) -> Iterator[_Entry]:
    if len(record) < 12:
        raise _corrupt(path, f"write batch of {len(record)} bytes is shorter than its 12-byte header")
    sequence = int.from_bytes(record[:8], "little")
    count = _U32.unpack_from(record, 8)[0]
    pos, n, found = 12, len(record), 0
    try:
        while pos < n:
            kind = record[pos]
            key, pos = _slice(record, pos + 1, n, "write batch key")
            if kind == _TYPE_VALUE:
                value, pos = _slice(record, pos, n, "write batch value")
            elif kind == _TYPE_DELETION:
                value = b""
            else:
                raise _Corrupt(f"unknown write batch entry tag {kind}")
            yield key, -((sequence + found) << 8 | kind), value
            found += 1
    except _Corrupt as e:
        raise _corrupt(path, f"write batch at sequence {sequence}: {e}") from None
    if found != count:
        raise _corrupt(path, f"write batch at sequence {sequence} holds {found} entries, its header says {count}")


# -- Tables -----------------------------------------------------------------------------------


def _block_entries(block: bytes, what: str) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of an uncompressed block, keys un-prefix-compressed."""
    n = len(block)
    if n < 4:
        raise _Corrupt(f"{what} of {n} bytes has no restart array")
    num_restarts = _U32.unpack_from(block, n - 4)[0]
    limit = n - 4 - 4 * num_restarts
    if limit < 0:
        raise _Corrupt(f"{what} claims {num_restarts} restart points in {n} bytes")
    if num_restarts == 0:  # LevelDB reads such a block as empty
        return []
    out = []
    key = b""
    pos = 0
    while pos < limit:
        # three varint32s; one byte each in the common case
        shared = block[pos]
        if shared < 0x80:
            pos += 1
        else:
            shared, pos = _varint(block, pos, limit, f"entry header in {what}")
        non_shared = block[pos] if pos < limit else 0x80
        if non_shared < 0x80:
            pos += 1
        else:
            non_shared, pos = _varint(block, pos, limit, f"entry header in {what}")
        value_len = block[pos] if pos < limit else 0x80
        if value_len < 0x80:
            pos += 1
        else:
            value_len, pos = _varint(block, pos, limit, f"entry header in {what}")
        end = pos + non_shared + value_len
        if shared > len(key) or end > limit:
            raise _Corrupt(f"bad entry at offset {pos} of {what}")
        key = key[:shared] + block[pos : pos + non_shared]
        out.append((key, block[pos + non_shared : end]))
        pos = end
    return out


def _decode_handle(buf: bytes, pos: int, limit: int, what: str) -> tuple[int, int, int]:
    offset, pos = _varint(buf, pos, limit, what)
    size, pos = _varint(buf, pos, limit, what)
    return offset, size, pos


class _TableFile:
    """One open table file: its footer checked, blocks read on demand."""

    def __init__(self, path: str, expected_size: int | None, verify: bool):
        self.path, self.verify = path, verify
        try:
            self.f = open(path, "rb")
        except FileNotFoundError:
            raise DataError(
                f"LevelDB table {path!r}, listed in the MANIFEST, is missing (copy the whole database directory)"
            ) from None
        except OSError as e:
            raise DataError(f"LevelDB table {path!r} could not be opened: {e}") from e
        try:
            self.size = os.fstat(self.f.fileno()).st_size
            if expected_size is not None and self.size != expected_size:
                raise _corrupt(path, f"table is {self.size} bytes, the MANIFEST says {expected_size}")
            if self.size < _FOOTER_SIZE:
                raise _corrupt(path, f"table of {self.size} bytes is shorter than its {_FOOTER_SIZE}-byte footer")
            self.f.seek(self.size - _FOOTER_SIZE)
            footer = self.f.read(_FOOTER_SIZE)
            if int.from_bytes(footer[40:], "little") != _TABLE_MAGIC:
                raise _corrupt(path, "bad table magic number: not a LevelDB table")
            try:
                _, _, pos = _decode_handle(footer, 0, 40, "metaindex handle")
                offset, size, _ = _decode_handle(footer, pos, 40, "index handle")
            except _Corrupt as e:
                raise _corrupt(path, f"footer: {e}") from None
            self.index = self._entries(offset, size, "index block")
        except BaseException:
            self.f.close()
            raise

    def _entries(self, offset: int, size: int, what: str) -> list[tuple[bytes, bytes]]:
        where = f"{what} at offset {offset}"
        if offset + size + _BLOCK_TRAILER_SIZE > self.size - _FOOTER_SIZE:
            raise _corrupt(self.path, f"{where}: its {size} bytes run past the end of the table")
        self.f.seek(offset)
        raw = self.f.read(size + _BLOCK_TRAILER_SIZE)
        if len(raw) != size + _BLOCK_TRAILER_SIZE:
            raise _corrupt(self.path, f"{where}: truncated")
        ctype = raw[size]
        if self.verify and crc32c(raw[: size + 1]) != _unmask_crc(_U32.unpack_from(raw, size + 1)[0]):
            raise _corrupt(self.path, f"{where} fails its checksum")
        if ctype == 0:
            block = raw[:size]
        elif ctype == 1:
            try:
                block = _snappy()(raw[:size])
            except Exception as e:  # the decoders' own error types
                raise _corrupt(self.path, f"{where}: corrupt snappy-compressed block ({e})") from None
        else:
            name = _COMPRESSION_NAMES.get(ctype, "unknown")
            raise _corrupt(
                self.path,
                f"{where} uses compression type {ctype} ({name}); only uncompressed and snappy blocks are "
                f"supported (rewrite the database with snappy compression, or convert it to LMDB)",
            )
        try:
            return _block_entries(block, where)
        except _Corrupt as e:
            raise _corrupt(self.path, str(e)) from None

    def entries(self) -> Iterator[_Entry]:
        """Every internal entry, in order, one data block in memory at a time."""
        prev: tuple[bytes, int] | None = None
        try:
            for _, handle in self.index:
                try:
                    offset, size, _ = _decode_handle(handle, 0, len(handle), "block handle in the index block")
                except _Corrupt as e:
                    raise _corrupt(self.path, str(e)) from None
                where = f"data block at offset {offset}"
                for ikey, value in self._entries(offset, size, "data block"):
                    try:
                        ukey, negtag = _split_internal_key(ikey, where)
                    except _Corrupt as e:
                        raise _corrupt(self.path, str(e)) from None
                    if prev is not None and (ukey, negtag) <= prev:
                        raise _corrupt(self.path, f"keys out of order in {where}")
                    prev = (ukey, negtag)
                    yield ukey, negtag, value
        finally:
            self.f.close()


# -- The database -----------------------------------------------------------------------------


def is_leveldb(path: str) -> bool:
    """Whether the directory ``path`` looks like a LevelDB (it holds a ``CURRENT`` file)."""
    return os.path.isfile(os.path.join(path, "CURRENT"))


class _FileMeta:
    __slots__ = ("number", "size", "smallest")

    def __init__(self, number: int, size: int, smallest: tuple[bytes, int]):
        self.number, self.size, self.smallest = number, size, smallest


class LevelDBReader:
    """Read-only access to a LevelDB of (key, value) byte records, in key order.

    The interface of :class:`~caffe_compat.data.lmdb_db.LMDBReader`: ``first()`` returns the
    first record; ``cycle(skip)`` yields records forever, wrapping at the end, starting after
    ``skip`` records; iterating the reader yields every record once. The MANIFEST is read when
    the reader is built (the set of live files is fixed then, as a LevelDB snapshot) and so are
    the write-ahead logs, whose entries are kept sorted in memory (LevelDB keeps them in its
    memtable: at most ``write_buffer_size`` bytes, 256 MiB with Caffe's options). Tables are
    read lazily, one block at a time per level, so memory stays bounded for any database size.
    Each iteration opens its own files: cycles may run in other threads. Nothing is written,
    and the ``LOCK`` file is neither needed nor taken: do not read a database that a LevelDB
    process is writing at the same time.

    ``verify_checksums`` also checks every table block's CRC32C (LevelDB's
    ``ReadOptions::verify_checksums``; off by default there and in Caffe).
    """

    def __init__(self, path: str, *, what: str = "data_param.source", verify_checksums: bool = False):
        self.path = path
        self.verify_checksums = verify_checksums
        if not os.path.isdir(path):
            hint = " (an LMDB file or a single file?)" if os.path.exists(path) else ""
            raise DataError(
                f"{what} {path!r} is not a LevelDB directory{hint} (relative paths are read from {os.getcwd()!r})"
            )
        if not is_leveldb(path):
            if os.path.isfile(os.path.join(path, "data.mdb")):
                hint = "it holds data.mdb: it is an LMDB, read it with the LMDB backend"
            else:
                hint = "a LevelDB directory holds CURRENT, MANIFEST-*, *.ldb or *.sst and *.log files"
            raise DataError(f"{what} {path!r} has no CURRENT file: not a LevelDB ({hint})")
        self._levels = self._read_manifest()
        self._log_entries = self._read_logs()
        self._count: int | None = None
        records = iter(self)
        first = next(records, None)
        records.close()
        if first is None:
            raise DataError(f"{what} {path!r} is an empty LevelDB (no records)")
        self._first = first

    def _read_manifest(self) -> list[list[_FileMeta]]:
        current = os.path.join(self.path, "CURRENT")
        try:
            with open(current, "rb") as f:
                text = f.read()
        except OSError as e:
            raise DataError(f"LevelDB file {current!r} could not be read: {e}") from e
        name = text[:-1].decode("ascii", "replace")
        if not text.endswith(b"\n") or not re.fullmatch(r"MANIFEST-[0-9]+", name):
            raise _corrupt(current, f"holds {text[:60]!r}, not the name of a MANIFEST file and a newline")
        manifest = os.path.join(self.path, name)
        if not os.path.isfile(manifest):
            raise _corrupt(current, f"names {name}, which does not exist")
        files: list[dict[int, _FileMeta]] = [{} for _ in range(_NUM_LEVELS)]
        self.log_number = self.prev_log_number = 0
        self.manifest = manifest
        for record in _log_records(manifest):
            try:
                self._apply_edit(record, files)
            except _Corrupt as e:
                raise _corrupt(manifest, f"version edit: {e}") from None
        levels = [list(level.values()) for level in files]
        for level in levels[1:]:
            level.sort(key=lambda m: m.smallest)
        return levels

    def _apply_edit(self, edit: bytes, files: list[dict[int, _FileMeta]]) -> None:
        pos, n = 0, len(edit)
        deleted: list[tuple[int, int]] = []
        added: list[tuple[int, _FileMeta]] = []

        def level_at(p: int) -> tuple[int, int]:
            level, p = _varint(edit, p, n, "level")
            if level >= _NUM_LEVELS:
                raise _Corrupt(f"level {level} is out of range")
            return level, p

        while pos < n:
            tag, pos = _varint(edit, pos, n, "tag")
            if tag == _TAG_COMPARATOR:
                name, pos = _slice(edit, pos, n, "comparator name")
                if name.decode("utf-8", "replace") != BYTEWISE_COMPARATOR:
                    raise DataError(
                        f"LevelDB {self.path!r} was written with the comparator {name.decode('utf-8', 'replace')!r}; "
                        f"only {BYTEWISE_COMPARATOR!r} (LevelDB's default, the one Caffe uses) is supported"
                    )
            elif tag == _TAG_LOG_NUMBER:
                self.log_number, pos = _varint(edit, pos, n, "log number")
            elif tag == _TAG_PREV_LOG_NUMBER:
                self.prev_log_number, pos = _varint(edit, pos, n, "previous log number")
            elif tag in (_TAG_NEXT_FILE, _TAG_LAST_SEQUENCE):
                _, pos = _varint(edit, pos, n, "number")
            elif tag == _TAG_COMPACT_POINTER:
                _, pos = level_at(pos)
                _, pos = _slice(edit, pos, n, "compact pointer")
            elif tag == _TAG_DELETED_FILE:
                level, pos = level_at(pos)
                number, pos = _varint(edit, pos, n, "deleted file number")
                deleted.append((level, number))
            elif tag == _TAG_NEW_FILE:
                level, pos = level_at(pos)
                number, pos = _varint(edit, pos, n, "new file number")
                size, pos = _varint(edit, pos, n, "new file size")
                smallest, pos = _slice(edit, pos, n, "new file smallest key")
                _, pos = _slice(edit, pos, n, "new file largest key")
                added.append((level, _FileMeta(number, size, _split_internal_key(smallest, "new file entry"))))
            else:
                raise _Corrupt(f"unknown tag {tag}")
        for level, number in deleted:
            files[level].pop(number, None)
        for level, meta in added:
            files[level][meta.number] = meta

    def _table_path(self, number: int) -> str:
        path = os.path.join(self.path, f"{number:06d}.ldb")
        if not os.path.exists(path):
            legacy = os.path.join(self.path, f"{number:06d}.sst")
            if os.path.exists(legacy):
                return legacy
        return path

    def _read_logs(self) -> list[_Entry]:
        numbers = []
        for name in os.listdir(self.path):
            m = re.fullmatch(r"([0-9]+)\.log", name)
            if m and (int(m.group(1)) >= self.log_number or int(m.group(1)) == self.prev_log_number):
                numbers.append(int(m.group(1)))
        entries: list[_Entry] = []
        for number in sorted(numbers):
            path = os.path.join(self.path, f"{number:06d}.log")
            for record in _log_records(path):
                entries.extend(_write_batch_entries(record, path))
        entries.sort()
        return entries

    def _level_entries(self, metas: list[_FileMeta]) -> Iterator[_Entry]:
        for meta in metas:
            yield from _TableFile(self._table_path(meta.number), meta.size, self.verify_checksums).entries()

    def _sources(self) -> list[Iterable[_Entry]]:
        sources: list[Iterable[_Entry]] = [self._log_entries]
        sources += [self._level_entries([meta]) for meta in self._levels[0]]
        sources += [self._level_entries(level) for level in self._levels[1:] if level]
        return sources

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        """Every live record once, in key order: for each key its newest entry, unless a deletion."""
        prev: bytes | None = None
        for ukey, negtag, value in heapq.merge(*self._sources()):
            if ukey == prev:
                continue
            if prev is not None and ukey < prev:
                raise _corrupt(self.path, "tables of one level overlap or are out of order")
            prev = ukey
            if (-negtag) & 0xFF == _TYPE_VALUE:
                yield ukey, value

    @property
    def count(self) -> int:
        """The number of records (a full pass over the database the first time it is asked)."""
        if self._count is None:
            self._count = sum(1 for _ in self)
        return self._count

    def first(self) -> tuple[bytes, bytes]:
        """The first record (read when the reader was built)."""
        return self._first

    def cycle(self, skip: int = 0) -> Iterator[tuple[bytes, bytes]]:
        """Records forever in key order, wrapping at the end, starting after ``skip`` records."""
        if skip and self._count is not None:
            skip %= self._count
        while True:
            n = 0
            for record in self:
                n += 1
                if skip:
                    skip -= 1
                    continue
                yield record
            if n == 0:
                raise DataError(f"LevelDB {self.path!r} has no records any more (was it changed while read?)")
            self._count = n
            skip %= n

    def close(self) -> None:
        """Drop the cached log entries (files are open only while an iteration runs)."""
        self._log_entries = []
        self._levels = [[] for _ in range(_NUM_LEVELS)]
