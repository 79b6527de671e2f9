"""The nets and solvers of the dental reproduction, built as ``caffe_pb2`` messages.

The files shipped in ``prototxt/`` and ``solvers/`` are these builders' output at the paper's
scale (``Arch()``: 224×224 input, AlexNet's widths); a test checks that they stay equal, and
``python -m caffe_compat.dental.nets`` rewrites them. The presets of
:mod:`caffe_compat.dental.pipeline` call the same builders with a smaller input or narrower
layers, which changes only sizes, never the structure, and, for training from scratch, with the
``Arch`` recipe options (fillers, decoder widths and leaky decoder ReLUs, the CAE's target scale
and loss weight, the regression head's lr_mult and std), which change only layer parameters.

- AlexNet: bvlc_alexnet's layers and names (conv1..conv5 with conv2/4/5 in two groups, LRN after
  conv1 and conv2, fc6, fc7, fc8), so ``bvlc_alexnet.caffemodel`` loads by name.
- CAE: the AlexNet encoder (same names, no dropout) up to the fc8 code, then its mirror:
  defc7, defc6 (InnerProduct), defc5 (InnerProduct to pool5's size) + Reshape, and
  Deconvolutions that undo pool5, conv5..conv3, pool2, conv2, pool1 and conv1 (their kernels
  chosen so that every size of the encoder comes back exactly, ending at the input size).
  Loss: ``EuclideanLoss(recon, data / 256) `` with ``loss_weight = 1 / (3·S·S)``, i.e. half the
  mean squared error per pixel, in grey levels / 256.
- Landmark regressor: AlexNet with fc8 replaced by ``fc8_landmarks`` (8 outputs, lr_mult 10/20
  as in Caffe's fine-tuning examples, bias 0.5 = the middle of the [0, 1] targets) and
  ``EuclideanLoss`` against the ``landmarks`` dataset. The fc6-frozen variant sets lr_mult 0
  and decay_mult 0 on both of fc6's blobs.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

from google.protobuf import text_format

from caffe_compat.proto import caffe_pb2

__all__ = [
    "Arch",
    "DEFAULT_DATA_DIR",
    "SHIPPED",
    "alexnet_deploy",
    "cae_deploy",
    "cae_train_val",
    "encoder_sizes",
    "landmark_deploy",
    "landmark_train_val",
    "solver",
    "shipped_messages",
    "write_shipped",
]

#: Where tools/prepare_dental.py writes by default and what the shipped prototxts read
#: (relative to the repository root, which must be the working directory, as in Caffe).
DEFAULT_DATA_DIR = "data/dental"


@dataclass
class Arch:
    """Sizes of one AlexNet-shaped family of nets (the structure never changes)."""

    input_size: int = 224
    conv: tuple = (96, 256, 384, 384, 256)
    fc: int = 4096
    code: int = 1000
    groups: bool = True
    landmarks: int = 8
    #: weight filler of the AlexNet layers: "gaussian" = bvlc_alexnet's (std 0.01 for the convs and
    #: fc8, 0.005 for fc6/fc7), or "msra" / "xavier" (better for training from scratch)
    filler: str = "gaussian"
    #: the decoder's widths, mirroring ``conv`` (None: ``conv`` itself)
    decoder_conv: tuple | None = None
    #: the decoder's fully connected width (None: ``fc``)
    decoder_fc: int | None = None
    #: loss_weight of the CAE's EuclideanLoss (None: 1 / (3·S²), half the MSE per pixel)
    cae_loss_weight: float | None = None
    #: fc8_landmarks: lr_mult of the weights (bias: twice that) and the std of its gaussian filler
    head_lr_mult: float = 10.0
    head_std: float = 0.01
    #: negative_slope of the decoder's ReLUs (0: plain ReLU; > 0: leaky, no unit of the decoder can die)
    decoder_relu_slope: float = 0.0
    #: the last deconvolution (``recon``): None = xavier like the rest of the decoder; a std = a
    #: gaussian filler that small, so that the CAE starts by outputting ~0 (the mean image when the
    #: mean image is subtracted from the data) instead of noise
    decoder_out_std: float | None = None
    #: the CAE's target is ``data × cae_target_scale`` (Power layer "target")
    cae_target_scale: float = 1.0 / 256.0
    #: > 0: a denoising CAE: in TRAIN, a Dropout layer ("corrupt", this dropout_ratio) zeroes that
    #: fraction of the encoder's input pixels (0 = the mean image once it is subtracted; kept pixels
    #: are scaled by 1 / (1 − ratio), Caffe's Dropout), while the target stays the clean image
    cae_input_dropout: float = 0.0

    def cae_loss_weight_value(self) -> float:
        """The CAE loss's weight: ``cae_loss_weight``, or 1 / (3·S²) when unset."""
        return 1.0 / (3 * self.input_size**2) if self.cae_loss_weight is None else self.cae_loss_weight


def encoder_sizes(size: int) -> dict:
    """Spatial sizes through AlexNet for a square ``size`` input (Caffe's floor conv, ceil pool)."""
    c1 = (size - 11) // 4 + 1
    p1 = math.ceil((c1 - 3) / 2) + 1
    p2 = math.ceil((p1 - 3) / 2) + 1
    p5 = math.ceil((p2 - 3) / 2) + 1
    if c1 < 3 or p2 < 3:
        raise ValueError(f"input size {size} is too small for AlexNet (needs at least 51)")
    return {"conv1": c1, "pool1": p1, "pool2": p2, "pool5": p5}


# ---------------------------------------------------------------------------------------------
# layer helpers


def _filler(msg, kind: str, value: float) -> None:
    msg.type = kind
    if kind == "gaussian":
        msg.std = value
    elif kind == "constant":
        msg.value = value


def _params(lp, lr: tuple = (1.0, 2.0), decay: tuple = (1.0, 0.0)) -> None:
    for lr_mult, d in zip(lr, decay):
        p = lp.param.add()
        p.lr_mult = lr_mult
        p.decay_mult = d


def _layer(net, name: str, type_: str, bottom, top):
    lp = net.layer.add()
    lp.name = name
    lp.type = type_
    for b in [bottom] if isinstance(bottom, str) else bottom:
        lp.bottom.append(b)
    for t in [top] if isinstance(top, str) else top:
        lp.top.append(t)
    return lp


def _conv(
    net,
    name,
    bottom,
    num,
    k,
    stride=1,
    pad=0,
    group=1,
    std=0.01,
    bias=0.0,
    deconv=False,
    lr=(1.0, 2.0),
    weight="gaussian",
):
    lp = _layer(net, name, "Deconvolution" if deconv else "Convolution", bottom, name)
    _params(lp, lr, (1.0, 0.0))
    cp = lp.convolution_param
    cp.num_output = num
    cp.kernel_size.append(k)
    if stride != 1:
        cp.stride.append(stride)
    if pad:
        cp.pad.append(pad)
    if group != 1:
        cp.group = group
    _filler(cp.weight_filler, weight, std)
    _filler(cp.bias_filler, "constant", bias)
    return lp


def _ip(net, name, bottom, num, std=0.005, bias=0.1, lr=(1.0, 2.0), decay=(1.0, 0.0), weight="gaussian"):
    lp = _layer(net, name, "InnerProduct", bottom, name)
    _params(lp, lr, decay)
    ip = lp.inner_product_param
    ip.num_output = num
    _filler(ip.weight_filler, weight, std)
    _filler(ip.bias_filler, "constant", bias)
    return lp


def _relu(net, name, blob):
    _layer(net, name, "ReLU", blob, blob)


def _pool(net, name, bottom):
    lp = _layer(net, name, "Pooling", bottom, name)
    pp = lp.pooling_param
    pp.pool = caffe_pb2.PoolingParameter.MAX
    pp.kernel_size = 3
    pp.stride = 2


def _lrn(net, name, bottom):
    lp = _layer(net, name, "LRN", bottom, name)
    lp.lrn_param.local_size = 5
    lp.lrn_param.alpha = 0.0001
    lp.lrn_param.beta = 0.75


def _dropout(net, name, blob):
    lp = _layer(net, name, "Dropout", blob, blob)
    lp.dropout_param.dropout_ratio = 0.5


def _input(net, size: int, batch: int = 1) -> None:
    lp = _layer(net, "data", "Input", [], "data")
    lp.input_param.shape.add().dim.extend([batch, 3, size, size])


def _hdf5(net, tops, source: str, batch: int, phase: int, shuffle: bool) -> None:
    lp = _layer(net, "data", "HDF5Data", [], tops)
    lp.include.add().phase = phase
    lp.hdf5_data_param.source = source
    lp.hdf5_data_param.batch_size = batch
    if shuffle:
        lp.hdf5_data_param.shuffle = True


def _alexnet(
    net,
    arch: Arch,
    *,
    fc8_name: str = "fc8",
    fc8_out: int | None = None,
    dropout: bool = True,
    fc6_frozen: bool = False,
    fc8_bias: float = 0.0,
    fc8_lr: tuple = (1.0, 2.0),
    input_blob: str = "data",
) -> str:
    c = arch.conv
    g = 2 if arch.groups else 1
    w = {} if arch.filler == "gaussian" else {"weight": arch.filler, "std": 0.0}
    _conv(net, "conv1", input_blob, c[0], 11, stride=4, **w)
    _relu(net, "relu1", "conv1")
    _lrn(net, "norm1", "conv1")
    _pool(net, "pool1", "norm1")
    _conv(net, "conv2", "pool1", c[1], 5, pad=2, group=g, bias=0.1, **w)
    _relu(net, "relu2", "conv2")
    _lrn(net, "norm2", "conv2")
    _pool(net, "pool2", "norm2")
    _conv(net, "conv3", "pool2", c[2], 3, pad=1, **w)
    _relu(net, "relu3", "conv3")
    _conv(net, "conv4", "conv3", c[3], 3, pad=1, group=g, bias=0.1, **w)
    _relu(net, "relu4", "conv4")
    _conv(net, "conv5", "conv4", c[4], 3, pad=1, group=g, bias=0.1, **w)
    _relu(net, "relu5", "conv5")
    _pool(net, "pool5", "conv5")
    if fc6_frozen:
        _ip(net, "fc6", "pool5", arch.fc, lr=(0.0, 0.0), decay=(0.0, 0.0), **w)
    else:
        _ip(net, "fc6", "pool5", arch.fc, **w)
    _relu(net, "relu6", "fc6")
    if dropout:
        _dropout(net, "drop6", "fc6")
    _ip(net, "fc7", "fc6", arch.fc, **w)
    _relu(net, "relu7", "fc7")
    if dropout:
        _dropout(net, "drop7", "fc7")
    head = w if fc8_out is None else {}  # the regression head keeps a small gaussian start
    std = 0.01 if fc8_out is None else arch.head_std
    _ip(net, fc8_name, "fc7", fc8_out or arch.code, **{"std": std, **head}, bias=fc8_bias, lr=fc8_lr)
    return fc8_name


def _decoder(net, arch: Arch, code: str = "fc8") -> str:
    s = encoder_sizes(arch.input_size)
    c = arch.decoder_conv or arch.conv
    c5 = arch.conv[4]  # defc5 is reshaped to pool5's shape
    fc = arch.decoder_fc or arch.fc
    x = dict(weight="xavier", std=0.0)

    def _relu(net, name, blob):  # the decoder's ReLUs, leaky when arch.decoder_relu_slope > 0
        lp = _layer(net, name, "ReLU", blob, blob)
        if arch.decoder_relu_slope:
            lp.relu_param.negative_slope = arch.decoder_relu_slope

    _ip(net, "defc7", code, fc, bias=0.0, **x)
    _relu(net, "derelu7", "defc7")
    _ip(net, "defc6", "defc7", fc, bias=0.0, **x)
    _relu(net, "derelu6", "defc6")
    _ip(net, "defc5", "defc6", c5 * s["pool5"] ** 2, bias=0.0, **x)
    _relu(net, "derelu5", "defc5")
    rp = _layer(net, "reshape5", "Reshape", "defc5", "depool5_in")
    rp.reshape_param.shape.dim.extend([0, c5, s["pool5"], s["pool5"]])

    def unpool_kernel(out: int, inp: int, stride: int) -> int:
        k = out - (inp - 1) * stride
        if k < stride:
            raise ValueError(f"input size {arch.input_size}: no deconvolution maps {inp} to {out} with stride {stride}")
        return k

    _conv(net, "depool5", "depool5_in", c[4], unpool_kernel(s["pool2"], s["pool5"], 2), stride=2, deconv=True, **x)
    _relu(net, "derelu_pool5", "depool5")
    _conv(net, "deconv5", "depool5", c[3], 3, pad=1, deconv=True, **x)
    _relu(net, "derelu_conv5", "deconv5")
    _conv(net, "deconv4", "deconv5", c[2], 3, pad=1, deconv=True, **x)
    _relu(net, "derelu_conv4", "deconv4")
    _conv(net, "deconv3", "deconv4", c[1], 3, pad=1, deconv=True, **x)
    _relu(net, "derelu_conv3", "deconv3")
    _conv(net, "depool2", "deconv3", c[1], unpool_kernel(s["pool1"], s["pool2"], 2), stride=2, deconv=True, **x)
    _relu(net, "derelu_pool2", "depool2")
    _conv(net, "deconv2", "depool2", c[0], 5, pad=2, deconv=True, **x)
    _relu(net, "derelu_conv2", "deconv2")
    _conv(net, "depool1", "deconv2", c[0], unpool_kernel(s["conv1"], s["pool1"], 2), stride=2, deconv=True, **x)
    _relu(net, "derelu_pool1", "depool1")
    out = x if arch.decoder_out_std is None else dict(weight="gaussian", std=arch.decoder_out_std)
    lp = _conv(
        net, "deconv1", "depool1", 3, unpool_kernel(arch.input_size, s["conv1"], 4), stride=4, deconv=True, **out
    )
    lp.top[0] = "recon"
    return "recon"


# ---------------------------------------------------------------------------------------------
# nets


def alexnet_deploy(arch: Arch | None = None) -> caffe_pb2.NetParameter:
    """bvlc_alexnet's deploy net (default input 227, as bvlc_alexnet's own deploy.prototxt)."""
    arch = arch or Arch(input_size=227)
    net = caffe_pb2.NetParameter()
    net.name = "AlexNet"
    _input(net, arch.input_size)
    _alexnet(net, arch)
    _layer(net, "prob", "Softmax", "fc8", "prob")
    return net


def cae_train_val(
    arch: Arch | None = None,
    train_source: str = f"{DEFAULT_DATA_DIR}/cae_train.txt",
    val_source: str = f"{DEFAULT_DATA_DIR}/cae_val.txt",
    batch: int = 16,
    val_batch: int = 11,
) -> caffe_pb2.NetParameter:
    """The convolutional auto-encoder: AlexNet encoder, mirrored decoder, image as target."""
    arch = arch or Arch()
    net = caffe_pb2.NetParameter()
    net.name = "DentalCAE"
    _hdf5(net, "data", train_source, batch, caffe_pb2.TRAIN, True)
    _hdf5(net, "data", val_source, val_batch, caffe_pb2.TEST, False)
    _cae_body(net, arch)
    return net


def _cae_body(net, arch: Arch, with_loss: bool = True) -> None:
    source = "data"
    if with_loss and arch.cae_input_dropout > 0:  # denoising: corrupt the input, not the target
        lp = _layer(net, "corrupt", "Dropout", "data", "data_corrupt")
        lp.dropout_param.dropout_ratio = arch.cae_input_dropout
        source = "data_corrupt"
    _alexnet(net, arch, dropout=False, input_blob=source)
    _decoder(net, arch)
    if with_loss:
        lp = _layer(net, "target", "Power", "data", "target")
        lp.power_param.scale = arch.cae_target_scale
        lp = _layer(net, "loss", "EuclideanLoss", ["recon", "target"], "loss")
        lp.loss_weight.append(arch.cae_loss_weight_value())


def cae_deploy(arch: Arch | None = None) -> caffe_pb2.NetParameter:
    """The CAE without data or loss: ``data`` in, ``fc8`` (the code) and ``recon`` out
    (``recon`` × 256 + mean = the reconstructed grey levels)."""
    arch = arch or Arch()
    net = caffe_pb2.NetParameter()
    net.name = "DentalCAE"
    _input(net, arch.input_size)
    _cae_body(net, arch, with_loss=False)
    return net


def _landmark_body(net, arch: Arch, fc6_frozen: bool) -> None:
    _alexnet(
        net,
        arch,
        fc8_name="fc8_landmarks",
        fc8_out=arch.landmarks,
        fc6_frozen=fc6_frozen,
        fc8_bias=0.5,
        fc8_lr=(arch.head_lr_mult, 2.0 * arch.head_lr_mult),
    )


def landmark_train_val(
    arch: Arch | None = None,
    train_source: str = f"{DEFAULT_DATA_DIR}/landmarks_train.txt",
    val_source: str = f"{DEFAULT_DATA_DIR}/landmarks_val.txt",
    batch: int = 16,
    val_batch: int = 11,
    fc6_frozen: bool = False,
) -> caffe_pb2.NetParameter:
    """AlexNet regressing 4 landmarks (8 coordinates) with EuclideanLoss."""
    arch = arch or Arch()
    net = caffe_pb2.NetParameter()
    net.name = "DentalLandmarksFc6Frozen" if fc6_frozen else "DentalLandmarks"
    _hdf5(net, ["data", "landmarks"], train_source, batch, caffe_pb2.TRAIN, True)
    _hdf5(net, ["data", "landmarks"], val_source, val_batch, caffe_pb2.TEST, False)
    _landmark_body(net, arch, fc6_frozen)
    _layer(net, "loss", "EuclideanLoss", ["fc8_landmarks", "landmarks"], "loss")
    return net


def landmark_deploy(arch: Arch | None = None) -> caffe_pb2.NetParameter:
    """The landmark regressor for inference: ``data`` in, ``fc8_landmarks`` (N, 8) out."""
    arch = arch or Arch()
    net = caffe_pb2.NetParameter()
    net.name = "DentalLandmarks"
    _input(net, arch.input_size)
    _landmark_body(net, arch, False)
    return net


def solver(
    net_path: str,
    snapshot_prefix: str,
    *,
    base_lr: float,
    max_iter: int,
    stepsize: int = 0,
    test_iter: int = 2,
    test_interval: int = 100,
    display: int = 20,
    snapshot: int = 0,
    momentum: float = 0.9,
    weight_decay: float = 0.0005,
    seed: int | None = None,
    type: str = "SGD",
    lr_policy: str = "step",
    gamma: float = 0.1,
    power: float = 1.0,
    momentum2: float | None = None,
) -> caffe_pb2.SolverParameter:
    """A solver: by default SGD with a ``step`` policy (gamma 0.1), as Caffe's fine-tuning
    examples; ``type`` (e.g. ``"Adam"``, with ``momentum`` = beta1 and ``momentum2`` = beta2) and
    ``lr_policy`` (``"step"``: ``gamma``, ``stepsize``; ``"poly"``: ``power``; ``"fixed"``) as in
    Caffe's SolverParameter."""
    sp = caffe_pb2.SolverParameter()
    sp.net = net_path
    sp.test_iter.append(test_iter)
    sp.test_interval = test_interval
    sp.test_initialization = False
    sp.base_lr = base_lr
    sp.lr_policy = lr_policy
    if lr_policy in ("step", "exp", "inv", "multistep", "sigmoid"):
        sp.gamma = gamma
    if lr_policy in ("step", "sigmoid"):
        sp.stepsize = stepsize
    if lr_policy in ("poly", "inv"):
        sp.power = power
    sp.display = display
    sp.max_iter = max_iter
    sp.momentum = momentum
    if momentum2 is not None:
        sp.momentum2 = momentum2
    sp.weight_decay = weight_decay
    sp.snapshot = snapshot
    sp.snapshot_prefix = snapshot_prefix
    sp.type = type
    sp.solver_mode = caffe_pb2.SolverParameter.CPU
    if seed is not None:
        sp.random_seed = seed
    return sp


# ---------------------------------------------------------------------------------------------
# the shipped files

#: file (relative to the repository root) -> builder of its message
SHIPPED = {
    "prototxt/alexnet_deploy.prototxt": lambda: alexnet_deploy(),
    "prototxt/dental_cae_train_val.prototxt": lambda: cae_train_val(),
    "prototxt/dental_cae_deploy.prototxt": lambda: cae_deploy(),
    "prototxt/dental_landmarks_train_val.prototxt": lambda: landmark_train_val(),
    "prototxt/dental_landmarks_fc6_frozen_train_val.prototxt": lambda: landmark_train_val(fc6_frozen=True),
    "prototxt/dental_landmarks_deploy.prototxt": lambda: landmark_deploy(),
    "solvers/cae_solver.prototxt": lambda: solver(
        "prototxt/dental_cae_train_val.prototxt",
        f"{DEFAULT_DATA_DIR}/snapshots/cae",
        base_lr=0.01,
        max_iter=4000,
        stepsize=3000,
        test_iter=2,
        test_interval=200,
        snapshot=1000,
    ),
    "solvers/landmark_solver.prototxt": lambda: solver(
        "prototxt/dental_landmarks_train_val.prototxt",
        f"{DEFAULT_DATA_DIR}/snapshots/landmarks",
        base_lr=0.001,
        max_iter=2000,
        stepsize=1500,
        test_iter=2,
        test_interval=100,
        snapshot=1000,
    ),
    "solvers/landmark_fc6_frozen_solver.prototxt": lambda: solver(
        "prototxt/dental_landmarks_fc6_frozen_train_val.prototxt",
        f"{DEFAULT_DATA_DIR}/snapshots/landmarks_fc6_frozen",
        base_lr=0.001,
        max_iter=2000,
        stepsize=1500,
        test_iter=2,
        test_interval=100,
        snapshot=1000,
    ),
}

_HEADER = "# Generated by `python -m caffe_compat.dental.nets` (caffe_compat/dental/nets.py); see docs/paper.md.\n"


def shipped_messages() -> dict:
    """The shipped files' messages, by path relative to the repository root."""
    return {path: build() for path, build in SHIPPED.items()}


def write_shipped(root: str) -> list[str]:
    """(Re)write the shipped prototxt and solver files under ``root``; returns their paths."""
    out = []
    for rel, msg in shipped_messages().items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(_HEADER + text_format.MessageToString(msg))
        out.append(path)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Rewrite the dental reproduction's prototxt/ and solvers/ files.")
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    args = ap.parse_args(argv)
    for p in write_shipped(args.root):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
