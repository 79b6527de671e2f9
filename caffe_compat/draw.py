"""Draw a net as a Graphviz graph, with pycaffe's ``caffe.draw`` API and look, without pydot.

    from caffe_compat import draw
    dot_text = draw.get_dot_graph(net_param, rankdir="LR")
    png = draw.draw_net(net_param, "LR", ext="png")          # needs Graphviz's `dot`
    written = draw.draw_net_to_file(net_param, "net.png")    # writes net.dot when `dot` is absent

The look is Caffe's draw_net: layers are filled ``record`` boxes labelled ``name (type)`` (plus
kernel size, stride and pad for Convolution, Deconvolution and Pooling; the pooling method in the
type), coloured by type (Convolution/Deconvolution ``#FF5050``, Pooling ``#FF9900``,
InnerProduct ``#CC33FF``, others ``#6495ED``); in-place layers (one bottom, the same top) are
green ``#90EE90``; blobs are grey ``#E0E0E0`` octagons; edges out of Convolution, Deconvolution
and InnerProduct are labelled with ``num_output`` (Data layers: ``Batch <batch_size>``). Words
are separated by spaces for ``TB``/``BT`` layouts and by newlines for ``LR``.

``caffe_net`` is a ``NetParameter`` (as in pycaffe), a prototxt path, or a built ``Net``: a
``Net`` is drawn without the Split layers Caffe inserts, with each blob's shape under its name.

Differences from pycaffe: ``get_dot_graph`` returns DOT text (pycaffe's ``get_pydot_graph``
returns a pydot object; ``get_pydot_graph`` here is the same as ``get_dot_graph``). Rendering uses
the ``dot`` program when it is on PATH; ``draw_net`` raises without it and ``draw_net_to_file``
then writes the DOT text next to the requested file (``.dot``) and returns that path.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

from caffe_compat.errors import CaffeError
from caffe_compat.proto import caffe_pb2

__all__ = [
    "LAYER_STYLE_DEFAULT",
    "NEURON_LAYER_STYLE",
    "BLOB_STYLE",
    "choose_color_by_layertype",
    "get_edge_label",
    "get_layer_label",
    "get_dot_graph",
    "get_pydot_graph",
    "draw_net",
    "draw_net_to_file",
    "dot_available",
    "TEXT_FORMATS",
]

log = logging.getLogger("caffe_compat")

LAYER_STYLE_DEFAULT = {"shape": "record", "fillcolor": "#6495ED", "style": "filled"}
NEURON_LAYER_STYLE = {"shape": "record", "fillcolor": "#90EE90", "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "fillcolor": "#E0E0E0", "style": "filled"}
#: Extensions written as DOT text without Graphviz (Caffe's ``.raw`` included).
TEXT_FORMATS = ("dot", "gv", "raw")


def choose_color_by_layertype(layertype: str) -> str:
    """Caffe's layer colours: convolutions red, pooling orange, inner products purple, others blue."""
    if layertype in ("Convolution", "Deconvolution"):
        return "#FF5050"
    if layertype == "Pooling":
        return "#FF9900"
    if layertype == "InnerProduct":
        return "#CC33FF"
    return "#6495ED"


def get_edge_label(layer) -> str:
    """The label of the edges out of ``layer`` (a LayerParameter); empty for most types."""
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return ""


def _lr_mults(layer) -> tuple[float, float]:
    specs = list(layer.param)
    lrs = [s.lr_mult for s in specs[:2]] + [1.0] * (2 - min(len(specs), 2))
    return lrs[0], lrs[1]


def get_layer_label(layer, rankdir: str, display_lrm: bool = False) -> str:
    """``name (type)`` plus the spatial parameters of convolutions and pooling (unquoted text)."""
    sep = " " if rankdir in ("TB", "BT") else "\n"
    parts = [layer.name]
    if layer.type == "Pooling":
        method = caffe_pb2.PoolingParameter.PoolMethod.Name(layer.pooling_param.pool)
        parts.append(f"({layer.type} {method})")
    else:
        parts.append(f"({layer.type})")
    if layer.type in ("Convolution", "Deconvolution", "Pooling"):
        if layer.type == "Pooling":
            pp = layer.pooling_param
            k, s, p = pp.kernel_size, pp.stride, pp.pad
        else:
            cp = layer.convolution_param
            k = cp.kernel_size[0] if len(cp.kernel_size) else 1
            s = cp.stride[0] if len(cp.stride) else 1
            p = cp.pad[0] if len(cp.pad) else 0
        parts.append(sep.join([f"kernel size: {k}", f"stride: {s}", f"pad: {p}"]))
    if display_lrm and layer.type in ("Convolution", "Deconvolution", "InnerProduct"):
        lr0, lr1 = _lr_mults(layer)
        if lr0 or lr1:
            parts.append(f"lr mult: {lr0:.1f}, {lr1:.1f}")
    return sep.join(parts)


def _quote(text: str) -> str:
    """A DOT double-quoted string; newlines become DOT's ``\\n``."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attrs(d: dict) -> str:
    return ", ".join(f"{k}={_quote(str(v))}" for k, v in d.items())


def _included(layer, phase) -> bool:
    """Caffe draw's phase filter (include/exclude rules by phase only)."""
    if phase is None:
        return True
    if len(layer.include) and len(layer.exclude):
        raise CaffeError(f"layer {layer.name!r} has both include and exclude rules")
    included = len(layer.include) == 0
    for rule in layer.include:
        included = included or rule.phase == phase
    for rule in layer.exclude:
        included = included and rule.phase != phase
    return included


def _as_net_param(caffe_net):
    """(NetParameter, blob shapes or None) for a NetParameter, a prototxt path or a Net."""
    if isinstance(caffe_net, caffe_pb2.NetParameter):
        return caffe_net, None
    if isinstance(caffe_net, (str, os.PathLike)):
        from caffe_compat import io as cio

        return cio.read_net(caffe_net), None
    if hasattr(caffe_net, "net_param") and hasattr(caffe_net, "blobs"):
        # a built Net: leave out the inserted Split layers, naming blobs as the prototxt does
        out = caffe_pb2.NetParameter()
        out.name = caffe_net.name
        source: dict[str, str] = {}
        for lp in caffe_net.net_param.layer:
            if lp.type == "Split" and lp.name.endswith("_split"):
                for t in lp.top:
                    source[t] = source.get(lp.bottom[0], lp.bottom[0])
                continue
            nl = out.layer.add()
            nl.CopyFrom(lp)
            del nl.blobs[:]
            for j, b in enumerate(nl.bottom):
                nl.bottom[j] = source.get(b, b)
        shapes = {n: tuple(b.shape) for n, b in caffe_net.blobs.items()}
        return out, shapes
    raise TypeError(f"draw: expected a NetParameter, a prototxt path or a Net, got {type(caffe_net).__name__}")


def get_dot_graph(
    caffe_net,
    rankdir: str = "LR",
    label_edges: bool = True,
    phase: int | None = None,
    display_lrm: bool = False,
) -> str:
    """The net as Graphviz DOT text, in Caffe draw_net's look (see the module docstring)."""
    if rankdir not in ("LR", "TB", "BT", "RL"):
        raise CaffeError(f"rankdir must be one of LR, TB, BT, RL; got {rankdir!r}")
    net_param, shapes = _as_net_param(caffe_net)
    nodes: dict[str, str] = {}  # node id -> attribute text (later definitions win, as in pydot)
    edges: list[tuple[str, str, str]] = []
    sep = " " if rankdir in ("TB", "BT") else "\n"

    def blob_node(name: str) -> None:
        label = name
        if shapes is not None and name in shapes:
            label += sep + "(" + "x".join(str(d) for d in shapes[name]) + ")"
        nodes[f"{name}_blob"] = _attrs({"label": label, **BLOB_STYLE})

    for layer in net_param.layer:
        if not _included(layer, phase):
            continue
        node_id = f"{layer.name}_{layer.type}"
        inplace = len(layer.bottom) == 1 and len(layer.top) == 1 and layer.bottom[0] == layer.top[0]
        style = (
            dict(NEURON_LAYER_STYLE)
            if inplace
            else dict(LAYER_STYLE_DEFAULT, fillcolor=choose_color_by_layertype(layer.type))
        )
        nodes[node_id] = _attrs({"label": get_layer_label(layer, rankdir, display_lrm), **style})
        for b in layer.bottom:
            blob_node(b)
            edges.append((f"{b}_blob", node_id, ""))
        for t in layer.top:
            blob_node(t)
            edges.append((node_id, f"{t}_blob", get_edge_label(layer) if label_edges else ""))

    lines = [f"digraph {_quote(net_param.name or 'Net')} {{", f"  rankdir={rankdir};"]
    lines += [f"  {_quote(n)} [{a}];" for n, a in nodes.items()]
    for src, dst, label in edges:
        attr = f" [label={_quote(label)}]" if label else ""
        lines.append(f"  {_quote(src)} -> {_quote(dst)}{attr};")
    lines.append("}")
    return "\n".join(lines) + "\n"


#: pycaffe's name; returns DOT text here (no pydot).
get_pydot_graph = get_dot_graph


def dot_available() -> bool:
    """Whether Graphviz's ``dot`` program is on PATH."""
    return shutil.which("dot") is not None


def draw_net(
    caffe_net, rankdir: str = "LR", ext: str = "png", phase: int | None = None, display_lrm: bool = False
) -> bytes:
    """The drawing encoded as ``ext`` (``png``, ``svg``, ``pdf``... through ``dot``; ``dot``/``gv``/
    ``raw``: the DOT text). Raises ``CaffeError`` when an image is asked for and ``dot`` is absent."""
    text = get_dot_graph(caffe_net, rankdir, phase=phase, display_lrm=display_lrm)
    ext = ext.lower().lstrip(".")
    if ext in TEXT_FORMATS:
        return text.encode()
    exe = shutil.which("dot")
    if exe is None:
        raise CaffeError(
            f"drawing as {ext!r} needs Graphviz's 'dot' program, which is not on PATH: install graphviz, "
            "or ask for a .dot file and render it elsewhere"
        )
    proc = subprocess.run([exe, f"-T{ext}"], input=text.encode(), capture_output=True, check=False)
    if proc.returncode != 0:
        raise CaffeError(f"dot -T{ext} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def draw_net_to_file(
    caffe_net, filename, rankdir: str = "LR", phase: int | None = None, display_lrm: bool = False
) -> str:
    """Draw into ``filename`` in the format of its extension; return the path written.

    Without ``dot``, an image extension falls back to DOT text in ``<filename stem>.dot``
    (logged as a warning).
    """
    filename = os.fspath(filename)
    ext = os.path.splitext(filename)[1].lstrip(".").lower() or "dot"
    if ext not in TEXT_FORMATS and not dot_available():
        fallback = os.path.splitext(filename)[0] + ".dot"
        log.warning("Graphviz's 'dot' is not installed: writing %s instead of %s", fallback, filename)
        filename, ext = fallback, "dot"
    data = draw_net(caffe_net, rankdir, ext, phase, display_lrm)
    with open(filename, "wb") as f:
        f.write(data)
    return filename


# -- pycaffe's helpers that scripts call directly ------------------------------------------------


def get_pooling_types_dict() -> dict[int, str]:
    """pycaffe's ``draw.get_pooling_types_dict``: ``{number: name}`` of ``PoolingParameter.PoolMethod``
    (``{0: 'MAX', 1: 'AVE', 2: 'STOCHASTIC'}``), read from caffe.proto."""
    return {v.number: name for name, v in caffe_pb2.PoolingParameter.PoolMethod.DESCRIPTOR.values_by_name.items()}


def get_layer_lr_mult(layer) -> tuple[float, float]:
    """pycaffe's ``draw.get_layer_lr_mult``: the ``lr_mult`` of a Convolution, Deconvolution or
    InnerProduct layer's weights and bias (a LayerParameter); 1.0 for a blob with no ``param``
    entry (caffe.proto's default). Another type, or more than two ``param`` entries, raises
    ``ValueError`` as pycaffe does."""
    if layer.type not in ("Convolution", "Deconvolution", "InnerProduct"):
        raise ValueError(
            f"{layer.type} layers do not have a learning rate multiplier (layer {layer.name!r}; "
            "get_layer_lr_mult takes Convolution, Deconvolution or InnerProduct layers)"
        )
    specs = list(layer.param)
    if len(specs) > 2:
        raise ValueError(
            f"Could not parse the learning rate multiplier: layer {layer.name!r} has {len(specs)} param "
            "entries, a learning layer has at most two (weights, bias)"
        )
    mults = [float(s.lr_mult) for s in specs] + [1.0] * (2 - len(specs))
    return mults[0], mults[1]


__all__ += ["get_pooling_types_dict", "get_layer_lr_mult"]
