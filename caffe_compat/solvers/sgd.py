"""Caffe's SGD solver (BVLC/caffe src/caffe/solvers/sgd_solver.cpp ComputeUpdateValue)."""

from __future__ import annotations

from caffe_compat.solvers.base import Solver, register_solver

__all__ = ["SGDSolver"]


@register_solver("SGD")
class SGDSolver(Solver):
    """Stochastic gradient descent with momentum, Caffe's form::

        V <- momentum * V + local_rate * g          (history: V, one blob per parameter)
        W <- W - V

    ``local_rate = rate * lr_mult``; ``g`` is the diff after clipping, 1/iter_size and weight
    decay (see :class:`~caffe_compat.solvers.base.Solver`). Parameters: ``momentum`` (0).

    Difference from ``torch.optim.SGD`` (which keeps ``buf = m * buf + g`` and steps
    ``lr * buf``): Caffe's history holds the learning rate, so at a ``step``/``multistep``
    change the old momentum keeps its old rate. This is Caffe's form.
    """

    def compute_update_value(self, i: int, rate: float) -> None:
        g = self.net.learnable_params[i].grad
        v = self.history[i]
        v.mul_(float(self.param.momentum)).add_(g, alpha=self.local_rate(i, rate))
        g.copy_(v)
