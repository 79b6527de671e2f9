"""Caffe's solvers: the ``Solver`` base (Caffe's training loop), one class per ``type`` (its
update rule), and the update engine every type's update runs through (``update_engine``).

``get_solver(path)`` builds the solver named by the file's ``type`` (SGD by default), as
pycaffe's ``caffe.get_solver``; the per-type classes take a path or a ``SolverParameter``.
"""

from caffe_compat.solvers.adadelta import AdaDeltaSolver
from caffe_compat.solvers.adagrad import AdaGradSolver
from caffe_compat.solvers.adam import AdamSolver
from caffe_compat.solvers.base import SOLVER_REGISTRY, Solver, get_solver, register_solver, solver_class
from caffe_compat.solvers.nesterov import NesterovSolver
from caffe_compat.solvers.nonfinite import NonFiniteError
from caffe_compat.solvers.rmsprop import RMSPropSolver
from caffe_compat.solvers.sgd import SGDSolver
from caffe_compat.solvers.signals import SignalHandler
from caffe_compat.solvers.state import SolverStateData, read_state, write_state
from caffe_compat.solvers.update_engine import LossScaler, UpdateEngine

__all__ = [
    "Solver",
    "SOLVER_REGISTRY",
    "register_solver",
    "solver_class",
    "get_solver",
    "SGDSolver",
    "NesterovSolver",
    "AdaGradSolver",
    "RMSPropSolver",
    "AdaDeltaSolver",
    "AdamSolver",
    "SignalHandler",
    "NonFiniteError",
    "UpdateEngine",
    "LossScaler",
    "SolverStateData",
    "read_state",
    "write_state",
]
