"""Caffe's recurrent layers: RNN and LSTM (both on Caffe's RecurrentLayer semantics) and LSTMUnit.

Caffe builds an RNN or LSTM layer as a small "unrolled" net (one InnerProduct over all timesteps
of ``x``, then per timestep a Scale by ``cont_t``, an InnerProduct of the previous hidden state,
an Eltwise sum and a nonlinearity) and exposes the parameters of that net as the layer's blobs.
Here the same computation runs as a loop over timesteps with the same operations in the same
order; the blobs are those of the unrolled net, in the order it owns them, with its shapes, so
a .caffemodel written by Caffe for an LSTM/RNN net loads unchanged.

Sources: BVLC/caffe ``src/caffe/layers/recurrent_layer.cpp``, ``lstm_layer.cpp``,
``rnn_layer.cpp``, ``lstm_unit_layer.cpp`` (and ``.cu``), ``include/caffe/layers/
recurrent_layer.hpp``, ``lstm_layer.hpp``; ``RecurrentParameter`` in caffe.proto.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from caffe_compat.layers.base import Layer, register_layer
from caffe_compat.layers.common import _shape_str

__all__ = ["RecurrentLayer", "LSTMLayer", "RNNLayer", "LSTMUnitLayer", "lstm_unit"]


# ---------------------------------------------------------------------------------------------
# LSTMUnit


class _LSTMUnitFunction(torch.autograd.Function):
    """One LSTM step with Caffe's CPU gradient.

    Forward (lstm_unit_layer.cpp): gates ``[i', f', o', g']`` split along the last axis,
    ``i = sigmoid(i')``, ``f = cont * sigmoid(f')`` (0 where ``cont == 0``), ``o = sigmoid(o')``,
    ``g = tanh(g')``, ``c = f * c_prev + i * g``, ``h = o * tanh(c)``.

    Backward, as Caffe's ``Backward_cpu`` writes it, with ``f`` the cont-scaled forget gate:
    ``dc_term = dc + dh * o * (1 - tanh(c)^2)``, ``dc_prev = dc_term * f``,
    ``di' = dc_term * g * i * (1 - i)``, ``df' = dc_term * c_prev * f * (1 - f)``,
    ``do' = dh * tanh(c) * o * (1 - o)``, ``dg' = dc_term * i * (1 - g^2)``. For a ``cont`` of 0
    or 1 this is the exact gradient; for other values ``df'`` is not (autograd of the forward
    would give ``dc_term * c_prev * cont * s * (1 - s)`` with ``s = sigmoid(f')``, which is what
    Caffe's GPU kernel computes). No gradient for ``cont``.
    """

    @staticmethod
    def forward(ctx, c_prev: torch.Tensor, gates: torch.Tensor, cont: torch.Tensor):
        hdim = c_prev.shape[-1]
        gi, gf, go, gg = gates.split(hdim, dim=-1)
        i = torch.sigmoid(gi)
        o = torch.sigmoid(go)
        g = torch.tanh(gg)
        cont = cont.unsqueeze(-1)
        f = torch.where(cont == 0, torch.zeros_like(gf), cont * torch.sigmoid(gf))
        c = f * c_prev + i * g
        tanh_c = torch.tanh(c)
        h = o * tanh_c
        ctx.save_for_backward(c_prev, i, f, o, g, tanh_c)
        return c, h

    @staticmethod
    def backward(ctx, dc: torch.Tensor, dh: torch.Tensor):
        c_prev, i, f, o, g, tanh_c = ctx.saved_tensors
        c_term = dc + dh * o * (1 - tanh_c * tanh_c)
        d_c_prev = c_term * f if ctx.needs_input_grad[0] else None
        d_gates = None
        if ctx.needs_input_grad[1]:
            d_gates = torch.cat(
                (
                    c_term * g * i * (1 - i),
                    c_term * c_prev * f * (1 - f),
                    dh * tanh_c * o * (1 - o),
                    c_term * i * (1 - g * g),
                ),
                dim=-1,
            )
        return d_c_prev, d_gates, None


def lstm_unit(c_prev: torch.Tensor, gates: torch.Tensor, cont: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Caffe's LSTMUnit on tensors: ``c_prev (..., N, H)``, ``gates (..., N, 4H)`` ordered
    ``[i, f, o, g]``, ``cont (..., N)``; returns ``(c, h)``. ``cont`` gets no gradient."""
    return _LSTMUnitFunction.apply(c_prev, gates, cont.detach().to(gates.dtype))


@register_layer("LSTMUnit")
class LSTMUnitLayer(Layer):
    """One timestep of the LSTM nonlinearity (the helper layer of Caffe's LSTM).

    ``[i', f', o', g'] = x`` (split in that order along the last axis), ``i = sigmoid(i')``,
    ``f = sigmoid(f')``, ``o = sigmoid(o')``, ``g = tanh(g')``;
    ``c = cont * f * c_prev + i * g`` (exactly 0 forget term where ``cont == 0``);
    ``h = o * tanh(c)``.

    No parameters, no blobs. Bottoms: ``c_prev (1, N, H)``, ``x (1, N, 4H)`` (the gate inputs),
    ``cont (1, N)`` (sequence continuation indicators). Tops: ``c (1, N, H)``, ``h (1, N, H)``.

    Gradient: Caffe's CPU backward (see ``_LSTMUnitFunction``), which equals the exact gradient
    when ``cont`` is 0 or 1; for other ``cont`` values its forget-gate term uses the
    cont-scaled gate ``f (1 - f)``, as Caffe's CPU code does (Caffe's GPU code differs there).
    ``cont`` gets no gradient (Caffe refuses to backpropagate to it: AllowForceBackward is false
    for bottom 2; here it simply gets none).
    """

    exact_num_bottom = 3
    exact_num_top = 2

    def flops(self, bottom_shapes, top_shapes) -> int:
        """``10 · count``: 3 sigmoids, 2 tanh, 5 products and sums per hidden value."""
        return 10 * math.prod(top_shapes[0])

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        self._check_shapes(bottom_shapes)  # Caffe's Reshape CHECKs, run at setup too

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2

    def _check_shapes(self, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        c_prev, x, cont = shapes
        names = ("c_prev", "x", "cont")
        for k, s in enumerate(shapes):
            want = 2 if k == 2 else 3
            if len(s) != want:
                raise self.error(f"bottom {k} ({names[k]}) must have {want} axes, got {_shape_str(s)}")
            if s[0] != 1:
                raise self.error(
                    f"bottom {k} ({names[k]}) must hold a single timestep (axis 0 = 1), got {_shape_str(s)}"
                )
            if s[1] != c_prev[1]:
                raise self.error(
                    f"bottom {k} ({names[k]}) has {s[1]} streams on axis 1, bottom 0 (c_prev) has {c_prev[1]}"
                )
        if x[2] != 4 * c_prev[2]:
            raise self.error(
                f"bottom 1 (x) must have 4 * H = {4 * c_prev[2]} gate inputs on axis 2 "
                f"(H = {c_prev[2]} from c_prev), got {_shape_str(x)}"
            )
        return tuple(c_prev)

    def top_shapes(self, bottom_shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        s = self._check_shapes([tuple(b) for b in bottom_shapes])
        return [s, s]

    def forward(self, c_prev: torch.Tensor, x: torch.Tensor, cont: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._check_shapes([tuple(c_prev.shape), tuple(x.shape), tuple(cont.shape)])
        return lstm_unit(c_prev, x, cont)


# ---------------------------------------------------------------------------------------------
# RecurrentLayer


class RecurrentLayer(Layer):
    """Base of RNN and LSTM: Caffe's RecurrentLayer (not itself registered: Caffe's "Recurrent"
    type is abstract).

    Bottoms: ``x (T, N, ...)`` (at least 3 axes: the unrolled net's InnerProduct reads ``x``
    from axis 2), ``cont (T, N)``, optionally ``x_static (N, ...)`` (at least 2 axes), and with
    ``expose_hidden`` the initial states (after ``x_static`` when present). ``T`` is fixed at
    setup (Caffe: "input number of timesteps changed"); ``N`` may change between forwards.

    State: without ``expose_hidden`` each forward starts from the final state(s) of the previous
    forward (zeros at first), as Caffe copies ``h_T`` (and ``c_T``) into ``h_0`` (``c_0``) before
    each forward; ``cont_t = 0`` drops the carried state at step ``t``. The state is kept out of
    ``blobs`` (never saved to caffemodels), detached (no gradient into earlier batches) and not
    touched by shape inference. When ``N`` changes, it follows Caffe's blob memory: the carried
    state is the first ``N * H`` values of the last one (so the first streams keep their state
    when ``N`` shrinks), and all zeros when ``N * H`` exceeds the largest size seen so far.
    ``reset()`` zeros it (Caffe's ``RecurrentLayer::Reset``).

    With ``expose_hidden`` the initial states are bottoms and the final states extra tops. As in
    Caffe, where these blobs share data but not diffs with the unrolled net, no gradient flows
    into the initial-state bottoms nor back from the final-state tops.

    Gradients: to ``x``, ``x_static`` and every blob; none to ``cont`` (Caffe refuses it:
    AllowForceBackward is false for bottom 1; here it simply gets none).

    Parameters (``recurrent_param``): ``num_output`` (required, > 0), ``weight_filler`` /
    ``bias_filler`` (unset: constant 0), ``expose_hidden`` (false), ``debug_info`` (false;
    Caffe's debug log of the unrolled net is not reproduced).
    """

    #: Names of the recurrent state inputs / outputs, in Caffe's order.
    state_input_names: tuple[str, ...] = ()
    state_output_names: tuple[str, ...] = ()

    def flops(self, bottom_shapes, top_shapes) -> int:
        """Per row of the T·N rows: the input transform ``2·K·G``, the recurrent product
        ``2·H·G`` and the step's element-wise work (``_step_flops``); plus the static input's
        transform ``2·K_static·G`` once per stream."""
        T, n, H = bottom_shapes[0][0], bottom_shapes[0][1], self.num_output
        G = self.blobs[0].shape[0]
        per_row = 2 * self.K * G + 2 * H * G + self._step_flops(H)
        return T * n * per_row + (2 * self.K_static * G * n if self.static_input else 0)

    def _step_flops(self, H: int) -> int:
        raise NotImplementedError(f"{type(self).__name__}._step_flops")

    def _check_counts(self, nb: int, nt: int) -> None:
        expose = bool(self.param.recurrent_param.expose_hidden)
        states = self.state_input_names if expose else ()
        lo = 2 + len(states)
        if not lo <= nb <= lo + 1:
            extra = "".join(f", {s}" for s in states)
            raise self.error(
                f"takes {lo} or {lo + 1} bottom blobs (x, cont[, x_static]{extra}"
                f"{'; recurrent_param.expose_hidden is set' if expose else ''}), got {nb}"
            )
        ntop = 1 + (len(self.state_output_names) if expose else 0)
        if nt != ntop:
            extra = "".join(f", {s}" for s in self.state_output_names) if expose else ""
            raise self.error(f"takes exactly {ntop} top blob(s) (output{extra}), got {nt}")

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.recurrent_param
        self.num_output = int(p.num_output)
        if self.num_output <= 0:
            raise self.error("recurrent_param.num_output must be set to a positive number")
        self.expose_hidden = bool(p.expose_hidden)
        n_states = len(self.state_input_names) if self.expose_hidden else 0
        self.static_input = len(bottom_shapes) > 2 + n_states
        x = bottom_shapes[0]
        if len(x) < 3:
            raise self.error(
                f"bottom 0 (x) must be (T, N, ...) with at least 3 axes (the input transform reads x from "
                f"axis 2 on), got {_shape_str(x)}"
            )
        self.T = int(x[0])
        self.K = math.prod(x[2:])
        self.K_static = 0
        if self.static_input:
            xs = bottom_shapes[2]
            if len(xs) < 2:
                raise self.error(f"bottom 2 (x_static) must be (N, ...) with at least 2 axes, got {_shape_str(xs)}")
            self.K_static = math.prod(xs[1:])
        self.top_shapes(bottom_shapes)  # Caffe's LayerSetUp/Reshape CHECKs
        self.make_blobs(p)
        # The carried state: flat buffers (see the class docstring), not blobs, not saved.
        size = int(x[1]) * self.num_output
        self._state_names = tuple(f"_state_{k}" for k in range(len(self.state_input_names)))
        for name in self._state_names:
            self.register_buffer(name, torch.zeros(size), persistent=False)

    def make_blobs(self, p) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def top_shapes(self, bottom_shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        shapes = [tuple(int(d) for d in s) for s in bottom_shapes]
        x, cont = shapes[0], shapes[1]
        if len(x) < 3:
            raise self.error(f"bottom 0 (x) must be (T, N, ...) with at least 3 axes, got {_shape_str(x)}")
        t, n = x[0], x[1]
        if t != self.T:
            raise self.error(
                f"bottom 0 (x) has {t} timesteps on axis 0, the layer was set up for T = {self.T} "
                "(Caffe: input number of timesteps changed)"
            )
        if math.prod(x[2:]) != self.K:
            raise self.error(
                f"bottom 0 (x) {_shape_str(x)} has K = {math.prod(x[2:])} values per timestep and stream "
                f"(axes 2 on), the input transform weights expect K = {self.K}"
            )
        if cont != (t, n):
            raise self.error(f"bottom 1 (cont) must be (T, N) = {_shape_str((t, n))}, got {_shape_str(cont)}")
        k = 2
        if self.static_input:
            xs = shapes[2]
            if len(xs) < 2 or xs[0] != n:
                raise self.error(
                    f"bottom 2 (x_static) must be (N, ...) with N = {n} and at least 2 axes, got {_shape_str(xs)}"
                )
            if math.prod(xs[1:]) != self.K_static:
                raise self.error(
                    f"bottom 2 (x_static) {_shape_str(xs)} has {math.prod(xs[1:])} values per stream, the "
                    f"static transform weights expect {self.K_static}"
                )
            k = 3
        state_shape = (1, n, self.num_output)
        if self.expose_hidden:
            for j, name in enumerate(self.state_input_names):
                if shapes[k + j] != state_shape:
                    raise self.error(
                        f"bottom {k + j} ({name}) must be (1, N, num_output) = {_shape_str(state_shape)}, "
                        f"got {_shape_str(shapes[k + j])}"
                    )
            return [(t, n, self.num_output)] + [state_shape] * len(self.state_output_names)
        return [(t, n, self.num_output)]

    def reset(self) -> None:
        """Zero the state carried between forwards (Caffe's ``RecurrentLayer::Reset``)."""
        with torch.no_grad():
            for name in self._state_names:
                getattr(self, name).zero_()

    def _initial_states(self, n: int, like: torch.Tensor) -> list[torch.Tensor]:
        size = n * self.num_output
        if like.is_meta:  # shape inference: leave the state alone
            return [torch.empty((1, n, self.num_output), dtype=like.dtype, device="meta") for _ in self._state_names]
        out = []
        for name in self._state_names:
            buf = getattr(self, name)
            if buf.numel() < size:  # Caffe reallocates the blob: fresh zeros
                buf = torch.zeros(size, dtype=buf.dtype, device=buf.device)
                setattr(self, name, buf)
            out.append(buf[:size].view(1, n, self.num_output).to(device=like.device, dtype=like.dtype))
        return out

    def _keep_states(self, finals: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for name, s in zip(self._state_names, finals):
                buf = getattr(self, name)
                new = buf.to(device=s.device, dtype=s.dtype, copy=True)
                new[: s.numel()] = s.reshape(-1)
                setattr(self, name, new)

    def forward(self, *bottoms: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._run(bottoms, keep=True)

    def recompute(self, bottoms, tops):
        """The last forward again from the hidden state it started from, keeping nothing."""
        return self._run(bottoms, keep=False)

    def _run(self, bottoms, keep: bool) -> tuple[torch.Tensor, ...]:
        self.top_shapes([tuple(b.shape) for b in bottoms])
        x, cont = bottoms[0], bottoms[1]
        t, n = x.shape[0], x.shape[1]
        x = x.reshape(t, n, self.K)
        cont = cont.detach().to(x.dtype)
        k = 2
        x_static = None
        if self.static_input:
            x_static = bottoms[2].reshape(n, self.K_static)
            k = 3
        if self.expose_hidden:
            states = [b.detach() for b in bottoms[k:]]
        elif keep:
            states = self._initial_states(n, x)
            if not x.is_meta:
                self._last_initial = [s.detach().clone() for s in states]
        else:
            states = self.__dict__.get("_last_initial") or self._initial_states(n, x)
        out, finals = self.unroll(x, cont, x_static, states)
        if self.expose_hidden:
            return (out, *(s.detach() for s in finals))
        if keep and not x.is_meta:
            self._keep_states(finals)
        return (out,)

    def unroll(self, x, cont, x_static, states):  # pragma: no cover - overridden
        raise NotImplementedError

    def _input_transforms(self, x, x_static):
        """Blob 0 and 1's transform of every timestep at once ``(T, N, G)``, blob 2's of
        ``x_static`` ``(1, N, G)`` (or None), and the index of the first recurrent blob."""
        xw = F.linear(x, self.blobs[0], self.blobs[1])
        if x_static is None:
            return xw, None, 2
        return xw, F.linear(x_static, self.blobs[2]).unsqueeze(0), 3

    @staticmethod
    def _step_sum(w_rec, h, cont, xw, static, t: int):
        """Step ``t``'s input to its nonlinearity: ``W_rec (cont_t · h) + xw_t [+ static]``, summed
        in that order as Caffe's unrolled net's Eltwise does."""
        total = F.linear(h * cont[t : t + 1].unsqueeze(-1), w_rec) + xw[t : t + 1]
        return total if static is None else total + static


@register_layer("LSTM")
class LSTMLayer(RecurrentLayer):
    """Long short-term memory over ``T`` timesteps of ``N`` streams (Caffe's LSTMLayer).

    With ``H = num_output`` and ``cont_t`` the continuation indicators of step ``t``::

        W_xc_x  = W_xc x + b_c                                  (all timesteps at once)
        gate_t  = W_hc (cont_t * h_{t-1}) + W_xc_x_t [+ W_xc_static x_static]
        [i', f', o', g'] = gate_t                                (this order, H each)
        i = sigmoid(i'), f = sigmoid(f'), o = sigmoid(o'), g = tanh(g')
        c_t = cont_t * f * c_{t-1} + i * g
        h_t = o * tanh(c_t)

    (the sums in that order, as Caffe's Eltwise adds them; the step is ``LSTMUnit``, with its
    gradient). No peephole ("diagonal") connections.

    Blobs, in the order Caffe's unrolled net owns them: ``W_xc (4H, K)``, ``b_c (4H,)``,
    [``W_xc_static (4H, K_static)``], ``W_hc (4H, H)``; ``K = prod(x.shape[2:])``,
    ``K_static = prod(x_static.shape[1:])``. Fillers: ``weight_filler`` for the weights,
    ``bias_filler`` for ``b_c``.

    Bottoms: ``x (T, N, ...)``, ``cont (T, N)``, [``x_static (N, ...)``], and with
    ``expose_hidden`` ``h_0 (1, N, H)``, ``c_0 (1, N, H)``. Tops: ``h (T, N, H)``, and with
    ``expose_hidden`` ``h_T (1, N, H)``, ``c_T (1, N, H)``. State, gradients and parameters:
    see ``RecurrentLayer``.
    """

    state_input_names = ("h_0", "c_0")
    state_output_names = ("h_T", "c_T")

    def _step_flops(self, H: int) -> int:
        return 10 * H  # 3 sigmoids, 2 tanh, 5 products and sums

    def make_blobs(self, p) -> None:
        g = 4 * self.num_output
        self.add_blob((g, self.K), p.weight_filler)
        self.add_blob((g,), p.bias_filler)
        if self.static_input:
            self.add_blob((g, self.K_static), p.weight_filler)
        self.add_blob((g, self.num_output), p.weight_filler)

    def unroll(self, x, cont, x_static, states):
        h, c = states
        w_xc_x, static, k = self._input_transforms(x, x_static)
        w_hc = self.blobs[k]
        hs = []
        for t in range(x.shape[0]):
            gate = self._step_sum(w_hc, h, cont, w_xc_x, static, t)
            c, h = _LSTMUnitFunction.apply(c, gate, cont[t : t + 1])
            hs.append(h)
        return torch.cat(hs, 0), [h, c]


@register_layer("RNN")
class RNNLayer(RecurrentLayer):
    """Simple (Elman) recurrent net over ``T`` timesteps of ``N`` streams (Caffe's RNNLayer).

    With ``H = num_output`` and ``cont_t`` the continuation indicators of step ``t``::

        W_xh_x = W_xh x + b_h                                   (all timesteps at once)
        h_t = tanh(W_hh (cont_t * h_{t-1}) + W_xh_x_t [+ W_xh_static x_static])
        o_t = tanh(W_ho h_t + b_o)

    Blobs, in the order Caffe's unrolled net owns them: ``W_xh (H, K)``, ``b_h (H,)``,
    [``W_xh_static (H, K_static)``], ``W_hh (H, H)``, ``W_ho (H, H)``, ``b_o (H,)``;
    ``K = prod(x.shape[2:])``, ``K_static = prod(x_static.shape[1:])``. Fillers:
    ``weight_filler`` for the weights, ``bias_filler`` for the biases.

    Bottoms: ``x (T, N, ...)``, ``cont (T, N)``, [``x_static (N, ...)``], and with
    ``expose_hidden`` ``h_0 (1, N, H)``. Tops: ``o (T, N, H)``, and with ``expose_hidden``
    ``h_T (1, N, H)``. State, gradients and parameters: see ``RecurrentLayer``.
    """

    state_input_names = ("h_0",)
    state_output_names = ("h_T",)

    def _step_flops(self, H: int) -> int:
        return H + 2 * H * H + H  # the tanh, the output transform 2·H·H and its tanh

    def make_blobs(self, p) -> None:
        hdim = self.num_output
        self.add_blob((hdim, self.K), p.weight_filler)
        self.add_blob((hdim,), p.bias_filler)
        if self.static_input:
            self.add_blob((hdim, self.K_static), p.weight_filler)
        self.add_blob((hdim, hdim), p.weight_filler)
        self.add_blob((hdim, hdim), p.weight_filler)
        self.add_blob((hdim,), p.bias_filler)

    def unroll(self, x, cont, x_static, states):
        (h,) = states
        w_xh_x, static, k = self._input_transforms(x, x_static)
        w_hh, w_ho, b_o = self.blobs[k], self.blobs[k + 1], self.blobs[k + 2]
        hs = []
        for t in range(x.shape[0]):
            h = torch.tanh(self._step_sum(w_hh, h, cont, w_xh_x, static, t))
            hs.append(h)
        o = torch.tanh(F.linear(torch.cat(hs, 0), w_ho, b_o))
        return o, [h]
