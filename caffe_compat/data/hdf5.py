"""HDF5 files as Caffe's HDF5Data and HDF5Output layers read and write them.

- The source of HDF5Data is a text file of ``.h5`` paths, read as whitespace-separated tokens
  (Caffe reads it with ``>>``) and opened as given, i.e. relative to the working directory.
- Each top of HDF5Data is a dataset name; its first dimension counts rows. Float and integer
  datasets are read as float32 (Caffe's ``hdf5_load_nd_dataset``), anything else is refused.
- HDF5Output writes 4-D float32 datasets (Caffe's legacy num×channels×height×width shape).
"""

from __future__ import annotations

import os

import h5py
import numpy as np

from caffe_compat.errors import DataError

__all__ = ["append_hdf5", "count_hdf5_rows", "create_hdf5", "load_hdf5_file", "read_hdf5_source"]


def read_hdf5_source(source: str, *, what: str = "hdf5_data_param.source") -> list[str]:
    """The ``.h5`` paths listed in ``source`` (at least one), read as bytes as Caffe reads them:
    a file name that is not UTF-8 (Latin-1) is decoded with ``os.fsdecode``."""
    from caffe_compat.data.image_list import read_list_bytes

    data = read_list_bytes(source, what)
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if b"\x00" in line:
            raise DataError(f"{source}:{lineno}: unreadable line: it holds a NUL byte ({os.fsdecode(line.strip())!r})")
    files = [os.fsdecode(token) for token in data.split()]
    if not files:
        raise DataError(f"{what} {source!r} lists no HDF5 file; put one .h5 path per line")
    return files


def load_hdf5_file(path: str, names: list[str], *, source: str = "", index: int = 0) -> list[np.ndarray]:
    """Load the datasets ``names`` from ``path`` as float32 arrays with equal first dimensions.

    ``source`` / ``index`` (0-based) say where ``path`` was listed, for error messages.
    """
    from caffe_compat.io import check_regular_file, read_h5_dataset

    listed = f" (entry {index + 1} of {source!r})" if source else ""
    if not os.path.exists(path):
        raise DataError(f"HDF5 file {path!r}{listed} not found (working directory {os.getcwd()!r})")
    check_regular_file(path, f"an HDF5 file{listed}", error=DataError)
    try:
        f = h5py.File(path, "r")
    except Exception as e:  # h5py raises OSError, and others on damaged files
        raise DataError(f"HDF5 file {path!r}{listed} could not be opened: {e}") from e
    arrays: list[np.ndarray] = []
    with f:
        for name in names:
            try:
                ds = f.get(name)
                have = sorted(k for k in f.keys() if isinstance(f.get(k), h5py.Dataset))
            except Exception as e:
                raise DataError(f"HDF5 file {path!r}{listed}: dataset {name!r}: HDF5 error ({e})") from None
            if not isinstance(ds, h5py.Dataset):
                raise DataError(
                    f"HDF5 file {path!r}{listed} has no dataset {name!r} (the top's name); "
                    f"datasets: {', '.join(have) or 'none'}"
                )
            try:
                ndim = ds.ndim
            except Exception as e:  # h5py's errors on a damaged file
                raise DataError(f"HDF5 file {path!r}{listed}: dataset {name!r}: HDF5 error ({e})") from None
            if ndim < 1:
                raise DataError(f"HDF5 file {path!r}{listed}: dataset {name!r} is a scalar; it needs a row axis")
            arr = read_h5_dataset(path, ds, f"dataset {name!r}{listed}", error=DataError)
            arrays.append(np.asarray(arr, dtype=np.float32))
    rows = arrays[0].shape[0]
    if rows == 0:
        raise DataError(f"HDF5 file {path!r}{listed}: dataset {names[0]!r} has no rows")
    for name, a in zip(names[1:], arrays[1:]):
        if a.shape[0] != rows:
            raise DataError(
                f"HDF5 file {path!r}{listed}: dataset {name!r} has {a.shape[0]} rows but "
                f"{names[0]!r} has {rows}; every dataset needs one row per sample"
            )
    return arrays


def count_hdf5_rows(path: str, name: str, *, source: str = "", index: int = 0) -> int:
    """The number of rows (first dimension) of dataset ``name`` of ``path``, from the HDF5
    metadata alone (nothing is read): what HDF5Data needs to seek to a row on resume."""
    listed = f" (entry {index + 1} of {source!r})" if source else ""
    if not os.path.exists(path):
        raise DataError(f"HDF5 file {path!r}{listed} not found (working directory {os.getcwd()!r})")
    from caffe_compat.io import check_regular_file

    check_regular_file(path, f"an HDF5 file{listed}", error=DataError)
    try:
        with h5py.File(path, "r") as f:
            ds = f.get(name)
            if not isinstance(ds, h5py.Dataset) or ds.ndim < 1:
                raise DataError(f"HDF5 file {path!r}{listed} has no dataset {name!r} with a row axis")
            rows = int(ds.shape[0])
    except DataError:
        raise
    except Exception as e:  # h5py's errors on a damaged file
        raise DataError(f"HDF5 file {path!r}{listed}: dataset {name!r}: HDF5 error ({e})") from None
    if rows == 0:
        raise DataError(f"HDF5 file {path!r}{listed}: dataset {name!r} has no rows")
    return rows


def create_hdf5(path: str) -> None:
    """Create (or truncate) an empty HDF5 file, as HDF5Output does at setup."""
    try:
        with h5py.File(path, "w"):
            pass
    except OSError as e:
        raise DataError(f"could not create HDF5 file {path!r}: {e}") from e


def append_hdf5(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Append rows to resizable float32 datasets of ``path`` (created on first use)."""
    try:
        f = h5py.File(path, "a")
    except OSError as e:
        raise DataError(f"could not open HDF5 file {path!r} for writing: {e}") from e
    with f:
        for name, a in arrays.items():
            a = np.asarray(a, dtype=np.float32)
            if name not in f:
                f.create_dataset(name, data=a, maxshape=(None,) + a.shape[1:], chunks=True)
                continue
            ds = f[name]
            if ds.shape[1:] != a.shape[1:]:
                raise DataError(
                    f"HDF5 file {path!r}: dataset {name!r} has rows of shape {ds.shape[1:]}, "
                    f"cannot append rows of shape {a.shape[1:]}"
                )
            n = ds.shape[0]
            ds.resize(n + a.shape[0], axis=0)
            ds[n:] = a
