"""WindowData (R-CNN's data layer) against an independent NumPy/OpenCV re-derivation of Caffe 1.0's
window_data_layer.cpp: window-file parsing, the fg/bg split and sampling, the warp / square /
context_pad geometry with mirroring and clipping, mean and scale, seeding, errors, and a net."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffe_compat
import caffe_compat.layers.window_data  # noqa: F401  (registers WindowData)
from caffe_compat.errors import DataError, LayerError
from caffe_compat.io import array_to_blob, write_blobproto
from caffe_compat.layers.base import layer_class
from caffe_compat.layers.window_data import Window, read_window_file, split_windows, warp_geometry
from caffe_compat.proto import caffe_pb2

ROWS, COLS = 16, 20  # image a.png
CROP = 8


# -- an independent reference of Caffe 1.0's load_batch for one window ---------------------------


def c_round(v) -> int:
    """C's round(): halves away from zero."""
    v = np.float64(v)
    return int(np.sign(v) * np.floor(np.abs(v) + 0.5))


def ref_geometry(box, rows, cols, crop, pad, square, mirror):
    """((row0, row1, col0, col1) source slice, (width, height) to resize to, pad_h, pad_w, trimmed)."""
    f = np.float32
    x1, y1, x2, y2 = box
    if pad == 0 and not square:
        return (y1, y2 + 1, x1, x2 + 1), (crop, crop), 0, 0, False
    ctx = f(crop) / f(crop - 2 * pad)
    hh, hw = f((y2 - y1 + 1) / 2), f((x2 - x1 + 1) / 2)
    cx, cy = f(x1) + hw, f(y1) + hh
    if square:
        hh = hw = max(hh, hw)
    ex1, ex2 = c_round(cx - hw * ctx), c_round(cx + hw * ctx)
    ey1, ey2 = c_round(cy - hh * ctx), c_round(cy + hh * ctx)
    left, top = max(0, -ex1), max(0, -ey1)
    right = max(0, ex2 - (cols - 1))
    bottom = max(0, ey2 - (rows - 1))
    sx, sy = f(crop) / f(ex2 - ex1 + 1), f(crop) / f(ey2 - ey1 + 1)
    cx1, cx2, cy1, cy2 = ex1 + left, ex2 - right, ey1 + top, ey2 - bottom
    w, h = c_round(f(cx2 - cx1 + 1) * sx), c_round(f(cy2 - cy1 + 1) * sy)
    pad_h = c_round(f(top) * sy)
    pad_w = c_round(f(right) * sx) if mirror else c_round(f(left) * sx)
    trimmed = pad_h + h > crop or pad_w + w > crop
    return (cy1, cy2 + 1, cx1, cx2 + 1), (min(w, crop - pad_w), min(h, crop - pad_h)), pad_h, pad_w, trimmed


def ref_item(img, box, crop, pad=0, square=False, mirror=False, mean=None, mean_values=None, scale=1.0):
    """Caffe's copy loop, index by index: top[c, h + pad_h, w + pad_w] = (pixel - mean) * scale."""
    (r0, r1, c0, c1), size, pad_h, pad_w, _ = ref_geometry(box, *img.shape[:2], crop, pad, square, mirror)
    warped = cv2.resize(np.ascontiguousarray(img[r0:r1, c0:c1]), size, interpolation=cv2.INTER_LINEAR)
    if mirror:
        warped = cv2.flip(warped, 1)
    out = np.zeros((3, crop, crop), np.float32)
    scale = np.float32(scale)
    if mean is not None:
        mc, mh, mw = mean.shape
        off = (mw - crop) // 2
        flat = mean.ravel()
    for h in range(warped.shape[0]):
        for w in range(warped.shape[1]):
            for c in range(3):
                pixel = np.float32(warped[h, w, c])
                if mean is not None:
                    m = flat[(c * mh + h + off + pad_h) * mw + w + off + pad_w]
                elif mean_values is not None:
                    m = np.float32(mean_values[c])
                else:
                    m = np.float32(0)
                out[c, h + pad_h, w + pad_w] = (pixel - m) * scale
    return out


# -- fixtures --------------------------------------------------------------------------------------


def write_window_file(path: Path, blocks) -> None:
    """blocks: [(image_path, (channels, height, width), [(label, overlap, x1, y1, x2, y2), ...]), ...]"""
    lines = []
    for i, (image, (c, h, w), windows) in enumerate(blocks):
        lines += [f"# {i}", image, str(c), str(h), str(w), str(len(windows))]
        lines += [" ".join(str(v) for v in win) for win in windows]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def images(tmp_path, monkeypatch):
    """imgs/a.png (16×20, smooth gradients plus noise, so that bilinear warps are non-trivial) and
    imgs/b.png (12×9)."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    (tmp_path / "imgs").mkdir()
    yy, xx = np.mgrid[0:ROWS, 0:COLS]
    a = np.stack([xx * 12, yy * 15, (xx + yy) * 7], axis=-1) + rng.integers(0, 20, (ROWS, COLS, 3))
    a = np.clip(a, 0, 255).astype(np.uint8)
    b = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    for name, img in (("a.png", a), ("b.png", b)):
        assert cv2.imwrite(str(tmp_path / "imgs" / name), img)
    return {"a": a, "b": b}


LAYER = """name: "wd" type: "WindowData" top: "data" top: "label"
  window_data_param {{ source: "windows.txt" root_folder: "imgs/" batch_size: {bs} {wp} }}
  transform_param {{ crop_size: {crop} {tp} }}
  data_param {{ prefetch: {prefetch} }}"""


def make_layer(bs=4, wp="", tp="", crop=CROP, prefetch=0, phase=caffe_pb2.TRAIN):
    param = text_format.Parse(
        LAYER.format(bs=bs, wp=wp, tp=tp, crop=crop, prefetch=prefetch), caffe_pb2.LayerParameter()
    )
    return layer_class(param.type)(param, [], phase)


def forward(layer):
    data, label = layer.forward()
    return data.numpy().copy(), label.numpy().copy()


def fix_draws(layer, drawn):
    """Make the layer's batches use these (window, mirror) pairs instead of random draws."""
    layer._source.draw_batch = lambda: list(drawn)


BOXES = [
    (3, 2, 12, 9),  # inside
    (0, 0, COLS - 1, ROWS - 1),  # the whole image: touches every border
    (0, 4, 6, 10),  # on the left border
    (13, 10, COLS - 1, ROWS - 1),  # in the bottom-right corner
    (9, 1, 10, 14),  # tall and thin (square mode widens it)
]
CROSSING = [
    (-3, -4, 3, 1),  # beyond the top-left corner (padding + the fit-in-crop trim)
    (-4, -3, 2, -1),  # entirely above the image: only the expanded region reaches it
    (15, 12, 22, 18),  # beyond the bottom-right corner
    (-2, 1, 4, 11),  # beyond the left border (the trim with context_pad 1)
]


# -- parsing and the fg/bg split ---------------------------------------------------------------


def test_window_file_parsing_split_and_top_shapes(images, tmp_path):
    write_window_file(
        tmp_path / "windows.txt",
        [
            ("a.png", (3, ROWS, COLS), [(1, 0.9, 3, 2, 12, 9), (2, 0.5, 0, 0, 5, 5), (3, 0.3, 1, 1, 4, 4)]),
            ("b.png", (3, 12, 9), [(0, 0.1, 1, 1, 5, 5), (4, 0.49999, 0, 0, 8, 11), (5, 1, 2, 3, 4, 5)]),
        ],
    )
    imgs, wins = read_window_file("windows.txt", "imgs/")
    assert [(i.path, i.channels, i.height, i.width, i.line) for i in imgs] == [
        ("imgs/a.png", 3, ROWS, COLS, 1),
        ("imgs/b.png", 3, 12, 9, 10),
    ]
    assert [(w.image, w.label, w.x1, w.y1, w.x2, w.y2, w.line) for w in wins][:2] == [
        (0, 1, 3, 2, 12, 9, 7),
        (0, 2, 0, 0, 5, 5, 8),
    ]
    fg, bg = split_windows(wins, 0.5, 0.5)
    assert [(w.image, w.label) for w in fg] == [(0, 1), (0, 2), (1, 5)]  # overlap >= fg_threshold
    # below bg_threshold: label and overlap forced to 0 (whatever class_index says)
    assert [(w.image, w.label, w.overlap, w.x1) for w in bg] == [(0, 0, 0.0, 1), (1, 0, 0.0, 1), (1, 0, 0.0, 0)]
    fg, bg = split_windows(wins, 0.6, 0.2)  # 0.2 <= overlap < 0.6: dropped
    assert [w.label for w in fg] == [1, 5] and [w.line for w in bg] == [16]

    layer = make_layer(bs=5, wp="fg_threshold: 0.6 bg_threshold: 0.2")
    assert layer.top_shapes([]) == [(5, 3, CROP, CROP), (5,)]  # Caffe 1.0: a 1-D label top
    assert [w.label for w in layer.fg_windows] == [1, 5] and len(layer.bg_windows) == 1
    data, label = forward(layer)
    assert data.shape == (5, 3, CROP, CROP) and data.dtype == np.float32 and label.shape == (5,)


def test_tokens_may_share_lines_as_with_cpp_streams(images, tmp_path):
    (tmp_path / "windows.txt").write_text(f"# 0 a.png 3 {ROWS} {COLS} 2\n1 1 0 0 3 3 0 0 4 4 9 9\n")
    imgs, wins = read_window_file("windows.txt", "imgs/")
    assert len(imgs) == 1 and [(w.label, w.x2) for w in wins] == [(1, 3), (0, 9)]


# -- geometry --------------------------------------------------------------------------------------


def test_hand_worked_context_pad_geometry():
    # window x 2..11, y 3..8 in a 20×16 image, crop 8, context_pad 2: context_scale 8/4 = 2,
    # center (7, 6), half sizes (5, 3) -> expanded x -3..17, y 0..12 (21×13); 3 columns cut
    # off on the left: scale_x 8/21, warp 18 columns to round(18·8/21 = 6.86) = 7, pad
    # round(3·8/21 = 1.14) = 1 on the left; rows 13 -> round(13·8/13) = 8
    g = warp_geometry((2, 3, 11, 8), (ROWS, COLS), CROP, 2, False, False)
    assert tuple(g) == (0, 0, 17, 12, 7, 8, 1, 0)
    g = warp_geometry((2, 3, 11, 8), (ROWS, COLS), CROP, 2, False, True)
    assert (g.pad_w, g.out_width) == (0, 7)  # mirrored: the padding moves to the right side


@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize(("crop_mode", "pad"), [("warp", 0), ("warp", 2), ("square", 0), ("square", 2), ("warp", 1)])
def test_each_item_matches_caffes_geometry(images, tmp_path, crop_mode, pad, mirror):
    boxes = BOXES + (CROSSING if pad or crop_mode == "square" else [])
    write_window_file(
        tmp_path / "windows.txt", [("a.png", (3, ROWS, COLS), [(k + 1, 1.0, *b) for k, b in enumerate(boxes)])]
    )
    tp = f"mirror: {str(mirror).lower()}"
    layer = make_layer(bs=len(boxes), wp=f'fg_fraction: 1 context_pad: {pad} crop_mode: "{crop_mode}"', tp=tp)
    fix_draws(layer, [(w, mirror) for w in layer.fg_windows])
    data, label = forward(layer)
    np.testing.assert_array_equal(label, np.arange(1, len(boxes) + 1, dtype=np.float32))
    for k, box in enumerate(boxes):
        expect = ref_item(images["a"], box, CROP, pad, crop_mode == "square", mirror)
        np.testing.assert_allclose(data[k], expect, rtol=0, atol=0, err_msg=f"window {box}")
    if pad:  # the cases cover Caffe's fit-in-crop_size trim of the warped size (mirrored or not)
        assert any(ref_geometry(b, ROWS, COLS, CROP, pad, crop_mode == "square", m)[4] for b in boxes for m in (0, 1))


def test_padding_is_zero_and_mirrored_padding_moves_right(images, tmp_path):
    write_window_file(tmp_path / "windows.txt", [("a.png", (3, ROWS, COLS), [(1, 1.0, 2, 3, 11, 8)])])
    layer = make_layer(bs=2, wp="fg_fraction: 1 context_pad: 2", tp="mirror: true")
    w = layer.fg_windows[0]
    fix_draws(layer, [(w, False), (w, True)])
    data, _ = forward(layer)
    assert not data[0, :, :, 0].any() and data[0, :, :, 1:].all()  # pad_w 1 on the left
    assert not data[1, :, :, 7].any() and data[1, :, :, :7].all()  # mirrored: on the right
    warped = cv2.resize(np.ascontiguousarray(images["a"][0:13, 0:18]), (7, 8), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(data[0, :, :, 1:], warped.transpose(2, 0, 1).astype(np.float32))
    np.testing.assert_array_equal(data[1, :, :, :7], warped[:, ::-1].transpose(2, 0, 1).astype(np.float32))


# -- mean, scale ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [0, 2])
def test_mean_file_offset_and_scale(images, tmp_path, pad):
    # a 3×12×10 mean: mean_off = (10 - 8) // 2 = 1, used for the rows too (Caffe's quirk)
    mean = np.random.default_rng(3).uniform(0, 255, (3, 12, 10)).astype(np.float32)
    write_blobproto(array_to_blob(mean[None]), tmp_path / "mean.binaryproto")
    boxes = BOXES + CROSSING[:1]
    write_window_file(
        tmp_path / "windows.txt", [("a.png", (3, ROWS, COLS), [(k + 1, 1.0, *b) for k, b in enumerate(boxes)])]
    )
    layer = make_layer(
        bs=len(boxes),
        wp=f"fg_fraction: 1 context_pad: {pad + 1} scale: 0.125",
        tp='mirror: true mean_file: "mean.binaryproto"',
    )
    drawn = [(w, k % 2 == 1) for k, w in enumerate(layer.fg_windows)]
    fix_draws(layer, drawn)
    data, _ = forward(layer)
    for k, box in enumerate(boxes):
        expect = ref_item(images["a"], box, CROP, pad + 1, False, k % 2 == 1, mean=mean, scale=0.125)
        np.testing.assert_allclose(data[k], expect, rtol=0, atol=0, err_msg=f"window {box}")


@pytest.mark.parametrize("values", [(10.5, 100.25, 200.0), (64.0,)])
def test_mean_value_and_scale(images, tmp_path, values):
    write_window_file(tmp_path / "windows.txt", [("b.png", (3, 12, 9), [(3, 0.7, 1, 2, 7, 10), (3, 0.2, 0, 0, 8, 11)])])
    tp = " ".join(f"mean_value: {v}" for v in values)
    layer = make_layer(bs=2, wp="fg_fraction: 0.5 context_pad: 1 scale: 0.5", tp=tp)
    fix_draws(layer, [(layer.bg_windows[0], False), (layer.fg_windows[0], False)])
    data, label = forward(layer)
    np.testing.assert_array_equal(label, [0, 3])
    mv = values * 3 if len(values) == 1 else values
    for k, box in enumerate([(0, 0, 8, 11), (1, 2, 7, 10)]):
        expect = ref_item(images["b"], box, CROP, 1, mean_values=mv, scale=0.5)
        np.testing.assert_allclose(data[k], expect, rtol=0, atol=0)


# -- sampling ------------------------------------------------------------------------------------


@pytest.fixture
def many_windows(images, tmp_path):
    """4 foreground windows (labels 1-4) and 3 background ones over both images."""
    write_window_file(
        tmp_path / "windows.txt",
        [
            ("a.png", (3, ROWS, COLS), [(1, 0.8, 3, 2, 12, 9), (2, 0.6, 0, 0, 7, 7), (7, 0.1, 5, 5, 15, 12)]),
            (
                "b.png",
                (3, 12, 9),
                [(3, 1, 1, 1, 6, 9), (4, 0.55, 0, 0, 8, 11), (0, 0, 2, 2, 5, 5), (9, 0.3, 0, 0, 3, 3)],
            ),
        ],
    )


def test_fg_bg_counts_per_batch_and_uniform_draws(many_windows):
    # batch 10, fg_fraction 0.25: int(2.5) = 2 foreground windows, after 8 background ones
    layer = make_layer(bs=10, tp="mirror: true", prefetch=2)
    for _ in range(3):
        _, label = forward(layer)
        assert not label[:8].any() and set(label[8:]) <= {1, 2, 3, 4}
    layer = make_layer(bs=10, tp="mirror: true")  # its draws alone (no prefetch thread drawing too)
    counts, mirrors, n = Counter(), 0, 2000
    for _ in range(n):
        for k, (w, m) in enumerate(layer._source.draw_batch()):
            assert (k >= 8) == (w.label > 0)
            counts[w.line] += 1
            mirrors += m
    fg = [counts[w.line] for w in layer.fg_windows]
    bg = [counts[w.line] for w in layer.bg_windows]
    assert sum(fg) == 2 * n and sum(bg) == 8 * n
    assert len(fg) == 4 and len(bg) == 3 and min(fg + bg) > 0  # every window is drawn
    assert max(abs(c / (2 * n / 4) - 1) for c in fg) < 0.1  # 2n draws over 4 windows, loose bound
    assert max(abs(c / (8 * n / 3) - 1) for c in bg) < 0.1
    assert abs(mirrors / (10 * n) - 0.5) < 0.02


def test_fg_fraction_edges(many_windows):
    assert make_layer(bs=7, wp="fg_fraction: 0").num_fg == 0
    assert make_layer(bs=7, wp="fg_fraction: 1").num_fg == 7
    assert make_layer(bs=10, wp="fg_fraction: 0.3").num_fg == 3


def test_set_random_seed_reproduces_batches_with_or_without_prefetch(many_windows):
    def run(seed, prefetch):
        caffe_compat.set_random_seed(seed)
        layer = make_layer(bs=6, wp="context_pad: 1", tp="mirror: true", prefetch=prefetch)
        return [forward(layer) for _ in range(4)]

    a, b, sync, other = run(5, 3), run(5, 3), run(5, 0), run(6, 3)
    for x, y, z in zip(a, b, sync):
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[0], z[0])
        np.testing.assert_array_equal(x[1], z[1])
    assert any(not np.array_equal(x[0], o[0]) for x, o in zip(a, other))


def test_shard_and_skip_keep_the_single_process_stream(many_windows):
    def layer():
        torch.manual_seed(9)
        return make_layer(bs=4, tp="mirror: true", prefetch=2)

    ref = layer()
    stream = [forward(ref) for _ in range(5)]
    sharded = layer()
    sharded.set_shard(1, 2)
    for k in (1, 3):
        np.testing.assert_array_equal(forward(sharded)[0], stream[k][0])
    skipped = layer()
    skipped.skip_batches(3)
    np.testing.assert_array_equal(forward(skipped)[0], stream[3][0])


def test_cache_images_gives_the_same_batches_and_reads_files_once(many_windows, tmp_path):
    def run(cache):
        torch.manual_seed(2)
        layer = make_layer(bs=6, wp=f"context_pad: 1 cache_images: {str(cache).lower()}", tp="mirror: true")
        return layer, [forward(layer) for _ in range(3)]

    _, plain = run(False)
    cached_layer, cached = run(True)
    for x, y in zip(plain, cached):
        np.testing.assert_array_equal(x[0], y[0])
    for p in (tmp_path / "imgs").iterdir():
        p.unlink()
    forward(cached_layer)  # the cache holds the images' bytes


def test_legacy_window_data_param_fields(many_windows, tmp_path):
    mean = np.full((3, 10, 10), 7, np.float32)
    write_blobproto(array_to_blob(mean[None]), tmp_path / "m.binaryproto")
    param = text_format.Parse(
        'name: "wd" type: "WindowData" top: "d" top: "l" data_param { prefetch: 0 } '
        'window_data_param { source: "windows.txt" root_folder: "imgs/" batch_size: 3 crop_size: 8 mirror: true '
        'mean_file: "m.binaryproto" }',
        caffe_pb2.LayerParameter(),
    )
    layer = layer_class("WindowData")(param, [], caffe_pb2.TRAIN)
    assert layer.top_shapes([]) == [(3, 3, 8, 8), (3,)] and layer.mirror and layer.mean is not None


# -- a net -----------------------------------------------------------------------------------------


def test_net_with_window_data_forward_backward(many_windows, tmp_path):
    (tmp_path / "net.prototxt").write_text(
        """
name: "rcnn_tiny"
layer { name: "data" type: "WindowData" top: "data" top: "label"
        window_data_param { source: "windows.txt" root_folder: "imgs/" batch_size: 8 fg_fraction: 0.5
                            context_pad: 1 crop_mode: "warp" }
        transform_param { crop_size: 8 mirror: true mean_value: 104 mean_value: 117 mean_value: 123 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""
    )
    caffe_compat.set_random_seed(0)
    net = caffe_compat.Net(str(tmp_path / "net.prototxt"), caffe_compat.TRAIN)
    assert net.blobs["data"].data.shape == (8, 3, 8, 8) and net.blobs["label"].data.shape == (8,)
    out = net.forward()
    labels = net.blobs["label"].data
    assert not labels[:4].any() and (labels[4:] > 0).all()
    assert np.isfinite(out["loss"]) and out["loss"] > 0
    net.backward()
    assert np.abs(net.params["conv1"][0].diff).sum() > 0 and np.abs(net.params["fc"][0].diff).sum() > 0


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", r"windows.txt: the window file is empty"),
        ("0 a.png 3 16 20 0\n", r"windows.txt:1: expected '#'"),
        ("# 1\na.png 3 16 20 0\n", r"windows.txt:1: image index 1 out of sequence"),
        ("# 0\na.png\n3\n16\n20\n1\n1 0.9 0 0 x 5\n", r"windows.txt:7: a window's x2 must be an integer, got 'x'"),
        ("# 0\na.png\n3\n16\n20\n2\n1 0.9 0 0 5 5\n", r"windows.txt:7: the window file ends inside image block 0"),
        ("# 0\na.png\n3\n16\n20\n1\n0 0.9 0 0 5 5\n", r"windows.txt:7: foreground window .* class_index 0"),
        ("# 0\na.png\n3\n16\n20\n1\n1 0.9 6 0 5 5\n", r"windows.txt:7: window \(6, 0, 5, 5\) has x2 < x1"),
        ("# 0\na.png\n3\n16\n20\n-1\n", r"windows.txt:6: num_windows must be >= 0"),
        ("# 0\nnope.png\n3\n16\n20\n1\n1 0.9 0 0 5 5\n", r"windows.txt:1: image file 'imgs/nope.png' not found"),
        ("# 0\na.png\n1\n16\n20\n1\n1 0.9 0 0 5 5\n", r"windows.txt:1: the last image lists 1 channels"),
        ("# 0\na.png\n3\n16\n20\n1\n1 0.2 0 0 5 5\n", r"no foreground window"),
        ("# 0\na.png\n3\n16\n20\n1\n1 0.9 0 0 5 5\n# 1 b.png 3 12 9 0\n# 2\n", r"windows.txt:9: the window file ends"),
    ],
)
def test_window_file_errors_name_file_and_line(images, tmp_path, text, match):
    (tmp_path / "windows.txt").write_text(text)
    with pytest.raises((DataError, LayerError), match=match):
        make_layer(bs=4, wp="fg_fraction: 0.5")


def test_missing_window_file(images):
    with pytest.raises(DataError, match="window_data_param.source 'windows.txt' not found"):
        make_layer()


def test_root_folder_without_slash_hint(images, tmp_path):
    write_window_file(tmp_path / "windows.txt", [("a.png", (3, ROWS, COLS), [(1, 1.0, 0, 0, 5, 5)])])
    param = text_format.Parse(
        'name: "wd" type: "WindowData" top: "d" top: "l" transform_param { crop_size: 8 } '
        'window_data_param { source: "windows.txt" root_folder: "imgs" batch_size: 1 fg_fraction: 1 }',
        caffe_pb2.LayerParameter(),
    )
    with pytest.raises(DataError, match="end it with '/'"):
        layer_class("WindowData")(param, [], caffe_pb2.TRAIN)


@pytest.mark.parametrize(
    ("wp", "tp", "match"),
    [
        ("", "", None),  # the valid baseline
        ("", "", "crop_size is required and must be positive"),
        ("", "mean_value: 1 mean_file: 'm.binaryproto'", "both mean_file and mean_value"),
        ("", "mean_value: 1 mean_value: 2", r"2 mean_value\(s\); give 1 or 3"),
        ('crop_mode: "squash"', "", 'crop_mode must be "warp" or "square"'),
        ("context_pad: 4", "", "need 2 \\* context_pad < crop_size"),
        ("fg_fraction: 1.5", "", r"fg_fraction must be in \[0, 1\]"),
        ("", "scale: 0.5", "transform_param.scale .* window_data_param.scale"),
        ("", "force_gray: true", "force_gray is not supported"),
        ("crop_size: 7", "", "window_data_param.crop_size .* disagree"),
        ("", "mean_file: 'small.binaryproto'", "mean_file 'small.binaryproto' is 3×6×6"),
    ],
)
def test_parameter_errors(many_windows, tmp_path, wp, tp, match):
    write_blobproto(array_to_blob(np.zeros((1, 3, 10, 10), np.float32)), tmp_path / "m.binaryproto")
    write_blobproto(array_to_blob(np.zeros((1, 3, 6, 6), np.float32)), tmp_path / "small.binaryproto")
    crop = 0 if "crop_size is required" in (match or "") else CROP
    if match is None:
        make_layer(wp=wp, tp=tp)
        return
    with pytest.raises((LayerError, DataError), match=match):
        make_layer(wp=wp, tp=tp, crop=crop)


def test_batch_size_and_source_required(many_windows):
    param = text_format.Parse(
        'name: "wd" type: "WindowData" top: "d" top: "l" transform_param { crop_size: 8 } '
        'window_data_param { source: "windows.txt" }',
        caffe_pb2.LayerParameter(),
    )
    with pytest.raises(LayerError, match="batch_size is required"):
        layer_class("WindowData")(param, [], caffe_pb2.TRAIN)
    param.window_data_param.batch_size = 2
    param.window_data_param.ClearField("source")
    with pytest.raises(LayerError, match="source .* is required"):
        layer_class("WindowData")(param, [], caffe_pb2.TRAIN)
    param.window_data_param.source = "windows.txt"
    del param.top[1]
    with pytest.raises(LayerError, match="exactly 2 top"):
        layer_class("WindowData")(param, [], caffe_pb2.TRAIN)


def test_window_outside_the_image_fails_at_its_batch_naming_the_line(images, tmp_path):
    write_window_file(tmp_path / "windows.txt", [("a.png", (3, ROWS, COLS), [(1, 1.0, 5, 5, COLS, 8)])])
    layer = make_layer(bs=1, wp="fg_fraction: 1")  # plain warp: the window must lie inside
    with pytest.raises(DataError, match=r"layer 'wd' \(WindowData\): windows.txt:7: window \(5, 5, 20, 8\) is not"):
        layer.forward()
    layer = make_layer(bs=1, wp="fg_fraction: 1 context_pad: 1")  # expanded and clipped: fine
    assert forward(layer)[0].any()


def test_undecodable_image_names_the_block(images, tmp_path):
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not a png")
    write_window_file(tmp_path / "windows.txt", [("bad.png", (3, 4, 4), [(1, 1.0, 0, 0, 2, 2)])])
    layer = make_layer(bs=1, wp="fg_fraction: 1")
    with pytest.raises(DataError, match=r"windows.txt:1: could not decode image 'imgs/bad.png'"):
        layer.forward()


def test_window_tuple_fields():
    assert Window._fields == ("image", "label", "overlap", "x1", "y1", "x2", "y2", "line")
