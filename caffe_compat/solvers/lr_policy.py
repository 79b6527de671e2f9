"""Caffe's learning-rate policies (BVLC/caffe src/caffe/solvers/sgd_solver.cpp GetLearningRate).

Each policy is a pure function ``policy(param, it, current_step) -> (rate, current_step)`` of the
``SolverParameter``, the iteration (the number of updates done so far) and the multistep
position. ``current_step`` is part of the solver's state (it is written to ``.solverstate``):
Caffe's ``step`` policy overwrites it with ``it // stepsize`` and ``multistep`` advances it by at
most one per call, so a resumed run must restore it.

=========  ==========================================================================
fixed      ``base_lr``
step       ``base_lr * gamma ^ floor(it / stepsize)``  (``current_step = it // stepsize``)
exp        ``base_lr * gamma ^ it``
inv        ``base_lr * (1 + gamma * it) ^ (-power)``
multistep  ``current_step += 1`` if ``current_step < len(stepvalue)`` and
           ``it >= stepvalue[current_step]``; ``base_lr * gamma ^ current_step``
poly       ``base_lr * (1 - it / max_iter) ^ power``
sigmoid    ``base_lr / (1 + exp(-gamma * (it - stepsize)))``
=========  ==========================================================================

Caffe evaluates ``poly``, ``sigmoid`` and ``inv`` partly in float32 (its ``Dtype``); the rate is
computed here in double and rounded to float32 once, which differs from Caffe by at most an ulp.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from caffe_compat.errors import SolverError

__all__ = [
    "LR_POLICIES",
    "fixed",
    "step",
    "exp",
    "inv",
    "multistep",
    "poly",
    "sigmoid",
    "get_learning_rate",
    "check_lr_policy",
]

LrPolicy = Callable[..., tuple[float, int]]


def _f32(x: float) -> float:
    return float(np.float32(x))


def fixed(param, it: int, current_step: int = 0) -> tuple[float, int]:
    """``rate = base_lr``."""
    return _f32(param.base_lr), current_step


def step(param, it: int, current_step: int = 0) -> tuple[float, int]:
    """``rate = base_lr * gamma ^ floor(it / stepsize)``; sets ``current_step = it // stepsize``."""
    if param.stepsize <= 0:
        raise SolverError(f"lr_policy 'step' needs stepsize > 0 (got stepsize: {param.stepsize})")
    current_step = it // param.stepsize
    return _f32(param.base_lr * math.pow(param.gamma, current_step)), current_step


def exp(param, it: int, current_step: int = 0) -> tuple[float, int]:
    """``rate = base_lr * gamma ^ it``."""
    return _f32(param.base_lr * math.pow(param.gamma, it)), current_step


def inv(param, it: int, current_step: int = 0) -> tuple[float, int]:
    """``rate = base_lr * (1 + gamma * it) ^ (-power)``."""
    return _f32(param.base_lr * math.pow(1.0 + param.gamma * it, -param.power)), current_step


def multistep(param, it: int, current_step: int = 0) -> tuple[float, int]:
    """``rate = base_lr * gamma ^ current_step``, after advancing ``current_step`` by at most one
    when ``it`` has reached ``stepvalue[current_step]``."""
    if current_step < len(param.stepvalue) and it >= param.stepvalue[current_step]:
        current_step += 1
    return _f32(param.base_lr * math.pow(param.gamma, current_step)), current_step


def poly(param, it: int, current_step: int = 0) -> tuple[float, int]:
    """``rate = base_lr * (1 - it / max_iter) ^ power``."""
    if param.max_iter <= 0:
        raise SolverError(f"lr_policy 'poly' needs max_iter > 0 (got max_iter: {param.max_iter})")
    return _f32(param.base_lr * math.pow(1.0 - it / param.max_iter, param.power)), current_step


def sigmoid(param, it: int, current_step: int = 0) -> tuple[float, int]:
    """``rate = base_lr / (1 + exp(-gamma * (it - stepsize)))``."""
    z = -param.gamma * (it - param.stepsize)
    denom = math.inf if z > 700 else 1.0 + math.exp(z)
    return _f32(param.base_lr / denom), current_step


LR_POLICIES: dict[str, LrPolicy] = {
    "fixed": fixed,
    "step": step,
    "exp": exp,
    "inv": inv,
    "multistep": multistep,
    "poly": poly,
    "sigmoid": sigmoid,
}


def check_lr_policy(param, source: str | None = None) -> None:
    """Raise ``SolverError`` naming the field (and the solver file ``source``) when the policy
    cannot be evaluated."""
    where = f"{source}: " if source else ""
    name = param.lr_policy
    if not param.HasField("lr_policy") or not name:
        raise SolverError(
            f"{where}SolverParameter field 'lr_policy' is missing (it has no default in Caffe); "
            f"set lr_policy to one of: {', '.join(LR_POLICIES)}"
        )
    if name not in LR_POLICIES:
        raise SolverError(
            f"{where}Unknown learning rate policy lr_policy: {name!r}; known policies: {', '.join(LR_POLICIES)}"
        )
    if name == "step" and param.stepsize <= 0:
        raise SolverError(f"{where}lr_policy 'step' needs a positive 'stepsize' (got stepsize: {param.stepsize})")
    if name == "poly" and param.max_iter <= 0:
        raise SolverError(f"{where}lr_policy 'poly' needs a positive 'max_iter' (got max_iter: {param.max_iter})")


def get_learning_rate(param, it: int, current_step: int = 0, source: str | None = None) -> tuple[float, int]:
    """The rate at iteration ``it`` and the new ``current_step`` (Caffe's GetLearningRate)."""
    check_lr_policy(param, source)
    return LR_POLICIES[param.lr_policy](param, it, current_step)
