"""The Solver base class: Caffe's training loop, tests, snapshots, signals and callbacks.

BVLC/caffe src/caffe/solver.cpp (Init, Step, Solve, Test, Snapshot, Restore). The update of an
iteration (sgd_solver.cpp ``ApplyUpdate``: clip, normalize, regularize, the solver type's rule,
``W -= diff``) is ``apply_update``: the learning rate here, the rest in the update engine
(``caffe_compat.solvers.update_engine``), which every solver type uses and which owns the ways of
running it fast. A solver type overrides one hook for its rule (``update_rule``: element-wise,
so that it can run chunk by chunk; SGD: ``update_history``) and ``check_param`` for its own
limits; the formula is in its class docstring. The checks of the ``SolverParameter`` are in
``solvers/validate.py``, the nets' construction in ``solvers/nets.py``, the non-finite guard in
``solvers/nonfinite.py``.

Deliberate differences from Caffe:

- Every check Caffe makes lazily (unknown ``lr_policy`` or ``regularization_type`` at the first
  update, ``stepsize`` at the first ``step`` rate...), and the plain ones it forgot (Adam's betas
  in [0, 1), ``delta`` > 0, ``base_lr`` >= 0...), are made before any net is built; the error
  (``SolverError``) names the solver file, the field and the allowed range.
- A NaN or Inf in the loss or the gradients stops training (``nan_policy``, see
  ``solvers/nonfinite.py``); Caffe carries on (``nan_policy = "continue"``).
- ``restore`` also fast-forwards the data layers (train net: ``iter * iter_size`` batches; test
  nets: the test passes run before ``iter``), so a resumed run continues exactly as the
  uninterrupted one would have; Caffe restarts its data sources from the beginning.
- ``solver_mode: GPU`` in the solver file is honoured only when CUDA is available (the tools
  choose the device); ``--gpu`` without CUDA is an error.

Several processes (``torch.distributed``, Caffe's multi-GPU; see ``solvers/distributed.py``):
when a process group of N > 1 processes is initialized (or ``distributed=True``), every rank
builds the nets with the same seed, shards its train net's data layers (``set_shard``), takes
rank 0's parameters, and between the ``iter_size`` forward/backward passes and ``apply_update``
calls ``reduce_gradients``, which averages the gradients (and the loss, and the stop/snapshot
requests) over ranks. Rank 0 alone tests, snapshots and logs; the others follow its decisions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
from google.protobuf import text_format

from caffe_compat import _glog
from caffe_compat import io as cio
from caffe_compat._caffe import SolverLearningRate
from caffe_compat.blob import raw_data
from caffe_compat.errors import CaffeError, SolverError
from caffe_compat.proto import caffe_pb2
from caffe_compat.solvers import lr_policy, nets, signals, testing, validate
from caffe_compat.solvers.log import fmt, logger, progress_bar
from caffe_compat.solvers.nonfinite import NonFiniteGuard
from caffe_compat.solvers.state import SolverStateData, read_state, write_state
from caffe_compat.solvers.update_engine import LossScaler, UpdateEngine

__all__ = ["Solver", "LossScaler", "SOLVER_REGISTRY", "register_solver", "solver_class", "get_solver"]

SOLVER_REGISTRY: dict[str, type[Solver]] = {}


def register_solver(type_name: str):
    """Class decorator: register a ``Solver`` subclass under Caffe's ``type`` string."""

    def deco(cls):
        if type_name in SOLVER_REGISTRY:
            raise ValueError(f"solver type {type_name!r} registered twice")
        SOLVER_REGISTRY[type_name] = cls
        cls.type_name = type_name
        return cls

    return deco


def solver_class(type_name: str, source: str | None = None) -> type[Solver]:
    """The class registered for ``type`` (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam);
    ``source``: the solver file, named by the error for an unknown type."""
    try:
        return SOLVER_REGISTRY[type_name]
    except KeyError:
        where = f"{source}: " if source else ""
        raise SolverError(
            f"{where}Unknown solver type: type: {type_name!r}; known types: {', '.join(sorted(SOLVER_REGISTRY))}"
        ) from None


def _read_param(param) -> tuple[caffe_pb2.SolverParameter, str | None]:
    if isinstance(param, caffe_pb2.SolverParameter):
        p = caffe_pb2.SolverParameter()
        p.CopyFrom(param)
        from caffe_compat.upgrade import upgrade_solver

        return upgrade_solver(p, source=None), None
    path = os.fspath(param)
    return cio.read_solver(path), path


def get_solver(param) -> Solver:
    """pycaffe's ``caffe.get_solver(path)``: the solver of the file's ``type`` (SGD by default).

    ``param`` is a solver prototxt path or a ``SolverParameter``.
    """
    p, path = _read_param(param)
    return solver_class(p.type, path)(p, source=path)


class _Ready:
    """A loss read already (``value()`` as ``PendingLoss``'s)."""

    __slots__ = ("_value",)

    def __init__(self, value: float):
        self._value = value

    def value(self) -> float:
        return self._value


def _reads_late(net) -> bool:
    """Whether the net's losses are worth reading late (they live on a GPU)."""
    return getattr(getattr(net, "_device", None), "type", "cpu") == "cuda"


def _f32(x) -> np.float32:
    return np.float32(x)


class Solver(SolverLearningRate):
    """Caffe's Solver: builds the train and test nets from a ``SolverParameter`` and trains.

    ``Solver(path_or_SolverParameter)``; pycaffe API: ``net``, ``test_nets``, ``iter``,
    ``param``, ``step(n)``, ``solve(resume_file=None)``, ``snapshot()``, ``restore(path)``,
    ``apply_update()``, ``share_weights(net)``, ``add_callback(on_start, on_gradients)``.

    ``net=`` / ``test_nets=`` train nets the caller built (any object with the Net contract:
    ``learnable_params``, ``params_lr``, ``params_weight_decay``, ``forward_backward``,
    ``clear_param_diffs``...); the SolverParameter then needs no net field. ``device=`` moves
    the nets there; by default they follow caffe_compat's mode (``set_mode_gpu``/``set_device``).

    SolverParameter fields used (defaults from caffe.proto): ``net`` / ``net_param`` /
    ``train_net`` / ``train_net_param`` (exactly one), ``train_state``; ``test_net`` /
    ``test_net_param`` / the generic net, ``test_state``, ``test_iter`` (one per test net),
    ``test_interval`` (0), ``test_initialization`` (true), ``test_compute_loss`` (false);
    ``base_lr``, ``lr_policy`` (required), ``gamma``, ``power``, ``stepsize``, ``stepvalue``,
    ``max_iter``; ``momentum``, ``weight_decay``, ``regularization_type`` ("L2"),
    ``clip_gradients`` (-1), ``iter_size`` (1), ``average_loss`` (1), ``display`` (0),
    ``random_seed`` (-1); ``snapshot`` (0), ``snapshot_prefix``, ``snapshot_after_train``
    (true), ``snapshot_format`` (BINARYPROTO), ``snapshot_diff`` (false); ``weights``.
    Paths are relative to the working directory, as in Caffe.

    ``distributed=`` None (default): train with the other processes when a ``torch.distributed``
    process group of more than one process is initialized; True: require one; False: train alone
    even inside a group. ``rank`` / ``world_size`` / ``is_root`` say where this solver stands.
    """

    type_name: ClassVar[str] = ""
    #: History blobs per learnable parameter (AdaDelta and Adam keep two).
    num_history_sets: ClassVar[int] = 1
    #: True when the update value is history set 0 itself (SGD): the type implements
    #: ``update_history`` (its rule without writing the update into the diff), and the update of
    #: a net with ``supports_diff_alias`` (``Net``) lends the history to the diff instead of
    #: copying it (``caffe_compat.blob.ParamDiff.lend``; the diff's owner gives it a copy of its
    #: own before anything writes into it). Saves one pass over the parameters.
    diff_is_history: ClassVar[bool] = False
    #: True when the rule is momentum SGD (``V = momentum * V + local_rate * g; W -= V``): the
    #: update engine may then run it through its foreach, fused-kernel and compiled paths.
    momentum_sgd_rule: ClassVar[bool] = False
    #: What a NaN or Inf in the loss or the gradients does: "stop" (an error naming the
    #: iteration and the layer; no snapshot of non-finite weights) or "continue" (Caffe's).
    #: See ``caffe_compat.solvers.nonfinite``.
    nan_policy: str = "stop"
    #: Read every gradient itself in the check before each update, without the InnerProduct
    #: weights' witnesses (``caffe_compat.solvers.nonfinite``: what it costs).
    nan_check_gradients: bool = False
    #: The update engine's speed switches, read at every update (their paths and costs:
    #: ``caffe_compat.solvers.update_engine``; all give Caffe's float32 values but the opt-in
    #: ``compiled_update``, which may differ in the last bit). ``fused_update``: CPU updates chunk
    #: by chunk, ``update_chunk`` elements (4 MB of float32) at a time; ``fused_kernel``: SGD's
    #: CPU update through torch's fused kernel; ``foreach_update``: whole-tensor multi-tensor
    #: operations (None: on CUDA devices); ``compiled_update``: SGD through one ``torch.compile``'d
    #: kernel per parameter (``compiled_update_options``), with a fallback if compiling fails.
    fused_update: bool = True
    update_chunk: int = 1 << 20
    fused_kernel: bool = True
    foreach_update: bool | None = None
    compiled_update: bool = False
    compiled_update_options: ClassVar[dict] = {"dynamic": True}
    #: On a GPU, read an iteration's loss after the next iteration is queued (see ``step``);
    #: False: read it at once (the host then waits for every pass; a measurement switch).
    lag_loss_read: bool = True
    #: Opt-in (one CUDA device): each training pass replayed from one CUDA graph, and the test
    #: nets' forward passes from theirs (``Net.use_cuda_graph``; ``tools/train.py --cuda_graph``):
    #: the same kernels without the per-layer Python, which bounds small batches on a GPU. The
    #: update stays eager; a test net the graph cannot replay (a Python layer) stays eager too.
    cuda_graph: bool = False
    _cuda_graph_applied: bool = False

    def __init__(
        self,
        param,
        *,
        source: str | None = None,
        device: torch.device | str | None = None,
        net=None,
        test_nets=None,
        distributed: bool | None = None,
    ):
        # pycaffe's solvers log through glog to stderr without init_log(): the same default here
        # (silent where the application or the tools configured logging)
        _glog.install_default_handler()
        if isinstance(param, caffe_pb2.SolverParameter) and source is not None:
            self.param = caffe_pb2.SolverParameter()
            self.param.CopyFrom(param)
            self.source = source
        else:
            self.param, path = _read_param(param)
            self.source = path or source or "<SolverParameter>"
        self.iter = 0
        self.current_step = 0
        self._given_net = net is not None
        self.check_param()
        self.engine = UpdateEngine(self)
        self.nan_guard = NonFiniteGuard(self)
        self._sync = None
        self.rank, self.world_size = 0, 1
        seed = int(self.param.random_seed)
        if distributed or distributed is None:
            from caffe_compat.solvers import distributed as dist_mod

            if dist_mod.is_distributed():
                self.rank, self.world_size = dist_mod.get_rank(), dist_mod.get_world_size()
                seed = dist_mod.agree_seed(seed)
            elif distributed:
                raise SolverError(
                    f"{self.source}: distributed=True but no torch.distributed process group of more than "
                    "one process is initialized (torch.distributed.init_process_group, or tools/train.py --gpu 0,1)"
                )
        if self.is_root:
            self._check_snapshot_write_permissions()
        logger.info("Initializing solver from parameters: \n%s", text_format.MessageToString(self.param))
        if seed >= 0:
            from caffe_compat.mode import set_random_seed

            set_random_seed(seed)
        self.device = torch.device(device) if device is not None else None
        from caffe_compat import mode as _mode

        if (self.device or _mode.current_device()).type == "cpu":
            _mode.cache_cpu_allocations()  # before the nets allocate (see caffe_compat.mode.tune_cpu)
        self._action_function: Callable[[], str] | None = None
        self.requested_early_exit = False
        if net is not None:  # nets built by the caller (PyTorch users, tests)
            self.net, self.test_nets = nets.given_nets(self.param, self.source, net, test_nets)
        else:
            self.net, self.test_nets = nets.solver_nets(self.param, self.source, self.device)
        if self.world_size > 1:
            dist_mod.attach_solver(self, seed)
        logger.info("Solver scaffolding done.")
        params = self.net.learnable_params
        self.history: list[torch.Tensor] = [
            torch.zeros_like(raw_data(p)) for _ in range(self.num_history_sets) for p in params
        ]
        self._losses: list[np.float32] = []
        self._smoothed = _f32(0)
        self._start_iter = self.iter
        from caffe_compat.mode import precision

        #: Dynamic loss scaling, on under ``caffe_compat.mode.set_precision("fp16")``.
        self.loss_scaler: LossScaler | None = LossScaler() if precision() == "fp16" else None
        #: ``fn(iteration, loss)`` for every training iteration, in order: Caffe's (unsmoothed)
        #: loss of the iteration, the mean of its ``iter_size`` passes.
        self.loss_observers: list[Callable[[int, float], None]] = []
        #: pycaffe's ``add_callback``: (on_start, on_gradients) pairs, called in every iteration
        self._callbacks: list[tuple[Callable[[], None], Callable[[], None]]] = []
        self._lagged: list = []

    # -- validation ------------------------------------------------------------------------------

    def check_param(self) -> None:
        """Every check on the SolverParameter, before any net is built (``SolverError`` naming
        the solver file, the field and the allowed range: ``solvers/validate.py``).

        Subclasses extend it with their own limits (and call ``super().check_param()``).
        """
        validate.check_solver_param(self.param, self.source, given_net=self._given_net)

    def _check_snapshot_write_permissions(self) -> None:
        # Caffe's probe file, made unique to this process: processes of one training (several
        # GPUs, pycaffe's NCCL) build their solvers in the same directory at the same time
        probe = f"{self._snapshot_filename('.tempfile')}.{os.getpid()}"
        validate.check_snapshot_prefix(self.param, self.source, probe)

    def copy_weights(self, paths: str) -> None:
        """Load ``a.caffemodel[,b.caffemodel...]`` into the train net and every test net
        (``caffe train --weights``)."""
        nets.load_weights([paths], [self.net, *self.test_nets])

    # -- several processes -------------------------------------------------------------------------

    @property
    def is_root(self) -> bool:
        """Whether this solver logs, tests and snapshots (rank 0, or the only process)."""
        return self.rank == 0

    def add_callback(self, on_start, on_gradients=None) -> None:
        """pycaffe's ``Solver.add_callback``: ``on_start()`` at the start of every iteration (after
        a test due at it, before its forward/backward passes), ``on_gradients()`` once the passes'
        gradients are in the diffs (averaged over the processes when several train), after the
        display and before the update — where Caffe calls its callbacks. ``add_callback(nccl)``
        with an ``NCCL`` object, as Caffe's multi-GPU ``train.py`` does: accepted; the solver the
        object joined already averages the gradients in every iteration."""
        if on_gradients is None and getattr(on_start, "is_caffe_compat_nccl", False):
            if on_start.solver is not self:
                raise SolverError(f"{self.source}: add_callback(nccl): that NCCL object belongs to another solver")
            return
        if not callable(on_start) or not callable(on_gradients):
            raise SolverError(
                f"{self.source}: add_callback(on_start, on_gradients) takes two functions of no "
                f"argument (or one NCCL object); got {on_start!r}, {on_gradients!r}"
            )
        self._callbacks.append((on_start, on_gradients))

    def share_weights(self, net) -> None:
        """pycaffe's ``Solver.share_weights``: ``net`` uses this solver's training weights for its
        layers of the same name (Net.share_with), so that it sees every update."""
        net.share_trained_layers_with(self.net)

    def join_process_group(self, broadcast: bool = True) -> None:
        """Train with the other processes of the initialized ``torch.distributed`` group from
        now on, as a solver built while the group exists does (pycaffe's ``NCCL(solver, uid)``
        calls it): this rank's share of the data, gradients averaged before every update, only
        rank 0 logs, tests and snapshots; ``broadcast``: rank 0's weights to every rank now.
        Every rank must call it (collective)."""
        if self._sync is not None:
            return
        from caffe_compat.solvers import distributed as dist_mod

        if not dist_mod.is_distributed():
            raise SolverError(
                f"{self.source}: join_process_group(): no torch.distributed process group of more than one "
                "process is initialized"
            )
        self.rank, self.world_size = dist_mod.get_rank(), dist_mod.get_world_size()
        dist_mod.attach_solver(self, dist_mod.agree_seed(int(self.param.random_seed)), broadcast=broadcast)

    def reduce_gradients(self, loss: np.float32, request: str = signals.NONE) -> tuple[np.float32, str]:
        """Average the accumulated diffs over the processes (Caffe's P2PSync: sum, then scale by
        1/N, before ``apply_update``), and the loss; agree on a stop/snapshot request (any rank's
        counts, stop first). Alone, returns its arguments."""
        if self._sync is None:
            return loss, request
        mean_loss, (stop, snap) = self._sync.average_gradients(
            float(loss), [int(request == signals.STOP), int(request == signals.SNAPSHOT)]
        )
        agreed = signals.STOP if stop else signals.SNAPSHOT if snap else signals.NONE
        return _f32(mean_loss), agreed

    def _agree_early_exit(self) -> None:
        if self._sync is not None:
            self.requested_early_exit = self._sync.any(self.requested_early_exit)

    # -- signals -----------------------------------------------------------------------------------

    def set_action_function(self, fn: Callable[[], str] | None) -> None:
        """``fn()`` -> "stop" | "snapshot" | "none", asked between iterations (Caffe's
        SetActionFunction; tools/train.py passes a ``SignalHandler``'s ``action``)."""
        self._action_function = fn

    def _requested_action(self) -> str:
        if self._action_function is None:
            return signals.NONE
        return self._action_function()

    # -- the update pipeline -----------------------------------------------------------------------

    def get_learning_rate(self) -> float:
        """The rate for the current iteration; advances ``current_step`` as Caffe does."""
        rate, self.current_step = lr_policy.get_learning_rate(self.param, self.iter, self.current_step, self.source)
        return rate

    def apply_update(self) -> None:
        """One update from the accumulated diffs (Caffe's ApplyUpdate): the rate of this
        iteration (logged at a display), then clip, normalize, regularize, the type's rule and
        ``W -= diff`` through the update engine (``caffe_compat.solvers.update_engine``: chunk by
        chunk on the CPU, multi-tensor on a GPU, the same float32 values). Under fp16 loss
        scaling the diffs are first unscaled, and the update is skipped when one is inf/nan."""
        rate = self.get_learning_rate()
        if self.param.display and self.iter % self.param.display == 0:
            logger.info("Iteration %d, lr = %s", self.iter, fmt(rate))
        sync = getattr(self.net, "sync_host_params", None)
        if sync is not None:  # host writes through net.params[...] (GPU) land before the update
            sync()
        if self.param.clip_gradients < 0:  # (with clipping, its sum of squares is the check)
            # read with this iteration's loss where that is read late (after the update is queued)
            self.nan_guard.check_gradients(defer=bool(self._lagged) and self._lagged[-1][0] == self.iter)
        self.engine.apply(rate, self.nan_guard.gradients)

    def clip_gradients(self) -> None:
        """If ``clip_gradients >= 0`` and the L2 norm of all diffs exceeds it, scale every diff
        by ``clip_gradients / norm`` (Caffe's ClipGradients)."""
        with torch.no_grad():
            self.engine.clip_gradients()

    def update_history(self, i: int, g: torch.Tensor, hist: list[torch.Tensor], local_rate: float) -> None:
        """``diff_is_history`` types' hook: update ``hist`` (history set 0 is then the update
        value) from the diff ``g``, without writing into ``g``."""
        raise NotImplementedError(type(self).__name__)  # pragma: no cover

    def update_rule(self, i: int, g: torch.Tensor, hist: list[torch.Tensor], local_rate: float) -> None:
        """The solver type's hook: overwrite ``g`` (parameter i's diff, or a chunk of it) with the
        update value, updating ``hist`` (the same elements of each history set) in place.
        Element-wise only: it may be called on any slice of the parameter. A ``diff_is_history``
        type implements ``update_history`` instead; this then copies history set 0 into ``g``."""
        if not self.diff_is_history:  # pragma: no cover
            raise NotImplementedError(type(self).__name__)
        self.update_history(i, g, hist, local_rate)
        g.copy_(hist[0])

    # -- training loop -----------------------------------------------------------------------------

    def _forward_backward(self):
        """One training pass; its loss as something with ``value()`` (a ``PendingLoss`` of the
        net, read later on a GPU)."""
        scale = 1.0 if self.loss_scaler is None else self.loss_scaler.scale
        if self.cuda_graph != self._cuda_graph_applied:  # the switch changed since the last pass
            self._use_cuda_graph(self.cuda_graph)
        pending = getattr(self.net, "forward_backward_pending", None)
        if pending is None:  # a net of another kind: read at once
            return _Ready(self.net.forward_backward() if scale == 1.0 else self.net.forward_backward(loss_scale=scale))
        return pending(scale)

    def _use_cuda_graph(self, on: bool) -> None:
        """Turn the CUDA graphs of the train net (and of the test nets that allow them) on or off
        (``cuda_graph``), checking what they need."""
        if on:
            why = None
            if not hasattr(self.net, "use_cuda_graph"):
                why = "the train net is not a caffe_compat Net"
            elif self.world_size > 1:
                why = "training with several processes (their gradient exchange runs per pass in Python)"
            elif self.loss_scaler is not None:
                why = "fp16 loss scaling"
            if why is not None:
                raise SolverError(f"{self.source}: CUDA graphs are not supported with {why}; train without them")
            warmup = 2
            logger.info("Training passes replayed from a CUDA graph (captured after %d eager passes)", warmup)
            self.net.use_cuda_graph(True, warmup=warmup)
            for i, net in enumerate(self.test_nets):  # their forward passes, where they can be
                try:
                    net.use_cuda_graph(True, warmup=warmup)
                except CaffeError as e:
                    logger.info("Test net #%d runs eagerly: %s", i, e)
        else:
            for net in [self.net, *self.test_nets]:
                if hasattr(net, "use_cuda_graph"):
                    net.use_cuda_graph(False)
        self._cuda_graph_applied = on

    @property
    def smoothed_loss(self) -> np.float32:
        """Caffe's smoothed loss: the mean of the losses of the last ``average_loss`` iterations
        of the current (or last) ``step`` call. Reading it reads any loss still on the device."""
        self._settle()
        return self._smoothed

    @smoothed_loss.setter
    def smoothed_loss(self, value) -> None:
        self._smoothed = _f32(value)

    def _update_smoothed_loss(
        self, loss: np.float32, start_iter: int, average_loss: int, it: int | None = None
    ) -> None:
        if len(self._losses) < average_loss:
            self._losses.append(loss)
            size = len(self._losses)
            self._smoothed = _f32((self._smoothed * _f32(size - 1) + loss) / _f32(size))
        else:
            idx = ((self.iter if it is None else it) - start_iter) % average_loss
            self._smoothed = _f32(self._smoothed + (loss - self._losses[idx]) / _f32(average_loss))
            self._losses[idx] = loss

    def _iteration_loss(self, passes: list) -> np.float32:
        """Caffe's loss of an iteration: the float32 mean of its ``iter_size`` passes' losses."""
        loss = _f32(0)
        for pending in passes:
            loss = _f32(loss + _f32(pending.value()))
        return _f32(loss / _f32(self.param.iter_size))

    def _settle(self, keep_last: bool = False) -> None:
        """Read the losses whose read was put off (``step`` on a GPU), oldest first: a bad label's
        error (naming the iteration), the smoothed loss (of the ``step`` call they belong to),
        the observers. ``keep_last``: leave the newest one pending."""
        lagged = self._lagged
        while len(lagged) > (1 if keep_last else 0):
            it, passes, current = lagged.pop(0)
            try:
                loss = self._iteration_loss(passes)
            except CaffeError as e:
                lagged.clear()
                raise type(e)(f"iteration {it}: {e}") from None
            self._record_loss(loss, it, smooth=current)

    def _record_loss(self, loss: np.float32, it: int, smooth: bool = True) -> None:
        self.nan_guard.loss(it, loss)
        if smooth:
            self._update_smoothed_loss(loss, self._start_iter, self.param.average_loss, it)
        for fn in self.loss_observers:
            fn(it, float(loss))

    def _can_lag(self, display: bool) -> bool:
        """Whether this iteration's loss may be read after the next one is queued: on a GPU, when
        nothing in this iteration needs the value (display, several processes, fp16 loss scaling)."""
        return (
            self.lag_loss_read
            and not display
            and self._sync is None
            and self.loss_scaler is None
            and _reads_late(self.net)
        )

    def step(self, iters: int) -> None:
        """Run ``iters`` iterations (Caffe's Step): test when due, forward/backward ×
        ``iter_size``, display, update, snapshot when due or requested.

        On a GPU the loss of an iteration without a display is read late: once the next
        iteration's passes are queued (in this call or the next ``step`` call: a loop of
        ``step(1)`` too), so that the device never idles while the host waits for it. A bad
        label found by the loss layers' deferred checks then raises before the next iteration's
        update, with its own update applied (the error names the iteration); and always before a
        display, a test, a snapshot, or a read of ``smoothed_loss``."""
        p = self.param
        start_iter = self.iter
        self._losses = []
        self._smoothed = _f32(0)
        self._start_iter = start_iter
        # a previous call's last loss, if still pending: checked and observed, not smoothed here
        self._lagged = [(it, passes, False) for it, passes, _ in self._lagged]
        try:
            self._step(p, start_iter, self.iter + int(iters))
        except BaseException:
            self._lagged = []
            self.nan_guard.forget()
            raise

    def _step(self, p, start_iter: int, stop_iter: int) -> None:
        with progress_bar(max(stop_iter - start_iter, 0), desc=self.type_name) as bar:
            while self.iter < stop_iter:
                self.net.clear_param_diffs()
                if p.test_interval and self.iter % p.test_interval == 0 and (self.iter > 0 or p.test_initialization):
                    self._settle()
                    if self.is_root:
                        self.test_all()
                    self._agree_early_exit()
                    if self.requested_early_exit:
                        break
                for on_start, _ in self._callbacks:
                    on_start()
                display = bool(p.display) and self.iter % p.display == 0
                if hasattr(self.net, "set_debug_info"):  # Caffe: the net logs per layer at displays
                    self.net.set_debug_info(display and p.debug_info)
                passes = []
                for k in range(p.iter_size):
                    if self._sync is not None and k == p.iter_size - 1:
                        self._sync.arm()  # the diffs are final after this pass: reduce as they come
                    passes.append(self._forward_backward())
                if self._can_lag(display):
                    self._lagged.append((self.iter, passes, True))
                    # the previous iteration's loss, if put off: its pass is done or nearly so,
                    # and the device has this one queued
                    self._settle(keep_last=True)
                else:
                    self._settle()
                    loss = self._iteration_loss(passes)
                    if self._sync is not None:  # the request rides with the gradients
                        loss, request = self.reduce_gradients(loss, self._requested_action())
                    self._record_loss(loss, self.iter)
                if display:
                    logger.info("Iteration %d, loss = %s", self.iter, fmt(self._smoothed))
                    testing.log_outputs(self.net, "Train", {o: self.net.blobs[o].data for o in self.net.outputs})
                for _, on_gradients in self._callbacks:
                    on_gradients()
                self.apply_update()
                self.iter += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=fmt(self._smoothed))
                if self._sync is None:
                    request = self._requested_action()
                if (p.snapshot and self.iter % p.snapshot == 0) or request == signals.SNAPSHOT:
                    self.snapshot()
                if request == signals.STOP:
                    self.requested_early_exit = True
                    break

    def solve(self, resume_file: str | None = None) -> None:
        """Train to ``max_iter`` (Caffe's Solve), optionally resuming from a ``.solverstate``;
        snapshot after training, one last display and test."""
        p = self.param
        logger.info("Solving %s", self.net.name)
        logger.info("Learning Rate Policy: %s", p.lr_policy)
        self.requested_early_exit = False
        if resume_file:
            logger.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file)
        start_iter = self.iter
        self.step(p.max_iter - self.iter)
        self._settle()
        self.nan_guard.weights("ending training")
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            logger.info("Optimization stopped early.")
            return
        if p.display and self.iter % p.display == 0:
            with torch.no_grad():
                _, loss = testing.forward_with_loss(self.net)
            if self._sync is not None:
                loss = _f32(self._sync.mean(loss))
            self._update_smoothed_loss(loss, start_iter, p.average_loss)
            logger.info("Iteration %d, loss = %s", self.iter, fmt(self._smoothed))
        if p.test_interval and self.iter % p.test_interval == 0 and self.is_root:
            self.test_all()
        logger.info("Optimization Done.")

    # -- testing -----------------------------------------------------------------------------------

    def test_all(self) -> None:
        """Run every test net (Caffe's TestAll)."""
        self._settle()
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            self.test(i)

    def test(self, test_net_id: int = 0) -> list[tuple[str, float]]:
        """Run test net ``test_net_id`` for ``test_iter`` batches; log each output element's mean.

        Returns ``[(output name, mean), ...]`` in Caffe's output order.
        """
        return testing.run_test(self, test_net_id)

    # -- snapshots ---------------------------------------------------------------------------------

    def _snapshot_filename(self, extension: str) -> str:
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{extension}"

    def snapshot(self) -> str | None:
        """Write ``<prefix>_iter_<N>.caffemodel[.h5]`` and ``.solverstate[.h5]`` (atomically).

        Returns the solverstate's path; on ranks other than 0 of a multi-process run, writes
        nothing and returns None (rank 0 holds the same weights and history).
        """
        self._settle()  # a bad label of a pass whose loss is still on the device raises first
        self.nan_guard.weights(f"writing the snapshot of iteration {self.iter}")
        if not self.is_root:
            return None
        p = self.param
        if not p.snapshot_prefix:
            raise SolverError(f"{self.source}: snapshot_prefix is not set; cannot snapshot")
        hdf5 = p.snapshot_format == caffe_pb2.SolverParameter.HDF5
        if hdf5:
            model_filename = self._snapshot_filename(".caffemodel.h5")
            logger.info("Snapshotting to HDF5 file %s", model_filename)
            self.net.save_hdf5(model_filename, write_diff=p.snapshot_diff)
            state_filename = self._snapshot_filename(".solverstate.h5")
            logger.info("Snapshotting solver state to HDF5 file %s", state_filename)
        else:
            model_filename = self._snapshot_filename(".caffemodel")
            logger.info("Snapshotting to binary proto file %s", model_filename)
            cio.write_caffemodel(self.net.to_proto(write_diff=p.snapshot_diff), model_filename)
            state_filename = self._snapshot_filename(".solverstate")
            logger.info("Snapshotting solver state to binary proto file %s", state_filename)
        write_state(self.state(model_filename), state_filename, hdf5=hdf5)
        self.nan_guard.last_snapshot = state_filename
        return state_filename

    def state(self, learned_net: str | None = None) -> SolverStateData:
        """The current ``SolverState`` (history copied to NumPy)."""
        return SolverStateData(
            iter=self.iter,
            learned_net=learned_net,
            current_step=self.current_step,
            history=[h.detach().cpu().numpy().copy() for h in self.history],
        )

    def restore(self, path: str) -> None:
        """Resume from a ``.solverstate`` or ``.solverstate.h5``: iteration, ``current_step``,
        history and the weights of ``learned_net`` (relative to the working directory)."""
        self._settle()
        path = os.fspath(path)
        st = read_state(path)
        if len(st.history) != len(self.history):
            raise SolverError(
                f"{path}: Incorrect length of history blobs: the file has {len(st.history)}, the "
                f"{self.type_name} solver for this net needs {len(self.history)} "
                f"({self.num_history_sets} per learnable parameter); was it written by another solver type or net?"
            )
        for i, (h, arr) in enumerate(zip(self.history, st.history)):
            if tuple(arr.shape) != tuple(h.shape) and arr.size != h.numel():
                raise SolverError(
                    f"{path}: history blob {i} has shape {list(arr.shape)}, the solver's is {list(h.shape)}"
                )
        self.iter = st.iter
        if st.learned_net:
            self.net.copy_from(st.learned_net)
        self.current_step = st.current_step
        logger.info("%s: restoring history", type(self).__name__)
        with torch.no_grad():
            for h, arr in zip(self.history, st.history):
                h.copy_(torch.from_numpy(np.ascontiguousarray(arr).reshape(tuple(h.shape))).to(h.device))
        if self._sync is not None:  # every rank read the file; rank 0's copy wins
            self._sync.broadcast([*self.net.learnable_params, *self.history])
        self._fast_forward_data()

    def _fast_forward_data(self) -> None:
        p = self.param
        nets.skip_batches(self.net, self.iter * p.iter_size)
        if not self.test_nets or not p.test_interval or not self.is_root:
            return
        n_tests = sum(1 for k in range(0, self.iter, p.test_interval) if k > 0 or p.test_initialization)
        for i, net in enumerate(self.test_nets):
            nets.skip_batches(net, n_tests * p.test_iter[i])
