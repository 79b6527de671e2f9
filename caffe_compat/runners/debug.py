"""The observed runner: the eager loop with pycaffe's per-layer callbacks and Caffe's
``debug_info`` (BVLC/caffe src/caffe/net.cpp ``ForwardDebugInfo``, ``BackwardDebugInfo``,
``UpdateDebugInfo``'s all-parameters line).

A net uses it while it has ``before_forward``/``after_forward`` callbacks or ``debug_info`` is on:

- forward: ``before(i)`` / ``after(i)`` around each layer (inputs included, as Caffe calls them
  for its Input layers); with ``debug_info`` each layer's mean |top data| and |param data|;
- a training pass keeps every layer's own bottom tensors (no in-place overwriting) so that its
  backward can log the mean |bottom diff| of each layer, from the last to the first, and the
  mean |param diff|; then the L1/L2 norms of all learnable parameters' data and diffs.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from caffe_compat.blob import diff_owner
from caffe_compat.logfmt import fmt
from caffe_compat.runners.eager import EagerRunner

__all__ = ["DebugRunner", "abs_mean"]

log = logging.getLogger("caffe_compat")


def abs_mean(t) -> np.float32:
    """Caffe's ``asum / count`` of a blob's data or diff, in float32."""
    if t is None or t.numel() == 0:
        return np.float32(0)
    t = t.detach()
    return np.float32(np.float32(t.abs().sum(dtype=torch.float32).item()) / np.float32(t.numel()))


class DebugRunner(EagerRunner):
    """Eager, observed (see the module's doc)."""

    kind = "debug"
    observes = True

    def __init__(self, state):
        super().__init__(state)
        self._bottoms: dict[int, list] | None = None  # each layer's bottoms in the last forward

    def run_steps(self, start: int, end: int, caffe_grads: bool = True, overwrite: bool = False) -> None:
        if self.state.debug_info:
            self._bottoms = {}
        super().run_steps(start, end, caffe_grads, overwrite)

    def before_step(self, li: int) -> None:
        for fn in self.state.before:
            fn(li)

    def after_step(self, li: int, bottoms: list) -> None:
        st = self.state
        if st.debug_info:
            self._bottoms[li] = bottoms
            self._log_forward(li)
        for fn in st.after:
            fn(li)

    def forward_loss(self) -> torch.Tensor | float:
        st = self.state
        st.prepare_inputs()
        st.overwritten = False
        # debug_info logs each layer's bottom diff: every layer keeps its own bottom tensor
        self.run_steps(0, len(st.plan.steps) - 1, overwrite=not st.debug_info)
        return st.loss()

    def train_pass(self, loss_scale: float = 1.0):
        pending = super().train_pass(loss_scale)
        if self.state.debug_info:
            self._log_all_params()
        return pending

    def backward_loss(self, loss: torch.Tensor, params: list) -> None:
        if not self.state.debug_info or self._bottoms is None:
            super().backward_loss(loss, params)
            return
        self._backward_logged(loss, params)

    # -- the logs -------------------------------------------------------------------------------

    def _log_forward(self, li: int) -> None:
        """Caffe's ForwardDebugInfo: mean |value| of each top, then of each parameter blob."""
        step = self.state.plan.steps[li]
        for b, blob in zip(step.tops, step.top_blobs):
            log.info("    [Forward] Layer %s, top blob %s data: %s", step.name, b, fmt(abs_mean(blob._data)))
        for k, p in enumerate(step.layer.blobs):
            log.info(
                "    [Forward] Layer %s, param blob %s data: %s", step.name, _param_name(step, k), fmt(abs_mean(p))
            )

    def _backward_logged(self, loss: torch.Tensor, params: list) -> None:
        """The backward of a training pass, logging Caffe's BackwardDebugInfo for each layer from
        the last to the first: the mean |diff| of every bottom it backpropagates to (the gradient
        of the tensor that layer read, so in-place chains show each step) and of each parameter
        it learns. The parameter gradients go to the diffs as in the plain backward."""
        steps = self.state.plan.steps
        bottoms, where = [], []
        for li, ts in self._bottoms.items():
            step = steps[li]
            for j, t in enumerate(ts):
                if step.need_backward and step.bottom_need_backward[j] and t.requires_grad:
                    where.append((li, j, len(bottoms)))
                    bottoms.append(t)
        grads = torch.autograd.grad([loss], bottoms + params, allow_unused=True)
        for p, g in zip(params, grads[len(bottoms) :]):
            if g is not None:
                diff_owner(p).accumulate(g, take=True)
        diff_of = {(li, j): grads[i] for li, j, i in where}
        for step in reversed(steps):
            if step.need_backward and step.index in self._bottoms:
                self._log_backward(step, diff_of)

    @staticmethod
    def _log_backward(step, diff_of: dict) -> None:
        for j, b in enumerate(step.bottoms):
            if step.bottom_need_backward[j]:
                g = diff_of.get((step.index, j))
                mean = abs_mean(g) if g is not None else 0.0
                log.info("    [Backward] Layer %s, bottom blob %s diff: %s", step.name, b, fmt(mean))
        for k, p in enumerate(step.layer.blobs):
            if step.layer.blobs_have_gradient and step.params[k].need_backward:
                mean = abs_mean(p.grad) if p.grad is not None else 0.0
                log.info("    [Backward] Layer %s, param blob %d diff: %s", step.name, k, fmt(mean))

    def _log_all_params(self) -> None:
        """Caffe's Backward(): L1 and L2 norms of all learnable parameters' data and diffs."""
        f32 = np.float32
        asum_data = asum_diff = sumsq_data = sumsq_diff = f32(0)
        for lp in self.state.plan.learnable:
            d = lp.param.detach().float()
            g = lp.param.grad.detach().float() if lp.param.grad is not None else torch.zeros_like(d)
            asum_data = f32(asum_data + f32(d.abs().sum().item()))
            asum_diff = f32(asum_diff + f32(g.abs().sum().item()))
            sumsq_data = f32(sumsq_data + f32((d * d).sum().item()))
            sumsq_diff = f32(sumsq_diff + f32((g * g).sum().item()))
        log.error(
            "    [Backward] All net params (data, diff): L1 norm = (%s, %s); L2 norm = (%s, %s)",
            fmt(asum_data),
            fmt(asum_diff),
            fmt(np.sqrt(sumsq_data)),
            fmt(np.sqrt(sumsq_diff)),
        )


def _param_name(step, k: int) -> str:
    specs = step.layer.param.param
    return specs[k].name if k < len(specs) and specs[k].name else str(k)
