"""Training on several processes (GPUs) with ``torch.distributed``: Caffe's multi-GPU semantics.

Caffe trains on N GPUs with one solver per GPU (``caffe train --gpu 0,1``; BVLC/caffe
src/caffe/parallel.cpp): every solver runs its own ``batch_size`` (× ``iter_size``), the
gradients of all solvers are summed and scaled by 1/N before each solver's ``ApplyUpdate``, so the
effective batch is N × ``batch_size`` × ``iter_size`` and every solver applies the same update to
the same weights. Only the root solver logs, tests and snapshots. We do the same with one process
per device (NCCL on GPUs, gloo on CPUs)::

    after the iter_size forward/backward passes of iteration k, on every rank r:
        g_i := (1/N) * sum_r g_i^(r)          # all_reduce(SUM) then scale by float32(1/N)
        loss := (1/N) * sum_r loss^(r)         # what rank 0 displays
    then the solver's ApplyUpdate as usual: clip -> normalize (1/iter_size) -> regularize -> update

Why an explicit all_reduce and not ``DistributedDataParallel``: (1) the Net is driven by the
solver (``forward_backward`` × ``iter_size`` then ``apply_update``), not by a module's
``forward``; DDP reduces during backward, which with ``iter_size`` > 1 needs ``no_sync`` and
would average each pass rather than the accumulated sum; (2) Caffe reduces the accumulated
diffs once, right before ``ApplyUpdate``, so gradient clipping sees the *averaged* gradient — the
explicit reduction keeps exactly that order; (3) the gradients stay in the learnable
parameters' ``.grad`` (Caffe's diffs), which snapshots with ``snapshot_diff`` and pycaffe read.
Communication nevertheless overlaps the backward pass, as in Caffe (``layer_wise_reduce``, default
true): the solver arms the sync before the *last* of its ``iter_size`` passes, and each bucket
is all-reduced (asynchronously) as soon as that pass has produced all its gradients, from
autograd's post-accumulate hooks; ``average_gradients`` waits for those, reduces the rest and
scales by 1/N. The sums are the same as reducing everything afterwards (``layer_wise_reduce:
false``). Gradients are flattened into buckets of ``BUCKET_BYTES`` (per dtype and device) so that
a net costs few collectives; the loss and the stop/snapshot requests of the signal handlers ride
in the last bucket reduced after the pass (or alone, when every bucket went during it).

Every rank reads its own share of the training data (the data layers' ``set_shard``: rank r of
N keeps batches r, r+N, r+2N... of the single-process order), so N ranks × ``batch_size`` train
exactly as one process with ``iter_size: N`` (up to float summation order).

Deliberate differences from Caffe: the displayed loss is the mean over ranks (Caffe shows the
root solver's own); data are interleaved by batch, not by record; a SIGINT/SIGHUP seen by any
rank acts on all of them at the same iteration (an all_reduce of the requests).

``launch(fn, nprocs, ...)`` starts ``nprocs`` processes (``torch.multiprocessing`` spawn) that
join one process group through a ``TCPStore`` on 127.0.0.1 that the parent opens on a free port
(no port race); ``tools/train.py --gpu 0,1`` and ``--cpu-procs N`` use it, and
``init_from_env()`` joins a group started by ``torchrun``.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import signal
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from caffe_compat.blob import diff_owner

__all__ = [
    "NCCL",
    "attach_solver",
    "has_nccl",
    "BUCKET_BYTES",
    "DEFAULT_TIMEOUT",
    "DistributedSync",
    "agree_seed",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "init_process_group",
    "is_distributed",
    "launch",
    "launched_by_torchrun",
    "quiet_non_root_logging",
]

#: Gradients are all-reduced in flat buckets of at most this many bytes.
BUCKET_BYTES = 32 * 2**20

#: How long a rank waits in a collective (e.g. while rank 0 tests) before failing; environment
#: variable ``CAFFE_COMPAT_DIST_TIMEOUT`` (seconds) overrides it.
DEFAULT_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("CAFFE_COMPAT_DIST_TIMEOUT", "3600")))

_log = logging.getLogger("caffe_compat")


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group of more than one process is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_process_group(
    backend: str,
    rank: int,
    world_size: int,
    *,
    store: Any = None,
    init_method: str | None = None,
    device_id: int | None = None,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Join a process group (``backend`` "nccl" or "gloo"); ``device_id`` selects this rank's GPU
    (``torch.cuda.set_device``) before NCCL starts."""
    if device_id is not None:
        torch.cuda.set_device(device_id)
    # torch 2.13: importing torch._dynamo (building a Net does) while a process group exists
    # takes references to the group that destroy_process_group does not drop; gloo's threads
    # then outlive it, and the process could abort on exit ("terminate called without an active
    # exception"). Imported before the group, it takes none.
    importlib.import_module("torch._dynamo")

    kwargs: dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world_size, "timeout": timeout}
    if store is not None:
        kwargs["store"] = store
    else:
        kwargs["init_method"] = init_method or "env://"
    dist.init_process_group(**kwargs)


def launched_by_torchrun() -> bool:
    """Whether the environment describes a process group (``torchrun``: RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) of more than one process."""
    env = os.environ
    return all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")) and int(env["WORLD_SIZE"]) > 1


def init_from_env(backend: str, device_id: int | None = None) -> tuple[int, int, int]:
    """Join the group ``torchrun`` describes; returns ``(rank, world_size, local_rank)``."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    init_process_group(backend, rank, world, init_method="env://", device_id=device_id)
    return rank, world, local_rank


class _DropInfoFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def quiet_non_root_logging() -> None:
    """On ranks other than 0, let only warnings and errors of the ``caffe_compat`` logger through
    (Caffe's workers do not log training progress)."""
    if get_rank() != 0 and not any(isinstance(f, _DropInfoFilter) for f in _log.filters):
        _log.addFilter(_DropInfoFilter())


def attach_solver(solver, seed: int, broadcast: bool = True) -> None:
    """Make ``solver`` one rank of the initialized group (``Solver._init_distributed``): shard
    its train net's data layers, average its gradients before every update (a
    ``DistributedSync``), ``broadcast`` rank 0's weights, agree on the update path (every rank
    updates its weights through the same operations) and seed each rank's own random draws."""
    _log.info("Training on %d processes (this is rank %d)", solver.world_size, solver.rank)
    quiet_non_root_logging()
    for layer in solver.net.layers:
        layer.set_shard(solver.rank, solver.world_size)  # Layer.set_shard: data layers keep their share
    # Caffe's layer_wise_reduce (default true): reduce during the last backward pass
    solver._sync = DistributedSync(solver.net.learnable_params, overlap=solver.param.layer_wise_reduce)
    if broadcast:
        solver._sync.broadcast(solver.net.learnable_params)
    # every rank takes part in this reduction, whatever its own answer
    if solver._sync.any(not (solver.fused_kernel and solver.engine.fused_kernel_usable())):
        solver.fused_kernel = False
    if seed >= 0:  # Dropout & co. draw differently on each rank from here on
        torch.manual_seed(int(np.random.SeedSequence([seed, solver.rank]).generate_state(1)[0]))


def agree_seed(seed: int) -> int:
    """The seed every rank uses: ``seed`` when it is >= 0 (all ranks read the same solver), else
    one drawn by rank 0 and broadcast, so that data shuffles agree and the shards are disjoint."""
    if seed < 0:
        seed = int(np.random.SeedSequence().generate_state(1)[0]) if get_rank() == 0 else 0
    t = torch.tensor([seed], dtype=torch.int64, device=_collective_device())
    dist.broadcast(t, src=0)
    return int(t.item())


def _arrive(ref: weakref.ref, bucket: int) -> None:
    sync = ref()
    if sync is not None:
        sync._arrive(bucket)


class DistributedSync:
    """The link between one solver and its peers: gradient averaging, parameter broadcast,
    agreement on flags. Built by the Solver when a process group of > 1 processes exists.

    ``params``: the learnable parameters (``net.learnable_params``), identical in shape and order
    on every rank. Bucketed by dtype and device up to ``bucket_bytes``.
    """

    def __init__(self, params: Sequence[torch.Tensor], *, bucket_bytes: int = BUCKET_BYTES, overlap: bool = True):
        if not is_distributed():
            raise RuntimeError("DistributedSync needs an initialized process group of more than one process")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = _collective_device()
        self.params = list(params)
        self.buckets: list[list[int]] = []
        open_buckets: dict[tuple, tuple[list[int], int]] = {}
        for i, p in enumerate(self.params):
            key = (p.dtype, p.device)
            idx, size = open_buckets.get(key, ([], 0))
            nbytes = p.numel() * p.element_size()
            if idx and size + nbytes > bucket_bytes:
                self.buckets.append(idx)
                idx, size = [], 0
            idx.append(i)
            open_buckets[key] = (idx, size + nbytes)
        self.buckets.extend(idx for idx, _ in open_buckets.values() if idx)
        # overlap (Caffe's layer_wise_reduce): a bucket is reduced as soon as the armed backward
        # pass has produced all its gradients, while the pass goes on
        self.overlap = bool(overlap)
        self.overlapped_buckets = 0  # how many buckets were reduced during a backward pass
        self._armed = False
        self._launched: dict[int, tuple[Any, torch.Tensor]] = {}
        self._arrived: list[int] = []
        self._expected: list[int] = []
        self._hooks = []
        if self.overlap and self.params and hasattr(self.params[0], "register_post_accumulate_grad_hook"):
            bucket_of = {i: b for b, idx in enumerate(self.buckets) for i in idx}
            # the hooks live on the parameters: through a weak reference, so that they keep
            # neither this object nor (through it) every parameter alive once the solver is gone
            me = weakref.ref(self)
            for i, p in enumerate(self.params):
                self._hooks.append(p.register_post_accumulate_grad_hook(lambda _p, b=bucket_of[i]: _arrive(me, b)))
        else:
            self.overlap = False

    # -- collectives ------------------------------------------------------------------------------

    def _flat(self, tensors: list[torch.Tensor], extra: Sequence[float] = ()) -> torch.Tensor:
        parts = [t.reshape(-1) for t in tensors]
        if extra:
            parts.append(self._scalars(extra, tensors[0] if tensors else None))
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

    def _scalars(self, values: Sequence[float], like: torch.Tensor | None) -> torch.Tensor:
        """``values`` as a tensor of ``like``'s floating dtype and device (float64 on the group's
        device without one), to ride in a collective."""
        dtype = like.dtype if like is not None and like.is_floating_point() else torch.float64
        return torch.tensor(list(values), dtype=dtype, device=like.device if like is not None else self.device)

    @staticmethod
    def _unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> int:
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
        return offset

    def arm(self) -> None:
        """Before the last backward pass of an iteration (the gradients are final after it):
        reduce each bucket during that pass, as soon as all its gradients exist. Off unless
        ``overlap``; ``average_gradients`` collects the results."""
        if not self.overlap:
            return
        self._launched = {}
        self._arrived = [0] * len(self.buckets)
        self._expected = [sum(1 for i in idx if self.params[i].requires_grad) for idx in self.buckets]
        self._armed = True

    def _grads(self, idx: Sequence[int]) -> list[torch.Tensor]:
        grads = []
        for i in idx:
            grads.append(diff_owner(self.params[i]).writable())
        return grads

    def _arrive(self, b: int) -> None:
        # a parameter's gradient of the armed pass is complete (autograd's hook, in its thread;
        # every rank runs the same graph, so the buckets start in the same order everywhere)
        if not self._armed:
            return
        self._arrived[b] += 1
        if self._arrived[b] == self._expected[b]:
            with torch.no_grad():
                flat = self._flat(self._grads(self.buckets[b]))
                self._launched[b] = (dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True), flat)

    def __del__(self) -> None:
        for handle in getattr(self, "_hooks", ()):
            handle.remove()

    def average_gradients(self, loss: float = 0.0, flags: Sequence[int] = ()) -> tuple[float, list[int]]:
        """All-reduce every learnable parameter's ``.grad`` in place: sum over ranks, then scale by
        ``1/N`` (Caffe's order). Buckets reduced during the armed backward pass are collected;
        the others are reduced now. Returns the mean of ``loss`` over ranks and, for each of
        ``flags``, the number of ranks that raised it."""
        scale = 1.0 / self.world_size
        extra = [float(loss), *map(float, flags)]
        launched, self._launched, self._armed = self._launched, {}, False
        self.overlapped_buckets += len(launched)
        here = [b for b in range(len(self.buckets)) if b not in launched]
        with torch.no_grad():
            totals: list[float] | None = None
            for b, idx in enumerate(self.buckets):
                ts = self._grads(idx)
                if b in launched:
                    work, flat = launched[b]
                    work.wait()
                    self._unflatten(flat, ts)
                else:  # the loss and the flags ride with the last bucket reduced here
                    last = b == here[-1]
                    flat = self._flat(ts, extra if last else ())
                    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                    n = self._unflatten(flat, ts)
                    if last:
                        totals = flat[n:].double().cpu().tolist()
                for t in ts:
                    t.mul_(scale)
            if totals is None:  # every bucket went during the backward pass: the loss alone
                flat = self._scalars(extra, self.params[0] if self.params else None)
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                totals = flat.double().cpu().tolist()
        mean_loss = float(np.float32(np.float32(totals[0]) * np.float32(scale)))
        return mean_loss, [int(round(v)) for v in totals[1:]]

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        """Copy ``tensors`` (e.g. the parameters after loading weights) from rank ``src`` to all."""
        groups: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        with torch.no_grad():
            for ts in groups.values():
                flat = self._flat([t.detach() for t in ts])
                dist.broadcast(flat, src=src)
                self._unflatten(flat, [t.detach() for t in ts])

    def any(self, flag: bool) -> bool:
        """Whether any rank passes ``flag`` true (e.g. a stop requested during rank 0's test)."""
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return bool(t.item() > 0)

    def mean(self, value: float) -> float:
        """The mean of a float32 scalar over ranks."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(np.float32(np.float32(t.item()) * np.float32(1.0 / self.world_size)))


# -- launching ----------------------------------------------------------------------------------


def _worker(
    index: int,
    fn: Callable[..., Any],
    args: tuple,
    world_size: int,
    backend: str,
    port: int,
    devices: Sequence[int] | None,
    timeout_s: float,
) -> None:
    # Until the solver installs its SignalHandler, Ctrl-C kills the process (and the launcher
    # then the others) instead of a KeyboardInterrupt that torch's wrapper reports as success.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    store = dist.TCPStore(
        "127.0.0.1", port, world_size=None, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
    )
    device_id = devices[index] if devices else None
    init_process_group(
        backend, index, world_size, store=store, device_id=device_id, timeout=datetime.timedelta(seconds=timeout_s)
    )
    try:
        status = fn(index, world_size, *args)
        # every rank reaches the end before any tears its connections down: a rank that
        # destroyed the group while a peer was still in its last collective made gloo abort
        dist.barrier()
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # pragma: no cover (already torn down)
            pass
    if status:
        raise SystemExit(int(status))


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    args: tuple = (),
    *,
    backend: str = "gloo",
    devices: Sequence[int] | None = None,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    wall_timeout: float | None = None,
) -> int:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` spawned processes joined in one process
    group (``backend`` "gloo" or "nccl"; ``devices[rank]`` is rank's GPU). ``fn`` must be
    importable by name (module level). A non-zero return value is the process's exit status.

    ``timeout`` bounds each collective (a rank waiting for a dead peer fails); ``wall_timeout``
    (seconds, None: no limit) bounds the whole run: past it every process is killed and 124 is
    returned (tests use it so that nothing can hang).

    Returns 0 when every process succeeded, else the first failing process's exit status
    (the others are terminated). SIGINT/SIGHUP reaching this parent are left to the workers
    (they receive them too from the terminal, and stop or snapshot together).
    """
    import torch.multiprocessing as mp

    if nprocs < 1:
        raise ValueError(f"launch: nprocs must be >= 1 (got {nprocs})")
    if devices is not None and len(devices) < nprocs:
        raise ValueError(f"launch: {nprocs} processes but only {len(devices)} devices")
    store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, timeout=timeout)
    ctx = mp.start_processes(
        _worker,
        args=(
            fn,
            tuple(args),
            nprocs,
            backend,
            store.port,
            list(devices) if devices else None,
            timeout.total_seconds(),
        ),
        nprocs=nprocs,
        join=False,
        start_method="spawn",
    )
    previous = {}
    for s in (signal.SIGINT, getattr(signal, "SIGHUP", None)):
        if s is not None:
            try:
                previous[s] = signal.signal(s, lambda signum, frame: None)
            except ValueError:  # not the main thread
                break
    deadline = None if wall_timeout is None else time.monotonic() + wall_timeout
    try:
        while not ctx.join(timeout=1.0):
            if deadline is not None and time.monotonic() > deadline:
                _log.error("the %d processes ran past %s s; killing them", nprocs, wall_timeout)
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:
                    p.join(timeout=10)
                return 124
    except mp.ProcessExitedException as e:
        _log.error("process %d (of %d) exited with status %s", e.error_index, nprocs, e.exit_code)
        return int(e.exit_code) if e.exit_code and e.exit_code > 0 else 1
    except mp.ProcessRaisedException as e:
        _log.error("process %d (of %d) failed:\n%s", e.error_index, nprocs, e)
        return 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        del store
    return 0


# -- pycaffe's multi-process API (Caffe's python/train.py) --------------------------------------


def has_nccl() -> bool:
    """pycaffe's ``has_nccl()``: whether several GPUs can train together here (torch has NCCL and
    sees a CUDA device). CPU processes train together through gloo whatever this says."""
    return bool(dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available())


class NCCL:
    """pycaffe's ``caffe.NCCL``: joins a solver to the others of a multi-process run, as Caffe's
    ``python/train.py`` does it::

        uid = caffe.NCCL.new_uid()                    # in the parent, passed to each process
        # in process `rank` of N:
        caffe.set_mode_gpu(); caffe.set_device(gpus[rank])   # or stay on the CPU (gloo)
        caffe.set_solver_count(N); caffe.set_solver_rank(rank); caffe.set_multiprocess(True)
        solver = caffe.SGDSolver("solver.prototxt")
        nccl = caffe.NCCL(solver, uid)
        nccl.bcast()                                  # rank 0's weights to everyone
        solver.add_callback(nccl)
        if solver.param.layer_wise_reduce:
            solver.net.after_backward(nccl)
        solver.step(solver.param.max_iter)

    The processes join one ``torch.distributed`` group (NCCL when the solver's net is on a GPU,
    gloo on the CPU) through ``uid``, a ``file://`` rendezvous on this machine (Caffe's NCCL
    also trains on one machine). From then on the solver has Caffe's multi-GPU semantics (see
    this module's docstring): its share of the data, gradients averaged before every update,
    logging, tests and snapshots on rank 0. ``add_callback(nccl)`` and
    ``net.after_backward(nccl)`` are accepted for the scripts' sake: the averaging (overlapping
    the backward pass when ``layer_wise_reduce``) is already the solver's, from the moment the
    object exists. A group the script started itself (``init_process_group``) is used as is.
    """

    is_caffe_compat_nccl = True

    def __init__(self, solver, uid: str):
        from caffe_compat import mode
        from caffe_compat.errors import SolverError

        count, rank = mode.solver_count(), mode.solver_rank()
        if not dist.is_initialized():
            if count < 2:
                raise SolverError(
                    "NCCL(solver, uid): call caffe.set_solver_count(N) with the number of processes (N > 1) "
                    "and caffe.set_solver_rank(rank) in each process first"
                )
            if rank >= count:
                raise SolverError(f"NCCL(solver, uid): solver rank {rank} is not below the solver count {count}")
            if not isinstance(uid, str) or "://" not in uid:
                raise SolverError(f"NCCL(solver, uid): uid must come from caffe.NCCL.new_uid(), got {uid!r}")
            params = list(solver.net.learnable_params)
            device = params[0].device if params else mode.current_device()
            backend = "nccl" if device.type == "cuda" else "gloo"
            init_process_group(
                backend, rank, count, init_method=uid, device_id=device.index if device.type == "cuda" else None
            )
        elif count > 1 and (dist.get_world_size() != count or dist.get_rank() != rank):
            raise SolverError(
                f"NCCL(solver, uid): the process group has {dist.get_world_size()} processes and this is rank "
                f"{dist.get_rank()}, but solver_count() is {count} and solver_rank() is {rank}"
            )
        self.solver = solver
        solver.join_process_group(broadcast=False)

    @staticmethod
    def new_uid() -> str:
        """A fresh rendezvous for ``NCCL(solver, uid)``: a ``file://`` URL of a file that does not
        exist yet, in this machine's temporary folder (the processes share it)."""
        fd, path = tempfile.mkstemp(prefix="caffe_compat_nccl_")
        os.close(fd)
        os.unlink(path)
        return "file://" + path

    def bcast(self) -> None:
        """Rank 0's learnable parameters to every process (Caffe's NCCL::Broadcast)."""
        self.solver._sync.broadcast(self.solver.net.learnable_params)
