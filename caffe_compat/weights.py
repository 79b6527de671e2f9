"""A net's weights in and out, by layer name (Caffe's ``CopyTrainedLayersFrom``, ``ToProto``,
``ToHDF5``): what ``Net.copy_from``, ``Net.save`` and ``Net.save_hdf5`` do, as functions of the
layers (name -> ``Layer``) so that surgery and tools can use them on any set of layers.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from caffe_compat import io as cio
from caffe_compat.errors import NetError
from caffe_compat.proto import caffe_pb2

__all__ = ["copy_from_proto", "copy_from_hdf5", "to_proto", "save_hdf5"]

log = logging.getLogger("caffe_compat")


def _shapes_match(bp, src_shape: tuple, dst_shape: tuple) -> bool:
    if tuple(src_shape) == tuple(dst_shape):
        return True
    legacy = any(bp.HasField(f) for f in ("num", "channels", "height", "width"))
    if legacy and len(dst_shape) <= 4:
        padded = (1,) * (4 - len(dst_shape)) + tuple(dst_shape)
        return tuple(src_shape) == padded
    return False


def copy_from_proto(layer_dict: dict, src, source: str = "<NetParameter>") -> None:
    """Copy the blobs of ``src``'s layers into the layers of the same name (others are skipped,
    as Caffe logs "Ignoring source layer"). Every blob is read and checked first (count, shape,
    values), so a mismatch — named by layer, blob index and both shapes — loads nothing."""
    staged = []
    for lp in src.layer:
        if lp.name not in layer_dict:
            log.info("Ignoring source layer %s", lp.name)
            continue
        target = layer_dict[lp.name]
        if len(lp.blobs) != len(target.blobs):
            raise NetError(
                f"{source}: layer {lp.name!r}: the weights have {len(lp.blobs)} blob(s), the net's "
                f"layer has {len(target.blobs)}: incompatible number of blobs"
            )
        for k, bp in enumerate(lp.blobs):
            arr = cio.blob_to_array(bp, what=f"{source}: layer {lp.name!r} blob {k}")
            p = target.blobs[k]
            if not _shapes_match(bp, arr.shape, tuple(p.shape)):
                raise NetError(
                    f"{source}: cannot copy param {k} weights from layer {lp.name!r}; shape mismatch. "
                    f"Source param shape is {list(arr.shape)}; target param shape is "
                    f"{list(p.shape)}. To learn this layer's parameters from scratch rather than "
                    f"copying from a saved net, rename the layer."
                )
            staged.append((p, arr))
    with torch.no_grad():
        for p, arr in staged:
            p.detach().copy_(torch.from_numpy(np.ascontiguousarray(arr).reshape(tuple(p.shape))))


def _shared_indices(layer_dict: dict) -> dict[str, tuple[int, list[int]]]:
    """Per layer: its number of blobs and the indices of those it shares from an earlier layer
    (written under their owner in Caffe's HDF5 weights)."""
    seen: set[int] = set()
    out = {}
    for name, layer in layer_dict.items():
        shared = [k for k, p in enumerate(layer.blobs) if id(p) in seen]
        seen.update(id(p) for p in layer.blobs)
        out[name] = (len(layer.blobs), shared)
    return out


def copy_from_hdf5(layer_dict: dict, path: str) -> None:
    """Caffe's CopyTrainedLayersFromHDF5 (datasets ``data/<layer>/<k>``): the whole file read
    and checked first (``io.read_caffemodel_h5``), never loaded partially."""
    weights = cio.read_caffemodel_h5(path, layers=_shared_indices(layer_dict))
    staged = []
    for lname, blobs in weights.items():
        if lname not in layer_dict:
            log.info("Ignoring source layer %s", lname)
            continue
        target = layer_dict[lname]
        for k, arr in blobs.items():
            p = target.blobs[k]
            if arr.size != p.numel():
                raise NetError(
                    f"{path}: layer {lname!r} blob {k}: shape {list(arr.shape)} in the file, {list(p.shape)} in the net"
                )
            staged.append((p, arr))
    with torch.no_grad():
        for p, arr in staged:
            p.detach().copy_(torch.from_numpy(arr.astype(np.float32).reshape(tuple(p.shape))))


def to_proto(name: str, layers, write_diff: bool = False):
    """The net as Caffe's Net::ToProto writes it: every layer (splits and inputs included) with
    its parameters and blobs (``shape`` + float ``data``)."""
    out = caffe_pb2.NetParameter()
    out.name = name
    for layer in layers:
        nl = out.layer.add()
        nl.CopyFrom(layer.param)
        del nl.blobs[:]
        for p in layer.blobs:
            diff = None
            if write_diff:
                diff = (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu().numpy()
            nl.blobs.add().CopyFrom(cio.array_to_blob(p.detach().cpu().numpy(), diff))
    return out


def save_hdf5(path, names, layers, write_diff: bool = False) -> None:
    """Caffe's Net::ToHDF5, written atomically: a group ``data/<layer>`` for every layer, holding
    datasets ``0, 1, ...`` for the parameters it owns (a shared parameter once, under its owner);
    ``diff/...`` alike when ``write_diff``."""
    import h5py

    def fill(f) -> None:
        written: set[int] = set()
        g = f.create_group("data")
        gd = f.create_group("diff") if write_diff else None
        for name, layer in zip(names, layers):
            lg = g.create_group(name)
            dg = gd.create_group(name) if gd is not None else None
            for k, p in enumerate(layer.blobs):
                if id(p) in written:
                    continue
                written.add(id(p))
                lg.create_dataset(str(k), data=p.detach().cpu().numpy())
                if dg is not None:
                    grad = p.grad if p.grad is not None else torch.zeros_like(p)
                    dg.create_dataset(str(k), data=grad.detach().cpu().numpy())

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            fill(f)

    cio.atomic_write(os.fspath(path), write)
