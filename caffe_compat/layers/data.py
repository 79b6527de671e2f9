"""Caffe's data layers: Data (LMDB or LevelDB), ImageData, HDF5Data, MemoryData and HDF5Output.

Data layers have no bottoms; ``forward()`` returns the next batch as float32 tensors and the net
calls it once per net forward. They override ``top_shapes`` (the shapes Caffe gives the tops at
setup, from the first record) so that shape inference reads nothing. Paths in the prototxt are
relative to the working directory, as in Caffe.

Randomness (shuffling, ``rand_skip``, the transformer's mirror and crop offsets) comes from one
seed drawn at construction from torch's global RNG, so ``caffe_compat.set_random_seed`` (or
``torch.manual_seed``) before building the net reproduces every batch. Caffe seeds its per-layer
RNGs from its global RNG the same way; the bits differ (boost mt19937), the distributions are
Caffe's. The streams are counter-based (``caffe_compat.data.streams``): record *k*'s crop and
mirror are drawn from (seed, k), the shuffle of pass *e* from (seed, e), so a position in the
stream is reached without replaying the draws before it.

Data and ImageData prepare batches in a background thread, ``data_param.prefetch`` (default 4)
batches ahead, as Caffe's BasePrefetchingDataLayer; batch k is the same with or without
prefetching (``prefetch: 0`` makes them synchronous). Within a batch the images are decoded and
transformed on several threads (``caffe_compat.data.workers``, ``CAFFE_COMPAT_DATA_THREADS``),
with the random draws made in record order: the same bits as one image at a time.

Sharding for multi-process training (``set_shard(rank, world_size)``, called by the solver on
its train net's data layers): process ``rank`` of ``world_size`` keeps batches ``rank``,
``rank + world_size``, ``rank + 2 world_size``... of the stream the layer would produce alone, so
every example is read once per epoch across processes and N processes × ``batch_size`` see what
one process with ``iter_size: N`` sees. Skipped batches are not assembled: rows/records are
stepped over, and since every record's draws depend on its position alone, the kept batches are
bit-identical to the single-process ones. ``skip_batches(n)``
(used when resuming) skips ``n`` of the layer's own (sharded) batches, in O(1) of ``n``: HDF5Data
and MemoryData by index arithmetic (HDF5Data reads the files' row counts from their metadata),
ImageData by list index, Data by moving the cursor without parsing a record (at most one pass
over the keys), WindowData by its item counter; nothing is decoded and no draw is replayed.
Deliberate difference: Caffe 1.0 interleaves *records* between solvers (record i goes to
solver i mod N); we interleave *batches*, which makes N processes equal ``iter_size: N``.
"""

from __future__ import annotations

import os
import weakref

import numpy as np
import torch

from caffe_compat.data.hdf5 import append_hdf5, count_hdf5_rows, create_hdf5, load_hdf5_file, read_hdf5_source
from caffe_compat.data.image_list import read_image, read_image_list
from caffe_compat.data.leveldb_db import LevelDBReader
from caffe_compat.data.lmdb_db import LMDBReader, open_reader
from caffe_compat.data.prefetch import Prefetcher
from caffe_compat.data.streams import RecordDraws, permutation
from caffe_compat.data.transformer import DataTransformer
from caffe_compat.data.workers import Failed, map_in_order
from caffe_compat.errors import DataError
from caffe_compat.layers.base import Layer, register_layer

__all__ = [
    "DataLayer",
    "HDF5DataLayer",
    "HDF5OutputLayer",
    "ImageDataLayer",
    "MemoryDataLayer",
]

_LEGACY_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


class _Shard:
    """Which batches of a stream one process keeps: ``rank``, ``rank + size``, ...

    ``pending`` counts the stream's batches to step over before the next kept one.
    """

    def __init__(self):
        self.rank, self.size, self.pending, self.started = 0, 1, 0, False

    def set(self, rank: int, size: int) -> None:
        self.rank, self.size, self.pending = rank, size, rank

    def take(self) -> int:
        """Before producing a kept batch: how many batches to step over first."""
        n, self.pending, self.started = self.pending, self.size - 1, True
        return n

    def skip(self, n: int) -> None:
        """Step over ``n`` kept batches (``n × size`` of the stream)."""
        self.pending += n * self.size


class _BaseDataLayer(Layer):
    """Common parts of the layers without bottoms: fixed top shapes, seeding, error wrapping,
    sharding (``set_shard``, ``skip_batches``)."""

    exact_num_bottom = 0
    _shapes: list[tuple[int, ...]]

    def _get_shard(self) -> _Shard:
        shard = self.__dict__.get("_shard_state")
        if shard is None:
            shard = _Shard()
            self.__dict__["_shard_state"] = shard
        return shard

    def set_shard(self, rank: int, world_size: int) -> None:
        """Keep only batches ``rank``, ``rank + world_size``, ... of this layer's stream (see the
        module docstring). Call before the first batch is read."""
        rank, world_size = int(rank), int(world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise self.error(f"set_shard: rank {rank} of world_size {world_size}; need 0 <= rank < world_size")
        shard = self._get_shard()
        if shard.started or shard.pending != shard.rank or self._reading():
            raise self.error("set_shard must be called before the layer reads its first batch")
        shard.set(rank, world_size)

    def _reading(self) -> bool:
        return False

    @property
    def shard(self) -> tuple[int, int]:
        """``(rank, world_size)`` of this layer's share of the data (``(0, 1)``: all of it)."""
        shard = self._get_shard()
        return shard.rank, shard.size

    def skip_batches(self, n: int) -> None:
        """Step over the next ``n`` batches this layer would return (resuming a run)."""
        if n > 0:
            self._get_shard().skip(int(n))

    def top_shapes(self, bottom_shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return [tuple(s) for s in self._shapes]

    def _seed(self) -> tuple[int, np.random.Generator]:
        """The seed of this layer's counter-based streams (``caffe_compat.data.streams``: stream 0
        the transformer's per-record draws, 1 the shuffles, 2 HDF5Data's row shuffles), from one
        draw of torch's global RNG, and a Generator for the one-off ``rand_skip`` draw."""
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return seed, np.random.default_rng(np.random.SeedSequence([seed, 3]))

    def _data_error(self, e: DataError) -> DataError:
        return DataError(f"layer {self.name!r} ({self.type}): {e}")

    def _transform_param(self, legacy=None):
        """``transform_param``, with the legacy fields of ``legacy`` (data_param or
        image_data_param: scale, mean_file, crop_size, mirror) moved in as Caffe's upgrade does."""
        from caffe_compat.proto import caffe_pb2

        tp = caffe_pb2.TransformationParameter()
        tp.CopyFrom(self.param.transform_param)
        if legacy is not None:
            for field in _LEGACY_TRANSFORM_FIELDS:
                if legacy.HasField(field):
                    setattr(tp, field, getattr(legacy, field))
        return tp


class _PrefetchingDataLayer(_BaseDataLayer):
    """A data layer whose batches come from a ``Prefetcher`` running ``self._source``."""

    def _start_prefetch(self, source, depth: int) -> None:
        self._source = source
        self._prefetcher = Prefetcher(_ShardedSource(source, self._get_shard()), depth, name=f"prefetch:{self.name}")
        weakref.finalize(self, self._prefetcher.close)

    def _reading(self) -> bool:
        return self._prefetcher.started

    def skip_batches(self, n: int) -> None:
        if n <= 0:
            return
        if self._reading() or self._get_shard().started:
            # the worker thread owns the source now: take the batches and drop them
            for _ in range(int(n)):
                self.forward()
            return
        super().skip_batches(n)

    def forward(self) -> tuple[torch.Tensor, ...]:
        try:
            arrays = self._prefetcher.next()
        except DataError as e:
            raise self._data_error(e) from e
        return tuple(torch.from_numpy(a) for a in arrays)

    def close(self) -> None:
        """Stop the prefetch thread (also done when the layer is garbage-collected)."""
        self._prefetcher.close()


class _ShardedSource:
    """Calls ``source()`` for the kept batches and ``source.skip(k)`` for the others."""

    def __init__(self, source, shard: _Shard):
        self.source, self.shard = source, shard

    def __call__(self):
        n = self.shard.take()
        if n:
            self.source.skip(n)
        return self.source()


def _assemble_batch(items, load, transformer, mismatch, words=None) -> tuple[np.ndarray, np.ndarray]:
    """One batch of ``len(items)`` records (read in order by the caller): ``load(item)`` ->
    ``(C×H×W array, label, where)`` runs on the data threads (``data.workers``); the checks and the
    transformer's random draws happen here in record order, as one image at a time would make
    them; the transforms run on the data threads again. Caffe shapes the batch by its first
    record; ``mismatch(k, where, shape_k, first_shape)`` words the error for another size.
    ``words[k]``: record k's random words (``data.streams``) for the transformer's draws."""
    loaded = map_in_order(load, items)
    bs = len(items)
    data = labels = shape = None
    images, drawn = [], []
    for k, item in enumerate(loaded):
        if isinstance(item, Failed):
            raise item.error
        x, label, where = item
        out_shape = transformer.output_shape(x.shape)
        if k == 0:  # Caffe reshapes the batch to its first record
            shape = out_shape
            data = np.empty((bs, *shape), dtype=np.float32)
            labels = np.empty((bs,), dtype=np.float32)
        elif out_shape != shape:
            raise DataError(mismatch(k, where, out_shape, shape))
        drawn.append(transformer.draw(x.shape, where=where, words=None if words is None else words[k]))
        images.append(x)
        labels[k] = label

    def put(k: int) -> None:
        data[k] = transformer.apply(images[k], drawn[k])

    for result in map_in_order(put, range(bs)):
        if isinstance(result, Failed):
            raise result.error
    return data, labels


# -- ImageData -------------------------------------------------------------------------------


class _ImageListSource:
    """Produces ImageData batches: (data N×C×H×W, labels N), walking the list with wrap-around.

    Record ``k`` of the stream is list position ``p = start + k``: pass ``p // N``, entry
    ``order_pass[p % N]`` (``order_pass``: the identity, or with ``shuffle`` the permutation of
    that pass from ``streams.permutation``); its crop and mirror come from its own words
    (``streams.RecordDraws``). Skipping is arithmetic on ``k``: nothing is read or drawn."""

    def __init__(self, entries, list_file, root, p, transformer, seed, start):
        self.entries, self.list_file, self.root = entries, list_file, root
        self.new_height, self.new_width, self.is_color = int(p.new_height), int(p.new_width), bool(p.is_color)
        self.batch_size = int(p.batch_size)
        self.shuffle = bool(p.shuffle)
        self.transformer, self.seed = transformer, seed
        self.draws = RecordDraws(seed, 0)
        self.start, self.k = start, 0
        self._pass, self._order = -1, None

    def entry(self, k: int):
        """The list entry of record ``k`` of the stream."""
        pass_, i = divmod(self.start + k, len(self.entries))
        if not self.shuffle:
            return self.entries[i]
        if pass_ != self._pass:
            self._pass, self._order = pass_, permutation(self.seed, 1, pass_, len(self.entries))
        return self.entries[self._order[i]]

    def read_entry(self, entry) -> tuple[np.ndarray, int, str]:
        path, label, lineno = entry
        where = f"{self.list_file}:{lineno}"
        full = self.root + path
        try:
            img = read_image(full, self.new_height, self.new_width, self.is_color, where=where)
        except DataError as e:
            if self.root and not self.root.endswith(("/", os.sep)) and not os.path.exists(full):
                raise DataError(f"{e} (root_folder {self.root!r} is prepended as is: end it with '/')") from None
            raise
        return img, label, where

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        entries = [self.entry(self.k + i) for i in range(self.batch_size)]
        words = self.draws.block(self.k, self.batch_size) if self.transformer.random else None
        self.k += self.batch_size

        def mismatch(k, where, out_shape, shape):
            return (
                f"{where}: image {self.root + entries[k][0]!r} gives {'×'.join(map(str, out_shape))} but this "
                f"batch's first image gives {'×'.join(map(str, shape))}; set new_height/new_width or crop_size, "
                "or batch_size 1"
            )

        return _assemble_batch(entries, self.read_entry, self.transformer, mismatch, words)

    def skip(self, n_batches: int) -> None:
        """Step over ``n_batches`` batches: O(1), no image is read, no random draw is made."""
        self.k += n_batches * self.batch_size


@register_layer("ImageData")
class ImageDataLayer(_PrefetchingDataLayer):
    """Caffe's ImageDataLayer: images listed in a text file, with their integer labels.

    ``image_data_param``: ``source`` (lines ``path label``; path relative to ``root_folder``, which
    is prepended as a plain string, default ""), ``batch_size`` 1, ``shuffle`` false (shuffle at
    setup and at every wrap-around), ``rand_skip`` 0 (start at a random entry in [0, rand_skip)),
    ``new_height``/``new_width`` 0 (resize with OpenCV bilinear when both are set), ``is_color``
    true (3-channel BGR; false: 1 channel). ``transform_param`` as :class:`DataTransformer`.
    ``data_param.prefetch`` (4) batches are prepared ahead in a thread.

    Tops: data (batch_size, C, H, W) float32 — shaped by the first image of each batch, so with
    ``batch_size: 1`` images of varying size pass through; label (batch_size,) float32.

    Differences from Caffe: list lines without an integer label are refused (Caffe reads 0); an
    image of another size inside a batch raises a DataError (Caffe aborts on a CHECK).
    """

    exact_num_top = 2

    def setup(self, bottom_shapes):
        p = self.param.image_data_param
        if p.batch_size <= 0:
            raise self.error("image_data_param.batch_size must be positive")
        if (p.new_height > 0) != (p.new_width > 0):
            raise self.error("image_data_param.new_height and new_width must be set together (or neither)")
        if not p.HasField("source"):
            raise self.error("image_data_param.source (the 'path label' list file) is required")
        seed, skip_rng = self._seed()
        try:
            entries = read_image_list(p.source, what="image_data_param.source")
            if not entries:
                raise DataError(f"image_data_param.source {p.source!r} lists no image")
            transformer = DataTransformer(self._transform_param(p), self.phase, None, where=p.source)
            start = 0
            if p.rand_skip:
                start = int(skip_rng.integers(p.rand_skip))
                if start >= len(entries):
                    raise DataError(f"rand_skip drew {start} but {p.source!r} lists only {len(entries)} images")
            src = _ImageListSource(entries, p.source, p.root_folder, p, transformer, seed, start)
            first, _, _ = src.read_entry(src.entry(0))
            shape = transformer.output_shape(first.shape)
        except DataError as e:
            raise self._data_error(e) from e
        self._shapes = [(int(p.batch_size), *shape), (int(p.batch_size),)]
        self._start_prefetch(src, self.param.data_param.prefetch)


# -- Data (LMDB, LevelDB) --------------------------------------------------------------------


class _DatumSource:
    """Produces Data-layer batches from an LMDB or a LevelDB of Datum records, cycling through the keys.

    ``pos`` counts the records read from the first key (``rand_skip`` included), ``k`` the
    records of the stream (their random words: ``streams.RecordDraws``). Skipping moves the
    cursor without parsing a record: a few records by stepping the open cursor, more by opening
    a new one at ``pos`` (at most one pass over the keys, never one per skipped batch)."""

    #: Skips up to this many records step the open cursor; longer ones reopen it at ``pos``.
    STEP_LIMIT = 1 << 16

    def __init__(
        self, reader: LMDBReader | LevelDBReader, skip: int, batch_size: int, transformer, output_labels: bool, seed
    ):
        self.reader, self.pos, self.batch_size = reader, skip, batch_size
        self.transformer, self.output_labels = transformer, output_labels
        self.draws = RecordDraws(seed, 0)
        self.k = 0
        self._records = None

    def decode(self, key: bytes, value: bytes) -> tuple[np.ndarray, int, str]:
        from caffe_compat.proto import caffe_pb2

        where = f"{self.reader.path} key {key.decode('utf-8', 'replace')!r}"
        datum = caffe_pb2.Datum()
        try:
            datum.ParseFromString(value)
        except Exception as e:  # protobuf's DecodeError
            raise DataError(f"{where}: record is not a Datum ({e})") from None
        return self.transformer.decode(datum, where=where), datum.label, where

    def skip(self, n_batches: int) -> None:
        """Step over ``n_batches`` batches of records without parsing them."""
        n = n_batches * self.batch_size
        self.k += n
        self.pos += n
        if self._records is not None and n <= self.STEP_LIMIT:
            for _ in range(n):
                next(self._records)
        else:
            self._records = None  # reopened at pos (modulo the number of records) when next read

    def __call__(self) -> tuple[np.ndarray, ...]:
        if self._records is None:  # opened in the thread that iterates it
            self._records = self.reader.cycle(self.pos)
        records = [next(self._records) for _ in range(self.batch_size)]  # the cursor, in order
        words = self.draws.block(self.k, self.batch_size) if self.transformer.random else None
        self.pos += self.batch_size
        self.k += self.batch_size

        def mismatch(k, where, out_shape, shape):
            return (
                f"{where}: datum gives {'×'.join(map(str, out_shape))} but this batch's first gives "
                f"{'×'.join(map(str, shape))}; records of one batch must have one size"
            )

        data, labels = _assemble_batch(records, lambda kv: self.decode(*kv), self.transformer, mismatch, words)
        return (data, labels) if self.output_labels else (data,)


@register_layer("Data")
class DataLayer(_PrefetchingDataLayer):
    """Caffe's DataLayer reading Datum records from an LMDB or a LevelDB.

    ``data_param``: ``source`` (the database directory), ``backend`` (LEVELDB, the proto default,
    read by :class:`~caffe_compat.data.leveldb_db.LevelDBReader`, or LMDB; a source holding the
    other kind of database is refused, naming the backend to set), ``batch_size`` (required),
    ``rand_skip`` 0 (skip a random number in [0, rand_skip) of records at the start), ``prefetch`` 4.
    Records: raw (uint8 ``data`` or ``float_data``, C×H×W) or ``encoded`` (decoded with OpenCV,
    BGR, natively or forced by ``transform_param.force_color``/``force_gray``). Keys are read in
    order and wrap around at the end. ``transform_param`` as :class:`DataTransformer`.

    Tops: data (batch_size, C, H, W) float32, shaped by the first record of each batch;
    optional label (batch_size,) float32 (``Datum.label``).

    Differences from Caffe: ``rand_skip`` is honoured as older Caffe did (Caffe 1.0's cursor-based
    DataLayer ignores it).
    """

    min_top = 1
    max_top = 2

    def setup(self, bottom_shapes):
        p = self.param.data_param
        if p.batch_size <= 0:
            raise self.error("data_param.batch_size is required and must be positive")
        if not p.HasField("source"):
            raise self.error("data_param.source (the LMDB or LevelDB directory) is required")
        seed, skip_rng = self._seed()
        try:
            reader = open_reader(p.backend, p.source)
            tp = self._transform_param(p)
            if p.force_encoded_color:
                tp.force_color = True
            transformer = DataTransformer(tp, self.phase, None, where=p.source)
            skip = int(skip_rng.integers(p.rand_skip)) if p.rand_skip else 0
            src = _DatumSource(reader, skip, int(p.batch_size), transformer, len(self.param.top) > 1, seed)
            x, _, _ = src.decode(*reader.first())
            shape = transformer.output_shape(x.shape)
        except DataError as e:
            raise self._data_error(e) from e
        self._shapes = [(int(p.batch_size), *shape), (int(p.batch_size),)][: len(self.param.top)]
        self._start_prefetch(src, p.prefetch)


# -- HDF5Data --------------------------------------------------------------------------------


@register_layer("HDF5Data")
class HDF5DataLayer(_BaseDataLayer):
    """Caffe's HDF5DataLayer: rows of the datasets named by the tops, from a list of .h5 files.

    ``hdf5_data_param``: ``source`` (text file of .h5 paths, opened as given: relative to the
    working directory), ``batch_size`` (required), ``shuffle`` false (permute the file order at
    setup and at every pass, and the rows of each file when it is loaded; with one file, its rows
    at every pass). Rows are taken in order across files and wrap around. Datasets of float or
    integer type are read as float32; all datasets of a file must have the same number of rows,
    and every file the same row shapes. ``transform_param`` is refused, as in Caffe.

    Tops: one per dataset, shaped (batch_size, *dataset.shape[1:]) — a 1-D label dataset gives
    a (batch_size,) top, an N×1 one (batch_size, 1).
    """

    min_top = 1

    def setup(self, bottom_shapes):
        p = self.param.hdf5_data_param
        if self.param.HasField("transform_param"):
            raise self.error(
                "HDF5Data does not transform data: remove transform_param (scale, mean, crop...) "
                "and store preprocessed data in the .h5 files"
            )
        if p.batch_size <= 0:
            raise self.error("hdf5_data_param.batch_size is required and must be positive")
        if not p.HasField("source"):
            raise self.error("hdf5_data_param.source (a text file listing .h5 files) is required")
        self._seed_value, _ = self._seed()
        self._shuffle = bool(p.shuffle)
        self._batch_size = int(p.batch_size)
        self._names = list(self.param.top)
        self._row_shapes: list[tuple[int, ...]] | None = None
        self._file_rows: list[int] | None = None
        self._loaded = -1
        try:
            self._source = p.source
            self._files = read_hdf5_source(p.source)
            self._pass, self._slot = 0, 0
            self._open(0, 0, 0)
        except DataError as e:
            raise self._data_error(e) from e
        self._shapes = [(self._batch_size, *s) for s in self._row_shapes]

    def _file_order(self, pass_: int) -> np.ndarray:
        """The order of the files in pass ``pass_`` (shuffled per pass with ``shuffle``)."""
        if self._shuffle and len(self._files) > 1:
            return permutation(self._seed_value, 1, pass_, len(self._files))
        return np.arange(len(self._files))

    def _open(self, pass_: int, slot: int, row: int) -> None:
        """Position the layer at row ``row`` of the ``slot``-th file of pass ``pass_``: load the
        file (unless it is the one loaded) and draw its row order for this pass and slot."""
        index = int(self._file_order(pass_)[slot])
        if index != self._loaded:
            self._load(index)
        n = self._arrays[0].shape[0]
        if self._shuffle:
            self._row_perm = permutation(self._seed_value, 2, pass_ * len(self._files) + slot, n)
        else:
            self._row_perm = np.arange(n)
        self._pass, self._slot, self._current_row = pass_, slot, row

    def _load(self, index: int) -> None:
        arrays = load_hdf5_file(self._files[index], self._names, source=self._source, index=int(index))
        shapes = [a.shape[1:] for a in arrays]
        if self._row_shapes is None:
            self._row_shapes = shapes
        elif shapes != self._row_shapes:
            bad = next(i for i, (a, b) in enumerate(zip(shapes, self._row_shapes)) if a != b)
            raise DataError(
                f"HDF5 file {self._files[index]!r} (entry {index + 1} of {self._source!r}): dataset "
                f"{self._names[bad]!r} has rows of shape {shapes[bad]}, the first file's have {self._row_shapes[bad]}"
            )
        if self._file_rows is not None and self._file_rows[index] != arrays[0].shape[0]:
            raise DataError(
                f"HDF5 file {self._files[index]!r} (entry {index + 1} of {self._source!r}) now has "
                f"{arrays[0].shape[0]} rows, {self._file_rows[index]} when the layer counted them; was it changed?"
            )
        self._arrays = arrays
        self._loaded = index

    def _end_of_file(self) -> None:
        if self._slot + 1 < len(self._files):
            self._open(self._pass, self._slot + 1, 0)
        else:
            self._open(self._pass + 1, 0, 0)

    def _rows_per_file(self) -> list[int]:
        """Every listed file's number of rows (read from the HDF5 metadata, once)."""
        if self._file_rows is None:
            rows = [count_hdf5_rows(f, self._names[0], source=self._source, index=i) for i, f in enumerate(self._files)]
            self._file_rows = rows
        return self._file_rows

    def _skip_rows(self, n: int) -> None:
        """Step over ``n`` rows by index arithmetic: at most one file is loaded."""
        if self._current_row + n < len(self._row_perm):
            self._current_row += n
            return
        rows = self._rows_per_file()
        order = self._file_order(self._pass)
        offset = sum(rows[int(i)] for i in order[: self._slot]) + self._current_row + n  # within this pass
        pass_, offset = self._pass + offset // sum(rows), offset % sum(rows)
        slot = 0
        for index in self._file_order(pass_):
            if offset < rows[int(index)]:
                break
            offset -= rows[int(index)]
            slot += 1
        self._open(pass_, slot, offset)

    def forward(self) -> tuple[torch.Tensor, ...]:
        bs = self._batch_size
        outs = [np.empty((bs, *s), dtype=np.float32) for s in self._row_shapes]
        filled = 0
        try:
            skip = self._get_shard().take()
            if skip:
                self._skip_rows(skip * bs)
            while filled < bs:
                rows = self._row_perm[self._current_row : self._current_row + bs - filled]
                for out, a in zip(outs, self._arrays):
                    out[filled : filled + len(rows)] = a[rows]
                filled += len(rows)
                self._current_row += len(rows)
                if self._current_row == len(self._row_perm):
                    self._end_of_file()
        except DataError as e:
            raise self._data_error(e) from e
        return tuple(torch.from_numpy(o) for o in outs)


# -- MemoryData ------------------------------------------------------------------------------


@register_layer("MemoryData")
class MemoryDataLayer(_BaseDataLayer):
    """Caffe's MemoryDataLayer: batches from arrays handed over by ``set_input_arrays``.

    ``memory_data_param``: ``batch_size``, ``channels``, ``height``, ``width`` (all required,
    positive). Tops: data (batch_size, channels, height, width), label (batch_size,).

    ``set_input_arrays(data, labels)`` (what pycaffe's ``net.set_input_arrays`` calls; Caffe's
    ``MemoryDataLayer::Reset``): ``data`` N×channels×height×width, ``labels`` N, N×1 or N×1×1×1,
    N a positive multiple of batch_size. Each forward returns the next batch_size rows, wrapping
    to row 0 after the last. Float32 C-contiguous arrays are kept by reference, so later
    in-place changes are seen (as in Caffe); other arrays are converted (copied) to float32.
    ``transform_param`` does not apply to these arrays (Caffe applies it only in AddDatumVector /
    AddMatVector, which are not provided).

    Sharded (``set_shard(rank, N)``), each process must be given the same arrays; process
    ``rank`` then returns batches rank, rank + N, ... of them (restarting at each new array).
    """

    exact_num_top = 2

    def setup(self, bottom_shapes):
        p = self.param.memory_data_param
        dims = (int(p.batch_size), int(p.channels), int(p.height), int(p.width))
        if min(dims) <= 0:
            raise self.error(
                "batch_size, channels, height and width must be specified and positive in "
                f"memory_data_param (got {dims[0]}, {dims[1]}, {dims[2]}, {dims[3]})"
            )
        self._dims = dims
        self._shapes = [dims, (dims[0],)]
        self._data: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._pos = 0

    def set_input_arrays(self, data, labels) -> None:
        """Use ``data`` (N, C, H, W) and ``labels`` (N,) as the source; see the class docstring."""
        bs, c, h, w = self._dims
        data = np.ascontiguousarray(data, dtype=np.float32)
        labels = np.ascontiguousarray(labels, dtype=np.float32)
        if data.ndim != 4 or data.shape[1:] != (c, h, w):
            raise self.error(
                f"set_input_arrays: data must be N×{c}×{h}×{w} (memory_data_param), got shape {data.shape}"
            )
        if labels.ndim not in (1, 2, 4) or labels.shape[1:] != (1,) * (labels.ndim - 1):
            raise self.error(f"set_input_arrays: labels must be N, N×1 or N×1×1×1, got shape {labels.shape}")
        n = data.shape[0]
        if labels.shape[0] != n:
            raise self.error(
                f"set_input_arrays: data and labels must have the same first dimension ({n} vs {labels.shape[0]})"
            )
        if n == 0 or n % bs:
            raise self.error(
                f"set_input_arrays: the number of rows ({n}) must be a positive multiple of batch_size {bs}"
            )
        self._data, self._labels, self._pos = data, labels.reshape(n), 0
        shard = self._get_shard()  # a new stream: this process's share starts over
        shard.pending = shard.rank

    reset = set_input_arrays

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._data is None:
            raise self.error("no input arrays: call net.set_input_arrays(data, labels) before forward")
        bs = self._dims[0]
        skip = self._get_shard().take()
        if skip:
            self._pos = (self._pos + skip * bs) % self._data.shape[0]
        sl = slice(self._pos, self._pos + bs)
        data, labels = torch.tensor(self._data[sl]), torch.tensor(self._labels[sl])
        self._pos = (self._pos + bs) % self._data.shape[0]
        return data, labels


# -- HDF5Output ------------------------------------------------------------------------------


def _legacy_4d(shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """Caffe's num/channels/height/width view of a blob shape (missing axes are 1)."""
    if len(shape) > 4:
        return None
    return tuple(shape) + (1,) * (4 - len(shape))  # type: ignore[return-value]


@register_layer("HDF5Output")
class HDF5OutputLayer(Layer):
    """Caffe's HDF5OutputLayer: writes its two bottoms to ``hdf5_output_param.file_name``.

    Each forward writes bottom 0 to dataset ``data`` and bottom 1 to dataset ``label`` (Caffe's
    names, whatever the bottoms are called), as float32 with Caffe's legacy 4-D shape (N, C, H,
    W; a (N,) label becomes (N, 1, 1, 1)). No tops; no gradient.

    Differences from Caffe: the file is created (truncated) on the layer's first forward, not at
    setup, so building a net to inspect it (``summary``, ``draw_net``) never touches the file;
    setup only checks that its folder exists. Each forward appends its rows to the datasets
    (Caffe's second forward fails because the datasets already exist), so a test run collects
    every batch. With ``writes_files`` false (``Net.disable_output_files``, which ``caffe time``
    uses) forward writes nothing.
    """

    host_side_effect = "writes its bottoms to a file"

    exact_num_bottom = 2
    exact_num_top = 0

    def setup(self, bottom_shapes):
        p = self.param.hdf5_output_param
        if not p.file_name:
            raise self.error("hdf5_output_param.file_name is required")
        self.file_name = p.file_name
        self._created = False
        for i, s in enumerate(bottom_shapes):
            if _legacy_4d(s) is None:
                raise self.error(f"bottom {i} has {len(s)} axes; HDF5Output writes blobs of at most 4 axes")
        if bottom_shapes and bottom_shapes[0][:1] != bottom_shapes[1][:1]:
            raise self.error(
                f"data and label bottoms must have the same batch size ({bottom_shapes[0]} vs {bottom_shapes[1]})"
            )
        folder = os.path.dirname(self.file_name) or "."
        if not os.path.isdir(folder):
            raise self.error(
                f"could not create HDF5 file {self.file_name!r}: folder {folder!r} does not exist "
                f"(hdf5_output_param.file_name; relative paths are read from {os.getcwd()!r})"
            )
        if os.path.isdir(self.file_name):
            raise self.error(f"hdf5_output_param.file_name {self.file_name!r} is a directory; name a file")

    def top_shapes(self, bottom_shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return []

    def forward(self, data: torch.Tensor, label: torch.Tensor) -> tuple[()]:
        shapes = [_legacy_4d(tuple(t.shape)) for t in (data, label)]
        if None in shapes:
            raise self.error("HDF5Output writes blobs of at most 4 axes")
        if shapes[0][0] != shapes[1][0]:
            raise self.error(f"data and label must have the same batch size ({shapes[0][0]} vs {shapes[1][0]})")
        if not self.writes_files:
            return ()
        arrays = {
            name: t.detach().to("cpu", torch.float32).numpy().reshape(s)
            for name, t, s in (("data", data, shapes[0]), ("label", label, shapes[1]))
        }
        try:
            if not self._created:  # Caffe truncates the file at setup; we do it at the first write
                create_hdf5(self.file_name)
                self._created = True
            append_hdf5(self.file_name, arrays)
        except DataError as e:
            raise self.error(str(e)) from e
        return ()
