"""pycaffe's Blob: a named N-D array with its diff, seen from Python as writable NumPy views.

On the CPU ``blob.data`` and ``blob.diff`` are NumPy views of the torch tensors the net computes
with: writing into them changes what the net sees, as in pycaffe. On a GPU they are host copies
that the net copies back before the next forward/backward (Caffe's SyncedMemory, in small).
A forward pass replaces the tensor of every computed blob, so fetch ``.data`` after ``forward``
rather than keeping an older view (pycaffe reuses the same memory; caffe_compat does not).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["Blob", "ParamBlob"]


def _view(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


class _HostSynced:
    """Host mirrors of device tensors (Caffe's SyncedMemory, in small).

    Reading returns a host copy, refreshed from the device on every read unless the caller has
    written into the copy since (a pending write); ``sync_to_device`` sends pending writes back.
    The net syncs input data and parameters before a forward, output and parameter diffs before
    a backward; nothing else is copied back, so autograd's graph is never touched.
    """

    def _host(self, which: str, t: torch.Tensor) -> np.ndarray:
        if t.device.type == "cpu":
            return _view(t)
        cache = self._host_cache
        hit = cache.get(which)
        if hit is not None and hit[0] is t:
            arr, orig = hit[1], hit[2]
            if not np.array_equal(arr, orig, equal_nan=True):
                return arr  # written by the caller: kept until the next sync
            fresh = t.detach().cpu().numpy()
            arr[...] = fresh
            orig[...] = fresh
            return arr
        arr = t.detach().cpu().numpy()
        cache[which] = (t, arr, arr.copy())
        return arr

    def sync_to_device(self, which: str | None = None) -> None:
        """Copy host mirrors written through ``.data``/``.diff`` (on a GPU) back to the device."""
        for w, (t, arr, orig) in list(self._host_cache.items()):
            if which is not None and w != which:
                continue
            if not np.array_equal(arr, orig, equal_nan=True):
                with torch.no_grad():
                    t.copy_(torch.from_numpy(arr))
                orig[...] = arr


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
        if self._data is None or tuple(self._data.shape) != self._shape:
            self._data = torch.zeros(self._shape, dtype=self._dtype, device=self._device)
        return self._data

    def set_tensor(self, t: torch.Tensor, grad_tensor: torch.Tensor | None = None) -> None:
        self._data = t
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
        self._host_cache.clear()

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
        self._host_cache.clear()

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
        self._host_cache.clear()

    def __repr__(self) -> str:
        return f"ParamBlob(shape={self.shape})"
