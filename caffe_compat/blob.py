"""pycaffe's Blob: a named N-D array with its diff, seen from Python as writable NumPy views.

On the CPU ``blob.data`` and ``blob.diff`` are NumPy views of the torch tensors the net computes
with: writing into them changes what the net sees, as in pycaffe. On a GPU they are host copies
that the net copies back before the next forward/backward (Caffe's SyncedMemory, in small).
A forward pass replaces the tensor of every computed blob, so fetch ``.data`` after ``forward``
rather than keeping an older view (pycaffe reuses the same memory; caffe_compat does not).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

__all__ = ["Blob", "ParamBlob", "alias_diff", "own_diff", "uses_host_mirror"]


def uses_host_mirror(device: torch.device) -> bool:
    """Whether ``.data``/``.diff`` are host copies (tensors on a GPU) rather than views (CPU)."""
    return device.type != "cpu"


def alias_diff(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Make ``value`` (e.g. SGD's momentum history, which equals the update value Caffe leaves in
    the diff) the parameter's diff without copying it; ``own_diff`` gives the parameter a copy of
    its own before anything writes into or hands out the diff."""
    param.grad = value
    param._caffe_diff_alias = value


def own_diff(param: torch.nn.Parameter) -> None:
    """If the parameter's diff is an alias set by ``alias_diff``, replace it by a copy (so that
    writes into the diff never reach the tensor it aliases)."""
    alias = param.__dict__.pop("_caffe_diff_alias", None)
    if alias is not None and param.grad is alias:
        with torch.no_grad():
            param.grad = alias.clone()


# Blobs holding host copies not yet sent back (weakly: a dropped net takes its blobs along), so
# that the syncs at every step cost nothing when no copy was handed out (the common case on a GPU).
_outstanding: weakref.WeakSet = weakref.WeakSet()


def host_copies_out() -> bool:
    """Whether any blob holds host copies that a sync would send back to its device."""
    return len(_outstanding) > 0


def sync_host_copies(blob_part: str | None, params: bool = True, recomputed=()) -> None:
    """Send every outstanding host copy back to its device (any net's: an earlier write-back of
    what was written there anyway): the parameters' data and diffs (``params``) and the blobs'
    ``blob_part`` ("data", "diff", or None for neither). The ``blob_part`` copies of the blobs in
    ``recomputed`` (a pass about to replace their tensors before anything reads them) are dropped
    instead: copying them back would be work, and on a GPU a wait, for values nothing reads."""
    for holder in list(_outstanding):
        if isinstance(holder, ParamBlob):
            if params:
                holder.sync_to_device()
        elif blob_part is not None:
            if holder in recomputed:
                holder._drop_host_copy(blob_part)
            else:
                holder.sync_to_device(blob_part)


def _view(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


class _HostSynced:
    """Host mirrors of device tensors, with Caffe's SyncedMemory rule: reading ``.data`` or
    ``.diff`` on a GPU hands out a host copy and makes it the head; the net copies every such
    copy back (``sync_to_device``) at its next step that uses the tensor — the start of a
    forward (inputs, parameters), of a backward (output diffs, parameter diffs), of a solver
    update — and drops it, so the next read fetches the device's values again.
    """

    def _host(self, which: str, t: torch.Tensor) -> np.ndarray:
        if not uses_host_mirror(t.device):
            return _view(t)
        hit = self._host_cache.get(which)
        if hit is not None and hit[0] is t:
            return hit[1]
        arr = t.detach().to("cpu", copy=True).numpy()  # a copy (also where tests force mirrors on the CPU)
        self._host_cache[which] = (t, arr)
        _outstanding.add(self)
        return arr

    def _drop_host_copies(self) -> None:
        self._host_cache.clear()
        _outstanding.discard(self)

    def _drop_host_copy(self, which: str) -> None:
        self._host_cache.pop(which, None)
        if not self._host_cache:
            _outstanding.discard(self)

    def sync_to_device(self, which: str | None = None) -> None:
        """Copy the host copies handed out since the last sync back to the device, and drop them."""
        if not self._host_cache:
            return
        for w, (t, arr) in list(self._host_cache.items()):
            if which is not None and w != which:
                continue
            with torch.no_grad():
                t.copy_(torch.from_numpy(arr))
            del self._host_cache[w]
        if not self._host_cache:
            _outstanding.discard(self)


class Blob(_HostSynced):
    """A blob of the net: ``data``, ``diff``, ``shape``, ``count``, ``reshape``."""

    def __init__(self, name: str, shape: tuple[int, ...], loss_weight: float = 0.0):
        self.name = name
        self._shape = tuple(int(d) for d in shape)
        self.loss_weight = float(loss_weight)
        self._data: torch.Tensor | None = None
        self._diff: torch.Tensor | None = None
        self._grad_tensor: torch.Tensor | None = None  # the tensor whose gradient is this diff
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        self._host_cache: dict = {}

    # -- tensors -------------------------------------------------------------------------------

    @property
    def tensor(self) -> torch.Tensor:
        """The current data tensor (allocated as zeros if the net has not computed it yet)."""
        if self._data is None or self._data.shape != self._shape:  # torch.Size compares with a tuple
            self._data = torch.zeros(self._shape, dtype=self._dtype, device=self._device)
        return self._data

    def set_tensor(self, t: torch.Tensor, grad_tensor: torch.Tensor | None = None) -> None:
        self._data = t
        if t.shape != self._shape:
            self._shape = tuple(t.shape)
        if grad_tensor is not None:
            self._grad_tensor = grad_tensor

    @property
    def diff_tensor(self) -> torch.Tensor:
        d = self._diff
        if d is None or tuple(d.shape) != self._shape or d.device != self._device or d.dtype != self._dtype:
            d = torch.full(self._shape, self.loss_weight, dtype=self._dtype, device=self._device)
            self._diff = d
        return d

    def set_diff(self, g: torch.Tensor) -> None:
        d = self.diff_tensor
        if d.shape == g.shape:
            d.copy_(g)
        else:
            self._diff = g.detach().clone()

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self._device = torch.device(device)
        if dtype is not None:
            self._dtype = dtype
        if self._data is not None:
            self._data = self._data.detach().to(self._device, self._dtype)
        if self._diff is not None:
            self._diff = self._diff.to(self._device, self._dtype)
        self._grad_tensor = None
        self._drop_host_copies()

    # -- pycaffe -------------------------------------------------------------------------------

    @property
    def data(self) -> np.ndarray:
        return self._host("data", self.tensor)

    @property
    def diff(self) -> np.ndarray:
        return self._host("diff", self.diff_tensor)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def count(self) -> int:
        return int(np.prod(self._shape, dtype=np.int64))

    def _legacy(self, i: int) -> int:
        # Caffe's LegacyShape(i): shape[i], or 1 past the last axis (num is always shape[0])
        return self._shape[i] if i < len(self._shape) else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    def reshape(self, *shape) -> None:
        """Give the blob a new shape (pycaffe: ``net.blobs['data'].reshape(1, 3, 227, 227)``).

        Then ``net.reshape()`` (or the next ``forward``) propagates it through the net.
        """
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"blob {self.name!r}: negative dimension in {shape}")
        self._shape = shape
        self._data = None
        self._diff = None
        self._drop_host_copies()

    def __repr__(self) -> str:
        return f"Blob({self.name!r}, shape={self._shape})"


class ParamBlob(_HostSynced):
    """A learnable blob seen as pycaffe's ``net.params[layer][i]``: ``data`` and ``diff`` views."""

    def __init__(self, param: torch.nn.Parameter):
        self.param = param
        self._host_cache: dict = {}

    @property
    def data(self) -> np.ndarray:
        return self._host("data", self.param.data)

    @property
    def diff(self) -> np.ndarray:
        p = self.param
        own_diff(p)
        if p.grad is None:
            p.grad = torch.zeros_like(p.data)
        return self._host("diff", p.grad)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    @property
    def count(self) -> int:
        return int(self.param.numel())

    def reshape(self, *shape) -> None:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(d) for d in shape)
        with torch.no_grad():
            self.param.data = torch.zeros(shape, dtype=self.param.dtype, device=self.param.device)
            self.param.grad = torch.zeros_like(self.param.data)
        self._drop_host_copies()

    def __repr__(self) -> str:
        return f"ParamBlob(shape={self.shape})"
