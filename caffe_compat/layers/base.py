"""The layer base class and the registry of layer types by Caffe's type string.

A layer is a ``torch.nn.Module`` built from its ``LayerParameter`` and the shapes of its bottoms.
Its learnable blobs live in ``self.blobs`` in Caffe's order and layout (Convolution: weight
``(O, C/g, kh, kw)`` then bias ``(O,)``), so caffemodel I/O, surgery and snapshots need no
per-layer cases. ``forward`` takes the bottom tensors and returns a tuple of top tensors; the
backward pass is torch's autograd through that forward (a layer may use a custom
``torch.autograd.Function`` where Caffe's gradient differs from the autograd of the forward).

The net (``caffe_compat.net``) owns everything that is not one layer's business: phase
filtering, wiring, in-place blobs, ``propagate_down`` (it detaches such bottoms), loss weights,
parameter sharing and which blobs need a gradient.
"""

from __future__ import annotations

import enum
import math

import torch
from torch import nn

from caffe_compat.blob import CaffeParameter
from caffe_compat.errors import LayerError

__all__ = [
    "Layer",
    "LabelChecks",
    "BlobList",
    "register_layer",
    "scalar_tensor",
    "layer_class",
    "registered_types",
    "LAYER_REGISTRY",
]

LAYER_REGISTRY: dict[str, type[Layer]] = {}


def register_layer(type_name: str):
    """Class decorator: register a ``Layer`` subclass under Caffe's type string."""

    def deco(cls: type[Layer]) -> type[Layer]:
        if type_name in LAYER_REGISTRY:
            raise ValueError(
                f"layer type {type_name!r} registered twice "
                f"({LAYER_REGISTRY[type_name].__qualname__} and {cls.__qualname__})"
            )
        LAYER_REGISTRY[type_name] = cls
        cls.caffe_type = type_name
        return cls

    return deco


def registered_types() -> list[str]:
    return sorted(LAYER_REGISTRY)


def layer_class(type_name: str, layer_name: str = "?") -> type[Layer]:
    try:
        return LAYER_REGISTRY[type_name]
    except KeyError:
        forks: dict[str, list[str]] = {}
        for t, cls in LAYER_REGISTRY.items():
            if cls.fork:
                forks.setdefault(cls.fork, []).append(t)
        hint = "; ".join(f"{f}: {', '.join(sorted(ts))}" for f, ts in sorted(forks.items()))
        raise LayerError(
            f"Unknown layer type {type_name!r} (layer {layer_name!r}); known types: {', '.join(registered_types())}"
            + (f". Of Caffe's forks' types these are known (others are not): {hint}" if hint else "")
        ) from None


_SCALARS: dict[tuple[float, torch.dtype, torch.device], torch.Tensor] = {}


def scalar_tensor(value: float, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A cached 0-d tensor holding ``value`` (read-only use), so that a per-call constant costs
    no allocation and, on a GPU, no host-to-device copy. A CPU one mixes with tensors on any
    device; one on the operand's device keeps an op from treating it as a CPU scalar (CUDA
    divides by a CPU scalar as a multiplication by its reciprocal, not Caffe's division)."""
    if torch.compiler.is_compiling():
        return torch.tensor(value, dtype=dtype, device=device)
    key = (value, dtype, torch.device(device))
    t = _SCALARS.get(key)
    if t is None:
        if len(_SCALARS) > 256:
            _SCALARS.clear()
        t = _SCALARS[key] = torch.tensor(value, dtype=dtype, device=device)
    return t


class LabelChecks(enum.Enum):
    """How a layer that reads class labels (``Layer.checks_labels``) verifies that they lie in
    ``[0, classes)`` during one pass. The runner running the pass chooses and hands it to each
    such layer as ``layer.label_checks`` (``Runner.label_checks``); outside a runner's pass a
    layer has the class default, ``NOW``.

    - ``NOW``: read the labels' range on the host at once and raise naming the bad label.
    - ``DEFER`` (a solver's pass): labels on a GPU are not read back in the middle of the pass
      (a synchronisation that would stall the device): the layer clamps them into range for its
      indexing kernels and leaves a record for the runner (``Layer.label_record``), which
      verifies it on the host with the loss, before anything uses the pass's gradients. CPU
      labels are checked ``NOW`` (reading them costs no synchronisation).
    - ``TRACED`` (a ``torch.compile``'d pass): while traced, the layer records the labels'
      [min, max] as a tensor that leaves the graph (a host read would break it) and clamps; the
      runner verifies it after the graph. Outside a trace (a pass finishing eagerly) as ``NOW``.
    """

    NOW = "now"
    DEFER = "defer"
    TRACED = "traced"


_BLOB_KEYS = tuple(str(i) for i in range(16))


class BlobList(nn.ParameterList):
    """``nn.ParameterList`` whose ``blobs[i]`` (read by layers on every forward) skips the generic
    index normalisation: a few microseconds per access, which count on a GPU at small batches."""

    def __getitem__(self, idx):
        if type(idx) is int and 0 <= idx < len(_BLOB_KEYS):
            p = self._parameters.get(_BLOB_KEYS[idx])
            if p is not None:
                return p
        return super().__getitem__(idx)


class Layer(nn.Module):
    """Base of every Caffe layer.

    Subclasses override:

    - ``setup(bottom_shapes)``: read parameters from ``self.param`` (the compiled proto, so
      defaults are caffe.proto's), validate them (raise ``self.error(...)``), create blobs with
      ``self.add_blob(shape, filler)``.
    - ``forward(*bottoms) -> tuple[Tensor, ...]``: compute the tops. No parameter parsing here.
    - ``top_shapes(bottom_shapes)``: only where running ``forward`` on meta tensors cannot give
      the shapes (side effects, data layers, data-dependent shapes).

    - ``flops(bottom_shapes, top_shapes)``: where one FLOP per top value is a poor estimate.
    - ``set_shard`` / ``skip_batches``: layers that read a data stream.

    Class attributes set the bottom/top counts Caffe checks, the loss-layer behaviour and the
    facts other modules read (``host_side_effect``, ``moves_data_only``, ...); everything a
    layer may implement is declared here with its default, so nothing probes with ``hasattr``.
    """

    caffe_type: str = ""
    #: For a layer of one of Caffe's forks: the fork, named in the unknown-type hint.
    fork: str = ""
    #: Exact / minimum / maximum numbers of bottoms and tops (None: not checked).
    exact_num_bottom: int | None = None
    min_bottom: int | None = None
    max_bottom: int | None = None
    exact_num_top: int | None = None
    min_top: int | None = None
    max_top: int | None = None
    #: Caffe's LossLayer: top 0 gets loss_weight 1 when the prototxt gives none.
    is_loss: bool = False
    #: Layers whose blobs never receive a gradient (BatchNorm statistics).
    blobs_have_gradient: bool = True
    #: Input-like layers: the net keeps their tops as the net's inputs and never calls forward.
    is_net_input: bool = False
    #: The layer's forward makes its tops as new tensors and its backward does not read them
    #: (Convolution, InnerProduct, Eltwise but for its naive product gradient): an in-place
    #: layer after it may overwrite them (``forward_inplace``) in passes that need no blob diffs.
    top_overwritable: bool = False
    #: What the layer's forward does on the host besides computing its tops (a CUDA graph's
    #: replay would skip it): "" for none, else a phrase for messages ("writes its bottoms to a file").
    host_side_effect: str = ""
    #: The forward gives the same values for a channels-last bottom as for a contiguous one
    #: (elementwise, pooling, concatenation): the inference runner hands it the channels-last
    #: tops of its packed convolutions as they are (``runners/inference.py``); others get a copy.
    layout_neutral: bool = False
    #: The forward takes a channels-last 4-D bottom and gives the values it gives for a
    #: contiguous one to float32 rounding (convolutions, BatchNorm, Scale, InnerProduct; the
    #: ``layout_neutral`` layers bit for bit): in CPU float32 training passes the eager runner
    #: hands it channels-last tensors as they are; a layer without it gets a contiguous copy.
    accepts_channels_last: bool = False
    #: The layer runs faster on channels-last bottoms (oneDNN's convolutions): in CPU float32
    #: training passes the eager runner converts its 4-D bottoms (``runners/eager.py``).
    wants_channels_last: bool = False
    #: Whether a layer that writes files as it runs (HDF5Output) may write them: set per layer
    #: by ``Net.disable_output_files`` (tools that only look at a net or time it).
    writes_files: bool = True
    #: The layer only moves or copies values (Split, Concat, Reshape, Input, ...): ``flops`` is 0.
    moves_data_only: bool = False
    #: The layer reads class labels from a bottom and checks their range (the loss layers that
    #: index by label, Accuracy): the runner hands it ``label_checks`` for each pass.
    checks_labels: bool = False
    #: How this pass checks the labels (``LabelChecks``): an instance attribute the runner sets
    #: for the duration of a pass on the layers with ``checks_labels``; otherwise this default.
    label_checks: LabelChecks = LabelChecks.NOW
    #: What a ``DEFER``/``TRACED`` check left to verify after the pass: ``(values, classes,
    #: ignore)``, the labels as given or their [min, max] (a tensor) and the ``ignore_label`` to
    #: skip (or None). Written by the layer during the pass, taken off it by the runner that set
    #: ``label_checks`` (``Runner.label_checks``); None otherwise.
    label_record: tuple | None = None

    def __init__(self, param, bottom_shapes: list[tuple[int, ...]], phase: int):
        super().__init__()
        self.param = param
        self.name: str = param.name
        self.type: str = param.type
        self.phase: int = phase
        #: How many tops the prototxt gives (read in forward without touching the protobuf,
        #: which torch.compile cannot trace).
        self.num_tops: int = len(param.top)
        self.blobs = BlobList()
        self._check_counts(len(bottom_shapes), len(param.top))
        self.setup([tuple(s) for s in bottom_shapes])

    # -- to override ---------------------------------------------------------------------------

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        """Read parameters and create blobs. Default: nothing to set up."""

    def forward(self, *bottoms: torch.Tensor) -> tuple[torch.Tensor, ...]:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def top_shapes(self, bottom_shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Shapes of the tops for these bottom shapes; by default, forward on meta tensors."""
        metas = [torch.empty(s, device="meta") for s in bottom_shapes]
        saved = list(self.blobs)
        try:
            # whole meta Parameters in and out: torch refuses .data assignment across devices
            for i, p in enumerate(saved):
                self.blobs[i] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"))
            with torch.no_grad():
                tops = self.forward(*metas)
        finally:
            for i, p in enumerate(saved):
                self.blobs[i] = p
        return [tuple(t.shape) for t in tops]

    def forward_inplace(self, *bottoms: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Optional: ``forward`` writing the top into the bottom's tensor (one bottom, in place).
        The net calls it only where nothing reads the bottom's old values again (the bottom was
        made in this pass by a ``top_overwritable`` layer) and records no autograd graph through
        the overwritten tensor. Layers that offer it override this method."""
        raise NotImplementedError(f"{type(self).__name__}.forward_inplace")

    @property
    def has_forward_inplace(self) -> bool:
        return type(self).forward_inplace is not Layer.forward_inplace

    def channel_affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """If the forward is, per channel of axis 1 of a 4-D bottom, ``y = a·x + c`` with fixed
        ``a`` and ``c`` (BatchNorm with global statistics, a learned Scale): ``(a, c)`` in float64,
        one value per channel; else None (the default). The inference runner folds such in-place
        layers into the convolution before them."""
        return None

    def fused_activation(self) -> tuple[str, list] | None:
        """If the forward is an elementwise activation oneDNN applies after a convolution:
        its post-op name and scalars (ReLU: ``("relu", [None])``); else None (the default)."""
        return None

    def channel_params(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """If the forward is ``y = x·scale + shift`` per channel of axis 1 with learned
        parameters (a Scale with one bottom): those parameters themselves, ``shift`` None
        without a bias; else None (the default). The eager runner hands them to the layer
        before it when that one offers ``forward_with_affine``."""
        return None

    def forward_with_affine(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None):
        """Optional: ``forward`` (one bottom, one top) followed by the per-channel affine map of
        an in-place layer after it (``channel_params``), as one op. Layers that offer it
        (BatchNorm) override this method."""
        raise NotImplementedError(f"{type(self).__name__}.forward_with_affine")

    @property
    def has_forward_with_affine(self) -> bool:
        return type(self).forward_with_affine is not Layer.forward_with_affine

    @property
    def hooked(self) -> bool:
        """Whether forward hooks are registered on this module (the runners then call it as a
        module, and fuse nothing into it)."""
        return bool(self._forward_hooks or self._forward_pre_hooks)

    def recompute(self, bottoms: list[torch.Tensor], tops: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The forward again, under autograd, for a backward pass that reads the blobs (pycaffe's
        ``net.backward()`` when the last forward's autograd graph is gone or stale): the tops as
        a function of ``bottoms`` (the blobs' current data; ``tops`` are the top blobs' current
        data, for layers whose backward reads them). It must have no side effects and must
        reproduce the last forward's randomness and statistics (Dropout's mask, BatchNorm's batch
        statistics without updating its accumulators), as Caffe's Backward reads what Forward
        left. Default: ``forward``."""
        return self.forward(*bottoms)

    @classmethod
    def implementation(cls, param) -> type[Layer]:
        """The class that builds a layer of this type from ``param`` (the net calls it before
        building). Default: this class; Python layers of published models map to native ones."""
        return cls

    def allow_force_backward(self, bottom_index: int) -> bool:
        """Caffe's AllowForceBackward: loss layers refuse it for their label bottom."""
        if self.is_loss:
            return bottom_index != 1
        return True

    def flops(self, bottom_shapes: list[tuple[int, ...]], top_shapes: list[tuple[int, ...]]) -> int:
        """FLOPs of one forward pass at these shapes (``caffe_compat.summary``): an estimate of one
        FLOP per elementary operation. Default: one per top value (0 when ``moves_data_only``);
        layers with products (Convolution, InnerProduct, LRN, LSTM, ...) override it."""
        if self.moves_data_only:
            return 0
        return sum(math.prod(s) for s in top_shapes)

    def set_shard(self, rank: int, world_size: int) -> None:
        """Distributed training: read only batches ``rank``, ``rank + world_size``, ... of this
        layer's data stream (the solver calls it on every layer of its train net before the first
        pass). Default: nothing (a layer without a data stream); data layers override it."""

    def skip_batches(self, n: int) -> None:
        """Step over the next ``n`` batches this layer would produce, as ``n`` forwards would
        (the solver calls it on every layer when it restores a snapshot). Default: nothing (a
        layer without a data stream); data layers override it."""

    # -- helpers for subclasses ----------------------------------------------------------------

    def add_blob(self, shape, filler=None, value: float | None = None) -> CaffeParameter:
        """Create the next learnable blob, filled by ``filler`` (a FillerParameter) or ``value``
        (a ``CaffeParameter``: an ``nn.Parameter`` whose ``.data`` writes are seen)."""
        from caffe_compat.fillers import fill

        t = torch.zeros(tuple(int(d) for d in shape), dtype=torch.float32)
        if filler is not None:
            try:
                fill(t, filler)
            except LayerError as e:
                raise self.error(f"blob {len(self.blobs)}: {e}") from None
        elif value is not None:
            t.fill_(value)
        p = CaffeParameter(t, requires_grad=self.blobs_have_gradient)
        self.blobs.append(p)
        return p

    def error(self, message: str) -> LayerError:
        """An error naming this layer, to ``raise``."""
        return LayerError(f"layer {self.name!r} ({self.type}): {message}")

    def per_shape(self, name: str, key, compute):
        """``compute()``, computed again only when ``key`` (e.g. the bottom's shape) changes:
        kept on the layer as ``name`` (per-call host time counts on a GPU). While torch.compile
        traces, nothing is stored (a graph must not set attributes)."""
        plan = self.__dict__.get(name)
        if plan is not None and plan[0] == key:
            return plan[1]
        value = compute()
        if not torch.compiler.is_compiling():
            setattr(self, name, (key, value))
        return value

    def _check_counts(self, nb: int, nt: int) -> None:
        for what, n, exact, lo, hi in (
            ("bottom", nb, self.exact_num_bottom, self.min_bottom, self.max_bottom),
            ("top", nt, self.exact_num_top, self.min_top, self.max_top),
        ):
            if exact is not None and n != exact:
                raise self.error(f"takes exactly {exact} {what} blob(s), got {n}")
            if lo is not None and n < lo:
                raise self.error(f"takes at least {lo} {what} blob(s), got {n}")
            if hi is not None and n > hi:
                raise self.error(f"takes at most {hi} {what} blob(s), got {n}")

    def extra_repr(self) -> str:
        return f"name={self.name!r}, type={self.type!r}"
