"""pycaffe's caffe.io: datum/blobproto conversions, image loading, resizing, oversampling and the
Transformer, each checked against NumPy written here."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from caffe_compat import pycaffe_io as cio
from caffe_compat.errors import DataError, FormatError
from caffe_compat.proto import caffe_pb2

# ---------------------------------------------------------------------------------------------
# datum / blobproto


def test_datum_roundtrip_uint8_and_float():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    d = cio.array_to_datum(u8, label=7)
    assert (d.channels, d.height, d.width, d.label) == (3, 4, 5, 7)
    assert len(d.data) == 60 and len(d.float_data) == 0
    back = cio.datum_to_array(caffe_pb2.Datum.FromString(d.SerializeToString()))
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, u8)

    f = rng.standard_normal((2, 3, 1)).astype(np.float32)
    d = cio.array_to_datum(f)
    assert not d.HasField("label") and len(d.data) == 0
    back = cio.datum_to_array(d)
    assert back.dtype == np.float64
    np.testing.assert_allclose(back, f, rtol=0, atol=0)


def test_datum_errors_and_encoded():
    with pytest.raises(ValueError, match="3-D"):
        cio.array_to_datum(np.zeros((2, 2)))
    d = caffe_pb2.Datum(channels=1, height=2, width=2, data=b"abc")
    with pytest.raises(DataError, match="needs 4 bytes"):
        cio.datum_to_array(d)
    img = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    ok, png = cv2.imencode(".png", img)
    assert ok
    enc = caffe_pb2.Datum(channels=3, height=2, width=4, data=png.tobytes(), encoded=True)
    np.testing.assert_array_equal(cio.datum_to_array(enc), img.transpose(2, 0, 1))


def test_blobproto_roundtrip_nd_and_diff():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 3, 4)).astype(np.float32)
    g = rng.standard_normal((2, 3, 4)).astype(np.float32)
    blob = cio.array_to_blobproto(a, g)
    assert list(blob.shape.dim) == [2, 3, 4] and not blob.HasField("num")
    blob = caffe_pb2.BlobProto.FromString(blob.SerializeToString())
    data = cio.blobproto_to_array(blob)
    assert data.dtype == np.float64 and data.shape == (2, 3, 4)
    np.testing.assert_array_equal(data, a)
    np.testing.assert_array_equal(cio.blobproto_to_array(blob, return_diff=True), g)
    # 0-d, 1-d
    np.testing.assert_array_equal(cio.blobproto_to_array(cio.array_to_blobproto(np.float32(2.5))), 2.5)
    np.testing.assert_array_equal(cio.blobproto_to_array(cio.array_to_blobproto(np.arange(3.0))), [0, 1, 2])


def test_blobproto_legacy_dims_and_errors():
    legacy = caffe_pb2.BlobProto(num=1, channels=2, height=1, width=3, data=[1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(cio.blobproto_to_array(legacy), np.arange(1, 7).reshape(1, 2, 1, 3))
    with pytest.raises(FormatError, match="needs 6 values but 'diff' holds 0"):
        cio.blobproto_to_array(legacy, return_diff=True)


def test_blobprotovector_roundtrip():
    arrays = [np.arange(6, dtype=np.float32).reshape(1, 2, 3), np.ones((4,), np.float32) * 0.5]
    s = cio.arraylist_to_blobprotovector_str(arrays)
    assert isinstance(s, bytes)
    back = cio.blobprotovector_str_to_arraylist(s)
    assert [b.shape for b in back] == [(1, 2, 3), (4,)]
    for x, y in zip(arrays, back):
        np.testing.assert_array_equal(x, y)
    assert cio.arraylist_to_blobprotovecor_str is cio.arraylist_to_blobprotovector_str


# ---------------------------------------------------------------------------------------------
# load_image


def test_load_image_rgb_gray_rgba_16bit(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), rgb[:, :, ::-1])  # OpenCV writes BGR
    im = cio.load_image(str(tmp_path / "c.png"))
    assert im.dtype == np.float32 and im.shape == (5, 7, 3)
    np.testing.assert_allclose(im, rgb / 255.0, rtol=0, atol=1e-7)
    grey = cio.load_image(str(tmp_path / "c.png"), color=False)
    expect = (rgb / 255.0) @ np.array([0.2125, 0.7154, 0.0721])
    assert grey.shape == (5, 7, 1)
    np.testing.assert_allclose(grey[:, :, 0], expect, rtol=0, atol=1e-6)

    g = rng.integers(0, 256, size=(4, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), g)
    im = cio.load_image(str(tmp_path / "g.png"))
    assert im.shape == (4, 3, 3)
    np.testing.assert_allclose(im, np.repeat((g / 255.0)[:, :, None], 3, axis=2), rtol=0, atol=1e-7)
    im = cio.load_image(str(tmp_path / "g.png"), color=False)
    assert im.shape == (4, 3, 1)
    np.testing.assert_allclose(im[:, :, 0], g / 255.0, rtol=0, atol=1e-7)

    rgba = rng.integers(0, 256, size=(3, 3, 4), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), rgba[:, :, [2, 1, 0, 3]])
    im = cio.load_image(str(tmp_path / "a.png"))
    np.testing.assert_allclose(im, rgba[:, :, :3] / 255.0, rtol=0, atol=1e-7)

    g16 = rng.integers(0, 65536, size=(2, 2), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), g16)
    im = cio.load_image(str(tmp_path / "g16.png"), color=False)
    np.testing.assert_allclose(im[:, :, 0], g16 / 65535.0, rtol=1e-6, atol=1e-7)


def test_load_image_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match="nope.jpg"):
        cio.load_image(str(tmp_path / "nope.jpg"))


# ---------------------------------------------------------------------------------------------
# resize_image


def _bilinear_ref(im: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pixel-centre aligned bilinear interpolation with replicated edges, in float64."""

    def coords(n_out, n_in):
        x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        x = np.clip(x, 0, n_in - 1)
        x0 = np.floor(x).astype(int)
        x1 = np.minimum(x0 + 1, n_in - 1)
        return x0, x1, x - x0

    y0, y1, wy = coords(h, im.shape[0])
    x0, x1, wx = coords(w, im.shape[1])
    im = im.astype(np.float64)
    top = im[y0][:, x0] * (1 - wx)[None, :, None] + im[y0][:, x1] * wx[None, :, None]
    bot = im[y1][:, x0] * (1 - wx)[None, :, None] + im[y1][:, x1] * wx[None, :, None]
    return top * (1 - wy)[:, None, None] + bot * wy[:, None, None]


@pytest.mark.parametrize("channels", [1, 3, 6])
def test_resize_image_bilinear(channels):
    rng = np.random.default_rng(3)
    im = rng.random((4, 5, channels)).astype(np.float32)
    out = cio.resize_image(im, (8, 10))
    assert out.shape == (8, 10, channels) and out.dtype == np.float32
    np.testing.assert_allclose(out, _bilinear_ref(im, 8, 10), rtol=1e-5, atol=1e-6)


def test_resize_image_special_cases():
    rng = np.random.default_rng(4)
    im = rng.random((4, 4, 3)).astype(np.float64)
    same = cio.resize_image(im, (4, 4))
    assert same.dtype == np.float32
    np.testing.assert_array_equal(same, im.astype(np.float32))
    const = np.full((3, 3, 2), 0.25)
    np.testing.assert_array_equal(cio.resize_image(const, (5, 7)), np.full((5, 7, 2), 0.25, np.float32))
    nearest = cio.resize_image(np.arange(4.0).reshape(2, 2, 1), (4, 4), interp_order=0)
    np.testing.assert_array_equal(nearest[:, :, 0], np.kron(np.arange(4.0).reshape(2, 2), np.ones((2, 2))))
    with pytest.raises(ValueError, match="interp_order 2"):
        cio.resize_image(im, (2, 2), interp_order=2)


# ---------------------------------------------------------------------------------------------
# oversample


def test_oversample_crops_and_order():
    rng = np.random.default_rng(5)
    images = [rng.random((7, 9, 2)).astype(np.float32) for _ in range(2)]
    ch, cw = 4, 5
    crops = cio.oversample(images, (ch, cw))
    assert crops.shape == (20, 4, 5, 2)
    for n, im in enumerate(images):
        # corners, then the centre (7/2 - 2 = 1.5 -> 1; 9/2 - 2.5 = 2), then the mirrors
        expect = [im[0:4, 0:5], im[0:4, 4:9], im[3:7, 0:5], im[3:7, 4:9], im[1:5, 2:7]]
        for k, e in enumerate(expect):
            np.testing.assert_array_equal(crops[10 * n + k], e)
            np.testing.assert_array_equal(crops[10 * n + 5 + k], e[:, ::-1])


# ---------------------------------------------------------------------------------------------
# Transformer


def _transformer():
    t = cio.Transformer({"data": (1, 3, 4, 5)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255.0)
    t.set_input_scale("data", 0.5)
    return t


def test_transformer_preprocess_matches_numpy():
    rng = np.random.default_rng(6)
    img = rng.random((4, 5, 3)).astype(np.float32)  # H x W x RGB in [0, 1]
    mean = np.array([104.0, 117.0, 123.0])
    t = _transformer()
    t.set_mean("data", mean)
    out = t.preprocess("data", img)
    expect = (img.transpose(2, 0, 1)[::-1] * 255.0 - mean[:, None, None]) * 0.5
    assert out.dtype == np.float32 and out.shape == (3, 4, 5)
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-4)
    # the input is not modified (pycaffe's can be, when only transpose and scales apply)
    before = img.copy()
    t2 = cio.Transformer({"data": (1, 3, 4, 5)})
    t2.set_transpose("data", (2, 0, 1))
    t2.set_raw_scale("data", 255.0)
    np.testing.assert_allclose(t2.preprocess("data", img), before.transpose(2, 0, 1) * 255.0, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(img, before)

    # elementwise mean, and deprocess undoes everything
    emean = rng.random((3, 4, 5)) * 100
    t = _transformer()
    t.set_mean("data", emean)
    out = t.preprocess("data", img)
    np.testing.assert_allclose(out, (img.transpose(2, 0, 1)[::-1] * 255.0 - emean) * 0.5, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(t.deprocess("data", out[None]), img, rtol=1e-5, atol=1e-5)


def test_transformer_resizes_to_input_size_first():
    rng = np.random.default_rng(7)
    img = rng.random((2, 3, 3)).astype(np.float32)
    t = cio.Transformer({"data": (1, 3, 4, 5)})
    t.set_transpose("data", (2, 0, 1))
    out = t.preprocess("data", img)
    np.testing.assert_allclose(out, cio.resize_image(img, (4, 5)).transpose(2, 0, 1), rtol=0, atol=0)
    # without a transpose the (resized) data stays H x W x K
    t = cio.Transformer({"data": (1, 3, 4, 5)})
    assert t.preprocess("data", rng.random((2, 2, 3))).shape == (4, 5, 3)


def test_transformer_checks():
    t = cio.Transformer({"data": (1, 3, 4, 5)})
    with pytest.raises(ValueError, match="'label' is not one of the net inputs"):
        t.preprocess("label", np.zeros((4, 5, 3)))
    with pytest.raises(ValueError, match="needs 3 axes"):
        t.set_transpose("data", (1, 0))
    with pytest.raises(ValueError, match="one entry per input channel"):
        t.set_channel_swap("data", (1, 0))
    with pytest.raises(ValueError, match="mean channels 4 incompatible"):
        t.set_mean("data", np.zeros(4))
    with pytest.raises(ValueError, match="mean channels 2 incompatible"):
        t.set_mean("data", np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="invalid"):
        t.set_mean("data", np.zeros((1, 3, 4, 5)))
    t1 = cio.Transformer({"data": [1, 1, 4, 5]})  # lists work as shapes too
    t1.set_transpose("data", (2, 0, 1))
    t1.set_mean("data", np.ones((4, 5)))
    np.testing.assert_allclose(t1.preprocess("data", np.ones((4, 5, 1))), np.zeros((1, 4, 5)), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# pycaffe drop-in details (BVLC master python/caffe/io.py)


def _pycaffe_blobproto_to_array(blob, return_diff=False):
    """BVLC's io.py blobproto_to_array, as NumPy runs it (the reference)."""
    data = np.array(blob.diff if return_diff else blob.data)
    if blob.HasField("num") or blob.HasField("channels") or blob.HasField("height") or blob.HasField("width"):
        return data.reshape(blob.num, blob.channels, blob.height, blob.width)
    return data.reshape(blob.shape.dim)


@pytest.mark.parametrize(
    "blob",
    [
        caffe_pb2.BlobProto(data=[1.0, 2.0, 3.0]),  # no shape, several values
        caffe_pb2.BlobProto(),  # no shape, no values
        caffe_pb2.BlobProto(data=[2.5]),  # no shape, one value: a 0-d array
        caffe_pb2.BlobProto(num=1, channels=2, height=1, width=1, data=[1.0]),
        caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[2, 2]), data=[1.0, 2.0, 3.0]),
    ],
)
def test_blobproto_to_array_raises_value_error_where_pycaffe_does(blob):
    try:
        expected = _pycaffe_blobproto_to_array(blob)
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(ValueError):
            cio.blobproto_to_array(blob)
        with pytest.raises(FormatError):  # and still caffe_compat's own kind
            cio.blobproto_to_array(blob)
    else:
        got = cio.blobproto_to_array(blob)
        assert got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_load_image_reads_a_binary_file_object(tmp_path):
    """skimage.io.imread (pycaffe's reader) takes file objects: nsfw's classifier calls
    caffe.io.load_image(BytesIO(jpeg_bytes))."""
    import io

    rng = np.random.default_rng(11)
    rgb = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", rgb[:, :, ::-1])  # OpenCV encodes BGR
    assert ok
    im = cio.load_image(io.BytesIO(png.tobytes()))
    assert im.dtype == np.float32 and im.shape == (6, 5, 3)
    np.testing.assert_allclose(im, rgb / 255.0, rtol=0, atol=1e-7)
    grey = cio.load_image(io.BytesIO(png.tobytes()), color=False)
    np.testing.assert_allclose(grey[:, :, 0], (rgb / 255.0) @ np.array([0.2125, 0.7154, 0.0721]), rtol=0, atol=1e-6)
    # a JPEG: the same pixels as reading the file by name (one decoder)
    ok, jpg = cv2.imencode(".jpg", rgb[:, :, ::-1])
    path = tmp_path / "x.jpg"
    path.write_bytes(jpg.tobytes())
    with open(path, "rb") as f:
        np.testing.assert_array_equal(cio.load_image(f), cio.load_image(str(path)))
    with open(path) as f, pytest.raises(TypeError, match="binary mode"):
        cio.load_image(f)
    with pytest.raises(DataError, match="file object"):
        cio.load_image(io.BytesIO(b"not an image"))


def test_set_mean_resizes_an_elementwise_mean_of_another_size():
    """BVLC master's Transformer.set_mean resizes a (K, H', W') mean to the input's H x W
    (python/classify.py passes the 256 x 256 ImageNet mean for a 227 x 227 input). A mean
    that is a plane in (y, x) resized bilinearly (pixel centres aligned) is the plane sampled at
    the source coordinates of the output pixels."""
    K, Hm, Wm, H, W = 3, 16, 12, 7, 5
    a = np.array([100.0, 120.0, 90.0])
    yy, xx = np.meshgrid(np.arange(Hm), np.arange(Wm), indexing="ij")
    mean = (a[:, None, None] + 2.0 * yy + 0.5 * xx).astype(np.float32)
    t = cio.Transformer({"data": (1, K, H, W)})
    t.set_transpose("data", (2, 0, 1))
    t.set_raw_scale("data", 255.0)
    t.set_mean("data", mean)
    ys = (np.arange(H) + 0.5) * Hm / H - 0.5  # inside [0, Hm - 1]: no edge clamping
    xs = (np.arange(W) + 0.5) * Wm / W - 0.5
    expect = a[:, None, None] + 2.0 * ys[None, :, None] + 0.5 * xs[None, None, :]
    assert t.mean["data"].shape == (K, H, W)
    np.testing.assert_allclose(t.mean["data"], expect, rtol=1e-5, atol=1e-3)
    img = np.random.default_rng(5).random((H, W, K)).astype(np.float32)
    np.testing.assert_allclose(t.preprocess("data", img), img.transpose(2, 0, 1) * 255.0 - expect, rtol=1e-5, atol=1e-3)
    # an (H', W') mean: one channel, resized the same way, subtracted from every channel
    t2 = cio.Transformer({"data": (1, K, H, W)})
    t2.set_mean("data", mean[1])
    np.testing.assert_allclose(t2.mean["data"], expect[1], rtol=1e-5, atol=1e-3)
