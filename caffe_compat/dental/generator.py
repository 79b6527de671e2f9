"""Synthetic dental panoramic radiographs with 8 anatomically placed landmarks.

The paper's data (108 dental X-rays, 54 annotated by a doctor) are not public; this generator
draws look-alike panoramic radiographs so that every step of the reproduction can run:

- bilateral anatomy: mandible (condyle, coronoid process, ramus, angle, body, chin), maxilla with
  the hard palate and the maxillary sinuses, upper and lower arches of teeth (crowns, roots,
  pulp, occasional fillings or missing teeth), a faint cervical-spine ghost in the middle;
- variability: jaw width and height, asymmetry between the sides, head pose (rotation,
  translation, scale), exposure (gamma, contrast), blur, quantum-like and electronic noise;
- irrelevant objects in some images: an earring (ring or stud) near an ear lobe, as in the
  paper's Fig. 6;
- landmarks, in the image's pixel coordinates (x = column, y = row, pixel centres at integers),
  landmark ``k`` (1-4) on the image's left side and ``k + 4`` at the same anatomical point on the
  right side: 1/5 condylion (top of the condyle), 2/6 tip of the coronoid process,
  3/7 gonion (angle of the mandible), 4/8 mental foramen;
- a pixel spacing in mm (0.35 to 0.45 mm, as a panoramic image of ~250 mm width).

Everything is drawn from ``numpy.random.default_rng([seed, index])``: the same seed gives the
same images and landmarks on every machine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["LANDMARK_NAMES", "SyntheticRadiograph", "generate_dataset", "generate_radiograph"]

log = logging.getLogger("caffe_compat")

#: The anatomical point of landmark k (1-4) on the image's left side; k + 4 is its mirror.
LANDMARK_NAMES = ("condylion", "coronoid tip", "gonion", "mental foramen")

_SHIFT = 4  # cv2 sub-pixel bits for drawing
_SCALE = 1 << _SHIFT


@dataclass
class SyntheticRadiograph:
    """One generated radiograph: ``image`` (H, W) uint8, ``landmarks`` (8, 2) float64 pixel
    coordinates (x, y), ``spacing_mm`` and whether it carries an earring."""

    image: np.ndarray
    landmarks: np.ndarray
    spacing_mm: float
    has_earring: bool


def _pts(points) -> np.ndarray:
    return np.round(np.asarray(points, dtype=np.float64) * _SCALE).astype(np.int32).reshape(-1, 1, 2)


def _fill(img: np.ndarray, points, value: float) -> None:
    cv2.fillPoly(img, [_pts(points)], float(value), lineType=cv2.LINE_AA, shift=_SHIFT)


def _line(img: np.ndarray, points, value: float, thickness: int, closed: bool = False) -> None:
    cv2.polylines(img, [_pts(points)], closed, float(value), thickness=thickness, lineType=cv2.LINE_AA, shift=_SHIFT)


def _ellipse(img: np.ndarray, center, axes, angle: float, value: float, thickness: int = -1) -> None:
    c = tuple(int(round(v * _SCALE)) for v in center)
    a = tuple(max(1, int(round(v * _SCALE))) for v in axes)
    cv2.ellipse(img, c, a, angle, 0, 360, float(value), thickness, cv2.LINE_AA, _SHIFT)


def _bezier(p0, p1, p2, n: int = 24) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2 = (np.asarray(p, dtype=np.float64) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _side_anatomy(rng: np.random.Generator, cx: float, sign: float, w: float, h: float, jaw: dict) -> dict:
    """The mandible's outline points of one side (sign -1: image left, +1: image right)."""

    def j(scale: float) -> float:  # per-side asymmetry
        return rng.normal(0.0, scale)

    condyle = (cx + sign * (jaw["half_width"] + j(0.006)) * w, (jaw["condyle_y"] + j(0.008)) * h)
    coronoid = (cx + sign * (jaw["half_width"] - 0.085 + j(0.006)) * w, (jaw["condyle_y"] + 0.07 + j(0.01)) * h)
    gonion = (cx + sign * (jaw["half_width"] + 0.02 + j(0.006)) * w, (jaw["angle_y"] + j(0.01)) * h)
    foramen = (cx + sign * (0.16 + j(0.006)) * w, (jaw["body_y"] - 0.04 + j(0.006)) * h)
    return {"condyle": condyle, "coronoid": coronoid, "gonion": gonion, "foramen": foramen}


def _draw_mandible(img: np.ndarray, cx: float, left: dict, right: dict, jaw: dict, w: float, h: float) -> None:
    bone, cortex = 0.62, 0.85
    menton = (cx, jaw["menton_y"] * h)
    outline_lower = []
    for side, sign in ((left, -1.0), (right, 1.0)):
        c, k, g = side["condyle"], side["coronoid"], side["gonion"]
        ramus_front_top = (k[0] - sign * 0.01 * w, k[1] + 0.03 * h)
        # ramus: from the condyle's neck down the posterior border to the angle, up the anterior border
        ramus = [
            (c[0] + sign * 0.012 * w, c[1] + 0.03 * h),
            (g[0] + sign * 0.004 * w, g[1] - 0.05 * h),
            g,
            (g[0] - sign * 0.07 * w, g[1] + 0.02 * h),
            (ramus_front_top[0] - sign * 0.01 * w, jaw["occlusal_y"] * h + 0.03 * h),
            ramus_front_top,
            k,
            ((c[0] + k[0]) / 2, c[1] + 0.075 * h),  # sigmoid notch
            (c[0] - sign * 0.014 * w, c[1] + 0.035 * h),
        ]
        _fill(img, ramus, bone)
        _ellipse(img, (c[0], c[1] + 0.022 * h), (0.022 * w, 0.026 * h), 0.0, bone + 0.05)  # condylar head
        _line(img, ramus[:4], cortex, 3)
        outline_lower.append(_bezier(g, (g[0] - sign * 0.04 * w, menton[1] + 0.01 * h), menton))
    lower = np.concatenate([outline_lower[0], outline_lower[1][::-1]])
    alveolar = _bezier(
        (left["gonion"][0] + 0.06 * w, jaw["occlusal_y"] * h + 0.04 * h),
        (cx, jaw["occlusal_y"] * h + 0.12 * h),
        (right["gonion"][0] - 0.06 * w, jaw["occlusal_y"] * h + 0.04 * h),
    )
    _fill(img, np.concatenate([lower, alveolar[::-1]]), bone)
    _line(img, lower, cortex, 4)
    for side in (left, right):
        _ellipse(img, side["foramen"], (0.008 * w, 0.008 * h), 0.0, 0.3)  # mental foramen (dark)
        # mandibular canal from the ramus to the foramen
        _line(
            img,
            _bezier(side["gonion"], ((side["gonion"][0] + cx) / 2, side["gonion"][1] + 0.01 * h), side["foramen"]),
            0.45,
            2,
        )


def _draw_maxilla(img: np.ndarray, rng: np.random.Generator, cx: float, jaw: dict, w: float, h: float) -> None:
    top = jaw["palate_y"] * h
    occ = jaw["occlusal_y"] * h
    maxilla = [
        (cx - 0.3 * w, top),
        (cx + 0.3 * w, top),
        (cx + 0.27 * w, occ - 0.05 * h),
        (cx - 0.27 * w, occ - 0.05 * h),
    ]
    _fill(img, maxilla, 0.5)
    _line(img, _bezier((cx - 0.32 * w, top + 0.01 * h), (cx, top - 0.04 * h), (cx + 0.32 * w, top + 0.01 * h)), 0.8, 3)
    for sign in (-1.0, 1.0):  # maxillary sinuses (air: dark)
        _ellipse(img, (cx + sign * 0.17 * w, top - 0.05 * h), (0.08 * w * rng.uniform(0.9, 1.1), 0.07 * h), 0.0, 0.25)
    _ellipse(img, (cx, top - 0.09 * h), (0.05 * w, 0.08 * h), 0.0, 0.2)  # nasal cavity


def _draw_teeth(img: np.ndarray, rng: np.random.Generator, cx: float, jaw: dict, w: float, h: float) -> None:
    occ = jaw["occlusal_y"] * h
    span = jaw["arch_half_width"] * w
    n = 8  # per quadrant: incisors .. third molar
    widths = np.array([0.55, 0.5, 0.6, 0.6, 0.6, 1.0, 0.95, 0.9])
    edges = np.concatenate([[0.0], np.cumsum(widths) / widths.sum()]) * span
    for upper in (True, False):
        for sign in (-1.0, 1.0):
            for i in range(n):
                if rng.random() < 0.04:  # missing tooth
                    continue
                x0 = cx + sign * edges[i]
                x1 = cx + sign * edges[i + 1]
                xm = (x0 + x1) / 2
                tw = abs(x1 - x0) * 0.86
                curve = 0.06 * h * ((xm - cx) / span) ** 2  # smile-shaped occlusal plane
                y_occ = occ - curve + (-0.012 * h if upper else 0.012 * h)
                crown_h = 0.07 * h
                root_h = (0.11 if i >= 5 else 0.13) * h
                d = -1.0 if upper else 1.0  # direction from the crown to the root
                tilt = sign * (i / n) * 8.0 * d
                crown_c = (xm, y_occ + d * crown_h / 2)
                root_c = (xm - sign * d * 0.004 * w, y_occ + d * (crown_h + root_h / 2))
                _ellipse(img, root_c, (tw * 0.33, root_h / 2), tilt, 0.72)
                _ellipse(img, crown_c, (tw / 2, crown_h / 2), tilt, 0.95)
                _line(img, [(xm, y_occ + d * crown_h * 0.4), (xm, y_occ + d * (crown_h + root_h * 0.85))], 0.5, 1)
                if rng.random() < 0.08:  # metal filling
                    _ellipse(img, (xm, y_occ + d * crown_h * 0.3), (tw * 0.25, crown_h * 0.2), 0.0, 1.25)


def _draw_spine(img: np.ndarray, cx: float, h: float, w: float) -> None:
    ghost = np.zeros_like(img)
    _fill(ghost, [(cx - 0.05 * w, 0.2 * h), (cx + 0.05 * w, 0.2 * h), (cx + 0.06 * w, h), (cx - 0.06 * w, h)], 0.25)
    img += cv2.GaussianBlur(ghost, (0, 0), 0.03 * w)


def _draw_earring(img: np.ndarray, rng: np.random.Generator, cx: float, sign: float, w: float, h: float) -> None:
    pos = (cx + sign * rng.uniform(0.42, 0.47) * w, rng.uniform(0.5, 0.62) * h)
    if rng.random() < 0.6:
        r = rng.uniform(0.012, 0.025) * w
        _ellipse(img, pos, (r, r * rng.uniform(0.8, 1.2)), rng.uniform(0, 180), 1.4, thickness=3)
    else:
        _ellipse(img, pos, (0.008 * w, 0.008 * w), 0.0, 1.4)


def generate_radiograph(seed: int, index: int, height: int = 320, width: int = 640) -> SyntheticRadiograph:
    """One synthetic panoramic radiograph, drawn from ``default_rng([seed, index])``."""
    rng = np.random.default_rng([int(seed), int(index)])
    h, w = float(height), float(width)
    canvas = np.zeros((height, width), np.float32)

    # soft tissue: brighter in the middle of the face, dark air at the borders
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    canvas += 0.22 * np.exp(-(((xx - w / 2) / (0.45 * w)) ** 2 + ((yy - 0.55 * h) / (0.6 * h)) ** 2))

    cx = w / 2
    jaw = {
        "half_width": rng.uniform(0.33, 0.37),
        "condyle_y": rng.uniform(0.20, 0.26),
        "angle_y": rng.uniform(0.66, 0.74),
        "body_y": rng.uniform(0.78, 0.83),
        "menton_y": rng.uniform(0.88, 0.93),
        "occlusal_y": rng.uniform(0.52, 0.57),
        "palate_y": rng.uniform(0.34, 0.38),
        "arch_half_width": rng.uniform(0.24, 0.27),
    }
    left = _side_anatomy(rng, cx, -1.0, w, h, jaw)
    right = _side_anatomy(rng, cx, 1.0, w, h, jaw)

    anatomy = np.zeros_like(canvas)
    _draw_maxilla(anatomy, rng, cx, jaw, w, h)
    _draw_mandible(anatomy, cx, left, right, jaw, w, h)
    _draw_teeth(anatomy, rng, cx, jaw, w, h)
    anatomy = cv2.GaussianBlur(anatomy, (0, 0), 1.2)
    canvas = np.maximum(canvas, anatomy * 0.9) + 0.1 * anatomy
    _draw_spine(canvas, cx, h, w)
    earring = bool(rng.random() < 0.15)
    if earring:
        _draw_earring(canvas, rng, cx, float(rng.choice([-1.0, 1.0])), w, h)

    landmarks = np.array(
        [left[k] for k in ("condyle", "coronoid", "gonion", "foramen")]
        + [right[k] for k in ("condyle", "coronoid", "gonion", "foramen")],
        dtype=np.float64,
    )

    # head pose: rotation about the centre, scale, translation (applied to image and landmarks)
    angle = rng.uniform(-4.0, 4.0)
    scale = rng.uniform(0.93, 1.05)
    m = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), angle, scale)
    m[:, 2] += (rng.uniform(-0.02, 0.02) * w, rng.uniform(-0.03, 0.03) * h)
    canvas = cv2.warpAffine(canvas, m, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    landmarks = landmarks @ m[:, :2].T + m[:, 2]

    # exposure, blur and noise
    canvas = np.clip(canvas, 0.0, None)
    canvas = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(0.6, 1.4))
    gamma = rng.uniform(0.8, 1.25)
    contrast = rng.uniform(0.8, 1.1)
    canvas = np.clip(canvas, 0.0, 1.5) / 1.5
    canvas = contrast * canvas**gamma + rng.uniform(0.02, 0.08)
    photons = rng.uniform(150.0, 400.0)
    canvas = rng.poisson(np.clip(canvas, 0.0, None) * photons).astype(np.float32) / photons
    canvas += rng.normal(0.0, 0.012, canvas.shape).astype(np.float32)
    image = np.clip(canvas * 255.0, 0, 255).astype(np.uint8)
    spacing = float(round(rng.uniform(0.35, 0.45), 4))
    return SyntheticRadiograph(image=image, landmarks=landmarks, spacing_mm=spacing, has_earring=earring)


def generate_dataset(
    out_dir: str,
    num_images: int = 108,
    num_annotated: int = 54,
    seed: int = 0,
    height: int = 320,
    width: int = 640,
) -> str:
    """Write ``num_images`` radiographs as PNGs into ``out_dir`` and ``out_dir/landmarks.csv``
    (the user-data format of :mod:`caffe_compat.dental.dataset`); the first ``num_annotated``
    images carry landmarks, the others have empty landmark cells. Returns the CSV path."""
    from caffe_compat.dental.dataset import Sample, write_dataset

    if not 0 <= num_annotated <= num_images:
        raise ValueError(f"num_annotated ({num_annotated}) must be between 0 and num_images ({num_images})")
    samples = []
    for i in range(num_images):
        r = generate_radiograph(seed, i, height, width)
        annotated = i < num_annotated
        samples.append(
            Sample(
                name=f"synthetic_{i:04d}.png",
                image=r.image,
                landmarks=r.landmarks if annotated else None,
                spacing_mm=r.spacing_mm,
            )
        )
    log.info("generated %d synthetic radiographs (%d annotated) in %s", num_images, num_annotated, out_dir)
    return write_dataset(out_dir, samples)
