"""The layer types added in session 7 (RNN, LSTM, LSTMUnit, SPP, Im2col, Filter, BatchReindex) and
the truncating Convolution size on a CUDA device: the same net in GPU mode gives the CPU's tops,
bottom diffs and parameter diffs (the fixtures' tolerance, rtol 1e-4 atol 1e-5). Skipped without
CUDA; benchmarks/gpu_check.sh runs this file on the GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import caffe_compat as caffe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

RTOL, ATOL = 1e-4, 1e-5

NETS = {
    "lstm": (
        "layer { name: 'x' type: 'Input' top: 'x' top: 'cont' input_param { shape { dim: 4 dim: 2 dim: 3 } "
        "shape { dim: 4 dim: 2 } } }\n"
        "layer { name: 'lstm' type: 'LSTM' bottom: 'x' bottom: 'cont' top: 'h' recurrent_param { num_output: 5 "
        "weight_filler { type: 'uniform' min: -0.5 max: 0.5 } bias_filler { type: 'constant' value: 0.1 } } }\n"
        "layer { name: 'loss' type: 'Reduction' bottom: 'h' top: 'loss' loss_weight: 1 }",
        {"cont": np.array([[0, 0], [1, 1], [1, 0], [1, 1]], np.float32)},
    ),
    "rnn": (
        "layer { name: 'x' type: 'Input' top: 'x' top: 'cont' input_param { shape { dim: 3 dim: 2 dim: 4 } "
        "shape { dim: 3 dim: 2 } } }\n"
        "layer { name: 'rnn' type: 'RNN' bottom: 'x' bottom: 'cont' top: 'o' recurrent_param { num_output: 3 "
        "weight_filler { type: 'gaussian' std: 0.5 } } }\n"
        "layer { name: 'loss' type: 'Reduction' bottom: 'o' top: 'loss' loss_weight: 1 }",
        {"cont": np.array([[0, 0], [1, 1], [0, 1]], np.float32)},
    ),
    "spp_im2col": (
        "layer { name: 'x' type: 'Input' top: 'x' input_param { shape { dim: 2 dim: 3 dim: 7 dim: 9 } } }\n"
        "layer { name: 'spp' type: 'SPP' bottom: 'x' top: 'spp' spp_param { pyramid_height: 3 } }\n"
        "layer { name: 'spp_ave' type: 'SPP' bottom: 'x' top: 'spp_ave' spp_param { pyramid_height: 2 pool: AVE } }\n"
        "layer { name: 'col' type: 'Im2col' bottom: 'x' top: 'col' convolution_param { kernel_size: 3 stride: 2 "
        "pad: 1 } }\n"
        "layer { name: 'l1' type: 'Reduction' bottom: 'spp' top: 'l1' loss_weight: 1 reduction_param { operation: SUMSQ } }\n"
        "layer { name: 'l2' type: 'Reduction' bottom: 'spp_ave' top: 'l2' loss_weight: 1 }\n"
        "layer { name: 'l3' type: 'Reduction' bottom: 'col' top: 'l3' loss_weight: 1 reduction_param { operation: SUMSQ } }",
        {},
    ),
    "filter_reindex_conv_overhang": (
        "layer { name: 'x' type: 'Input' top: 'x' top: 'sel' top: 'perm' input_param { shape { dim: 4 dim: 3 dim: 3 "
        "dim: 8 } shape { dim: 4 } shape { dim: 5 } } }\n"
        "layer { name: 'conv' type: 'Convolution' bottom: 'x' top: 'conv' convolution_param { num_output: 2 "
        "kernel_size: 5 stride: 4 weight_filler { type: 'gaussian' std: 0.3 } } }\n"
        "layer { name: 'f' type: 'Filter' bottom: 'conv' bottom: 'sel' top: 'f' }\n"
        "layer { name: 'r' type: 'BatchReindex' bottom: 'conv' bottom: 'perm' top: 'r' }\n"
        "layer { name: 'l1' type: 'Reduction' bottom: 'f' top: 'l1' loss_weight: 1 reduction_param { operation: SUMSQ } }\n"
        "layer { name: 'l2' type: 'Reduction' bottom: 'r' top: 'l2' loss_weight: 1 reduction_param { operation: SUMSQ } }",
        {"sel": np.array([1, 0, 1, 1], np.float32), "perm": np.array([3, 0, 0, 2, 1], np.float32)},
    ),
}


def _run(tmp_path, name: str, gpu: bool) -> dict[str, np.ndarray]:
    text, fixed = NETS[name]
    p = tmp_path / f"{name}.prototxt"
    p.write_text(f"name: '{name}'\nforce_backward: true\n" + text)
    caffe.set_mode_gpu() if gpu else caffe.set_mode_cpu()
    try:
        caffe.set_random_seed(11)
        net = caffe.Net(str(p), caffe.TRAIN)
        rng = np.random.default_rng(4)
        for b in net.inputs:
            shape = net.blobs[b].data.shape
            net.blobs[b].data[...] = fixed.get(b, rng.normal(size=shape).astype(np.float32))
        net.forward()
        net.backward()
        out = {f"data {b}": np.array(blob.data) for b, blob in net.blobs.items()}
        out.update({f"diff {b}": np.array(blob.diff) for b, blob in net.blobs.items() if b in fixed or b == "x"})
        for lname, ps in net.params.items():
            for k, pb in enumerate(ps):
                out[f"pdiff {lname} {k}"] = np.array(pb.diff)
        out["on_cuda"] = np.array(net.learnable_params[0].device.type == "cuda") if net.learnable_params else None
        return out
    finally:
        caffe.set_mode_cpu()


@pytest.mark.parametrize("name", sorted(NETS))
def test_gpu_mode_matches_cpu(tmp_path, name):
    cpu, gpu = _run(tmp_path, name, False), _run(tmp_path, name, True)
    assert set(cpu) == set(gpu)
    if gpu["on_cuda"] is not None:
        assert bool(gpu["on_cuda"])
    for key, ref in cpu.items():
        if key == "on_cuda":
            continue
        np.testing.assert_allclose(gpu[key], ref, rtol=RTOL, atol=ATOL, err_msg=f"{name}: {key}")
