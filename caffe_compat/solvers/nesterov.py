"""Caffe's Nesterov solver (BVLC/caffe src/caffe/solvers/nesterov_solver.cpp)."""

from __future__ import annotations

import torch

from caffe_compat.solvers.base import Solver, register_solver
from caffe_compat.solvers.validate import check_range

__all__ = ["NesterovSolver"]


@register_solver("Nesterov")
class NesterovSolver(Solver):
    """Nesterov's accelerated gradient, Caffe's form::

        V_new <- momentum * V_old + local_rate * g
        W     <- W - ((1 + momentum) * V_new - momentum * V_old)

    ``local_rate = rate * lr_mult``; history: ``V``, one blob per parameter.
    Parameters: ``momentum`` (0; in [0, 1), a limit Caffe does not check).
    """

    def check_param(self) -> None:
        super().check_param()
        check_range(self.param, self.source, "momentum", 0, 1, high_open=True)

    def update_rule(self, i: int, g: torch.Tensor, hist: list[torch.Tensor], local_rate: float) -> None:
        v = hist[0]
        m = float(self.param.momentum)
        v_old = v.clone()
        v.mul_(m).add_(g, alpha=local_rate)
        g.copy_(v).mul_(1.0 + m).add_(v_old, alpha=-m)
