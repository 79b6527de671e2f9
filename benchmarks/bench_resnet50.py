"""ResNet-50 training speed: caffe_compat's Net against a hand-written PyTorch ResNet-50, side by side.

    python benchmarks/bench_resnet50.py [--batches 10,32] [--reps 3] [--iters 3] [--warmup 1]
                                        [--device cpu|cuda] [--threads N] [--channels_last]
                                        [--measure fwd,fwd_bwd,iter]

Both models have the topology of He et al.'s Caffe ResNet-50
(``tests/fixtures/caffe_reference/realworld/resnet50/deploy.prototxt``: a biased 7x7 stem conv,
ceil-mode 3x3 max pooling, bottleneck blocks with the stride on the first 1x1 conv, projection
shortcuts in each stage's first block, BatchNorm + Scale after every conv, a 7x7 average pool
and fc1000). Ours is that prototxt: the TEST net as it is (global statistics, the final Softmax
``prob``), and a TRAIN net with ``data`` (batch, 3, 224, 224) and ``label`` (batch,) inputs,
every BatchNorm's ``use_global_stats`` cleared (batch statistics, as Caffe's training prototxts
have it) and a SoftmaxWithLoss on ``fc1000`` instead of the Softmax; both get the same seeded
random weights (``caffe_compat.export.onnx.randomize_params``, seed 0), which the baseline
starts from too (``load_caffe_weights``: the same activations on both sides). The baseline is
idiomatic PyTorch (``TorchResNet50``: ``nn.Conv2d``, ``nn.BatchNorm2d`` for BatchNorm + Scale,
``nn.ReLU(inplace=True)``, ``nn.MaxPool2d(ceil_mode=True)``, ``nn.AvgPool2d``, ``nn.Linear``)
under ``F.cross_entropy`` and ``torch.optim.SGD`` (``bench_alexnet.Baseline``).

Both sides are timed in one process, alternating, on the same input; the figure is the median
over ``--reps`` alternating rounds of the mean over ``--iters`` calls (after ``--warmup`` calls).
Three measurements per batch size (``--measure``):

- ``fwd``: inference forward under ``torch.no_grad`` (ours: the TEST net's ``net.forward()``;
  the baseline: ``softmax(model.eval()(x))``, the deploy net's Softmax included on both sides);
- ``fwd+bwd``: TRAIN-phase forward with the loss, then the backward into the parameters (ours:
  ``net.forward_backward()`` after ``clear_param_diffs()``; the baseline: ``zero_grad``,
  forward, ``cross_entropy``, ``loss.backward()``);
- ``iter``: one full solver iteration (ours: ``solver.step(1)`` of Caffe's SGD, lr 0.01 fixed,
  momentum 0.9, weight decay 5e-4; the baseline: ``zero_grad``, forward, backward,
  ``torch.optim.SGD(lr=0.01, momentum=0.9, weight_decay=5e-4).step()``).

Ratios are ours / baseline (below 1: we are faster). ``--channels_last`` puts both sides in
channels_last. On the CPU ``caffe_compat.mode.tune_cpu`` sets the threads (``--threads``, else one
per physical core) and malloc caching, process-wide, so for both sides (as bench_alexnet). Each
batch also prints both sides' training loss on their input before and after the timings (an
untimed forward): finite and of similar size, i.e. both sides train a sane network.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_alexnet import NUM_CLASSES, Baseline, _time, print_machine, sgd_solver  # noqa: E402

from caffe_compat import io as cio  # noqa: E402
from caffe_compat import mode as cmode  # noqa: E402
from caffe_compat.export.onnx import randomize_params  # noqa: E402
from caffe_compat.net import TEST, TRAIN, Net  # noqa: E402
from caffe_compat.proto import caffe_pb2  # noqa: E402

__all__ = ["main", "resnet50_param", "TorchResNet50"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "tests", "fixtures", "caffe_reference", "realworld", "resnet50", "deploy.prototxt")
SIZE = 224  # pool5's 7x7 average pool needs 224x224 inputs


# ---------------------------------------------------------------------------------------------
# the two models


def resnet50_param(batch: int, train: bool) -> caffe_pb2.NetParameter:
    """The ResNet-50 deploy prototxt with input batch ``batch``; for training, a ``label`` Input,
    BatchNorm on batch statistics, and SoftmaxWithLoss instead of the final Softmax."""
    p = cio.read_net(DEPLOY)  # the legacy input/input_dim fields become an Input layer
    data = p.layer[0]
    assert data.type == "Input" and list(data.top) == ["data"], data
    data.input_param.shape[0].dim[0] = batch
    if train:
        label = caffe_pb2.LayerParameter(name="label", type="Input", top=["label"])
        label.input_param.shape.add().dim.extend([batch])
        p.layer.insert(1, label)
        for layer in p.layer:
            if layer.type == "BatchNorm":  # unset: TRAIN uses the batch's statistics
                layer.batch_norm_param.ClearField("use_global_stats")
        assert p.layer[-1].type == "Softmax", p.layer[-1].type
        del p.layer[-1]
        p.layer.add(name="loss", type="SoftmaxWithLoss", bottom=["fc1000", "label"], top=["loss"])
    return p


class Bottleneck(nn.Module):
    """1x1 (stride) -> 3x3 -> 1x1 (4x ``width``) convs without bias, each with BatchNorm, ReLU
    after the first two; the sum with the shortcut (identity, or ``project``: a strided 1x1 conv
    and BatchNorm) then ReLU. The stride sits on the first 1x1 conv as in the Caffe model
    (torchvision's ResNet-50 "v1.5" puts it on the 3x3)."""

    def __init__(self, cin: int, width: int, stride: int, project: bool):
        super().__init__()
        cout = 4 * width
        self.branch2 = nn.Sequential(
            nn.Conv2d(cin, width, 1, stride=stride, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.branch1 = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)) if project else None
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.branch1 is None else self.branch1(x)
        out = self.branch2(x)
        out += shortcut
        return self.relu(out)


#: (bottleneck width, blocks, stride of the first block) of stages res2..res5
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))


class TorchResNet50(nn.Module):
    """The Caffe ResNet-50 written the way a PyTorch user would write it (torchvision's init)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, 64, 7, stride=2, padding=3),  # conv1 has a bias in the prototxt
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
        ]
        cin = 64
        for width, blocks, stride in STAGES:
            for i in range(blocks):
                layers.append(Bottleneck(cin, width, stride if i == 0 else 1, project=i == 0))
                cin = 4 * width
        layers.append(nn.AvgPool2d(7, stride=1))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def _caffe_layers(net: Net, kind: str) -> list:
    return [layer for layer in net.modules_by_name.values() if layer.type == kind]


def _torch_conv_bn(model: TorchResNet50) -> list[tuple[torch.nn.Conv2d, torch.nn.BatchNorm2d]]:
    """The (conv, BatchNorm) pairs in the prototxt's order (a block's projection shortcut first)."""
    f = model.features
    pairs = [(f[0], f[1])]
    for block in f[4:-1]:
        if block.branch1 is not None:
            pairs.append((block.branch1[0], block.branch1[1]))
        b = block.branch2
        pairs += [(b[0], b[1]), (b[3], b[4]), (b[6], b[7])]
    return pairs


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
    dst.copy_(src)


def load_caffe_weights(model: TorchResNet50, net: Net) -> None:
    """Give the hand-written model the Caffe net's weights: conv (+ conv1's bias), BatchNorm's
    statistics (blob / scale factor) with the Scale's gamma and beta, fc1000."""
    convs, bns, scales = (_caffe_layers(net, k) for k in ("Convolution", "BatchNorm", "Scale"))
    pairs = _torch_conv_bn(model)
    if not len(pairs) == len(convs) == len(bns) == len(scales) == 53:
        raise ValueError("the net is not the 53-convolution ResNet-50 of the prototxt")
    with torch.no_grad():
        for (conv, bn), c, n, s in zip(pairs, convs, bns, scales):
            _copy(conv.weight, c.blobs[0])
            if (conv.bias is not None) != (len(c.blobs) == 2):
                raise ValueError(f"{c.name}: bias term differs")
            if conv.bias is not None:
                _copy(conv.bias, c.blobs[1])
            factor = float(n.blobs[2])
            _copy(bn.running_mean, n.blobs[0] / factor)
            _copy(bn.running_var, n.blobs[1] / factor)
            _copy(bn.weight, s.blobs[0])
            _copy(bn.bias, s.blobs[1])
        (fc,) = _caffe_layers(net, "InnerProduct")
        _copy(model.fc.weight, fc.blobs[0])
        _copy(model.fc.bias, fc.blobs[1])


# ---------------------------------------------------------------------------------------------
# the measured callables


class Ours:
    """Our side: the TEST net for inference, the TRAIN net under Caffe's SGD solver for training,
    both with seeded random weights; the inputs are written once (a data layer would write them
    each iteration on both sides)."""

    def __init__(self, batch: int, device: torch.device, x: torch.Tensor, y: torch.Tensor, channels_last: bool):
        self.test_net = Net(resnet50_param(batch, False), phase=TEST)
        self.train_net = Net(resnet50_param(batch, True), phase=TRAIN)
        for net in (self.test_net, self.train_net):
            randomize_params(net, seed=0)
            if device.type != "cpu":
                net.to(device)
            if channels_last:
                net.to(memory_format=torch.channels_last)
        self.solver = sgd_solver(self.train_net, device)
        self.test_net.blobs["data"].data[...] = x.numpy()
        self.train_net.blobs["data"].data[...] = x.numpy()
        self.train_net.blobs["label"].data[...] = y.numpy()

    def fwd(self) -> None:
        with torch.no_grad():
            self.test_net.forward()

    def fwd_bwd(self) -> None:
        self.train_net.clear_param_diffs()
        self.train_net.forward_backward()

    def iter(self) -> None:
        self.solver.step(1)

    def loss(self) -> float:
        """The TRAIN net's loss on its input (a forward without gradients, untimed)."""
        with torch.no_grad():
            return float(self.train_net.forward()["loss"])


def _baseline_loss(base: Baseline) -> float:
    base.model.train()
    with torch.no_grad():
        return F.cross_entropy(base.model(base.x), base.y).item()


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="10,32")
    p.add_argument("--reps", type=int, default=3, help="alternating rounds (the median is printed)")
    p.add_argument("--iters", type=int, default=3, help="timed calls per round (their mean)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before each round")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per physical core on the CPU)")
    p.add_argument("--channels_last", action="store_true", help="both sides in channels_last")
    p.add_argument("--measure", default="fwd,fwd_bwd,iter", help="a comma-separated subset of fwd,fwd_bwd,iter")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    whats = args.measure.split(",")
    unknown = set(whats) - {"fwd", "fwd_bwd", "iter"}
    if unknown:
        p.error(f"--measure: unknown {sorted(unknown)}; choose from fwd, fwd_bwd, iter")
    tuned = {"cache_allocations": False}
    device = torch.device(args.device)
    if device.type == "cuda":
        cmode.set_mode_gpu()
        cmode.set_device(device.index or 0)
        if args.threads:
            torch.set_num_threads(args.threads)
    else:
        tuned = cmode.tune_cpu(args.threads or None)
    print_machine(device, tuned)
    print(
        f"# ResNet-50 {SIZE}x{SIZE}, float32, channels_last {args.channels_last} (both sides); median of "
        f"{args.reps} alternating rounds of the mean of {args.iters} calls after {args.warmup} warm-up; "
        "ms per call; ratio = ours / baseline"
    )
    print(
        f"{'batch':>5} {'what':>8} {'ours ms':>9} {'torch ms':>9} {'ratio':>6} {'ours img/s':>10} {'torch img/s':>11}"
    )
    for batch in batches:
        torch.manual_seed(0)
        x = torch.randn(batch, 3, SIZE, SIZE)
        y = torch.randint(0, NUM_CLASSES, (batch,))
        ours = Ours(batch, device, x, y, args.channels_last)
        model = TorchResNet50()
        load_caffe_weights(model, ours.train_net)  # the same weights on both sides
        base = Baseline(device, x, y, args.channels_last, model=model)
        before = ours.loss(), _baseline_loss(base)
        for what in whats:
            t_ours, t_base = [], []
            for _ in range(args.reps):
                t_ours.append(_time(getattr(ours, what), device, args.warmup, args.iters))
                t_base.append(_time(getattr(base, what), device, args.warmup, args.iters))
            mo, mb = statistics.median(t_ours), statistics.median(t_base)
            print(
                f"{batch:>5} {what:>8} {mo:>9.1f} {mb:>9.1f} {mo / mb:>6.3f} "
                f"{batch / mo * 1e3:>10.1f} {batch / mb * 1e3:>11.1f}",
                flush=True,
            )
        after = ours.loss(), _baseline_loss(base)
        finite = all(math.isfinite(v) for v in before + after)
        print(
            f"# batch {batch}: training loss before the timings ours {before[0]:.4f}, torch {before[1]:.4f}; "
            f"after ours {after[0]:.4f}, torch {after[1]:.4f}" + ("" if finite else "  (NOT FINITE)"),
            flush=True,
        )
        del ours, base
    load = os.getloadavg()
    print(f"# load avg at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
