"""Issue 23 items 5 and 6 (solver part): every numeric SolverParameter field is checked before
the first iteration, with Caffe's limits and the plain ones Caffe forgot, and the error names the
solver file, the field and the allowed range; the messages about the solver's net name the file
the net came from. Each case writes the bad solver file and runs ``tools/train.py`` on it."""

from __future__ import annotations

import re

import pytest

from caffe_compat.solvers import get_solver
from tools import train

NET = """name: "tiny"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 1 }
    data_filler { type: "gaussian" } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 1 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

BASE = 'net: "net.prototxt" base_lr: 0.01 lr_policy: "fixed" max_iter: 2 snapshot_after_train: false '


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text(NET)
    return tmp_path


def _run(capsys, solver_text: str, name: str = "bad_solver.prototxt") -> tuple[int, str]:
    with open(name, "w") as f:
        f.write(solver_text)
    status = train.main(["--solver", name])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("train.py: error:")]
    return status, lines[0] if lines else err


@pytest.mark.parametrize(
    "text, field, interval",
    [
        ("base_lr: -0.1", "base_lr", "[0, inf)"),
        ("base_lr: nan", "base_lr", "[0, inf)"),
        ("max_iter: -1", "max_iter", "[0, inf)"),
        ("display: -5", "display", "[0, inf)"),
        ("snapshot: -1", "snapshot", "[0, inf)"),
        ("test_interval: -1", "test_interval", "[0, inf)"),
        ("average_loss: 0", "average_loss", "[1, inf)"),
        ("iter_size: 0", "iter_size", "[1, inf)"),
        ("weight_decay: -0.0005", "weight_decay", "[0, inf)"),
        ("clip_gradients: nan", "clip_gradients", "(-inf, inf)"),
        ("momentum: 1.0", "momentum", "[0, 1)"),
        ("momentum: -0.5", "momentum", "[0, 1)"),
        ('type: "Nesterov" momentum: 1.5', "momentum", "[0, 1)"),
        ('type: "Adam" momentum: 1.0', "momentum", "[0, 1)"),
        ('type: "Adam" momentum: 0.9 momentum2: 1.0', "momentum2", "[0, 1)"),
        ('type: "Adam" momentum: 0.9 delta: 0', "delta", "(0, inf)"),
        ('type: "AdaDelta" momentum: 1.0', "momentum", "[0, 1)"),
        ('type: "AdaDelta" momentum: 0.95 delta: -1e-6', "delta", "(0, inf)"),
        ('type: "AdaGrad" delta: 0', "delta", "(0, inf)"),
        ('type: "RMSProp" rms_decay: 1.0', "rms_decay", "[0, 1)"),
        ('type: "RMSProp" rms_decay: 0.9 delta: 0', "delta", "(0, inf)"),
    ],
)
def test_numeric_field_out_of_range(work, capsys, text, field, interval):
    base = re.sub(rf"\b{field}: \S+ ", "", BASE)  # the bad value replaces a valid one
    status, line = _run(capsys, base + text)
    assert status == 1
    assert line.startswith(f"train.py: error: bad_solver.prototxt: {field}: ")
    assert f"it must lie in {interval}" in line
    assert not list(work.glob("*.caffemodel"))


@pytest.mark.parametrize(
    "policy, needle",
    [
        ('lr_policy: "step" gamma: 0.1', "lr_policy 'step' needs a positive 'stepsize' (got stepsize: 0)"),
        ('lr_policy: "step" stepsize: 10', "gamma: 0 is out of range: it must lie in (0, inf)"),
        ('lr_policy: "exp" gamma: -0.9', "gamma: -0.9 is out of range: it must lie in (0, inf)"),
        ('lr_policy: "inv" gamma: 0.1 power: -1', "power: -1 is out of range: it must lie in [0, inf)"),
        ('lr_policy: "poly" power: -2', "power: -2 is out of range: it must lie in [0, inf)"),
        ('lr_policy: "sigmoid" gamma: inf stepsize: 3', "gamma: inf is out of range"),
        (
            'lr_policy: "multistep" gamma: 0.5 stepvalue: 5 stepvalue: 3',
            "stepvalue[1]: 3 is out of range: lr_policy 'multistep' needs stepvalues >= 0 in increasing order",
        ),
        ('lr_policy: "cyclic"', "Unknown learning rate policy lr_policy: 'cyclic'"),
    ],
)
def test_schedule_fields(work, capsys, policy, needle):
    text = BASE.replace('lr_policy: "fixed" ', "") + policy
    status, line = _run(capsys, text)
    assert status == 1
    assert line.startswith("train.py: error: bad_solver.prototxt: ")
    assert needle in line


def test_unknown_solver_type_names_the_file(work, capsys):
    status, line = _run(capsys, BASE + 'type: "LBFGS"')
    assert status == 1
    assert line.startswith("train.py: error: bad_solver.prototxt: Unknown solver type: type: 'LBFGS'")
    assert "AdaDelta, AdaGrad, Adam, Nesterov, RMSProp, SGD" in line


BAD_NET = NET.replace('bottom: "data" top: "ip"', 'bottom: "nosuch" top: "ip"')


def test_net_file_error_names_the_net_file(work, capsys):
    (work / "bad_net.prototxt").write_text(BAD_NET)
    status, line = _run(capsys, BASE.replace("net.prototxt", "bad_net.prototxt"))
    assert status == 1
    assert line == "train.py: error: bad_net.prototxt: Unknown bottom blob 'nosuch' (layer 'ip', bottom index 0)"


@pytest.mark.parametrize("field", ["net_param", "train_net_param"])
def test_inline_net_error_names_the_solver_file_and_field(work, capsys, field):
    text = BASE.replace('net: "net.prototxt" ', "") + f"{field} {{ {BAD_NET} }}"
    status, line = _run(capsys, text)
    assert status == 1
    assert line == (
        f"train.py: error: bad_solver.prototxt ({field}): Unknown bottom blob 'nosuch' (layer 'ip', bottom index 0)"
    )
    assert "<NetParameter>" not in line


def test_test_net_error_names_its_file(work, capsys):
    (work / "bad_net.prototxt").write_text(BAD_NET)
    status, line = _run(capsys, BASE + 'test_net: "bad_net.prototxt" test_iter: 1 test_interval: 1')
    assert status == 1
    assert line.startswith("train.py: error: bad_net.prototxt: Unknown bottom blob 'nosuch'")


def test_solver_net_is_upgraded_once(work, monkeypatch):
    """A V1 net file (``layers``) read through a solver: one upgrade per net built (train and
    test), by Net, where the solver and Net each upgraded it before."""
    from caffe_compat import upgrade

    v1 = """name: "v1"
    layers { name: "data" type: DUMMY_DATA top: "data" top: "label"
      dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 1 } } }
    layers { name: "ip" type: INNER_PRODUCT bottom: "data" top: "ip" inner_product_param { num_output: 1 } }
    layers { name: "loss" type: EUCLIDEAN_LOSS bottom: "ip" bottom: "label" top: "loss" }
    """
    (work / "v1.prototxt").write_text(v1)
    (work / "solver.prototxt").write_text(
        'net: "v1.prototxt" base_lr: 0.01 lr_policy: "fixed" test_iter: 1 test_interval: 5'
    )
    calls = []
    real = upgrade.upgrade_net
    monkeypatch.setattr(upgrade, "upgrade_net", lambda p, source="<net>": calls.append(source) or real(p, source))
    solver = get_solver("solver.prototxt")
    assert len(calls) == 2  # the train net and the test net, once each
    assert [layer.type for layer in solver.net.layers] == ["DummyData", "InnerProduct", "EuclideanLoss"]
    assert solver.net.source == "v1.prototxt" and solver.test_nets[0].source == "v1.prototxt"


def test_valid_solver_still_trains(work, capsys):
    status, err = _run(capsys, BASE + 'type: "Adam" momentum: 0.9 momentum2: 0.999 delta: 1e-8', "ok.prototxt")
    assert status == 0, err
    assert re.search(r"Optimization Done", err)
