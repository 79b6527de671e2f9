"""The reproduction, end to end: data → CAE → surgery → 4 landmark regressors → Table II.

:func:`run_reproduction` drives Caffe's solvers (``caffe_compat.get_solver``) on nets built by
:mod:`caffe_compat.dental.nets` for a :class:`Preset`, and writes one run folder:

- ``data/`` (``raw/`` synthetic radiographs when no data folder is given, ``prepared/`` halves)
- ``nets/`` the prototxts and solvers of this run (the shipped ones, resized for the preset)
- ``cae/`` the CAE's caffemodel, learning curve and reconstructions
- ``<config>/`` for each of the 4 configurations: the regressor's caffemodel, the surgery
  report (what was copied from the CAE / ImageNet, what was left at its filler), predictions
- ``table2.md|csv|json`` (with a reference row: the mean-landmark predictor),
  ``learning_curves.png``, ``cae_learning_curve.png``,
  ``cae_reconstructions.png``, ``landmarks.png``, ``summary.json``, ``log.txt``

Configurations (the paper's Table II): the regressor's conv1-conv5 and fc6 come from the CAE, or
("no CAE") from ImageNet's AlexNet — from Caffe's fillers when no ImageNet weights are given —
and fc6 is either fine-tuned or frozen (lr_mult 0). Every configuration starts from the same
random seed, so fc7 and fc8_landmarks start from identical filler values.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from google.protobuf import text_format

from caffe_compat.dental import evaluate, figures, nets
from caffe_compat.dental.dataset import PreparedData, prepare, read_dataset
from caffe_compat.dental.generator import generate_dataset

__all__ = [
    "CAE_STUCK_RATIO",
    "PRESETS",
    "Preset",
    "RunResult",
    "cae_did_not_learn",
    "new_run_dir",
    "predict_landmarks",
    "run_reproduction",
]

log = logging.getLogger("caffe_compat")

#: The layers the paper moves from the CAE (or ImageNet) into the regressor.
TRANSFERRED = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6")
#: The AlexNet layers the CAE takes from ImageNet.
IMAGENET_TO_CAE = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


@dataclass
class Preset:
    """Scale and training recipe of one run. ``conv``/``fc``/``code`` are the layer widths (AlexNet:
    96-256-384-384-256, 4096, 1000); ``image_size`` (H, W) is the synthetic radiographs' size;
    ``num_images`` of them, the first ``num_annotated`` with landmarks.

    Recipe (Caffe settings; the defaults are the paper's ImageNet fine-tuning setting): ``filler``
    of the AlexNet layers (``"gaussian"`` = bvlc_alexnet's, ``"msra"``, ``"xavier"``),
    ``data_scale`` (the HDF5 data's ``transform_param.scale``) and ``data_mean`` (``"imagenet"``:
    Caffe's per-channel ImageNet mean; ``"train"``: the training halves' mean image), both forced
    to bvlc_alexnet's (1, ImageNet mean) when ImageNet weights are given, ``solver_type`` / ``lr_policy`` / ``momentum``
    / ``weight_decay`` of both solvers (``cae_weight_decay``: the CAE's own, None = the same; step
    policy: ×0.1 after 3/4 of the iterations), the CAE's
    loss (``cae_target_scale``, ``cae_loss_weight``: None = 1/(3·S²)) and decoder widths
    (``decoder_conv``/``decoder_fc``: None = the encoder's; ``decoder_relu_slope``: leaky ReLUs in
    the decoder), the regression head's
    ``head_lr_mult`` and ``head_std``, and ``head_bias_mean``: start fc8_landmarks' bias at the
    mean of the training landmarks (pycaffe-style net surgery) instead of its filler's 0.5.

    CAE variants (docs/paper.md, "Variants tried"; both off by default): ``cae_input_dropout`` > 0
    makes the CAE denoising (a TRAIN-phase Dropout of that ratio on its input, the target stays
    the clean image); ``cae_fc6_scale_match`` multiplies the CAE's fc6 (weights and bias) before
    the CAE regressors by the ratio of fc6's RMS (after relu6, on the first training halves) at the
    no-CAE regressors' start to the CAE's own; the no-CAE configurations are untouched."""

    name: str
    input_size: int
    conv: tuple
    fc: int
    code: int
    num_images: int
    num_annotated: int
    image_size: tuple
    cae_iters: int
    cae_lr: float
    reg_iters: int
    reg_lr: float
    batch: int
    test_interval: int
    max_val_batch: int = 32
    figure_halves: int = 4
    filler: str = "gaussian"
    data_scale: float = 1.0
    data_mean: str = "imagenet"
    solver_type: str = "SGD"
    lr_policy: str = "step"
    momentum: float = 0.9
    weight_decay: float = 0.0005
    cae_target_scale: float = 1.0 / 256.0
    cae_loss_weight: float | None = None
    decoder_conv: tuple | None = None
    decoder_fc: int | None = None
    decoder_relu_slope: float = 0.0
    decoder_out_std: float | None = None
    cae_input_dropout: float = 0.0
    cae_fc6_scale_match: bool = False
    #: the CAE solver's weight_decay (None: ``weight_decay``, as for the regressors)
    cae_weight_decay: float | None = None
    head_lr_mult: float = 10.0
    head_std: float = 0.01
    head_bias_mean: bool = False

    def arch(self) -> nets.Arch:
        return nets.Arch(
            input_size=self.input_size,
            conv=tuple(self.conv),
            fc=self.fc,
            code=self.code,
            filler=self.filler,
            decoder_conv=None if self.decoder_conv is None else tuple(self.decoder_conv),
            decoder_fc=self.decoder_fc,
            cae_loss_weight=self.cae_loss_weight,
            cae_target_scale=self.cae_target_scale,
            decoder_relu_slope=self.decoder_relu_slope,
            decoder_out_std=self.decoder_out_std,
            cae_input_dropout=self.cae_input_dropout,
            head_lr_mult=self.head_lr_mult,
            head_std=self.head_std,
        )


#: The recipe of the from-scratch presets (no ImageNet weights): He (msra) fillers, inputs minus
#: the training halves' mean image scaled to about ±2, Adam, the CAE's target = its input, leaky
#: ReLUs in the decoder, and a regression head that starts at the mean landmarks and learns at the
#: base rate (docs/paper.md explains each choice).
SCRATCH_RECIPE = dict(
    filler="msra",
    data_scale=1.0 / 64.0,
    data_mean="train",
    solver_type="Adam",
    lr_policy="step",
    momentum=0.9,
    weight_decay=0.0005,
    # none for the CAE: under Adam, L2 decay took steps of lr size while the CAE's gradients were
    # still tiny and drove its conv3-5 to their biases on seed 2 (docs/paper.md, "CAE weight decay")
    cae_weight_decay=0.0,
    cae_target_scale=1.0,
    decoder_relu_slope=0.1,
    decoder_out_std=1e-4,
    head_lr_mult=1.0,
    head_std=1e-5,
    head_bias_mean=True,
)

PRESETS = {
    # every step on a tiny scale (a test runs it): seconds on 2 CPU cores
    "smoke": Preset(
        "smoke",
        64,
        (16, 32, 48, 48, 32),
        64,
        32,
        8,
        6,
        (96, 192),
        cae_iters=6,
        cae_lr=1e-4,
        reg_iters=6,
        reg_lr=1e-4,
        batch=4,
        test_interval=3,
        figure_halves=2,
        **SCRATCH_RECIPE,
    ),
    # AlexNet's widths on 128×128 halves; 54 annotated radiographs plus 270 unannotated ones for
    # the CAE: under 20 min on 2 CPU cores
    "quick": Preset(
        "quick",
        128,
        (96, 256, 384, 384, 256),
        1024,
        1000,
        324,
        54,
        (256, 512),
        cae_iters=1000,
        cae_lr=1e-4,
        reg_iters=400,
        reg_lr=1e-4,
        batch=16,
        test_interval=50,
        decoder_conv=(48, 128, 192, 192, 128),
        **SCRATCH_RECIPE,
    ),  # a decoder half as wide
    # the paper's scale and recipe (224×224, AlexNet unchanged, so bvlc_alexnet's fc6 loads too;
    # SGD from ImageNet's weights): for a GPU
    "paper": Preset(
        "paper",
        224,
        (96, 256, 384, 384, 256),
        4096,
        1000,
        108,
        54,
        (320, 640),
        cae_iters=4000,
        cae_lr=0.01,
        reg_iters=2000,
        reg_lr=0.001,
        batch=16,
        test_interval=100,
    ),
}


@dataclass
class RunResult:
    """What :func:`run_reproduction` produced (paths are absolute)."""

    run_dir: str
    results: dict
    tables: dict
    figures: dict
    caffemodels: dict
    notes: list = field(default_factory=list)
    final_train_loss: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------


def new_run_dir(root: str, prefix: str = "run") -> str:
    """A new folder ``root/<prefix>-YYYYmmdd-HHMMSS[-n]``; never an existing one."""
    os.makedirs(root, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10000):
        path = os.path.join(root, f"{prefix}-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            os.makedirs(path)
        except FileExistsError:
            continue
        return os.path.abspath(path)
    raise RuntimeError(f"could not create a new run folder under {root!r}")


def _write_text(msg, path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text_format.MessageToString(msg))
    return path


def _count(prepared: PreparedData, split: str) -> int:
    return sum(1 for r in prepared.halves if r["split"] == split)


def _write_nets(preset: Preset, prepared: PreparedData, net_dir: str, run_dir: str, seed: int) -> dict:
    arch = preset.arch()
    L = prepared.lists
    n_cae_val, n_lm_val = _count(prepared, "cae_val"), _count(prepared, "landmarks_val")
    cae_vb = min(n_cae_val, preset.max_val_batch)
    lm_vb = min(n_lm_val, preset.max_val_batch)
    p = {
        "cae_train_val": _write_text(
            nets.cae_train_val(arch, L["cae_train"], L["cae_val"], preset.batch, cae_vb),
            os.path.join(net_dir, "cae_train_val.prototxt"),
        ),
        "cae_deploy": _write_text(nets.cae_deploy(arch), os.path.join(net_dir, "cae_deploy.prototxt")),
        "landmark_deploy": _write_text(nets.landmark_deploy(arch), os.path.join(net_dir, "landmarks_deploy.prototxt")),
    }
    for frozen in (False, True):
        key = "landmarks_fc6_frozen" if frozen else "landmarks"
        p[key] = _write_text(
            nets.landmark_train_val(arch, L["landmarks_train"], L["landmarks_val"], preset.batch, lm_vb, frozen),
            os.path.join(net_dir, f"{key}_train_val.prototxt"),
        )
    # The pipeline runs the tests itself (for the learning curves): the solver's own never come due.
    recipe = dict(
        type=preset.solver_type,
        lr_policy=preset.lr_policy,
        momentum=preset.momentum,
        weight_decay=preset.weight_decay,
        seed=seed,
        display=preset.test_interval,
    )
    cae_solver = nets.solver(
        p["cae_train_val"],
        os.path.join(run_dir, "cae", "cae"),
        base_lr=preset.cae_lr,
        max_iter=preset.cae_iters,
        stepsize=max(1, int(preset.cae_iters * 0.75)),
        test_iter=math.ceil(n_cae_val / cae_vb),
        test_interval=preset.cae_iters + 1,
        **(recipe if preset.cae_weight_decay is None else {**recipe, "weight_decay": preset.cae_weight_decay}),
    )
    p["cae_solver"] = _write_text(cae_solver, os.path.join(net_dir, "cae_solver.prototxt"))
    for frozen in (False, True):
        key = "landmarks_fc6_frozen" if frozen else "landmarks"
        sp = nets.solver(
            p[key],
            os.path.join(run_dir, key),
            base_lr=preset.reg_lr,
            max_iter=preset.reg_iters,
            stepsize=max(1, int(preset.reg_iters * 0.75)),
            test_iter=math.ceil(n_lm_val / lm_vb),
            test_interval=preset.reg_iters + 1,
            **recipe,
        )
        p[f"{key}_solver"] = _write_text(sp, os.path.join(net_dir, f"{key}_solver.prototxt"))
    return p


def _val_loss(solver) -> float:
    weights = solver.test_nets[0].blob_loss_weights
    total = 0.0
    for name, mean in solver.test(0):
        total += float(weights.get(name, 0.0)) * mean
    return total


def _train(solver, iters: int, interval: int, desc: str) -> dict:
    """Train ``iters`` iterations; the train loss of every iteration, the validation loss every
    ``interval`` iterations (and before the first)."""
    from tqdm.auto import tqdm

    train: list = []
    solver.loss_observers.append(lambda it, loss: train.append((it, loss)))
    val = [(solver.iter, _val_loss(solver))]
    try:
        with tqdm(total=iters, desc=desc, disable=None, leave=False) as bar:
            done = 0
            while done < iters:
                n = min(interval, iters - done)
                solver.step(n)
                done += n
                val.append((solver.iter, _val_loss(solver)))
                bar.update(n)
                bar.set_postfix(train=f"{train[-1][1]:.4g}", val=f"{val[-1][1]:.4g}")
    finally:
        solver.loss_observers.pop()
    log.info(
        "%s: final train loss %.6g, validation loss %.6g", desc, train[-1][1] if train else float("nan"), val[-1][1]
    )
    return {"train": train, "val": val}


def _load_h5(path: str, names: tuple) -> list:
    import h5py

    with h5py.File(path, "r") as f:
        return [np.asarray(f[n], dtype=np.float32) for n in names]


def _forward_batches(net, data: np.ndarray, out: str, batch: int = 16) -> np.ndarray:
    outs = []
    for i in range(0, len(data), batch):
        x = data[i : i + batch]
        net.blobs["data"].reshape(*x.shape)
        net.reshape()
        outs.append(np.array(net.forward(data=x)[out], copy=True))
    return np.concatenate(outs)


def predict_landmarks(deploy: str, weights: str, data: np.ndarray) -> np.ndarray:
    """Run the landmark regressor ``deploy`` with ``weights`` on ``data`` (N, 3, S, S); (N, 8)."""
    from caffe_compat.net import TEST, Net

    return _forward_batches(Net(deploy, TEST, weights=weights), data, "fc8_landmarks")


def _fc6_rms(deploy: str, source, data: np.ndarray) -> float:
    """Root mean square of fc6 (after relu6) of the regressor ``deploy`` on ``data``, its conv1-fc6
    from ``source`` (a caffemodel path or a Net)."""
    from caffe_compat.net import TEST, Net

    if isinstance(source, str):
        net = Net(deploy, TEST, weights=source)
    else:
        net = Net(deploy, TEST)
        for name in TRANSFERRED:
            for dst, src in zip(net.params[name], source.params[name]):
                dst.data[...] = src.data
    total, count = 0.0, 0
    for i in range(0, len(data), 16):
        x = data[i : i + 16]
        net.blobs["data"].reshape(*x.shape)
        net.reshape()
        fc6 = np.asarray(net.forward(blobs=["fc6"], end="relu6", data=x)["fc6"], dtype=np.float64)
        total, count = total + float((fc6**2).sum()), count + fc6.size
    return math.sqrt(total / max(count, 1))


#: A CAE whose validation loss stays above this fraction of the mean image's has learned nothing.
CAE_STUCK_RATIO = 0.99


def cae_did_not_learn(cae_val_loss: float, mean_image_loss: float) -> bool:
    """True when the CAE reconstructs no better than the training halves' mean image would."""
    return cae_val_loss >= CAE_STUCK_RATIO * mean_image_loss


def _mean_image_loss(train: np.ndarray, val: np.ndarray, arch: nets.Arch) -> float:
    """The CAE's validation loss if it reconstructed every half as the training halves' mean."""
    lw = arch.cae_loss_weight_value()
    t = arch.cae_target_scale
    diff = (val.astype(np.float64) - train.astype(np.float64).mean(axis=0)) * t
    return float(lw * 0.5 * (diff**2).sum() / len(val))


@dataclass
class _Run:
    """What the steps of :func:`run_reproduction` share: the recipe, the run folder, the notes
    written into the tables, and what each step leaves for the next."""

    p: Preset
    run_dir: str
    seed: int
    cuda_graph: bool
    imagenet_weights: str | None
    notes: list = field(default_factory=list)
    prepared: PreparedData | None = None
    paths: dict = field(default_factory=dict)
    figs: dict = field(default_factory=dict)
    cae_model: str = ""
    cae_curves: dict = field(default_factory=dict)


def _step_data(run: _Run, data_dir: str | None, csv_path: str | None) -> None:
    """1. The data (the user's radiographs, or synthetic ones), prepared into HDF5 halves; the
    nets and solvers written for them."""
    p, run_dir, seed = run.p, run.run_dir, run.seed
    if data_dir:
        samples = read_dataset(data_dir, csv_path)
        run.notes.append(f"data: {os.path.abspath(data_dir)} ({len(samples)} images)")
    else:
        raw = os.path.join(run_dir, "data", "raw")
        generate_dataset(raw, p.num_images, p.num_annotated, seed=seed, height=p.image_size[0], width=p.image_size[1])
        samples = read_dataset(raw)
        run.notes.append(
            f"data: synthetic radiographs ({p.num_images} images, {p.num_annotated} annotated, "
            f"seed {seed}), not the paper's X-rays"
        )
    data_scale = 1.0 if run.imagenet_weights else p.data_scale
    data_mean = "imagenet" if run.imagenet_weights else p.data_mean
    run.prepared = prepare(
        samples,
        os.path.join(run_dir, "data", "prepared"),
        size=p.input_size,
        seed=seed,
        scale=data_scale,
        mean=data_mean,
    )
    if run.imagenet_weights:
        run.imagenet_weights = os.path.abspath(run.imagenet_weights)
        run.notes.append(f"ImageNet weights: {run.imagenet_weights}")
    else:
        run.notes.append(
            f"no ImageNet weights given: the CAE and the 'no CAE' baseline start from Caffe's fillers "
            f"({p.filler}), not from ImageNet's AlexNet as in the paper"
        )
    run.notes.append(
        f"recipe: {p.solver_type} ({p.lr_policy}), base_lr CAE {p.cae_lr:g} / regressors {p.reg_lr:g}, "
        f"batch {p.batch}, input = {data_scale:g} × (grey × 255 − {data_mean} mean)"
    )
    net_dir = os.path.join(run_dir, "nets")
    os.makedirs(net_dir)
    for d in ("cae", *evaluate.CONFIGS):
        os.makedirs(os.path.join(run_dir, d))
    run.paths = _write_nets(p, run.prepared, net_dir, run_dir, seed)


def _step_cae(run: _Run) -> None:
    """2. The CAE: trained (from ImageNet's weights when given), checked against the mean
    image's loss, its reconstructions and learning curve drawn."""
    from caffe_compat.net import TEST, Net
    from caffe_compat.solvers import get_solver
    from caffe_compat.surgery import copy_layers

    p, run_dir, prepared, paths = run.p, run.run_dir, run.prepared, run.paths
    solver = get_solver(paths["cae_solver"])
    solver.cuda_graph = run.cuda_graph
    if run.imagenet_weights:
        rep = copy_layers(run.imagenet_weights, solver.net, IMAGENET_TO_CAE, strict=False)
        rep.save(os.path.join(run_dir, "cae", "surgery_from_imagenet.json"))
        log.info("CAE from ImageNet:\n%s", rep.to_text())
    cae_curves = _train(solver, p.cae_iters, p.test_interval, "CAE")
    cae_model = os.path.join(run_dir, "cae", "cae.caffemodel")
    solver.net.save(cae_model)
    del solver
    cae_val_all = _load_h5(prepared.h5["cae_val"], ("data",))[0]
    mean_loss = _mean_image_loss(_load_h5(prepared.h5["cae_train"], ("data",))[0], cae_val_all, p.arch())
    cae_final = cae_curves["val"][-1][1]
    run.notes.append(
        f"CAE validation loss {cae_final:.6g} (reconstructing every half as the training "
        f"halves' mean image: {mean_loss:.6g}; at the start: {cae_curves['val'][0][1]:.6g})"
    )
    log.info("CAE: validation loss %.6g, mean image %.6g", cae_final, mean_loss)
    if cae_did_not_learn(cae_final, mean_loss):
        warning = (
            f"WARNING: the CAE did not learn: its validation loss {cae_final:.6g} is not "
            f"{100 * (1 - CAE_STUCK_RATIO):.0f} % below the loss of reconstructing every half as the "
            f"training halves' mean image ({mean_loss:.6g}): it reconstructs no better than that "
            "image. The CAE rows of Table II then say nothing about CAE pre-training: rerun with "
            "another --seed, more CAE iterations, or --imagenet-weights."
        )
        run.notes.append(warning)
        log.warning("%s", warning)
    cae_val = cae_val_all[: p.figure_halves]
    recon = _forward_batches(Net(paths["cae_deploy"], TEST, weights=cae_model), cae_val, "recon")
    recon_gray = prepared.to_gray(recon / p.cae_target_scale)  # recon ≈ data × cae_target_scale
    rows = prepared.rows("cae_val")[: p.figure_halves]
    run.figs["cae_reconstructions"] = figures.plot_reconstructions(
        prepared.to_gray(cae_val),
        recon_gray,
        os.path.join(run_dir, "cae_reconstructions.png"),
        [f"{r['image']} ({r['side']})" for r in rows],
    )
    run.figs["cae_learning_curve"] = figures.plot_learning_curves(
        {"CAE": cae_curves},
        os.path.join(run_dir, "cae_learning_curve.png"),
        "CAE (Euclidean loss)",
        {"validation halves reconstructed as the mean image": mean_loss},
    )
    run.cae_model, run.cae_curves = cae_model, cae_curves


def _step_fc6_scale(run: _Run) -> float:
    """3. Surgery's preparation: the factor the CAE's fc6 is scaled by (weights and bias, so its
    ReLU features keep their pattern) to the RMS the no-CAE regressors' fc6 starts with, on the
    first training halves (1.0 unless the preset asks for it)."""
    from caffe_compat.solvers import get_solver
    from caffe_compat.surgery import copy_layers

    p, paths = run.p, run.paths
    if not p.cae_fc6_scale_match:
        return 1.0
    probe = _load_h5(run.prepared.h5["landmarks_train"], ("data",))[0][: p.max_val_batch]
    reference = get_solver(paths["landmarks_solver"])  # the no-CAE start (same seed)
    if run.imagenet_weights:
        copy_layers(run.imagenet_weights, reference.net, TRANSFERRED, strict=False)
    ref_rms = _fc6_rms(paths["landmark_deploy"], reference.net, probe)
    del reference
    cae_rms = _fc6_rms(paths["landmark_deploy"], run.cae_model, probe)
    fc6_scale = ref_rms / cae_rms if cae_rms > 0 else 1.0
    run.notes.append(
        f"CAE fc6 scaled by {fc6_scale:.6g} before the regressors (fc6 RMS on the training halves: "
        f"CAE {cae_rms:.6g}, no-CAE start {ref_rms:.6g})"
    )
    log.info("CAE fc6 scale match: x%.6g (CAE %.6g, no-CAE start %.6g)", fc6_scale, cae_rms, ref_rms)
    return fc6_scale


def _surgery(run: _Run, solver, use_cae: bool, fc6_scale: float, train_targets: np.ndarray):
    """The regressor's start: conv1-5 and fc6 from the CAE or ImageNet (or the fillers), fc6
    scaled, the head's bias at the mean landmarks; returns the report and the head's note."""
    from caffe_compat.surgery import SurgeryReport, copy_layers

    source = run.cae_model if use_cae else run.imagenet_weights
    if source:
        rep = copy_layers(source, solver.net, TRANSFERRED, strict=False)
    else:
        rep = SurgeryReport(left_at_filler=list(solver.net.params))
        rep.skipped.append(
            {
                "src": "-",
                "dst": ",".join(TRANSFERRED),
                "reason": "no ImageNet weights given: conv1-5 and fc6 start from the fillers",
            }
        )
    head_note = ""
    if use_cae and fc6_scale != 1.0:
        for blob in solver.net.params["fc6"]:
            blob.data[...] = blob.data * fc6_scale
        head_note += f"fc6: weights and bias × {fc6_scale:.6g} (its RMS matched to the no-CAE start's)\n"
    if run.p.head_bias_mean:  # every configuration alike: the regressor starts at the mean predictor's output
        solver.net.params["fc8_landmarks"][1].data[...] = train_targets.mean(axis=0)
        head_note += "fc8_landmarks: bias set to the mean of the training landmarks (weights at the filler)\n"
    return rep, head_note, source


def _step_regressors(run: _Run, fc6_scale: float) -> dict:
    """4. The four landmark regressors (with/without the CAE, fc6 fine-tuned or frozen) and the
    mean-landmark predictor: trained, evaluated on the validation halves in mm."""
    from caffe_compat.solvers import get_solver

    p, run_dir, prepared, paths = run.p, run.run_dir, run.prepared, run.paths
    val_data, _ = _load_h5(prepared.h5["landmarks_val"], ("data", "landmarks"))
    val_rows = prepared.rows("landmarks_val")
    results, curves, models, preds, final_loss = {}, {}, {}, {}, {}
    train_targets = _load_h5(prepared.h5["landmarks_train"], ("landmarks",))[0]
    ref = evaluate.mean_predictor(train_targets, len(val_rows))
    results[evaluate.MEAN_PREDICTOR[0]] = evaluate.summarize(evaluate.landmark_errors_mm(ref, val_rows))
    log.info("mean-landmark predictor: mean error %.4f mm", results[evaluate.MEAN_PREDICTOR[0]]["mean_over_landmarks"])
    for key, (use_cae, fc6_ft, label) in evaluate.CONFIGS.items():
        solver = get_solver(paths["landmarks_solver" if fc6_ft else "landmarks_fc6_frozen_solver"])
        solver.cuda_graph = run.cuda_graph
        rep, head_note, source = _surgery(run, solver, use_cae, fc6_scale, train_targets)
        rep.save(os.path.join(run_dir, key, "surgery.json"))
        with open(os.path.join(run_dir, key, "surgery.txt"), "w", encoding="utf-8") as f:
            f.write(rep.to_text() + "\n" + head_note)
        log.info("%s: surgery from %s\n%s", key, source or "fillers", rep.to_text())
        curves[label] = _train(solver, p.reg_iters, p.test_interval, key)
        final_loss[key] = curves[label]["train"][-1][1]
        models[key] = os.path.join(run_dir, key, f"{key}.caffemodel")
        solver.net.save(models[key])
        del solver
        pred = predict_landmarks(paths["landmark_deploy"], models[key], val_data)
        preds[key] = pred
        errors = evaluate.landmark_errors_mm(pred, val_rows)
        np.savetxt(
            os.path.join(run_dir, key, "predictions.csv"),
            pred,
            delimiter=",",
            fmt="%.9g",
            header="u1,v1,u2,v2,u3,v3,u4,v4 (landmarks_val.h5 order)",
            comments="",
        )
        np.savetxt(
            os.path.join(run_dir, key, "errors_mm.csv"),
            errors,
            delimiter=",",
            fmt="%.6f",
            header="landmark1,landmark2,landmark3,landmark4",
            comments="",
        )
        results[key] = evaluate.summarize(errors)
        log.info("%s: mean error %.4f mm", key, results[key]["mean_over_landmarks"])
    return {
        "results": results,
        "curves": curves,
        "models": models,
        "preds": preds,
        "final_loss": final_loss,
        "train_targets": train_targets,
        "val_data": val_data,
        "val_rows": val_rows,
    }


def _step_outputs(run: _Run, reg: dict, t0: float) -> RunResult:
    """5. Table II, the learning curves, the landmark figure and summary.json."""
    p, run_dir, prepared = run.p, run.run_dir, run.prepared
    results, curves, models, final_loss = reg["results"], reg["curves"], reg["models"], reg["final_loss"]
    val_rows, val_data, preds = reg["val_rows"], reg["val_data"], reg["preds"]
    run.notes.append(
        "final training losses: "
        + ", ".join(f"{k} {v:.6g}" for k, v in final_loss.items())
        + " (paper: 0.003593 with CAE, 0.006545 without)"
    )
    tables = evaluate.write_table(results, run_dir, run.notes)
    val_targets = _load_h5(prepared.h5["landmarks_val"], ("landmarks",))[0]
    ref_loss = float(0.5 * ((val_targets - reg["train_targets"].mean(axis=0)) ** 2).sum(axis=1).mean())
    figs = run.figs
    figs["learning_curves"] = figures.plot_learning_curves(
        curves,
        os.path.join(run_dir, "learning_curves.png"),
        "Landmark regressors (Euclidean loss)",
        {"mean-landmark predictor (validation)": ref_loss},
    )
    n = min(p.figure_halves, len(val_rows))
    size = p.input_size

    def to_px(pred: np.ndarray) -> np.ndarray:
        return pred[:n].reshape(n, 4, 2) * size - 0.5  # continuous -> pixel-centre coordinates

    truth = _load_h5(prepared.h5["landmarks_val"], ("landmarks",))[0]
    figs["landmarks"] = figures.plot_landmarks(
        prepared.to_gray(val_data[:n]),
        to_px(truth),
        {
            "w/o unsupervised fine-tuning": to_px(preds["nocae_fc6_finetuned"]),
            "with unsupervised fine-tuning": to_px(preds["cae_fc6_finetuned"]),
        },
        os.path.join(run_dir, "landmarks.png"),
        [f"{r['image']} ({r['side']})" for r in val_rows[:n]],
    )
    models["cae"] = run.cae_model
    result = RunResult(run_dir, results, tables, figs, models, run.notes, final_loss)
    with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "preset": asdict(p),
                "seed": run.seed,
                "seconds": time.time() - t0,
                "results": results,
                "tables": tables,
                "figures": figs,
                "caffemodels": models,
                "notes": run.notes,
                "final_train_loss": final_loss,
                "curves": {"cae": run.cae_curves, **curves},
            },
            f,
            indent=1,
        )
    return result


def run_reproduction(
    out_root: str,
    preset: str | Preset = "quick",
    data_dir: str | None = None,
    csv_path: str | None = None,
    imagenet_weights: str | None = None,
    gpu: int | None = None,
    seed: int = 0,
    cuda_graph: bool = False,
) -> RunResult:
    """Run every step of the paper's experiment into a new folder under ``out_root``: the data,
    the CAE, the fc6 scale for surgery, the four regressors, the outputs (``_step_*``).
    ``cuda_graph``: the CAE's and the regressors' training passes replayed from CUDA graphs
    (``Solver.cuda_graph``; needs ``gpu``)."""
    from caffe_compat import mode

    p = PRESETS[preset] if isinstance(preset, str) else preset
    run_dir = new_run_dir(out_root)
    handler = logging.FileHandler(os.path.join(run_dir, "log.txt"), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    old_level = log.level
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    t0 = time.time()
    try:
        if gpu is not None:
            mode.set_device(gpu)
            mode.set_mode_gpu()
        else:
            mode.set_mode_cpu()
        run = _Run(p, run_dir, seed, cuda_graph, imagenet_weights)
        run.notes.append(
            f"preset {p.name!r}: input {p.input_size}x{p.input_size}, conv widths {list(p.conv)}, "
            f"fc {p.fc}, code {p.code}, CAE {p.cae_iters} iterations, regressors {p.reg_iters} "
            "iterations each"
        )
        _step_data(run, data_dir, csv_path)
        _step_cae(run)
        fc6_scale = _step_fc6_scale(run)
        regressors = _step_regressors(run, fc6_scale)
        result = _step_outputs(run, regressors, t0)
        log.info("reproduction done in %.0f s: %s", time.time() - t0, run_dir)
        return result
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(old_level)
