"""tools/reproduce_paper.py end to end on the ``smoke`` preset: every step runs, the outputs have
the expected structure, and Table II's numbers are recomputed from the saved predictions."""

from __future__ import annotations

import csv
import json
import os
import re

import h5py
import numpy as np
import pytest

from caffe_compat.dental import evaluate


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from caffe_compat.cli import reproduce_paper

    out = tmp_path_factory.mktemp("runs")
    assert reproduce_paper.main(["--preset", "smoke", "--out", str(out), "--seed", "0"]) == 0
    runs = sorted(os.listdir(out))
    assert len(runs) == 1 and runs[0].startswith("run-")
    return out, os.path.join(out, runs[0])


def test_outputs_structure(smoke_run):
    _, run = smoke_run
    for name in (
        "table2.md",
        "table2.csv",
        "table2.json",
        "learning_curves.png",
        "cae_learning_curve.png",
        "cae_reconstructions.png",
        "landmarks.png",
        "summary.json",
        "log.txt",
        "cae/cae.caffemodel",
        "nets/cae_solver.prototxt",
        "nets/landmarks_fc6_frozen_train_val.prototxt",
    ):
        assert os.path.isfile(os.path.join(run, name)), name
    for png in ("learning_curves.png", "cae_reconstructions.png", "landmarks.png"):
        with open(os.path.join(run, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for key in evaluate.CONFIGS:
        for name in (f"{key}.caffemodel", "surgery.json", "predictions.csv", "errors_mm.csv"):
            assert os.path.isfile(os.path.join(run, key, name)), (key, name)
    table = json.load(open(os.path.join(run, "table2.json")))
    assert [r["config"] for r in table["rows"]] == [evaluate.MEAN_PREDICTOR[0], *evaluate.CONFIGS]
    for r in table["rows"]:
        assert len(r["mean"]) == 4 and len(r["std"]) == 4
        assert all(np.isfinite(r["mean"])) and all(m >= 0 for m in r["mean"])
    assert any("no ImageNet weights" in n for n in table["notes"])
    md = open(os.path.join(run, "table2.md")).read()
    assert "no ImageNet weights" in md and "| with unsupervised (CAE) fine-tuning, fc6 fine-tuned |" in md
    summary = json.load(open(os.path.join(run, "summary.json")))
    for key, c in summary["curves"].items():
        assert len(c["train"]) == 6 and [v[0] for v in c["val"]] == [0, 3, 6], key
    assert "nocae_fc6_frozen" in summary["final_train_loss"]


def test_surgery_reports(smoke_run):
    _, run = smoke_run
    cae = json.load(open(os.path.join(run, "cae_fc6_frozen", "surgery.json")))
    assert [c["dst"] for c in cae["copied"]] == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6"]
    assert cae["left_at_filler"] == ["fc7", "fc8_landmarks"]
    nocae = json.load(open(os.path.join(run, "nocae_fc6_frozen", "surgery.json")))
    assert nocae["copied"] == [] and "no ImageNet weights" in nocae["skipped"][0]["reason"]


def test_frozen_fc6_stays_and_cae_weights_arrive(smoke_run):
    from caffe_compat.surgery import load_weights

    _, run = smoke_run
    cae = load_weights(os.path.join(run, "cae", "cae.caffemodel"))
    frozen = load_weights(os.path.join(run, "cae_fc6_frozen", "cae_fc6_frozen.caffemodel"))
    tuned = load_weights(os.path.join(run, "cae_fc6_finetuned", "cae_fc6_finetuned.caffemodel"))
    for k in range(2):
        np.testing.assert_allclose(frozen["fc6"][k], cae["fc6"][k], rtol=0, atol=0)
    assert not np.allclose(tuned["fc6"][0], cae["fc6"][0], rtol=0, atol=0)


def test_table_numbers_come_from_the_predictions(smoke_run):
    _, run = smoke_run
    with open(os.path.join(run, "data", "prepared", "halves.csv"), newline="") as f:
        rows = sorted((r for r in csv.DictReader(f) if r["split"] == "landmarks_val"), key=lambda r: int(r["index"]))
    table = {r["config"]: r for r in json.load(open(os.path.join(run, "table2.json")))["rows"]}
    for key in evaluate.CONFIGS:
        pred = np.loadtxt(os.path.join(run, key, "predictions.csv"), delimiter=",", skiprows=1, ndmin=2)
        err = evaluate.landmark_errors_mm(pred, rows)
        np.testing.assert_allclose(table[key]["mean"], err.mean(axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(table[key]["std"], err.std(axis=0), rtol=1e-5, atol=1e-5)
    # the reference row: the mean of the training targets for every held-out half
    with h5py.File(os.path.join(run, "data", "prepared", "landmarks_train.h5"), "r") as f:
        ref = evaluate.mean_predictor(f["landmarks"][()], len(rows))
    err = evaluate.landmark_errors_mm(ref, rows)
    np.testing.assert_allclose(table[evaluate.MEAN_PREDICTOR[0]]["mean"], err.mean(axis=0), rtol=1e-5, atol=1e-5)
    # the annotated positions, written as predictions, give zero error
    np.testing.assert_allclose(evaluate.landmark_errors_mm(_truth(rows), rows), 0, rtol=0, atol=1e-9)


def _truth(rows) -> np.ndarray:
    out = []
    for r in rows:
        w, h, hw = int(r["image_width"]), int(r["image_height"]), int(r["half_width"])
        xy = np.array([[float(r[f"x{k}"]), float(r[f"y{k}"])] for k in range(1, 5)])
        xc = xy[:, 0] + 0.5
        if r["side"] == "right":
            xc = w - xc
        out.append(np.stack([xc / hw, (xy[:, 1] + 0.5) / h], axis=1).reshape(8))
    return np.array(out)


def test_a_second_run_gets_a_new_folder(tmp_path):
    from caffe_compat.dental.pipeline import new_run_dir

    a, b = new_run_dir(str(tmp_path)), new_run_dir(str(tmp_path))
    assert a != b and os.path.isdir(a) and os.path.isdir(b)


def test_cae_fc6_scale_match_touches_only_the_cae_regressors(smoke_run, tmp_path):
    """Scaling the CAE's fc6 to the no-CAE start's RMS changes the CAE rows only: the no-CAE rows stay
    bit-identical (same seeds), and the frozen fc6 is exactly the CAE's times the reported factor."""
    import dataclasses

    from caffe_compat.dental.pipeline import PRESETS, run_reproduction
    from caffe_compat.net import TEST, Net

    base = PRESETS["smoke"]
    other = run_reproduction(str(tmp_path), dataclasses.replace(base, cae_fc6_scale_match=not base.cae_fc6_scale_match))
    _, run = smoke_run
    runs = {base.cae_fc6_scale_match: run, not base.cae_fc6_scale_match: other.run_dir}
    results = {}
    for matched, folder in runs.items():
        with open(os.path.join(folder, "summary.json"), encoding="utf-8") as f:
            results[matched] = json.load(f)["results"]
    for key in ("mean_predictor", "nocae_fc6_frozen", "nocae_fc6_finetuned"):
        assert json.dumps(results[True][key]) == json.dumps(results[False][key]), key
    assert results[True]["cae_fc6_frozen"] != results[False]["cae_fc6_frozen"]
    with open(os.path.join(runs[True], "cae_fc6_frozen", "surgery.txt"), encoding="utf-8") as f:
        factor = float(f.read().split("fc6: weights and bias × ")[1].split()[0])
    with open(os.path.join(runs[True], "nocae_fc6_frozen", "surgery.txt"), encoding="utf-8") as f:
        assert factor > 0 and "fc6: weights" not in f.read()
    deploy = os.path.join(runs[True], "nets", "landmarks_deploy.prototxt")
    cae = Net(deploy, TEST, weights=os.path.join(runs[True], "cae", "cae.caffemodel"))
    frozen = Net(deploy, TEST, weights=os.path.join(runs[True], "cae_fc6_frozen", "cae_fc6_frozen.caffemodel"))
    for i in (0, 1):
        np.testing.assert_allclose(
            frozen.params["fc6"][i].data, cae.params["fc6"][i].data * factor, rtol=1e-5, atol=1e-7
        )


def test_cuda_graph_training_gives_the_same_table(smoke_run, tmp_path, monkeypatch):
    """``--cuda_graph`` (here through the CPU stand-in for CUDA graphs, tests/test_cuda_graph.py):
    the CAE and the four regressors trained from replayed passes give the eager run's Table II to
    the last digit (Dropout's masks included: the stand-in's capture draws none)."""
    from caffe_compat.cli import reproduce_paper
    from caffe_compat.dental.pipeline import run_reproduction
    from tests.test_cuda_graph import stand_in_graphs

    graphed = stand_in_graphs(monkeypatch)
    other = run_reproduction(str(tmp_path), "smoke", seed=0, cuda_graph=True)
    # the CAE and 4 regressors: each solver's train net (one training graph) and its test net
    assert len(graphed) == 10 and all(n._graphed.captures == 1 for n in graphed[0::2])
    _, run = smoke_run
    with open(os.path.join(run, "summary.json"), encoding="utf-8") as f:
        eager = json.load(f)["results"]
    with open(os.path.join(other.run_dir, "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["results"] == eager
    assert reproduce_paper.main(["--preset", "smoke", "--out", str(tmp_path), "--cuda_graph"]) == 1  # no --gpu


def test_cae_stuck_at_the_mean_image_is_flagged(smoke_run, tmp_path, monkeypatch):
    from caffe_compat.cli import reproduce_paper
    from caffe_compat.dental import pipeline

    assert pipeline.cae_did_not_learn(0.0682, 0.0682) and pipeline.cae_did_not_learn(0.0680, 0.0682)
    assert not pipeline.cae_did_not_learn(0.0482, 0.0650)
    _, run = smoke_run
    with open(os.path.join(run, "table2.md"), encoding="utf-8") as f:
        normal = f.read()
    stuck_expected = "CAE did not learn" in normal
    with open(os.path.join(run, "summary.json"), encoding="utf-8") as f:
        notes = json.load(f)["notes"]
    cae = next(n for n in notes if n.startswith("CAE validation loss"))
    val, mean = (float(v) for v in (cae.split()[3], cae.split("image: ")[1].split(";")[0]))
    assert stuck_expected == pipeline.cae_did_not_learn(val, mean)
    # a threshold every CAE fails: the run says so in its table and log
    monkeypatch.setattr(pipeline, "CAE_STUCK_RATIO", 0.0)
    assert reproduce_paper.main(["--preset", "smoke", "--out", str(tmp_path), "--seed", "0"]) == 0
    (other,) = os.listdir(tmp_path)
    with open(os.path.join(tmp_path, other, "table2.md"), encoding="utf-8") as f:
        text = f.read()
    assert "WARNING: the CAE did not learn" in text and "--imagenet-weights" in text


def test_cae_weight_decay_sets_only_the_cae_solver(tmp_path):
    import dataclasses

    from caffe_compat import io as cio
    from caffe_compat.dental.pipeline import PRESETS, run_reproduction

    base = PRESETS["smoke"]
    run = run_reproduction(str(tmp_path), dataclasses.replace(base, cae_weight_decay=0.0)).run_dir
    nets_dir = os.path.join(run, "nets")
    assert cio.read_solver(os.path.join(nets_dir, "cae_solver.prototxt")).weight_decay == 0.0
    for name in ("landmarks_solver.prototxt", "landmarks_fc6_frozen_solver.prototxt"):
        assert cio.read_solver(os.path.join(nets_dir, name)).weight_decay == np.float32(base.weight_decay)


def test_progress_off_a_terminal_is_one_line_per_stage_and_the_log_file_has_every_line(tmp_path):
    """Not a TTY: the expected time, then one line per stage ([k/7] ..., time left), no glog INFO
    lines on the console; the run's log.txt has the solver's glog lines."""
    import io

    from caffe_compat.dental.pipeline import run_reproduction
    from caffe_compat.solvers.log import setup_logging

    console = io.StringIO()
    setup_logging(console)
    try:
        run = run_reproduction(str(tmp_path), "smoke", progress_stream=console).run_dir
    finally:
        setup_logging()
    lines = [line for line in console.getvalue().splitlines() if line.strip()]
    stages = [line for line in lines if re.match(r"\[\d/7\] ", line)]
    assert [s[:5] for s in stages] == [f"[{k}/7]" for k in range(1, 8)], lines
    assert all(re.search(r"elapsed, about .* left \(done ~\d\d:\d\d\)", s) for s in stages)
    assert not [line for line in lines if line.startswith("I")], lines  # INFO stays in the log file
    assert re.fullmatch(r"done in \d+ (s|min \d\d s|h \d\d min)", lines[-1]), lines[-1]
    log_text = open(os.path.join(run, "log.txt"), encoding="utf-8").read()
    assert re.search(r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ \S+:\d+\] Iteration 6", log_text, re.M)
    assert "[2/7] CAE: 6 iterations" in log_text


def test_write_doc_puts_the_runs_table_between_the_markers(smoke_run, tmp_path, capsys):
    from caffe_compat.cli import reproduce_paper
    from caffe_compat.dental.paper_doc import BEGIN, END

    _, run = smoke_run
    page = tmp_path / "paper.md"
    page.write_text(f"# Page\n\nbefore\n\n{BEGIN}\nold table\n{END}\n\nafter\n")
    assert reproduce_paper.main(["--write-doc", str(page), "--from-run", run]) == 0
    text = page.read_text()
    assert text.startswith("# Page\n\nbefore\n\n") and text.endswith(f"{END}\n\nafter\n") and "old table" not in text
    rows = json.load(open(os.path.join(run, "table2.json")))["rows"]
    for r in rows:  # every row, its four means and stds, as table2.json has them
        cells = " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in zip(r["mean"], r["std"]))
        assert f"| {r['label']} | {cells} | {r['mean_over_landmarks']:.4f} |" in text
    assert "preset `smoke`, seed 0" in text and "CPU threads, torch" in text
    page.write_text("no markers\n")
    capsys.readouterr()
    assert reproduce_paper.main(["--write-doc", str(page), "--from-run", run]) == 1
    assert "the Table II markers are missing" in capsys.readouterr().err
