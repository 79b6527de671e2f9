"""SSD's annotated images: ``AnnotatedDatum`` records (reading and writing), VOC XML annotations,
label maps, the batch samplers and the annotated transform behind ``AnnotatedData``.

Follows weiliu89/caffe branch ``ssd`` commit 4817bf8b: ``src/caffe/util/io.cpp``
(ReadRichImageToAnnotatedDatum, ReadXMLToAnnotatedDatum, MapNameToLabel), ``util/sampler.cpp``
(GenerateBatchSamples, SampleBBox, SatisfySampleConstraint), ``util/bbox_util.cpp`` (ClipBBox,
ProjectBBox, LocateBBox, MeetEmitConstraint, BBoxCoverage), ``util/im_transforms.cpp``
(ApplyResize and UpdateBBoxByResizePolicy in WARP mode) and ``data_transformer.cpp``
(CropImage, TransformAnnotation, the annotated Transform).

Boxes are normalized ``[xmin, ymin, xmax, ymax]`` in float32, as SSD's NormalizedBBox. An image's
annotation is a list of groups ``(group_label, [(instance_id, box, difficult), ...])`` in the
record's order.

Randomness comes from a NumPy Generator (the layer seeds it from torch's global RNG); SSD draws
from Caffe's global boost RNG: the same distributions, other bits.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET

import cv2
import numpy as np

from caffe_compat.data.transformer import DataTransformer, decode_image, image_to_chw
from caffe_compat.errors import DataError

__all__ = [
    "Groups",
    "read_label_map",
    "name_to_label",
    "voc_xml_to_groups",
    "make_annotated_datum",
    "parse_annotated_datum",
    "generate_batch_samples",
    "transform_annotation",
    "crop_image",
    "AnnotatedTransformer",
    "apply_distort",
    "label_rows",
]

log = logging.getLogger(__name__)

Groups = list  # [(group_label, [(instance_id, np.ndarray[4] float32, difficult), ...]), ...]
_F = np.float32


# -- label maps and VOC XML (io.cpp) --------------------------------------------------------------


def read_label_map(path: str):
    """A ``LabelMap`` prototxt (``item { name: "dog" label: 12 display_name: "dog" }``)."""
    from google.protobuf import text_format

    from caffe_compat.proto import caffe_pb2

    lm = caffe_pb2.LabelMap()
    try:
        with open(path) as f:
            text_format.Parse(f.read(), lm)
    except OSError as e:
        raise DataError(f"label map {path!r}: cannot read it ({e.strerror})") from None
    except text_format.ParseError as e:
        raise DataError(f"label map {path}:{e}") from None
    return lm


def name_to_label(label_map, strict: bool = True) -> dict[str, int]:
    """SSD's MapNameToLabel: ``strict`` (convert_annoset's ``--check_label``) refuses a name given twice."""
    out: dict[str, int] = {}
    for item in label_map.item:
        if strict and item.name in out:
            raise DataError(f"label map: name {item.name!r} is given twice")
        out[item.name] = int(item.label)
    return out


def _int_or_zero(text: str | None) -> int:
    """boost ptree's ``get("xmin", 0)``: the integer, or 0 when the text is not one."""
    try:
        return int((text or "").strip())
    except ValueError:
        return 0


def voc_xml_to_groups(path: str, img_height: int, img_width: int, labels: dict[str, int]) -> Groups:
    """SSD's ReadXMLToAnnotatedDatum: the objects of a VOC XML file as annotation groups.

    The size is ``annotation/size/{width,height}`` (the image's when missing); each ``object``'s
    children are read in order: ``name`` opens an annotation in the group of its label (groups in
    order of first appearance, instance ids counting up within a group), ``difficult`` ("1") and
    ``bndbox`` (integer pixel corners, divided by the size) fill it — a ``difficult`` after the
    ``bndbox`` does not apply, as in SSD."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise DataError(f"{path}: cannot read the VOC XML annotation ({e})") from None
    size = root.find("size")
    try:
        height = int(size.find("height").text)
        width = int(size.find("width").text)
    except (AttributeError, TypeError, ValueError):
        height, width = img_height, img_width
    if width == 0 or height == 0:
        raise DataError(f"{path}: no valid image width/height")
    groups: Groups = []
    for obj in root.findall("object"):
        anno = None
        difficult = False
        for child in obj:
            if child.tag == "name":
                name = (child.text or "").strip()
                if name not in labels:
                    raise DataError(f"{path}: unknown name {name!r} (not in the label map)")
                label = labels[name]
                group = next((g for g in groups if g[0] == label), None)
                if group is None:
                    group = (label, [])
                    groups.append(group)
                instance = group[1][-1][0] + 1 if group[1] else 0
                anno = [instance, np.zeros(4, _F), False]
                group[1].append(anno)
            elif child.tag == "difficult":
                difficult = (child.text or "").strip() == "1"
            elif child.tag == "bndbox":
                if anno is None:
                    raise DataError(f"{path}: an object's bndbox comes before its name")
                xy = [_int_or_zero(child.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
                anno[1] = np.array(
                    [_F(xy[0]) / _F(width), _F(xy[1]) / _F(height), _F(xy[2]) / _F(width), _F(xy[3]) / _F(height)], _F
                )
                anno[2] = difficult
    return [(label, [tuple(a) for a in annos]) for label, annos in groups]


def make_annotated_datum(image_path: str, xml_path: str, labels: dict[str, int], *, datum):
    """SSD's ReadRichImageToAnnotatedDatum for VOC XML: ``datum`` (the image's Datum, as
    convert_imageset's ReadImageToDatum makes it) with type BBOX and the XML's groups."""
    from caffe_compat.proto import caffe_pb2

    if datum.encoded:
        img = cv2.imdecode(np.frombuffer(datum.data, np.uint8), cv2.IMREAD_UNCHANGED)
        h, w = img.shape[:2]
    else:
        h, w = datum.height, datum.width
    ad = caffe_pb2.AnnotatedDatum(type=caffe_pb2.AnnotatedDatum.BBOX)
    ad.datum.CopyFrom(datum)
    for label, annos in voc_xml_to_groups(xml_path, h, w, labels):
        g = ad.annotation_group.add(group_label=label)
        for instance, box, difficult in annos:
            a = g.annotation.add(instance_id=instance)
            a.bbox.xmin, a.bbox.ymin, a.bbox.xmax, a.bbox.ymax = (float(v) for v in box)
            a.bbox.difficult = bool(difficult)
    return ad


def parse_annotated_datum(value: bytes, *, where: str):
    """An LMDB record: ``(datum, anno_type or None, groups)``."""
    from caffe_compat.proto import caffe_pb2

    ad = caffe_pb2.AnnotatedDatum()
    try:
        ad.ParseFromString(value)
    except Exception as e:  # protobuf's DecodeError
        raise DataError(f"{where}: record is not an AnnotatedDatum ({e})") from None
    groups = [
        (
            int(g.group_label),
            [
                (
                    int(a.instance_id),
                    np.array([a.bbox.xmin, a.bbox.ymin, a.bbox.xmax, a.bbox.ymax], _F),
                    bool(a.bbox.difficult),
                )
                for a in g.annotation
            ],
        )
        for g in ad.annotation_group
    ]
    return ad.datum, (int(ad.type) if ad.HasField("type") else None), groups


# -- boxes (bbox_util.cpp) -------------------------------------------------------------------------


def _clip(b: np.ndarray) -> np.ndarray:
    return np.clip(b, _F(0), _F(1)).astype(_F)


def _size(b: np.ndarray) -> float:
    if b[2] < b[0] or b[3] < b[1]:
        return 0.0
    return float((b[2] - b[0]) * (b[3] - b[1]))


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return np.zeros(4, _F)
    return np.array([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])], _F)


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    i = _intersection(a, b)
    iw, ih = i[2] - i[0], i[3] - i[1]
    if iw > 0 and ih > 0:
        inter = _F(iw * ih)
        return float(inter / (_F(_size(a)) + _F(_size(b)) - inter))
    return 0.0


def _coverage(a: np.ndarray, b: np.ndarray) -> float:
    """BBoxCoverage: the part of ``a`` that ``b`` covers."""
    inter = _size(_intersection(a, b))
    return inter / _size(a) if inter > 0 else 0.0


def _project(src: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """ProjectBBox: ``b`` in the coordinates of ``src``, clipped; None when outside or empty."""
    if b[0] >= src[2] or b[2] <= src[0] or b[1] >= src[3] or b[3] <= src[1]:
        return None
    w, h = _F(src[2] - src[0]), _F(src[3] - src[1])
    p = _clip(np.array([(b[0] - src[0]) / w, (b[1] - src[1]) / h, (b[2] - src[0]) / w, (b[3] - src[1]) / h], _F))
    return p if _size(p) > 0 else None


def _meets_emit(src: np.ndarray, b: np.ndarray, emit) -> bool:
    from caffe_compat.proto import caffe_pb2

    if emit.emit_type == caffe_pb2.EmitConstraint.CENTER:
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        return bool(src[0] <= cx <= src[2] and src[1] <= cy <= src[3])
    return _coverage(b, src) > emit.emit_overlap


def transform_annotation(
    groups: Groups, crop_bbox: np.ndarray, mirror: bool, emit=None, resize_warp: bool = False
) -> Groups:
    """SSD's TransformAnnotation: each box (clamped to [0, 1] by a WARP resize), kept when it
    meets ``emit`` (an EmitConstraint, or None) and overlaps ``crop_bbox``, projected into it,
    mirrored (``x -> 1 - x``); groups left without boxes are dropped."""
    out: Groups = []
    for label, annos in groups:
        kept = []
        for instance, box, difficult in annos:
            b = _clip(box) if resize_warp else box
            if emit is not None and not _meets_emit(crop_bbox, b, emit):
                continue
            p = _project(crop_bbox, b)
            if p is None:
                continue
            if mirror:
                p = np.array([1 - p[2], p[1], 1 - p[0], p[3]], _F)
            kept.append((instance, p, difficult))
        if kept:
            out.append((label, kept))
    return out


# -- batch samplers (sampler.cpp) -------------------------------------------------------------------


def _satisfies(sampled: np.ndarray, objects: list[np.ndarray], c) -> bool:
    has_j = c.HasField("min_jaccard_overlap") or c.HasField("max_jaccard_overlap")
    has_s = c.HasField("min_sample_coverage") or c.HasField("max_sample_coverage")
    has_o = c.HasField("min_object_coverage") or c.HasField("max_object_coverage")
    if not (has_j or has_s or has_o):
        return True
    found = False
    for obj in objects:
        if has_j:
            v = _jaccard(sampled, obj)
            if c.HasField("min_jaccard_overlap") and v < c.min_jaccard_overlap:
                continue
            if c.HasField("max_jaccard_overlap") and v > c.max_jaccard_overlap:
                continue
            found = True
        if has_s:
            v = _coverage(sampled, obj)
            if c.HasField("min_sample_coverage") and v < c.min_sample_coverage:
                continue
            if c.HasField("max_sample_coverage") and v > c.max_sample_coverage:
                continue
            found = True
        if has_o:
            v = _coverage(obj, sampled)
            if c.HasField("min_object_coverage") and v < c.min_object_coverage:
                continue
            if c.HasField("max_object_coverage") and v > c.max_object_coverage:
                continue
            found = True
        if found:
            return True
    return found


def _sample_bbox(s, rng: np.random.Generator, where: str) -> np.ndarray:
    if not (0 < s.min_scale <= s.max_scale <= 1):
        raise DataError(f"{where}: sampler needs 0 < min_scale <= max_scale <= 1, got {s.min_scale}, {s.max_scale}")
    if not (0 < s.min_aspect_ratio <= s.max_aspect_ratio):
        raise DataError(f"{where}: sampler needs 0 < min_aspect_ratio <= max_aspect_ratio")
    scale = _F(rng.uniform(s.min_scale, s.max_scale))
    ratio = _F(rng.uniform(s.min_aspect_ratio, s.max_aspect_ratio))
    ratio = min(max(ratio, _F(scale**2)), _F(1 / scale**2))
    w, h = _F(scale * np.sqrt(ratio)), _F(scale / np.sqrt(ratio))
    # max(0, .): a box of width 1 may round to just above 1 (SSD's CHECK would abort there)
    w_off, h_off = _F(rng.uniform(0, max(0.0, 1 - w))), _F(rng.uniform(0, max(0.0, 1 - h)))
    return np.array([w_off, h_off, w_off + w, h_off + h], _F)


def generate_batch_samples(groups: Groups, batch_samplers, rng: np.random.Generator, *, where: str = "") -> list:
    """SSD's GenerateBatchSamples: for each BatchSampler with ``use_original_image``, up to
    ``max_trials`` boxes drawn by its ``sampler`` (scale, aspect ratio, then offsets) that meet
    its ``sample_constraint`` against any object box, at most ``max_sample`` of them."""
    objects = [box for _, annos in groups for _, box, _ in annos]
    out = []
    for bs in batch_samplers:
        if not bs.use_original_image:
            continue
        found = 0
        for _ in range(bs.max_trials):
            if bs.HasField("max_sample") and found >= bs.max_sample:
                break
            b = _sample_bbox(bs.sampler, rng, where)  # LocateBBox in the unit box: unchanged
            if _satisfies(b, objects, bs.sample_constraint):
                found += 1
                out.append(b)
    return out


def crop_image(chw: np.ndarray, bbox: np.ndarray) -> np.ndarray:
    """SSD's CropImage of a C×H×W image to a normalized box (clipped; pixel offsets and sizes
    truncated toward zero)."""
    _, h, w = chw.shape
    b = _clip(bbox)
    x0, y0, x1, y1 = b[0] * _F(w), b[1] * _F(h), b[2] * _F(w), b[3] * _F(h)
    w_off, h_off = int(x0), int(y0)
    cw, ch = int(_F(x1 - x0)), int(_F(y1 - y0))
    return chw[:, h_off : h_off + ch, w_off : w_off + cw]


# -- photometric distortion (im_transforms.cpp) ------------------------------------------------------


def _convert(x: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """OpenCV's ``convertTo(-1, alpha, beta)`` on uint8: ``saturate_cast(alpha * x + beta)``."""
    return np.clip(np.rint(x.astype(np.float32) * _F(alpha) + _F(beta)), 0, 255).astype(np.uint8)


def _hsv_channel(img: np.ndarray, channel: int, alpha: float, beta: float) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    hsv[..., channel] = _convert(hsv[..., channel], alpha, beta)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def apply_distort(chw: np.ndarray, p, rng: np.random.Generator) -> np.ndarray:
    """SSD's ApplyDistort on a 3-channel uint8 C×H×W BGR image: with probability 1/2 the order
    brightness, contrast, saturation, hue, else brightness, saturation, hue, contrast; then a
    random channel order. Each step happens with its ``*_prob`` (a uniform draw below it) and
    draws its amount: brightness ``+ U(-delta, delta)``, contrast ``* U(lower, upper)`` (skipped
    within 1e-3 of 1), saturation ``S * U(lower, upper)`` and hue ``H + U(-delta, delta)`` in
    OpenCV's 8-bit HSV, each saturated to [0, 255] as OpenCV's convertTo."""
    if chw.shape[0] != 3:
        raise DataError(f"distort_param needs 3-channel images, got {chw.shape[0]} channels")
    img = np.ascontiguousarray(chw.transpose(1, 2, 0))

    def brightness(img):
        if _F(rng.uniform(0, 1)) < _F(p.brightness_prob):
            delta = _F(rng.uniform(-p.brightness_delta, p.brightness_delta))
            if abs(delta) > 0:
                return _convert(img, 1, delta)
        return img

    def contrast(img):
        if _F(rng.uniform(0, 1)) < _F(p.contrast_prob):
            delta = _F(rng.uniform(p.contrast_lower, p.contrast_upper))
            if abs(delta - 1) > 1e-3:
                return _convert(img, delta, 0)
        return img

    def saturation(img):
        if _F(rng.uniform(0, 1)) < _F(p.saturation_prob):
            delta = _F(rng.uniform(p.saturation_lower, p.saturation_upper))
            return _hsv_channel(img, 1, delta, 0)  # SSD's test `fabs(delta - 1) != 1e-3` always holds
        return img

    def hue(img):
        if _F(rng.uniform(0, 1)) < _F(p.hue_prob):
            delta = _F(rng.uniform(-p.hue_delta, p.hue_delta))
            if abs(delta) > 0:
                return _hsv_channel(img, 0, 1, delta)
        return img

    steps = (
        (brightness, contrast, saturation, hue)
        if _F(rng.uniform(0, 1)) > 0.5
        else (brightness, saturation, hue, contrast)
    )
    for step in steps:
        img = step(img)
    if _F(rng.uniform(0, 1)) < _F(p.random_order_prob):
        img = img[..., rng.permutation(3)]
    return image_to_chw(np.ascontiguousarray(img))


# -- the annotated transform (data_transformer.cpp) -------------------------------------------------

_INTERP = {1: cv2.INTER_LINEAR, 2: cv2.INTER_AREA, 3: cv2.INTER_NEAREST, 4: cv2.INTER_CUBIC, 5: cv2.INTER_LANCZOS4}


class AnnotatedTransformer:
    """SSD's DataTransformer for annotated images, on the fields implemented here.

    ``transform_param``: ``distort_param`` (:meth:`distort`), ``expand_param`` (:meth:`expand`),
    ``resize_param`` in WARP mode (``height``, ``width``, ``interp_mode`` one drawn uniformly per
    image among those given, LINEAR when none; encoded records only, as in SSD),
    ``emit_constraint`` (CENTER or MIN_OVERLAP), then Caffe's ``crop_size``, ``mirror``,
    ``mean_file``/``mean_value``, ``scale`` (:class:`DataTransformer`). Refused by field name:
    ``noise_param``, ``expand_param`` with ``mean_file``, ``crop_h``/``crop_w``, resize modes
    other than WARP.

    Differences from SSD: the draws come from a NumPy Generator, in this order per image:
    distortion, expansion, batch samples, the picked sample, the interpolation, then mirror and crop offsets."""

    def __init__(self, param, phase: int, rng: np.random.Generator, *, where: str):
        from caffe_compat.proto import caffe_pb2

        self.where = where
        if param.HasField("noise_param"):
            raise DataError(f"{where}: transform_param.noise_param (SSD's noise policy) is not implemented; remove it")
        self.distort_param = param.distort_param if param.HasField("distort_param") else None
        self._warned_raw_distort = False
        self.expand_param = param.expand_param if param.HasField("expand_param") else None
        if self.expand_param is not None and param.HasField("mean_file"):
            raise DataError(f"{where}: transform_param.expand_param with mean_file is not implemented; use mean_value")
        self.mean_values = np.asarray(param.mean_value, np.float32)
        if param.crop_h or param.crop_w:
            raise DataError(f"{where}: transform_param.crop_h/crop_w are not implemented; use crop_size")
        self.resize = param.resize_param if param.HasField("resize_param") else None
        if self.resize is not None:
            rp = self.resize
            if rp.resize_mode != caffe_pb2.ResizeParameter.WARP:
                raise DataError(
                    f"{where}: transform_param.resize_param.resize_mode "
                    f"{caffe_pb2.ResizeParameter.Resize_mode.Name(rp.resize_mode)} is not implemented; use WARP"
                )
            if rp.height <= 0 or rp.width <= 0:
                raise DataError(f"{where}: transform_param.resize_param needs height and width")
        self.emit = param.emit_constraint if param.HasField("emit_constraint") else None
        self.rng = rng
        self.base = DataTransformer(param, phase, rng, where=where)

    def output_shape(self, chw: tuple[int, int, int]) -> tuple[int, int, int]:
        c, h, w = chw
        if self.resize is not None:
            h, w = int(self.resize.height), int(self.resize.width)
        return self.base.output_shape((c, h, w))

    def decode(self, datum, *, where: str) -> np.ndarray:
        return self.base.decode(datum, where=where)

    def __call__(self, x: np.ndarray, encoded: bool, groups: Groups, *, where: str) -> tuple[np.ndarray, Groups]:
        """One image (C×H×W uint8) and its groups: the float32 C×h×w blob and the transformed groups."""
        if self.resize is not None:
            if not encoded:
                raise DataError(
                    f"{where}: resize_param applies to encoded records only (SSD's raw-Datum path has no "
                    "resize); write the LMDB with --encode_type/--encoded"
                )
            modes = list(self.resize.interp_mode)
            interp = _INTERP[modes[int(self.rng.integers(len(modes)))]] if modes else cv2.INTER_LINEAR
            img = cv2.resize(
                np.ascontiguousarray(x.transpose(1, 2, 0)),
                (self.resize.width, self.resize.height),
                interpolation=interp,
            )
            x = image_to_chw(img)
        drawn = self.base.draw(x.shape, where=where)
        out = self.base.apply(x, drawn)
        do_mirror, h_off, w_off = drawn
        _, ih, iw = x.shape
        oh, ow = out.shape[1:]
        crop_bbox = np.array(
            [_F(w_off) / _F(iw), _F(h_off) / _F(ih), _F(w_off + ow) / _F(iw), _F(h_off + oh) / _F(ih)], _F
        )
        return out, transform_annotation(groups, crop_bbox, do_mirror, self.emit, resize_warp=self.resize is not None)

    def distort(self, x: np.ndarray, encoded: bool, *, where: str) -> np.ndarray:
        """SSD's DistortImage (``distort_param``) of an encoded image: :func:`apply_distort`, then a
        JPEG round trip as SSD stores the result. A raw image is left as it is (SSD logs "Only
        support encoded datum now" and keeps it)."""
        if self.distort_param is None:
            return x
        if not encoded:
            if not self._warned_raw_distort:
                self._warned_raw_distort = True
                log.warning("%s: distort_param applies to encoded records only (as in SSD); raw images kept", where)
            return x
        return _jpeg_roundtrip(apply_distort(x, self.distort_param, self.rng), where)

    def expand(self, x: np.ndarray, encoded: bool, groups: Groups, *, where: str) -> tuple[np.ndarray, Groups]:
        """SSD's ExpandImage (``expand_param``): with probability ``prob``, the image placed at a
        random whole-pixel offset on a canvas ``ratio`` times its size (ratio uniform in
        [1, max_expand_ratio]; nothing when max_expand_ratio is within 0.01 of 1), the boxes
        projected into the canvas. The canvas holds the mean values (rounded; 0 without) for an
        encoded image, which is then re-encoded as JPEG and decoded, and the byte 32 (SSD's
        buffer of spaces) for a raw one."""
        ep = self.expand_param
        if ep is None:
            return x, groups
        if _F(self.rng.uniform(0, 1)) > _F(ep.prob):
            return x, groups
        if abs(float(ep.max_expand_ratio) - 1.0) < 1e-2:
            return x, groups
        ratio = _F(self.rng.uniform(1, ep.max_expand_ratio))
        c, h, w = x.shape
        big_h, big_w = int(_F(h) * ratio), int(_F(w) * ratio)
        h_off = int(np.floor(_F(self.rng.uniform(0, big_h - h))))
        w_off = int(np.floor(_F(self.rng.uniform(0, big_w - w))))
        if encoded:
            canvas = np.zeros((c, big_h, big_w), np.uint8)
            if self.mean_values.size:
                if self.mean_values.size not in (1, c):
                    raise DataError(f"{where}: give 1 or {c} mean_value(s) for a {c}-channel image")
                mv = np.clip(np.rint(np.broadcast_to(self.mean_values, (c,))), 0, 255).astype(np.uint8)
                canvas[:] = mv.reshape(c, 1, 1)
        else:
            canvas = np.full((c, big_h, big_w), 32, x.dtype)
        canvas[:, h_off : h_off + h, w_off : w_off + w] = x
        if encoded:
            canvas = _jpeg_roundtrip(canvas, where)
        bbox = np.array(
            [_F(-w_off) / _F(w), _F(-h_off) / _F(h), _F(big_w - w_off) / _F(w), _F(big_h - h_off) / _F(h)], _F
        )
        return canvas, transform_annotation(groups, bbox, False, self.emit)

    def sample(self, x: np.ndarray, encoded: bool, groups: Groups, batch_samplers, *, where: str):
        """The batch-sampler crop (before the transform): a sampled box picked at random, the image
        cropped to it (an encoded image is re-encoded as JPEG and decoded again, as SSD's CropImage
        stores it) and the groups projected into it (no mirror, no resize; emit_constraint applies)."""
        boxes = generate_batch_samples(groups, batch_samplers, self.rng, where=where)
        if not boxes:
            return x, groups
        b = boxes[int(self.rng.integers(len(boxes)))]
        crop = crop_image(x, b)
        if encoded:
            crop = _jpeg_roundtrip(crop, where)
        return crop, transform_annotation(groups, _clip(b), False, self.emit)


def _jpeg_roundtrip(chw: np.ndarray, where: str) -> np.ndarray:
    """SSD's EncodeCVMatToDatum(..., "jpg") then decode: what its crops and expansions store."""
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(chw.transpose(1, 2, 0) if chw.shape[0] > 1 else chw[0]))
    if not ok:
        raise DataError(f"{where}: OpenCV could not re-encode the image as JPEG")
    return decode_image(buf.tobytes(), where=where)


def label_rows(all_groups: list[Groups]) -> np.ndarray:
    """AnnotatedData's label top: (1, 1, num_boxes, 8) rows ``[item_id, group_label,
    instance_id, xmin, ymin, xmax, ymax, difficult]``; one row of -1 when the batch has none."""
    rows = [
        [item, label, instance, *box, float(difficult)]
        for item, groups in enumerate(all_groups)
        for label, annos in groups
        for instance, box, difficult in annos
    ]
    if not rows:
        return np.full((1, 1, 1, 8), -1, np.float32)
    return np.asarray(rows, np.float32).reshape(1, 1, len(rows), 8)
