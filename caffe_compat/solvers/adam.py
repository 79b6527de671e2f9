"""Caffe's Adam solver (BVLC/caffe src/caffe/solvers/adam_solver.cpp)."""

from __future__ import annotations

import math

import numpy as np
import torch

from caffe_compat.solvers.base import Solver, register_solver
from caffe_compat.solvers.validate import check_range

__all__ = ["AdamSolver"]


@register_solver("Adam")
class AdamSolver(Solver):
    """Adam (Kingma & Ba 2014), Caffe's form, with ``beta1 = momentum``, ``beta2 = momentum2``,
    ``t = iter + 1``::

        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g^2
        W <- W - local_rate * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + delta)

    Parameters: ``momentum`` (beta1; 0 unless set, 0.9 is usual), ``momentum2`` (0.999),
    ``delta`` (1e-8); beta1 and beta2 must lie in [0, 1) and delta be > 0 (limits Caffe does not
    check: beta2 = 1 divides by zero in the first iteration). History: ``[m_0..m_{N-1}, v_0..v_{N-1}]``.
    Difference from ``torch.optim.Adam``: torch adds eps to ``sqrt(v_hat)``, i.e.
    ``eps * sqrt(1 - beta2^t)`` in Caffe's terms, so early iterations differ slightly; weight
    decay is Caffe's coupled L2 (as torch's Adam ``weight_decay``, not AdamW).
    """

    num_history_sets = 2

    def check_param(self) -> None:
        super().check_param()
        p, where = self.param, self.source
        check_range(p, where, "momentum", 0, 1, high_open=True, why=" (Adam's beta1)")
        check_range(p, where, "momentum2", 0, 1, high_open=True, why=" (Adam's beta2)")
        check_range(p, where, "delta", 0, low_open=True, why=" (Adam's epsilon)")

    def update_rule(self, i: int, g: torch.Tensor, hist: list[torch.Tensor], local_rate: float) -> None:
        m, v = hist
        beta1 = np.float32(self.param.momentum)
        beta2 = np.float32(self.param.momentum2)
        t = self.iter + 1
        # Caffe: double arithmetic from float betas, rounded to float once
        correction = np.float32(math.sqrt(1.0 - math.pow(float(beta2), t)) / (1.0 - math.pow(float(beta1), t)))
        m.mul_(float(beta1)).add_(g, alpha=float(np.float32(1) - beta1))
        tmp = torch.mul(g, g)
        v.mul_(float(beta2)).add_(tmp, alpha=float(np.float32(1) - beta2))
        torch.sqrt(v, out=tmp).add_(float(self.param.delta))
        # the update value straight into the diff (no copy): m / (sqrt(v) + delta) * rate
        torch.div(m, tmp, out=g).mul_(float(np.float32(local_rate) * correction))
