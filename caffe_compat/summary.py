"""A net's summary: per layer its bottoms and tops, top shapes, parameter count and FLOPs.

    rows = summarize(net)            # list of LayerSummary, in the net's layer order
    print(format_summary(rows))      # a text table with totals

FLOPs are for one forward pass at the net's current input shapes, as each layer class declares
them (``Layer.flops``; one FLOP per top value unless the class overrides it):

- Convolution: ``2 · top_count · (C/group) · Πkernel`` (multiply-adds × 2; the bias is not
  counted); Deconvolution: ``2 · bottom_count · (num_output/group) · Πkernel``; InnerProduct:
  ``2 · M · K · N`` (M rows of K inputs, N outputs).
- Others are estimates, one FLOP per elementary operation: Pooling ``top_count · kh · kw``;
  LRN ``count · (local_size + 3)`` (WITHIN_CHANNEL ``count · (local_size² + 3)``); BatchNorm
  ``2 · count``; Scale ``count`` (+ ``count`` with a bias); Eltwise ``(bottoms − 1) · count``
  (+ ``count`` per coefficient ≠ 1); Softmax ``3 · count``; neuron layers ``count``; LSTM / RNN
  their products (input, recurrent, RNN's output transform) plus ~10·H (LSTM) per row; SPP one
  read of the bottom per level; blob plumbing (``Layer.moves_data_only``: Split, Concat, Slice,
  Reshape, Flatten, Crop, Tile, Silence, Input, Parameter, DummyData, Im2col, Filter,
  BatchReindex) and TEST Dropout 0. The forks' depthwise convolutions count as Convolution.

Parameters are counted once per blob: a blob shared through ``ParamSpec.name`` counts at its
first owner only.
"""

from __future__ import annotations

import dataclasses

__all__ = ["LayerSummary", "summarize", "format_summary", "totals", "human"]


@dataclasses.dataclass
class LayerSummary:
    """One row of the summary."""

    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    top_shapes: list[tuple[int, ...]]
    params: int
    flops: int


def summarize(net, *, splits: bool = False) -> list[LayerSummary]:
    """One ``LayerSummary`` per layer of ``net`` (the Split layers Caffe inserts only with ``splits``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    seen: set[int] = set()
    rows = []
    for name, layer in zip(net._layer_names, net.modules_by_name.values()):
        bottoms = list(net.bottom_names[name])
        tops = list(net.top_names[name])
        bshapes = [shapes.get(b, tuple(net.blobs[b].shape)) for b in bottoms]
        if layer.is_net_input:
            tshapes = [tuple(net.blobs[t].shape) for t in tops]
        else:
            tshapes = [tuple(s) for s in layer.top_shapes(bshapes)]
        for t, s in zip(tops, tshapes):
            shapes[t] = s
        params = 0
        for p in layer.blobs:
            if id(p) not in seen:
                seen.add(id(p))
                params += p.numel()
        if layer.type == "Split" and not splits:
            continue
        rows.append(LayerSummary(name, layer.type, bottoms, tops, tshapes, params, layer.flops(bshapes, tshapes)))
    return rows


def totals(rows: list[LayerSummary]) -> tuple[int, int]:
    """(total parameters, total FLOPs) of the rows."""
    return sum(r.params for r in rows), sum(r.flops for r in rows)


def human(n: float, unit: str = "") -> str:
    """``61.1M``-style rendering of a count."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{int(n)}{unit}"


def _shape_str(shapes: list[tuple[int, ...]]) -> str:
    return ", ".join("x".join(str(d) for d in s) if s else "()" for s in shapes)


def format_summary(rows: list[LayerSummary], *, title: str | None = None) -> str:
    """The rows as a text table (name, type, bottoms -> tops, top shapes, params, FLOPs) with totals."""
    header = ("layer", "type", "bottoms -> tops", "top shapes", "params", "FLOPs")
    body = [
        (
            r.name,
            r.type,
            f"{', '.join(r.bottoms) or '-'} -> {', '.join(r.tops) or '-'}",
            _shape_str(r.top_shapes),
            f"{r.params:,}",
            f"{r.flops:,}",
        )
        for r in rows
    ]
    p, f = totals(rows)
    total = ("total", "", f"{len(rows)} layers", "", f"{p:,}", f"{f:,}")
    widths = [max(len(row[i]) for row in [header, *body, total]) for i in range(len(header))]

    def line(row) -> str:
        cells = [row[i].ljust(widths[i]) if i < 4 else row[i].rjust(widths[i]) for i in range(len(row))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = []
    if title:
        out.append(title)
    out += [line(header), rule, *(line(r) for r in body), rule, line(total)]
    out.append(f"{human(p)} parameters, {human(f)}FLOPs per forward pass")
    return "\n".join(out)
