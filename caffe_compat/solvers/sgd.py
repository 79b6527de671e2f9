"""Caffe's SGD solver (BVLC/caffe src/caffe/solvers/sgd_solver.cpp ComputeUpdateValue)."""

from __future__ import annotations

import torch

from caffe_compat.solvers.base import Solver, register_solver
from caffe_compat.solvers.validate import check_range

__all__ = ["SGDSolver"]


@register_solver("SGD")
class SGDSolver(Solver):
    """Stochastic gradient descent with momentum, Caffe's form::

        V <- momentum * V + local_rate * g          (history: V, one blob per parameter)
        W <- W - V

    ``local_rate = rate * lr_mult``; ``g`` is the diff after clipping, 1/iter_size and weight
    decay (see :class:`~caffe_compat.solvers.base.Solver`). Parameters: ``momentum`` (0; in
    [0, 1), a limit Caffe does not check).

    Difference from ``torch.optim.SGD`` (which keeps ``buf = m * buf + g`` and steps
    ``lr * buf``): Caffe's history holds the learning rate, so at a ``step``/``multistep``
    change the old momentum keeps its old rate. This is Caffe's form.

    The update value is ``V`` itself, so the diff becomes an alias of the history instead of a
    copy (``diff_is_history``), and the update engine may run this rule through its momentum-SGD
    paths (foreach operations, torch's fused SGD kernel, the opt-in compiled kernel: see
    ``caffe_compat.solvers.update_engine``), all giving these operations' float32 values except
    the compiled one.
    """

    diff_is_history = True
    momentum_sgd_rule = True

    def check_param(self) -> None:
        super().check_param()
        check_range(self.param, self.source, "momentum", 0, 1, high_open=True)

    def update_history(self, i: int, g: torch.Tensor, hist: list[torch.Tensor], local_rate: float) -> None:
        hist[0].mul_(float(self.param.momentum)).add_(g, alpha=local_rate)
