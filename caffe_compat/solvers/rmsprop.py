"""Caffe's RMSProp solver (BVLC/caffe src/caffe/solvers/rmsprop_solver.cpp)."""

from __future__ import annotations

import torch

from caffe_compat.errors import SolverError
from caffe_compat.solvers.base import Solver, register_solver
from caffe_compat.solvers.validate import check_range

__all__ = ["RMSPropSolver"]


@register_solver("RMSProp")
class RMSPropSolver(Solver):
    """RMSProp (Tieleman & Hinton), Caffe's form::

        MS <- rms_decay * MS + (1 - rms_decay) * g^2
        W  <- W - local_rate * g / (sqrt(MS) + delta)

    Parameters: ``rms_decay`` (0.99, must lie in [0, 1)), ``delta`` (1e-8, > 0). ``momentum`` must be
    unset or 0 (Caffe: "Momentum cannot be used with RMSProp"). History: ``MS``.
    Unlike ``torch.optim.RMSprop``, delta is added outside the square root and there is no
    momentum/centered variant.
    """

    def check_param(self) -> None:
        super().check_param()
        p = self.param
        if p.momentum != 0:
            raise SolverError(
                f"{self.source}: Momentum cannot be used with RMSProp: remove 'momentum' (got momentum: {p.momentum:g})"
            )
        check_range(p, self.source, "rms_decay", 0, 1, high_open=True)
        check_range(p, self.source, "delta", 0, low_open=True)

    def update_rule(self, i: int, g: torch.Tensor, hist: list[torch.Tensor], local_rate: float) -> None:
        ms = hist[0]
        rho = float(self.param.rms_decay)
        ms.mul_(rho).add_(g * g, alpha=float(1.0 - self.param.rms_decay))
        update = torch.sqrt(ms).add_(float(self.param.delta))
        torch.div(g, update, out=update)
        g.copy_(update).mul_(local_rate)
