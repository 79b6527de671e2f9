"""LMDB databases as Caffe's ``db::LMDB`` reads and writes them.

An LMDB is a directory holding ``data.mdb`` (and ``lock.mdb``). Records are read in key order;
the Data layer's cursor wraps to the first record at the end ("Restarting data prefetching from
start"). Writers commit every 1000 puts as Caffe's tools do, growing the map when it fills.

LevelDB, Caffe's other backend (and ``DataParameter.backend``'s default), is read by
:class:`~caffe_compat.data.leveldb_db.LevelDBReader`; :func:`open_reader` picks the reader for a
``DataParameter.backend`` as Caffe's ``db::GetDB``. Writing LevelDB is not supported.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator

from caffe_compat.data.leveldb_db import LevelDBReader, is_leveldb
from caffe_compat.errors import DataError


def _lmdb():
    """The ``lmdb`` module, imported on first use so the package imports without it."""
    try:
        import lmdb
    except ImportError:
        raise DataError("LMDB support needs the 'lmdb' package: pip install lmdb") from None
    return lmdb


__all__ = ["LMDBReader", "LMDBWriter", "check_backend", "open_reader", "LEVELDB_HELP"]

# What the writing tools say to `--backend leveldb`.
LEVELDB_HELP = (
    "writing LevelDB is not supported (existing LevelDBs can be read: the Data layer with `backend: LEVELDB`, "
    "compute_image_mean --backend leveldb); write an LMDB instead (--backend lmdb) and set `backend: LMDB` "
    "in data_param"
)


# LMDB allows one Environment per database per process: readers of one path share it.
_ENVS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_ENVS_LOCK = threading.Lock()


def _open_readonly(path: str):
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        env = _ENVS.get(key)
        if env is None:
            env = _lmdb().open(path, readonly=True, lock=False, readahead=False, max_readers=126)
            _ENVS[key] = env
        return env


def check_backend(backend: int, source: str, *, what: str = "data_param") -> None:
    """Refuse a ``backend`` (a ``DataParameter.DB`` value) that does not match what the directory
    ``source`` holds (an LMDB's ``data.mdb`` or a LevelDB's ``CURRENT``), saying what to set."""
    from caffe_compat.proto import caffe_pb2

    if backend not in (caffe_pb2.DataParameter.LEVELDB, caffe_pb2.DataParameter.LMDB):
        raise DataError(f"{what}.backend {backend} is unknown: use LMDB or LEVELDB")
    is_lmdb = os.path.isfile(os.path.join(source, "data.mdb"))
    if backend == caffe_pb2.DataParameter.LEVELDB and is_lmdb and not is_leveldb(source):
        raise DataError(
            f"{what}.source {source!r} is an LMDB (it holds data.mdb) but {what}.backend is LEVELDB "
            f"(the default when unset): add `backend: LMDB` to {what}"
        )
    if backend == caffe_pb2.DataParameter.LMDB and is_leveldb(source) and not is_lmdb:
        raise DataError(
            f"{what}.source {source!r} is a LevelDB (it holds CURRENT) but {what}.backend is LMDB: "
            f"set `backend: LEVELDB` in {what} (or remove `backend`: LEVELDB is the default)"
        )


def open_reader(backend: int, source: str, *, what: str = "data_param") -> LMDBReader | LevelDBReader:
    """The reader of ``source`` for ``backend`` (a ``DataParameter.DB`` value): an
    :class:`LMDBReader` or a :class:`~caffe_compat.data.leveldb_db.LevelDBReader` (Caffe's
    ``db::GetDB``), after :func:`check_backend`."""
    from caffe_compat.proto import caffe_pb2

    check_backend(backend, source, what=what)
    if backend == caffe_pb2.DataParameter.LEVELDB:
        return LevelDBReader(source, what=f"{what}.source")
    return LMDBReader(source, what=f"{what}.source")


class LMDBReader:
    """Read-only access to an LMDB of (key, value) byte records, in key order.

    ``first()`` returns the first record; ``cycle(skip)`` yields records forever, wrapping at the
    end, starting after ``skip`` records. Each ``cycle`` opens its own read transaction in the
    thread that iterates it (LMDB transactions belong to one thread). Readers of one database
    share one read-only environment (LMDB allows one per database per process).
    """

    def __init__(self, path: str, *, what: str = "data_param.source"):
        self.path = path
        if not os.path.isdir(path):
            hint = " (a single file?)" if os.path.exists(path) else ""
            raise DataError(
                f"{what} {path!r} is not an LMDB directory{hint} (relative paths are read from {os.getcwd()!r})"
            )
        if not os.path.isfile(os.path.join(path, "data.mdb")):
            if os.path.isfile(os.path.join(path, "CURRENT")):
                hint = "it holds CURRENT: it is a LevelDB, read it with the LevelDB backend"
            else:
                hint = "an LMDB directory holds data.mdb"
            raise DataError(f"{what} {path!r} has no data.mdb: not an LMDB ({hint})")
        try:
            self.env = _open_readonly(path)
        except _lmdb().Error as e:
            raise DataError(f"{what} {path!r} could not be opened as an LMDB: {e}") from e
        self.count = int(self.env.stat()["entries"])
        if self.count == 0:
            raise DataError(f"{what} {path!r} is an empty LMDB (no records)")

    def first(self) -> tuple[bytes, bytes]:
        with self.env.begin(buffers=False) as txn:
            cur = txn.cursor()
            cur.first()
            return bytes(cur.key()), bytes(cur.value())

    def cycle(self, skip: int = 0) -> Iterator[tuple[bytes, bytes]]:
        with self.env.begin(buffers=False) as txn:
            cur = txn.cursor()
            cur.first()
            for _ in range(skip % self.count):
                if not cur.next():
                    cur.first()
            while True:
                yield bytes(cur.key()), bytes(cur.value())
                if not cur.next():
                    cur.first()

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        """Every record once, in key order."""
        with self.env.begin(buffers=False) as txn:
            for k, v in txn.cursor():
                yield bytes(k), bytes(v)

    def close(self) -> None:
        """Drop this reader's handle (the environment closes when its last reader is gone)."""
        self.env = None


class LMDBWriter:
    """Create a new LMDB directory (refusing an existing one, as Caffe's ``mkdir`` does) and put
    records into it, committing every ``commit_every`` puts. Use as a context manager."""

    def __init__(self, path: str, commit_every: int = 1000, map_size: int = 1 << 28):
        if os.path.exists(path):
            raise DataError(f"database {path!r} already exists; remove it or choose another DB_NAME")
        try:
            os.makedirs(path)
            self.env = _lmdb().open(path, map_size=map_size, subdir=True)
        except (OSError, _lmdb().Error) as e:
            raise DataError(f"could not create LMDB {path!r}: {e}") from e
        self.path = path
        self.commit_every = commit_every
        self._pending: list[tuple[bytes, bytes]] = []
        self.count = 0

    def put(self, key: bytes, value: bytes) -> None:
        self._pending.append((key, value))
        self.count += 1
        if len(self._pending) >= self.commit_every:
            self.commit()

    def commit(self) -> None:
        if not self._pending:
            return
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for k, v in self._pending:
                        txn.put(k, v)
                break
            except _lmdb().MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
        self._pending.clear()

    def close(self) -> None:
        self.commit()
        self.env.close()

    def __enter__(self) -> LMDBWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
