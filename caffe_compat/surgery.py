"""Net surgery: copy named layers' weights between caffemodels and nets.

Two operations, usable on any nets:

- **Copy by name** (:func:`copy_layers`): the blobs of source layer ``src`` go to destination
  layer ``dst`` for each ``src:dst`` pair of the mapping (a plain ``name`` means ``name:name``;
  no mapping means every layer present in both with blobs). Each blob's shape must equal the
  destination's (Caffe's CopyTrainedLayersFrom rule); a mismatch raises, or with
  ``strict=False`` is skipped and reported. This is how the dental reproduction moves conv1-5
  and fc6 from the CAE (or ImageNet) into the landmark regressor.
- **Fully connected → convolutional** (:func:`fc_to_conv`, Caffe's classic ``net_surgery``
  example): an InnerProduct weight (N, K) is reshaped into a Convolution weight
  (N, C, kh, kw) with ``C·kh·kw = K`` (same row-major order, so the convolution computes the
  same dot products at every position), the bias copied as is. It is :func:`copy_layers` with
  ``reshape=True`` (equal counts are enough).

Sources: a :class:`~caffe_compat.net.Net`, a ``.caffemodel`` / ``.caffemodel.h5`` path or a
``NetParameter`` with blobs. Destinations: a ``Net`` (its parameters are overwritten in place)
or a ``NetParameter`` with blobs (e.g. a caffemodel read with ``io.read_caffemodel``; its blobs
are replaced). The :class:`SurgeryReport` lists what was copied (with shapes), what was
skipped and why, and which destination layers with parameters were left untouched (at their
filler values when the destination is a freshly built net).
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from caffe_compat.errors import NetError
from caffe_compat.proto import caffe_pb2

__all__ = ["SurgeryReport", "copy_layers", "fc_to_conv", "load_weights", "parse_mapping"]

log = logging.getLogger("caffe_compat")


@dataclass
class SurgeryReport:
    """What a surgery did: ``copied`` [{src, dst, shapes}], ``skipped`` [{src, dst, reason}],
    ``left_at_filler`` (destination layers with parameters that received nothing)."""

    copied: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    left_at_filler: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"copied": self.copied, "skipped": self.skipped, "left_at_filler": self.left_at_filler}

    def to_text(self) -> str:
        lines = []
        for c in self.copied:
            how = " (reshaped)" if c.get("reshaped") else ""
            shapes = ", ".join("x".join(map(str, s)) for s in c["shapes"])
            lines.append(f"copied  {c['src']} -> {c['dst']}  [{shapes}]{how}")
        for s in self.skipped:
            lines.append(f"skipped {s['src']} -> {s['dst']}: {s['reason']}")
        for n in self.left_at_filler:
            lines.append(f"kept    {n} (not copied: left at its filler / previous values)")
        return "\n".join(lines)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)


def parse_mapping(specs: Iterable[str] | None) -> list[tuple[str, str]] | None:
    """``["conv1", "fc6:fc6_conv"]`` -> ``[("conv1", "conv1"), ("fc6", "fc6_conv")]``; each item
    may also hold several comma-separated pairs. ``None`` / empty -> ``None`` (all common names)."""
    if not specs:
        return None
    out = []
    for spec in specs:
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            parts = item.split(":")
            if len(parts) == 1:
                out.append((parts[0], parts[0]))
            elif len(parts) == 2 and parts[0] and parts[1]:
                out.append((parts[0], parts[1]))
            else:
                raise ValueError(f"layer mapping {item!r}: expected 'name' or 'source:destination'")
    return out or None


def load_weights(src) -> OrderedDict[str, list[np.ndarray]]:
    """Layer name -> list of weight arrays, from a Net, a caffemodel path (.caffemodel or .h5) or
    a NetParameter with blobs. Layers without blobs are left out."""
    from caffe_compat import io as cio

    out: OrderedDict[str, list[np.ndarray]] = OrderedDict()
    if hasattr(src, "params") and hasattr(src, "layer_dict"):
        for name, blobs in src.params.items():
            out[name] = [np.array(b.data, dtype=np.float32, copy=True) for b in blobs]
        return out
    if isinstance(src, caffe_pb2.NetParameter):
        proto = src
    else:
        path = os.fspath(src)
        if path.endswith(".h5"):
            import h5py

            with h5py.File(path, "r") as f:
                if "data" not in f:
                    raise NetError(f"{path}: not a Caffe HDF5 weights file (no 'data' group)")
                for lname, g in f["data"].items():
                    if len(g):
                        out[lname] = [np.asarray(g[str(k)], dtype=np.float32) for k in range(len(g))]
            return out
        proto = cio.read_caffemodel(path)
    layers = list(proto.layer) or list(proto.layers)
    for lp in layers:
        if len(lp.blobs):
            out[lp.name] = [cio.blob_to_array(b, what=f"layer {lp.name!r} blob {k}") for k, b in enumerate(lp.blobs)]
    return out


def _dst_shapes(dst) -> OrderedDict[str, list[tuple]]:
    if hasattr(dst, "params") and hasattr(dst, "layer_dict"):
        return OrderedDict((n, [tuple(b.data.shape) for b in blobs]) for n, blobs in dst.params.items())
    from caffe_compat import io as cio

    layers = list(dst.layer) or list(dst.layers)
    return OrderedDict(
        (lp.name, [tuple(cio.blob_to_array(b).shape) for b in lp.blobs]) for lp in layers if len(lp.blobs)
    )


def _write(dst, name: str, arrays: list[np.ndarray]) -> None:
    if hasattr(dst, "params") and hasattr(dst, "layer_dict"):
        layer = dst.modules_by_name[name]
        with torch.no_grad():
            for p, a in zip(layer.blobs, arrays):
                p.detach().copy_(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(p.device, p.dtype))
        return
    from caffe_compat import io as cio

    layers = list(dst.layer) or list(dst.layers)
    lp = next(lp for lp in layers if lp.name == name)
    del lp.blobs[:]
    for a in arrays:
        lp.blobs.add().CopyFrom(cio.array_to_blob(a))


def copy_layers(src, dst, mapping=None, *, reshape: bool = False, strict: bool = True) -> SurgeryReport:
    """Copy the blobs of named layers from ``src`` into ``dst`` (see the module docstring).

    ``mapping``: ``[(src, dst), ...]`` or strings ``"src:dst"`` / ``"name"``; ``None`` copies every
    layer whose name is in both. ``reshape=True`` accepts equal element counts (fc → conv).
    ``strict=False`` turns shape mismatches and missing layers into report entries.
    """
    if mapping is not None:
        mapping = [pair for m in mapping for pair in (parse_mapping([m]) or [] if isinstance(m, str) else [tuple(m)])]
    weights = load_weights(src)
    shapes = _dst_shapes(dst)
    if mapping is None:
        pairs = [(n, n) for n in weights if n in shapes]
    else:
        pairs = [tuple(p) for p in mapping]
    report = SurgeryReport()
    written: set[str] = set()

    def fail(s: str, d: str, reason: str) -> None:
        if strict:
            raise NetError(f"surgery {s} -> {d}: {reason}")
        report.skipped.append({"src": s, "dst": d, "reason": reason})
        log.warning("surgery: skipped %s -> %s: %s", s, d, reason)

    for s, d in pairs:
        if s not in weights:
            fail(s, d, f"the source has no layer {s!r} with weights (layers: {', '.join(weights) or 'none'})")
            continue
        if d not in shapes:
            fail(s, d, f"the destination has no layer {d!r} with parameters (layers: {', '.join(shapes) or 'none'})")
            continue
        arrays = weights[s]
        want = shapes[d]
        if len(arrays) != len(want):
            fail(s, d, f"{len(arrays)} blob(s) in the source, {len(want)} in the destination")
            continue
        out = []
        reshaped = False
        for k, (a, shp) in enumerate(zip(arrays, want)):
            if tuple(a.shape) == tuple(shp):
                out.append(a)
            elif reshape and a.size == int(np.prod(shp)):
                out.append(a.reshape(shp))
                reshaped = True
            else:
                hint = _mismatch_hint(src, s, d, a.shape, tuple(shp), reshape)
                out.append(None)
                fail(s, d, f"blob {k}: source shape {list(a.shape)}, destination shape {list(shp)}{hint}")
                break
        if len(out) != len(want) or any(o is None for o in out):
            continue
        _write(dst, d, out)
        written.add(d)
        report.copied.append({"src": s, "dst": d, "shapes": [list(a.shape) for a in out], "reshaped": reshaped})
        log.info("surgery: copied %s -> %s%s", s, d, " (reshaped)" if reshaped else "")
    report.left_at_filler = [n for n in shapes if n not in written]
    return report


def _outputs(lp) -> int | None:
    if lp.type == "InnerProduct":
        return lp.inner_product_param.num_output
    if lp.type in ("Convolution", "Deconvolution"):
        return lp.convolution_param.num_output
    return None


def _fitting_nets(src) -> list[str]:
    """Net files that fit the weights ``src`` (a path): a reproduce_paper run keeps the nets its
    weights were trained with in ``<run>/nets/``, next to ``<run>/<config>/<config>.caffemodel``;
    those whose every InnerProduct and Convolution is in the weights with the same output count."""
    import glob

    from caffe_compat import io as cio

    if not isinstance(src, (str, os.PathLike)):
        return []
    weights = load_weights(src)
    here = os.path.dirname(os.path.abspath(src))
    found = []
    for nets in (os.path.join(here, "nets"), os.path.join(os.path.dirname(here), "nets")):
        for path in sorted(glob.glob(os.path.join(nets, "*.prototxt"))):
            try:
                net = cio.read_net(path)
            except Exception:  # noqa: BLE001 - a solver or another file: not a candidate
                continue
            widths = [(lp.name, _outputs(lp)) for lp in net.layer if _outputs(lp) is not None]
            if widths and all(n in weights and weights[n][0].shape[0] == w for n, w in widths):
                found.append(path)
    return found


def _mismatch_hint(src, s: str, d: str, src_shape: tuple, dst_shape: tuple, reshape: bool) -> str:
    """What to do about a blob shape mismatch: --fc-to-conv only where it would help (an InnerProduct
    weight into a convolution of the same size); for layers of different widths (fc -> fc, conv ->
    conv), the net file the weights fit."""
    same_size = int(np.prod(src_shape)) == int(np.prod(dst_shape))
    if not reshape and same_size and len(src_shape) != len(dst_shape):
        return " (for a fully-connected -> convolutional transplant use reshape / --fc-to-conv)"
    if len(src_shape) == len(dst_shape) and src_shape[0] != dst_shape[0]:
        nets = _fitting_nets(src)
        fits = (
            f": use the net file they were trained with: {', '.join(nets)}"
            if nets
            else ": use the net file they were trained with (a reproduce_paper run keeps its nets in <run>/nets/)"
        )
        return (
            f" (the weights' {s} has {src_shape[0]} outputs, the net's {d} {dst_shape[0]}: they were trained for a "
            f"net of another width{fits})"
        )
    return ""


def fc_to_conv(src, dst, mapping) -> SurgeryReport:
    """Caffe's net surgery: InnerProduct layers of ``src`` into Convolution layers of ``dst``
    (``mapping`` e.g. ``["fc6:fc6-conv", "fc7:fc7-conv", "fc8:fc8-conv"]``), weights reshaped
    (N, K) -> (N, C, kh, kw); every other mapped layer must match exactly."""
    return copy_layers(src, dst, mapping, reshape=True, strict=True)
