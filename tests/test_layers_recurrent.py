"""Tests of caffe_compat.layers.recurrent (LSTM, RNN, LSTMUnit): NumPy formulas of Caffe's unrolled
nets (cont resets mid-sequence, x_static, expose_hidden, the state carried between forwards, a
change of N), torch.nn.LSTM with the gates reordered, float64 gradchecks, Caffe's LSTMUnit CPU
gradient, blob order and shapes, shape errors, and a prototxt net that trains and round-trips
its weights through a .caffemodel.

References: BVLC/caffe src/caffe/layers/{recurrent,lstm,rnn,lstm_unit}_layer.cpp and
src/caffe/test/test_lstm_layer.cpp (the cont conventions of its forward test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffe_compat as caffe
from caffe_compat import io as cio
from caffe_compat.errors import LayerError
from caffe_compat.io import read_solver_text
from caffe_compat.layers import Layer, layer_class
from caffe_compat.layers.recurrent import lstm_unit
from caffe_compat.proto import caffe_pb2
from caffe_compat.solvers import SGDSolver

RTOL, ATOL = 1e-5, 1e-6  # float64 NumPy formulas against the float32 layers
FILLERS = "weight_filler { type: 'gaussian' std: 0.4 } bias_filler { type: 'gaussian' std: 0.3 }"

# (T, N) = (4, 3): stream 0 starts a sequence at t=0 and again at t=2, stream 1 at t=0 and t=3,
# stream 2 continues from the carried state at t=0 and restarts at t=1.
CONT = np.array([[0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=np.float64)


def make_layer(type_name: str, bottom_shapes, params: str = "", ntop: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(params, lp)
    lp.name, lp.type = "rec", type_name
    lp.bottom.extend([f"b{i}" for i in range(len(bottom_shapes))])
    lp.top.extend([f"t{i}" for i in range(ntop)])
    return layer_class(type_name)(lp, [tuple(s) for s in bottom_shapes], caffe_pb2.TEST)


def rec_params(num_output: int, expose: bool = False, fillers: str = FILLERS) -> str:
    return f"recurrent_param {{ num_output: {num_output} expose_hidden: {str(expose).lower()} {fillers} }}"


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def t32(a, grad=False):
    return torch.tensor(np.asarray(a), dtype=torch.float32, requires_grad=grad)


def t64(a, grad=True):
    return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=grad)


def blobs64(layer):
    return [b.detach().numpy().astype(np.float64) for b in layer.blobs]


def close(a, b, rtol=RTOL, atol=ATOL):
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else a
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# -- independent NumPy implementations of Caffe's unrolled nets --------------------------------


def np_lstm(x, cont, blobs, h0=None, c0=None, x_static=None):
    """LSTM as lstm_layer.cpp unrolls it; gates ordered i, f, o, g. Returns (h (T,N,H), h_T, c_T)."""
    t_steps, n = x.shape[:2]
    xs = x.reshape(t_steps, n, -1)
    w_xc, b_c = blobs[0], blobs[1]
    k = 2
    static = 0.0
    if x_static is not None:
        static = x_static.reshape(n, -1) @ blobs[2].T
        k = 3
    w_hc = blobs[k]
    hdim = w_hc.shape[1]
    h = np.zeros((n, hdim)) if h0 is None else h0.reshape(n, hdim)
    c = np.zeros((n, hdim)) if c0 is None else c0.reshape(n, hdim)
    out = []
    for t in range(t_steps):
        ct = cont[t][:, None]
        gate = (ct * h) @ w_hc.T + (xs[t] @ w_xc.T + b_c) + static
        i, f, o = (sigmoid(gate[:, j * hdim : (j + 1) * hdim]) for j in range(3))
        g = np.tanh(gate[:, 3 * hdim :])
        c = ct * f * c + i * g
        h = o * np.tanh(c)
        out.append(h)
    return np.stack(out), h[None], c[None]


def np_rnn(x, cont, blobs, h0=None, x_static=None):
    """RNN as rnn_layer.cpp unrolls it. Returns (o (T,N,H), h_T)."""
    t_steps, n = x.shape[:2]
    xs = x.reshape(t_steps, n, -1)
    w_xh, b_h = blobs[0], blobs[1]
    k = 2
    static = 0.0
    if x_static is not None:
        static = x_static.reshape(n, -1) @ blobs[2].T
        k = 3
    w_hh, w_ho, b_o = blobs[k : k + 3]
    hdim = w_hh.shape[0]
    h = np.zeros((n, hdim)) if h0 is None else h0.reshape(n, hdim)
    out = []
    for t in range(t_steps):
        h = np.tanh((cont[t][:, None] * h) @ w_hh.T + xs[t] @ w_xh.T + b_h + static)
        out.append(np.tanh(h @ w_ho.T + b_o))
    return np.stack(out), h[None]


def np_lstm_unit_caffe_backward(c_prev, x, cont, dc, dh):
    """Caffe's LSTMUnitLayer::Backward_cpu, element by element (f is the cont-scaled gate)."""
    hdim = c_prev.shape[-1]
    i = sigmoid(x[..., :hdim])
    f = np.where(cont[..., None] == 0, 0.0, cont[..., None] * sigmoid(x[..., hdim : 2 * hdim]))
    o = sigmoid(x[..., 2 * hdim : 3 * hdim])
    g = np.tanh(x[..., 3 * hdim :])
    c = f * c_prev + i * g
    tanh_c = np.tanh(c)
    c_term = dc + dh * o * (1 - tanh_c * tanh_c)
    dx = np.concatenate(
        [c_term * g * i * (1 - i), c_term * c_prev * f * (1 - f), dh * tanh_c * o * (1 - o), c_term * i * (1 - g * g)],
        axis=-1,
    )
    return c_term * f, dx


# -- forward against NumPy -----------------------------------------------------------------------


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("expose", [False, True])
def test_lstm_forward_matches_numpy_and_carries_state(static, expose):
    T, N, H = 4, 3, 5
    shapes = [(T, N, 2, 3), (T, N)] + ([(N, 2, 2)] if static else []) + ([(1, N, H)] * 2 if expose else [])
    layer = make_layer("LSTM", shapes, rec_params(H, expose), ntop=3 if expose else 1)
    w = blobs64(layer)
    h_prev = c_prev = None
    for call in range(2):  # the second call starts from the first one's final state
        x = rand((T, N, 2, 3), 10 + call)
        xs = rand((N, 2, 2), 20 + call) if static else None
        bottoms = [t32(x), t32(CONT)] + ([t32(xs)] if static else [])
        if expose:
            h_prev, c_prev = 0.5 * rand((1, N, H), 30 + call), 0.5 * rand((1, N, H), 40 + call)
            bottoms += [t32(h_prev), t32(c_prev)]
        tops = layer(*bottoms)
        ref, h_prev, c_prev = np_lstm(x, CONT, w, h_prev, c_prev, xs)
        assert len(tops) == (3 if expose else 1)
        assert [tuple(t.shape) for t in tops] == layer.top_shapes(shapes)
        close(tops[0], ref)
        if expose:
            close(tops[1], h_prev)
            close(tops[2], c_prev)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("expose", [False, True])
def test_rnn_forward_matches_numpy_and_carries_state(static, expose):
    T, N, H = 4, 3, 6
    shapes = [(T, N, 5), (T, N)] + ([(N, 3)] if static else []) + ([(1, N, H)] if expose else [])
    layer = make_layer("RNN", shapes, rec_params(H, expose), ntop=2 if expose else 1)
    w = blobs64(layer)
    h_prev = None
    for call in range(2):
        x = rand((T, N, 5), 10 + call)
        xs = rand((N, 3), 20 + call) if static else None
        bottoms = [t32(x), t32(CONT)] + ([t32(xs)] if static else [])
        if expose:
            h_prev = 0.5 * rand((1, N, H), 30 + call)
            bottoms.append(t32(h_prev))
        tops = layer(*bottoms)
        ref, h_prev = np_rnn(x, CONT, w, h_prev, xs)
        assert [tuple(t.shape) for t in tops] == layer.top_shapes(shapes)
        close(tops[0], ref)
        if expose:
            close(tops[1], h_prev)


def test_lstm_matches_torch_nn_lstm_with_gates_reordered():
    """Second, independent reference: torch orders the gates i, f, g, o; Caffe i, f, o, g."""
    T, N, K, H = 6, 4, 3, 5
    layer = make_layer("LSTM", [(T, N, K), (T, N)], rec_params(H))
    w_xc, b_c, w_hc = (b.detach() for b in layer.blobs)
    order = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)])
    ref = torch.nn.LSTM(K, H)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(w_xc[order])
        ref.weight_hh_l0.copy_(w_hc[order])
        ref.bias_ih_l0.copy_(b_c[order])
        ref.bias_hh_l0.zero_()
    x = t32(rand((T, N, K), 1))
    cont = torch.ones(T, N)
    y_ref, (h_n, c_n) = ref(x)
    close(layer(x, cont)[0], y_ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    # the carried state is torch's (h_n, c_n): the next batch continues the sequences
    x2 = t32(rand((T, N, K), 2))
    y2_ref, _ = ref(x2, (h_n, c_n))
    close(layer(x2, cont)[0], y2_ref.detach().numpy(), rtol=1e-5, atol=1e-6)


# -- LSTMUnit -------------------------------------------------------------------------------------


def test_lstm_unit_forward_and_caffe_cpu_gradient():
    N, H = 4, 3
    layer = make_layer("LSTMUnit", [(1, N, H), (1, N, 4 * H), (1, N)], ntop=2)
    assert len(layer.blobs) == 0 and layer.top_shapes([(1, N, H), (1, N, 4 * H), (1, N)]) == [(1, N, H)] * 2
    c_prev, x = rand((1, N, H), 1), rand((1, N, 4 * H), 2)
    cont = np.array([[0.0, 1.0, 0.5, 2.0]])  # Caffe documents 0/1; other values follow its formula
    dc, dh = rand((1, N, H), 3), rand((1, N, H), 4)
    tc, tx, tcont = t32(c_prev, True), t32(x, True), t32(cont, True)
    c, h = layer(tc, tx, tcont)
    i = sigmoid(x[..., :H])
    f = cont[..., None] * sigmoid(x[..., H : 2 * H])
    o, g = sigmoid(x[..., 2 * H : 3 * H]), np.tanh(x[..., 3 * H :])
    c_ref = f * c_prev + i * g
    close(c, c_ref)
    close(h, o * np.tanh(c_ref))
    torch.autograd.backward([c, h], [t32(dc), t32(dh)])
    dc_prev_ref, dx_ref = np_lstm_unit_caffe_backward(c_prev, x, cont, dc, dh)
    close(tc.grad, dc_prev_ref)
    close(tx.grad, dx_ref)
    assert tcont.grad is None  # Caffe cannot backpropagate to the continuation indicators
    assert not layer.allow_force_backward(2) and layer.allow_force_backward(1)
    # for cont = 0.5 and 2 Caffe's CPU forget-gate gradient differs from the exact one
    s = sigmoid(x[..., H : 2 * H])
    c_term = dc + dh * o * (1 - np.tanh(c_ref) ** 2)
    exact_df = c_term * c_prev * cont[..., None] * s * (1 - s)
    got_df = tx.grad[..., H : 2 * H].numpy()
    np.testing.assert_allclose(got_df[:, :2], exact_df[:, :2], rtol=RTOL, atol=ATOL)
    assert not np.allclose(got_df[:, 2:], exact_df[:, 2:], rtol=1e-3, atol=1e-4)


def test_lstm_unit_gradcheck_binary_cont():
    N, H = 3, 2
    layer = make_layer("LSTMUnit", [(1, N, H), (1, N, 4 * H), (1, N)], ntop=2).double()
    cont = t64([[1.0, 0.0, 1.0]], grad=False)
    c_prev, x = t64(rand((1, N, H), 5)), t64(rand((1, N, 4 * H), 6))
    assert torch.autograd.gradcheck(lambda c, g: layer(c, g, cont), (c_prev, x), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_lstm_unit_functional_detaches_cont():
    c, h = lstm_unit(torch.zeros(1, 2, 1), torch.zeros(1, 2, 4), torch.ones(1, 2, requires_grad=True))
    assert c.requires_grad is False and torch.allclose(h, torch.zeros(1, 2, 1), rtol=0, atol=0)


# -- gradients through the recurrent layers ------------------------------------------------------


def _gradcheck_recurrent(layer, arrays, cont, extra=()):
    layer = layer.double()
    xs = [t64(a) for a in arrays]
    ps = list(layer.blobs)

    def f(*args):
        layer.reset()  # a pure function of its inputs: every call starts from zero state
        return layer(args[0], cont, *args[1 : len(xs)], *extra)[0]

    assert torch.autograd.gradcheck(f, (*xs, *ps), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("static", [False, True])
def test_lstm_gradcheck(static):
    T, N, H = 3, 2, 2
    shapes = [(T, N, 3), (T, N)] + ([(N, 2)] if static else [])
    layer = make_layer("LSTM", shapes, rec_params(H))
    cont = t64([[1, 0], [0, 1], [1, 1]], grad=False)
    arrays = [rand((T, N, 3), 7)] + ([rand((N, 2), 8)] if static else [])
    _gradcheck_recurrent(layer, arrays, cont)


@pytest.mark.parametrize("static", [False, True])
def test_rnn_gradcheck(static):
    T, N, H = 3, 2, 3
    shapes = [(T, N, 2), (T, N)] + ([(N, 2)] if static else [])
    layer = make_layer("RNN", shapes, rec_params(H))
    cont = t64([[0, 1], [1, 1], [1, 0]], grad=False)
    arrays = [rand((T, N, 2), 9)] + ([rand((N, 2), 10)] if static else [])
    _gradcheck_recurrent(layer, arrays, cont)


def test_gradcheck_with_exposed_states_as_constants():
    T, N, H = 2, 2, 2
    shapes = [(T, N, 2), (T, N), (1, N, H), (1, N, H)]
    layer = make_layer("LSTM", shapes, rec_params(H, expose=True), ntop=3)
    h0, c0 = t64(rand((1, N, H), 11), grad=False), t64(rand((1, N, H), 12), grad=False)
    cont = t64([[1, 1], [1, 0]], grad=False)
    _gradcheck_recurrent(layer, [rand((T, N, 2), 13)], cont, extra=(h0, c0))


@pytest.mark.parametrize("type_name,n_states", [("LSTM", 2), ("RNN", 1)])
def test_no_gradient_to_cont_or_exposed_states(type_name, n_states):
    """Caffe shares only the data of h_0/c_0 and h_T/c_T with its unrolled net: no diffs cross them."""
    T, N, H = 3, 2, 4
    shapes = [(T, N, 3), (T, N)] + [(1, N, H)] * n_states
    layer = make_layer(type_name, shapes, rec_params(H, expose=True), ntop=1 + n_states)
    x = t32(rand((T, N, 3)), True)
    cont = torch.ones(T, N, requires_grad=True)
    states = [t32(0.5 * rand((1, N, H), 20 + k), True) for k in range(n_states)]
    tops = layer(x, cont, *states)
    assert all(not t.requires_grad for t in tops[1:])
    tops[0].sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert cont.grad is None and all(s.grad is None for s in states)
    assert all(b.grad is not None for b in layer.blobs)
    assert not layer.allow_force_backward(1) and layer.allow_force_backward(0) and layer.allow_force_backward(2)


# -- blobs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "type_name,static,expected",
    [
        ("LSTM", False, [(20, 6), (20,), (20, 5)]),
        ("LSTM", True, [(20, 6), (20,), (20, 4), (20, 5)]),
        ("RNN", False, [(5, 6), (5,), (5, 5), (5, 5), (5,)]),
        ("RNN", True, [(5, 6), (5,), (5, 4), (5, 5), (5, 5), (5,)]),
    ],
)
def test_blob_order_shapes_and_fillers(type_name, static, expected):
    """LSTM: W_xc, b_c, [W_xc_static], W_hc; RNN: W_xh, b_h, [W_xh_static], W_hh, W_ho, b_o."""
    shapes = [(2, 3, 2, 3), (2, 3)] + ([(3, 2, 2)] if static else [])
    fillers = "weight_filler { type: 'constant' value: 0.25 } bias_filler { type: 'constant' value: -1 }"
    layer = make_layer(type_name, shapes, rec_params(5, fillers=fillers))
    assert [tuple(b.shape) for b in layer.blobs] == expected
    for b in layer.blobs:
        value = -1.0 if b.dim() == 1 else 0.25
        np.testing.assert_allclose(b.detach().numpy(), value, rtol=0, atol=0)
    # unset fillers: constant 0, as Caffe's default FillerParameter
    bare = make_layer(type_name, shapes, "recurrent_param { num_output: 5 }")
    assert all(not b.detach().any() for b in bare.blobs)
    # the carried state is not a blob and is not saved
    assert [k for k in bare.state_dict()] == [f"blobs.{i}" for i in range(len(expected))]


# -- the carried state ---------------------------------------------------------------------------


def test_state_is_detached_and_untouched_by_shape_inference():
    T, N, H = 3, 2, 4
    shapes = [(T, N, 3), (T, N)]
    layer = make_layer("LSTM", shapes, rec_params(H))
    cont = torch.ones(T, N)
    x1 = t32(rand((T, N, 3), 1), True)
    layer(x1, cont)
    saved = [layer._state_0.clone(), layer._state_1.clone()]
    assert float(saved[0].abs().sum()) > 0 and not saved[0].requires_grad
    # net shape inference: our top_shapes, and the base class's forward on meta tensors
    assert layer.top_shapes([(T, 5, 3), (T, 5)]) == [(T, 5, H)]
    assert Layer.top_shapes(layer, [(T, N, 3), (T, N)]) == [(T, N, H)]
    assert Layer.top_shapes(layer, [(T, 9, 3), (T, 9)]) == [(T, 9, H)]  # a larger N would grow it
    torch.testing.assert_close(layer._state_0, saved[0], rtol=0, atol=0)
    torch.testing.assert_close(layer._state_1, saved[1], rtol=0, atol=0)
    assert not layer.blobs[0].is_meta
    # the second batch's backward stops at the batch boundary
    x2 = t32(rand((T, N, 3), 2), True)
    layer(x2, cont)[0].sum().backward()
    assert x1.grad is None and x2.grad is not None
    layer.reset()
    assert not layer._state_0.any() and not layer._state_1.any()


def test_state_when_n_changes_follows_caffes_blob_memory():
    """Caffe keeps h_T/c_T in blobs that only reallocate (zeroed) when they grow past their
    capacity: a smaller N reads the first N streams' state; a larger one within capacity reads
    what is left in memory; beyond capacity all zeros."""
    T, H = 2, 3
    layer = make_layer("LSTM", [(T, 3, 2), (T, 3)], rec_params(H))
    w = blobs64(layer)

    def run(n, seed, h0, c0):
        x = rand((T, n, 2), seed)
        cont = np.ones((T, n))
        got = layer(t32(x), t32(cont))[0]
        ref, h_t, c_t = np_lstm(x, cont, w, h0, c0)
        close(got, ref)
        return h_t, c_t

    h3, c3 = run(3, 1, None, None)
    h2, c2 = run(2, 2, h3[:, :2], c3[:, :2])  # shrink: streams 0, 1 keep their state
    # regrow to 3 (within capacity): streams 0, 1 from the N=2 pass, stream 2 from the N=3 pass
    h3b, c3b = run(3, 3, np.concatenate([h2, h3[:, 2:]], 1), np.concatenate([c2, c3[:, 2:]], 1))
    run(4, 4, None, None)  # past the capacity: zeros
    assert h3b.shape == (1, 3, H)


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "type_name,shapes,params,ntop,match",
    [
        ("LSTM", [(3, 2, 4), (3, 2)], "recurrent_param { }", 1, "num_output must be set"),
        ("LSTM", [(3, 2), (3, 2)], rec_params(4), 1, r"bottom 0 \(x\) must be \(T, N, ...\) with at least 3 axes"),
        ("LSTM", [(3, 2, 4), (3, 3)], rec_params(4), 1, r"bottom 1 \(cont\) must be \(T, N\) = \(3, 2\)"),
        ("RNN", [(3, 2, 4), (3, 2, 1)], rec_params(4), 1, r"bottom 1 \(cont\)"),
        ("LSTM", [(3, 2, 4), (3, 2), (3, 5)], rec_params(4), 1, r"bottom 2 \(x_static\) must be \(N, ...\) with N = 2"),
        ("RNN", [(3, 2, 4), (3, 2), (2,)], rec_params(4), 1, r"bottom 2 \(x_static\) must be \(N, ...\) with at least"),
        ("LSTM", [(3, 2, 4), (3, 2), (1, 2, 4)], rec_params(4, True), 3, r"takes 4 or 5 bottom blobs .*h_0, c_0"),
        ("LSTM", [(3, 2, 4), (3, 2), (1, 2, 4), (1, 2, 4)], rec_params(4, True), 1, r"exactly 3 top blob\(s\)"),
        ("LSTM", [(3, 2, 4), (3, 2), (1, 2, 4), (1, 3, 4)], rec_params(4, True), 3, r"bottom 3 \(c_0\) must be"),
        ("RNN", [(3, 2, 4), (3, 2), (2, 3), (2, 2, 4)], rec_params(4, True), 2, r"bottom 3 \(h_0\) must be"),
        ("RNN", [(3, 2, 4)], rec_params(4), 1, "takes 2 or 3 bottom blobs"),
        ("LSTMUnit", [(1, 2, 3), (1, 2, 11), (1, 2)], "", 2, r"4 \* H = 12"),
        ("LSTMUnit", [(1, 2, 3), (1, 2, 12), (1, 2, 1)], "", 2, r"bottom 2 \(cont\) must have 2 axes"),
        ("LSTMUnit", [(2, 2, 3), (2, 2, 12), (2, 2)], "", 2, "single timestep"),
        ("LSTMUnit", [(1, 2, 3), (1, 3, 12), (1, 2)], "", 2, r"bottom 1 \(x\) has 3 streams"),
    ],
)
def test_bad_shapes_and_params_raise(type_name, shapes, params, ntop, match):
    with pytest.raises(LayerError, match=match):
        make_layer(type_name, shapes, params, ntop=ntop)


def test_reshape_errors_name_the_bottom():
    layer = make_layer("LSTM", [(3, 2, 4), (3, 2), (2, 5)], rec_params(4))
    assert layer.top_shapes([(3, 7, 2, 2), (3, 7), (7, 5)]) == [(3, 7, 4)]  # N may change, K stays
    with pytest.raises(LayerError, match="timesteps"):
        layer.top_shapes([(4, 2, 4), (4, 2), (2, 5)])
    with pytest.raises(LayerError, match="K = 5 .*K = 4"):
        layer.top_shapes([(3, 2, 5), (3, 2), (2, 5)])
    with pytest.raises(LayerError, match=r"x_static.*expect 5"):
        layer(torch.zeros(3, 2, 4), torch.zeros(3, 2), torch.zeros(2, 6))


# -- in a net ------------------------------------------------------------------------------------

NET = """
name: "seq"
layer { name: "data" type: "Input" top: "x" top: "cont" top: "target"
        input_param { shape { dim: 5 dim: 3 dim: 4 } shape { dim: 5 dim: 3 } shape { dim: 5 dim: 3 dim: 6 } } }
layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "h"
        recurrent_param { num_output: 6 weight_filler { type: "uniform" min: -0.3 max: 0.3 }
                          bias_filler { type: "constant" value: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "h" bottom: "target" top: "loss" }
"""


def test_net_trains_and_round_trips_a_caffemodel(tmp_path):
    proto = tmp_path / "seq.prototxt"
    proto.write_text(NET)
    caffe.set_random_seed(4)
    net = caffe.Net(str(proto), caffe.TRAIN)
    assert [tuple(p.data.shape) for p in net.params["lstm"]] == [(24, 4), (24,), (24, 6)]
    assert net.blobs["h"].data.shape == (5, 3, 6)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 4)).astype(np.float32)
    cont = np.ones((5, 3), np.float32)
    cont[0] = 0  # every batch starts new sequences: the carried state does not matter
    target = 0.5 * np.tanh(rng.standard_normal((5, 3, 6))).astype(np.float32)
    for name, arr in (("x", x), ("cont", cont), ("target", target)):
        net.blobs[name].data[...] = arr
    solver = SGDSolver(read_solver_text('base_lr: 0.5 momentum: 0.9 lr_policy: "fixed"'), net=net)
    first = float(net.forward()["loss"])
    solver.step(5)
    last = float(net.forward()["loss"])
    assert last < 0.9 * first

    path = tmp_path / "seq.caffemodel"
    net.save(str(path))
    saved = {lp.name: lp for lp in cio.read_caffemodel(str(path)).layer}
    assert [tuple(b.shape.dim) for b in saved["lstm"].blobs] == [(24, 4), (24,), (24, 6)]
    other = caffe.Net(str(proto), str(path), caffe.TEST)
    for a, b in zip(net.params["lstm"], other.params["lstm"]):
        np.testing.assert_array_equal(a.data, b.data)
    out = other.forward(x=x, cont=cont, target=target)
    np.testing.assert_allclose(out["loss"], last, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(other.blobs["h"].data, net.blobs["h"].data, rtol=1e-6, atol=1e-7)


def test_net_shape_errors_name_the_layer(tmp_path):
    proto = tmp_path / "bad.prototxt"
    proto.write_text(NET.replace("shape { dim: 5 dim: 3 } shape", "shape { dim: 5 dim: 2 } shape"))
    with pytest.raises(LayerError, match=r"layer 'lstm' \(LSTM\): bottom 1 \(cont\)"):
        caffe.Net(str(proto), caffe.TEST)
