"""The solver's test passes (BVLC/caffe src/caffe/solver.cpp ``Test``) and its output log lines."""

from __future__ import annotations

import numpy as np
import torch

from caffe_compat.solvers import signals
from caffe_compat.solvers.log import fmt, logger

__all__ = ["forward_with_loss", "log_outputs", "run_test"]


def _f32(x) -> np.float32:
    return np.float32(x)


def forward_with_loss(net) -> tuple[dict, np.float32]:
    """``net.forward()`` and its loss (the loss-weighted sum of its blobs), in float32."""
    outputs = net.forward()
    loss = _f32(0)
    for name, blob in net.blobs.items():
        w = net.blob_loss_weights.get(name, 0.0)
        if w:
            loss = _f32(loss + _f32(w) * _f32(np.sum(np.asarray(blob.data, dtype=np.float32))))
    return outputs, loss


def log_outputs(net, what: str, outputs: dict) -> None:
    """Caffe's ``    Train net output #0: loss = 2.3 (* 1 = 2.3 loss)`` lines."""
    index = 0
    for name in net.outputs:
        weight = _f32(net.blob_loss_weights.get(name, 0.0))
        for v in np.asarray(outputs[name], dtype=np.float32).ravel():
            extra = f" (* {fmt(weight)} = {fmt(_f32(weight * v))} loss)" if weight else ""
            logger.info("    %s net output #%d: %s = %s%s", what, index, name, fmt(v), extra)
            index += 1


def _handle_requests(solver) -> None:
    """Signals that arrived during a test: snapshot now, or stop (Caffe checks between batches)."""
    request = solver._requested_action()
    while request != signals.NONE:
        if request == signals.SNAPSHOT:
            solver.snapshot()
        elif request == signals.STOP:
            solver.requested_early_exit = True
        request = solver._requested_action()


def run_test(solver, test_net_id: int) -> list[tuple[str, float]]:
    """``solver.test(test_net_id)``: ``test_iter`` batches of the test net (its trained layers
    shared with the train net), each output element's mean logged and returned."""
    p = solver.param
    logger.info("Iteration %d, Testing net (#%d)", solver.iter, test_net_id)
    test_net = solver.test_nets[test_net_id]
    test_net.share_trained_layers_with(solver.net)
    n_iter = p.test_iter[test_net_id]
    scores: list[np.ndarray] | None = None
    loss = _f32(0)
    with torch.no_grad():
        for _ in range(n_iter):
            _handle_requests(solver)
            if solver.requested_early_exit:
                break
            outputs, iter_loss = forward_with_loss(test_net)
            if p.test_compute_loss:
                loss = _f32(loss + iter_loss)
            vals = [np.array(outputs[o], dtype=np.float32).ravel() for o in test_net.outputs]
            if scores is None:
                scores = vals
            else:
                for acc, v in zip(scores, vals):
                    acc += v
    if solver.requested_early_exit:
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
