"""Fuzzing Caffe's file formats (issue 23 item 10): a valid ``.caffemodel``, ``.solverstate``
(binary and HDF5), ``.caffemodel.h5``, net and solver prototxt are mutated by a seeded loop
(bit flips, byte overwrites, truncations, insertions, deletions, duplicated spans; for text,
inserted tokens and extreme field values), each mutant is written to disk and loaded. Every
outcome must be a load or a ``CaffeError`` subclass: never another exception type."""

from __future__ import annotations

import logging
import random
import re
import traceback
from pathlib import Path

import h5py
import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat import io as cio
from caffe_compat.errors import CaffeError
from caffe_compat.solvers import state

SRC = Path(__file__).parent / "fixtures" / "caffe_reference" / "solvers" / "sgd_step"
DATA_LAYER = (
    'layer { name: "data" type: "HDF5Data" top: "data" top: "label" hdf5_data_param { source: "h5list.txt" '
    "batch_size: 4 } }"
)
INPUT_LAYER = (
    'layer { name: "data" type: "Input" top: "data" top: "label" '
    "input_param { shape { dim: 4 dim: 1 dim: 8 dim: 8 } shape { dim: 4 dim: 6 } } }"
)


def _deploy_text() -> str:
    text = (SRC / "train.prototxt").read_text()
    assert DATA_LAYER in text
    return text.replace(DATA_LAYER, INPUT_LAYER)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 8])):
        if not b:
            b = bytearray(rng.randbytes(rng.randrange(1, 8)))
            continue
        i = rng.randrange(len(b))
        op = rng.randrange(7)
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.randrange(256)
        elif op == 2:
            del b[i:]
        elif op == 3:
            b[i:i] = rng.randbytes(rng.randrange(1, 10))
        elif op == 4:
            del b[i : i + rng.randrange(1, 20)]
        elif op == 5:
            j = rng.randrange(len(b))
            b[i:i] = b[j : j + rng.randrange(1, 40)]
        else:  # a huge varint: lengths and counts far past the end
            b[i : i + 5] = b"\xff\xff\xff\xff\x0f"
    return bytes(b)


_TOKENS = [
    "{", "}", ":", '"', "-1", "999999999999", "1e400", "nan", "layer", "top", "bottom", "name", "type",
    "shape { dim: 0 }", "dim: -5", "kernel_size: 0", "num_output: 0", "stride: 0", "pad: 99", "\x00", "é",
    "inner_product_param", "convolution_param", "group: 3", "axis: 7", "axis: -9", 'type: "Reshape"',
    "reshape_param { shape { dim: -1 dim: -1 } }", "dilation: 0", "pool: STOCHASTIC", "global_pooling: true",
    "include { phase: TRAIN }", "loss_weight: 2", 'param { name: "s" }',
]  # fmt: skip
_VALUES = [
    "0", "-1", "-3", "2147483647", "2147483648", "4294967295", "9223372036854775807", "1e38", "-1e38",
    "nan", "inf", "0.5", "100000", "65536",
]  # fmt: skip
_NUMBER = re.compile(r"(?<=: )-?[0-9.e+]+")


def mutate_text(text: str, rng: random.Random) -> str:
    if rng.random() < 0.5:  # extreme values in the right places
        for _ in range(rng.choice([1, 1, 2, 3])):
            m = rng.choice(list(_NUMBER.finditer(text)))
            text = text[: m.start()] + rng.choice(_VALUES) + text[m.end() :]
        return text
    s = list(text)
    for _ in range(rng.choice([1, 1, 2, 3])):
        i = rng.randrange(len(s) + 1)
        op = rng.randrange(4)
        if op == 0:
            s[i:i] = list(f" {rng.choice(_TOKENS)} ")
        elif op == 1:
            del s[i : i + rng.randrange(1, 30)]
        elif op == 2 and s:
            j = rng.randrange(len(s))
            s[i:i] = s[j : j + rng.randrange(1, 60)]
        else:
            s[i:i] = list(str(rng.choice([0, -1, 3, 2**31, 2**40, 7])))
    return "".join(s)


def _outcomes(n: int, seed: int, make, load) -> dict[str, int]:
    """Load ``n`` mutants; count the outcomes; fail on any exception that is not a CaffeError."""
    rng = random.Random(seed)
    counts = {"loaded": 0, "refused": 0}
    for k in range(n):
        path = make(rng)
        try:
            load(path)
        except CaffeError as e:
            assert str(e), f"mutant {k}: empty {type(e).__name__} message"
            counts["refused"] += 1
        except Exception as e:  # noqa: BLE001 (this is what the test looks for)
            where = "".join(traceback.format_exception(e)[-4:])
            pytest.fail(f"mutant {k} (seed {seed}) raised {type(e).__name__}, not a CaffeError:\n{where}")
        else:
            counts["loaded"] += 1
    return counts


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)


def _writer(tmp_path: Path, name: str, original: bytes, mutate=mutate_bytes):
    path = tmp_path / name

    def make(rng: random.Random) -> Path:
        path.write_bytes(mutate(original, rng))
        return path

    return make


def _both_outcomes(counts: dict[str, int]) -> None:
    # the mutations must exercise both paths, or the test checks nothing
    assert counts["loaded"] > 0 and counts["refused"] > 0, counts


def test_fuzz_caffemodel_loads_or_caffe_error(tmp_path):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(_deploy_text())
    net = caffe.Net(str(deploy), caffe.TEST)
    make = _writer(tmp_path, "w.caffemodel", (SRC / "final.caffemodel").read_bytes())
    _both_outcomes(_outcomes(150, 11, make, net.copy_from))


def test_fuzz_solverstate_loads_or_caffe_error(tmp_path):
    make = _writer(tmp_path, "s.solverstate", (SRC / "final.solverstate").read_bytes())
    _both_outcomes(_outcomes(200, 12, make, state.read_state))


def test_fuzz_hdf5_solverstate_and_weights(tmp_path):
    ref = tmp_path / "ref.solverstate.h5"
    history = [np.ones((3, 4), np.float32), np.arange(5, dtype=np.float32)]
    state.write_state(state.SolverStateData(iter=7, learned_net="w.caffemodel", history=history), ref, hdf5=True)
    make = _writer(tmp_path, "s.solverstate.h5", ref.read_bytes())
    _both_outcomes(_outcomes(150, 13, make, state.read_state))
    ref = tmp_path / "ref.caffemodel.h5"
    with h5py.File(ref, "w") as f:
        ip = f.create_group("data").create_group("ip")
        ip["0"], ip["1"] = np.ones((6, 16), np.float32), np.arange(6, dtype=np.float32)
        f["data"].create_group("relu")
    make = _writer(tmp_path, "w.caffemodel.h5", ref.read_bytes())
    _both_outcomes(_outcomes(150, 14, make, lambda p: cio.read_caffemodel_h5(p, layers={"ip": (2, ())})))


def test_fuzz_net_prototxt_builds_and_runs_or_caffe_error(tmp_path):
    def build_and_run(path: Path) -> None:
        net = caffe.Net(str(path), caffe.TEST)
        net.forward()
        net.backward()

    text = _deploy_text().encode()
    make = _writer(tmp_path, "n.prototxt", text, lambda t, rng: mutate_text(t.decode(), rng).encode())
    _both_outcomes(_outcomes(60, 15, make, build_and_run))
    make = _writer(tmp_path, "b.prototxt", text)  # raw byte damage: not UTF-8, cut tokens
    _both_outcomes(_outcomes(150, 16, make, cio.read_net))


def test_fuzz_solver_prototxt_or_caffe_error(tmp_path):
    text = (SRC / "solver.prototxt").read_bytes()
    make = _writer(tmp_path, "solver.prototxt", text, lambda t, rng: mutate_text(t.decode(), rng).encode())
    _both_outcomes(_outcomes(150, 17, make, cio.read_solver))
