"""Residual-stream analysis: which values only ever reach LayerNorms, and who writes them.

LayerNorm is invariant to a shift along 1: LN(x + c 1) = LN(x). So if every reader of a value is a
LayerNorm over the width axis, or an Add (or a width-preserving view: Identity, Reshape, Slice, ...)
whose own result again only reaches such readers, the value's mean over the width is irrelevant
and its writers may be recentred (Jiang et al. 2023). In a Pre-LN transformer that set is exactly
the residual stream: embeddings, every partial sum h + attn(..) + mlp(..), and the branch outputs
feeding them.

`find_streams` computes the largest such set (a greatest fixed point: start from every value read
only by allowed op types, drop values with a reader outside the set until nothing changes), splits
it into connected streams, and lists for each stream
- `readers`: the LayerNorm sites that read it (they may become RMSNorm once it is zero-mean);
- `leaves`: the values written into it, i.e. members not produced by an Add or a view (linear
  projections, embedding gathers, constants, or anything else, which `normfold.recentre` judges);
- `external`: operands (node, input index) that an Add or Concat of the stream reads from a value
  that is not a member, because something else reads that value too (in a Post-LN model, the
  previous LayerNorm's output, also read by the attention projections).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from normfold.constants import constant
from normfold.detect import NormSite
from normfold.report import node_label
from normfold.shapes import rank as value_rank

VIEW_OPS = {"Identity", "Dropout", "Cast", "Reshape", "Slice", "Gather", "Concat", "Squeeze", "Unsqueeze",
            "Expand", "Transpose"}
"""Ops that may pass a stream value on unchanged along the width axis (checked per node by `keeps_width`)."""


@dataclass(eq=False)
class Stream:
    """A connected set of values whose mean over the last (width) axis no reader can see."""

    values: list[ir.Value] = field(default_factory=list)
    readers: list[NormSite] = field(default_factory=list)
    leaves: list[ir.Value] = field(default_factory=list)
    external: list[tuple[ir.Node, int]] = field(default_factory=list)

    def __contains__(self, value: ir.Value) -> bool:
        return any(v is value for v in self.values)


def layernorm_readers(sites: list[NormSite], model: ir.Model) -> dict[int, list[NormSite]]:
    """LayerNorm sites over the last axis only, grouped by id of the value they normalize."""
    readers: dict[int, list[NormSite]] = {}
    for site in sites:
        if site.kind == "LayerNorm" and site.x is not None and site.axis in (-1, _last_axis(site.x, model)):
            readers.setdefault(id(site.x), []).append(site)
    return readers


def find_streams(model: ir.Model, sites: list[NormSite]) -> list[Stream]:
    """Every stream of the main graph (see module docstring), largest first."""
    readers = layernorm_readers(sites, model)
    site_nodes = {id(n): site for group in readers.values() for site in group for n in site.nodes}
    members = {id(v): v for v in _all_values(model.graph) if _reader_types_allowed(v, readers, site_nodes)}
    changed = True
    while changed:
        changed = False
        for key, value in list(members.items()):
            if not _readers_in(value, members, readers, site_nodes, model):
                del members[key]
                changed = True
    streams = _components(members, readers, site_nodes)
    return sorted(streams, key=lambda s: -len(s.values))


def _reader_types_allowed(value: ir.Value, readers, site_nodes) -> bool:
    if value.is_graph_output() or not value.uses():
        return False
    for node, _ in value.uses():
        site = site_nodes.get(id(node))
        if site is not None:
            if site.x is value:
                continue
            return False  # a LayerNorm's internals are opaque: only its input counts as read by it
        if not _is_default(node) or (node.op_type != "Add" and node.op_type not in VIEW_OPS):
            return False
    return True


def _readers_in(value: ir.Value, members, readers, site_nodes, model) -> bool:
    """True when every reader is a LayerNorm of this value, or an Add/view whose output is a member."""
    for node, index in value.uses():
        site = site_nodes.get(id(node))
        if site is not None and site.x is value:
            continue
        if id(node.outputs[0]) not in members:
            return False
        if node.op_type != "Add" and not keeps_width(node, index, model):
            return False
    return True


def keeps_width(node: ir.Node, index: int, model: ir.Model) -> bool:
    """True when `node` passes input `index` on with its last axis intact (values only moved along others)."""
    op = node.op_type
    if index != 0 and op not in ("Concat",):
        return False
    out = node.outputs[0]
    if op in ("Identity", "Dropout", "Cast"):
        return len(node.outputs) == 1 or not any(o.uses() for o in node.outputs[1:])
    if op == "Reshape" or op in ("Squeeze", "Unsqueeze", "Expand"):
        width_in, width_out = _width(node.inputs[0]), _width(out)
        return width_in is not None and width_in == width_out
    if op == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        return perm is not None and perm[-1] == len(perm) - 1
    if op in ("Slice", "Gather", "Concat"):
        return _acts_off_last_axis(node, model)
    return False


def _acts_off_last_axis(node: ir.Node, model: ir.Model) -> bool:
    rank = value_rank(node.inputs[0], model)
    if node.op_type == "Slice":
        axes = constant(node.inputs[3], model).array if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if axes is None or rank is None:
            return False
        return all(int(a) % rank != rank - 1 for a in axes.reshape(-1))
    axis = node.attributes.get_int("axis", 0)
    return rank is not None and axis % rank != rank - 1


def _components(members: dict[int, ir.Value], readers, site_nodes) -> list[Stream]:
    """Splits the member set into streams connected by Adds and views."""
    parent = {key: key for key in members}

    def find(key):
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for key, value in members.items():
        for node, _ in value.uses():
            if id(node.outputs[0]) in members and id(node) not in site_nodes:
                parent[find(key)] = find(id(node.outputs[0]))
    groups: dict[int, Stream] = {}
    for key, value in members.items():
        stream = groups.setdefault(find(key), Stream())
        stream.values.append(value)
        stream.readers.extend(readers.get(id(value), []))
        producer = value.producer()
        if producer is None or id(producer) in site_nodes or not _is_default(producer) or not _joins_stream(producer):
            stream.leaves.append(value)
            continue
        stream.external.extend(
            (producer, i) for i, v in enumerate(producer.inputs) if v is not None and id(v) not in members
            and _carries_data(producer, i)
        )
        if all(v is None or id(v) not in members for v in producer.inputs):
            stream.leaves.append(value)
            stream.external = [(n, i) for n, i in stream.external if n is not producer]
    return [s for s in groups.values() if s.readers]


def _joins_stream(node: ir.Node) -> bool:
    return node.op_type == "Add" or node.op_type in VIEW_OPS


def _carries_data(node: ir.Node, index: int) -> bool:
    """False for the shape/index operands of views (Reshape's shape, Slice's starts, ...)."""
    return node.op_type in ("Add", "Concat") or index == 0


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def _width(value: ir.Value | None):
    if value is None or value.shape is None or not len(value.shape):
        return None
    last = value.shape[-1]
    return last if isinstance(last, int) else None


def _last_axis(value: ir.Value, model: ir.Model) -> int | None:
    rank = value_rank(value, model)
    return None if rank is None else rank - 1


def _is_default(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def placements(model: ir.Model, sites: list[NormSite]) -> dict[int, tuple[str, str]]:
    """Where each LayerNorm sits, keyed by id of its first node: (placement, why).

    "Pre-LN": it reads a stream that goes on into a residual Add; "final": it reads the end of a
    stream; "embedding": it is its stream's only reader (an embedding sum) and its output writes
    another stream; "other": its input is read by something that sees the mean (see `why_outside`).
    A Post-LN model's norms are first found as "embedding"/"final"-like pieces; the conversion pass
    tells them apart by their writers (normfold inspect reports its verdict).
    """
    streams = find_streams(model, sites)
    writers = {id(v) for s in streams for v in s.leaves} | {id(n.inputs[i]) for s in streams for n, i in s.external}
    result = {}
    for stream in streams:
        for site in stream.readers:
            continues = any(user.op_type == "Add" for user, _ in site.x.uses())
            if len(stream.readers) == 1 and id(site.y) in writers:
                result[id(site.nodes[0])] = ("embedding", "it normalizes an embedding and its output starts the stream")
            elif continues:
                result[id(site.nodes[0])] = ("Pre-LN", "it reads the residual stream, which goes on past it")
            else:
                result[id(site.nodes[0])] = ("final", "it reads the end of the residual stream")
    for site in sites:
        if site.kind == "LayerNorm" and id(site.nodes[0]) not in result:
            result[id(site.nodes[0])] = ("other", why_outside(site))
    return result


def why_outside(site: NormSite) -> str:
    """Why a LayerNorm's input is not part of any stream: the first reader that sees its mean."""
    x = site.x
    if x.is_graph_output():
        return f"the value it normalizes, {x.name!r}, is a graph output, so its mean is observable"
    inside = {id(n) for n in site.nodes}
    reader = _observer(x, inside)
    if reader is not None:
        return f"the value it normalizes, {x.name!r}, is also read by {node_label(reader)}, which sees its mean"
    return f"the value it normalizes, {x.name!r}, reaches a reader that is not invariant to its mean"


def _observer(value: ir.Value, inside: set[int], depth: int = 0) -> ir.Node | None:
    """The first reader of `value`, looking through views, that is neither an Add nor in `inside`."""
    for node, _ in value.uses():
        if id(node) in inside or node.op_type == "Add":
            continue
        if node.op_type in VIEW_OPS and depth < 8:
            found = _observer(node.outputs[0], inside, depth + 1)
            if found is not None:
                return found
            continue
        return node
    return None
