"""Numbers as Caffe's logs print them (shared by the net's debug_info and the solvers' logs)."""

from __future__ import annotations

import numpy as np

__all__ = ["fmt"]


def fmt(x) -> str:
    """A number as C++'s ``ostream << x`` prints it (precision 6, like ``%g``)."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    return format(float(x), "g")
