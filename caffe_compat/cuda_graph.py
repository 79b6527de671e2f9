"""Opt-in: a net's passes replayed from CUDA graphs (``Net.use_cuda_graph``): the training pass
(``forward_backward``, a solver's passes) and pycaffe's whole ``forward()``, one graph each.

At batches 1-10 on a GPU the host's Python, not the device, bounds an eager training pass: every
layer's Python and every kernel launch cost host microseconds while the kernels themselves take
fewer (docs/benchmarks.md). A CUDA graph records the kernels of one pass once and then launches
them all with one call, so the per-layer Python runs once instead of every iteration.

What is captured: the net's layers after its leading bottomless ones (Input and data layers:
their batches are produced on the host at every pass, as in an eager pass, and copied into the
graph's input tensors), the loss and the backward into the parameters' diffs (a forward's graph: the layers alone,
without autograd's graph, so ``backward()`` after it refuses). The kernels are the
ones the eager pass launches, so the values are the eager pass's (Dropout draws its masks from
the graph's own offsets of the CUDA generator: other masks than an eager pass would draw). The
loss layers' label checks stay: the graph leaves each pass's labels (or their range) on the
device and they are read back with the loss, as in an eager pass on a GPU.

The first ``warmup`` passes run eagerly (cuDNN, cuBLAS and the layers' per-shape state settle);
the next one captures. When an input's shape or dtype, or a parameter's storage, changed
(``net.reshape``, ``restore``, ``net.to``), the next pass runs eagerly (the layers' per-shape
state, such as a constant copied to the device, is made outside a capture) and the one after it
captures again. Passes that need the
per-layer Python run eagerly: Caffe's ``debug_info`` and ``before_forward``/``after_forward``
callbacks. Under ``caffe_compat.mode.set_precision("bf16"|"fp16")`` the captured pass runs in
autocast as the eager one. Needs (else ``NetError`` saying what to change): the net on a CUDA
device, no ``Net.compile``, a loss scale of 1 (no fp16 loss scaling: a solver's scale changes), no
bottomless layer after a computing one, no ``Python`` layer in the captured part (its code would
run once, at the capture).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from caffe_compat import blob as _blob
from caffe_compat.errors import NetError
from caffe_compat.layers import loss as _loss_layers
from caffe_compat.mode import autocast_dtype

__all__ = ["GraphedPass"]


def _host_copy(values: torch.Tensor) -> torch.Tensor:
    """A label record's values on the host: copied behind the pass (a graph leaves them on the
    device; an eager pass on a GPU has already started the copy)."""
    return values.to("cpu", non_blocking=True, copy=True) if values.is_cuda else values


# Layer types whose forward does host work a replay would skip: what that work is.
_HOST_SIDE = {"Python": "runs Python code of its own", "HDF5Output": "writes its bottoms to a file"}


class _CudaGraph:
    """One ``torch.cuda.CUDAGraph`` captured on a side stream of the device."""

    def __init__(self, device: torch.device):
        self.graph = torch.cuda.CUDAGraph()
        self.stream = torch.cuda.Stream(device)

    def capture(self, body: Callable[[], tuple], collect: Callable[[tuple], list]) -> tuple:
        # thread_local: other threads (a data layer's prefetching) may use CUDA meanwhile
        with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
            return body()

    def replay(self) -> None:
        self.graph.replay()


class GraphedPass:
    """``Net.forward_backward_pending`` and whole ``Net.forward`` passes of one net through CUDA
    graphs (see the module's doc).

    ``graph_factory(device)`` makes the graph object: ``capture(body, collect)`` records
    ``body()`` and returns its result, ``replay()`` runs it again writing into the same tensors
    (``collect(result)`` lists the tensors the graph writes that are read after it; the CPU
    tests' stand-in for a CUDA graph re-runs ``body`` and copies into those).
    """

    def __init__(self, net, warmup: int = 2, graph_factory: Callable[[torch.device], object] | None = None):
        self.net = net
        self.warmup = max(int(warmup), 1)
        self.graph_factory = graph_factory or _CudaGraph
        self.prefix = self._check_layers()
        self.captures = 0  # how many times a graph was captured, both kinds (tests, logs)
        self._kinds = {"train": _Recording(), "forward": _Recording()}
        self._side = None  # the warm-up passes' stream (made at the first on a GPU)

    # -- eligibility --------------------------------------------------------------------------

    def _check_layers(self) -> int:
        """The number of leading bottomless layers (run eagerly at every pass); raises for a
        layer the graph cannot replay."""
        net = self.net
        prefix = 0
        while prefix < len(net.layers) and not net._bottoms[prefix]:
            prefix += 1
        for li in range(prefix, len(net.layers)):
            layer, name = net.layers[li], net._layer_names[li]
            if not net._bottoms[li]:
                raise NetError(
                    f"{net.source}: CUDA graphs: layer {name!r} ({layer.type}) has no bottoms but comes after "
                    "computing layers; its output would be recorded once. Move it before the first layer with "
                    "bottoms, or train without CUDA graphs"
                )
            if layer.type in _HOST_SIDE:
                raise NetError(
                    f"{net.source}: CUDA graphs: layer {name!r} ({layer.type}) {_HOST_SIDE[layer.type]}, which "
                    "would happen once, at the capture, and never again; run without CUDA graphs"
                )
        return prefix

    def check_call(self, loss_scale: float) -> None:
        net = self.net
        if net._device.type != "cuda" and self.graph_factory is _CudaGraph:
            raise NetError(
                f"{net.source}: CUDA graphs need the net on a CUDA device (it is on {net._device}); "
                "caffe_compat.set_mode_gpu() or net.to('cuda') first"
            )
        if loss_scale != 1.0:
            raise NetError(f"{net.source}: CUDA graphs: loss scale {loss_scale} (fp16 loss scaling) is not supported")
        if net._compile_options is not None:
            raise NetError(f"{net.source}: CUDA graphs and Net.compile exclude each other; use one of them")

    def runs_eagerly(self) -> bool:
        """Whether this pass needs the per-layer Python (debug_info, layer callbacks)."""
        return bool(self.net.debug_info) or self.net._layer_callbacks is not None

    # -- the pass -----------------------------------------------------------------------------

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.net.learnable_params if p.requires_grad]

    def _shape_key(self) -> tuple:
        """What a captured graph depends on: the inputs' shapes and dtypes, every parameter's
        storage and which of them learn."""
        net = self.net
        inputs = tuple((tuple(net.blobs[t]._data.shape), net.blobs[t]._data.dtype) for _, t in self._input_blobs())
        params = tuple((p.data_ptr(), p.requires_grad) for p in net.learnable_params)
        return inputs, params, net._device, autocast_dtype()

    def _input_blobs(self):
        net = self.net
        for li in range(self.prefix):
            for t in net._tops[li]:
                yield li, t

    def forward_backward(self, eager: Callable[[], object]):
        """A training pass: eager for the warm-up passes, else (captured if need be) from the
        graph. ``eager()`` is the net's eager pass; returns its ``PendingLoss``."""
        from caffe_compat.net import PendingLoss

        net, rec = self.net, self._kinds["train"]
        warming, pending = self._begin(rec, eager)
        if warming:
            return pending
        kept = None
        if not net._diffs_cleared:  # this pass's gradients add into the diffs (autograd's rule)
            ours = {g.data_ptr() for g in rec.grads if g is not None} if rec.graph is not None else set()
            kept = {}
            for p in net.learnable_params:
                _blob.own_diff(p)
                d = p.grad
                if d is not None:  # a diff the graph writes is overwritten by the replay: keep a copy
                    kept[p] = d.clone() if d.data_ptr() in ours else d
        loss, grads, records, _ = self._replay(rec, "train")
        for p, g in zip(self._params(), grads):
            d = kept.get(p) if kept is not None else None
            if d is None:
                p.grad = g
            elif g is not None:
                d.add_(g)
                p.grad = d
            else:
                p.grad = d
        checks = [(layer, _host_copy(v), n, ig) for layer, v, n, ig in records]
        net._fill_missing_diffs()
        net._diffs_cleared = False  # (_prepare_inputs cleared _graph_forward)
        if isinstance(loss, torch.Tensor) and not loss.is_cuda:  # (on a GPU PendingLoss copies it at once)
            loss = loss.clone()  # the next replay overwrites the graph's loss tensor
        return PendingLoss(net, loss, checks)

    def forward(self, eager: Callable[[], object]) -> None:
        """A whole forward pass (pycaffe's ``forward()``): eager for the warm-up passes, else from
        its own graph, which records no autograd graph (``backward()`` after it raises). The loss
        layers' label checks are read back and verified before it returns."""
        net, rec = self.net, self._kinds["forward"]
        if self._begin(rec, eager)[0]:
            return
        _, _, records, replayed = self._replay(rec, "forward")
        if records:
            if not replayed and net._device.type == "cuda":  # an eager pass started the copies
                torch.cuda.current_stream(net._device).synchronize()
            net._verify_labels([(layer, v.to("cpu"), n, ig) for layer, v, n, ig in records])
        net._graph_forward = replayed

    def _begin(self, rec: _Recording, eager: Callable[[], object]) -> tuple[bool, object]:
        """The start of a pass of ``rec``'s kind: ``(True, eager())`` while warm-up passes are
        left (run on the capture's stream); else ``(False, None)`` with the inputs prepared and
        the leading bottomless layers run (the batches, produced on the host as in any pass)."""
        net = self.net
        if rec.eager_passes < self.warmup:
            rec.eager_passes += 1
            result = self._on_side_stream(eager)
            rec.warm_key = self._shape_key()  # what the next pass may capture
            return True, result
        net._prepare_inputs()
        net._overwritten = False
        if self.prefix:
            net._run_layers(0, self.prefix - 1)
        return False, None

    def _replay(self, rec: _Recording, kind: str) -> tuple:
        """This pass's ``(loss, gradients, label records, whether the graph ran)``: from the graph,
        captured (again) if the inputs' shapes or the parameters changed since it was recorded. A shape or parameter set
        not seen before runs eagerly once first (the layers' per-shape state, e.g. a constant
        copied to the device, must not be made inside a capture); the next pass with it captures.
        After a replay the blobs are bound to the graph's tensors."""
        key = self._shape_key()
        if rec.graph is None or key != rec.key:
            if rec.warm_key != key:
                rec.warm_key = key
                body = self._body(kind, self._params() if kind == "train" else [])
                return (*self._on_side_stream(body), False)
            self._capture(rec, kind, key)
        for blob, static in rec.statics:
            t = blob._data
            if t is not static:
                static.copy_(t, non_blocking=True)
                blob._data = static
            blob._grad_tensor = static
        for p in rec.params:  # the graph writes its own gradient tensors (and a re-run must not add)
            p.grad = None
        rec.graph.replay()
        for blob, data, grad_tensor in rec.bound:  # an eager pass in between rebinds them
            blob._data, blob._grad_tensor = data, grad_tensor
        if rec.overwrote:
            self.net._overwritten = True
        return rec.loss, rec.grads, rec.records, True

    def _on_side_stream(self, run: Callable[[], object]):
        """``run()`` (an eager pass before a capture) on a side stream, as torch's capture recipe
        warms up."""
        if self.net._device.type != "cuda":  # the CPU tests' stand-in graphs
            return run()
        if self._side is None:
            self._side = torch.cuda.Stream(self.net._device)
        main = torch.cuda.current_stream(self.net._device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            result = run()
        main.wait_stream(self._side)
        return result

    def _release_autograd_graph(self) -> None:
        """Detach every blob from the previous pass's autograd graph: its nodes (and their
        streams) must not outlive it into the capture."""
        for b in self.net.blobs.values():
            if b._data is not None and b._data.grad_fn is not None:
                b._data = b._data.detach()
            b._grad_tensor = None

    def _capture(self, rec: _Recording, kind: str, key) -> None:
        net = self.net
        train = kind == "train"
        rec.clear()  # the previous graph's tensors go before the new capture allocates its own
        self._release_autograd_graph()
        net._prepare_inputs()  # the inputs' tensors and autograd flags again, after the detach
        rec.statics = [(net.blobs[t], net.blobs[t]._data) for _, t in self._input_blobs()]
        params = self._params() if train else []
        body = self._body(kind, params)

        def collect(result: tuple) -> list[torch.Tensor]:
            loss, grads, records = result
            tensors = [loss] if isinstance(loss, torch.Tensor) else []
            tensors += [g for g in grads if g is not None]
            tensors += [r[1] for r in records]
            tensors += [net.blobs[t]._data for t in self._captured_tops()]
            return tensors

        graph = self.graph_factory(net._device)
        try:
            loss, grads, records = graph.capture(body, collect)
        except Exception as e:
            raise NetError(
                f"{net.source}: capturing the {'training' if train else 'forward'} pass in a CUDA graph failed "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); run without CUDA graphs"
            ) from e
        rec.graph, rec.key = graph, key
        rec.loss = loss.detach() if isinstance(loss, torch.Tensor) else loss
        rec.params, rec.grads = params, grads
        rec.records = records
        rec.bound = [(net.blobs[t], net.blobs[t]._data, net.blobs[t]._grad_tensor) for t in self._captured_tops()]
        rec.overwrote = bool(net._overwritten)  # in-place layers wrote over blobs (backward() then refuses)
        self.captures += 1

    def _body(self, kind: str, params: list) -> Callable[[], tuple]:
        """The pass a graph records (or that runs eagerly once for a new shape): the layers after
        the leading bottomless ones, in autocast as the eager pass under bf16/fp16; for training
        the loss and the backward into ``params``' diffs, which it hands over (set to None
        first). Returns ``(loss or None, gradients, label records)``."""
        net = self.net
        train = kind == "train"
        prefix, last = self.prefix, len(net.layers) - 1
        low = autocast_dtype()

        def layers() -> torch.Tensor | float | None:
            if low is None:
                net._run_layers(prefix, last, overwrite=True)
                return net._loss() if train else None
            # as the eager pass (Net._eager_forward_backward); no cast cache in a graph
            with torch.autocast(net._device.type, dtype=low, cache_enabled=False):
                net._run_layers(prefix, last, overwrite=True)
                loss = net._loss() if train else None
            for o in net.outputs:  # the outputs made float32 again
                b = net.blobs[o]
                if b._data is not None and b._data.dtype in (torch.float16, torch.bfloat16):
                    b.set_tensor(b._data.float())
            return loss

        def body() -> tuple:
            for p in params:  # autograd hands its gradient tensors over, as after a clear
                p.grad = None
            grad = torch.enable_grad() if train else torch.no_grad()
            with grad, _loss_layers.deferred_label_checks() as records:
                loss = layers()
                if isinstance(loss, torch.Tensor) and loss.requires_grad and params:
                    torch.autograd.backward([loss], inputs=params)
            return loss, [p.grad for p in params], list(records)

        return body

    def _captured_tops(self) -> list[str]:
        net = self.net
        seen, out = set(), []
        for li in range(self.prefix, len(net.layers)):
            for t in net._tops[li]:
                if t not in seen:
                    seen.add(t)
                    out.append(t)
        return out


class _Recording:
    """One kind of captured pass (training, or forward only): its graph and the tensors around it."""

    def __init__(self):
        self.eager_passes = 0
        self.key = None
        self.clear()

    def clear(self) -> None:
        self.graph = None
        self.statics: list = []
        self.bound: list = []
        self.params: list = []
        self.grads: list = []
        self.records: list = []
        self.loss = None
        self.overwrote = False
        self.warm_key = None  # the last key a pass ran eagerly with (captured at its next pass)
