"""The dental data: the user's format, half-images, splits, and the HDF5 files the nets read.

User data format (a folder of images and one CSV, ``landmarks.csv`` by default)::

    image,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5,x6,y6,x7,y7,x8,y8,spacing_mm
    patient_001.png,101.5,70.2,...,0.1
    patient_002.png,,,,,,,,,,,,,,,,,0.1        <- no landmarks: used by the CAE only

- ``image``: a file name relative to the folder (any format OpenCV reads; 8- or 16-bit, colour
  images are converted to grey).
- ``xk, yk``: landmark k in pixels of the full image (x = column, y = row, the centre of the
  top-left pixel is (0, 0)). Landmarks 1-4 lie on the image's left half, 5-8 on its right half,
  and ``k + 4`` is the same anatomical point as ``k`` on the other side (mirror pairs). Either
  all 16 cells are filled or all are empty.
- ``spacing_mm``: the pixel spacing in mm (square pixels); required where landmarks are given.
- Images in the folder that the CSV does not list are used by the CAE only (unannotated).

Every malformed row raises a :class:`~caffe_compat.errors.DataError` naming ``file:line:column``;
all the problems of a file are reported at once.

Half-images (the paper's Section III): the left half of each image, and the right half mirrored
onto the left, so that half-landmark k (1-4) is full-image landmark k on the left half and k + 4
on the right one. An image of width W gives halves of width ``W // 2`` (the middle column of an
odd width belongs to neither). Halves are resized to ``size × size`` (``cv2.INTER_AREA``).

Coordinates: a landmark's continuous position in a half is ``(x + 0.5, y + 0.5)`` (x mirrored as
``W - (x + 0.5)`` on the right half); the regression target is that position divided by the half's
width and height, i.e. in [0, 1] whatever the input size. :func:`to_image_pixels` inverts it.

HDF5 (read by ``HDF5Data`` layers through ``*.txt`` source lists of absolute ``.h5`` paths):
``data`` (N, 3, size, size) float32 = ``scale`` × (grey level × 255 minus Caffe's ImageNet mean
(B, G, R) = (104, 117, 123)) (``scale`` 1 by default, as bvlc_alexnet expects; or minus the
training halves' mean image, ``mean="train"``), the grey image repeated in the three channels; the
landmark files add ``landmarks`` (N, 8) = (u1, v1, ..., u4, v4). ``halves.csv`` keeps, per half,
what converts predictions back to image pixels and millimetres.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from caffe_compat.errors import DataError

__all__ = [
    "CSV_COLUMNS",
    "Half",
    "IMAGENET_MEAN_BGR",
    "PreparedData",
    "Sample",
    "load_prepared",
    "make_halves",
    "prepare",
    "read_dataset",
    "split_images",
    "to_image_pixels",
    "write_dataset",
]

log = logging.getLogger("caffe_compat")

CSV_COLUMNS = ["image"] + [f"{a}{k}" for k in range(1, 9) for a in "xy"] + ["spacing_mm"]
IMAGENET_MEAN_BGR = (104.0, 117.0, 123.0)


def _imagenet_mean_image(size: int) -> np.ndarray:
    """Caffe's per-channel ImageNet mean as a (3, size, size) image (a read-only broadcast view)."""
    return np.broadcast_to(np.asarray(IMAGENET_MEAN_BGR, dtype=np.float32).reshape(3, 1, 1), (3, size, size))


_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".dcm.png")
_MAX_REPORTED = 25


@dataclass
class Sample:
    """One radiograph: ``image`` (H, W) grey array (uint8/uint16/float), ``landmarks`` (8, 2)
    pixel coordinates or None, ``spacing_mm`` (None allowed when not annotated)."""

    name: str
    image: np.ndarray
    landmarks: np.ndarray | None
    spacing_mm: float | None


@dataclass
class Half:
    """One half-image resized to ``size × size``: ``image`` float32 grey in [0, 1];
    ``targets`` (4, 2) normalised landmark positions or None; what maps them back to the image."""

    source: str
    side: str  # "left" or "right" (mirrored)
    image: np.ndarray
    targets: np.ndarray | None
    image_width: int
    image_height: int
    half_width: int
    spacing_mm: float | None
    landmarks_px: np.ndarray | None  # (4, 2) annotated landmarks in full-image pixels


# ---------------------------------------------------------------------------------------------
# the user's format


def _gray01(img: np.ndarray, where: str) -> np.ndarray:
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
        elif img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        else:
            img = img[:, :, 0]
    if img.ndim != 2:
        raise DataError(f"{where}: unsupported image shape {img.shape}")
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    f = img.astype(np.float32)
    hi = float(f.max()) if f.size else 1.0
    return f / hi if hi > 1.0 else f


def _read_image(path: str, where: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"{where}: image file {path!r} not found")
    from caffe_compat.data.image_list import imread

    img = imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f"{where}: image file {path!r} could not be decoded (not an image OpenCV reads)")
    return img


class _rows_with_line_numbers:
    """A ``csv.reader`` whose unreadable line (a NUL byte, an unterminated quote) is reported as
    ``file:line`` instead of ``csv.Error``."""

    def __init__(self, reader, path: str):
        self.reader, self.path = reader, path

    @property
    def line_num(self) -> int:
        return self.reader.line_num

    def __iter__(self):
        return self

    def __next__(self) -> list[str]:
        try:
            return next(self.reader)
        except csv.Error as e:
            raise DataError(f"{self.path}:{self.reader.line_num + 1}: unreadable CSV line ({e})") from None


def _row_numbers(row: list[str], col: dict[str, int], bad) -> tuple[np.ndarray | None, float | None]:
    """The 16 landmark coordinates (None: the row gives none) and the pixel spacing of one CSV
    row; each problem goes to ``bad(column, message)``."""
    cells = [row[col[c]].strip() for c in CSV_COLUMNS[1:17]]
    filled = [bool(c) for c in cells]
    coords = None
    if any(filled) and not all(filled):
        missing = [CSV_COLUMNS[1 + i] for i, f_ in enumerate(filled) if not f_]
        bad(
            CSV_COLUMNS[1 + filled.index(False)],
            f"landmarks partly given; fill all 16 coordinates or none (missing: {', '.join(missing)})",
        )
    elif all(filled):
        coords = np.zeros(16)
        for i, c in enumerate(cells):
            try:
                coords[i] = float(c)
            except ValueError:
                bad(CSV_COLUMNS[1 + i], f"{c!r} is not a number")
                continue
            if not np.isfinite(coords[i]):
                bad(CSV_COLUMNS[1 + i], f"{c!r} is not a finite number")
    spacing = None
    sp = row[col["spacing_mm"]].strip()
    if sp:
        try:
            spacing = float(sp)
            if not (np.isfinite(spacing) and spacing > 0):
                bad("spacing_mm", f"pixel spacing must be a positive number of mm, got {sp!r}")
        except ValueError:
            bad("spacing_mm", f"{sp!r} is not a number")
    elif coords is not None:
        bad("spacing_mm", "annotated images need a pixel spacing in mm (errors are reported in mm)")
    return coords, spacing


def _landmarks_outside(lm: np.ndarray, shape: tuple[int, int], name: str, where: str, col: dict[str, int]) -> list[str]:
    """Problems with landmarks ``lm`` (8 × (x, y)) of image ``name`` of ``shape``: outside the
    image, or on the wrong half (1-4 left, 5-8 their right-side mirrors). ``where``: ``csv:line``."""
    problems: list[str] = []
    hgt, wid = shape
    half = wid // 2
    for k in range(8):
        x, y = lm[k]
        cx_, cy_ = col[f"x{k + 1}"] + 1, col[f"y{k + 1}"] + 1
        if not (-0.5 <= y <= hgt - 0.5):
            problems.append(f"{where}:{cy_} (column 'y{k + 1}'): y={y} is outside the image {name!r} (height {hgt})")
        if k < 4 and not (-0.5 <= x < half - 0.5):
            problems.append(
                f"{where}:{cx_} (column 'x{k + 1}'): landmark {k + 1} must lie "
                f"on the left half (x < {half - 0.5} for width {wid}), got x={x}"
            )
        if k >= 4 and not (wid - half - 0.5 <= x <= wid - 0.5):
            problems.append(
                f"{where}:{cx_} (column 'x{k + 1}'): landmark {k + 1} must lie "
                f"on the right half (x >= {wid - half - 0.5} for width {wid}), got x={x}; "
                "landmarks 5-8 are the right-side mirrors of 1-4"
            )
    return problems


def read_dataset(folder: str, csv_path: str | None = None, *, include_unlisted: bool = True) -> list[Sample]:
    """Read a folder of radiographs and its landmark CSV (``folder/landmarks.csv`` by default).

    Raises :class:`DataError` listing every malformed row as ``file:line:column: problem``.
    """
    folder = os.fspath(folder)
    csv_path = os.fspath(csv_path) if csv_path else os.path.join(folder, "landmarks.csv")
    if not os.path.isdir(folder):
        raise DataError(f"data folder {folder!r} not found")
    if not os.path.exists(csv_path):
        raise DataError(
            f"landmark CSV {csv_path!r} not found; write one with the header {','.join(CSV_COLUMNS)} "
            "(see docs/paper.md)"
        )
    from caffe_compat.io import check_regular_file

    check_regular_file(csv_path, "a landmark CSV", error=DataError)
    problems: list[str] = []
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    # Image names are bytes, as Caffe reads its lists: a name that is not UTF-8 (Latin-1...) is
    # decoded as os.fsdecode does (surrogateescape), so it opens the file of those bytes.
    with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = _rows_with_line_numbers(csv.reader(f), csv_path)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{csv_path}:1:1: empty file; the first line must be the header {','.join(CSV_COLUMNS)}")
        header = [h.strip() for h in header]
        col = {}
        for name in CSV_COLUMNS:
            if name not in header:
                raise DataError(
                    f"{csv_path}:1: header has no column {name!r}; expected the columns {','.join(CSV_COLUMNS)}"
                )
            col[name] = header.index(name)
        for row in reader:
            line = reader.line_num
            if not any(c.strip() for c in row):
                continue

            def bad(name: str, msg: str, line: int = line) -> None:
                problems.append(f"{csv_path}:{line}:{col[name] + 1} (column {name!r}): {msg}")

            if any("\x00" in c for c in row):
                problems.append(f"{csv_path}:{line}: unreadable line: it holds a NUL byte")
                continue
            if len(row) != len(header):
                problems.append(f"{csv_path}:{line}: {len(row)} fields, the header has {len(header)}")
                continue
            name = row[col["image"]].strip()
            if not name:
                bad("image", "empty image name")
                continue
            if name in seen:
                bad("image", f"image {name!r} already listed on line {seen[name]}")
                continue
            seen[name] = line
            n_bad = len(problems)
            coords, spacing = _row_numbers(row, col, bad)
            path = os.path.join(folder, name)
            try:
                img = _read_image(path, f"{csv_path}:{line}:{col['image'] + 1}")
            except DataError as e:
                problems.append(str(e))
                continue
            if len(problems) > n_bad:
                continue
            gray = _gray01(img, path)
            lm = None
            if coords is not None:
                lm = coords.reshape(8, 2)
                problems.extend(_landmarks_outside(lm, gray.shape, name, f"{csv_path}:{line}", col))
            samples.append(Sample(name=name, image=gray, landmarks=lm, spacing_mm=spacing))
    if problems:
        more = f"\n... and {len(problems) - _MAX_REPORTED} more" if len(problems) > _MAX_REPORTED else ""
        raise DataError(f"{len(problems)} problem(s) in {csv_path}:\n" + "\n".join(problems[:_MAX_REPORTED]) + more)
    if include_unlisted:
        for fname in sorted(os.listdir(folder)):
            if fname in seen or not fname.lower().endswith(_IMAGE_EXTS):
                continue
            path = os.path.join(folder, fname)
            samples.append(
                Sample(name=fname, image=_gray01(_read_image(path, folder), path), landmarks=None, spacing_mm=None)
            )
            log.info("%s: not in %s, used unannotated (CAE only)", fname, csv_path)
    if not samples:
        raise DataError(f"{csv_path}: no images")
    return samples


def write_dataset(folder: str, samples: Iterable[Sample], csv_name: str = "landmarks.csv") -> str:
    """Write samples as PNG files and a landmark CSV in the user format; returns the CSV path."""
    os.makedirs(folder, exist_ok=True)
    csv_path = os.path.join(folder, csv_name)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for s in samples:
            img = s.image
            if img.dtype != np.uint8 and img.dtype != np.uint16:
                img = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
            if not cv2.imwrite(os.path.join(folder, s.name), img):
                raise DataError(f"could not write image {os.path.join(folder, s.name)!r}")
            lm = [""] * 16 if s.landmarks is None else [f"{v:.3f}" for v in np.asarray(s.landmarks).reshape(16)]
            sp = "" if s.spacing_mm is None else f"{s.spacing_mm:g}"
            w.writerow([s.name, *lm, sp])
    return csv_path


# ---------------------------------------------------------------------------------------------
# halves and coordinates


def make_halves(sample: Sample, size: int) -> list[Half]:
    """The left half and the mirrored right half of ``sample``, resized to ``size × size``."""
    gray = sample.image if sample.image.dtype == np.float32 else _gray01(sample.image, sample.name)
    hgt, wid = gray.shape
    half = wid // 2
    if half < 1:
        raise DataError(f"{sample.name}: image of width {wid} has no halves")
    out = []
    for side in ("left", "right"):
        crop = gray[:, :half] if side == "left" else gray[:, wid - half :][:, ::-1]
        img = cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA)
        targets = lm_px = None
        if sample.landmarks is not None:
            lm_px = np.asarray(sample.landmarks[:4] if side == "left" else sample.landmarks[4:], dtype=np.float64)
            xc = lm_px[:, 0] + 0.5
            if side == "right":
                xc = wid - xc
            targets = np.stack([xc / half, (lm_px[:, 1] + 0.5) / hgt], axis=1)
        out.append(Half(sample.name, side, img.astype(np.float32), targets, wid, hgt, half, sample.spacing_mm, lm_px))
    return out


def to_image_pixels(targets: np.ndarray, side: str, image_width: int, image_height: int, half_width: int) -> np.ndarray:
    """Normalised half-image positions (..., 2) back to full-image pixel coordinates."""
    t = np.asarray(targets, dtype=np.float64)
    xc = t[..., 0] * half_width
    if side == "right":
        xc = image_width - xc
    return np.stack([xc - 0.5, t[..., 1] * image_height - 0.5], axis=-1)


def split_images(names: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of image names (so both halves of one image fall on the same side).

    At least one image is held out when ``val_fraction > 0`` and at least one is kept for training.
    """
    names = sorted(set(names))
    if not names:
        return [], []
    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]
    n_val = int(round(len(names) * val_fraction))
    if val_fraction > 0:
        n_val = max(1, n_val)
    n_val = min(n_val, len(names) - 1)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return train, val


# ---------------------------------------------------------------------------------------------
# prepared data


@dataclass
class PreparedData:
    """Where :func:`prepare` wrote what (absolute paths) and the halves' bookkeeping."""

    out_dir: str
    input_size: int
    lists: dict  # "cae_train" | "cae_val" | "landmarks_train" | "landmarks_val" -> .txt path
    h5: dict  # same keys -> .h5 path
    halves: list[dict]  # one row of halves.csv per half
    scale: float = 1.0  # data = scale * (grey * 255 - mean)
    mean: str = "imagenet"  # "imagenet": Caffe's per-channel ImageNet mean; "train": mean.npy

    def mean_image(self) -> np.ndarray:
        """The subtracted mean (3, size, size), in grey levels × 255."""
        if self.mean == "train":
            return np.load(os.path.join(self.out_dir, "mean.npy"))
        return _imagenet_mean_image(self.input_size).copy()

    def to_gray(self, data: np.ndarray) -> np.ndarray:
        """HDF5 ``data`` rows (N, 3, S, S) back to grey images in [0, 1] (N, S, S)."""
        return np.clip((np.asarray(data) / self.scale + self.mean_image()) / 255.0, 0.0, 1.0).mean(axis=1)

    def rows(self, split: str) -> list[dict]:
        """The halves.csv rows of one split, in the order of its HDF5 file."""
        rows = [r for r in self.halves if r["split"] == split]
        return sorted(rows, key=lambda r: int(r["index"]))


_HALF_FIELDS = ["split", "index", "image", "side", "image_width", "image_height", "half_width", "spacing_mm"] + [
    f"{a}{k}" for k in range(1, 5) for a in "xy"
]


def _to_data(images: list[np.ndarray], mean: np.ndarray, scale: float = 1.0) -> np.ndarray:
    g = np.stack(images).astype(np.float32) * 255.0
    data = np.repeat(g[:, None], 3, axis=1) - mean[None]
    return data if scale == 1.0 else data * np.float32(scale)


def _write_h5(path: str, arrays: dict) -> None:
    import h5py

    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=np.asarray(v, dtype=np.float32))
    os.replace(tmp, path)


def prepare(
    samples: Sequence[Sample],
    out_dir: str,
    size: int = 224,
    seed: int = 0,
    cae_val_fraction: float = 0.1,
    landmark_val_fraction: float = 0.2,
    scale: float = 1.0,
    mean: str = "imagenet",
) -> PreparedData:
    """Make the halves, split them by image with ``seed``, write the HDF5 files, their source
    lists, ``halves.csv`` and ``meta.json`` into ``out_dir``.

    CAE: every half (annotated or not), ``cae_val_fraction`` of the images held out.
    Landmarks: the annotated halves, ``landmark_val_fraction`` of the annotated images held out.
    ``scale`` multiplies the mean-subtracted intensities (Caffe's ``transform_param.scale``):
    1 for bvlc_alexnet's weights (0-255 range), e.g. 1/64 for nets trained from their fillers.
    ``mean``: what is subtracted: ``"imagenet"`` (Caffe's per-channel ImageNet mean, as
    bvlc_alexnet expects) or ``"train"`` (the per-pixel mean of the CAE's training halves, as
    Caffe's ``compute_image_mean``; written to ``mean.npy``, (3, size, size) grey levels × 255).
    """
    if not (np.isfinite(scale) and scale > 0):
        raise DataError(f"prepare: scale must be a positive number, got {scale!r}")
    if mean not in ("imagenet", "train"):
        raise DataError(f"prepare: mean must be 'imagenet' or 'train', got {mean!r}")
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    names = [s.name for s in samples]
    annotated = [s.name for s in samples if s.landmarks is not None]
    if len(annotated) < 2:
        raise DataError(f"need at least 2 annotated images to train and validate the regressor, got {len(annotated)}")
    cae_train, cae_val = split_images(names, cae_val_fraction, seed)
    lm_train, lm_val = split_images(annotated, landmark_val_fraction, seed + 1)
    which = {
        "cae_train": set(cae_train),
        "cae_val": set(cae_val),
        "landmarks_train": set(lm_train),
        "landmarks_val": set(lm_val),
    }
    images: dict[str, list] = {k: [] for k in which}
    targets: dict[str, list] = {k: [] for k in which}
    rows: list[dict] = []
    for s in samples:
        for h in make_halves(s, size):
            for split, members in which.items():
                if h.source not in members:
                    continue
                if split.startswith("landmarks") and h.targets is None:
                    continue
                row = {
                    "split": split,
                    "index": len(images[split]),
                    "image": h.source,
                    "side": h.side,
                    "image_width": h.image_width,
                    "image_height": h.image_height,
                    "half_width": h.half_width,
                    "spacing_mm": "" if h.spacing_mm is None else h.spacing_mm,
                }
                for k in range(4):
                    row[f"x{k + 1}"] = "" if h.landmarks_px is None else float(h.landmarks_px[k, 0])
                    row[f"y{k + 1}"] = "" if h.landmarks_px is None else float(h.landmarks_px[k, 1])
                rows.append(row)
                images[split].append(h.image)
                if h.targets is not None:
                    targets[split].append(h.targets.reshape(8))
    if mean == "train":
        m = np.mean(np.stack(images["cae_train"]).astype(np.float64), axis=0) * 255.0
        mean_img = np.repeat(m[None].astype(np.float32), 3, axis=0)
        np.save(os.path.join(out_dir, "mean.npy"), mean_img)
    else:
        mean_img = _imagenet_mean_image(size)
    lists, h5s = {}, {}
    for split in which:
        h5 = os.path.join(out_dir, f"{split}.h5")
        arrays = {"data": _to_data(images[split], mean_img, scale)}
        if split.startswith("landmarks"):
            arrays["landmarks"] = np.stack(targets[split])
        _write_h5(h5, arrays)
        lst = os.path.join(out_dir, f"{split}.txt")
        with open(lst, "w", encoding="utf-8") as f:
            f.write(h5 + "\n")
        lists[split], h5s[split] = lst, h5
    with open(os.path.join(out_dir, "halves.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=_HALF_FIELDS)
        w.writeheader()
        w.writerows(rows)
    meta = {
        "input_size": size,
        "seed": seed,
        "mean": mean,
        "mean_bgr": list(IMAGENET_MEAN_BGR) if mean == "imagenet" else None,
        "scale": scale,
        "counts": {k: len(v) for k, v in images.items()},
        "images": len(samples),
        "annotated_images": len(annotated),
        "targets": "landmarks = (u1, v1, ..., u4, v4): position in the half / (half_width, image_height)",
    }
    with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    os.makedirs(os.path.join(out_dir, "snapshots"), exist_ok=True)
    log.info("prepared %s: %s", out_dir, meta["counts"])
    return PreparedData(out_dir, size, lists, h5s, rows, scale, mean)


def load_prepared(out_dir: str) -> PreparedData:
    """Re-open what :func:`prepare` wrote in ``out_dir``."""
    out_dir = os.path.abspath(out_dir)
    meta_path = os.path.join(out_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise DataError(f"{out_dir!r} holds no prepared dental data (no meta.json); run tools/prepare_dental.py")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    with open(os.path.join(out_dir, "halves.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    keys = ("cae_train", "cae_val", "landmarks_train", "landmarks_val")
    return PreparedData(
        out_dir,
        int(meta["input_size"]),
        {k: os.path.join(out_dir, f"{k}.txt") for k in keys},
        {k: os.path.join(out_dir, f"{k}.h5") for k in keys},
        rows,
        float(meta.get("scale", 1.0)),
        str(meta.get("mean", "imagenet")),
    )
