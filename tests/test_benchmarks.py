"""The benchmarks compare like with like: benchmarks/bench_resnet50.py's hand-written PyTorch
ResNet-50 has the topology of the Caffe prototxt it is timed against (the same learnable blobs,
and the same outputs once it holds the Caffe net's weights). Correctness only, batch 1; no timing.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caffe_compat.export.onnx import randomize_params
from caffe_compat.net import TEST, TRAIN, Net

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from bench_resnet50 import SIZE, TorchResNet50, resnet50_param  # noqa: E402


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
    assert dst.shape == src.shape, (dst.shape, src.shape)
    dst.copy_(src)


def _load_caffe_weights(model: TorchResNet50, net: Net) -> None:
    """Give the hand-written model the Caffe net's weights: conv (+ conv1's bias), BatchNorm's
    statistics (blob / scale factor) with the Scale's gamma and beta, fc1000."""
    convs, bns, scales = (_caffe_layers(net, k) for k in ("Convolution", "BatchNorm", "Scale"))
    pairs = _torch_conv_bn(model)
    assert len(pairs) == len(convs) == len(bns) == len(scales) == 53
    with torch.no_grad():
        for (conv, bn), c, n, s in zip(pairs, convs, bns, scales):
            _copy(conv.weight, c.blobs[0])
            assert (conv.bias is not None) == (len(c.blobs) == 2), c.name
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


def _net(train: bool) -> Net:
    net = Net(resnet50_param(1, train=train), phase=TRAIN if train else TEST)
    randomize_params(net, seed=0)
    return net


@pytest.fixture(scope="module")
def train_net() -> Net:
    return _net(train=True)


def test_resnet50_baseline_has_the_prototxts_learnable_blobs(train_net):
    ours = sorted(
        tuple(blob.shape)
        for layer in train_net.modules_by_name.values()
        if layer.type != "BatchNorm"  # its blobs are statistics: the baseline's buffers
        for blob in layer.blobs
    )
    params = list(TorchResNet50().parameters())
    assert ours == sorted(tuple(p.shape) for p in params)
    assert sum(int(np.prod(s)) for s in ours) == sum(p.numel() for p in params)


@pytest.mark.parametrize("train", [False, True], ids=["test", "train"])
def test_resnet50_baseline_computes_what_the_prototxt_does(train, request):
    """Same weights, same input: the deploy net's ``prob`` equals the eval model's softmax; the
    TRAIN net (BatchNorm on batch statistics) gives the train model's logits and loss."""
    net = request.getfixturevalue("train_net") if train else _net(train=False)
    model = TorchResNet50()
    _load_caffe_weights(model, net)
    model.train(train)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    net.blobs["data"].data[...] = x.numpy()
    if train:
        y = torch.tensor([7])
        net.blobs["label"].data[...] = y.numpy()
    with torch.no_grad():
        out = net.forward()
        logits = model(x)
    if train:
        np.testing.assert_allclose(net.blobs["fc1000"].data, logits.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(float(out["loss"]), F.cross_entropy(logits, y).item(), rtol=1e-5)
    else:
        assert out["prob"].shape == (1, 1000)
        np.testing.assert_allclose(out["prob"], torch.softmax(logits, 1).numpy(), rtol=1e-4, atol=1e-7)
