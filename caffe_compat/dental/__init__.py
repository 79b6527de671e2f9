"""The dental landmark reproduction (docs/paper.md): synthetic radiographs (``generator``), the
user's data format, half-images and HDF5 files (``dataset``), the nets and solvers (``nets``),
the error in mm and Table II (``evaluate``), figures (``figures``) and the whole run
(``pipeline.run_reproduction``)."""

from __future__ import annotations

__all__ = ["dataset", "evaluate", "figures", "generator", "nets", "pipeline"]
