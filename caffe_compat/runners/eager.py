"""The eager runner: Caffe's ``ForwardFromTo`` / ``BackwardFromTo``, one layer after another.

Forward runs each step's layer on torch tensors (recording autograd's graph when grad mode is
on). Bottoms Caffe would not backpropagate to are detached, so that the same diffs come out.
In passes that compute no blob diffs (``forward_backward``, or no autograd), an in-place layer
that can (``Layer.forward_inplace``, ReLU) writes into its bottom's tensor when the layer that
made it does not read its top in backward (``Layer.top_overwritable``).

Backward (pycaffe's ``net.backward``) reads the blobs: over the whole net, when the last whole
forward's autograd graph still describes them (the *tape*), one autograd call from the outputs
seeded with their diffs; otherwise, or over a ``start``/``end`` range, each layer from ``start``
down to ``end`` recomputed from its bottoms' current data (``Layer.recompute``) and
differentiated against its tops' current diffs, as each Caffe layer's ``Backward`` reads its
blobs.
"""

from __future__ import annotations

import torch
from torch.nn.modules import module as _module_mod

from caffe_compat import blob as _blob
from caffe_compat.errors import CaffeError, LayerError
from caffe_compat.layers.base import LabelChecks
from caffe_compat.layers.python import PythonLayerError
from caffe_compat.mode import autocast_dtype
from caffe_compat.runners.base import LOW_PRECISION, PendingLoss, Runner

__all__ = ["EagerRunner", "add_param_grads"]

_CL = torch.channels_last


def add_param_grads(params: list, grads) -> None:
    """Add each gradient into its parameter's diff (Caffe accumulates parameter diffs)."""
    for p, g in zip(params, grads):
        if g is not None:
            _blob.diff_owner(p).accumulate(g)


class _Normalized:
    """What an in-place Scale step read in a pass where its BatchNorm applied it
    (``Layer.forward_with_affine``): the BatchNorm's output, recomputed from its bottom when a
    layer-wise backward asks for it."""

    def __init__(self, layer, x: torch.Tensor):
        self.layer, self.x = layer, x

    def value(self) -> list:
        with torch.no_grad():
            return [self.layer.recompute([self.x], [])[0]]


def affine_partners(plan) -> dict[int, int]:
    """Step index -> the index of the next step, where the next one is a per-channel affine
    layer with learned parameters (``Layer.channel_params``) working in place on the top of a
    one-bottom, one-top layer that can apply it itself (``Layer.forward_with_affine``): Caffe's
    ``BatchNorm`` + ``Scale`` pairs."""
    steps = plan.steps
    partners = {}
    for step, nxt in zip(steps, steps[1:]):
        if (
            step.layer.has_forward_with_affine
            and len(step.bottoms) == 1
            and len(step.tops) == 1
            and nxt.bottoms == nxt.tops == step.tops
            and nxt.layer.channel_params() is not None
        ):
            partners[step.index] = nxt.index
    return partners


class EagerRunner(Runner):
    """Layer by layer (see the module's doc)."""

    kind = "eager"
    #: call ``before_step``/``after_step`` around each layer (``DebugRunner``)
    observes = False
    #: in passes that need no blob diffs, a layer applies the in-place per-channel affine layer
    #: after it itself (``affine_partners``); not where the loop is traced or recorded
    fuses_affine = True
    #: in CPU float32 training passes, the layers that want channels-last bottoms get them
    #: (``Layer.wants_channels_last``, the convolutions) and the layers that take them
    #: (``accepts_channels_last``, ``layout_neutral``) keep them; not where the loop is traced
    trains_channels_last = True
    _partners: dict[int, int] | None = None
    _layouts: list | None = None

    def layouts(self) -> list:
        """Per step: 1 if its layer wants channels-last 4-D bottoms, 0 if it takes them, -1 if
        it needs them contiguous."""
        if self._layouts is None:
            self._layouts = [
                1
                if s.layer.wants_channels_last
                else 0
                if s.layer.accepts_channels_last or s.layer.layout_neutral
                else -1
                for s in self.state.plan.steps
            ]
        return self._layouts

    def partners(self) -> dict[int, int]:
        """``affine_partners`` of the plan, computed once."""
        if self._partners is None:
            self._partners = affine_partners(self.state.plan)
        return self._partners

    # -- forward ------------------------------------------------------------------------------

    def forward(self, start: int, end: int) -> None:
        st = self.state
        last = len(st.plan.steps) - 1
        st.prepare_inputs(whole=start == 0 and end == last)
        st.overwritten = False
        self.run_steps(start, end)
        if torch.is_grad_enabled() and start == 0 and end == last:
            st.keep_tape()

    def before_step(self, li: int) -> None:
        """Called before step ``li`` runs (only when ``observes``)."""

    def after_step(self, li: int, bottoms: list) -> None:
        """Called after step ``li`` has set its tops (only when ``observes``)."""

    def run_steps(self, start: int, end: int, caffe_grads: bool = True, overwrite: bool = False) -> None:
        """Run steps ``start``..``end`` (the hot loop). ``overwrite``: in-place layers may write
        into tensors this pass made (see the module's doc); always so without autograd.
        ``caffe_grads``: detach the bottoms Caffe does not backpropagate to (else torch's rules:
        only ``propagate_down: false`` and loss labels are cut)."""
        st = self.state
        grad_on = torch.is_grad_enabled()
        overwrite = overwrite or not grad_on
        dev, dtype = st.device, st.dtype
        # autocast's bf16/fp16 tops stay so (autocast exists for CPU and CUDA devices only)
        low = dev.type in ("cpu", "cuda") and torch.is_autocast_enabled(dev.type)
        fresh: set[str] = set()  # blobs whose tensor a top_overwritable layer made in this pass
        # Module.__call__ only when someone hooked a module: otherwise forward directly (cheaper)
        hooked = bool(_module_mod._global_forward_hooks or _module_mod._global_forward_pre_hooks)
        overwrote = False
        observes = self.observes
        steps = st.plan.steps
        keep_inplace = st.inplace_inputs
        witness = st.witness  # a training pass's InnerProduct bounds (runners.grad_witness)
        watch = witness.watch if witness.recording else None
        partners = self.partners() if overwrite and self.fuses_affine and not (observes or hooked or low) else {}
        layouts = self.layouts()
        # a training pass on the CPU in float32: the convolutions' bottoms in channels-last layout
        to_cl = grad_on and overwrite and self.trains_channels_last and dev.type == "cpu" and dtype is torch.float32
        to_cl = to_cl and not low
        applied = -1  # the index of a step its predecessor applied
        for li in range(start, end + 1):
            if li == applied:
                continue
            step = steps[li]
            if observes:
                self.before_step(li)
            if step.is_input:  # a net input: set by the caller
                if observes:
                    self.after_step(li, [])
                continue
            layer = step.layer
            bottoms = []
            detached = False
            for j, blob in enumerate(step.bottom_blobs):
                t = blob._data
                if t is None or t.shape != blob._shape:  # Blob.tensor's check, inlined (hot loop)
                    t = blob.tensor
                if grad_on and t.requires_grad:
                    if caffe_grads:
                        if not step.grad_bottoms[j]:
                            t = t.detach()
                            detached = True
                    elif (len(layer.param.propagate_down) and not layer.param.propagate_down[j]) or (
                        not layer.allow_force_backward(j)
                    ):
                        t = t.detach()
                        detached = True
                if t.dim() == 4:
                    layout = layouts[li]
                    if layout > 0 and to_cl:
                        t = t.contiguous(memory_format=_CL)
                    elif layout < 0 and not t.is_contiguous() and t.is_contiguous(memory_format=_CL):
                        t = t.contiguous()  # (other strides, e.g. a Slice's view, as they were)
                bottoms.append(t)
            if step.any_inplace:  # what Caffe's in-place layers keep of their bottom for backward
                keep_inplace[li] = bottoms
            inplace = overwrite and step.can_inplace and not detached and step.bottoms[0] in fresh
            overwritable = overwrite and step.overwritable
            partner = partners.get(li)
            affine = None
            if partner is not None and partner <= end:
                nxt = steps[partner]
                if not (grad_on and caffe_grads and not nxt.grad_bottoms[0] or layer.hooked or nxt.layer.hooked):
                    affine = nxt.layer.channel_params()
            try:
                if affine is not None:
                    tops = layer.forward_with_affine(bottoms[0], *affine)
                elif inplace:
                    fresh.discard(step.bottoms[0])
                    overwrote = overwrote or grad_on
                    tops = layer.forward_inplace(*bottoms)
                elif hooked or layer.hooked:
                    tops = layer(*bottoms)
                else:
                    tops = layer.forward(*bottoms)
            except PythonLayerError:  # the user's own exception: its type, args and traceback kept
                raise
            except Exception as e:
                raise st.forward_error(step, bottoms, e) from (None if isinstance(e, CaffeError) else e)
            tnames, inplace_tops = step.tops, step.inplace
            for j, blob in enumerate(step.top_blobs):
                top = tops[j]
                if top.device != dev or (
                    top.dtype is not dtype and top.is_floating_point() and not (low and top.dtype in LOW_PRECISION)
                ):
                    # data layers produce their batches on the CPU, in float32
                    top = top.to(dev, dtype, non_blocking=True)
                    tops = (*tops[:j], top, *tops[j + 1 :])
                blob._data = top  # Blob.set_tensor, inlined (hot loop)
                if top.shape != blob._shape:
                    blob._shape = tuple(top.shape)
                if inplace_tops[j]:
                    fresh.discard(tnames[j])
                else:
                    blob._grad_tensor = top
                    if overwritable:
                        fresh.add(tnames[j])
                    else:
                        fresh.discard(tnames[j])
            if affine is not None:  # the partner's step is done: what it read, and a new top
                applied = partner
                keep_inplace[partner] = _Normalized(layer, bottoms[0])
                fresh.add(tnames[0])  # (batch_norm's backward does not read its output)
            if watch is not None and li in watch:
                witness.forward(step, bottoms[0], tops[0])
            if observes:
                self.after_step(li, bottoms)
        if overwrote:
            st.overwritten = True

    # -- a solver's pass ------------------------------------------------------------------------

    def forward_loss(self) -> torch.Tensor | float:
        """The whole forward of a training pass (in-place layers overwriting), its loss."""
        st = self.state
        st.prepare_inputs()
        st.overwritten = False
        self.run_steps(0, len(st.plan.steps) - 1, overwrite=True)
        return st.loss()

    def train_pass(self, loss_scale: float = 1.0) -> PendingLoss:
        """Caffe's ForwardBackward: the loss, and its gradients added into the learnable
        parameters' diffs (handed over as they are after a clear). Under bf16/fp16 precision the
        forward runs in ``torch.autocast``; ``loss_scale`` scales what is backpropagated. The
        pass records its gradient witnesses (``caffe_compat.runners.grad_witness``)."""
        st = self.state
        low = autocast_dtype()
        # on a GPU the loss layers' label checks are read back with the loss (one synchronisation
        # per pass, at its end, made by PendingLoss.value())
        with (
            torch.enable_grad(),
            self.label_checks(self.train_label_checks()) as checks,
            st.witness.training_pass(st.diffs_cleared),
        ):
            if low is None:
                loss = self.forward_loss()
            else:
                with torch.autocast(st.device.type, dtype=low):
                    loss = self.forward_loss()
                st.outputs_to_float32()
            params = [lp.param for lp in st.plan.learnable if lp.param.requires_grad]
            if isinstance(loss, torch.Tensor) and loss.requires_grad and params:
                for p in params:  # autograd adds into the diffs in place, or hands its tensors over
                    _blob.diff_owner(p).prepare_accumulation(st.diffs_cleared)
                scaled = loss * loss_scale if loss_scale != 1.0 else loss
                self.backward_loss(scaled, params)
        st.fill_missing_diffs()
        st.diffs_cleared = False
        return PendingLoss(st, loss, self.collected_checks(checks))

    def train_label_checks(self) -> LabelChecks:
        """How the label-checking layers check in a training pass: deferred to the loss's read
        on a GPU."""
        return LabelChecks.DEFER

    def collected_checks(self, checks: list) -> list:
        """The label records a training pass leaves for ``PendingLoss`` to verify."""
        return checks

    def backward_loss(self, loss: torch.Tensor, params: list) -> None:
        """A training pass's backward into ``params``' diffs."""
        torch.autograd.backward([loss], inputs=params)

    # -- pycaffe's backward ---------------------------------------------------------------------

    def backward(self, start: int, end: int, whole: bool) -> None:
        """Caffe's BackwardFromTo over the blobs (see the module's doc)."""
        st = self.state
        mirrored = _blob.uses_host_mirror(st.device) and _blob.host_copies_out()
        if mirrored:
            _blob.sync_host_copies("diff")
        if whole and st.tape_usable():
            self.backward_on_tape()
            return
        if mirrored:  # (data written on the host since: the graph, which keeps it, is not used)
            _blob.sync_host_copies("data")
        with torch.enable_grad():
            for li in range(start, end - 1, -1):
                step = st.plan.steps[li]
                if step.need_backward and not step.is_input:
                    self.backward_step(step)

    def backward_on_tape(self) -> None:
        """The whole backward as one autograd call over the last forward's graph, seeded with the
        outputs' diffs (the loss weight for loss blobs)."""
        st = self.state
        blobs = st.plan.blobs
        root_names = [o for o in st.plan.outputs if st.force_backward or blobs[o].loss_weight]
        # loss-weighted tops consumed by later layers (rare: Split takes them otherwise)
        root_names += [b for b, blob in blobs.items() if blob.loss_weight and b not in root_names]
        roots, grads = [], []
        for b in root_names:
            t = blobs[b]._data
            if t is not None and t.requires_grad:
                roots.append(t)
                grads.append(blobs[b].diff_tensor.to(t.dtype))
        targets, target_blobs = [], []
        for blob in blobs.values():
            gt = blob._grad_tensor
            if gt is not None and gt.requires_grad:
                targets.append(gt)
                target_blobs.append(blob)
        params = [lp.param for lp in st.plan.learnable if lp.param.requires_grad]
        if not roots or not (targets or params):
            return
        gs = torch.autograd.grad(roots, targets + params, grads, allow_unused=True, retain_graph=True)
        for blob, g in zip(target_blobs, gs[: len(targets)]):
            if g is not None:
                blob.set_diff(g)
        add_param_grads(params, gs[len(targets) :])

    def backward_step(self, step) -> None:
        """One layer's backward from the blobs: its forward recomputed from its bottoms' data,
        differentiated against its tops' diffs; bottom diffs set, parameter diffs added."""
        st = self.state
        layer, want = step.layer, step.grad_bottoms
        params = [p for p in layer.blobs if p.requires_grad]
        if not any(want) and not params:
            return
        kept = st.inplace_inputs.get(step.index) if step.any_inplace else None
        if isinstance(kept, _Normalized):
            kept = st.inplace_inputs[step.index] = kept.value()
        bottoms = []
        for j, blob in enumerate(step.bottom_blobs):
            x = None
            if kept is not None and step.bottoms[j] in step.tops and tuple(kept[j].shape) == blob.shape:
                x = kept[j]  # Caffe's in-place layers keep what they read (BatchNorm, Scale)
            x = (x if x is not None else blob.current()).detach()
            bottoms.append(x.requires_grad_() if want[j] else x)
        top_diffs = [b.diff_tensor for b in step.top_blobs]
        try:
            tops = layer.recompute(bottoms, [b.current().detach() for b in step.top_blobs])
        except PythonLayerError:
            raise
        except CaffeError as e:
            raise st.readable_error(e) from None
        except Exception as e:
            raise LayerError(f"{e} (while running layer {step.name!r} ({layer.type}) backward)") from e
        roots, seeds = [], []
        for t, d in zip(tops, top_diffs):
            if t.requires_grad:
                roots.append(t)
                seeds.append(d.to(t.dtype))
        targets = [x for x, w in zip(bottoms, want) if w] + params
        gs = torch.autograd.grad(roots, targets, seeds, allow_unused=True) if roots else [None] * len(targets)
        k = 0
        for j, blob in enumerate(step.bottom_blobs):
            if want[j]:
                g = gs[k]
                k += 1
                blob.set_diff(g if g is not None else torch.zeros(blob.shape, dtype=blob._dtype, device=st.device))
        add_param_grads(params, gs[k:])

    # -- torch users ----------------------------------------------------------------------------

    def run_differentiable(self) -> None:
        """The whole net with torch's gradient rules (``Net.run``: inputs already set)."""
        self.run_steps(0, len(self.state.plan.steps) - 1, caffe_grads=False)
