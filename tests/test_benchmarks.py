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
from bench_resnet50 import SIZE, TorchResNet50, load_caffe_weights, resnet50_param  # noqa: E402


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
    load_caffe_weights(model, net)
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
