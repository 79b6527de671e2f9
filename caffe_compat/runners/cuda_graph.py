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
per-layer Python run eagerly (the net then uses its observed runner): Caffe's ``debug_info`` and
``before_forward``/``after_forward`` callbacks. Under ``caffe_compat.mode.set_precision("bf16"|"fp16")`` the captured pass runs in
autocast as the eager one. Needs (else ``NetError`` saying what to change): the net on a CUDA
device, a loss scale of 1 (no fp16 loss scaling: a solver's scale changes), no
bottomless layer after a computing one, no ``Python`` layer in the captured part (its code would
run once, at the capture).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from caffe_compat import blob as _blob
from caffe_compat.errors import NetError
from caffe_compat.layers.base import LabelChecks
from caffe_compat.mode import autocast_dtype
from caffe_compat.runners.base import PendingLoss
from caffe_compat.runners.eager import EagerRunner

__all__ = ["GraphRunner", "GraphedPass"]


def _host_copy(values: torch.Tensor) -> torch.Tensor:
    """A label record's values on the host: copied behind the pass (a graph leaves them on the
    device; an eager pass on a GPU has already started the copy)."""
    return values.to("cpu", non_blocking=True, copy=True) if values.is_cuda else values


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


class GraphRunner(EagerRunner):
    """Training passes and whole forward passes of one net through CUDA graphs (see the module's
    doc); everything else, and the warm-up passes, as the eager runner.

    ``graph_factory(device)`` makes the graph object: ``capture(body, collect)`` records
    ``body()`` and returns its result, ``replay()`` runs it again writing into the same tensors
    (``collect(result)`` lists the tensors the graph writes that are read after it; the CPU
    tests' stand-in for a CUDA graph re-runs ``body`` and copies into those).
    """

    fuses_affine = False  # (the loop is traced / captured: layer by layer)

    kind = "cuda_graph"

    def __init__(self, state, warmup: int = 2, graph_factory: Callable[[torch.device], object] | None = None):
        super().__init__(state)
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
        st = self.state
        steps = st.plan.steps
        prefix = 0
        while prefix < len(steps) and not steps[prefix].bottoms:
            prefix += 1
        for step in steps[prefix:]:
            layer, name = step.layer, step.name
            if not step.bottoms:
                raise NetError(
                    f"{st.source}: CUDA graphs: layer {name!r} ({layer.type}) has no bottoms but comes after "
                    "computing layers; its output would be recorded once. Move it before the first layer with "
                    "bottoms, or train without CUDA graphs"
                )
            if layer.host_side_effect:
                raise NetError(
                    f"{st.source}: CUDA graphs: layer {name!r} ({layer.type}) {layer.host_side_effect}, which "
                    "would happen once, at the capture, and never again; run without CUDA graphs"
                )
        return prefix

    def _check_call(self, loss_scale: float) -> None:
        st = self.state
        if st.device.type != "cuda" and self.graph_factory is _CudaGraph:
            raise NetError(
                f"{st.source}: CUDA graphs need the net on a CUDA device (it is on {st.device}); "
                "caffe_compat.set_mode_gpu() or net.to('cuda') first"
            )
        if loss_scale != 1.0:
            raise NetError(f"{st.source}: CUDA graphs: loss scale {loss_scale} (fp16 loss scaling) is not supported")

    # -- the pass -----------------------------------------------------------------------------

    def _params(self) -> list[torch.nn.Parameter]:
        return [lp.param for lp in self.state.plan.learnable if lp.param.requires_grad]

    def _shape_key(self) -> tuple:
        """What a captured graph depends on: the inputs' shapes and dtypes, every parameter's
        storage and which of them learn."""
        st = self.state
        blobs = st.plan.blobs
        inputs = tuple((tuple(blobs[t]._data.shape), blobs[t]._data.dtype) for t in self._input_names())
        params = tuple((lp.param.data_ptr(), lp.param.requires_grad) for lp in st.plan.learnable)
        return inputs, params, st.device, autocast_dtype()

    def _input_names(self):
        for step in self.state.plan.steps[: self.prefix]:
            yield from step.tops

    def train_pass(self, loss_scale: float = 1.0) -> PendingLoss:
        """A training pass: eager for the warm-up passes, else (captured if need be) from the
        graph."""
        self._check_call(loss_scale)
        st, rec = self.state, self._kinds["train"]
        warming, pending = self._begin(rec, lambda: super(GraphRunner, self).train_pass(loss_scale))
        if warming:
            return pending
        # this pass's gradients add into the diffs (autograd's rule), and into a diff whose view
        # pycaffe handed out (its storage stays the diff) after a clear too, which zeroed it
        ours = {g.data_ptr() for g in rec.grads if g is not None} if rec.graph is not None else set()
        kept = {}
        for lp in st.plan.learnable:
            p = lp.param
            owner = _blob.diff_owner(p)
            if st.diffs_cleared and not owner.exported:
                continue
            d = owner.own()
            if d is not None:  # a diff the graph writes is overwritten by the replay: keep a copy
                kept[p] = d.clone() if d.data_ptr() in ours else d
        loss, grads, records, _ = self._replay(rec, "train")
        for p, g in zip(self._params(), grads):
            d = kept.get(p)
            if d is not None and g is not None:
                d.add_(g)
            _blob.diff_owner(p).replace(g if d is None else d)
        checks = [(layer, _host_copy(v), n, ig) for layer, v, n, ig in records]
        st.fill_missing_diffs()
        st.diffs_cleared = False
        if isinstance(loss, torch.Tensor) and not loss.is_cuda:  # (on a GPU PendingLoss copies it at once)
            loss = loss.clone()  # the next replay overwrites the graph's loss tensor
        return PendingLoss(st, loss, checks)

    def forward(self, start: int, end: int) -> None:
        """A whole forward pass (pycaffe's ``forward()``): eager for the warm-up passes, else from
        its own graph, which records no autograd graph (``backward()`` after it recomputes from
        the blobs). The loss layers' label checks are read back and verified before it returns.
        A partial pass runs eagerly."""
        st = self.state
        if (start, end) != (0, len(st.plan.steps) - 1):
            super().forward(start, end)
            return
        self._check_call(1.0)
        rec = self._kinds["forward"]
        if self._begin(rec, lambda: super(GraphRunner, self).forward(start, end))[0]:
            return
        _, _, records, replayed = self._replay(rec, "forward")
        if records:
            if not replayed and st.device.type == "cuda":  # an eager pass started the copies
                torch.cuda.current_stream(st.device).synchronize()
            st.verify_labels([(layer, v.to("cpu"), n, ig) for layer, v, n, ig in records])
        st.graph_forward = replayed

    def _begin(self, rec: _Recording, eager: Callable[[], object]) -> tuple[bool, object]:
        """The start of a pass of ``rec``'s kind: ``(True, eager())`` while warm-up passes are
        left (run on the capture's stream); else ``(False, None)`` with the inputs prepared and
        the leading bottomless layers run (the batches, produced on the host as in any pass)."""
        st = self.state
        if rec.eager_passes < self.warmup:
            rec.eager_passes += 1
            result = self._on_side_stream(eager)
            rec.warm_key = self._shape_key()  # what the next pass may capture
            return True, result
        st.prepare_inputs()
        st.overwritten = False
        if self.prefix:
            self.run_steps(0, self.prefix - 1)
        return False, None

    def _replay(self, rec: _Recording, kind: str) -> tuple:
        """This pass's ``(loss, gradients, label records, whether the graph ran)``: from the graph,
        captured (again) if the inputs' shapes or the parameters changed since it was recorded. A
        shape or parameter set not seen before runs eagerly once first (the layers' per-shape
        state, e.g. a constant copied to the device, must not be made inside a capture); the next
        pass with it captures. After a replay the blobs are bound to the graph's tensors."""
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
            _blob.diff_owner(p).replace(None)
        rec.graph.replay()
        for blob, data, grad_tensor in rec.bound:  # an eager pass in between rebinds them
            blob._data, blob._grad_tensor = data, grad_tensor
        if rec.overwrote:
            self.state.overwritten = True
        return rec.loss, rec.grads, rec.records, True

    def _on_side_stream(self, run: Callable[[], object]):
        """``run()`` (an eager pass before a capture) on a side stream, as torch's capture recipe
        warms up."""
        device = self.state.device
        if device.type != "cuda":  # the CPU tests' stand-in graphs
            return run()
        if self._side is None:
            self._side = torch.cuda.Stream(device)
        main = torch.cuda.current_stream(device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            result = run()
        main.wait_stream(self._side)
        return result

    def _release_autograd_graph(self) -> None:
        """Detach every blob from the previous pass's autograd graph: its nodes (and their
        streams) must not outlive it into the capture."""
        for b in self.state.plan.blobs.values():
            if b._data is not None and b._data.grad_fn is not None:
                b._data = b._data.detach()
            b._grad_tensor = None

    def _capture(self, rec: _Recording, kind: str, key) -> None:
        st = self.state
        blobs = st.plan.blobs
        train = kind == "train"
        rec.clear()  # the previous graph's tensors go before the new capture allocates its own
        self._release_autograd_graph()
        st.prepare_inputs()  # the inputs' tensors and autograd flags again, after the detach
        rec.statics = [(blobs[t], blobs[t]._data) for t in self._input_names()]
        params = self._params() if train else []
        body = self._body(kind, params)

        def collect(result: tuple) -> list[torch.Tensor]:
            loss, grads, records = result
            tensors = [loss] if isinstance(loss, torch.Tensor) else []
            tensors += [g for g in grads if g is not None]
            tensors += [r[1] for r in records]
            tensors += [blobs[t]._data for t in self._captured_tops()]
            return tensors

        graph = self.graph_factory(st.device)
        try:
            loss, grads, records = graph.capture(body, collect)
        except Exception as e:
            raise NetError(
                f"{st.source}: capturing the {'training' if train else 'forward'} pass in a CUDA graph failed "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); run without CUDA graphs"
            ) from e
        rec.graph, rec.key = graph, key
        rec.loss = loss.detach() if isinstance(loss, torch.Tensor) else loss
        rec.params, rec.grads = params, grads
        rec.records = records
        rec.bound = [(blobs[t], blobs[t]._data, blobs[t]._grad_tensor) for t in self._captured_tops()]
        rec.overwrote = bool(st.overwritten)  # in-place layers wrote over blobs
        self.captures += 1

    def _body(self, kind: str, params: list) -> Callable[[], tuple]:
        """The pass a graph records (or that runs eagerly once for a new shape): the layers after
        the leading bottomless ones, in autocast as the eager pass under bf16/fp16; for training
        the loss and the backward into ``params``' diffs, which it hands over (set to None
        first). Returns ``(loss or None, gradients, label records)``."""
        st = self.state
        train = kind == "train"
        prefix, last = self.prefix, len(st.plan.steps) - 1
        low = autocast_dtype()

        def layers() -> torch.Tensor | float | None:
            if low is None:
                self.run_steps(prefix, last, overwrite=True)
                return st.loss() if train else None
            # as the eager pass (EagerRunner.train_pass); no cast cache in a graph
            with torch.autocast(st.device.type, dtype=low, cache_enabled=False):
                self.run_steps(prefix, last, overwrite=True)
                loss = st.loss() if train else None
            st.outputs_to_float32()
            return loss

        def body() -> tuple:
            for p in params:  # autograd hands its gradient tensors over, as after a clear
                _blob.diff_owner(p).replace(None)
            grad = torch.enable_grad() if train else torch.no_grad()
            with grad, self.label_checks(LabelChecks.DEFER) as records:
                loss = layers()
                if isinstance(loss, torch.Tensor) and loss.requires_grad and params:
                    torch.autograd.backward([loss], inputs=params)
            return loss, [p.grad for p in params], records

        return body

    def _captured_tops(self) -> list[str]:
        seen, out = set(), []
        for step in self.state.plan.steps[self.prefix :]:
            for t in step.tops:
                if t not in seen:
                    seen.add(t)
                    out.append(t)
        return out


#: the name before the runners (session 10)
GraphedPass = GraphRunner


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
