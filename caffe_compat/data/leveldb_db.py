"""LevelDB databases, read as Caffe's ``db::LevelDB`` reads them, through LevelDB itself (plyvel).

``pip install 'caffe-compat[leveldb]'`` installs plyvel, whose manylinux wheels carry the
LevelDB library. :class:`LevelDBReader` yields the records in key order (LevelDB's default
bytewise comparator, the only one Caffe uses) from a snapshot taken when each pass starts.

As in Caffe, the database is opened with LevelDB's own ``Open``: it takes the directory's
``LOCK`` (one process at a time; a second process gets an error naming the lock) and may move
its write-ahead log into a table. Within one process, readers of the same directory (a train and
a test net, a prefetch thread) share one open database.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator

from caffe_compat.errors import DataError

__all__ = ["BYTEWISE_COMPARATOR", "LevelDBReader", "is_leveldb"]

log = logging.getLogger(__name__)

#: LevelDB's default comparator, the only one Caffe uses
BYTEWISE_COMPARATOR = "leveldb.BytewiseComparator"

_OPEN: dict[str, list] = {}  # realpath -> [plyvel.DB, readers using it]
_OPEN_LOCK = threading.Lock()


def is_leveldb(path: str) -> bool:
    """Whether the directory ``path`` looks like a LevelDB (it holds a ``CURRENT`` file)."""
    return os.path.isfile(os.path.join(path, "CURRENT"))


def _damaged(path: str, msg: str) -> DataError:
    return DataError(
        f"LevelDB {path!r}: {msg} (the database is damaged or was copied incompletely: copy it again, or re-create it)"
    )


def _status(e: Exception) -> str:
    """LevelDB's status text (plyvel passes it as bytes), on one line."""
    text = e.args[0] if e.args else str(e)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return " ".join(str(text).split())


def _opening_error(path: str, e: Exception) -> DataError:
    """LevelDB's status as one of the reader's messages."""
    import plyvel

    msg = _status(e)
    m = re.search(r"(\S+) does not match existing comparator", msg)  # LevelDB: "<the database's> does not ..."
    if m:
        theirs = m.group(1)
        return DataError(
            f"LevelDB {path!r} was written with the comparator {theirs!r}; "
            f"only {BYTEWISE_COMPARATOR!r} (LevelDB's default, the one Caffe uses) is supported"
        )
    if isinstance(e, plyvel.CorruptionError):
        return _damaged(path, msg)
    if isinstance(e, plyvel.IOError) and "lock" in msg.lower():
        return DataError(
            f"LevelDB {path!r} could not be opened: {msg} (another process has it open: LevelDB, as in Caffe, "
            "lets one process at a time read a database; copy it, or convert it to LMDB)"
        )
    return DataError(f"LevelDB {path!r} could not be opened: {msg}")


def _acquire(path: str):
    from caffe_compat.extras import require

    plyvel = require("plyvel", "reading a LevelDB")
    key = os.path.realpath(path)
    with _OPEN_LOCK:
        entry = _OPEN.get(key)
        if entry is None:
            try:
                db = plyvel.DB(path, create_if_missing=False, comparator=None)
            except (plyvel.Error, OSError) as e:
                raise _opening_error(path, e) from None
            entry = _OPEN[key] = [db, 0]
        entry[1] += 1
        return entry[0]


def _release(path: str) -> None:
    key = os.path.realpath(path)
    with _OPEN_LOCK:
        entry = _OPEN.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].close()
            del _OPEN[key]


class LevelDBReader:
    """Read-only access to a LevelDB of (key, value) byte records, in key order.

    The interface of :class:`~caffe_compat.data.lmdb_db.LMDBReader`: ``first()`` returns the
    first record; ``cycle(skip)`` yields records forever, wrapping at the end, starting after
    ``skip`` records; iterating the reader yields every record once; ``close()`` lets go of the
    database. ``verify_checksums`` checks every block read (LevelDB's
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
        self._db = _acquire(path)
        self._count: int | None = None
        records = iter(self)
        first = next(records, None)
        records.close()
        if first is None:
            self.close()
            raise DataError(f"{what} {path!r} is an empty LevelDB (no records)")
        self._first = first

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        """Every record once, in key order, from a snapshot of the database taken now."""
        import plyvel

        if self._db is None:
            raise DataError(f"LevelDB {self.path!r}: the reader was closed")
        it = self._db.iterator(verify_checksums=self.verify_checksums, fill_cache=False)
        try:
            yield from it
        except plyvel.Error as e:  # a table went missing, is truncated or fails its checksum
            raise _damaged(self.path, _status(e)) from None
        finally:
            it.close()

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
        """Let go of the database (it closes when its last reader in this process lets go)."""
        if getattr(self, "_db", None) is not None:
            self._db = None
            _release(self.path)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
