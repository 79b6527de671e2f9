"""The solver's train and test nets (BVLC/caffe src/caffe/solver.cpp ``InitTrainNet``,
``InitTestNets``): which field gives each net, its ``NetState``, and the weights to start from.

A net file is parsed here and upgraded once, by ``Net`` (Caffe merges the solver's state into the
upgraded definition; the upgrades keep ``state``, and V0 nets have no state rules). Errors while
building a net name its file (``net.prototxt: layer 'data' ...``) or, for a net given inline,
the solver file and field (``solver.prototxt (net_param): layer 'data' ...``).
"""

from __future__ import annotations

from caffe_compat import io as cio
from caffe_compat.errors import CaffeError, SolverError
from caffe_compat.proto import caffe_pb2
from caffe_compat.solvers.log import logger

__all__ = [
    "solver_nets",
    "given_nets",
    "train_net_param",
    "test_net_params",
    "build_net",
    "load_weights",
    "skip_batches",
    "DATA_LAYER_TYPES",
]

#: the name ``Net`` gives a definition handed over as a message
_UNNAMED = "<NetParameter>"


def _copy(message: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    q = caffe_pb2.NetParameter()
    q.CopyFrom(message)
    return q


def _read(path: str) -> caffe_pb2.NetParameter:
    """The net file as written (``Net`` upgrades it)."""
    return cio.read_prototxt(path, caffe_pb2.NetParameter)


def train_net_param(param, source: str) -> tuple[caffe_pb2.NetParameter, str]:
    """The train net's definition with its ``NetState`` (TRAIN < the net's own state <
    ``train_state``), and the name its errors should carry."""
    if param.HasField("train_net_param"):
        logger.info("Creating training net specified in train_net_param.")
        net_param, where = _copy(param.train_net_param), f"{source} (train_net_param)"
    elif param.HasField("train_net"):
        logger.info("Creating training net from train_net file: %s", param.train_net)
        net_param, where = _read(param.train_net), param.train_net
    elif param.HasField("net_param"):
        logger.info("Creating training net specified in net_param.")
        net_param, where = _copy(param.net_param), f"{source} (net_param)"
    else:
        logger.info("Creating training net from net file: %s", param.net)
        net_param, where = _read(param.net), param.net
    state = caffe_pb2.NetState()
    state.phase = caffe_pb2.TRAIN
    state.MergeFrom(net_param.state)
    state.MergeFrom(param.train_state)
    net_param.state.CopyFrom(state)
    return net_param, where


def test_net_params(param, source: str) -> list[tuple[caffe_pb2.NetParameter, str]]:
    """The test nets' definitions (``test_net_param``s, ``test_net`` files, then the generic net
    for the remaining ``test_iter``s), each with its ``NetState`` (TEST < its own <
    ``test_state[i]``) and the name its errors should carry."""
    found: list[tuple[caffe_pb2.NetParameter, str, str]] = []
    for k, tp in enumerate(param.test_net_param):
        found.append((_copy(tp), "test_net_param", f"{source} (test_net_param[{k}])"))
    for tf in param.test_net:
        found.append((_read(tf), f"test_net file: {tf}", tf))
    for _ in range(max(len(param.test_iter) - len(found), 0)):
        if param.HasField("net_param"):
            found.append((_copy(param.net_param), "net_param", f"{source} (net_param)"))
        elif param.HasField("net"):
            found.append((_read(param.net), f"net file: {param.net}", param.net))
    out = []
    for i, (net_param, what, where) in enumerate(found):
        state = caffe_pb2.NetState()
        state.phase = caffe_pb2.TEST
        state.MergeFrom(net_param.state)
        if len(param.test_state):
            state.MergeFrom(param.test_state[i])
        net_param.state.CopyFrom(state)
        logger.info("Creating test net (#%d) specified by %s", i, what)
        out.append((net_param, where))
    return out


def build_net(net_param: caffe_pb2.NetParameter, where: str, device=None):
    """``Net(net_param)`` in its state's phase, on ``device`` when that is not the CPU; an error
    while building it names ``where`` (the file, or the solver file and field), and so does the
    net afterwards (``net.source``)."""
    from caffe_compat.net import Net

    try:
        net = Net(net_param, phase=net_param.state.phase)
    except CaffeError as e:
        e.args = tuple(a.replace(_UNNAMED, where) if isinstance(a, str) else a for a in e.args)
        raise
    net.source = where
    if device is not None and device.type != "cpu":
        net.to(device)
    return net


def solver_nets(param, source: str, device=None) -> tuple:
    """The train net and the test nets of the solver file ``source``, each with the solver's
    ``weights`` loaded (Caffe's ``InitTrainNet``, ``InitTestNets``)."""
    net_param, where = train_net_param(param, source)
    train = build_net(net_param, where, device)
    load_weights(param.weights, [train])
    tests = [build_net(q, w, device) for q, w in test_net_params(param, source)]
    load_weights(param.weights, tests)
    return train, tests


def given_nets(param, source: str, net, test_nets) -> tuple:
    """Nets the caller built (``Solver(..., net=, test_nets=)``): one ``test_iter`` each, the
    solver's ``weights`` loaded."""
    tests = list(test_nets or [])
    if len(tests) != len(param.test_iter):
        raise SolverError(
            f"{source}: test_iter must be specified for each test network: "
            f"{len(tests)} test net(s) but {len(param.test_iter)} test_iter"
        )
    load_weights(param.weights, [net, *tests])
    return net, tests


def load_weights(paths, nets: list) -> None:
    """``a.caffemodel[,b.caffemodel...]`` entries (the solver's ``weights``, ``--weights``) into
    every net of ``nets``, in order."""
    for entry in paths:
        for path in entry.split(","):
            if not path:
                continue
            logger.info("Finetuning from %s", path)
            for net in nets:
                net.copy_from(path)


#: Data layers that read records in order: fast-forwarded on ``restore`` by running their forward
#: when they do not offer ``skip_batches(n)``; warned about when they cannot ``set_shard``.
DATA_LAYER_TYPES = ("Data", "HDF5Data", "ImageData", "WindowData")


def skip_batches(net, n: int) -> None:
    """Advance the data layers of ``net`` by ``n`` batches (``Solver.restore``)."""
    if n <= 0:
        return
    for layer in net.layers:
        layer.skip_batches(n)  # Layer.skip_batches: data layers seek, others have no stream
