"""Planning the writes into each residual stream, shared by the FX LayerNorm -> RMSNorm/CRMSNorm passes
(the ONNX side's normfold.stream_plan, on nodes).

Every writer of a stream (normfold.fx.residual) is recentred by folding (normfold.fx.recentre) where it
can be; a writer that cannot gets an explicit x - mean(x) if the stream has a residual sum (centring a
norm's only input explicitly is what the LayerNorm already does). Explicit writers computed from one
another (a centring op in every layer) are refused, and so is every stream whose norms feed them;
when the writers are LayerNorm outputs of residual sums, that is a Post-LN model and the reason says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from normfold.fx import ops, recentre
from normfold.fx.graph import node_label
from normfold.fx.ops import NormOp
from normfold.fx.residual import Stream, depends_on, is_add, reaches


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
    return is_add(gm, node) and all(isinstance(v, fx.Node) and v in stream for v in node.args[:2])


def _through_copies(gm, node: fx.Node) -> fx.Node:
    while isinstance(node, fx.Node) and ops.kind(gm, node) in ops.PASS_THROUGH | {"view", "reshape"}:
        node = ops.data_input(node)
    return node


def _normalizes_a_residual_sum(gm, norm: NormOp) -> bool:
    """True when the LayerNorm reads x + f(x) (one operand computed from the other), unlike a sum of
    embeddings: in a Post-LN model its output then writes the next such sum."""
    add = _through_copies(gm, norm.x)
    if not is_add(gm, add) or not all(isinstance(v, fx.Node) for v in add.args[:2]):
        return False
    a, b = add.args[:2]
    return depends_on(b, {a}) is not None or depends_on(a, {b}) is not None
