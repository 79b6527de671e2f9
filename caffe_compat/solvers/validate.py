"""Every check on a ``SolverParameter``, made before any net is built or any iteration runs.

Caffe checks most of these lazily (``stepsize`` at the first ``step`` rate, ``regularization_type``
at the first update, ``rms_decay`` when the RMSProp solver is built) and some never (Adam's betas,
``delta``, a negative ``base_lr``). Here each is made up front and raises ``SolverError`` naming
the solver file, the field, its value and the allowed range. The per-type limits (Adam's
``momentum2``, RMSProp's ``rms_decay``...) are declared by the solver classes
(``Solver.check_param`` overrides) through ``check_range``.
"""

from __future__ import annotations

import math
import os

from caffe_compat.errors import SolverError
from caffe_compat.solvers import lr_policy

__all__ = ["check_solver_param", "check_range", "check_nets", "check_snapshot_prefix"]


def check_range(
    param,
    source: str,
    field: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    why: str = "",
) -> None:
    """Raise ``SolverError`` unless ``param.<field>`` is a finite number in the interval
    (``low``/``high`` None: unbounded; ``*_open``: the bound excluded)."""
    value = getattr(param, field)
    ok = isinstance(value, int) or math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    interval = (
        ("(" if low_open or low is None else "[")
        + ("-inf" if low is None else f"{low:g}")
        + ", "
        + ("inf" if high is None else f"{high:g}")
        + (")" if high_open or high is None else "]")
    )
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    raise SolverError(f"{source}: {field}: {shown} is out of range: it must lie in {interval}{why}")


def check_solver_param(param, source: str, *, given_net: bool = False) -> None:
    """The checks every solver type shares (``Solver.check_param``): nets and test counts, the
    learning rate policy and its fields, and the numeric fields' ranges."""
    check_nets(param, source, given_net=given_net)
    lr_policy.check_lr_policy(param, source)
    check_range(param, source, "base_lr", 0)
    for field in ("max_iter", "display", "snapshot", "test_interval"):
        check_range(param, source, field, 0)
    check_range(param, source, "average_loss", 1, why=" (the number of losses averaged for the display)")
    check_range(param, source, "iter_size", 1, why=" (the number of passes accumulated per iteration)")
    check_range(param, source, "weight_decay", 0)
    check_range(param, source, "clip_gradients", why=" (a negative value turns clipping off)")
    for i, t in enumerate(param.test_iter):
        if t < 0:
            raise SolverError(f"{source}: test_iter[{i}]: {t} is out of range: it must lie in [0, inf)")
    if param.regularization_type not in ("L1", "L2"):
        raise SolverError(
            f"{source}: Unknown regularization type: regularization_type: {param.regularization_type!r}; "
            'use "L2" or "L1"'
        )
    _check_schedule(param, source)


def _check_schedule(param, source: str) -> None:
    """The fields the learning rate policy reads (Caffe: ``SGDSolver::GetLearningRate``)."""
    name = param.lr_policy
    if name in ("step", "multistep", "exp"):
        check_range(param, source, "gamma", 0, low_open=True, why=f" (lr_policy {name!r} multiplies the rate by it)")
    if name == "inv":
        check_range(param, source, "gamma", 0)
        check_range(param, source, "power", 0)
    if name == "poly":
        check_range(param, source, "power", 0)
    if name == "sigmoid":
        check_range(param, source, "gamma")
    if name == "multistep":
        values = list(param.stepvalue)
        for k, v in enumerate(values):
            if v < 0 or (k and v <= values[k - 1]):
                raise SolverError(
                    f"{source}: stepvalue[{k}]: {v} is out of range: lr_policy 'multistep' needs stepvalues "
                    f">= 0 in increasing order (got {values})"
                )


def check_nets(param, source: str, *, given_net: bool = False) -> None:
    """Exactly one train net; one ``test_iter`` per test net; ``test_state`` once per test net or
    not at all; ``test_interval > 0`` when there are test nets. ``given_net``: the caller built
    the nets (``Solver(..., net=...)``), so the file needs none."""
    train_fields = [f for f in ("net", "net_param", "train_net", "train_net_param") if param.HasField(f)]
    if not train_fields and not given_net:
        raise SolverError(f"{source}: no train net: set one of the fields net, net_param, train_net, train_net_param")
    if len(train_fields) > 1:
        raise SolverError(
            f"{source}: the train net is given more than once ({', '.join(train_fields)}); "
            "keep exactly one of net, net_param, train_net, train_net_param"
        )
    n_generic = int(param.HasField("net") or param.HasField("net_param"))
    n_specific = len(param.test_net) + len(param.test_net_param)
    if (n_generic and len(param.test_iter) < n_specific) or (
        not n_generic and len(param.test_iter) != n_specific and not given_net
    ):
        raise SolverError(
            f"{source}: test_iter must be specified for each test network: {n_specific} test "
            f"net(s) (test_net/test_net_param) but {len(param.test_iter)} test_iter"
        )
    n_test = len(param.test_iter) if n_generic or given_net else n_specific
    if len(param.test_state) and len(param.test_state) != n_test:
        raise SolverError(
            f"{source}: test_state must be unspecified or specified once per test net "
            f"({n_test} test net(s), {len(param.test_state)} test_state)"
        )
    if n_test and param.test_interval <= 0:
        raise SolverError(
            f"{source}: {n_test} test net(s) but test_interval is {param.test_interval}; "
            "set test_interval > 0 (or remove test_iter)"
        )


def check_snapshot_prefix(param, source: str, probe: str) -> None:
    """With ``snapshot > 0``: a ``snapshot_prefix`` is set and its folder is writable (Caffe
    writes and removes the file ``probe`` there at start-up, so that a run does not fail at its
    first snapshot hours later)."""
    if not param.snapshot:
        return
    if not param.HasField("snapshot_prefix") or not param.snapshot_prefix:
        raise SolverError(
            f'{source}: snapshot is {param.snapshot} but snapshot_prefix is not set; set snapshot_prefix: "path/prefix"'
        )
    try:
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise SolverError(
            f"{source}: Cannot write to snapshot_prefix {param.snapshot_prefix!r} ({e.strerror}); "
            "make sure that the directory exists and is writeable"
        ) from None
