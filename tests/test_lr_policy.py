"""Caffe's learning-rate policies against their closed forms (sgd_solver.cpp GetLearningRate)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from caffe_compat.errors import SolverError
from caffe_compat.io import read_solver_text
from caffe_compat.solvers import lr_policy

RTOL = 1e-6


def solver(text: str):
    return read_solver_text(text)


def run(param, iters):
    rates, steps, cs = [], [], 0
    for it in range(iters):
        r, cs = lr_policy.get_learning_rate(param, it, cs)
        rates.append(r)
        steps.append(cs)
    return np.array(rates), steps


F = np.float32  # protobuf floats are float32


@pytest.mark.parametrize(
    "text, expected",
    [
        ('lr_policy: "fixed" base_lr: 0.1', lambda it: F(0.1) * np.ones_like(it, dtype=float)),
        (
            'lr_policy: "step" base_lr: 0.02 gamma: 0.5 stepsize: 4',
            lambda it: F(0.02) * float(F(0.5)) ** np.floor(it / 4),
        ),
        ('lr_policy: "exp" base_lr: 0.02 gamma: 0.95', lambda it: F(0.02) * float(F(0.95)) ** it),
        (
            'lr_policy: "inv" base_lr: 0.02 gamma: 0.1 power: 0.75',
            lambda it: F(0.02) * (1 + float(F(0.1)) * it) ** -0.75,
        ),
        (
            'lr_policy: "poly" base_lr: 0.02 power: 2 max_iter: 30',
            lambda it: F(0.02) * (1 - it / 30.0) ** 2,
        ),
        (
            'lr_policy: "sigmoid" base_lr: 0.02 gamma: -0.5 stepsize: 8',
            lambda it: F(0.02) / (1 + np.exp(0.5 * (it - 8))),
        ),
    ],
    ids=["fixed", "step", "exp", "inv", "poly", "sigmoid"],
)
def test_closed_form(text, expected):
    param = solver(text)
    rates, _ = run(param, 30)
    its = np.arange(30, dtype=float)
    np.testing.assert_allclose(rates, expected(its), rtol=RTOL, atol=0)
    # rates are float32 values, as Caffe's Dtype rate
    assert all(float(np.float32(r)) == r for r in rates)


def test_step_sets_current_step():
    param = solver('lr_policy: "step" base_lr: 1 gamma: 0.1 stepsize: 3')
    _, steps = run(param, 10)
    assert steps == [it // 3 for it in range(10)]
    # a restored current_step is overwritten by the step policy
    r, cs = lr_policy.get_learning_rate(param, 7, current_step=0)
    assert cs == 2 and math.isclose(r, 0.01, rel_tol=1e-6)


def test_multistep_advances_at_most_once_per_call():
    param = solver('lr_policy: "multistep" base_lr: 1 gamma: 0.5 stepvalue: 3 stepvalue: 9')
    rates, steps = run(param, 12)
    assert steps == [0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2]
    np.testing.assert_allclose(rates, [0.5**s for s in steps], rtol=RTOL, atol=0)
    # resumed late with current_step 0 (Caffe's quirk): catches up one step per iteration
    r, cs = lr_policy.get_learning_rate(param, 20, 0)
    assert cs == 1 and r == 0.5
    r, cs = lr_policy.get_learning_rate(param, 21, cs)
    assert cs == 2 and r == 0.25
    r, cs = lr_policy.get_learning_rate(param, 22, cs)
    assert cs == 2


def test_sigmoid_does_not_overflow():
    param = solver('lr_policy: "sigmoid" base_lr: 0.1 gamma: 10 stepsize: 0')
    r, _ = lr_policy.get_learning_rate(param, 0, 0)
    assert r == pytest.approx(0.05, rel=1e-6)
    param = solver('lr_policy: "sigmoid" base_lr: 0.1 gamma: 10 stepsize: 1000')
    r, _ = lr_policy.get_learning_rate(param, 0, 0)
    assert r == 0.0


@pytest.mark.parametrize(
    "text, needle",
    [
        ("base_lr: 0.1", "'lr_policy' is missing"),
        ('lr_policy: "cosine" base_lr: 0.1', "'cosine'"),
        ('lr_policy: "step" base_lr: 0.1 gamma: 0.1', "stepsize"),
        ('lr_policy: "poly" base_lr: 0.1 power: 1', "max_iter"),
    ],
)
def test_bad_policy_names_the_field(text, needle):
    with pytest.raises(SolverError, match=needle):
        lr_policy.check_lr_policy(solver(text))
    with pytest.raises(SolverError):
        lr_policy.get_learning_rate(solver(text), 0, 0)
