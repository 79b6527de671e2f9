"""pycaffe's view of a net's layers: ``net.layers[i]`` / ``net.layer_dict[name]``.

In pycaffe a layer's ``blobs`` are the same ``Blob`` objects as ``net.params[name]`` (with
``.data``/``.diff`` arrays), not tensors. ``LayerView`` wraps the ``Layer`` module: ``blobs`` is
that list of ``ParamBlob``s; every other attribute (``type``, ``name``, ``param``, ``phase``, the
module's methods) is the layer's own, read and written through the view.
"""

from __future__ import annotations

__all__ = ["LayerView"]


class LayerView:
    """One layer as pycaffe shows it (see the module's doc). ``module`` is the ``Layer``."""

    __slots__ = ("module", "_blobs")

    def __init__(self, module, blobs):
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "_blobs", blobs)

    @property
    def blobs(self) -> list:
        """The layer's learnable blobs as pycaffe's BlobVec: ``Blob``s with ``data``/``diff``."""
        return self._blobs()

    def __getattr__(self, name: str):
        if name in LayerView.__slots__ or name.startswith("__"):
            raise AttributeError(name)  # an unset slot (copy/pickle build the object empty first)
        return getattr(self.module, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.module, name, value)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __eq__(self, other) -> bool:
        return self.module is (other.module if isinstance(other, LayerView) else other)

    def __hash__(self) -> int:
        return hash(self.module)

    def __repr__(self) -> str:
        return f"<caffe layer {self.module.name!r} ({self.module.type})>"
