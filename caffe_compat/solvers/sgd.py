"""Caffe's SGD solver (BVLC/caffe src/caffe/solvers/sgd_solver.cpp ComputeUpdateValue)."""

from __future__ import annotations

import torch

from caffe_compat.blob import alias_diff
from caffe_compat.solvers.base import Solver, register_solver
from caffe_compat.solvers.log import logger

__all__ = ["SGDSolver"]


@register_solver("SGD")
class SGDSolver(Solver):
    """Stochastic gradient descent with momentum, Caffe's form::

        V <- momentum * V + local_rate * g          (history: V, one blob per parameter)
        W <- W - V

    ``local_rate = rate * lr_mult``; ``g`` is the diff after clipping, 1/iter_size and weight
    decay (see :class:`~caffe_compat.solvers.base.Solver`). Parameters: ``momentum`` (0).

    Difference from ``torch.optim.SGD`` (which keeps ``buf = m * buf + g`` and steps
    ``lr * buf``): Caffe's history holds the learning rate, so at a ``step``/``multistep``
    change the old momentum keeps its old rate. This is Caffe's form.

    Speed (the same float32 values): on the CPU the update runs through torch's one-pass fused
    SGD kernel with its rate and dampening chosen so that it computes Caffe's form
    (``_fused_kernel_step``; ``fused_kernel = False``: the chunked operations); on a GPU through
    the same kernel on whole tensors where it gives the foreach operations' bits on that device,
    else through those operations.

    ``compiled_update = True`` (opt-in): with L2 (or no) weight decay, each parameter's
    ``g += decay * W; V = momentum * V + local_rate * g; diff = V; W -= V`` runs as one
    ``torch.compile``'d kernel (last-bit differences from Caffe possible, see ``Solver``).
    """

    diff_is_history = True

    def _foreach_step(self, indices: list[int], rate: float) -> bool:
        if self.param.regularization_type != "L2":
            return False
        params = self.net.learnable_params
        if len({(params[i].device, params[i].dtype) for i in indices}) != 1:
            return False  # foreach operations take one device and dtype per call
        ws = [params[i].data for i in indices]
        gs = [params[i].grad for i in indices]
        hs = [self.history[i] for i in indices]  # history set 0
        # the per-parameter path's operations on each tensor, in its order (normalize,
        # regularize, update); one call per distinct scalar where the scalar differs (decay, rate)
        if self.param.iter_size != 1:
            torch._foreach_mul_(gs, self.normalize_factor())
        if not self._whole_kernel_step(indices, rate, ws, gs, hs):
            decays, rates = self._foreach_groups(indices, rate)
            for decay, sel in decays:
                torch._foreach_add_([gs[j] for j in sel], [ws[j] for j in sel], alpha=decay)
            torch._foreach_mul_(hs, float(self.param.momentum))
            for local_rate, sel in rates:
                torch._foreach_add_([hs[j] for j in sel], [gs[j] for j in sel], alpha=local_rate)
            torch._foreach_sub_(ws, hs)
        for i, h in zip(indices, hs):
            alias_diff(params[i], h)
        return True

    def _fused_kernel_usable(self) -> bool:
        params = self.net.learnable_params
        if not params:
            return False
        device = params[0].device
        return _fused_sgd_matches(device, whole=device.type != "cpu")

    def _whole_kernel_step(self, indices: list[int], rate: float, ws: list, gs: list, hs: list) -> bool:
        """The foreach path's regularization and update (after the normalization) through
        ``torch._fused_sgd_`` on whole tensors (one call per (decay, local rate) group instead of
        four multi-tensor operations), where the kernel gives the same values as the operations
        on this device (``_fused_sgd_matches``, checked once per device) and every parameter,
        diff and history share one dense layout; False (nothing done) otherwise."""
        momentum = float(self.param.momentum)
        if not (self.fused_kernel and momentum) or ws[0].dtype != torch.float32:
            return False
        if not _fused_sgd_matches(ws[0].device, whole=True):  # cached: first, before the per-tensor checks
            return False
        for w, g, h in zip(ws, gs, hs):
            if g is None or not (w.stride() == g.stride() == h.stride()) or not _dense(w):
                return False
        groups = self._kernel_groups(indices, rate)
        if groups is None:
            return False
        for decay, local_rate, sel in groups:
            _fused_sgd([ws[j] for j in sel], [gs[j] for j in sel], [hs[j] for j in sel], decay, momentum, local_rate)
        return True

    def _groups_key(self, indices: list[int], rate: float) -> tuple:
        """What the update's groups by decay and rate depend on (they are cached under it)."""
        net = self.net
        return (rate, self.param.weight_decay, tuple(indices), tuple(net.params_lr), tuple(net.params_weight_decay))

    def _kernel_groups(self, indices: list[int], rate: float) -> list | None:
        """``[(decay, local rate, positions)]`` of ``indices`` for the fused kernel (None if some
        local rate does not survive the kernel's ``1 − dampening``), cached as ``_foreach_groups``."""
        key = self._groups_key(indices, rate)
        cached = self.__dict__.get("_kgroups")
        if cached is None or cached[0] != key:
            pairs = [(self.local_decay(i), self.local_rate(i, rate)) for i in indices]
            ok = all(_kernel_takes(r) for _, r in pairs)
            groups = [(d, r, sel) for (d, r), sel in _by_value(pairs).items()] if ok else None
            cached = self._kgroups = (key, groups)
        return cached[1]

    def _fused_kernel_step(self, indices: list[int], rate: float) -> set[int]:
        """``torch._fused_sgd_`` in Caffe's form: with lr 1 and dampening ``1 − local_rate`` its
        ``buf = momentum·buf + (1 − dampening)·g'``, ``W −= buf`` (``g' = g + decay·W``, not written
        back) is Caffe's ``V = momentum·V + local_rate·g'``, ``W −= V``: one pass over W, the diff
        and V instead of four. Its vector loop computes what the chunked operations compute, bit for
        bit (checked once per process on this machine, ``_fused_sgd_matches``); its scalar tail does
        not, so the last ``numel % 16`` elements of each parameter take the chunked operations.
        float32, L2 or no weight decay, momentum ≠ 0 (with momentum 0 the kernel keeps no history,
        Caffe's diff); one call per (decay, local rate) group."""
        momentum = float(self.param.momentum)
        if not indices or self.param.regularization_type != "L2" or not momentum:
            return set()
        if not _fused_sgd_matches(torch.device("cpu"), whole=False):
            return set()
        groups: dict[tuple[float, float], list] = {}
        for i in indices:
            flat = self._flat_views(i)
            if flat is None or flat[0].dtype != torch.float32 or flat[0].numel() < _VEC:
                continue
            local_rate = self.local_rate(i, rate)
            if not _kernel_takes(local_rate):
                continue
            groups.setdefault((self.local_decay(i), local_rate), []).append((i, flat))
        params = self.net.learnable_params
        norm = self.normalize_factor() if self.param.iter_size != 1 else None
        done: set[int] = set()
        for (decay, local_rate), members in groups.items():
            heads, tails = ([], [], []), []
            for i, (w, g, (h,)) in members:
                if norm is not None:  # diff *= 1 / iter_size: the chunked path's first operation
                    g.mul_(norm)
                n = w.numel() - w.numel() % _VEC
                for dst, t in zip(heads, (w, g, h)):
                    dst.append(t[:n])
                if n < w.numel():
                    tails.append((i, w[n:], g[n:], h[n:]))
            _fused_sgd(*heads, decay, momentum, local_rate)
            for i, w, g, h in tails:  # the chunked path's operations
                self._regularize(i, w, g)
                self.update_history(i, g, [h], local_rate)
                w.sub_(h)
            for i, _ in members:
                alias_diff(params[i], self.history[i])
                done.add(i)
        return done

    def _foreach_groups(self, indices: list[int], rate: float) -> tuple[list, list]:
        """The (nonzero decay, positions) and (local rate, positions) groups of ``indices``,
        computed again only when the rate, the multipliers or the weight decay change."""
        key = self._groups_key(indices, rate)
        cached = self.__dict__.get("_groups")
        if cached is None or cached[0] != key:
            decays = [(d, sel) for d, sel in _by_value([self.local_decay(i) for i in indices]).items() if d]
            rates = list(_by_value([self.local_rate(i, rate) for i in indices]).items())
            cached = self._groups = (key, decays, rates)
        return cached[1], cached[2]

    def update_history(self, i: int, g: torch.Tensor, hist: list[torch.Tensor], local_rate: float) -> None:
        hist[0].mul_(float(self.param.momentum)).add_(g, alpha=local_rate)

    def update_rule(self, i: int, g: torch.Tensor, hist: list[torch.Tensor], local_rate: float) -> None:
        self.update_history(i, g, hist, local_rate)
        g.copy_(hist[0])

    def _compiled_step(self, i: int, rate: float) -> bool:
        if self.param.regularization_type != "L2":
            return False
        flat = self._flat_views(i)
        if flat is None:
            return False
        w, g, (v,) = flat
        fn = self.__dict__.get("_sgd_kernel")
        if fn is None:
            fn = self._sgd_kernel = torch.compile(_sgd_kernel, **self.compiled_update_options)
        scalars = torch.tensor(
            [self.normalize_factor(), self.local_decay(i), float(self.param.momentum), self.local_rate(i, rate)],
            dtype=w.dtype,
            device=w.device,
        )
        try:
            fn(w, g, v, scalars)
        except Exception as e:  # noqa: BLE001  (a compiler failure: eager from now on)
            logger.warning(
                "torch.compile of the SGD update failed (%s: %s); using the eager update", type(e).__name__, e
            )
            self.compiled_update = False
            return False  # nothing was written: the eager update follows
        return True


#: float32 elements per vector of torch's widest CPU kernels (AVX-512); the fused SGD kernel's
#: work units are multiples of it, so a multiple of it never reaches the kernel's scalar tail.
_VEC = 16
_FUSED_SGD_MATCHES: dict[tuple, bool] = {}


def _fused_sgd(ws, gs, hs, decay: float, momentum: float, local_rate: float) -> None:
    torch._fused_sgd_(
        ws,
        gs,
        hs,
        weight_decay=decay,
        momentum=momentum,
        lr=1.0,
        dampening=1.0 - local_rate,
        nesterov=False,
        maximize=False,
        is_first_step=False,
    )


def _fused_sgd_matches(device: torch.device, whole: bool) -> bool:
    """Whether ``torch._fused_sgd_`` gives the SGD operations' float32 values on ``device``, bit
    for bit: on whole tensors (``whole``), or on their first ``numel − numel % 16`` elements (the
    CPU kernel's vector loop; its scalar tail rounds differently). Checked once per process and
    device on random data, lengths with and without a tail (the results depend only on how
    torch's kernels were compiled: floating-point contraction)."""
    key = (device.type, device.index, whole)
    if key not in _FUSED_SGD_MATCHES:
        ok = hasattr(torch, "_fused_sgd_")
        gen = torch.Generator().manual_seed(0)
        for n in (64 * _VEC, 64 * _VEC + 7) if whole else (64 * _VEC,):
            if not ok:
                break
            w, g, h = ((torch.randn(n, generator=gen) * s).to(device) for s in (1e-1, 1e-2, 1e-3))
            for decay, momentum, rate in (
                (0.0005000000237487257, 0.8999999761581421, 0.009999999776482582),
                (0.009999999776482582, 0.949999988079071, 0.0010000000474974513),
                (0.0, 0.8999999761581421, 0.019999999552965164),
            ):
                a, b = (w.clone(), g.clone(), h.clone()), (w.clone(), g.clone(), h.clone())
                if decay:
                    a[1].add_(a[0], alpha=decay)
                a[2].mul_(momentum).add_(a[1], alpha=rate)
                a[0].sub_(a[2])
                try:
                    _fused_sgd([b[0]], [b[1]], [b[2]], decay, momentum, rate)
                except (RuntimeError, TypeError, NotImplementedError):  # another torch, another device type
                    ok = False
                    break
                ok = ok and torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
        if not ok:
            logger.debug("torch._fused_sgd_ differs from the SGD operations on %s; not using it", device)
        _FUSED_SGD_MATCHES[key] = ok
    return _FUSED_SGD_MATCHES[key]


def _kernel_takes(local_rate: float) -> bool:
    """Whether the kernel's ``1 − dampening`` (``dampening = 1 − local_rate``, in double) gives
    ``local_rate`` back exactly (not for rates below ~2⁻²⁹, whose low bits ``1 − rate`` drops)."""
    return 1.0 - (1.0 - local_rate) == local_rate


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _by_value(values: list[float]) -> dict[float, list[int]]:
    """``{value: [positions holding it]}``, in first-seen order."""
    out: dict[float, list[int]] = {}
    for j, v in enumerate(values):
        out.setdefault(v, []).append(j)
    return out


def _sgd_kernel(w: torch.Tensor, g: torch.Tensor, v: torch.Tensor, scalars: torch.Tensor) -> None:
    norm, decay, momentum, lr = scalars[0], scalars[1], scalars[2], scalars[3]
    u = g * norm + decay * w
    vn = v * momentum + lr * u
    v.copy_(vn)
    g.copy_(vn)
    w.sub_(vn)
