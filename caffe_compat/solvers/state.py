"""The solver's saved state: Caffe's ``SolverState`` as ``.solverstate`` (binary) or ``.solverstate.h5``.

``SolverState {iter = 1, learned_net = 2, history = 3, current_step = 4}``:

- ``iter``: updates done; ``current_step``: the lr policy's position (``step``/``multistep``);
- ``learned_net``: the weights file written with this state, by the name Caffe gave it
  (``<snapshot_prefix>_iter_<N>.caffemodel``, relative to the working directory);
- ``history``: one blob per learnable parameter, in ``learnable_params`` order; AdaDelta and
  Adam append their second set (``[m_0..m_{N-1}, v_0..v_{N-1}]``).

The HDF5 form (``SGDSolver::SnapshotSolverStateToHDF5``) holds scalar datasets ``iter`` and
``current_step``, a string ``learned_net`` and a group ``history`` with datasets ``"0"``,
``"1"``... Both forms are written atomically (temporary file in the same folder, then rename),
so a run killed while snapshotting leaves the previous snapshot intact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from caffe_compat import io as cio
from caffe_compat.errors import FormatError
from caffe_compat.proto import caffe_pb2

__all__ = ["SolverStateData", "to_proto", "from_proto", "write_state", "read_state", "atomic_h5_write"]


@dataclass
class SolverStateData:
    """What a ``.solverstate`` holds, with the history as float32 NumPy arrays."""

    iter: int = 0
    learned_net: str | None = None
    current_step: int = 0
    history: list[np.ndarray] = field(default_factory=list)


def to_proto(state: SolverStateData) -> caffe_pb2.SolverState:
    """A ``SolverState`` message as Caffe writes it (history blobs: ``shape`` + float ``data``)."""
    msg = caffe_pb2.SolverState()
    msg.iter = int(state.iter)
    if state.learned_net is not None:
        msg.learned_net = state.learned_net
    msg.current_step = int(state.current_step)
    for h in state.history:
        msg.history.add().CopyFrom(cio.array_to_blob(np.asarray(h, dtype=np.float32)))
    return msg


def from_proto(msg: caffe_pb2.SolverState, source: str = "<SolverState>") -> SolverStateData:
    return SolverStateData(
        iter=int(msg.iter),
        learned_net=msg.learned_net if msg.HasField("learned_net") else None,
        current_step=int(msg.current_step),
        history=[
            cio.blob_to_array(b, what=f"{source}: history blob {i}").astype(np.float32)
            for i, b in enumerate(msg.history)
        ],
    )


def atomic_h5_write(path: str | os.PathLike, fill) -> None:
    """Create the HDF5 file ``path`` atomically: ``fill(h5py.File)`` writes into a temporary file
    that replaces ``path`` only once complete (``caffe_compat.io.atomic_write``)."""
    import h5py

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            fill(f)

    cio.atomic_write(path, write)


def write_state(state: SolverStateData, path: str | os.PathLike, hdf5: bool = False) -> None:
    """Write ``state`` to ``path`` atomically, as binary proto or (``hdf5=True``) as HDF5."""
    if not hdf5:
        cio.write_solverstate(to_proto(state), path)
        return

    def fill(f) -> None:
        f.create_dataset("iter", data=np.int32(state.iter))
        if state.learned_net is not None:
            f.create_dataset("learned_net", data=np.bytes_(os.fsencode(state.learned_net)))
        f.create_dataset("current_step", data=np.int32(state.current_step))
        g = f.create_group("history")
        for i, h in enumerate(state.history):
            g.create_dataset(str(i), data=np.asarray(h, dtype=np.float32))

    atomic_h5_write(path, fill)


def _check_learned_net(state: SolverStateData, path: str) -> SolverStateData:
    """Refuse a ``learned_net`` that exists but is not a regular file (a FIFO would block the
    restore, a device would stream without end); a missing one is reported when it is read."""
    if state.learned_net and os.path.exists(state.learned_net):
        cio.check_regular_file(state.learned_net, f"the weights named by learned_net in {path}")
    return state


def read_state(path: str | os.PathLike) -> SolverStateData:
    """Read a ``.solverstate`` (binary) or, for a name ending in ``.h5``, its HDF5 form.

    The file (and the ``learned_net`` it names, when that exists) must be a regular file; every
    HDF5 error names the file and the dataset."""
    path = os.fspath(path)
    if not path.endswith(".h5"):
        return _check_learned_net(from_proto(cio.read_solverstate(path), path), path)
    import h5py

    cio.check_regular_file(path, "a Caffe .solverstate.h5")
    try:
        f = h5py.File(path, "r")
    except Exception as e:  # OSError, or others from a damaged file
        raise FormatError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        try:
            return _check_learned_net(_read_h5_state(f, path), path)
        except FormatError:
            raise
        except Exception as e:  # h5py's errors on a damaged file: KeyError, OSError, RuntimeError...
            raise FormatError(f"{path}: HDF5 error ({e}); the file is corrupt or not a Caffe solver state") from None


def _scalar(f, name: str, path: str) -> int:
    ds = f[name]
    import h5py

    if not isinstance(ds, h5py.Dataset):
        raise FormatError(f"{path}: '{name}' is not a dataset")
    arr = cio.read_h5_dataset(path, ds, f"dataset {name!r}")
    if arr.size != 1:
        raise FormatError(f"{path}: dataset {name!r} holds {arr.size} values; expected one integer")
    value = arr.reshape(()).item()
    if not float(value).is_integer() or not -(2**31) <= value < 2**31:
        raise FormatError(f"{path}: dataset {name!r} holds {value}; expected a 32-bit integer")
    return int(value)


def _read_h5_state(f, path: str) -> SolverStateData:
    import h5py

    for key in ("iter", "current_step", "history"):
        if key not in f:
            raise FormatError(f"{path}: not a Caffe HDF5 solver state (no '{key}')")
    learned = None
    if "learned_net" in f:
        raw = f["learned_net"][()]
        if isinstance(raw, np.ndarray) and raw.dtype.kind in "SO" and raw.size == 1:
            raw = raw.reshape(()).item()
        if isinstance(raw, bytes):
            learned = os.fsdecode(raw)
        elif isinstance(raw, str):
            learned = raw
        else:
            raise FormatError(f"{path}: dataset 'learned_net' holds {type(raw).__name__}; expected a string")
    g = f["history"]
    if not isinstance(g, h5py.Group):
        raise FormatError(f"{path}: 'history' is not a group of datasets 0, 1, ...")
    n = len(g)
    missing = [str(i) for i in range(n) if str(i) not in g]
    if missing:
        raise FormatError(f"{path}: history datasets must be named 0..{n - 1}; missing {missing}")
    history = []
    for i in range(n):
        ds = g.get(str(i))
        if not isinstance(ds, h5py.Dataset):
            raise FormatError(f"{path}: history/{i} is not a dataset (a group or a dangling link)")
        history.append(np.asarray(cio.read_h5_dataset(path, ds, f"dataset history/{i}"), dtype=np.float32))
    return SolverStateData(
        iter=_scalar(f, "iter", path),
        learned_net=learned,
        current_step=_scalar(f, "current_step", path),
        history=history,
    )
