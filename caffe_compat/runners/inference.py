"""The inference runner: whole forward passes of a net that computes no gradient, on the CPU.

A deploy net (no loss, no ``force_backward``: Caffe's rules backpropagate nothing) is what a user
runs to classify or detect, batch after batch. For it the eager loop does work that only
training needs, and calls torch's convolution in the layout-neutral way, which reorders the
weights into oneDNN's blocked format at every call and the activations into and out of it at
every layer. This runner executes such passes as an *inference program* instead:

- each 2-D ``Convolution`` runs as oneDNN's convolution on weights packed once per input shape
  (``torch.ops.mkldnn._convolution_pointwise`` on a weight from ``_reorder_convolution_weight``;
  packed again when a parameter's values change), and its top stays in channels-last layout for
  the layers that take any layout (``Layer.layout_neutral``); the others get a contiguous copy;
- the in-place layers that follow a convolution on its own top and are a per-channel affine map
  (``Layer.channel_affine``: BatchNorm with global statistics, a learned Scale) or an activation
  oneDNN applies after it (``Layer.fused_activation``: ReLU) are folded into it: the affine maps
  into its weights and bias (computed in float64, rounded once to float32), the activation as
  oneDNN's post-op.
  Only the final value of an in-place chain is a blob's value, in Caffe as here, so nothing a
  pycaffe script can read changes but rounding: the results agree with the layer-by-layer pass
  to float32 rounding (about 1e-6 relative), as a different convolution algorithm would.

Everything else is the eager runner: partial passes (``start``/``end``), passes under autograd
of nets that backpropagate, other devices and dtypes, autocast, per-module hooks, and nets with
no convolution to pack. Blobs left in channels-last layout are read by pycaffe as C-contiguous
arrays (``Blob.data`` copies once) and by the eager loop as contiguous tensors.
"""

from __future__ import annotations

import torch
from torch.nn.modules import module as _module_mod

from caffe_compat.blob import data_generation, values_watched
from caffe_compat.errors import CaffeError
from caffe_compat.layers.conv import ConvolutionLayer
from caffe_compat.layers.python import PythonLayerError
from caffe_compat.runners.eager import EagerRunner

__all__ = ["InferenceRunner", "ConvKernel", "build_program"]

_CL = torch.channels_last


def _mkldnn_ready() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class ConvKernel:
    """A convolution step with the in-place BatchNorm/Scale/ReLU steps folded into it."""

    def __init__(self, step, folded: list):
        self.step = step
        self.layer: ConvolutionLayer = step.layer
        self.folded = folded  # the absorbed steps, in net order (affine maps, then an activation)
        post = [a for a in (s.layer.fused_activation() for s in folded) if a is not None]
        self.attr, self.scalars = post[0] if post else ("none", [None])
        self._params = [p for s in [step, *folded] for p in s.layer.blobs]
        layer = self.layer
        self._geometry = (list(layer.pad), list(layer.stride), list(layer.dilation), layer.group)
        self._layers = [s.layer for s in [step, *folded]]
        self._key = None
        self._packed = None
        self._overhangs = False  # for the packed shape: Caffe's overhanging last window
        self._viewed: list = []  # per parameter: the values packed, where ``values_watched``

    def _fold(self):
        """Weights and bias with the absorbed BatchNorm/Scale applied (float64, then float32)."""
        layer = self.layer
        w = layer.blobs[0].detach()
        bias = layer.blobs[1].detach() if layer.bias_term else None
        maps = [m for m in (s.layer.channel_affine() for s in self.folded) if m is not None]
        if not maps:
            return w, bias
        a = torch.ones(layer.num_output, dtype=torch.float64)
        c = bias.double() if bias is not None else torch.zeros(layer.num_output, dtype=torch.float64)
        for scale, shift in maps:  # y = scale·(a·conv + c) + shift
            a, c = a * scale, c * scale + shift
        w = (w.double() * a.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
        return w, c.to(w.dtype)

    def _key_of(self, shape: tuple) -> tuple:
        # oneDNN picks the packed layout for the input shape and the thread count: packed for
        # another count, every call would reorder the weights again (about 9x slower)
        return (
            shape,
            torch.get_num_threads(),
            *[(p._version, p.data_ptr(), data_generation(p)) for p in self._params],
        )

    def _current(self, key: tuple) -> bool:
        """Whether the packed weights were made for this ``_key_of`` (input shape, thread count,
        the parameters' version counters: torch's in-place writes, the solvers' updates, loading
        weights; how often ``.data`` was handed out) and, for parameters that writes moving no
        counter can reach (``values_watched``: a NumPy view from pycaffe, a live tensor from
        ``param.data``), from the values they hold now."""
        if key != self._key:
            return False
        for i, (p, kept) in enumerate(zip(self._params, self._viewed)):
            watched = values_watched(p)
            if kept is None:
                if watched:
                    return False  # watched since the packing: the values are not known
                continue
            if not torch.equal(p.detach(), kept):
                return False
            if not watched:
                self._viewed[i] = None  # the last such view is gone, the values are the packed ones
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        key = self._key_of(shape)
        if not self._current(key):
            w, b = self._fold()
            pad, stride, dilation, group = self._geometry
            packed = torch.ops.mkldnn._reorder_convolution_weight(w, pad, stride, dilation, group, list(shape))
            self._key = key
            self._viewed = [p.detach().clone() if values_watched(p) else None for p in self._params]
            self._packed = (packed, b)
            self._overhangs = any(self.layer.tail_pads(shape[2:]))
        if self._overhangs or any(m.hooked for m in self._layers):
            # Caffe's overhanging last window, or a hooked module: the layers one by one
            y = self.layer(x.contiguous())[0]
            for layer in self._layers[1:]:
                y = layer(y)[0]
            return y
        packed, b = self._packed
        if not x.is_contiguous(memory_format=_CL):
            x = x.contiguous(memory_format=_CL)
        pad, stride, dilation, group = self._geometry
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed, b, pad, stride, dilation, group, self.attr, self.scalars, ""
        )


def _packable(step) -> bool:
    layer = step.layer
    return (
        isinstance(layer, ConvolutionLayer)
        and layer.num_spatial == 2
        and layer.axis == 1
        and len(step.bottoms) == 1
        and len(step.tops) == 1
        and not step.is_input
    )


def _foldable(step, conv, activated: bool) -> bool:
    """Whether ``step`` works in place on the top of ``conv`` (a convolution step) and is a
    per-channel affine map of its channels or an activation that the convolution can absorb
    after what it absorbed so far (nothing after an activation)."""
    top = conv.tops[0]
    if step.bottoms != [top] or step.tops != [top] or activated:
        return False
    layer = step.layer
    if layer.fused_activation() is not None:
        return True
    affine = layer.channel_affine()
    return affine is not None and tuple(affine[0].shape) == (conv.layer.num_output,)


#: A program entry: run the layer's ``forward_inplace`` (its bottom is a tensor this pass made).
IN_PLACE = "in place"


def build_program(plan) -> list | None:
    """The inference program of a plan: per step index, a ``ConvKernel``, ``None`` (run the
    layer), ``IN_PLACE`` (run it in place) or ``False`` (nothing to run: a net input, or a step
    folded into the kernel before it). None when the plan backpropagates somewhere or has
    nothing to pack.

    A layer that can work in place on its bottom (``Layer.forward_inplace``, ReLU) does so when
    the eager loop would in a pass without autograd: the bottom's tensor was made in this pass
    by a kernel or a layer whose top is a new tensor (``Layer.top_overwritable``), and nothing
    overwrote it since."""
    steps = plan.steps
    if any(s.need_backward for s in steps):
        return None
    program: list = [None] * len(steps)
    i = 0
    kernels = 0
    while i < len(steps):
        step = steps[i]
        if step.is_input:
            program[i] = False
            i += 1
        elif _packable(step):
            folded = []
            j = i + 1
            while j < len(steps) and _foldable(steps[j], step, any(s.layer.fused_activation() for s in folded)):
                folded.append(steps[j])
                j += 1
            program[i] = ConvKernel(step, folded)
            kernels += 1
            for k in range(i + 1, j):
                program[k] = False
            i = j
        else:
            i += 1
    if not kernels:
        return None
    fresh: set[str] = set()  # blobs holding a tensor this pass made, not overwritten since
    for step, op in zip(steps, program):
        if op is False:
            continue
        if isinstance(op, ConvKernel):
            fresh.add(step.tops[0])
        elif step.can_inplace and step.bottoms[0] in fresh:
            program[step.index] = IN_PLACE
            fresh.discard(step.bottoms[0])
        else:
            for top, inplace in zip(step.tops, step.inplace):
                if step.overwritable and not inplace:
                    fresh.add(top)
                else:
                    fresh.discard(top)
    return program


class InferenceRunner(EagerRunner):
    """Eager, with whole no-gradient CPU float32 passes run as an inference program (see the
    module's doc)."""

    kind = "eager"
    #: ``Net.use_inference_program``
    program_enabled = True

    def __init__(self, state):
        super().__init__(state)
        self._program: list | None | bool = False  # False: not built yet

    def program(self) -> list | None:
        if self._program is False:
            self._program = build_program(self.state.plan) if _mkldnn_ready() else None
        return self._program

    def applies(self) -> bool:
        """Whether a whole forward now runs as the inference program."""
        st = self.state
        return (
            self.program_enabled
            and st.device.type == "cpu"
            and st.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not (_module_mod._global_forward_hooks or _module_mod._global_forward_pre_hooks)
            and self.program() is not None
        )

    def forward(self, start: int, end: int) -> None:
        st = self.state
        if start != 0 or end != len(st.plan.steps) - 1 or not self.applies():
            super().forward(start, end)
            return
        st.channels_last = []  # this pass recomputes them
        st.prepare_inputs(whole=True)
        st.overwritten = False
        with torch.no_grad():
            self._run_program(self.program())
        st.channels_last = [b for b in st.plan.blobs.values() if b._data is not None and not b._data.is_contiguous()]

    def _run_program(self, program: list) -> None:
        st = self.state
        for step, op in zip(st.plan.steps, program):
            if op is False:
                continue
            layer = step.layer
            neutral = op is not None or layer.layout_neutral  # (a kernel takes channels-last)
            bottoms = []
            for blob in step.bottom_blobs:
                t = blob._data
                if t is None or t.shape != blob._shape:
                    t = blob.tensor
                if not neutral and not t.is_contiguous():
                    t = t.contiguous()
                bottoms.append(t)
            try:
                if op is None or op is IN_PLACE:
                    if layer.hooked:
                        tops = layer(*bottoms)
                    else:
                        tops = layer.forward(*bottoms) if op is None else layer.forward_inplace(*bottoms)
                else:
                    tops = (op(bottoms[0]),)  # a ConvKernel
            except PythonLayerError:
                raise
            except Exception as e:
                raise st.forward_error(step, bottoms, e) from (None if isinstance(e, CaffeError) else e)
            for blob, top in zip(step.top_blobs, tops):
                if top.dtype is not torch.float32 and top.is_floating_point():
                    top = top.float()  # as the eager loop: float tops in the net's dtype
                blob._data = top
                if top.shape != blob._shape:
                    blob._shape = tuple(top.shape)
