"""Caffe's weight fillers (BVLC/caffe include/caffe/filler.hpp), with Caffe's defaults.

``fill(tensor, filler_param)`` fills ``tensor`` in place from a ``FillerParameter`` and returns
it. Random fillers draw from torch's global generator, so ``torch.manual_seed`` (or
``caffe_compat.set_random_seed``) makes them reproducible. Caffe draws from boost's mt19937: the
values match Caffe's in distribution, never bit for bit.

Fans, as Caffe computes them for a blob of shape ``(d0, d1, ...)`` with ``count`` elements:
``fan_in = count / d0`` and ``fan_out = count / d1`` (``count`` for a 1-D blob). For a
Convolution weight ``(O, C/g, kh, kw)`` that is ``fan_in = C/g·kh·kw``, ``fan_out = O·kh·kw``;
for InnerProduct ``(N, K)``: ``fan_in = K``, ``fan_out = N``. ``variance_norm`` picks
``n = fan_in`` (FAN_IN, the default), ``fan_out`` (FAN_OUT) or ``(fan_in + fan_out) / 2``
(AVERAGE).

=================== ===========================================================================
type                values
=================== ===========================================================================
constant (default)  ``value`` (0)
uniform             U[``min``, ``max``) (0, 1)
gaussian            N(``mean``, ``std``) (0, 1); with ``sparse`` >= 0 each weight is kept with
                    probability ``sparse / d0`` and zeroed otherwise
xavier              U[-sqrt(3/n), +sqrt(3/n))
msra                N(0, sqrt(2/n))
bilinear            4-D square kernels ``K``: ``f = ceil(K/2)``, ``c = (K-1)/(2f)``,
                    ``w[.., y, x] = (1 - |x/f - c|)(1 - |y/f - c|)`` (upsampling Deconvolution)
positive_unitball   U[0, 1) then each of the ``d0`` rows divided by its sum
=================== ===========================================================================

Like Caffe, ``sparse`` is refused by every filler but gaussian, and gaussian refuses ``std <= 0``
and uniform ``min > max`` (Caffe's ``caffe_rng_*`` CHECKs).
"""

from __future__ import annotations

import math

import torch

from caffe_compat.errors import LayerError
from caffe_compat.proto import caffe_pb2

__all__ = ["fill", "FILLER_TYPES", "fans"]

_VN = caffe_pb2.FillerParameter


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """Caffe's ``(fan_in, fan_out)`` for a blob of this shape."""
    count = math.prod(shape)
    if len(shape) == 0:
        raise LayerError("filler: a 0-d blob has no fan-in/fan-out (xavier/msra need shape[0])")
    fan_in = count // shape[0] if shape[0] else 0
    fan_out = (count // shape[1] if shape[1] else 0) if len(shape) > 1 else count
    return fan_in, fan_out


def _fan_n(shape: tuple[int, ...], fp, kind: str) -> float:
    fan_in, fan_out = fans(shape)
    vn = fp.variance_norm
    if vn == _VN.FAN_IN:
        n = float(fan_in)
    elif vn == _VN.FAN_OUT:
        n = float(fan_out)
    elif vn == _VN.AVERAGE:
        n = (fan_in + fan_out) / 2.0
    else:  # pragma: no cover - the proto enum has no other values
        raise LayerError(f"{kind} filler: unknown variance_norm {vn}")
    if n <= 0:
        raise LayerError(f"{kind} filler: blob of shape {tuple(shape)} has a zero fan; cannot scale by it")
    return n


def _no_sparse(fp, kind: str) -> None:
    if fp.sparse != -1:
        raise LayerError(
            f"{kind} filler: 'sparse: {fp.sparse}' is supported only by the gaussian filler (remove the field)"
        )


def _constant(t: torch.Tensor, fp) -> None:
    _no_sparse(fp, "constant")
    t.fill_(fp.value)


def _uniform(t: torch.Tensor, fp) -> None:
    _no_sparse(fp, "uniform")
    if fp.min > fp.max:
        raise LayerError(f"uniform filler: min ({fp.min}) must not exceed max ({fp.max})")
    t.uniform_(fp.min, fp.max)


def _gaussian(t: torch.Tensor, fp) -> None:
    if not fp.std > 0:
        raise LayerError(f"gaussian filler: std must be > 0, got {fp.std}")
    t.normal_(fp.mean, fp.std)
    if fp.sparse >= 0:
        if t.dim() < 1:
            raise LayerError("gaussian filler: 'sparse' needs a blob with at least one axis")
        p = fp.sparse / t.shape[0] if t.shape[0] else 0.0
        if p > 1.0:
            raise LayerError(
                f"gaussian filler: sparse ({fp.sparse}) exceeds the blob's first dimension "
                f"({t.shape[0]}); the keep probability sparse/shape[0] must be <= 1"
            )
        t.mul_(torch.empty_like(t).bernoulli_(p))


def _xavier(t: torch.Tensor, fp) -> None:
    _no_sparse(fp, "xavier")
    scale = math.sqrt(3.0 / _fan_n(tuple(t.shape), fp, "xavier"))
    t.uniform_(-scale, scale)


def _msra(t: torch.Tensor, fp) -> None:
    _no_sparse(fp, "msra")
    std = math.sqrt(2.0 / _fan_n(tuple(t.shape), fp, "msra"))
    t.normal_(0.0, std)


def _bilinear(t: torch.Tensor, fp) -> None:
    _no_sparse(fp, "bilinear")
    if t.dim() != 4:
        raise LayerError(f"bilinear filler: the blob must be 4-D, got shape {tuple(t.shape)}")
    kh, kw = t.shape[2], t.shape[3]
    if kh != kw:
        raise LayerError(f"bilinear filler: the kernel must be square, got {kh}x{kw}")
    f = math.ceil(kw / 2.0)
    c = (kw - 1) / (2.0 * f)
    r = 1.0 - (torch.arange(kw, dtype=torch.float64) / f - c).abs()
    t.copy_((r[:, None] * r[None, :]).to(t.dtype).expand_as(t))


def _positive_unitball(t: torch.Tensor, fp) -> None:
    _no_sparse(fp, "positive_unitball")
    if t.dim() < 1 or t.numel() == 0:
        raise LayerError(f"positive_unitball filler: needs a non-empty blob, got shape {tuple(t.shape)}")
    t.uniform_(0.0, 1.0)
    rows = t.view(t.shape[0], -1)
    rows.div_(rows.sum(dim=1, keepdim=True))


FILLER_TYPES = {
    "constant": _constant,
    "uniform": _uniform,
    "gaussian": _gaussian,
    "xavier": _xavier,
    "msra": _msra,
    "bilinear": _bilinear,
    "positive_unitball": _positive_unitball,
}


def fill(tensor: torch.Tensor, filler_param) -> torch.Tensor:
    """Fill ``tensor`` in place as Caffe's filler ``filler_param`` would, and return it.

    ``filler_param`` is a ``caffe_pb2.FillerParameter`` (an unset one is Caffe's default:
    constant 0). Raises ``LayerError`` for an unknown type or invalid settings.
    """
    kind = filler_param.type
    try:
        fn = FILLER_TYPES[kind]
    except KeyError:
        raise LayerError(f"Unknown filler type {kind!r}; known types: {', '.join(sorted(FILLER_TYPES))}") from None
    with torch.no_grad():
        if not tensor.is_contiguous():
            raise LayerError("fill(): the tensor must be contiguous")
        fn(tensor, filler_param)
    return tensor
