"""The update engine: how every solver type's update runs fast, with Caffe's float32 values.

BVLC/caffe src/caffe/solvers/sgd_solver.cpp ``ApplyUpdate``: clip, then per learnable parameter
normalize, regularize and the solver type's ``ComputeUpdateValue``; then ``net.Update()``
(``W -= diff``). ``Solver.apply_update`` asks the engine for exactly that::

    clip:       if clip_gradients >= 0 and L = ||all diffs||_2 > clip: diff *= clip / L
    for each learnable param i (net.learnable_params order):
      normalize:  if iter_size > 1: diff *= 1 / iter_size
      regularize: local_decay = weight_decay * decay_mult_i
                  L2: diff += local_decay * W     L1: diff += local_decay * sign(W)
      solver.update_rule(i, diff, history_i, rate * lr_mult_i)   # the type's one hook
      W -= diff

The solver type supplies only its rule (``update_rule``; SGD's ``update_history``, see
``Solver.diff_is_history``). The engine owns every way of running it, chosen per parameter by
the solver's switches (``fused_update``, ``update_chunk``, ``fused_kernel``, ``foreach_update``,
``compiled_update``); all but ``compiled_update`` give the same float32 values bit for bit:

- the reference path: whole tensors, one operation after the other;
- chunked (CPU, ``fused_update``): the same operations ``update_chunk`` elements at a time, so
  that the chain works in the CPU's cache (one dense 1-d view per tensor, ``flat_views``);
- for the momentum-SGD rule (``V = momentum * V + local_rate * g; W -= V``, a solver type with
  ``momentum_sgd_rule``) three more: multi-tensor ``torch._foreach_*`` operations on whole
  tensors (GPU), torch's one-pass fused SGD kernel ``torch._fused_sgd_`` (CPU; GPU where it
  matches, see below), and an opt-in ``torch.compile``'d kernel per parameter.

``torch._fused_sgd_`` is a private torch kernel. It computes Caffe's form with lr 1 and
dampening ``1 - local_rate``; whether its float32 values equal the separate operations' on a
device is a property of how torch was compiled, so the engine probes it once per process and
device (``fused_sgd_matches``) and falls back to the operations when it differs, raises, or is
missing from this torch build. The scalar tail of its CPU kernel (the last ``numel % 16``
elements) rounds differently, so on the CPU those elements take the operations.

Under fp16 loss scaling the diffs are first unscaled by the ``LossScaler``, which skips the
update when one of them is inf/nan.
"""

from __future__ import annotations

import numpy as np
import torch

from caffe_compat.blob import diff_owner, raw_data
from caffe_compat.solvers.log import fmt, logger

__all__ = ["UpdateEngine", "LossScaler", "fused_sgd_matches"]


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


class UpdateEngine:
    """Runs ``solver``'s update (see the module docstring). It reads the solver's net,
    ``param``, ``history``, speed switches and rule hooks at every call, so a switch changed
    between iterations takes effect at the next update."""

    def __init__(self, solver):
        self.solver = solver
        self._groups = None  # (key, decay groups, rate groups) of the foreach path
        self._kgroups = None  # (key, groups) of the whole-tensor fused kernel
        self._compiled = None  # the torch.compile'd SGD kernel

    # -- per-parameter scalars (Caffe's float32 arithmetic) ----------------------------------------

    def normalize_factor(self) -> float:
        """``1 / iter_size`` in float32, as Caffe computes it."""
        return float(_f32(1.0) / _f32(self.solver.param.iter_size))

    def local_decay(self, i: int) -> float:
        s = self.solver
        return float(_f32(s.param.weight_decay) * _f32(s.net.params_weight_decay[i]))

    def local_rate(self, i: int, rate: float) -> float:
        return float(_f32(rate) * _f32(self.solver.net.params_lr[i]))

    def history_of(self, i: int) -> list[torch.Tensor]:
        """Parameter i's tensor in each history set (``history`` holds set after set)."""
        s = self.solver
        n = len(s.net.learnable_params)
        return [s.history[k * n + i] for k in range(s.num_history_sets)]

    # -- the pipeline ------------------------------------------------------------------------------

    def apply(self, rate: float, check_gradients=None) -> bool:
        """One update from the accumulated diffs at learning rate ``rate``; False when the loss
        scaler skipped it. ``check_gradients(sumsq)``, if given, is called before anything is
        updated with the clipping's sum of squares (when clipping is on)."""
        s = self.solver
        params = s.net.learnable_params
        with torch.no_grad():
            for p in params:  # diffs still lent by a history: copies of their own
                diff_owner(p).own()
            if s.loss_scaler is not None and not s.loss_scaler.unscale_(params, s.iter):
                return False
            sumsq = self.clip_gradients()
            if sumsq is not None and check_gradients is not None:
                check_gradients(sumsq)
            # the update value is history 0: not written to the diff, which becomes its alias
            alias = s.diff_is_history and getattr(s.net, "supports_diff_alias", False)
            todo = list(range(len(params)))
            if alias and s.momentum_sgd_rule and not s.compiled_update:
                todo = self._sgd_fast_paths(todo, rate)
            for i in todo:
                if s.compiled_update and s.momentum_sgd_rule and self._compiled_step(i, rate):
                    continue
                self._update_param(i, rate, alias)
            # the paths above write through ``.data``: tell torch the weights changed (a packed
            # copy of them, ``runners/inference.py``, or a kept autograd graph then knows)
            torch.autograd.graph.increment_version(params)
        return True

    def clip_gradients(self) -> float | None:
        """If ``clip_gradients >= 0``: the diffs' sum of squares (Caffe's, in double then float),
        and when their L2 norm exceeds it, every diff scaled by ``clip_gradients / norm``.
        None (nothing computed) when clipping is off."""
        s = self.solver
        clip = _f32(s.param.clip_gradients)
        if clip < 0:
            return None
        params = s.net.learnable_params
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
        return sumsq

    def normalize(self, g: torch.Tensor) -> None:
        """``diff *= 1 / iter_size`` (the diffs of ``iter_size`` passes were summed)."""
        if self.solver.param.iter_size != 1:
            g.mul_(self.normalize_factor())

    def regularize(self, i: int, w: torch.Tensor, g: torch.Tensor) -> None:
        """L2: ``diff += weight_decay * decay_mult * W``; L1: ``... * sign(W)``."""
        local_decay = self.local_decay(i)
        if not local_decay:
            return
        if self.solver.param.regularization_type == "L2":
            g.add_(w, alpha=local_decay)
        else:
            g.add_(torch.sign(w), alpha=local_decay)

    def _update_param(self, i: int, rate: float, alias: bool) -> None:
        """The reference operations for parameter i, piece by piece (``update_pieces``)."""
        s = self.solver
        local_rate = self.local_rate(i, rate)
        for w, g, hist in self.update_pieces(i):
            self.normalize(g)
            self.regularize(i, w, g)
            if alias:
                s.update_history(i, g, hist, local_rate)
                w.sub_(hist[0])
            else:
                s.update_rule(i, g, hist, local_rate)
                w.sub_(g)
        if alias:
            diff_owner(s.net.learnable_params[i]).lend(self.history_of(i)[0])

    def update_pieces(self, i: int):
        """``(W, diff, [history...])`` pieces of parameter i to update one after the other: on the
        CPU with ``fused_update``, ``update_chunk`` elements at a time (the chain of element-wise
        operations then works in the cache); otherwise the whole tensors (on a GPU chunks would
        only multiply kernel launches)."""
        s = self.solver
        p = s.net.learnable_params[i]
        flat = self.flat_views(i) if s.fused_update and p.device.type == "cpu" else None
        if flat is None:
            return [(raw_data(p), p.grad, self.history_of(i))]
        w, g, hist = flat
        step = max(int(s.update_chunk), 1)
        return ((w[k : k + step], g[k : k + step], [h[k : k + step] for h in hist]) for k in range(0, w.numel(), step))

    def flat_views(self, i: int):
        """1-d views of parameter i's data, diff and history in memory order (None if they do not
        share one dense layout, e.g. a channels_last weight with a contiguous diff)."""
        p = self.solver.net.learnable_params[i]
        g = p.grad
        hist = self.history_of(i)
        w = raw_data(p)
        tensors = [w, g, *hist]
        stride = tuple(w.stride())
        if g is None or any(t.stride() != stride or t.shape != p.shape or t.storage_offset() for t in tensors[1:]):
            return None
        if not _dense(w):
            return None
        return tuple(t.as_strided((t.numel(),), (1,)) for t in tensors[:2]) + (
            [h.as_strided((h.numel(),), (1,)) for h in hist],
        )

    # -- the momentum-SGD rule's fast paths --------------------------------------------------------

    def _sgd_fast_paths(self, todo: list[int], rate: float) -> list[int]:
        """Update what the foreach path (whole tensors: GPU, or ``foreach_update = True``) and the
        CPU fused kernel take; returns the positions left for the per-parameter path."""
        s = self.solver
        params = s.net.learnable_params
        whole = [i for i in todo if not (s.fused_update and params[i].device.type == "cpu")]
        use = s.foreach_update
        if whole and (use or (use is None and params[whole[0]].device.type == "cuda")):
            if self._foreach_step(whole, rate):
                done = set(whole)
                todo = [i for i in todo if i not in done]
        if s.fused_update and s.fused_kernel:
            done = self._fused_kernel_step([i for i in todo if params[i].device.type == "cpu"], rate)
            todo = [i for i in todo if i not in done]
        return todo

    def fused_kernel_usable(self) -> bool:
        """Whether this process would update through the fused SGD kernel (processes training
        together agree on it: see ``Solver._init_distributed``)."""
        s = self.solver
        params = s.net.learnable_params
        if not (s.momentum_sgd_rule and params):
            return False
        device = params[0].device
        return fused_sgd_matches(device, whole=device.type != "cpu")

    def _foreach_step(self, indices: list[int], rate: float) -> bool:
        """The whole-tensor update of ``indices`` through multi-tensor operations (a few kernel
        launches for all of them), each tensor getting the per-parameter path's operations in its
        order; the diffs are left as aliases of the history. False (nothing done) for L1 or
        mixed devices/dtypes."""
        s = self.solver
        if s.param.regularization_type != "L2":
            return False
        params = s.net.learnable_params
        if len({(params[i].device, params[i].dtype) for i in indices}) != 1:
            return False  # foreach operations take one device and dtype per call
        ws = [raw_data(params[i]) for i in indices]
        gs = [params[i].grad for i in indices]
        hs = [s.history[i] for i in indices]  # history set 0
        if s.param.iter_size != 1:
            torch._foreach_mul_(gs, self.normalize_factor())
        if not self._whole_kernel_step(indices, rate, ws, gs, hs):
            decays, rates = self._foreach_groups(indices, rate)
            for decay, sel in decays:  # one call per distinct scalar
                torch._foreach_add_([gs[j] for j in sel], [ws[j] for j in sel], alpha=decay)
            torch._foreach_mul_(hs, float(s.param.momentum))
            for local_rate, sel in rates:
                torch._foreach_add_([hs[j] for j in sel], [gs[j] for j in sel], alpha=local_rate)
            torch._foreach_sub_(ws, hs)
        for i, h in zip(indices, hs):
            diff_owner(params[i]).lend(h)
        return True

    def _whole_kernel_step(self, indices: list[int], rate: float, ws: list, gs: list, hs: list) -> bool:
        """The foreach path's regularization and update through ``torch._fused_sgd_`` on whole
        tensors (one call per (decay, local rate) group), where the probe finds it equal to the
        operations on this device and every parameter, diff and history share one dense layout;
        False (nothing done) otherwise."""
        s = self.solver
        momentum = float(s.param.momentum)
        if not (s.fused_kernel and momentum) or ws[0].dtype != torch.float32:
            return False
        if not fused_sgd_matches(ws[0].device, whole=True):  # cached: before the per-tensor checks
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
        """What the groups by decay and rate depend on (they are cached under it)."""
        s = self.solver
        net = s.net
        return (rate, s.param.weight_decay, tuple(indices), tuple(net.params_lr), tuple(net.params_weight_decay))

    def _kernel_groups(self, indices: list[int], rate: float) -> list | None:
        """``[(decay, local rate, positions)]`` of ``indices`` for the fused kernel (None if some
        local rate does not survive the kernel's ``1 - dampening``)."""
        key = self._groups_key(indices, rate)
        if self._kgroups is None or self._kgroups[0] != key:
            pairs = [(self.local_decay(i), self.local_rate(i, rate)) for i in indices]
            ok = all(_kernel_takes(r) for _, r in pairs)
            groups = [(d, r, sel) for (d, r), sel in _by_value(pairs).items()] if ok else None
            self._kgroups = (key, groups)
        return self._kgroups[1]

    def _foreach_groups(self, indices: list[int], rate: float) -> tuple[list, list]:
        """The (nonzero decay, positions) and (local rate, positions) groups of ``indices``."""
        key = self._groups_key(indices, rate)
        if self._groups is None or self._groups[0] != key:
            decays = [(d, sel) for d, sel in _by_value([self.local_decay(i) for i in indices]).items() if d]
            rates = list(_by_value([self.local_rate(i, rate) for i in indices]).items())
            self._groups = (key, decays, rates)
        return self._groups[1], self._groups[2]

    def _fused_kernel_step(self, indices: list[int], rate: float) -> set[int]:
        """CPU parameters ``indices`` through ``torch._fused_sgd_`` in Caffe's form: one pass over
        W, the diff and V instead of four; the last ``numel % 16`` elements of each parameter (the
        kernel's scalar tail) take the operations. float32, L2 or no decay, momentum != 0 (at
        momentum 0 the kernel keeps no history); one call per (decay, local rate) group. Returns
        the positions updated, their diffs left as aliases of the history."""
        s = self.solver
        momentum = float(s.param.momentum)
        if not indices or s.param.regularization_type != "L2" or not momentum:
            return set()
        if not fused_sgd_matches(torch.device("cpu"), whole=False):
            return set()
        groups: dict[tuple[float, float], list] = {}
        for i in indices:
            flat = self.flat_views(i)
            if flat is None or flat[0].dtype != torch.float32 or flat[0].numel() < _VEC:
                continue
            local_rate = self.local_rate(i, rate)
            if not _kernel_takes(local_rate):
                continue
            groups.setdefault((self.local_decay(i), local_rate), []).append((i, flat))
        params = s.net.learnable_params
        norm = self.normalize_factor() if s.param.iter_size != 1 else None
        done: set[int] = set()
        for (decay, local_rate), members in groups.items():
            heads, tails = ([], [], []), []
            for i, (w, g, (h,)) in members:
                if norm is not None:  # diff *= 1 / iter_size: the operations' first step
                    g.mul_(norm)
                n = w.numel() - w.numel() % _VEC
                for dst, t in zip(heads, (w, g, h)):
                    dst.append(t[:n])
                if n < w.numel():
                    tails.append((i, w[n:], g[n:], h[n:]))
            _fused_sgd(*heads, decay, momentum, local_rate)
            for i, w, g, h in tails:
                self.regularize(i, w, g)
                s.update_history(i, g, [h], local_rate)
                w.sub_(h)
            for i, _ in members:
                diff_owner(params[i]).lend(s.history[i])
                done.add(i)
        return done

    def _compiled_step(self, i: int, rate: float) -> bool:
        """Normalize, regularize, update and ``W -= V`` for parameter i as one ``torch.compile``'d
        kernel (L2 or no decay); False when it does not apply or compiling failed (then the
        solver's ``compiled_update`` is switched off with a warning)."""
        s = self.solver
        if s.param.regularization_type != "L2":
            return False
        flat = self.flat_views(i)
        if flat is None:
            return False
        w, g, (v,) = flat
        if self._compiled is None:
            self._compiled = torch.compile(_sgd_kernel, **s.compiled_update_options)
        scalars = torch.tensor(
            [self.normalize_factor(), self.local_decay(i), float(s.param.momentum), self.local_rate(i, rate)],
            dtype=w.dtype,
            device=w.device,
        )
        try:
            self._compiled(w, g, v, scalars)
        except Exception as e:  # noqa: BLE001  (a compiler failure: eager from now on)
            logger.warning(
                "torch.compile of the SGD update failed (%s: %s); using the eager update", type(e).__name__, e
            )
            s.compiled_update = False
            return False  # nothing was written: the eager update follows
        return True


# -- torch's private fused SGD kernel ---------------------------------------------------------------

#: float32 elements per vector of torch's widest CPU kernels (AVX-512); the fused SGD kernel's
#: work units are multiples of it, so a multiple of it never reaches the kernel's scalar tail.
_VEC = 16
_FUSED_SGD_MATCHES: dict[tuple, bool] = {}


def _fused_sgd(ws, gs, hs, decay: float, momentum: float, local_rate: float) -> None:
    """Caffe's ``g' = g + decay*W; V = momentum*V + local_rate*g'; W -= V`` through torch's
    kernel: its ``buf = momentum*buf + (1 - dampening)*g'`` with lr 1 (``g'`` not written back)."""
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


def fused_sgd_matches(device: torch.device, whole: bool) -> bool:
    """Whether ``torch._fused_sgd_`` gives the SGD operations' float32 values on ``device``, bit
    for bit: on whole tensors (``whole``), or on their first ``numel - numel % 16`` elements (the
    CPU kernel's vector loop). Checked once per process and device on random data, lengths with
    and without a tail (the results depend only on how torch's kernels were compiled:
    floating-point contraction). False when the kernel is missing or raises: the operations then."""
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
    """Whether the kernel's ``1 - dampening`` (``dampening = 1 - local_rate``, in double) gives
    ``local_rate`` back exactly (not for rates below ~2^-29, whose low bits ``1 - rate`` drops)."""
    return 1.0 - (1.0 - local_rate) == local_rate


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _by_value(values: list) -> dict:
    """``{value: [positions holding it]}``, in first-seen order."""
    out: dict = {}
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
