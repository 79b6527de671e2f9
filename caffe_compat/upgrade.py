"""Upgrades of old net and solver definitions, as Caffe's ``upgrade_proto.cpp`` does them.

``upgrade_net`` applies, in Caffe's order, each step the net needs:

1. V0 -> V1: ``layers { layer { type: "conv" ... } }`` (all parameters flat in a
   ``V0LayerParameter``) become V1 layers with typed parameter messages; ``padding`` layers are
   merged into the conv/pool layer they feed.
2. Data transformation: ``scale``, ``mean_file``, ``crop_size``, ``mirror`` of V1 DATA /
   IMAGE_DATA / WINDOW_DATA layers move into ``transform_param``.
3. V1 -> V2: ``layers`` (enum type) become ``layer`` (string type); ``blobs_lr`` /
   ``weight_decay`` / ``param`` names / ``blob_share_mode`` become ``param { lr_mult
   decay_mult name share_mode }``; blobs, include/exclude, loss_weight and every typed
   parameter are copied.
4. Net inputs: ``input`` + ``input_shape`` / ``input_dim`` become one ``Input`` layer named
   ``"input"`` placed first; the net-level fields are cleared.
5. BatchNorm: a BatchNorm layer with three ``param`` specs gets ``lr_mult = decay_mult = 0``
   in each (its blobs are statistics, not learned).

``upgrade_solver`` turns the legacy ``solver_type`` enum into the ``type`` string and, given
the solver file's path, fills ``snapshot_prefix`` as BVLC master does.

Differences from Caffe: where Caffe aborts (``LOG(FATAL)``/``CHECK``) we raise ``FormatError``
naming the file; where Caffe logs an error and continues (a V0 parameter that does not apply
to its layer type), we log a warning through ``logging`` and continue likewise.
"""

from __future__ import annotations

import logging
import os

from caffe_compat.errors import FormatError, SolverError
from caffe_compat.proto import caffe_pb2

__all__ = [
    "upgrade_net",
    "upgrade_solver",
    "net_needs_upgrade",
    "V1_LAYER_TYPE_NAMES",
    "V0_LAYER_TYPES",
    "SOLVER_TYPE_NAMES",
]

log = logging.getLogger(__name__)

V1 = caffe_pb2.V1LayerParameter

#: V1 enum type -> V2 type string (V1's NONE maps to the empty string, as in Caffe).
V1_LAYER_TYPE_NAMES: dict[int, str] = {
    V1.NONE: "",
    V1.ABSVAL: "AbsVal",
    V1.ACCURACY: "Accuracy",
    V1.ARGMAX: "ArgMax",
    V1.BNLL: "BNLL",
    V1.CONCAT: "Concat",
    V1.CONTRASTIVE_LOSS: "ContrastiveLoss",
    V1.CONVOLUTION: "Convolution",
    V1.DECONVOLUTION: "Deconvolution",
    V1.DATA: "Data",
    V1.DROPOUT: "Dropout",
    V1.DUMMY_DATA: "DummyData",
    V1.EUCLIDEAN_LOSS: "EuclideanLoss",
    V1.ELTWISE: "Eltwise",
    V1.EXP: "Exp",
    V1.FLATTEN: "Flatten",
    V1.HDF5_DATA: "HDF5Data",
    V1.HDF5_OUTPUT: "HDF5Output",
    V1.HINGE_LOSS: "HingeLoss",
    V1.IM2COL: "Im2col",
    V1.IMAGE_DATA: "ImageData",
    V1.INFOGAIN_LOSS: "InfogainLoss",
    V1.INNER_PRODUCT: "InnerProduct",
    V1.LRN: "LRN",
    V1.MEMORY_DATA: "MemoryData",
    V1.MULTINOMIAL_LOGISTIC_LOSS: "MultinomialLogisticLoss",
    V1.MVN: "MVN",
    V1.POOLING: "Pooling",
    V1.POWER: "Power",
    V1.RELU: "ReLU",
    V1.SIGMOID: "Sigmoid",
    V1.SIGMOID_CROSS_ENTROPY_LOSS: "SigmoidCrossEntropyLoss",
    V1.SILENCE: "Silence",
    V1.SOFTMAX: "Softmax",
    V1.SOFTMAX_LOSS: "SoftmaxWithLoss",
    V1.SPLIT: "Split",
    V1.SLICE: "Slice",
    V1.TANH: "TanH",
    V1.WINDOW_DATA: "WindowData",
    V1.THRESHOLD: "Threshold",
}

#: V0 type string -> V1 enum type.
V0_LAYER_TYPES: dict[str, int] = {
    "accuracy": V1.ACCURACY,
    "bnll": V1.BNLL,
    "concat": V1.CONCAT,
    "conv": V1.CONVOLUTION,
    "data": V1.DATA,
    "dropout": V1.DROPOUT,
    "euclidean_loss": V1.EUCLIDEAN_LOSS,
    "flatten": V1.FLATTEN,
    "hdf5_data": V1.HDF5_DATA,
    "hdf5_output": V1.HDF5_OUTPUT,
    "im2col": V1.IM2COL,
    "images": V1.IMAGE_DATA,
    "infogain_loss": V1.INFOGAIN_LOSS,
    "innerproduct": V1.INNER_PRODUCT,
    "lrn": V1.LRN,
    "multinomial_logistic_loss": V1.MULTINOMIAL_LOGISTIC_LOSS,
    "pool": V1.POOLING,
    "relu": V1.RELU,
    "sigmoid": V1.SIGMOID,
    "softmax": V1.SOFTMAX,
    "softmax_loss": V1.SOFTMAX_LOSS,
    "split": V1.SPLIT,
    "tanh": V1.TANH,
    "window_data": V1.WINDOW_DATA,
}

#: Legacy SolverParameter.solver_type enum -> type string.
SOLVER_TYPE_NAMES: dict[int, str] = {
    caffe_pb2.SolverParameter.SGD: "SGD",
    caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
    caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad",
    caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
    caffe_pb2.SolverParameter.ADADELTA: "AdaDelta",
    caffe_pb2.SolverParameter.ADAM: "Adam",
}

# Typed parameter messages a V1 layer carries over to V2 under the same field name.
_V1_PARAM_FIELDS = (
    "accuracy_param",
    "argmax_param",
    "concat_param",
    "contrastive_loss_param",
    "convolution_param",
    "data_param",
    "dropout_param",
    "dummy_data_param",
    "eltwise_param",
    "exp_param",
    "hdf5_data_param",
    "hdf5_output_param",
    "hinge_loss_param",
    "image_data_param",
    "infogain_loss_param",
    "inner_product_param",
    "lrn_param",
    "memory_data_param",
    "mvn_param",
    "pooling_param",
    "power_param",
    "relu_param",
    "sigmoid_param",
    "softmax_param",
    "slice_param",
    "tanh_param",
    "threshold_param",
    "window_data_param",
    "transform_param",
    "loss_param",
)

_DATA_TRANSFORM_LAYERS = (
    (V1.DATA, "data_param"),
    (V1.IMAGE_DATA, "image_data_param"),
    (V1.WINDOW_DATA, "window_data_param"),
)
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


# ---------------------------------------------------------------------------------------------
# What needs upgrading


def _needs_v0_to_v1(net: caffe_pb2.NetParameter) -> bool:
    return any(layer.HasField("layer") for layer in net.layers)


def _needs_data_upgrade(net: caffe_pb2.NetParameter) -> bool:
    for layer in net.layers:
        for ltype, pname in _DATA_TRANSFORM_LAYERS:
            if layer.type == ltype:
                p = getattr(layer, pname)
                if any(p.HasField(f) for f in _TRANSFORM_FIELDS):
                    return True
    return False


def _needs_v1_to_v2(net: caffe_pb2.NetParameter) -> bool:
    return len(net.layers) > 0


def _needs_input_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return len(net.input) > 0


def _needs_batchnorm_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return any(layer.type == "BatchNorm" and len(layer.param) == 3 for layer in net.layer)


def net_needs_upgrade(net_param: caffe_pb2.NetParameter) -> bool:
    """True when any step of ``upgrade_net`` would change ``net_param``."""
    return (
        _needs_v0_to_v1(net_param)
        or _needs_data_upgrade(net_param)
        or _needs_v1_to_v2(net_param)
        or _needs_input_upgrade(net_param)
        or _needs_batchnorm_upgrade(net_param)
    )


# ---------------------------------------------------------------------------------------------
# V0 -> V1


def _merge_v0_padding_layers(net: caffe_pb2.NetParameter, source: str) -> caffe_pb2.NetParameter:
    """Drop V0 ``padding`` layers, moving their pad into the conv/pool layer they feed."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    out.ClearField("layers")
    last_top: dict[str, int] = {name: -1 for name in net.input}
    for i, conn in enumerate(net.layers):
        v0 = conn.layer
        if v0.type != "padding":
            out.layers.add().CopyFrom(conn)
        for j, blob in enumerate(conn.bottom):
            if blob not in last_top:
                raise FormatError(
                    f"{source}: V0 layer {v0.name!r} (index {i}) has unknown bottom blob "
                    f"{blob!r} (bottom index {j}); no earlier layer or input produces it"
                )
            top_idx = last_top[blob]
            if top_idx == -1:
                continue
            src = net.layers[top_idx]
            if src.layer.type == "padding":
                if v0.type not in ("conv", "pool"):
                    raise FormatError(
                        f"{source}: V0 padding layer {src.layer.name!r} feeds layer {v0.name!r} "
                        f"of type {v0.type!r}; only conv and pool layers can absorb padding"
                    )
                if len(conn.bottom) != 1 or len(src.bottom) != 1 or len(src.top) != 1:
                    raise FormatError(
                        f"{source}: V0 padding layer {src.layer.name!r} and the layer it feeds "
                        f"({v0.name!r}) must each have exactly one bottom and one top"
                    )
                target = out.layers[len(out.layers) - 1]
                target.layer.pad = src.layer.pad
                target.bottom[j] = src.bottom[0]
        for blob in conn.top:
            last_top[blob] = i
    return out


def _upgrade_v0_layer(conn: caffe_pb2.V1LayerParameter, out: caffe_pb2.V1LayerParameter) -> bool:
    out.Clear()
    ok = True
    out.bottom.extend(conn.bottom)
    out.top.extend(conn.top)
    if not conn.HasField("layer"):
        return ok
    v0 = conn.layer
    t = v0.type
    if v0.HasField("name"):
        out.name = v0.name
    if v0.HasField("type"):
        if t not in V0_LAYER_TYPES:
            raise FormatError(
                f"unknown V0 layer type {t!r} (layer {v0.name!r}); known V0 types: {', '.join(sorted(V0_LAYER_TYPES))}"
            )
        out.type = V0_LAYER_TYPES[t]
    for b in v0.blobs:
        out.blobs.add().CopyFrom(b)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)

    def unknown(field: str) -> None:
        nonlocal ok
        log.warning("V0 upgrade: parameter %s does not apply to layer type %r (layer %r)", field, t, v0.name)
        ok = False

    # (V0 field, {V0 type: (V1 param message, V1 field, how)}); how: "set", "add" or "copy".
    simple = {
        "num_output": {
            "conv": ("convolution_param", "num_output"),
            "innerproduct": ("inner_product_param", "num_output"),
        },
        "biasterm": {"conv": ("convolution_param", "bias_term"), "innerproduct": ("inner_product_param", "bias_term")},
        "group": {"conv": ("convolution_param", "group")},
        "dropout_ratio": {"dropout": ("dropout_param", "dropout_ratio")},
        "local_size": {"lrn": ("lrn_param", "local_size")},
        "alpha": {"lrn": ("lrn_param", "alpha")},
        "beta": {"lrn": ("lrn_param", "beta")},
        "k": {"lrn": ("lrn_param", "k")},
        "source": {
            "data": ("data_param", "source"),
            "hdf5_data": ("hdf5_data_param", "source"),
            "images": ("image_data_param", "source"),
            "window_data": ("window_data_param", "source"),
            "infogain_loss": ("infogain_loss_param", "source"),
        },
        "batchsize": {
            "data": ("data_param", "batch_size"),
            "hdf5_data": ("hdf5_data_param", "batch_size"),
            "images": ("image_data_param", "batch_size"),
            "window_data": ("window_data_param", "batch_size"),
        },
        "rand_skip": {"data": ("data_param", "rand_skip"), "images": ("image_data_param", "rand_skip")},
        "shuffle_images": {"images": ("image_data_param", "shuffle")},
        "new_height": {"images": ("image_data_param", "new_height")},
        "new_width": {"images": ("image_data_param", "new_width")},
        "concat_dim": {"concat": ("concat_param", "concat_dim")},
        "det_fg_threshold": {"window_data": ("window_data_param", "fg_threshold")},
        "det_bg_threshold": {"window_data": ("window_data_param", "bg_threshold")},
        "det_fg_fraction": {"window_data": ("window_data_param", "fg_fraction")},
        "det_context_pad": {"window_data": ("window_data_param", "context_pad")},
        "det_crop_mode": {"window_data": ("window_data_param", "crop_mode")},
    }
    repeated = {
        "pad": {"conv": "convolution_param", "pool": "pooling_param"},
        "kernelsize": {"conv": "convolution_param", "pool": "pooling_param"},
        "stride": {"conv": "convolution_param", "pool": "pooling_param"},
    }
    repeated_target = {"pad": "pad", "kernelsize": "kernel_size", "stride": "stride"}
    fillers = {"weight_filler", "bias_filler"}

    for field in fillers:
        if v0.HasField(field):
            if t == "conv":
                getattr(out.convolution_param, field).CopyFrom(getattr(v0, field))
            elif t == "innerproduct":
                getattr(out.inner_product_param, field).CopyFrom(getattr(v0, field))
            else:
                unknown(field)
    for field, targets in simple.items():
        if v0.HasField(field):
            if t in targets:
                msg_name, target = targets[t]
                setattr(getattr(out, msg_name), target, getattr(v0, field))
            else:
                unknown(field)
    for field, targets in repeated.items():
        if v0.HasField(field):
            if t in targets:
                target = getattr(out, targets[t])
                if t == "conv":  # repeated in ConvolutionParameter, optional in PoolingParameter
                    getattr(target, repeated_target[field]).append(getattr(v0, field))
                else:
                    setattr(target, repeated_target[field], getattr(v0, field))
            else:
                unknown(field)
    if v0.HasField("pool"):
        if t == "pool":
            out.pooling_param.pool = v0.pool  # same numbering MAX/AVE/STOCHASTIC
        else:
            unknown("pool")
    # Transformation fields apply whatever the type.
    if v0.HasField("scale"):
        out.transform_param.scale = v0.scale
    if v0.HasField("meanfile"):
        out.transform_param.mean_file = v0.meanfile
    if v0.HasField("cropsize"):
        out.transform_param.crop_size = v0.cropsize
    if v0.HasField("mirror"):
        out.transform_param.mirror = v0.mirror
    if v0.HasField("hdf5_output_param"):
        if t == "hdf5_output":
            out.hdf5_output_param.CopyFrom(v0.hdf5_output_param)
        else:
            unknown("hdf5_output_param")
    return ok


def _upgrade_v0_net(net: caffe_pb2.NetParameter, source: str) -> caffe_pb2.NetParameter:
    padded = _merge_v0_padding_layers(net, source)
    out = caffe_pb2.NetParameter()
    if padded.HasField("name"):
        out.name = padded.name
    ok = True
    for conn in padded.layers:
        try:
            ok &= _upgrade_v0_layer(conn, out.layers.add())
        except FormatError as exc:
            raise FormatError(f"{source}: {exc}") from None
    out.input.extend(padded.input)
    out.input_dim.extend(padded.input_dim)
    if padded.HasField("force_backward"):
        out.force_backward = padded.force_backward
    if not ok:
        log.warning("%s: some V0 parameters could not be upgraded (see above); continuing", source)
    return out


# ---------------------------------------------------------------------------------------------
# Data transformation, V1 -> V2, inputs, BatchNorm


def _upgrade_data_transformation(net: caffe_pb2.NetParameter) -> None:
    for layer in net.layers:
        for ltype, pname in _DATA_TRANSFORM_LAYERS:
            if layer.type != ltype:
                continue
            p = getattr(layer, pname)
            p.SetInParent()  # Caffe's mutable_*_param(): present from now on
            layer.transform_param.SetInParent()
            for f in _TRANSFORM_FIELDS:
                if p.HasField(f):
                    setattr(layer.transform_param, f, getattr(p, f))
                    p.ClearField(f)


def _upgrade_v1_layer(v1: caffe_pb2.V1LayerParameter, out: caffe_pb2.LayerParameter, source: str) -> bool:
    out.Clear()
    ok = True
    out.bottom.extend(v1.bottom)
    out.top.extend(v1.top)
    if v1.HasField("name"):
        out.name = v1.name
    for rule in v1.include:
        out.include.add().CopyFrom(rule)
    for rule in v1.exclude:
        out.exclude.add().CopyFrom(rule)
    if v1.HasField("type"):
        if v1.type not in V1_LAYER_TYPE_NAMES:
            raise FormatError(f"{source}: layer {v1.name!r} has unknown V1 layer type {v1.type}")
        out.type = V1_LAYER_TYPE_NAMES[v1.type]
    for b in v1.blobs:
        out.blobs.add().CopyFrom(b)

    def param(i: int) -> caffe_pb2.ParamSpec:
        while len(out.param) <= i:
            out.param.add()
        return out.param[i]

    for i, name in enumerate(v1.param):
        param(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        param(i).share_mode = mode  # STRICT/PERMISSIVE numbered alike in both enums
    for i, lr in enumerate(v1.blobs_lr):
        param(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        param(i).decay_mult = decay
    out.loss_weight.extend(v1.loss_weight)
    for field in _V1_PARAM_FIELDS:
        if v1.HasField(field):
            getattr(out, field).CopyFrom(getattr(v1, field))
    if v1.HasField("layer"):
        log.warning("%s: layer %r still holds a V0 layer definition; it is ignored", source, v1.name)
        ok = False
    return ok


def _upgrade_v1_net(net: caffe_pb2.NetParameter, source: str) -> caffe_pb2.NetParameter:
    if len(net.layer) > 0:
        raise FormatError(
            f"{source}: the net defines both 'layers' (V1 format, e.g. layers {{ type: CONVOLUTION }}) "
            f"and 'layer' (current format, e.g. layer {{ type: \"Convolution\" }}) blocks; "
            f"Caffe refuses to upgrade such a net. Convert every 'layers' block to the 'layer' "
            f"format (tools/upgrade_net.py on the V1 part) so that only one kind remains"
        )
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    out.ClearField("layers")
    out.ClearField("layer")
    ok = True
    for v1 in net.layers:
        ok &= _upgrade_v1_layer(v1, out.layer.add(), source)
    if not ok:
        log.warning("%s: some V1 layers could not be fully upgraded (see above); continuing", source)
    return out


def _upgrade_input(net: caffe_pb2.NetParameter, source: str) -> None:
    has_shape = len(net.input_shape) > 0
    has_dim = len(net.input_dim) > 0
    if has_shape or has_dim:
        n = len(net.input)
        if has_shape and len(net.input_shape) < n:
            raise FormatError(
                f"{source}: {n} net inputs but {len(net.input_shape)} input_shape entries; "
                f"give one input_shape per input"
            )
        if not has_shape and len(net.input_dim) < 4 * n:
            raise FormatError(
                f"{source}: {n} net inputs need {4 * n} input_dim values (num, channels, height, "
                f"width per input) but {len(net.input_dim)} are given"
            )
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        layer.input_param.SetInParent()
        for i, name in enumerate(net.input):
            layer.top.append(name)
            shape = layer.input_param.shape.add()
            if has_shape:
                shape.CopyFrom(net.input_shape[i])
            else:
                shape.dim.extend(net.input_dim[4 * i : 4 * i + 4])
        layers = [caffe_pb2.LayerParameter()]
        layers[0].CopyFrom(layer)
        for existing in net.layer:
            copy = caffe_pb2.LayerParameter()
            copy.CopyFrom(existing)
            layers.append(copy)
        net.ClearField("layer")
        net.layer.extend(layers)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")


def _upgrade_batchnorm(net: caffe_pb2.NetParameter) -> None:
    for layer in net.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            for spec in layer.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0


def upgrade_net(net_param: caffe_pb2.NetParameter, source: str = "<net>") -> caffe_pb2.NetParameter:
    """Return ``net_param`` upgraded to the current format, as Caffe's ``UpgradeNetAsNeeded``.

    ``source`` (the file name) appears in log lines and errors. The input message is not
    modified. Raises ``FormatError`` where Caffe aborts: ``layers`` and ``layer`` mixed, an
    unknown V0/V1 layer type, malformed V0 padding layers, too few input dims.
    """
    net = caffe_pb2.NetParameter()
    net.CopyFrom(net_param)
    if _needs_v0_to_v1(net):
        log.info("%s: upgrading V0 layer definitions", source)
        net = _upgrade_v0_net(net, source)
    if _needs_data_upgrade(net):
        log.info("%s: upgrading data transformation fields into transform_param", source)
        _upgrade_data_transformation(net)
    if _needs_v1_to_v2(net):
        log.info("%s: upgrading V1 'layers' into 'layer'", source)
        net = _upgrade_v1_net(net, source)
    if _needs_input_upgrade(net):
        log.info("%s: upgrading net inputs into an Input layer", source)
        _upgrade_input(net, source)
    if _needs_batchnorm_upgrade(net):
        log.info("%s: setting lr_mult = decay_mult = 0 on BatchNorm param specs", source)
        _upgrade_batchnorm(net)
    return net


def upgrade_solver(solver_param: caffe_pb2.SolverParameter, source: str | None = None) -> caffe_pb2.SolverParameter:
    """Return ``solver_param`` upgraded as Caffe's ``ReadSolverParamsFromTextFileOrDie`` does.

    - ``solver_type`` (legacy enum) -> ``type`` (string: SGD, Nesterov, AdaGrad, RMSProp,
      AdaDelta, Adam); both set raises ``SolverError``.
    - With ``source`` (the solver file's path): an unset ``snapshot_prefix`` becomes ``source``
      without its extension; a ``snapshot_prefix`` naming an existing folder (relative to the
      working directory, as in Caffe) becomes ``<folder>/<stem of source>``.

    The input message is not modified.
    """
    solver = caffe_pb2.SolverParameter()
    solver.CopyFrom(solver_param)
    where = source or "<solver>"
    if solver.HasField("solver_type"):
        if solver.HasField("type"):
            raise SolverError(
                f"{where}: both 'solver_type' (legacy enum) and 'type' (string) are set; "
                f"keep only 'type: \"{solver.type}\"'"
            )
        solver.type = SOLVER_TYPE_NAMES[solver.solver_type]
        solver.ClearField("solver_type")
        log.info("%s: upgraded solver_type to type: %r", where, solver.type)
    if source is not None:
        if not solver.HasField("snapshot_prefix"):
            solver.snapshot_prefix = os.path.splitext(source)[0]
        elif os.path.isdir(solver.snapshot_prefix):
            stem = os.path.splitext(os.path.basename(source))[0]
            solver.snapshot_prefix = os.path.join(solver.snapshot_prefix, stem)
    return solver
