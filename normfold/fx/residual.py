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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from normfold.fx import ops, recentre
from normfold.fx.graph import node_label
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
        elif user.op == "output" or not (_is_add(gm, user) or ops.kind(gm, user) in VIEWS | ops.PASS_THROUGH):
            return False
    return True


def _reads_within(gm, node: fx.Node, user: fx.Node, members, readers) -> bool:
    """True when `user` is a LayerNorm of `node`, or an add/view passing it on into a member."""
    if any(r.node is user for r in readers.get(node, ())):
        return True
    if user not in members:
        return False
    if _is_add(gm, user):
        return (ops.shape(node) or (0,))[-1] == (ops.shape(user) or (None,))[-1]
    return keeps_width(gm, user, node)


def _is_add(gm, node: fx.Node) -> bool:
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
    if _is_add(gm, node):
        return [(0, node.args[0]), (1, node.args[1])]
    k = ops.kind(gm, node)
    if k == "cat":
        return [(i, v) for i, v in enumerate(node.args[0])]
    if k in VIEWS | ops.PASS_THROUGH and isinstance(ops.data_input(node), fx.Node):
        return [(0, ops.data_input(node))]
    return None


def reaches(node: fx.Node, targets: set[fx.Node], limit: int = 100000) -> fx.Node | None:
    """The first of `targets` computed from `node` (following users), itself excluded."""
    seen, stack = set(), list(node.users)
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in targets:
            return n
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.users)
    return None


def depends_on(node: fx.Node, targets: set[fx.Node]) -> fx.Node | None:
    """The first of `targets` that `node` is computed from, itself excluded."""
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in targets:
            return n
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return None


# --------------------------------------------------------------------------- planning the writers


@dataclass
class StreamPlan:
    """What recentring one stream takes: edits to apply, and writers to centre explicitly."""

    edits: list = field(default_factory=list)
    explicit: list[tuple[fx.Node, tuple[fx.Node, int] | None, str]] = field(default_factory=list)
    """(value, the (consumer, argument index) to centre or None for all its readers, why not folded)."""


class PostLN(recentre.NotFoldable):
    """The stream is written by a LayerNorm output that other layers read too: a Post-LN model."""

    def __init__(self, message: str, value: fx.Node) -> None:
        super().__init__(message)
        self.value = value


def plan_streams(gm: fx.GraphModule, streams: list[Stream], *, drop_last: bool = False,
                 trainable: bool = False) -> tuple[dict[int, StreamPlan], dict[int, str]]:
    """({id(stream): StreamPlan}, {id(stream): reason}): each stream planned, or refused and why.

    A writer that cannot be recentred by folding is centred explicitly (x - mean(x)) when the stream
    has a residual sum; explicit writers computed from one another (a centring op in every layer) are
    refused, and so is every stream whose norms feed a Post-LN residual sum or such a chain."""
    plans, refusals, post_ln = {}, {}, []
    norms = {r.node: r for s in streams for r in s.readers}
    for stream in streams:
        try:
            plans[id(stream)] = _plan_writers(gm, stream, norms, drop_last, trainable)
        except PostLN as exc:
            refusals[id(stream)] = str(exc)
            post_ln.append(exc.value)
        except recentre.NotFoldable as exc:
            refusals[id(stream)] = str(exc)
    explicit = {v: s for s in streams if id(s) in plans for v, _, _ in plans[id(s)].explicit}
    chained = []
    for value, stream in explicit.items():
        upstream = depends_on(value, set(explicit) - {value})
        if upstream is not None:
            reason = (f"the stream is written by {value.name!r}, which cannot be recentred by folding and is "
                      f"computed from another such writer ({upstream.name!r}): an exact conversion would need a "
                      "centring op in every layer")
            for s in (stream, explicit[upstream]):
                refusals.setdefault(id(s), reason)
                plans.pop(id(s), None)
            chained.append(value)
    blocked = set(post_ln) | set(chained)
    for stream in streams:
        if id(stream) not in plans:
            continue
        hit = next((r for r in stream.readers if r.node in blocked or reaches(r.node, blocked) is not None), None)
        if hit is not None:
            del plans[id(stream)]
            refusals[id(stream)] = ("Post-LN: its output feeds the residual sums of a Post-LN model" if post_ln else
                                    "its output feeds a chain of writers that need explicit centring")
    for stream in streams:  # a refusal for another reason, in a Post-LN model, says so too
        reason = refusals.get(id(stream), "Post-LN")
        if post_ln and not reason.startswith("Post-LN") and any(
                r.node in post_ln or reaches(r.node, set(post_ln)) is not None for r in stream.readers):
            refusals[id(stream)] = f"Post-LN: {reason}; its output feeds the residual sums of a Post-LN model"
    return plans, refusals


def _plan_writers(gm, stream: Stream, norms, drop_last: bool, trainable: bool) -> StreamPlan:
    plan = StreamPlan()
    dropout = next((v for v in stream.values if trainable and ops.kind(gm, v) in ("dropout", "feature_dropout")
                    and recentre.active_dropout(gm, v)), None)
    if dropout is not None:
        raise recentre.NotFoldable(f"{node_label(dropout)} drops parts of the residual stream in training, which "
                                   "gives it a mean the RMSNorms would see; convert for inference, or set p = 0")
    writes = [(leaf, None) for leaf in stream.leaves] + [(_operand(n, i), (n, i)) for n, i in stream.external]
    for value, use in writes:
        try:
            if not isinstance(value, fx.Node):
                plan.edits.append(recentre.scalar_edit(*use))
                continue
            if use is not None and value.op != "get_attr":
                reader = next((u for u in ops.readers(value) if u is not use[0]), None)
                norm = norms.get(_through_copies(gm, value))
                if norm is not None and _normalizes_a_residual_sum(gm, norm):
                    raise PostLN(f"Post-LN: the residual sum {use[0].name!r} is written by {value.name!r}, the output "
                                 f"of a LayerNorm of an earlier sum, which {_label(reader)} also reads; an exact "
                                 "conversion would need a centring op in every layer", value)
                raise recentre.NotFoldable(f"{value.name!r} is also read by {_label(reader)}")
            plan.edits += recentre.plan(gm, value, stream.width, drop_last=drop_last, trainable=trainable,
                                        consumer=use[0] if use else None)
        except PostLN:
            raise
        except recentre.NotFoldable as exc:
            plan.explicit.append((value, use, str(exc)))
    if plan.explicit and not any(_is_residual_sum(gm, v, stream) for v in stream.values):
        raise recentre.NotFoldable(f"the value it normalizes can only be centred by an explicit op "
                                   f"({plan.explicit[0][2]}), which is what the LayerNorm already does")
    return plan


def _operand(node: fx.Node, index: int):
    return node.args[0][index] if isinstance(node.args[0], (list, tuple)) else node.args[index]


def _label(node) -> str:
    return "something else" if node is None else (node_label(node) if node.op != "output" else "the module output")


def _is_residual_sum(gm, node: fx.Node, stream: Stream) -> bool:
    return _is_add(gm, node) and all(isinstance(v, fx.Node) and v in stream for v in node.args[:2])


def _through_copies(gm, node: fx.Node) -> fx.Node:
    while isinstance(node, fx.Node) and ops.kind(gm, node) in ops.PASS_THROUGH | {"view", "reshape"}:
        node = ops.data_input(node)
    return node


def _normalizes_a_residual_sum(gm, norm: NormOp) -> bool:
    """True when the LayerNorm reads x + f(x) (one operand computed from the other), unlike a sum of
    embeddings: in a Post-LN model its output then writes the next such sum."""
    add = _through_copies(gm, norm.x)
    if not _is_add(gm, add) or not all(isinstance(v, fx.Node) for v in add.args[:2]):
        return False
    a, b = add.args[:2]
    return depends_on(b, {a}) is not None or depends_on(a, {b}) is not None
