"""Caffe's AdaDelta solver (BVLC/caffe src/caffe/solvers/adadelta_solver.cpp)."""

from __future__ import annotations

import torch

from caffe_compat.solvers.base import Solver, register_solver
from caffe_compat.solvers.validate import check_range

__all__ = ["AdaDeltaSolver"]


@register_solver("AdaDelta")
class AdaDeltaSolver(Solver):
    """AdaDelta (Zeiler 2012), Caffe's form, with ``rho = momentum``::

        Eg  <- rho * Eg + (1 - rho) * g^2
        u   <- g * sqrt((Edx + delta) / (Eg + delta))
        Edx <- rho * Edx + (1 - rho) * u^2          (the update before the learning rate)
        W   <- W - local_rate * u

    Parameters: ``momentum`` (rho; 0 unless set, 0.95 is usual), ``delta`` (1e-8),
    ``base_lr`` (1.0 in the paper); rho in [0, 1) and delta > 0 (limits Caffe does not check). History: ``[Eg_0..Eg_{N-1}, Edx_0..Edx_{N-1}]``.
    """

    num_history_sets = 2

    def check_param(self) -> None:
        super().check_param()
        check_range(self.param, self.source, "momentum", 0, 1, high_open=True, why=" (AdaDelta's rho)")
        check_range(self.param, self.source, "delta", 0, low_open=True)

    def update_rule(self, i: int, g: torch.Tensor, hist: list[torch.Tensor], local_rate: float) -> None:
        eg, edx = hist
        rho = float(self.param.momentum)
        one_minus = float(1.0 - self.param.momentum)
        delta = float(self.param.delta)
        eg.mul_(rho).add_(g * g, alpha=one_minus)
        update = (edx + delta).div_(eg + delta).sqrt_()
        g.mul_(update)
        edx.mul_(rho).add_(g * g, alpha=one_minus)
        g.mul_(local_rate)
