"""pycaffe's Blob: a named N-D array with its diff, seen from Python as writable NumPy views.

As in pycaffe, the blobs are the state. On the CPU ``blob.data`` and ``blob.diff`` are NumPy views
of storage that lives as long as the blob (until a reshape): a forward pass writes each computed
blob's new values into the storage a view was handed out of, and backward writes the diffs into
theirs, so an array held across passes shows the new values, as a view of a Caffe blob does.
Only blobs whose ``data`` was handed out pay that copy (``Blob.exported``); the others keep the
tensor the layer made. On a GPU they are host copies that the net copies back before the next
forward/backward (Caffe's SyncedMemory, in small).

Parameter diffs have one owner each, a ``ParamDiff`` (``diff_owner(param)``), which every writer
asks: a solver may lend the diff its history instead of copying the update value into it
(``lend``); writes go to storage of the parameter's own (``own``/``writable`` copy a lent diff
first; ``prepare_accumulation`` before autograd adds into it); once a NumPy view of a diff was
handed out (``ParamBlob.diff``), that storage is kept: clearing zeroes it in place and a lent
value is copied into it.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

__all__ = [
    "Blob",
    "CaffeParameter",
    "ParamBlob",
    "ParamDiff",
    "data_generation",
    "diff_owner",
    "raw_data",
    "uses_host_mirror",
    "values_watched",
]


def uses_host_mirror(device: torch.device) -> bool:
    """Whether ``.data``/``.diff`` are host copies (tensors on a GPU) rather than views (CPU)."""
    return device.type != "cpu"


_TENSOR_DATA = torch._C.TensorBase.data  # torch's own ``.data`` descriptor


def raw_data(t: torch.Tensor) -> torch.Tensor:
    """``t.data`` without ``CaffeParameter``'s bookkeeping: the library's own reads (the solvers
    write through it and move the version counters themselves)."""
    return _TENSOR_DATA.__get__(t)


class _DataWatch:
    """A parameter's record of the ways writes that move no version counter can reach its
    values: the ``.data`` tensors ``CaffeParameter`` handed out (how many, and weak references
    to those still alive), and whether pycaffe handed out a NumPy view (``ParamBlob.data``; it
    lives as long as the blob). Pickled as a fresh record (a pickled parameter comes back as a
    new tensor, whose caches start afresh)."""

    __slots__ = ("handed", "refs", "viewed")

    def __init__(self):
        self.handed = 0
        self.refs: list = []
        self.viewed = False

    def __reduce__(self):
        return (_DataWatch, ())

    def add(self, t: torch.Tensor) -> None:
        self.refs = [r for r in self.refs if r() is not None]
        self.refs.append(weakref.ref(t))
        self.handed += 1

    def watched(self) -> bool:
        return self.viewed or any(r() is not None for r in self.refs)


def _data_watch(p: torch.Tensor) -> _DataWatch:
    """``p``'s ``_DataWatch``, made at the first call and kept on the tensor."""
    watch = p.__dict__.get("_caffe_data_watch")
    if watch is None:
        watch = p.__dict__["_caffe_data_watch"] = _DataWatch()
    return watch


class CaffeParameter(torch.nn.Parameter):
    """A learnable blob: an ``nn.Parameter`` whose ``.data`` is watched.

    A write through ``param.data`` (``p.data.copy_(w)``, an idiom of many weight-loading scripts)
    moves no version counter, so a cache of something made from the values (the inference
    program's packed convolution weights, ``runners/inference.py``) could not tell that they
    changed. Each read or assignment of ``.data`` is counted (``data_generation``), and the
    tensors handed out are referred to weakly: while one lives, a write through it can come at
    any time, and ``values_watched`` tells such a cache to compare the values instead."""

    @property
    def data(self) -> torch.Tensor:
        d = _TENSOR_DATA.__get__(self)
        _data_watch(self).add(d)
        return d

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        _TENSOR_DATA.__set__(self, value)
        _data_watch(self).add(value)  # the parameter now shares the storage of a tensor held elsewhere

    def __reduce_ex__(self, proto):
        # torch's own reduction comes back as a plain ``nn.Parameter``
        state = torch._utils._get_obj_state(self)
        return (_rebuild_caffe_parameter, (_TENSOR_DATA.__get__(self), self.requires_grad, state))


def _rebuild_caffe_parameter(data: torch.Tensor, requires_grad: bool, state) -> CaffeParameter:
    p = CaffeParameter(data, requires_grad)
    return torch._utils._set_obj_state(p, state) if state else p


def data_generation(p: torch.Tensor) -> int:
    """How many times ``p.data`` was handed out or assigned (``CaffeParameter``; 0 for others)."""
    watch = p.__dict__.get("_caffe_data_watch")
    return watch.handed if watch is not None else 0


def values_watched(p: torch.Tensor) -> bool:
    """Whether writes that move no version counter can reach ``p``'s values now: a NumPy view of
    them was handed out (``ParamBlob.data``; it lives as long as the blob) or a tensor from
    ``p.data`` is still alive."""
    watch = p.__dict__.get("_caffe_data_watch")
    return watch is not None and watch.watched()


class ParamDiff:
    """The owner of one parameter's diff storage (``param.grad``, Caffe's diff); reach it with
    ``diff_owner(param)``. Everything that writes, lends, clears or hands out a parameter's
    diff asks this object, so the rule holds by construction:

    - ``lend(value)``: a solver lends a tensor of its own as the diff (SGD's history, which
      equals the update value Caffe leaves in the diff) instead of copying it in;
    - ``own()`` / ``writable()``: the diff as storage of the parameter's own, a lent tensor
      copied first, so that no write reaches the lender (``writable`` makes a zero diff where
      there is none);
    - ``export()``: the diff for a NumPy view that outlives passes (``ParamBlob.diff``): from
      then on its storage is kept (``exported``): clearing zeroes it in place and a lent value
      is copied into it;
    - ``clear()``: Caffe's ClearParamDiffs, lazily where no view was handed out;
    - ``prepare_accumulation(cleared)``: before autograd accumulates into the diff, which it
      does in place: a lent diff copied, or a cleared one dropped so that autograd hands its
      gradient tensor over;
    - ``accumulate(g)`` / ``replace(t)``: a runner adds a pass's gradient into the diff, or
      makes a tensor of its own the diff (a CUDA graph's gradient, a new shape).

    A tensor set as ``param.grad`` by anyone else ends a loan by itself (the loan holds only
    while the diff *is* the lent tensor). The owner refers to its parameter weakly (no cycle
    through the parameter's ``__dict__``, where it is kept)."""

    __slots__ = ("_ref", "_lent", "exported")

    def __init__(self, param: torch.nn.Parameter | None = None):
        self._ref = weakref.ref(param) if param is not None else None
        self._lent: torch.Tensor | None = None
        #: a NumPy view of the diff was handed out: its storage must be kept
        self.exported = False

    def __reduce__(self):
        # a pickled parameter comes back without its diff (torch pickles no .grad), so without
        # a loan or a view: a fresh owner (``diff_owner`` binds it)
        return (ParamDiff, ())

    @property
    def param(self) -> torch.nn.Parameter | None:
        return self._ref() if self._ref is not None else None

    def lend(self, value: torch.Tensor) -> None:
        """Make ``value`` the diff without copying it (the lender keeps it; the first write to
        the diff copies it, see ``own``). An exported diff keeps its storage: ``value`` is
        copied into it."""
        p = self.param
        if self.exported and p.grad is not None and p.grad.shape == value.shape:
            with torch.no_grad():
                p.grad.copy_(value)
            return
        p.grad = self._lent = value

    def own(self) -> torch.Tensor | None:
        """The diff as storage of the parameter's own: a lent diff is replaced by a copy. None
        while the diff is cleared lazily (see ``clear``)."""
        p = self.param
        lent, self._lent = self._lent, None
        if lent is not None and p.grad is lent:
            with torch.no_grad():
                p.grad = lent.clone()
        return p.grad

    def writable(self) -> torch.Tensor:
        """``own()``, with a zero diff made where there is none."""
        d = self.own()
        if d is None:
            p = self.param
            d = p.grad = torch.zeros_like(raw_data(p))
        return d

    def export(self) -> torch.Tensor:
        """The diff to hand out as a NumPy view (``writable``); on the CPU, where the view shares
        its storage, that storage is kept from then on (``exported``)."""
        d = self.writable()
        if not uses_host_mirror(d.device):
            self.exported = True
        return d

    def clear(self) -> bool:
        """Zero the diff (Caffe's ClearParamDiffs): in place where a view of it was handed out,
        else lazily (the diff is dropped; autograd's next gradient is taken as it is). Returns
        whether it was dropped."""
        p = self.param
        if self.exported and p.grad is not None:
            with torch.no_grad():
                self.own().zero_()
            return False
        self.replace(None)
        return True

    def prepare_accumulation(self, cleared: bool) -> None:
        """Before autograd adds a pass's gradient into the diff (in place): a diff dropped by a
        clear (``cleared``) and not exported is left to autograd, which then hands its gradient
        tensor over instead of adding it to zeros; any other is made the parameter's own."""
        if cleared and not self.exported:
            self.replace(None)
        else:
            self.own()

    def accumulate(self, g: torch.Tensor, take: bool = False) -> None:
        """Add a pass's gradient ``g`` into the diff (Caffe accumulates parameter diffs). Where
        there is no diff: a zero diff plus ``g``, or with ``take`` ``g`` itself (a gradient
        tensor nothing else holds, handed over)."""
        if take and self.own() is None:
            self.param.grad = g
            return
        with torch.no_grad():
            self.writable().add_(g)

    def replace(self, value: torch.Tensor | None) -> None:
        """Make ``value`` (or no diff, None) the diff: a tensor the caller hands over (a runner's
        own gradient tensor, a diff of a new shape); a loan ends."""
        self._lent = None
        self.param.grad = value


def diff_owner(param: torch.nn.Parameter) -> ParamDiff:
    """The one ``ParamDiff`` of ``param`` (made at the first call, kept on the parameter, shared
    by every net and solver that uses it)."""
    owner = param.__dict__.get("_caffe_diff")
    if owner is None or owner.param is not param:
        owner = param._caffe_diff = ParamDiff(param)
    return owner


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

    #: the net's list of blobs whose data was handed out (it publishes them after each pass)
    _exports: list | None = None

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
        #: the storage ``.data`` views were handed out of (CPU), or None; the tensor last
        #: written into it (or adopted as it), so a pass's new tensor is copied in once
        self._store: torch.Tensor | None = None
        self._synced: torch.Tensor | None = None

    # -- storage that outlives passes ----------------------------------------------------------

    @property
    def exported(self) -> bool:
        """Whether a NumPy view of the data was handed out (the net keeps it current)."""
        return self._store is not None

    def publish(self) -> None:
        """After a pass: copy the tensor it left into the handed-out storage (views see it)."""
        t, store = self._data, self._store
        if t is None or store is None or t is self._synced or t is store:
            return
        if t.shape == store.shape and t.device == store.device and t.dtype == store.dtype:
            if t.data_ptr() != store.data_ptr():
                with torch.no_grad():
                    store.copy_(t.detach())
        else:  # a new shape: views of the old storage end here (as Caffe's after a reshape)
            self._store = t.detach() if t.is_contiguous() else t.detach().contiguous()
        self._synced = t

    def current(self) -> torch.Tensor:
        """What the blob holds now: the handed-out storage (which sees writes through its
        views) where there is one, else the last tensor."""
        store = self._store
        if store is not None and store.shape == self._shape:
            return store
        return self.tensor

    def written_since_pass(self) -> bool:
        """Whether the values in the handed-out storage differ from the tensor the last pass left
        (written through a view since): a cached autograd graph then no longer describes it."""
        t, store = self._data, self._store
        if store is None or t is None or t is store or t.shape != store.shape:
            return False
        if t.data_ptr() == store.data_ptr():
            return False
        return not torch.equal(t.detach(), store)

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
        self._store = self._synced = None
        self._drop_host_copies()

    # -- pycaffe -------------------------------------------------------------------------------

    @property
    def data(self) -> np.ndarray:
        t = self.tensor
        if uses_host_mirror(t.device):
            return self._host("data", t)
        store = self._store
        if store is None or store.shape != t.shape or store.dtype != t.dtype or store.device != t.device:
            # adopt the tensor's storage (no copy), or a C-contiguous copy of a channels-last one
            self._store = store = t.detach() if t.is_contiguous() else t.detach().contiguous()
            self._synced = t
            exports = self._exports
            if exports is not None and self not in exports:
                exports.append(self)
        elif t is not self._synced and t is not store:
            self.publish()
        return store.detach().numpy()

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
        self._store = self._synced = None
        self._drop_host_copies()

    @property
    def _gpu_data_ptr(self) -> int:
        """pycaffe's ``Blob._gpu_data_ptr``: the device address of the data (host copies written
        back first, as Caffe's ``mutable_gpu_data``); a CUDA blob only."""
        return _gpu_ptr(self, self.tensor, "data")

    @property
    def _gpu_diff_ptr(self) -> int:
        """pycaffe's ``Blob._gpu_diff_ptr``: the device address of the diff (see ``_gpu_data_ptr``)."""
        return _gpu_ptr(self, self.diff_tensor, "diff")

    def __repr__(self) -> str:
        return f"Blob({self.name!r}, shape={self._shape})"


class ParamBlob(_HostSynced):
    """A learnable blob seen as pycaffe's ``net.params[layer][i]``: ``data`` and ``diff`` views."""

    def __init__(self, param: torch.nn.Parameter):
        self.param = param
        self._host_cache: dict = {}

    @property
    def data(self) -> np.ndarray:
        p = self.param
        if not uses_host_mirror(p.device):
            # a view outlives this call and its writes move no version counter: whoever caches
            # something made of these values (``runners/inference.py``) compares them instead
            _data_watch(p).viewed = True
        return self._host("data", raw_data(p))

    @property
    def diff(self) -> np.ndarray:
        return self._host("diff", diff_owner(self.param).export())

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
            diff_owner(self.param).replace(torch.zeros_like(raw_data(self.param)))
        self._drop_host_copies()

    @property
    def _gpu_data_ptr(self) -> int:
        """pycaffe's ``Blob._gpu_data_ptr`` for a parameter (a CUDA net only)."""
        return _gpu_ptr(self, raw_data(self.param), "data")

    @property
    def _gpu_diff_ptr(self) -> int:
        """pycaffe's ``Blob._gpu_diff_ptr`` for a parameter: its own diff storage (a CUDA net only)."""
        return _gpu_ptr(self, diff_owner(self.param).writable(), "diff")

    def __repr__(self) -> str:
        return f"ParamBlob(shape={self.shape})"


def _gpu_ptr(holder: _HostSynced, t: torch.Tensor, which: str) -> int:
    if t.device.type != "cuda":
        raise AttributeError(
            f"_gpu_{which}_ptr: the blob is on {t.device}; caffe_compat.set_mode_gpu() first (pycaffe's "
            "CPU-only build has no GPU pointer either)"
        )
    holder.sync_to_device(which)
    return t.data_ptr()
