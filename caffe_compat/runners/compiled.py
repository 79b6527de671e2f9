"""The compiled runner (opt-in, ``Net.compile``): the net's computing layers as one
``torch.compile``'d function of their input blobs.

Used for a solver's training pass and for pycaffe's whole ``forward()`` without autograd; other
passes (``start``/``end``, ``backward()``'s recomputation, ``run``) go layer by layer. Layers
without bottoms (data layers, Input) run eagerly first; every blob is still set after the pass.
The loss layers' label checks cannot read the host inside the graph: the runner hands them
``LabelChecks.TRACED`` for the compiled call, their ranges leave the graph as tensors and are
checked after it.
If compiling fails, a warning is logged, the pass finishes eagerly and the runner stays eager.
"""

from __future__ import annotations

import logging

import torch

from caffe_compat.layers.base import LabelChecks
from caffe_compat.runners.eager import EagerRunner

__all__ = ["CompiledRunner"]

log = logging.getLogger("caffe_compat")


class CompiledRunner(EagerRunner):
    """``torch.compile`` of the computing layers (see the module's doc)."""

    fuses_affine = False  # (the loop is traced / captured: layer by layer)
    trains_channels_last = False

    kind = "compiled"

    def __init__(self, state, options: dict):
        super().__init__(state)
        self.options = dict(options)
        self.failed = False
        self._fn = None
        self._feeds: list[str] = []
        self._checks: list = []

    def forward(self, start: int, end: int) -> None:
        last = len(self.state.plan.steps) - 1
        if self.failed or torch.is_grad_enabled() or (start, end) != (0, last):
            super().forward(start, end)
            return
        st = self.state
        st.prepare_inputs()
        st.overwritten = False
        self._run()
        checks, self._checks = self._checks, []
        if checks and st.device.type == "cuda":
            torch.cuda.current_stream(st.device).synchronize()
        st.verify_labels(checks)

    def forward_loss(self) -> torch.Tensor | float:
        if self.failed:
            return super().forward_loss()
        st = self.state
        st.prepare_inputs()
        st.overwritten = False
        self._run()
        return st.loss()

    def train_label_checks(self) -> LabelChecks:
        # the compiled call traces them (``_run``); layers that run eagerly because compiling
        # failed check at once
        return LabelChecks.NOW if not self.failed else super().train_label_checks()

    def collected_checks(self, checks: list) -> list:
        graph, self._checks = self._checks, []  # the ranges the graph computed
        return graph + checks

    # -- the compiled function --------------------------------------------------------------------

    def _first(self) -> int:
        steps = self.state.plan.steps
        k = 0
        while k < len(steps) and not steps[k].bottoms:
            k += 1
        return k

    def _layers(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        env = dict(feeds)
        grad_on = torch.is_grad_enabled()
        out = {}
        for step in self.state.plan.steps[self._first() :]:
            bottoms = []
            for j, b in enumerate(step.bottoms):
                t = env[b]
                bottoms.append(t.detach() if grad_on and not step.grad_bottoms[j] else t)
            tops = step.layer(*bottoms)
            for j, name in enumerate(step.tops):
                env[name] = out[name] = tops[j]
        return out

    def _run(self) -> None:
        """One pass through the compiled layers; if compiling fails, a warning, the rest of this
        pass eagerly and the runner eager from then on."""
        st = self.state
        steps = st.plan.steps
        k = self._first()
        if k:
            self.run_steps(0, k - 1, overwrite=True)
        if self._fn is None:
            made: set[str] = set()
            self._feeds = []
            for step in steps[k:]:
                self._feeds += [b for b in step.bottoms if b not in made and b not in self._feeds]
                made.update(step.tops)
            self._fn = torch.compile(self._layers, **self.options)
        feeds = {b: st.plan.blobs[b].tensor for b in self._feeds}
        try:
            with self.label_checks(LabelChecks.TRACED) as ranges:
                tops = self._fn(feeds)
        except Exception as e:  # noqa: BLE001  (any compiler failure: fall back to eager)
            log.warning("torch.compile of net %r failed (%s: %s); running it uncompiled", st.name, type(e).__name__, e)
            self.failed = True
            self._fn = None
            if k < len(steps):
                self.run_steps(k, len(steps) - 1, overwrite=True)
            return
        for name, t in tops.items():
            if t.device != st.device:  # pragma: no cover
                t = t.to(st.device)
            st.plan.blobs[name].set_tensor(t, t)
        if torch.is_grad_enabled():
            st.overwritten = True
        # the loss layers' label ranges, computed in the graph: copied to the host behind the pass
        self._checks = [
            (layer, values.to("cpu", non_blocking=True, copy=True), classes, ignore)
            for layer, values, classes, ignore in ranges
        ]
