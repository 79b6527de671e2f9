"""The build plan of a net: what Caffe's ``Net::Init`` decides, as typed data.

``build_plan(net_param, source)`` turns a filtered NetParameter (implicit Split layers already
inserted) into a :class:`Plan`: one :class:`Step` per layer (its layer object, bottoms, tops, which
tops are in place, loss weights, parameter specs, and whether it and each bottom need a backward
pass), the net's blobs, inputs, outputs and learnable parameters. It is built by short functions in
Caffe's order (BVLC/caffe src/caffe/net.cpp ``Init``: ``AppendBottom``, layer setup, ``AppendTop``,
``AppendParam``, then the backward analysis):

0. :func:`filter_net` (the NetState's include/exclude rules) and :func:`insert_splits` (a
   ``Split`` layer where a blob feeds several layers) on the NetParameter;
1. :func:`_append_bottoms` — look the bottoms up, collect their shapes and need-backward flags;
2. the layer is built from its parameters and bottom shapes (shape inference gives the tops');
3. :func:`_loss_weights` — one per top (loss layers default to 1 on top 0);
4. :func:`_append_params` with :func:`_share_param` — ``ParamSpec`` multipliers and ``name`` sharing;
5. :func:`_append_tops` — new blobs, or in place (top name == bottom name at the same index);
6. :func:`_analyse_backward` — Caffe's pruning of layers that feed no loss, ``propagate_down``,
   ``force_backward``;
7. :func:`_collect_learnable` — owners of learnable parameters in Caffe's ``learnable_params_``
   order, with their ``lr_mult``/``decay_mult``.

The plan holds no execution state: runners (``caffe_compat.runners``) execute it and the ``Net``
façade exposes it through pycaffe's API.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from torch import nn

from caffe_compat.blob import Blob, diff_owner, raw_data
from caffe_compat.errors import CaffeError, LayerError, NetError
from caffe_compat.layers.base import Layer, layer_class
from caffe_compat.layers.python import PythonLayerError
from caffe_compat.proto import caffe_pb2

__all__ = [
    "ParamSpecInfo",
    "Step",
    "LearnableParam",
    "Plan",
    "build_plan",
    "readable",
    "state_meets_rule",
    "filter_net",
    "insert_splits",
    "split_sources",
]


@dataclass
class ParamSpecInfo:
    """One parameter blob of a layer: its multipliers (``has_*``: given in the prototxt rather
    than defaulted, which decides what sharing layers may complete) and whether it learns."""

    lr_mult: float = 1.0
    decay_mult: float = 1.0
    has_lr: bool = False
    has_decay: bool = False
    need_backward: bool = True


@dataclass(slots=True)
class Step:
    """One layer of the plan, with everything a runner needs to execute it."""

    index: int
    name: str
    layer: Layer
    bottoms: list[str]
    tops: list[str]
    bottom_blobs: list[Blob]
    top_blobs: list[Blob]
    inplace: list[bool]  # per top: the same blob as the bottom at that index
    loss_weights: list[float]  # per top
    params: list[ParamSpecInfo]
    need_backward: bool = False
    bottom_need_backward: list[bool] = field(default_factory=list)
    #: per bottom: backpropagate into it (need_backward of the layer and of that bottom)
    grad_bottoms: list[bool] = field(default_factory=list)
    #: a net input (``Input`` layer): its tops are set by the caller, not computed
    is_input: bool = False
    #: some top is its bottom's blob
    any_inplace: bool = False
    #: one bottom, written in place, by a layer that can overwrite it (``forward_inplace``)
    can_inplace: bool = False
    #: the layer's backward does not read its tops (``Layer.top_overwritable``)
    overwritable: bool = False


@dataclass
class LearnableParam:
    """A learnable parameter owner, as a solver sees it (Caffe's ``learnable_params_``)."""

    param: nn.Parameter
    lr_mult: float
    decay_mult: float
    layer_name: str
    index: int  # the blob's index in its layer


@dataclass
class Plan:
    """What building a net decides (see the module's doc)."""

    source: str
    steps: list[Step] = field(default_factory=list)
    blobs: OrderedDict[str, Blob] = field(default_factory=OrderedDict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    learnable: list[LearnableParam] = field(default_factory=list)
    #: per net input: some consumer backpropagates into it
    input_needs_grad: dict[str, bool] = field(default_factory=dict)
    #: blobs a whole pass replaces before anything reads them (their first use is as the top of a
    #: computing layer): a host copy of them need not go back to the device before such a pass
    recomputed: frozenset = frozenset()
    #: ParamSpec.name -> (step index, blob index) of the owner
    param_owner: dict[str, tuple[int, int]] = field(default_factory=dict)

    def step_index(self, name: str | None, default: int) -> int:
        if name is None:
            return default
        for s in self.steps:
            if s.name == name:
                return s.index
        raise NetError(f"{self.source}: no layer named {name!r}")


def readable(message: str, split_source: dict[str, str]) -> str:
    """``message`` with inserted Split layers' top names replaced by the blobs they copy."""
    for top, blob in split_source.items():
        if repr(top) in message:
            message = message.replace(repr(top), repr(blob))
    return message


# ---------------------------------------------------------------------------------------------
# the NetParameter before building: Caffe's FilterNet and InsertSplits (pure functions on protos)


def state_meets_rule(state, rule) -> bool:
    """Caffe's StateMeetsRule: phase, min/max level, every stage, no not_stage."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def filter_net(param, source: str = "<net>"):
    """Caffe's FilterNet: keep the layers whose include/exclude rules admit ``param.state``."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    for lp in param.layer:
        if len(lp.include) and len(lp.exclude):
            raise NetError(f"{source}: layer {lp.name!r}: specify either include rules or exclude rules, not both")
        included = len(lp.include) == 0
        for rule in lp.exclude:
            if state_meets_rule(param.state, rule):
                included = False
        for rule in lp.include:
            if state_meets_rule(param.state, rule):
                included = True
        if included:
            out.layer.add().CopyFrom(lp)
    return out


def _split_layer_name(layer_name: str, blob_name: str, top_idx: int) -> str:
    return f"{blob_name}_{layer_name}_{top_idx}_split"


def split_sources(param) -> dict[str, str]:
    """The blob each top of an inserted Split layer copies (``label_data_1_split_0`` -> ``label``),
    so that messages name the blob the user wrote."""
    return {
        t: lp.bottom[0]
        for lp in param.layer
        # an inserted split is named after its bottom, producer and top index (_split_layer_name)
        if lp.type == "Split"
        and len(lp.bottom) == 1
        and lp.name.startswith(f"{lp.bottom[0]}_")
        and lp.name.endswith("_split")
        for t in lp.top
    }


def insert_splits(param, source: str = "<net>"):
    """Caffe's InsertSplits: a Split layer after every top that feeds more than one consumer.

    A top with a non-zero ``loss_weight`` counts as one extra consumer; its weight moves to the
    split's first top.
    """
    last_top: dict[str, tuple[int, int]] = {}
    source_of: dict[tuple[int, int], tuple[int, int]] = {}
    consumers: dict[tuple[int, int], int] = {}
    loss_weight: dict[tuple[int, int], float] = {}
    for i, lp in enumerate(param.layer):
        for j, b in enumerate(lp.bottom):
            if b not in last_top:
                raise NetError(f"{source}: Unknown bottom blob {b!r} (layer {lp.name!r}, bottom index {j})")
            src = last_top[b]
            source_of[(i, j)] = src
            consumers[src] = consumers.get(src, 0) + 1
        for j, t in enumerate(lp.top):
            last_top[t] = (i, j)
        for j in range(min(len(lp.loss_weight), len(lp.top))):
            w = lp.loss_weight[j]
            loss_weight[(i, j)] = w
            if w:
                consumers[(i, j)] = consumers.get((i, j), 0) + 1

    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    next_split: dict[tuple[int, int], int] = {}
    for i, lp in enumerate(param.layer):
        nl = out.layer.add()
        nl.CopyFrom(lp)
        for j, b in enumerate(lp.bottom):
            src = source_of[(i, j)]
            if consumers.get(src, 0) > 1:
                k = next_split.get(src, 0)
                next_split[src] = k + 1
                producer = param.layer[src[0]].name
                nl.bottom[j] = f"{_split_layer_name(producer, b, src[1])}_{k}"
        for j, t in enumerate(lp.top):
            n = consumers.get((i, j), 0)
            if n <= 1:
                continue
            w = loss_weight.get((i, j), 0.0)
            sp = out.layer.add()
            sp.name = _split_layer_name(lp.name, t, j)
            sp.type = "Split"
            sp.bottom.append(t)
            for k in range(n):
                sp.top.append(f"{sp.name}_{k}")
                if w:
                    sp.loss_weight.append(w if k == 0 else 0.0)
            if w:
                del nl.loss_weight[:]
                next_split[(i, j)] = next_split.get((i, j), 0) + 1
    return out


# ---------------------------------------------------------------------------------------------
# building


@dataclass
class _Building:
    """What the build functions share while appending layers."""

    plan: Plan
    split_source: dict[str, str]
    phase: int
    blob_need_backward: dict[str, bool] = field(default_factory=dict)
    available: set[str] = field(default_factory=set)  # Caffe's available_blobs: produced, not consumed

    @property
    def src(self) -> str:
        return self.plan.source


def build_plan(net_param, source: str, phase: int, force_backward: bool, split_source: dict[str, str]) -> Plan:
    """Build the plan of ``net_param`` (filtered, splits inserted); see the module's doc."""
    b = _Building(Plan(source), split_source, phase)
    for li, lp in enumerate(net_param.layer):
        _append_layer(b, li, lp)
    plan = b.plan
    plan.outputs = sorted(b.available)  # Caffe keeps them in a std::set: sorted
    _analyse_backward(plan.steps, force_backward)
    plan.input_needs_grad = {name: False for name in plan.inputs}
    for s in plan.steps:
        for j, name in enumerate(s.bottoms):
            if name in plan.input_needs_grad and s.grad_bottoms[j]:
                plan.input_needs_grad[name] = True
    plan.learnable = _collect_learnable(plan.steps)
    plan.recomputed = _recomputed_blobs(plan)
    return plan


def _append_layer(b: _Building, li: int, lp) -> None:
    if not lp.HasField("phase"):
        lp.phase = b.phase
    name = lp.name or f"layer{li}"
    bshapes, bneed, need_bw = _append_bottoms(b, lp, name)
    layer, tshapes = _make_layer(b, lp, name, bshapes)
    weights = _loss_weights(b, lp, name, layer)
    params = _append_params(b, li, lp, name, layer)
    need_bw = need_bw or any(p.need_backward for p in params)
    step = Step(
        index=li,
        name=name,
        layer=layer,
        bottoms=list(lp.bottom),
        tops=list(lp.top),
        bottom_blobs=[b.plan.blobs[x] for x in lp.bottom],
        top_blobs=[],
        inplace=[],
        loss_weights=weights,
        params=params,
        need_backward=need_bw,
        bottom_need_backward=bneed,
    )
    _append_tops(b, step, tshapes)
    step.is_input = layer.is_net_input
    step.any_inplace = any(step.inplace)
    step.can_inplace = len(step.bottoms) == 1 and step.any_inplace and layer.has_forward_inplace
    step.overwritable = layer.top_overwritable
    b.plan.steps.append(step)


def _append_bottoms(b: _Building, lp, name: str) -> tuple[list, list[bool], bool]:
    """Caffe's AppendBottom for each bottom: its shape, whether it needs a backward pass (or what
    ``propagate_down`` says), and whether any bottom needs one."""
    if len(lp.propagate_down) and len(lp.propagate_down) != len(lp.bottom):
        raise NetError(
            f"{b.src}: layer {name!r}: propagate_down must be given once per bottom "
            f"({len(lp.bottom)} bottoms, {len(lp.propagate_down)} propagate_down)"
        )
    shapes, need, any_need = [], [], False
    for j, x in enumerate(lp.bottom):
        if x not in b.plan.blobs:
            raise NetError(f"{b.src}: Unknown bottom blob {x!r} (layer {name!r}, bottom index {j})")
        shapes.append(b.plan.blobs[x].shape)
        nb = b.blob_need_backward[x]
        need.append(bool(lp.propagate_down[j]) if len(lp.propagate_down) else nb)
        any_need |= nb
        b.available.discard(x)
    return shapes, need, any_need


def _make_layer(b: _Building, lp, name: str, bshapes: list) -> tuple[Layer, list]:
    cls = layer_class(lp.type, name).implementation(lp)
    try:
        layer = cls(lp, bshapes, lp.phase)
        tshapes = layer.top_shapes(bshapes)
    except PythonLayerError as e:  # the user's own exception: its type, args and traceback kept
        e.layer_context = f"{b.src}: {e.layer_context}"
        raise
    except CaffeError as e:
        raise type(e)(f"{b.src}: {readable(str(e), b.split_source)}") from None
    except Exception as e:  # a layer's own failure on these shapes
        raise LayerError(
            f"{b.src}: layer {name!r} ({lp.type}): cannot set up with bottom shapes {[list(s) for s in bshapes]}: {e}"
        ) from e
    if len(tshapes) != len(lp.top):
        raise LayerError(
            f"{b.src}: layer {name!r} ({lp.type}) produces {len(tshapes)} top(s), the prototxt names {len(lp.top)}"
        )
    return layer, tshapes


def _loss_weights(b: _Building, lp, name: str, layer: Layer) -> list[float]:
    """Layer::SetLossWeights: one per top; a loss layer with none given gets 1 on its top 0."""
    weights = list(lp.loss_weight)
    if not weights and layer.is_loss:
        weights = [1.0]
    if weights and len(weights) != len(lp.top):
        raise NetError(
            f"{b.src}: layer {name!r}: loss_weight must be unspecified or given once per top "
            f"({len(lp.top)} tops, {len(weights)} loss_weight)"
        )
    return [float(w) for w in weights] or [0.0] * len(lp.top)


def _append_params(b: _Building, li: int, lp, name: str, layer: Layer) -> list[ParamSpecInfo]:
    """Caffe's AppendParam for each of the layer's blobs: its multipliers, sharing by name."""
    infos = []
    own = layer.param  # a layer may complete its param specs (BatchNorm: lr_mult 0)
    for k in range(len(layer.blobs)):
        ps = own.param[k] if k < len(own.param) else caffe_pb2.ParamSpec()
        info = ParamSpecInfo(ps.lr_mult, ps.decay_mult, ps.HasField("lr_mult"), ps.HasField("decay_mult"))
        info.need_backward = info.lr_mult != 0
        if ps.name:
            if ps.name in b.plan.param_owner:
                _share_param(b, name, layer, k, ps, info)
            else:
                b.plan.param_owner[ps.name] = (li, k)
        infos.append(info)
    return infos


def _share_param(b: _Building, name: str, layer: Layer, k: int, ps, info: ParamSpecInfo) -> None:
    """Use the owner's tensor for blob ``k`` (checking counts or shapes by ``share_mode``); the
    owner's multipliers must agree where both are given, and an owner's defaulted multiplier is
    completed by the sharer's."""
    oli, ok = b.plan.param_owner[ps.name]
    ostep = b.plan.steps[oli]
    owner, mine = ostep.layer.blobs[ok], layer.blobs[k]
    where = f"{b.src}: layer {name!r} shares param {ps.name!r} (blob {k}) with layer {ostep.name!r}"
    if ps.share_mode == caffe_pb2.ParamSpec.PERMISSIVE:
        if owner.numel() != mine.numel():
            raise NetError(f"{where}, but the counts differ: {owner.numel()} vs {mine.numel()}")
    elif tuple(owner.shape) != tuple(mine.shape):
        raise NetError(f"{where}, but the shapes differ: {list(owner.shape)} vs {list(mine.shape)} (share_mode STRICT)")
    layer.blobs[k] = owner
    oinfo = ostep.params[ok]
    for field_name, has, mult, ohas, omult in (
        ("lr_mult", info.has_lr, info.lr_mult, oinfo.has_lr, oinfo.lr_mult),
        ("decay_mult", info.has_decay, info.decay_mult, oinfo.has_decay, oinfo.decay_mult),
    ):
        if has and ohas and mult != omult:
            raise NetError(
                f"{b.src}: layer {name!r}: shared param {ps.name!r} has {field_name} {mult}, its owner "
                f"{ostep.name!r} has {omult}; they must be equal"
            )
    if info.has_lr and not oinfo.has_lr:
        oinfo.lr_mult, oinfo.has_lr = info.lr_mult, True
    if info.has_decay and not oinfo.has_decay:
        oinfo.decay_mult, oinfo.has_decay = info.decay_mult, True


def _append_tops(b: _Building, step: Step, tshapes: list) -> None:
    """Caffe's AppendTop: a new blob per top, or the bottom's blob when in place."""
    blobs = b.plan.blobs
    for j, t in enumerate(step.tops):
        inplace = j < len(step.bottoms) and step.bottoms[j] == t
        if t in blobs and not inplace:
            raise NetError(f"{b.src}: Top blob {t!r} produced by multiple sources (layer {step.name!r})")
        step.inplace.append(inplace)
        if inplace:
            blobs[t]._shape = tuple(tshapes[j])
        else:
            blobs[t] = Blob(t, tshapes[j])
        if step.loss_weights[j]:
            blobs[t].loss_weight = step.loss_weights[j]
        b.blob_need_backward[t] = step.need_backward
        b.available.add(t)
        if step.layer.is_net_input:
            b.plan.inputs.append(t)
        step.top_blobs.append(blobs[t])


def _analyse_backward(steps: list[Step], force_backward: bool) -> None:
    """Caffe's backward analysis: layers that feed no loss, or whose tops no later layer
    backpropagates, skip backward; ``force_backward`` turns every layer's backward on again
    (bottoms where the layer allows it, and every parameter)."""
    under_loss: set[str] = set()
    skip_bp: set[str] = set()
    for s in reversed(steps):
        contributes = any(w for w in s.loss_weights) or any(t in under_loss for t in s.tops)
        skip = all(t in skip_bp for t in s.tops)
        if s.need_backward and skip:
            s.need_backward = False
            s.bottom_need_backward = [False] * len(s.bottoms)
        if not contributes:
            s.need_backward = False
        for j, x in enumerate(s.bottoms):
            if contributes:
                under_loss.add(x)
            else:
                s.bottom_need_backward[j] = False
            if not s.bottom_need_backward[j]:
                skip_bp.add(x)
    if force_backward:
        for s in steps:
            s.need_backward = True
            s.bottom_need_backward = [
                need or s.layer.allow_force_backward(j) for j, need in enumerate(s.bottom_need_backward)
            ]
            for p in s.params:
                p.need_backward = True
    for s in steps:
        s.grad_bottoms = [need and s.need_backward for need in s.bottom_need_backward]


def _collect_learnable(steps: list[Step]) -> list[LearnableParam]:
    """Owners in order (a shared parameter once); each gets ``requires_grad`` as Caffe's
    ``param_propagate_down`` and a zero diff."""
    out: list[LearnableParam] = []
    seen: set[int] = set()
    for s in steps:
        for k, p in enumerate(s.layer.blobs):
            if id(p) in seen:
                continue
            seen.add(id(p))
            p.requires_grad_(bool(s.layer.blobs_have_gradient and s.params[k].need_backward and s.need_backward))
            if p.grad is None:
                diff_owner(p).replace(raw_data(p).new_zeros(p.shape))
            out.append(LearnableParam(p, float(s.params[k].lr_mult), float(s.params[k].decay_mult), s.name, k))
    return out


def _recomputed_blobs(plan: Plan) -> frozenset:
    used: set[str] = set()
    recomputed = []
    for s in plan.steps:
        used.update(s.bottoms)
        for t in s.tops:
            if t not in used and not s.is_input:
                recomputed.append(plan.blobs[t])
            used.add(t)
    return frozenset(recomputed)
