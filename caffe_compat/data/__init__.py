"""Readers and the data transformer behind Caffe's data layers.

- :mod:`~caffe_compat.data.transformer`: ``DataTransformer`` (scale, mirror, crop, mean) and
  Datum decoding.
- :mod:`~caffe_compat.data.image_list`: ``path label`` list files and image reading (OpenCV, BGR).
- :mod:`~caffe_compat.data.hdf5`: HDF5 source lists, file loading and appending writes.
- :mod:`~caffe_compat.data.lmdb_db`: LMDB reading (cycling cursor) and writing; ``open_reader``
  picks the reader of a ``DataParameter.backend``.
- :mod:`~caffe_compat.data.leveldb_db`: LevelDB reading in pure Python (read-only).
- :mod:`~caffe_compat.data.prefetch`: a background thread preparing batches ahead, in order.
- :mod:`~caffe_compat.data.workers`: threads decoding and transforming the images of a batch.

The layers themselves live in :mod:`caffe_compat.layers.data`.
"""

from caffe_compat.data.hdf5 import append_hdf5, load_hdf5_file, read_hdf5_source
from caffe_compat.data.image_list import read_image, read_image_list
from caffe_compat.data.leveldb_db import LevelDBReader
from caffe_compat.data.lmdb_db import LMDBReader, LMDBWriter, check_backend, open_reader
from caffe_compat.data.prefetch import Prefetcher
from caffe_compat.data.transformer import DataTransformer, datum_to_array, decode_image, image_to_chw

__all__ = [
    "DataTransformer",
    "LevelDBReader",
    "LMDBReader",
    "LMDBWriter",
    "Prefetcher",
    "append_hdf5",
    "check_backend",
    "datum_to_array",
    "decode_image",
    "image_to_chw",
    "load_hdf5_file",
    "open_reader",
    "read_hdf5_source",
    "read_image",
    "read_image_list",
]
