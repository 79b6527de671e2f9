"""The Solver base class: Caffe's training loop, tests, snapshots and the one update pipeline.

BVLC/caffe src/caffe/solver.cpp (Init, Step, Solve, Test, Snapshot, Restore) and
src/caffe/solvers/sgd_solver.cpp (ApplyUpdate, ClipGradients, Normalize, Regularize).
The update order lives only here (STYLE.md convention 4)::

    rate = lr_policy(iter)                        # "Iteration N, lr = rate" when displaying
    clip:       if clip_gradients >= 0 and L = ||all diffs||_2 > clip: diff *= clip / L
    for each learnable param i (net.learnable_params order):
      normalize:  if iter_size > 1: diff *= 1 / iter_size
      regularize: local_decay = weight_decay * decay_mult_i
                  L2: diff += local_decay * W     L1: diff += local_decay * sign(W)
      update_rule(i, diff, history_i, rate * lr_mult_i)   # the solver type's hook: diff := update
    W -= diff                                      # net.Update()
    iter += 1

Each solver type overrides only ``update_rule`` (element-wise, so that it can run chunk by chunk;
and ``check_param`` for its own CHECKs); the formula is in its class docstring.

Deliberate differences from Caffe:

- Every check Caffe makes lazily (unknown ``lr_policy`` or ``regularization_type`` at the first
  update, ``stepsize`` at the first ``step`` rate...) is made before any net is built, and the
  error (``SolverError``) names the field.
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

from caffe_compat import io as cio
from caffe_compat.blob import alias_diff, own_diff
from caffe_compat.errors import CaffeError, SolverError
from caffe_compat.proto import caffe_pb2
from caffe_compat.solvers import lr_policy, signals
from caffe_compat.solvers.log import fmt, logger, progress_bar
from caffe_compat.solvers.state import SolverStateData, read_state, write_state

__all__ = ["Solver", "LossScaler", "SOLVER_REGISTRY", "register_solver", "solver_class", "get_solver"]

SOLVER_REGISTRY: dict[str, type[Solver]] = {}

#: Data layers fast-forwarded on ``restore`` by running their forward (when they do not offer
#: ``skip_batches(n)``).
_DATA_LAYER_TYPES = ("Data", "HDF5Data", "ImageData", "WindowData")


def register_solver(type_name: str):
    """Class decorator: register a ``Solver`` subclass under Caffe's ``type`` string."""

    def deco(cls):
        if type_name in SOLVER_REGISTRY:
            raise ValueError(f"solver type {type_name!r} registered twice")
        SOLVER_REGISTRY[type_name] = cls
        cls.type_name = type_name
        return cls

    return deco


def solver_class(type_name: str) -> type[Solver]:
    """The class registered for ``type`` (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam)."""
    try:
        return SOLVER_REGISTRY[type_name]
    except KeyError:
        raise SolverError(
            f"Unknown solver type: type: {type_name!r}; known types: {', '.join(sorted(SOLVER_REGISTRY))}"
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
    return solver_class(p.type)(p, source=path)


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


class LossScaler:
    """Dynamic loss scaling for fp16 training, ``torch.amp.GradScaler``'s rule inside our solver.

    The net backpropagates ``scale * loss`` (``Net.forward_backward(loss_scale=scale)``); before
    clipping, ``unscale_`` multiplies every diff by ``1 / scale`` and checks them: if one is inf or
    nan the solver skips the update (weights and history unchanged; the iteration still counts,
    as GradScaler skips ``optimizer.step()``) and the scale is multiplied by ``backoff_factor``;
    after ``growth_interval`` finite iterations in a row it is multiplied by ``growth_factor``.

    Parameters (GradScaler's defaults): ``init_scale`` (2**16), ``growth_factor`` (2.0),
    ``backoff_factor`` (0.5), ``growth_interval`` (2000). Not in Caffe (which has no fp16 training
    in BVLC's tree); the scale is not saved in the .solverstate and restarts at ``init_scale``.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        self.scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.good_steps = 0
        self.skipped = 0

    def unscale_(self, params: list[torch.Tensor], iteration: int = 0) -> bool:
        """Unscale the diffs of ``params`` in place; False (and a lower scale) if any is inf/nan."""
        grads = [p.grad for p in params if p.grad is not None]
        found = False
        if grads:
            found_inf = torch.zeros((), dtype=torch.float32, device=grads[0].device)
            inv = torch.full((), 1.0 / self.scale, dtype=torch.float32, device=grads[0].device)
            try:
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv)
            except (RuntimeError, NotImplementedError, AttributeError):  # pragma: no cover
                for g in grads:
                    g.mul_(inv)
                    found_inf += (~torch.isfinite(g)).any().float()
            found = bool(found_inf.item())
        if found:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped += 1
            logger.warning(
                "Iteration %d: inf/nan in the fp16 gradients: update skipped, loss scale lowered to %g",
                iteration,
                self.scale,
            )
            return False
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0
        return True


class Solver:
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
    #: Run the per-parameter update chunk by chunk (same float32 results, far less memory
    #: traffic: see ``apply_update``); False: whole tensors, one operation at a time.
    fused_update: bool = True
    #: Elements per chunk of the fused update: 4 MB per float32 tensor, so that a chunk's 3-4
    #: tensors stay in the CPU's last-level cache between the operations, in chunks large enough
    #: that the per-operation cost is small (AlexNet's SGD update on 2 cores: 32 ms with 1 MB
    #: chunks, 27 ms with 4 MB ones; see docs/benchmarks.md).
    update_chunk: int = 1 << 20
    #: With ``fused_update``: solver types that have one run their CPU update through torch's
    #: one-pass fused kernel (SGD: ``torch._fused_sgd_``, the same float32 values as the chunked
    #: operations: see ``SGDSolver``); False: the chunked operations.
    fused_kernel: bool = True
    #: Opt-in (SGD with L2 or no weight decay): regularize, update and ``W -= update`` as one
    #: ``torch.compile``'d kernel per parameter (one pass over W, diff and history instead of
    #: five operations). May differ from Caffe's float32 results in the last bit (the compiler
    #: may contract ``a * b + c`` into one rounding); falls back with a warning if compiling fails.
    compiled_update: bool = False
    #: Whole-tensor updates (GPU) through multi-tensor ``torch._foreach_*`` operations (SGD):
    #: None = on CUDA devices, True = everywhere (on the CPU they loop over the tensors: the same
    #: values as the per-parameter path), False = never.
    foreach_update: bool | None = None
    #: ``torch.compile`` options for ``compiled_update``.
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
            self.net = net
            self.test_nets = list(test_nets or [])
            if len(self.test_nets) != len(self.param.test_iter):
                raise SolverError(
                    f"{self.source}: test_iter must be specified for each test network: "
                    f"{len(self.test_nets)} test net(s) but {len(self.param.test_iter)} test_iter"
                )
            self._load_weights([self.net, *self.test_nets])
        else:
            self.net = self._init_train_net()
            self.test_nets = self._init_test_nets()
        if self.world_size > 1:
            self._init_distributed(seed)
        logger.info("Solver scaffolding done.")
        params = self.net.learnable_params
        self.history: list[torch.Tensor] = [
            torch.zeros_like(p.data) for _ in range(self.num_history_sets) for p in params
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
        """Every check on the SolverParameter, before any net is built (``SolverError``).

        Subclasses extend it with their own CHECKs (and call ``super().check_param()``).
        """
        p = self.param
        where = self.source
        lr_policy.check_lr_policy(p)
        train_fields = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        if not train_fields and not self._given_net:
            raise SolverError(
                f"{where}: no train net: set one of the fields net, net_param, train_net, train_net_param"
            )
        if len(train_fields) > 1:
            raise SolverError(
                f"{where}: the train net is given more than once ({', '.join(train_fields)}); "
                "keep exactly one of net, net_param, train_net, train_net_param"
            )
        if p.HasField("net") and p.HasField("net_param"):  # pragma: no cover (caught above)
            raise SolverError(f"{where}: both net and net_param are set")
        n_generic = int(p.HasField("net") or p.HasField("net_param"))
        n_specific = len(p.test_net) + len(p.test_net_param)
        if n_generic:
            if len(p.test_iter) < n_specific:
                raise SolverError(
                    f"{where}: test_iter must be specified for each test network: {n_specific} test "
                    f"net(s) (test_net/test_net_param) but {len(p.test_iter)} test_iter"
                )
        elif len(p.test_iter) != n_specific and not self._given_net:
            raise SolverError(
                f"{where}: test_iter must be specified for each test network: {n_specific} test "
                f"net(s) (test_net/test_net_param) but {len(p.test_iter)} test_iter"
            )
        n_test = len(p.test_iter) if n_generic else n_specific
        if self._given_net:
            n_test = len(p.test_iter)
        if len(p.test_state) and len(p.test_state) != n_test:
            raise SolverError(
                f"{where}: test_state must be unspecified or specified once per test net "
                f"({n_test} test net(s), {len(p.test_state)} test_state)"
            )
        if n_test and p.test_interval <= 0:
            raise SolverError(
                f"{where}: {n_test} test net(s) but test_interval is {p.test_interval}; "
                "set test_interval > 0 (or remove test_iter)"
            )
        for i, t in enumerate(p.test_iter):
            if t < 0:
                raise SolverError(f"{where}: test_iter[{i}] is {t}; it must be >= 0")
        if p.average_loss < 1:
            raise SolverError(f"{where}: average_loss should be >= 1 (got {p.average_loss})")
        if p.iter_size < 1:
            raise SolverError(f"{where}: iter_size should be >= 1 (got {p.iter_size})")
        if p.regularization_type not in ("L1", "L2"):
            raise SolverError(
                f"{where}: Unknown regularization type: regularization_type: {p.regularization_type!r}; "
                'use "L2" or "L1"'
            )
        if p.display < 0 or p.snapshot < 0 or p.max_iter < 0:
            bad = [f for f in ("display", "snapshot", "max_iter") if getattr(p, f) < 0][0]
            raise SolverError(f"{where}: {bad} must be >= 0 (got {getattr(p, bad)})")

    def _check_snapshot_write_permissions(self) -> None:
        p = self.param
        if not p.snapshot:
            return
        if not p.HasField("snapshot_prefix") or not p.snapshot_prefix:
            raise SolverError(
                f"{self.source}: snapshot is {p.snapshot} but snapshot_prefix is not set; "
                'set snapshot_prefix: "path/prefix"'
            )
        # Caffe's probe file, made unique to this process: processes of one training (several
        # GPUs, pycaffe's NCCL) build their solvers in the same directory at the same time
        probe = f"{self._snapshot_filename('.tempfile')}.{os.getpid()}"
        try:
            with open(probe, "wb"):
                pass
            os.remove(probe)
        except OSError as e:
            raise SolverError(
                f"{self.source}: Cannot write to snapshot_prefix {p.snapshot_prefix!r} ({e.strerror}); "
                "make sure that the directory exists and is writeable"
            ) from None

    # -- nets --------------------------------------------------------------------------------------

    def _make_net(self, net_param: caffe_pb2.NetParameter, phase: int):
        from caffe_compat.net import Net

        net = Net(net_param, phase=phase)
        if self.device is not None and self.device.type != "cpu":
            net.to(self.device)
        return net

    def _init_train_net(self):
        p = self.param
        if p.HasField("train_net_param"):
            logger.info("Creating training net specified in train_net_param.")
            net_param = caffe_pb2.NetParameter()
            net_param.CopyFrom(p.train_net_param)
        elif p.HasField("train_net"):
            logger.info("Creating training net from train_net file: %s", p.train_net)
            net_param = cio.read_net(p.train_net)
        elif p.HasField("net_param"):
            logger.info("Creating training net specified in net_param.")
            net_param = caffe_pb2.NetParameter()
            net_param.CopyFrom(p.net_param)
        else:
            logger.info("Creating training net from net file: %s", p.net)
            net_param = cio.read_net(p.net)
        # NetState: solver default (TRAIN) < the net's own state < train_state
        state = caffe_pb2.NetState()
        state.phase = caffe_pb2.TRAIN
        state.MergeFrom(net_param.state)
        state.MergeFrom(p.train_state)
        net_param.state.CopyFrom(state)
        net = self._make_net(net_param, state.phase)
        self._load_weights([net])
        return net

    def _init_test_nets(self) -> list:
        p = self.param
        sources: list[str] = []
        params: list[caffe_pb2.NetParameter] = []
        for tp in p.test_net_param:
            sources.append("test_net_param")
            q = caffe_pb2.NetParameter()
            q.CopyFrom(tp)
            params.append(q)
        for tf in p.test_net:
            sources.append(f"test_net file: {tf}")
            params.append(cio.read_net(tf))
        remaining = len(p.test_iter) - len(params)
        for _ in range(max(remaining, 0)):
            if p.HasField("net_param"):
                sources.append("net_param")
                q = caffe_pb2.NetParameter()
                q.CopyFrom(p.net_param)
                params.append(q)
            elif p.HasField("net"):
                sources.append(f"net file: {p.net}")
                params.append(cio.read_net(p.net))
        nets = []
        for i, net_param in enumerate(params):
            state = caffe_pb2.NetState()
            state.phase = caffe_pb2.TEST
            state.MergeFrom(net_param.state)
            if len(p.test_state):
                state.MergeFrom(p.test_state[i])
            net_param.state.CopyFrom(state)
            logger.info("Creating test net (#%d) specified by %s", i, sources[i])
            nets.append(self._make_net(net_param, state.phase))
        self._load_weights(nets)
        return nets

    def _load_weights(self, nets: list) -> None:
        for entry in self.param.weights:
            for path in entry.split(","):
                if not path:
                    continue
                logger.info("Finetuning from %s", path)
                for net in nets:
                    net.copy_from(path)

    def copy_weights(self, paths: str) -> None:
        """Load ``a.caffemodel[,b.caffemodel...]`` into the train net and every test net
        (``caffe train --weights``)."""
        for path in paths.split(","):
            if not path:
                continue
            logger.info("Finetuning from %s", path)
            for net in [self.net, *self.test_nets]:
                net.copy_from(path)

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
        self._init_distributed(dist_mod.agree_seed(int(self.param.random_seed)), broadcast=broadcast)

    def _init_distributed(self, seed: int, broadcast: bool = True) -> None:
        from caffe_compat.solvers import distributed as dist_mod

        logger.info("Training on %d processes (this is rank %d)", self.world_size, self.rank)
        dist_mod.quiet_non_root_logging()
        for layer in getattr(self.net, "layers", []):
            if hasattr(layer, "set_shard"):
                layer.set_shard(self.rank, self.world_size)
            elif getattr(layer, "type", "") in _DATA_LAYER_TYPES:
                logger.warning(
                    "layer %r (%s) cannot shard its data: every process reads the same batches",
                    getattr(layer, "name", "?"),
                    layer.type,
                )
        # Caffe's layer_wise_reduce (default true): reduce during the last backward pass
        self._sync = dist_mod.DistributedSync(self.net.learnable_params, overlap=self.param.layer_wise_reduce)
        if broadcast:
            self._sync.broadcast(self.net.learnable_params)
        # every rank must update its copy of the weights through the same operations (every rank
        # takes part in this reduction, whatever its own answer)
        if self._sync.any(not (self.fused_kernel and self._fused_kernel_usable())):
            self.fused_kernel = False
        if seed >= 0:  # Dropout & co. draw differently on each rank from here on
            torch.manual_seed(int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0]))

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
        rate, self.current_step = lr_policy.get_learning_rate(self.param, self.iter, self.current_step)
        return rate

    def apply_update(self) -> None:
        """One update from the accumulated diffs: clip, then per parameter normalize,
        regularize, the solver type's ``update_rule``; then ``W -= diff``.

        With ``fused_update`` (the default) the per-parameter steps of CPU tensors run chunk by chunk
        (``update_chunk`` elements of the parameter, its diff and its history at a time, so
        that the chain of element-wise operations works in the CPU's cache): the same operations
        in the same order on every element, hence the same float32 results as whole tensors.
        Under fp16 loss scaling (``caffe_compat.mode.set_precision("fp16")``) the diffs are
        first unscaled; when one is inf/nan the update is skipped (see ``LossScaler``).
        """
        rate = self.get_learning_rate()
        if self.param.display and self.iter % self.param.display == 0:
            logger.info("Iteration %d, lr = %s", self.iter, fmt(rate))
        sync = getattr(self.net, "sync_host_params", None)
        if sync is not None:  # host writes through net.params[...] (GPU) land before the update
            sync()
        with torch.no_grad():
            for p in self.net.learnable_params:  # diffs still aliasing a history: copies of their own
                own_diff(p)
            if self.loss_scaler is not None and not self.loss_scaler.unscale_(self.net.learnable_params, self.iter):
                return
            self.clip_gradients()
            params = self.net.learnable_params
            # the update value is history 0: not written to the diff, which becomes its alias
            alias = self.diff_is_history and getattr(self.net, "supports_diff_alias", False)
            todo = range(len(params))
            if alias and not self.compiled_update:
                whole = [i for i in todo if not (self.fused_update and params[i].device.type == "cpu")]
                use = self.foreach_update
                if whole and (use or (use is None and params[whole[0]].device.type == "cuda")):
                    if self._foreach_step(whole, rate):
                        done = set(whole)
                        todo = [i for i in todo if i not in done]
            if alias and self.fused_update and self.fused_kernel and not self.compiled_update:
                done = self._fused_kernel_step([i for i in todo if params[i].device.type == "cpu"], rate)
                if done:
                    todo = [i for i in todo if i not in done]
            for i in todo:
                if self.compiled_update and self._compiled_step(i, rate):
                    continue
                local_rate = self.local_rate(i, rate)
                for w, g, hist in self._update_pieces(i):
                    self._normalize(g)
                    self._regularize(i, w, g)
                    if alias:
                        self.update_history(i, g, hist, local_rate)
                        w.sub_(hist[0])
                    else:
                        self.update_rule(i, g, hist, local_rate)
                        w.sub_(g)
                if alias:
                    alias_diff(params[i], self._history_of(i)[0])

    def _update_pieces(self, i: int):
        """``(W, diff, [history...])`` pieces of parameter i to update one after the other: on the
        CPU with ``fused_update``, ``update_chunk`` elements at a time (the chain of element-wise
        operations then works in the cache); otherwise the whole tensors (on a GPU chunks would
        only multiply kernel launches)."""
        p = self.net.learnable_params[i]
        flat = self._flat_views(i) if self.fused_update and p.device.type == "cpu" else None
        if flat is None:
            return [(p.data, p.grad, self._history_of(i))]
        w, g, hist = flat
        step = max(int(self.update_chunk), 1)
        return ((w[s : s + step], g[s : s + step], [h[s : s + step] for h in hist]) for s in range(0, w.numel(), step))

    def _compiled_step(self, i: int, rate: float) -> bool:
        """Normalize, regularize, update and ``W -= update`` for parameter i through a compiled
        kernel; False when this solver type or setting has none (the caller does it eagerly)."""
        return False

    def _foreach_step(self, indices: list[int], rate: float) -> bool:
        """The whole-tensor update of parameters ``indices`` through multi-tensor (``foreach``)
        operations, a few kernel launches for all of them instead of a few per parameter; the
        diffs are left as aliases of the history. False when this solver type or setting has
        none (the caller updates parameter by parameter)."""
        return False

    def _fused_kernel_usable(self) -> bool:
        """Whether this process would update through the solver type's fused kernel (processes
        training together agree on it: see ``_init_distributed``)."""
        return False

    def _fused_kernel_step(self, indices: list[int], rate: float) -> set[int]:
        """Update the CPU parameters ``indices`` through the solver type's one-pass kernel,
        leaving their diffs as aliases of the history; returns the positions it updated (the
        caller updates the others). The base class has no kernel."""
        return set()

    def _flat_views(self, i: int):
        """1-d views of parameter i's data, diff and history in memory order (None if they do not
        share one dense layout, e.g. a channels_last weight with a contiguous diff)."""
        p = self.net.learnable_params[i]
        g = p.grad
        hist = self._history_of(i)
        tensors = [p.data, g, *hist]
        stride = tuple(p.data.stride())
        if g is None or any(t.stride() != stride or t.shape != p.shape or t.storage_offset() for t in tensors[1:]):
            return None
        if not p.data.is_contiguous() and not p.data.is_contiguous(memory_format=torch.channels_last):
            return None
        return tuple(t.as_strided((t.numel(),), (1,)) for t in tensors[:2]) + (
            [h.as_strided((h.numel(),), (1,)) for h in hist],
        )

    def clip_gradients(self) -> None:
        """If ``clip_gradients >= 0`` and the L2 norm of all diffs exceeds it, scale every diff
        by ``clip_gradients / norm``."""
        clip = _f32(self.param.clip_gradients)
        if clip < 0:
            return
        params = self.net.learnable_params
        sumsq = sum(float(torch.sum(p.grad.double() * p.grad.double())) for p in params)
        l2norm = _f32(np.sqrt(_f32(sumsq)))
        if l2norm > clip:
            scale = _f32(clip / l2norm)
            logger.info(
                "Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale factor %s",
                fmt(l2norm),
                fmt(clip),
                fmt(scale),
            )
            for p in params:
                p.grad.mul_(float(scale))

    def _normalize(self, g: torch.Tensor) -> None:
        """``diff *= 1 / iter_size`` (the diffs of ``iter_size`` passes were summed)."""
        if self.param.iter_size != 1:
            g.mul_(self.normalize_factor())

    def normalize_factor(self) -> float:
        """``1 / iter_size`` in float32, as Caffe computes it."""
        return float(_f32(1.0) / _f32(self.param.iter_size))

    def local_decay(self, i: int) -> float:
        return float(_f32(self.param.weight_decay) * _f32(self.net.params_weight_decay[i]))

    def _regularize(self, i: int, w: torch.Tensor, g: torch.Tensor) -> None:
        """L2: ``diff += weight_decay * decay_mult * W``; L1: ``... * sign(W)``."""
        local_decay = self.local_decay(i)
        if not local_decay:
            return
        if self.param.regularization_type == "L2":
            g.add_(w, alpha=local_decay)
        else:
            g.add_(torch.sign(w), alpha=local_decay)

    def local_rate(self, i: int, rate: float) -> float:
        return float(_f32(rate) * _f32(self.net.params_lr[i]))

    def _history_of(self, i: int) -> list[torch.Tensor]:
        """Parameter i's tensor in each history set (``history`` holds set after set)."""
        n = len(self.net.learnable_params)
        return [self.history[k * n + i] for k in range(self.num_history_sets)]

    #: True when ``update_rule`` leaves in the diff a copy of history set 0 (SGD): the update of
    #: a net with ``supports_diff_alias`` (``Net``) then skips that copy, calls
    #: ``update_history`` instead and makes the diff an alias of the history
    #: (``caffe_compat.blob.alias_diff``; whatever writes into or hands out the diff first gives
    #: it a copy of its own, ``own_diff``). Saves one pass over the parameters.
    diff_is_history: ClassVar[bool] = False

    def update_history(self, i: int, g: torch.Tensor, hist: list[torch.Tensor], local_rate: float) -> None:
        """``update_rule`` without writing the update value into ``g`` (``diff_is_history``)."""
        raise NotImplementedError(type(self).__name__)  # pragma: no cover

    def update_rule(
        self, i: int, g: torch.Tensor, hist: list[torch.Tensor], local_rate: float
    ) -> None:  # pragma: no cover
        """The solver type's hook: overwrite ``g`` (parameter i's diff, or a chunk of it) with the
        update value, updating ``hist`` (the same elements of each history set) in place.
        Element-wise only: it may be called on any slice of the parameter."""
        raise NotImplementedError(type(self).__name__)

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
                    self._log_outputs(self.net, "Train", {o: self.net.blobs[o].data for o in self.net.outputs})
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

    def _log_outputs(self, net, what: str, outputs: dict) -> None:
        index = 0
        for name in net.outputs:
            weight = _f32(net.blob_loss_weights.get(name, 0.0))
            for v in np.asarray(outputs[name], dtype=np.float32).ravel():
                extra = f" (* {fmt(weight)} = {fmt(_f32(weight * v))} loss)" if weight else ""
                logger.info("    %s net output #%d: %s = %s%s", what, index, name, fmt(v), extra)
                index += 1

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
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            logger.info("Optimization stopped early.")
            return
        if p.display and self.iter % p.display == 0:
            with torch.no_grad():
                _, loss = self._forward_with_loss(self.net)
            if self._sync is not None:
                loss = _f32(self._sync.mean(loss))
            self._update_smoothed_loss(loss, start_iter, p.average_loss)
            logger.info("Iteration %d, loss = %s", self.iter, fmt(self._smoothed))
        if p.test_interval and self.iter % p.test_interval == 0 and self.is_root:
            self.test_all()
        logger.info("Optimization Done.")

    # -- testing -----------------------------------------------------------------------------------

    @staticmethod
    def _forward_with_loss(net) -> tuple[dict, np.float32]:
        outputs = net.forward()
        loss = _f32(0)
        for name, blob in net.blobs.items():
            w = net.blob_loss_weights.get(name, 0.0)
            if w:
                loss = _f32(loss + _f32(w) * _f32(np.sum(np.asarray(blob.data, dtype=np.float32))))
        return outputs, loss

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
        p = self.param
        logger.info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        test_net = self.test_nets[test_net_id]
        test_net.share_trained_layers_with(self.net)
        n_iter = p.test_iter[test_net_id]
        scores: list[np.ndarray] | None = None
        loss = _f32(0)
        with torch.no_grad():
            for _ in range(n_iter):
                request = self._requested_action()
                while request != signals.NONE:
                    if request == signals.SNAPSHOT:
                        self.snapshot()
                    elif request == signals.STOP:
                        self.requested_early_exit = True
                    request = self._requested_action()
                if self.requested_early_exit:
                    break
                outputs, iter_loss = self._forward_with_loss(test_net)
                if p.test_compute_loss:
                    loss = _f32(loss + iter_loss)
                vals = [np.array(outputs[o], dtype=np.float32).ravel() for o in test_net.outputs]
                if scores is None:
                    scores = vals
                else:
                    for acc, v in zip(scores, vals):
                        acc += v
        if self.requested_early_exit:
            logger.info("Test interrupted.")
            return []
        if p.test_compute_loss:
            logger.info("Test loss: %s", fmt(_f32(loss / _f32(n_iter))))
        result = []
        index = 0
        for name, acc in zip(test_net.outputs, scores or []):
            weight = _f32(test_net.blob_loss_weights.get(name, 0.0))
            for v in acc:
                mean = _f32(v / _f32(n_iter))
                extra = f" (* {fmt(weight)} = {fmt(_f32(weight * mean))} loss)" if weight else ""
                logger.info("    Test net output #%d: %s = %s%s", index, name, fmt(mean), extra)
                result.append((name, float(mean)))
                index += 1
        return result

    # -- snapshots ---------------------------------------------------------------------------------

    def _snapshot_filename(self, extension: str) -> str:
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{extension}"

    def snapshot(self) -> str | None:
        """Write ``<prefix>_iter_<N>.caffemodel[.h5]`` and ``.solverstate[.h5]`` (atomically).

        Returns the solverstate's path; on ranks other than 0 of a multi-process run, writes
        nothing and returns None (rank 0 holds the same weights and history).
        """
        self._settle()  # a bad label of a pass whose loss is still on the device raises first
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
        self._skip_batches(self.net, self.iter * p.iter_size)
        if not self.test_nets or not p.test_interval or not self.is_root:
            return
        n_tests = sum(1 for k in range(0, self.iter, p.test_interval) if k > 0 or p.test_initialization)
        for i, net in enumerate(self.test_nets):
            self._skip_batches(net, n_tests * p.test_iter[i])

    @staticmethod
    def _skip_batches(net, n: int) -> None:
        if n <= 0:
            return
        for layer in net.layers:
            if hasattr(layer, "skip_batches"):
                layer.skip_batches(n)
            elif getattr(layer, "type", "") in _DATA_LAYER_TYPES:
                with torch.no_grad():
                    for _ in range(n):
                        layer()
