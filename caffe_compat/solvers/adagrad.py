"""Caffe's AdaGrad solver (BVLC/caffe src/caffe/solvers/adagrad_solver.cpp)."""

from __future__ import annotations

import torch

from caffe_compat.errors import SolverError
from caffe_compat.solvers.base import Solver, register_solver
from caffe_compat.solvers.validate import check_range

__all__ = ["AdaGradSolver"]


@register_solver("AdaGrad")
class AdaGradSolver(Solver):
    """AdaGrad (Duchi et al. 2011), Caffe's form::

        H <- H + g^2
        W <- W - local_rate * g / (sqrt(H) + delta)

    Parameters: ``delta`` (1e-8, > 0; torch's Adagrad eps default is 1e-10). ``momentum`` must be
    unset or 0 (Caffe: "Momentum cannot be used with AdaGrad"). History: ``H``.
    """

    def check_param(self) -> None:
        super().check_param()
        if self.param.momentum != 0:
            raise SolverError(
                f"{self.source}: Momentum cannot be used with AdaGrad: remove 'momentum' "
                f"(got momentum: {self.param.momentum:g})"
            )
        check_range(self.param, self.source, "delta", 0, low_open=True)

    def update_rule(self, i: int, g: torch.Tensor, hist: list[torch.Tensor], local_rate: float) -> None:
        h = hist[0]
        h.add_(g * g)
        update = torch.sqrt(h).add_(float(self.param.delta))
        torch.div(g, update, out=update)
        g.copy_(update).mul_(local_rate)
