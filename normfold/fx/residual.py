"""Residual-stream analysis on an FX graph (the ONNX side's normfold.residual, on nodes).

LN(x + c 1) = LN(x): a value whose every reader is a LayerNorm over its last axis, a shape-only
reader, or an add / width-keeping view whose result again only reaches such readers, may have its
mean over the width changed without changing the module's function. The largest such set (a
greatest fixed point) splits into connected `Stream`s; in a Pre-LN transformer the big one is the
residual stream: embeddings, every partial sum h + attn(..) + mlp(..), and the branch outputs.
For each stream:
- `readers`: the LayerNorms that read it (RMSNorm once it is zero-mean);
- `leaves`: members not computed by an add or a view of other members (projections, embedding
  lookups, parameters, a LayerNorm output...), the values written into it;
- `external`: operands an add or cat of the stream reads from outside it (node, argument index):
  values something else reads too (in Post-LN, the previous LayerNorm's output), or Python scalars.
normfold.fx.stream_plan decides how each writer is recentred.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from normfold.fx import ops
from normfold.fx.ops import NormOp

VIEWS = {"view", "reshape", "_unsafe_view", "expand", "unsqueeze", "squeeze", "flatten", "transpose", "permute",
         "slice", "select", "cat", "getitem"}
"""Ops that may pass a stream value on with its last axis intact (checked per node by `keeps_width`)."""


@dataclass(eq=False)
class Stream:
    """A connected set of nodes whose mean over the last (width) axis no reader can see."""

    values: list[fx.Node] = field(default_factory=list)
    readers: list[NormOp] = field(default_factory=list)
    leaves: list[fx.Node] = field(default_factory=list)
    external: list[tuple[fx.Node, int]] = field(default_factory=list)
    width: int = 0

    def __contains__(self, node) -> bool:
        return any(v is node for v in self.values)


def layernorm_readers(gm: fx.GraphModule) -> dict[fx.Node, list[NormOp]]:
    """LayerNorms over the last axis, grouped by the node they normalize."""
    found: dict[fx.Node, list[NormOp]] = {}
    for node in gm.graph.nodes:
        norm = ops.as_norm(gm, node)
        if norm is not None and norm.kind == "LayerNorm" and isinstance(norm.x, fx.Node):
            if (ops.shape(norm.x) or (None,))[-1] == norm.width:
                found.setdefault(norm.x, []).append(norm)
    return found


def find_streams(gm: fx.GraphModule) -> list[Stream]:
    """Every stream of the graph (see the module docstring), largest first."""
    readers = layernorm_readers(gm)
    norm_nodes = {n.node for group in readers.values() for n in group}
    members = {n for n in gm.graph.nodes if _reader_kinds_allowed(gm, n, readers, norm_nodes)}
    changed = True
    while changed:
        changed = False
        for node in list(members):
            if not all(_reads_within(gm, node, user, members, readers) for user in ops.readers(node)):
                members.discard(node)
                changed = True
    return sorted(_components(gm, members, readers), key=lambda s: -len(s.values))


def _reader_kinds_allowed(gm, node: fx.Node, readers, norm_nodes) -> bool:
    users = ops.readers(node)
    if not users or ops.shape(node) is None or not ops.shape(node):
        return False
    for user in users:
        if user in norm_nodes:
            if not any(r.node is user for r in readers.get(node, ())):
                return False  # read as a LayerNorm's weight or bias
        elif user.op == "output" or not (is_add(gm, user) or ops.kind(gm, user) in VIEWS | ops.PASS_THROUGH):
            return False
    return True


def _reads_within(gm, node: fx.Node, user: fx.Node, members, readers) -> bool:
    """True when `user` is a LayerNorm of `node`, or an add/view passing it on into a member."""
    if any(r.node is user for r in readers.get(node, ())):
        return True
    if user not in members:
        return False
    if is_add(gm, user):
        return (ops.shape(node) or (0,))[-1] == (ops.shape(user) or (None,))[-1]
    return keeps_width(gm, user, node)


def is_add(gm, node: fx.Node) -> bool:
    return ops.kind(gm, node) == "add" and ops.arg(node, 2, "alpha", 1) == 1 and len(node.args) >= 2


def keeps_width(gm, node: fx.Node, source: fx.Node) -> bool:
    """True when `node` passes `source` on with its last axis intact (values only moved along others)."""
    k = ops.kind(gm, node)
    src, out = ops.shape(source), ops.shape(node)
    if src is None or out is None or not src or not out:
        return False
    if k == "cat":
        return source in node.args[0] and _norm_dim(ops.arg(node, 1, "dim", 0), len(out)) != len(out) - 1
    if ops.data_input(node) is not source or any(a is source for a in node.args[1:]):
        return False
    if k in ops.PASS_THROUGH:
        return src == out
    if src[-1] != out[-1]:
        return False
    if k in ("view", "reshape", "_unsafe_view", "expand", "unsqueeze", "squeeze", "flatten"):
        return True  # same memory order and the same last size: the last axis is the same
    if k == "transpose":
        dims = [_norm_dim(ops.arg(node, i, f"dim{i - 1}"), len(src)) for i in (1, 2)]
        return len(src) - 1 not in dims
    if k == "permute":
        perm = ops.arg(node, 1, "dims")
        perm = perm if isinstance(perm, (list, tuple)) else node.args[1:]
        return _norm_dim(perm[-1], len(src)) == len(src) - 1
    if k in ("slice", "select"):
        return _norm_dim(ops.arg(node, 1, "dim", 0), len(src)) != len(src) - 1
    return False


def _norm_dim(dim, rank: int):
    return dim % rank if isinstance(dim, int) else None


def _components(gm, members: set[fx.Node], readers) -> list[Stream]:
    """Splits the member set into streams connected by adds and views."""
    parent = {n: n for n in members}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for node in members:
        for user in ops.readers(node):
            if user in members and not any(r.node is user for r in readers.get(node, ())):
                parent[find(node)] = find(user)  # joined by an add or a view, not by a norm reading it
    groups: dict[fx.Node, Stream] = {}
    for node in gm.graph.nodes:  # graph order: leaves and values come out in execution order
        if node not in members:
            continue
        stream = groups.setdefault(find(node), Stream())
        stream.values.append(node)
        stream.readers.extend(readers.get(node, []))
        operands = _stream_operands(gm, node)
        if operands is None or not any(isinstance(v, fx.Node) and v in members for _, v in operands):
            stream.leaves.append(node)
            continue
        stream.external.extend((node, i) for i, v in operands if not (isinstance(v, fx.Node) and v in members))
    streams = [s for s in groups.values() if s.readers]
    for stream in streams:
        stream.width = stream.readers[0].width
    return streams


def _stream_operands(gm, node: fx.Node) -> list[tuple[int, object]] | None:
    """(argument index, operand) for the data operands of an add or joining view; None for other ops."""
    if is_add(gm, node):
        return [(0, node.args[0]), (1, node.args[1])]
    k = ops.kind(gm, node)
    if k == "cat":
        return [(i, v) for i, v in enumerate(node.args[0])]
    if k in VIEWS | ops.PASS_THROUGH and isinstance(ops.data_input(node), fx.Node):
        return [(0, ops.data_input(node))]
    return None


def reaches(node: fx.Node, targets: set[fx.Node]) -> fx.Node | None:
    """The first of `targets` computed from `node` (following users), itself excluded."""
    return _first_reached(node.users, targets, lambda n: n.users)


def depends_on(node: fx.Node, targets: set[fx.Node]) -> fx.Node | None:
    """The first of `targets` that `node` is computed from, itself excluded."""
    return _first_reached(node.all_input_nodes, targets, lambda n: n.all_input_nodes)


def _first_reached(start, targets: set[fx.Node], neighbours) -> fx.Node | None:
    """Depth-first from the nodes `start`, stepping to `neighbours(n)`: the first node met that is in `targets`."""
    seen, stack = set(), list(start)
    while stack:
        n = stack.pop()
        if n in targets:
            return n
        if n in seen:
            continue
        seen.add(n)
        stack.extend(neighbours(n))
    return None
