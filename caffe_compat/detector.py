"""pycaffe's ``caffe.Detector``: R-CNN style windowed detection, a ``Net`` that classifies
image windows (optionally with context padding).

Deliberate difference from pycaffe: ``detect_selective_search`` needs the external MATLAB
package ``selective_search_ijcv_with_python``; when it is not importable it raises
``CaffeError`` saying so (pycaffe raises ``ImportError``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

from caffe_compat import pycaffe_io
from caffe_compat.classifier import configured_transformer
from caffe_compat.errors import CaffeError
from caffe_compat.net import TEST, Net

__all__ = ["Detector"]


class Detector(Net):
    """Windowed detection: crop windows out of images, warp them to the net's input, classify.

    ``Detector(model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
    channel_swap=None, context_pad=None)``: preprocessing as ``Classifier`` (transpose (2, 0, 1)
    for the first input). ``context_pad`` (pixels of the input size) adds R-CNN's context around
    each window, padding outside the image with the mean.

    ``detect_windows([(image_filename, [(ymin, xmin, ymax, xmax), ...]), ...])`` returns one dict
    per window: ``{"window", "prediction", "filename"}``; the prediction is the first output's
    row for that window.
    """

    def __init__(
        self,
        model_file,
        pretrained_file=None,
        mean: np.ndarray | None = None,
        input_scale: float | None = None,
        raw_scale: float | None = None,
        channel_swap: Sequence[int] | None = None,
        context_pad: int | None = None,
    ):
        super().__init__(model_file, weights=pretrained_file, phase=TEST)
        self.transformer = configured_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows: Iterable[tuple[str, Sequence[Sequence[int]]]]) -> list[dict]:
        """Classify every window of every image; see the class docstring."""
        images_windows = [(f, [np.asarray(w) for w in ws]) for f, ws in images_windows]
        window_inputs = []
        for image_fname, windows in images_windows:
            image = pycaffe_io.load_image(image_fname).astype(np.float32)
            for window in windows:
                window_inputs.append(self.crop(image, window))
        if not window_inputs:
            return []
        in_ = self.inputs[0]
        caffe_in = np.zeros(
            (len(window_inputs), window_inputs[0].shape[2]) + tuple(self.blobs[in_].data.shape[2:]), dtype=np.float32
        )
        for ix, window_in in enumerate(window_inputs):
            caffe_in[ix] = self.transformer.preprocess(in_, window_in)
        out = self.forward_all(**{in_: caffe_in})
        predictions = out[self.outputs[0]]
        if predictions.ndim == 4 and predictions.shape[2:] == (1, 1):
            predictions = predictions[:, :, 0, 0]
        detections = []
        ix = 0
        for image_fname, windows in images_windows:
            for window in windows:
                detections.append({"window": window, "prediction": predictions[ix], "filename": image_fname})
                ix += 1
        return detections

    def detect_selective_search(self, image_fnames: Sequence[str]) -> list[dict]:
        """Detect over Selective Search proposals (needs ``selective_search_ijcv_with_python``)."""
        try:
            import selective_search_ijcv_with_python as selective_search  # type: ignore[import-not-found]
        except ImportError:
            raise CaffeError(
                "Detector.detect_selective_search is not supported here: it needs the external MATLAB-based "
                "package 'selective_search_ijcv_with_python' (github.com/sergeyk/selective_search_ijcv_with_python). "
                "Compute proposal windows yourself and call detect_windows([(filename, windows), ...])"
            ) from None
        image_fnames = [os.path.abspath(f) for f in image_fnames]
        windows_list = selective_search.get_windows(image_fnames)
        return self.detect_windows(zip(image_fnames, windows_list))

    def crop(self, im: np.ndarray, window: Sequence[int]) -> np.ndarray:
        """The window ``(ymin, xmin, ymax, xmax)`` of ``im`` (with context padding when configured)."""
        window = np.asarray(window)
        crop = im[int(window[0]) : int(window[2]), int(window[1]) : int(window[3])]
        if self.context_pad:
            box = window.astype(np.float64)
            crop_size = self.blobs[self.inputs[0]].shape[3]  # assumes square input, as pycaffe
            scale = crop_size / (1.0 * crop_size - self.context_pad * 2)
            half_h = (box[2] - box[0] + 1) / 2.0
            half_w = (box[3] - box[1] + 1) / 2.0
            center = (box[0] + half_h, box[1] + half_w)
            scaled_dims = scale * np.array((-half_h, -half_w, half_h, half_w))
            box = np.round(np.tile(center, 2) + scaled_dims)
            full_h = box[2] - box[0] + 1
            full_w = box[3] - box[1] + 1
            scale_h = crop_size / full_h
            scale_w = crop_size / full_w
            pad_y = int(round(max(0, -box[0]) * scale_h))
            pad_x = int(round(max(0, -box[1]) * scale_w))
            im_h, im_w = im.shape[:2]
            box = np.clip(box, 0.0, [im_h, im_w, im_h, im_w])
            clip_h = box[2] - box[0] + 1
            clip_w = box[3] - box[1] + 1
            if not (clip_h > 0 and clip_w > 0):
                raise ValueError(f"Detector.crop: window {window.tolist()} lies outside the {im_h}x{im_w} image")
            crop_h = int(round(clip_h * scale_h))
            crop_w = int(round(clip_w * scale_w))
            if pad_y + crop_h > crop_size:
                crop_h = crop_size - pad_y
            if pad_x + crop_w > crop_size:
                crop_w = crop_size - pad_x
            b = box.astype(int)
            context_crop = im[b[0] : b[2], b[1] : b[3]]
            context_crop = pycaffe_io.resize_image(context_crop, (crop_h, crop_w))
            crop = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
            crop[pad_y : pad_y + crop_h, pad_x : pad_x + crop_w] = context_crop
        return crop

    def configure_crop(self, context_pad: int | None) -> None:
        """Set the crop size (the input's H x W x K) and the mean used to pad context crops."""
        in_ = self.inputs[0]
        tpose = self.transformer.transpose[in_]
        inv_tpose = [tpose[t] for t in tpose]
        self.crop_dims = np.array(self.blobs[in_].data.shape[1:])[inv_tpose]
        self.context_pad = context_pad
        if self.context_pad:
            transpose = self.transformer.transpose.get(in_)
            channel_order = self.transformer.channel_swap.get(in_)
            raw_scale = self.transformer.raw_scale.get(in_)
            mean = self.transformer.mean.get(in_)
            if mean is not None:
                inv_transpose = [transpose[t] for t in transpose]
                crop_mean = np.array(mean, dtype=np.float32).transpose(inv_transpose)
                if channel_order is not None:
                    order = list(channel_order)
                    crop_mean = crop_mean[:, :, [order.index(i) for i in range(crop_mean.shape[2])]]
                if raw_scale is not None:
                    crop_mean /= raw_scale
                self.crop_mean = crop_mean
            else:
                self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
