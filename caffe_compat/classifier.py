"""pycaffe's ``caffe.Classifier``: a ``Net`` that classifies images (resize, crop or oversample,
preprocess, forward, average).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from caffe_compat import pycaffe_io
from caffe_compat.net import TEST, Net

__all__ = ["Classifier", "configured_transformer"]


def configured_transformer(net: Net, mean=None, input_scale=None, raw_scale=None, channel_swap=None):
    """The Transformer pycaffe's Classifier and Detector set up for the net's first input:
    transpose (2, 0, 1), then the optional mean, input scale, raw scale and channel swap."""
    in_ = net.inputs[0]
    t = pycaffe_io.Transformer({in_: net.blobs[in_].data.shape})
    t.set_transpose(in_, (2, 0, 1))
    if mean is not None:
        t.set_mean(in_, mean)
    if input_scale is not None:
        t.set_input_scale(in_, input_scale)
    if raw_scale is not None:
        t.set_raw_scale(in_, raw_scale)
    if channel_swap is not None:
        t.set_channel_swap(in_, channel_swap)
    return t


class Classifier(Net):
    """pycaffe's image classifier: a TEST-phase ``Net`` with input preprocessing.

    ``Classifier(model_file, pretrained_file, image_dims=None, mean=None, input_scale=None,
    raw_scale=None, channel_swap=None)``: ``image_dims`` (H, W) is the size images are resized
    to before cropping (default: the input blob's size, i.e. no crop). ``mean``,
    ``input_scale``, ``raw_scale``, ``channel_swap`` configure ``self.transformer``
    (``caffe_compat.io.Transformer``) for the first input, whose transpose is (2, 0, 1).

    ``predict(inputs, oversample=True)``: ``inputs`` are ``H x W x K`` images; each is resized
    to ``image_dims``, then either cut into pycaffe's 10 crops (corners, centre, mirrors) whose
    predictions are averaged, or centre-cropped; returns the first output, ``N x classes``.
    """

    def __init__(
        self,
        model_file,
        pretrained_file=None,
        image_dims: Sequence[int] | None = None,
        mean: np.ndarray | None = None,
        input_scale: float | None = None,
        raw_scale: float | None = None,
        channel_swap: Sequence[int] | None = None,
    ):
        super().__init__(model_file, weights=pretrained_file, phase=TEST)
        in_ = self.inputs[0]
        self.transformer = configured_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.crop_dims = np.array(self.blobs[in_].data.shape[2:])
        if image_dims is None or len(image_dims) == 0:
            image_dims = self.crop_dims
        self.image_dims = np.array(image_dims, dtype=int)

    def predict(self, inputs: Sequence[np.ndarray], oversample: bool = True) -> np.ndarray:
        """Class scores (the first output) of ``H x W x K`` images, ``N x C``."""
        input_ = np.zeros((len(inputs), self.image_dims[0], self.image_dims[1], inputs[0].shape[2]), dtype=np.float32)
        for ix, im in enumerate(inputs):
            input_[ix] = pycaffe_io.resize_image(im, self.image_dims)
        if oversample:
            input_ = pycaffe_io.oversample(input_, self.crop_dims)
        else:
            center = np.array(self.image_dims) / 2.0
            crop = np.tile(center, (1, 2))[0] + np.concatenate([-self.crop_dims / 2.0, self.crop_dims / 2.0])
            crop = crop.astype(int)
            input_ = input_[:, crop[0] : crop[2], crop[1] : crop[3], :]
        in_ = self.inputs[0]
        caffe_in = np.zeros(np.array(input_.shape)[[0, 3, 1, 2]], dtype=np.float32)
        for ix, im in enumerate(input_):
            caffe_in[ix] = self.transformer.preprocess(in_, im)
        out = self.forward_all(**{in_: caffe_in})
        predictions = out[self.outputs[0]]
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(1)
        return predictions
