"""pycaffe's calls that are built on ``forward``/``backward`` (``forward_all``,
``forward_backward_all``) and pycaffe's index-based internals of ``_caffe.Net`` (``_blob_names``,
``_inputs``, ``_forward(start, end)``...), as a mixin of ``Net``."""

from __future__ import annotations

import numpy as np

from caffe_compat.errors import NetError

__all__ = ["PycaffeCalls"]


class PycaffeCalls:
    """What ``Net`` adds to its ``forward``/``backward`` for pycaffe's scripts."""

    def _batch(self, inputs: dict[str, np.ndarray]):
        """Split ``{name: N x ...}`` into batches of the blobs' batch size, the last one padded
        with zeros (pycaffe's ``Net._batch``)."""
        first = next(iter(inputs))
        batch_size = self.blobs[first].shape[0]
        n = len(inputs[first])
        for name, arr in inputs.items():
            if len(arr) != n:
                raise NetError(f"{name!r} has {len(arr)} items, {first!r} has {n}: give every input the same count")
        for start in range(0, n, batch_size):
            batch = {}
            for name, arr in inputs.items():
                chunk = np.asarray(arr[start : start + batch_size])
                if len(chunk) < batch_size:
                    pad = np.zeros((batch_size - len(chunk),) + chunk.shape[1:], dtype=chunk.dtype)
                    chunk = np.concatenate([chunk, pad])
                batch[name] = chunk
            yield batch

    def forward_all(self, blobs: list[str] | None = None, **kwargs) -> dict[str, np.ndarray]:
        """pycaffe's ``forward_all``: ``forward`` over inputs of any length, in batches of the
        net's batch size; returns ``{blob: N x ...}`` for the outputs and ``blobs``. With no
        inputs, one plain ``forward`` (the net's data layers feed it)."""
        names = list(dict.fromkeys(list(self.outputs) + list(blobs or [])))
        if not kwargs:
            outs = self.forward(blobs=list(blobs or []))
            return {k: np.array(outs[k], copy=True) for k in names}
        collected: dict[str, list[np.ndarray]] = {k: [] for k in names}
        for batch in self._batch(kwargs):
            outs = self.forward(blobs=list(blobs or []), **batch)
            for k in names:
                collected[k].extend(np.array(outs[k], copy=True))
        n = len(next(iter(kwargs.values())))
        return {k: np.asarray(v)[:n] for k, v in collected.items()}

    def forward_backward_all(
        self, blobs: list[str] | None = None, diffs: list[str] | None = None, **kwargs
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """pycaffe's ``forward_backward_all``: inputs (named after ``inputs``) and output diffs
        (named after ``outputs``) of any length, in batches; returns ``(outs, diffs)``."""
        fwd = {k: v for k, v in kwargs.items() if k in self.inputs}
        bwd = {k: v for k, v in kwargs.items() if k in self.outputs}
        out_names = list(dict.fromkeys(list(self.outputs) + list(blobs or [])))
        diff_names = list(dict.fromkeys(list(self.inputs) + list(diffs or [])))
        outs_all: dict[str, list[np.ndarray]] = {k: [] for k in out_names}
        diffs_all: dict[str, list[np.ndarray]] = {k: [] for k in diff_names}
        fb = self._batch(fwd) if fwd else iter(lambda: {}, None)
        bb = self._batch(bwd) if bwd else iter(lambda: {}, None)
        n = len(next(iter(fwd.values()))) if fwd else (len(next(iter(bwd.values()))) if bwd else 1)
        batches = -(-n // self.blobs[(list(fwd) or list(bwd) or self.inputs)[0]].shape[0])
        for _, f, b in zip(range(batches), fb, bb):
            o = self.forward(blobs=list(blobs or []), **f)
            d = self.backward(diffs=list(diffs or []), **b)
            for k in out_names:
                outs_all[k].extend(np.array(o[k], copy=True))
            for k in diff_names:
                diffs_all[k].extend(np.array(d[k], copy=True))
        return (
            {k: np.asarray(v)[:n] for k, v in outs_all.items()},
            {k: np.asarray(v)[:n] for k, v in diffs_all.items()},
        )

    # -- pycaffe's index-based internals (scripts written against _caffe use them) -------------

    @property
    def _blob_names(self) -> list[str]:
        return list(self.blobs)

    @property
    def _blobs(self):
        """pycaffe's ``Net._blobs``: the net's blobs in blob order (that of ``_blob_names``)."""
        from caffe_compat._caffe import BlobVec

        return BlobVec(self.blobs.values())

    @property
    def _blob_loss_weights(self) -> list[float]:
        return [self.blobs[b].loss_weight for b in self.blobs]

    def _blob_ids(self, names) -> list[int]:
        index = {b: i for i, b in enumerate(self.blobs)}
        return [index[b] for b in names]

    @property
    def _inputs(self) -> list[int]:
        return self._blob_ids(self.inputs)

    @property
    def _outputs(self) -> list[int]:
        return self._blob_ids(self.outputs)

    def _bottom_ids(self, i: int) -> list[int]:
        return self._blob_ids(self._bottoms[i])

    def _top_ids(self, i: int) -> list[int]:
        return self._blob_ids(self._tops[i])

    def _forward(self, start: int, end: int) -> float:
        """Caffe's ForwardFromTo(start, end) by layer index; returns the loss of those layers."""
        self.forward(start=self._layer_names[start], end=self._layer_names[end])
        loss = 0.0
        for li in range(start, end + 1):
            for b in self._tops[li]:
                weight = self.blobs[b].loss_weight
                if weight:
                    loss += weight * float(np.sum(self.blobs[b].data))
        return loss

    def _backward(self, start: int, end: int) -> None:
        """Caffe's BackwardFromTo(start, end) by layer index (``start`` >= ``end``)."""
        self.backward(start=self._layer_names[start], end=self._layer_names[end])

    def _set_input_arrays(self, data, labels) -> None:
        self.set_input_arrays(data, labels)
