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
            f.create_dataset("learned_net", data=np.bytes_(state.learned_net.encode()))
        f.create_dataset("current_step", data=np.int32(state.current_step))
        g = f.create_group("history")
        for i, h in enumerate(state.history):
            g.create_dataset(str(i), data=np.asarray(h, dtype=np.float32))

    atomic_h5_write(path, fill)


def read_state(path: str | os.PathLike) -> SolverStateData:
    """Read a ``.solverstate`` (binary) or, for a name ending in ``.h5``, its HDF5 form."""
    path = os.fspath(path)
    if not path.endswith(".h5"):
        return from_proto(cio.read_solverstate(path), path)
    import h5py

    if not os.path.isfile(path):
        raise FormatError(f"{path}: no such file (expected a Caffe .solverstate.h5)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise FormatError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        for key in ("iter", "current_step", "history"):
            if key not in f:
                raise FormatError(f"{path}: not a Caffe HDF5 solver state (no '{key}')")
        learned = None
        if "learned_net" in f:
            raw = f["learned_net"][()]
            learned = raw.decode() if isinstance(raw, bytes) else str(raw)
        g = f["history"]
        n = len(g)
        missing = [str(i) for i in range(n) if str(i) not in g]
        if missing:
            raise FormatError(f"{path}: history datasets must be named 0..{n - 1}; missing {missing}")
        return SolverStateData(
            iter=int(np.asarray(f["iter"][()])),
            learned_net=learned,
            current_step=int(np.asarray(f["current_step"][()])),
            history=[np.asarray(g[str(i)], dtype=np.float32) for i in range(n)],
        )
