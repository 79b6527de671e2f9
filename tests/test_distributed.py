"""Training on several processes (issue 8, Caffe's multi-GPU semantics) with gloo on the CPU.

- The data layers' ``set_shard(rank, N)``: rank r keeps batches r, r+N, ... of the
  single-process stream, bit for bit (shuffles, crops and mirrors included), and
  ``skip_batches`` skips its own batches.
- 2 gloo processes with ``batch_size`` B train as 1 process with ``iter_size: 2`` (loss rtol 1e-5;
  parameters rtol 1e-4 atol 1e-6, the solver fixtures' tolerances) and, for the ``iter_size``
  fixture, as real Caffe's trajectory; gradient clipping sees the averaged gradient.
- A stop/snapshot request seen by one rank acts on both at the same iteration; snapshots are
  written by rank 0 only.
- ``tools/train.py --cpu-procs 2`` trains, logs and snapshots once, and resumes from its
  snapshot to the same weights.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat import io as cio
from caffe_compat.net import Net
from caffe_compat.proto import caffe_pb2
from caffe_compat.solvers import get_solver, signals
from caffe_compat.solvers.distributed import launch

REPO = Path(__file__).resolve().parent.parent
CAFFE_REF = Path(__file__).parent / "fixtures" / "caffe_reference"
SOLVERS = CAFFE_REF / "solvers"
DATA_LAYERS = CAFFE_REF / "data_layers"
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-7
PARAM_RTOL, PARAM_ATOL = 1e-4, 1e-6
ITERS = 10
TIMEOUT_S = 180
# On a machine with CUDA, CAFFE_COMPAT_TEST_GPU=1 runs the 2-process equivalence in GPU mode too
# (both processes on GPU 0, gloo over CUDA tensors: one GPU cannot host two NCCL ranks).
MODES = ["cpu", "gpu"] if os.environ.get("CAFFE_COMPAT_TEST_GPU") else ["cpu"]

# ---------------------------------------------------------------------------------------------
# sharding in the data layers (one process)


def _net(text: str) -> Net:
    p = caffe_pb2.NetParameter()
    from google.protobuf import text_format

    text_format.Merge(text, p)
    return Net(p, phase=caffe_pb2.TRAIN)


def _batches(net: Net, n: int) -> list[list[np.ndarray]]:
    layer = net.layers[0]
    out = []
    with torch.no_grad():
        for _ in range(n):
            out.append([t.numpy().copy() for t in layer()])
    return out


def _stream(text: str, n: int, shard=None, skip: int = 0, seed: int = 3) -> list[list[np.ndarray]]:
    caffe.set_random_seed(seed)
    net = _net(text)
    if shard is not None:
        net.layers[0].set_shard(*shard)
    if skip:
        net.layers[0].skip_batches(skip)
    try:
        return _batches(net, n)
    finally:
        if hasattr(net.layers[0], "close"):
            net.layers[0].close()


def _assert_sharded(text: str, world: int = 3, n: int = 7) -> None:
    full = _stream(text, world * n + world)
    for r in range(world):
        ours = _stream(text, n, shard=(r, world))
        for k, batch in enumerate(ours):
            for a, b in zip(batch, full[r + k * world]):
                np.testing.assert_allclose(a, b, rtol=0, atol=0, err_msg=f"rank {r} batch {k}")
    # resuming: skipping 2 own batches on rank 1 gives its batches 2, 3, ...
    resumed = _stream(text, 2, shard=(1, world), skip=2)
    for k, batch in enumerate(resumed):
        for a, b in zip(batch, full[1 + (2 + k) * world]):
            np.testing.assert_allclose(a, b, rtol=0, atol=0)


@pytest.fixture
def h5_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    files = []
    for i, rows in enumerate((5, 7, 4)):
        name = f"part{i}.h5"
        with h5py.File(name, "w") as f:
            f["data"] = rng.normal(size=(rows, 2, 3)).astype(np.float32)
            f["label"] = np.arange(100 * i, 100 * i + rows, dtype=np.float32)
        files.append(name)
    Path("list.txt").write_text("\n".join(files) + "\n")
    return "list.txt"


@pytest.mark.parametrize("shuffle", [False, True])
def test_hdf5_shard_is_every_nth_batch(h5_source, shuffle):
    text = (
        'layer { name: "d" type: "HDF5Data" top: "data" top: "label" '
        f'hdf5_data_param {{ source: "{h5_source}" batch_size: 3 shuffle: {str(shuffle).lower()} }} }}'
    )
    _assert_sharded(text)


@pytest.mark.parametrize(
    "case, extra",
    [
        ("imagedata_resize_crop_mean_value", "mirror: true"),  # random crops + mirrors, no read to skip
        ("imagedata_gray_noresize", "mirror: true"),  # mirror draws need no image size
        ("lmdb_raw_mean_file_crop", "mirror: true"),  # raw Datum: size from the record's fields
        ("lmdb_encoded_scale", ""),  # nothing random: records are stepped over
    ],
)
def test_prefetching_layers_shard_bit_identical(case, extra, monkeypatch):
    monkeypatch.chdir(DATA_LAYERS)
    text = (DATA_LAYERS / f"{case}.prototxt").read_text()
    text = text.replace("transform_param {", f"transform_param {{ {extra}", 1)
    if "image_data_param" in text:
        text = text.replace("image_data_param {", "image_data_param { shuffle: true", 1)
    _assert_sharded(text, world=2, n=5)


def test_memory_data_shard_restarts_with_new_arrays():
    text = (
        'layer { name: "d" type: "MemoryData" top: "data" top: "label" '
        "memory_data_param { batch_size: 2 channels: 1 height: 1 width: 2 } }"
    )
    data = np.arange(12, dtype=np.float32).reshape(6, 1, 1, 2)
    labels = np.arange(6, dtype=np.float32)
    net = _net(text)
    layer = net.layers[0]
    layer.set_shard(1, 2)
    layer.set_input_arrays(data, labels)
    got = [layer()[1].numpy().tolist() for _ in range(3)]
    assert got == [[2, 3], [0, 1], [4, 5]]  # batches 1, 3, 5 of a 3-batch cycle: 1, 0, 2
    layer.set_input_arrays(data * 2, labels * 2)
    np.testing.assert_allclose(layer()[1].numpy(), [4, 6], rtol=0, atol=0)


def test_set_shard_validation(h5_source):
    text = f'layer {{ name: "d" type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ source: "{h5_source}" batch_size: 3 }} }}'
    layer = _net(text).layers[0]
    with pytest.raises(Exception, match=r"rank 2 of world_size 2"):
        layer.set_shard(2, 2)
    layer()
    with pytest.raises(Exception, match="before the layer reads its first batch"):
        layer.set_shard(0, 2)


def test_set_shard_after_prefetch_started_is_refused(monkeypatch):
    monkeypatch.chdir(DATA_LAYERS)
    layer = _net((DATA_LAYERS / "lmdb_encoded_scale.prototxt").read_text()).layers[0]
    try:
        layer()
        with pytest.raises(Exception, match="before the layer reads its first batch"):
            layer.set_shard(1, 2)
    finally:
        layer.close()


# ---------------------------------------------------------------------------------------------
# 2 gloo processes against 1 process with iter_size 2


def _prepare_case(root: Path, case: str, iter_size: int, extra: str = "") -> Path:
    d = root / f"{case}_iter{iter_size}"
    d = d.with_name(d.name + f"_{len(list(root.glob(d.name + '*')))}") if d.exists() else d
    shutil.copytree(SOLVERS / case, d)
    text = (d / "solver.prototxt").read_text()
    for key in ["iter_size", *re.findall(r"^(\w+):", extra, flags=re.M)]:  # fields set below
        text = re.sub(rf"^{key}:.*$", "", text, flags=re.M)
    (d / "solver.prototxt").write_text(text + f"\niter_size: {iter_size}\n{extra}\n")
    return d


def _train_in(d: Path, iters: int, rank: int = 0, action=None, snapshot: bool = False):
    """Train ``iters`` iterations in ``d`` (then snapshot there); returns (losses, params, solver)."""
    old = os.getcwd()
    os.chdir(d)
    try:
        caffe.set_random_seed(7)
        solver = get_solver("solver.prototxt")
        solver.net.copy_from("init.caffemodel")
        if action is not None:
            solver.set_action_function(action)
        losses = []
        for _ in range(iters):
            solver.step(1)
            losses.append(float(solver.smoothed_loss))
            if solver.requested_early_exit:
                break
        params = [p.detach().cpu().numpy().copy() for p in solver.net.learnable_params]
        if snapshot:
            solver.last_snapshot = solver.snapshot()
        return np.array(losses), params, solver
    finally:
        os.chdir(old)


def _scripted_action(rank: int):
    """Rank 1 asks for a snapshot after iteration 2 and to stop after iteration 4."""
    calls = {"n": 0}

    def action() -> str:
        calls["n"] += 1
        if rank == 1 and calls["n"] == 2:
            return signals.SNAPSHOT
        if rank == 1 and calls["n"] == 4:
            return signals.STOP
        return signals.NONE

    return action


def _dist_worker(rank: int, world_size: int, dirs: list[str], signal_dir: str, out: str, gpu: bool = False) -> int:
    import logging

    logging.getLogger("caffe_compat").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    if gpu:
        caffe.set_mode_gpu()
    result = {}
    for k, d in enumerate(dirs):
        losses, params, solver = _train_in(Path(d), ITERS, rank)
        result[f"overlapped{k}"] = np.array(solver._sync.overlapped_buckets)
        result[f"loss{k}"] = losses
        for i, p in enumerate(params):
            result[f"p{k}_{i}"] = p
    # a stop/snapshot requested on rank 1 only
    losses, _, solver = _train_in(Path(signal_dir), ITERS, rank, action=_scripted_action(rank), snapshot=True)
    result["signal_iter"] = np.array(solver.iter)
    result["signal_snapshot"] = np.array(solver.last_snapshot is not None)
    result["on_cuda"] = np.array(solver.net.learnable_params[0].device.type == "cuda")
    np.savez(os.path.join(out, f"rank{rank}.npz"), **result)
    return 0


@pytest.fixture
def gpu_mode():
    """Turn GPU mode on for the test's own single-process runs; off again afterwards."""

    def on():
        caffe.set_mode_gpu()

    yield on
    caffe.set_mode_cpu()


@pytest.mark.parametrize("mode", MODES)
def test_two_gloo_processes_equal_iter_size_2(tmp_path, mode, gpu_mode):
    # Caffe clips before Normalize: with iter_size 2 the threshold applies to the *sum* of the two
    # passes, with 2 processes to their *average* (P2PSync averages first); so clip c on 2
    # processes is clip 2c with iter_size 2 — and a clip threshold that bites shows the order.
    # layer_wise_reduce (Caffe's default true) reduces buckets during the last backward pass;
    # false reduces them all after it: the same sums
    cases = [
        ("iter_size", "", ""),
        ("adam", "clip_gradients: 0.5", "clip_gradients: 1.0"),
        ("iter_size", "layer_wise_reduce: false", ""),
    ]
    dist_dirs = [_prepare_case(tmp_path / "dist", c, 1, extra) for c, extra, _ in cases]
    signal_dir = _prepare_case(tmp_path / "signal", "sgd_fixed", 1)
    status = launch(
        _dist_worker,
        2,
        ([str(d) for d in dist_dirs], str(signal_dir), str(tmp_path), mode == "gpu"),
        backend="gloo",
        devices=[0, 0] if mode == "gpu" else None,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
        wall_timeout=TIMEOUT_S,
    )
    assert status == 0
    if mode == "gpu":
        gpu_mode()
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for r in ranks:  # buckets went during the backward pass, except with layer_wise_reduce: false
        assert int(r["overlapped0"]) > 0 and int(r["overlapped1"]) > 0
        assert int(r["overlapped2"]) == 0
    assert [bool(r["on_cuda"]) for r in ranks] == [mode == "gpu"] * 2

    for k, (case, _, single_extra) in enumerate(cases):
        losses, params, solver = _train_in(_prepare_case(tmp_path / "single", case, 2, single_extra), ITERS)
        if case == "iter_size":
            names = [(lname, j) for lname, ps in solver.net.params.items() for j in range(len(ps))]
        for r in range(2):  # both ranks hold the same weights and report the same mean loss
            np.testing.assert_allclose(ranks[r][f"loss{k}"], losses, rtol=LOSS_RTOL, atol=LOSS_ATOL, err_msg=case)
            for i, p in enumerate(params):
                np.testing.assert_allclose(
                    ranks[r][f"p{k}_{i}"], p, rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=f"{case} rank {r} param {i}"
                )
    # the iter_size fixture: real Caffe's weights after 10 iterations of iter_size 2
    ref = np.load(SOLVERS / "iter_size" / "trajectory.npz")
    assert len(names) == len([key for key in ranks[0].files if key.startswith("p0_")])
    for i, (lname, j) in enumerate(names):
        np.testing.assert_allclose(
            ranks[0][f"p0_{i}"], ref[f"iter10__{lname}__{j}"], rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=lname
        )

    # the requests of rank 1 acted on both ranks at the same iterations; rank 0 alone wrote
    assert [int(r["signal_iter"]) for r in ranks] == [4, 4]
    assert [bool(r["signal_snapshot"]) for r in ranks] == [True, False]
    written = sorted(p.name for p in signal_dir.glob("final_iter_*"))
    assert written == [
        "final_iter_2.caffemodel",
        "final_iter_2.solverstate",
        "final_iter_4.caffemodel",
        "final_iter_4.solverstate",
    ]


def _kernel_worker(rank: int, world_size: int, d: str, out: str) -> int:
    """Rank 1 behaves as if torch's fused SGD kernel differed from the operations on its device."""
    import logging

    from caffe_compat.solvers import update_engine

    logging.getLogger("caffe_compat").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    update_engine._FUSED_SGD_MATCHES[("cpu", None, False)] = rank == 0
    _, params, solver = _train_in(Path(d), 3, rank)
    arrays = {f"p{i}": p for i, p in enumerate(params)}
    np.savez(os.path.join(out, f"kernel{rank}.npz"), fused_kernel=np.array(solver.fused_kernel), **arrays)
    return 0


def test_processes_agree_on_the_fused_update_kernel(tmp_path):
    """Where one process cannot use SGD's fused kernel bit-identically, none does: every rank
    updates its weights through the same operations, and they stay equal."""
    d = _prepare_case(tmp_path, "sgd_fixed", 1)
    status = launch(
        _kernel_worker,
        2,
        (str(d), str(tmp_path)),
        backend="gloo",
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
        wall_timeout=TIMEOUT_S,
    )
    assert status == 0
    ranks = [np.load(tmp_path / f"kernel{r}.npz") for r in range(2)]
    assert [bool(r["fused_kernel"]) for r in ranks] == [False, False]
    arrays = [k for k in ranks[0].files if k.startswith("p")]
    assert arrays
    for k in arrays:
        assert np.array_equal(ranks[0][k], ranks[1][k])


# ---------------------------------------------------------------------------------------------
# tools/train.py


def _assert_snapshot_is_caffes_iter10(d: Path):
    """``final_iter_10.caffemodel`` in ``d`` holds real Caffe's weights after 10 iterations of the
    iter_size fixture (its ``trajectory.npz``); returns the model."""
    ref = np.load(d / "trajectory.npz")
    model = cio.read_caffemodel(d / "final_iter_10.caffemodel")
    for layer in model.layer:
        for j, blob in enumerate(layer.blobs):
            np.testing.assert_allclose(
                cio.blob_to_array(blob), ref[f"iter10__{layer.name}__{j}"], rtol=PARAM_RTOL, atol=PARAM_ATOL
            )
    return model


TRAIN_TOOL = [sys.executable, str(REPO / "tools" / "train.py"), "--solver", "solver.prototxt"]
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _run_ok(cmd: list[str], d: Path) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``d`` (one OpenMP thread per process, this checkout importable); it must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_train_tool_cpu_procs_snapshots_once_and_resumes(tmp_path):
    d = _prepare_case(tmp_path, "iter_size", 1, "snapshot: 5\ndisplay: 1")
    proc = _run_ok([*TRAIN_TOOL, "--weights", "init.caffemodel", "--iterations", "10", "--cpu-procs", "2"], d)
    log = proc.stderr
    assert len(re.findall(r"Snapshotting to binary proto file final_iter_5\.caffemodel", log)) == 1
    assert len(re.findall(r"Snapshotting to binary proto file final_iter_10\.caffemodel", log)) == 1
    assert len(re.findall(r"\] Iteration 3, loss = ", log)) == 1  # rank 0 logs, rank 1 does not
    assert sorted(p.name for p in d.glob("final_iter_*")) == [
        "final_iter_10.caffemodel",
        "final_iter_10.solverstate",
        "final_iter_5.caffemodel",
        "final_iter_5.solverstate",
    ]
    assert not list(d.glob("*.tmp*")) and not list(d.glob(".*tmp*"))
    model = _assert_snapshot_is_caffes_iter10(d)

    # resuming on 2 processes (each rank skips its own share of 5 iterations) ends identically
    (d / "final_iter_10.caffemodel").rename(d / "uninterrupted.caffemodel")
    _run_ok([*TRAIN_TOOL, "--snapshot", "final_iter_5.solverstate", "--iterations", "10", "--cpu-procs", "2"], d)
    resumed = cio.read_caffemodel(d / "final_iter_10.caffemodel")
    for la, lb in zip(resumed.layer, model.layer):
        for x, y in zip(la.blobs, lb.blobs):
            np.testing.assert_allclose(cio.blob_to_array(x), cio.blob_to_array(y), rtol=0, atol=0, err_msg=la.name)


def test_train_tool_under_torchrun_matches_caffe_and_snapshots_once(tmp_path):
    """``torchrun --nproc-per-node 2 tools/train.py`` (CPU, gloo): the same weights as real Caffe's
    iter_size-2 run, rank 0 alone logs and snapshots."""
    d = _prepare_case(tmp_path, "iter_size", 1, "snapshot: 10\ndisplay: 1")
    proc = _run_ok([*TORCHRUN_2, *TRAIN_TOOL[1:], "--weights", "init.caffemodel", "--iterations", "10"], d)
    log = proc.stderr + proc.stdout
    assert "Training on 2 processes (this is rank 0)" in log
    assert len(re.findall(r"Snapshotting to binary proto file final_iter_10\.caffemodel", log)) == 1
    assert len(re.findall(r"\] Iteration 3, loss = ", log)) == 1  # rank 0 logs, rank 1 does not
    assert sorted(p.name for p in d.glob("final_iter_*")) == ["final_iter_10.caffemodel", "final_iter_10.solverstate"]
    _assert_snapshot_is_caffes_iter10(d)


_TEARDOWN_SCRIPT = """
import gc, os, sys, weakref
import torch.distributed as dist
import caffe_compat as caffe
from caffe_compat.solvers import distributed

def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sum(name.startswith(("gloo", "pt_gloo")) for name in names)


distributed.init_from_env("gloo")
net = caffe.Net("train.prototxt", caffe.TRAIN)  # runs ops on the meta device: imports torch._dynamo
sync = distributed.DistributedSync(net.learnable_params)
alive = weakref.ref(sync)
del sync
gc.collect()
dist.barrier()
before = gloo_threads()
dist.destroy_process_group()
with open(f"rank{os.environ['RANK']}.txt", "w") as f:
    f.write(f"gloo threads {before} -> {gloo_threads()}, sync alive {alive() is not None}")
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc to list threads")
def test_process_group_teardown_leaves_no_gloo_threads(tmp_path):
    """After ``destroy_process_group`` no gloo thread is left to race the interpreter's exit (they
    did when a Net was built after the group started: torch._dynamo's import held the group, and
    1 exit in ~50 aborted with "terminate called without an active exception"); the gradient
    sync's hooks do not keep it, and with it every parameter, alive."""
    d = _prepare_case(tmp_path, "iter_size", 1)
    (d / "teardown.py").write_text(_TEARDOWN_SCRIPT)
    _run_ok([*TORCHRUN_2, "teardown.py"], d)
    for rank in (0, 1):
        m = re.fullmatch(r"gloo threads (\d+) -> (\d+), sync alive (\w+)", (d / f"rank{rank}.txt").read_text())
        assert m, f"rank {rank}"
        assert int(m[1]) > 0, "no gloo thread found while the group existed: the thread names changed?"
        assert (int(m[2]), m[3]) == (0, "False"), f"rank {rank}: {m[0]}"


def test_train_tool_several_gpus_without_cuda_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from caffe_compat.cli import train

    assert train.main(["--solver", str(SOLVERS / "iter_size" / "solver.prototxt"), "--gpu", "0,1"]) == 1
    err = capsys.readouterr().err
    assert "--gpu 0,1: no CUDA device is available" in err


def test_train_tool_cpu_procs_with_gpu_is_refused(capsys):
    from caffe_compat.cli import train

    assert train.main(["--solver", "x.prototxt", "--cpu-procs", "2", "--gpu", "0"]) == 1
    assert "cannot be combined with --gpu" in capsys.readouterr().err
