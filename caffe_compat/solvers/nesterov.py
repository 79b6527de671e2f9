"""Caffe's Nesterov solver (BVLC/caffe src/caffe/solvers/nesterov_solver.cpp)."""

from __future__ import annotations

from caffe_compat.solvers.base import Solver, register_solver

__all__ = ["NesterovSolver"]


@register_solver("Nesterov")
class NesterovSolver(Solver):
    """Nesterov's accelerated gradient, Caffe's form::

        V_new <- momentum * V_old + local_rate * g
        W     <- W - ((1 + momentum) * V_new - momentum * V_old)

    ``local_rate = rate * lr_mult``; history: ``V``, one blob per parameter.
    Parameters: ``momentum`` (0).
    """

    def compute_update_value(self, i: int, rate: float) -> None:
        g = self.net.learnable_params[i].grad
        v = self.history[i]
        m = float(self.param.momentum)
        v_old = v.clone()
        v.mul_(m).add_(g, alpha=self.local_rate(i, rate))
        g.copy_(v).mul_(1.0 + m).add_(v_old, alpha=-m)
