"""Caffe's global mode (CPU/GPU), device id and random seed, as pycaffe exposes them."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import random

import numpy as np
import torch

from caffe_compat.errors import CaffeError

__all__ = [
    "physical_cores",
    "tune_cpu",
    "cache_cpu_allocations",
    "allow_tf32",
    "apply_float32_numerics",
    "current_device",
    "mode",
    "set_device",
    "set_mode_cpu",
    "set_mode_gpu",
    "set_random_seed",
    "set_precision",
    "precision",
    "autocast_dtype",
    "set_compile",
    "compile_enabled",
    "solver_count",
    "set_solver_count",
    "solver_rank",
    "set_solver_rank",
    "multiprocess",
    "set_multiprocess",
]

_state = {"mode": "CPU", "device_id": 0, "solver_count": 1, "solver_rank": 0, "multiprocess": False}


def set_mode_cpu() -> None:
    """Run nets on the CPU (the default)."""
    _state["mode"] = "CPU"


def set_mode_gpu() -> None:
    """Run nets on the CUDA device chosen by ``set_device`` (0 by default).

    Raises ``CaffeError`` when torch sees no CUDA device, rather than failing later.
    """
    if not torch.cuda.is_available():
        raise CaffeError("set_mode_gpu(): no CUDA device is available to torch; use set_mode_cpu()")
    _state["mode"] = "GPU"
    apply_float32_numerics()


def allow_tf32(allow: bool = True) -> None:
    """Opt in to TF32 matrix products and convolutions on GPUs that have them (Ampere and later).

    A departure from Caffe's float32 numerics (10-bit mantissas inside the products), off by
    default: with it off, GPU results match real Caffe's fixtures like the CPU's.
    """
    _state["tf32"] = bool(allow)
    apply_float32_numerics()


def apply_float32_numerics() -> None:
    """Set torch's CUDA math flags to what the user chose (IEEE float32 unless ``allow_tf32``)."""
    tf32 = bool(_state.get("tf32", False))
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def set_device(device_id: int) -> None:
    """Choose the CUDA device used in GPU mode."""
    if torch.cuda.is_available() and not 0 <= device_id < torch.cuda.device_count():
        raise CaffeError(f"set_device({device_id}): no such GPU; torch sees {torch.cuda.device_count()} device(s)")
    _state["device_id"] = int(device_id)


def mode() -> str:
    return _state["mode"]


def current_device() -> torch.device:
    if _state["mode"] == "GPU":
        return torch.device("cuda", _state["device_id"])
    return torch.device("cpu")


def solver_count() -> int:
    """pycaffe's ``solver_count()``: how many processes train together (``set_solver_count``)."""
    return _state["solver_count"]


def set_solver_count(count: int) -> None:
    """pycaffe's ``set_solver_count``: the number of processes an ``NCCL`` object joins."""
    if int(count) < 1:
        raise CaffeError(f"set_solver_count({count}): the count must be >= 1")
    _state["solver_count"] = int(count)


def solver_rank() -> int:
    """pycaffe's ``solver_rank()``: this process's rank among ``solver_count()`` (0: the root)."""
    return _state["solver_rank"]


def set_solver_rank(rank: int) -> None:
    """pycaffe's ``set_solver_rank``: this process's rank, in ``[0, solver_count())``."""
    if int(rank) < 0:
        raise CaffeError(f"set_solver_rank({rank}): the rank must be >= 0")
    _state["solver_rank"] = int(rank)


def multiprocess() -> bool:
    """pycaffe's multiprocess flag (``set_multiprocess``)."""
    return _state["multiprocess"]


def set_multiprocess(flag: bool) -> None:
    """pycaffe's ``set_multiprocess``: Caffe uses it to let each process's data layers read their
    own share; here every solver joined through ``NCCL`` reads its share (batches
    ``rank, rank + N, ...``) whatever the flag, which is kept for scripts that set it."""
    _state["multiprocess"] = bool(flag)


def set_random_seed(seed: int) -> None:
    """Seed every random source caffe_compat uses (fillers, Dropout, data shuffling, crops).

    Caffe seeds its mt19937; the streams cannot match Caffe's bit for bit, only in distribution.
    """
    seed = int(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def physical_cores() -> int:
    """Physical cores available to this process (logical CPUs when the topology is unknown)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/core_id") as f:
                core = f.read().strip()
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/physical_package_id") as f:
                pkg = f.read().strip()
        except OSError:
            return len(cpus)
        cores.add((pkg, core))
    return max(1, len(cores))


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_cpu(threads: int | None = None, cache_allocations: bool = True) -> dict:
    """Process-wide CPU settings for training speed (numerics are unchanged). Solvers on the CPU
    apply the allocation part by default (``cache_cpu_allocations``).

    - ``threads``: torch's intra-op threads; ``None`` means one per physical core
      (``physical_cores()``), which avoids hyper-thread pairs competing for one FPU.
    - ``cache_allocations``: tell glibc's malloc to serve large blocks from its heap and keep
      freed memory (``mallopt(M_MMAP_THRESHOLD, 1 GiB)``, ``mallopt(M_TRIM_THRESHOLD, 2 GiB)``).
      By default every tensor above a few MB is a fresh ``mmap`` whose pages the kernel
      zero-fills on first touch: for AlexNet that is ~10⁵ page faults per training iteration
      (a quarter of its time at small batches). The cost: the process keeps its peak heap.
      This changes the whole process (any other library allocating in it too) and cannot be
      undone for blocks already allocated; without glibc it does nothing.

    Returns what was applied: ``{"threads": n, "cache_allocations": bool}``.
    """
    n = int(threads) if threads else physical_cores()
    torch.set_num_threads(n)
    applied = False
    if cache_allocations:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            mallopt = getattr(libc, "mallopt", None) if libc is not None else None
        except OSError:  # pragma: no cover
            mallopt = None
        if mallopt is not None:
            applied = bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return {"threads": n, "cache_allocations": applied}


_allocations_cached: list[bool] = []


def cache_cpu_allocations() -> bool:
    """``tune_cpu``'s allocation caching alone (threads untouched), once per process; what the
    solvers and ``tools/time.py`` do on the CPU by default. ``CAFFE_COMPAT_CPU_MALLOC=default``
    in the environment leaves glibc's malloc as it is. Returns whether it is in effect."""
    if not _allocations_cached:
        if os.environ.get("CAFFE_COMPAT_CPU_MALLOC", "").lower() == "default":
            _allocations_cached.append(False)
        else:
            _allocations_cached.append(tune_cpu(torch.get_num_threads())["cache_allocations"])
    return _allocations_cached[0]


_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def set_precision(name: str) -> None:
    """Opt-in mixed precision for training: ``"fp32"`` (default, Caffe's numerics), ``"bf16"``
    or ``"fp16"``.

    With bf16/fp16, ``Net.forward_backward`` (the solvers' forward and backward) runs under
    ``torch.autocast``: convolutions and matrix products compute in the low precision, the
    parameters, their diffs, the solver's history and the update stay float32 (fp32 master
    weights), and the loss is summed in float32. With fp16, solvers built afterwards also scale
    the loss (``caffe_compat.solvers.base.LossScaler``: dynamic scale, an update with inf/nan
    diffs is skipped). A departure from Caffe's float32 numerics: results differ from the fixtures
    by the low precision's rounding (bf16: ~3 significant digits). Inference (``Net.forward``)
    stays float32. CPU: bf16 uses oneDNN's bf16 kernels where the CPU has them (AVX512-BF16,
    AMX); fp16 on the CPU is slow and meant for tests.
    """
    if name not in _PRECISIONS:
        raise CaffeError(f"set_precision({name!r}): use one of {', '.join(_PRECISIONS)}")
    _state["precision"] = name


def precision() -> str:
    """The training precision chosen by ``set_precision`` ("fp32" by default)."""
    return _state.get("precision", "fp32")


def autocast_dtype() -> torch.dtype | None:
    """The autocast dtype of the chosen precision (None for fp32)."""
    return _PRECISIONS[precision()]


def set_compile(enable: bool = True, **options) -> None:
    """Opt-in ``torch.compile`` of every ``Net`` built afterwards (see ``Net.compile``).

    ``options`` go to ``torch.compile`` (``mode=``, ``dynamic=``...). If compilation fails the
    net logs a warning and runs uncompiled.
    """
    _state["compile"] = bool(enable)
    _state["compile_options"] = dict(options)


def compile_enabled() -> tuple[bool, dict]:
    """Whether ``set_compile`` is on, and its options."""
    return bool(_state.get("compile", False)), dict(_state.get("compile_options", {}))
