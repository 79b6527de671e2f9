"""Packaging and first contact: what is installed, what a missing extra says, the tools' entry
points, ``--version``, Ctrl-C and the README's links (issue 24)."""

from __future__ import annotations

import configparser
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import caffe_compat
from caffe_compat.cli import surgery, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # subprocesses import this checkout's caffe_compat


def run_python(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300
    )


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.strip()]


# -- what the distribution installs ----------------------------------------------------------


@pytest.mark.slow
def test_installed_distribution_has_no_top_level_tools(tmp_path):
    """Install the checkout (no dependencies) into a folder; importlib.metadata of that install
    lists its files: caffe_compat and its dist-info only, console scripts into caffe_compat.cli."""
    target = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + ["--target", str(target), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PIP_NO_CACHE_DIR": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (dist,) = [d for d in importlib.metadata.distributions(path=[str(target)]) if d.metadata["Name"] == "caffe-compat"]
    tops = {f.parts[0] for f in dist.files}
    assert "tools" not in tops, sorted(tops)
    # the console scripts are recorded outside the site folder (../../bin/caffe...)
    assert {t for t in tops if not t.endswith(".dist-info") and t not in ("..", "bin")} == {"caffe_compat"}, sorted(
        tops
    )
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert (
        scripts["caffe"] == "caffe_compat.cli.caffe_cli:main"
        and scripts["caffe-train"] == "caffe_compat.cli.train:main"
    )
    assert all(v.startswith("caffe_compat.cli.") for v in scripts.values()), scripts
    assert dist.version == caffe_compat.__version__
    requires = dist.requires or []
    assert any(re.fullmatch(r"torch<3,>=2\.\d+|torch>=2\.\d+,<3", q.replace(" ", "")) for q in requires), requires
    assert not any(q.startswith("matplotlib") and "extra" not in q for q in requires), requires  # [paper] only


def test_setup_cfg_declares_ranges_and_extras_and_constraints_pin_them():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    base = [q.strip() for q in cfg["options"]["install_requires"].split("\n") if q.strip()]
    names = {re.split(r"[<>=!~ ]", q)[0] for q in base}
    assert names == {"torch", "protobuf", "numpy", "opencv-python-headless", "h5py", "lmdb", "tqdm"}, names
    assert "torch>=2.3,<3" in base
    extras = cfg["options.extras_require"]
    assert "matplotlib" in extras["paper"] and "onnxruntime" in extras["onnx"] and "plyvel" in extras["leveldb"]
    for need in ("matplotlib", "onnx", "onnxruntime", "plyvel", "pytest", "hypothesis", "grpcio-tools"):
        assert need in extras["test"], need
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and line[0] != "#"
    )
    assert pins["torch"] == "2.13.0"
    assert "-c constraints.txt" in (ROOT / ".ci" / "run").read_text()
    assert "-c constraints.txt" in (ROOT / "README.md").read_text()
    assert "markers" in cfg["tool:pytest"] and "slow:" in cfg["tool:pytest"]["markers"]


# -- a missing extra: one line naming it -----------------------------------------------------

BLOCK = "import sys\nfor m in sys.argv[1].split(','): sys.modules[m] = None\n"


def test_a_net_runs_without_any_extra(tmp_path):
    code = BLOCK + (
        "import numpy as np, caffe_compat as caffe\n"
        "open('n.prototxt', 'w').write('input: \"data\" input_shape { dim: 2 dim: 3 } '\n"
        '    \'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" \'\n'
        "    'inner_product_param { num_output: 2 weight_filler { type: \"constant\" value: 1 } } }')\n"
        "net = caffe.Net('n.prototxt', caffe.TEST)\n"
        "net.blobs['data'].data[...] = np.arange(6).reshape(2, 3)\n"
        "print(net.forward()['ip'].tolist())\n"
    )
    r = run_python(code, tmp_path, "matplotlib,onnx,onnxruntime,plyvel")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[[3.0, 3.0], [12.0, 12.0]]"  # rows of arange(6) summed (weights 1, bias 0)


@pytest.mark.parametrize(
    "blocked, tool, args, extra",
    [
        ("matplotlib", "reproduce_paper", ["--preset", "smoke", "--out", "runs"], "paper"),
        ("matplotlib", "parse_log", ["LOG", "--plot", "c.png"], "paper"),
        ("onnx", "export_onnx", ["--model", "NET", "--out", "m.onnx"], "onnx"),
    ],
)
def test_missing_extra_is_one_line_naming_it(tmp_path, blocked, tool, args, extra):
    log = ROOT / "tests" / "fixtures" / "caffe_reference" / "cli" / "train_test_snapshot" / "caffe_train.log"
    net = ROOT / "tests" / "fixtures" / "caffe_reference" / "zoo" / "bvlc_alexnet" / "deploy.prototxt"
    args = [str(log) if a == "LOG" else str(net) if a == "NET" else a for a in args]
    code = BLOCK + f"from caffe_compat.cli.{tool} import main\nsys.exit(main(sys.argv[2:]))\n"
    r = run_python(code, tmp_path, blocked, *args)
    lines = error_lines(r)
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
    assert f"pip install 'caffe-compat[{extra}]'" in lines[0] and blocked in lines[0]
    assert not list(tmp_path.iterdir())  # nothing written before the error


def test_export_onnx_without_onnxruntime_says_so_first_and_skips_the_check(tmp_path):
    pytest.importorskip("onnx", reason="the [onnx] extra")
    net = tmp_path / "n.prototxt"
    net.write_text(
        'input: "data" input_shape { dim: 1 dim: 4 } '
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 3 } }'
    )
    code = BLOCK + "from caffe_compat.cli.export_onnx import main\nsys.exit(main(sys.argv[2:]))\n"
    r = run_python(code, tmp_path, "onnxruntime", "--model", str(net), "--out", "m.onnx")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout.splitlines()
    assert "onnxruntime is not installed" in out[0] and "caffe-compat[onnx]" in out[0]  # before the export
    assert out[1].startswith("wrote m.onnx:") and "onnx.checker: ok" in out[1]
    assert (tmp_path / "m.onnx").stat().st_size > 0 and not r.stderr.strip()


# -- the tools -------------------------------------------------------------------------------


def test_caffe_train_help_names_caffe_train(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "caffe_cli.py"), "train", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 0 and r.stdout.startswith("usage: caffe train "), r.stdout[:200] + r.stderr[-500:]


def test_wrappers_leave_sys_path_alone_when_imported():
    import importlib.util

    before = list(sys.path)
    for name in ("train", "parse_log", "caffe_cli"):
        spec = importlib.util.spec_from_file_location(f"_wrapper_{name}", ROOT / "tools" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert callable(mod.main)
    assert sys.path == before
    assert not (ROOT / "tools" / "__init__.py").exists()  # no `tools` package, here or installed


def test_parse_args_has_no_side_effects(monkeypatch):
    from caffe_compat.layers import python as pylayer

    monkeypatch.delenv("CAFFE_COMPAT_ALLOW_PYTHON_LAYERS", raising=False)
    monkeypatch.setitem(pylayer._allowed, "value", False)
    args = train.build_parser().parse_args(["--solver", "s.prototxt", "--allow-python-layers"])
    assert args.allow_python_layers
    assert "CAFFE_COMPAT_ALLOW_PYTHON_LAYERS" not in os.environ and not pylayer.python_layers_allowed()


def test_ctrl_c_during_setup_is_one_line_and_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_train", interrupted)
    assert train.main(["--solver", "s.prototxt"]) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("train.py: interrupted"), err


def test_surgery_fc_width_mismatch_names_the_runs_net_file(tmp_path, capsys):
    """Weights of a narrower run (reproduce_paper's <run>/<config>/x.caffemodel) into a 4096-wide
    net: the hint names <run>/nets/*.prototxt with the matching width, not --fc-to-conv."""
    import caffe_compat as caffe

    def net_text(width: int) -> str:
        return (
            'name: "n" layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 6 } } } '
            f'layer {{ name: "fc6" type: "InnerProduct" bottom: "data" top: "fc6" inner_product_param {{ num_output: {width} '
            'weight_filler { type: "gaussian" std: 0.1 } } }'
        )

    run = tmp_path / "run-1"
    (run / "nets").mkdir(parents=True)
    (run / "cfg").mkdir()
    (run / "nets" / "landmarks_deploy.prototxt").write_text(net_text(8))
    (run / "nets" / "cae_deploy.prototxt").write_text(net_text(5))
    caffe.Net(str(run / "nets" / "landmarks_deploy.prototxt"), caffe.TEST).save(str(run / "cfg" / "cfg.caffemodel"))
    wide = tmp_path / "shipped.prototxt"
    wide.write_text(net_text(32))
    args = ["--source", str(run / "cfg" / "cfg.caffemodel"), "--model", str(wide), "--output", str(tmp_path / "o")]
    assert surgery.main(args) == 1
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("surgery.py: error:")]
    assert "has 8 outputs, the net's fc6 32" in err and str(run / "nets" / "landmarks_deploy.prototxt") in err
    assert "cae_deploy" not in err and "--fc-to-conv" not in err


# -- version, changelog, docs ----------------------------------------------------------------


def test_version_everywhere(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "caffe_compat", "--version"], capture_output=True, text=True, cwd=tmp_path, env=ENV
    )
    assert r.returncode == 0 and r.stdout.strip() == f"caffe-compat {caffe_compat.__version__}"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    first = re.search(r"^## \[?([0-9][^\]\s]*)", changelog, re.M)
    assert first and first.group(1) == caffe_compat.__version__


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, page.name
    assert "docs/README.md" not in readme or (ROOT / "docs" / "README.md").exists()
