"""Planning the writes into each residual stream, shared by the LayerNorm -> RMSNorm/CRMSNorm passes.

For every stream (normfold.residual) each writer is recentred by folding (normfold.recentre) where
it can be; a writer that cannot gets an explicit x - mean(x) (normfold.emit) if it does not depend
on another such writer and the stream has a residual Add (centring a norm's only input explicitly is
what the LayerNorm already does). A chain of them (each layer's output writing the next residual
sum) is refused, every stream in it and every stream feeding it; when the writers are LayerNorm
outputs, that is a Post-LN model and the reason says so.
Post-LN is recognised before any writer is planned, from each reader back through sums and views, so a
stream the analysis could only follow in part (a view of unknown shape) is still refused as Post-LN.
With `drop_last` (CRMSNorm) the recentred writers also lose their last element.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from normfold import recentre
from normfold.constants import is_constant
from normfold.detect import NormSite
from normfold.emit import Emitter
from normfold.recentre import NotFoldable
from normfold.report import node_label
from normfold.residual import VIEW_OPS, Stream


@dataclass
class StreamPlan:
    """What recentring one stream takes: edits to apply, writers to centre explicitly, resized values."""

    edits: list = field(default_factory=list)
    explicit: list[tuple[ir.Value, tuple[ir.Node, int] | None, str]] = field(default_factory=list)
    """(value, the use to centre or None for every use, why it cannot be folded)."""
    touched: list[ir.Value] = field(default_factory=list)


class PostLN(NotFoldable):
    """The stream is written by a LayerNorm output that other layers read too: a Post-LN model."""

    def __init__(self, message: str, value: ir.Value) -> None:
        super().__init__(message)
        self.value = value


def plan_streams(streams: list[Stream], model: ir.Model, *, drop_last: bool = False):
    """({id(stream): StreamPlan}, {id(stream): reason}) for every stream: planned, or refused and why."""
    plans, refusals, post_ln = {}, {}, []
    norm_outputs = {id(site.y): site for stream in streams for site in stream.readers}
    for stream in streams:
        try:
            _refuse_post_ln(stream, norm_outputs)
            plans[id(stream)] = _plan_writers(stream, model, drop_last)
        except PostLN as exc:
            refusals[id(stream)] = str(exc)
            post_ln.append(exc.value)
        except NotFoldable as exc:
            refusals[id(stream)] = str(exc)
    for stream, reason in _chains(streams, plans, post_ln).items():
        del plans[id(stream)]
        refusals[id(stream)] = reason
    for stream in streams:  # a refusal for another reason, in a Post-LN model, says so too
        reason = refusals.get(id(stream), "Post-LN")
        outputs = {id(site.y) for site in stream.readers}
        if not reason.startswith("Post-LN") and any(
                id(v) in outputs or _depends_on_any(v, outputs) is not None for v in post_ln):
            refusals[id(stream)] = f"Post-LN: {reason}; its output feeds the residual sums of a Post-LN model"
    return plans, refusals


def apply_explicit(plan: StreamPlan, model: ir.Model, target: str, *, keep: int | None = None,
                   moved: dict[int, ir.Value] | None = None) -> dict[int, ir.Value]:
    """Inserts the explicit centrings (sliced to the first `keep` elements if given).

    `moved` maps values replaced since planning (a norm output another stream already rewrote) to
    their replacements; it is extended with {id(old value): centred value} and returned, so sites
    reading a centred value can follow it."""
    moved = {} if moved is None else moved
    for value, use, _ in plan.explicit:
        current = use[0].inputs[use[1]] if use is not None else moved.get(id(value), value)
        moved[id(value)] = _centre(current, use, model, target, keep)
    return moved


def stream_width(stream: Stream) -> int | None:
    """The stream's width d: the last dim of a member or the size of a reader's gamma."""
    for value in stream.values:
        if value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
            return value.shape[-1]
    for site in stream.readers:
        for param in (site.gamma, site.beta):
            if param is not None and param.shape is not None and len(param.shape) and isinstance(param.shape[-1], int):
                return param.shape[-1]
    return None


def _refuse_post_ln(stream: Stream, norm_outputs: dict[int, NormSite]) -> None:
    """Raises PostLN when a sum that the stream's norms read is written by the output of a LayerNorm of an
    earlier residual sum that another node reads too: x_l = LN(x_{l-1} + f(x_{l-1})).

    The sums are found from each reader back through Adds and views (data operands), whether or not the
    stream analysis could follow them: a view of unknown shape ends the stream, not the residual chain."""
    seen: set[int] = set()
    stack = [site.x for site in stream.readers]
    while stack:
        node = stack.pop().producer()
        if node is None or id(node) in seen or not (node.op_type == "Add" or node.op_type in VIEW_OPS):
            continue
        seen.add(id(node))
        operands = node.inputs if node.op_type in ("Add", "Concat") else node.inputs[:1]
        for value in (v for v in operands if v is not None):
            site = norm_outputs.get(id(_through_copies(value)))
            if site is None:
                stack.append(value)
            elif node.op_type == "Add" and _normalizes_a_residual_sum(site):
                reader = _other_reader(value, node)
                if reader is not None:
                    raise PostLN(f"Post-LN: the residual sum is written by {value.name!r}, the output of a LayerNorm "
                                 f"of an earlier sum, which {node_label(reader)} also reads; an exact conversion "
                                 "would need a centring op in every layer", value)


def _other_reader(value: ir.Value, node: ir.Node) -> ir.Node | None:
    """A reader of `value`, or of a value it copies (through copies), other than `node` and those copies."""
    chain = [value]
    while chain[-1].producer() is not None and chain[-1].producer().op_type in COPIES:
        chain.append(chain[-1].producer().inputs[0])
    copies = {id(node)} | {id(v.producer()) for v in chain[:-1]}
    return next((n for v in chain for n, _ in v.uses() if id(n) not in copies), None)


def _plan_writers(stream: Stream, model: ir.Model, drop_last: bool) -> StreamPlan:
    """Edits recentring every writer by folding, plus the writers that need an explicit centring op."""
    plan = StreamPlan(touched=list(stream.values) if drop_last else [])
    width = stream_width(stream)
    writes = [(leaf, None) for leaf in stream.leaves] + [(node.inputs[i], (node, i)) for node, i in stream.external]
    for value, use in writes:
        try:
            if use is not None and not is_constant(value, model):
                reader = next(n for n, _ in value.uses() if n is not use[0])
                raise NotFoldable(f"{value.name!r} is also read by {node_label(reader)}")
            plan.edits += recentre.plan(value, model, use, drop_last=drop_last, touched=plan.touched, width=width)
        except NotFoldable as exc:
            plan.explicit.append((value, use, str(exc)))
    if plan.explicit and not any(_is_residual_sum(v, stream) for v in stream.values):
        value, _, why = plan.explicit[0]
        raise NotFoldable(f"the value it normalizes can only be centred by an explicit op ({why}), "
                          "which is what the LayerNorm already does")
    return plan


def _is_residual_sum(value: ir.Value, stream: Stream) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type == "Add" and all(
        v is not None and v in stream for v in producer.inputs)


def _normalizes_a_residual_sum(site: NormSite) -> bool:
    """True when the LayerNorm reads a residual connection x + f(x) (one operand computed from the other,
    unlike a sum of embeddings): in a Post-LN model its output then writes the next such sum."""
    producer = _through_copies(site.x).producer()
    if producer is None or producer.op_type != "Add" or any(v is None for v in producer.inputs):
        return False
    a, b = producer.inputs[:2]
    return _depends_on_any(b, {id(a)}) is not None or _depends_on_any(a, {id(b)}) is not None


COPIES = ("Identity", "Cast", "Dropout", "Reshape")
"""Ops through which a norm's output is still that output, for the Post-LN checks."""


def _through_copies(value: ir.Value) -> ir.Value:
    while value.producer() is not None and value.producer().op_type in COPIES:
        value = value.producer().inputs[0]
    return value


def _chains(streams: list[Stream], plans: dict, post_ln: list[ir.Value]) -> dict[Stream, str]:
    """Streams whose explicitly centred writers depend on one another (a centring op in every layer),
    and streams whose norms feed such a chain or a Post-LN residual sum."""
    explicit = {id(value): (stream, why) for stream in streams if id(stream) in plans
                for value, _, why in plans[id(stream)].explicit}
    norm_outputs = {id(site.y) for stream in streams for site in stream.readers}
    refused: dict[int, tuple[Stream, str]] = {}
    for stream in streams:
        for value, _, why in (plans[id(stream)].explicit if id(stream) in plans else ()):
            upstream = _depends_on_any(value, set(explicit) - {id(value)})
            if upstream is None:
                continue
            reason = _chain_reason(value, why, upstream, norm_outputs)
            refused[id(stream)] = (stream, reason)
            refused.setdefault(id(explicit[id(upstream)][0]), (explicit[id(upstream)][0], reason))
    chain = [value for stream, _ in refused.values() for value, _, _ in plans[id(stream)].explicit] + post_ln
    reason = next((r for _, r in refused.values()), "Post-LN: the residual sums are written by LayerNorm outputs")
    for stream in streams:
        if id(stream) in plans and id(stream) not in refused:
            outputs = {id(s.y) for s in stream.readers}
            if any(_depends_on_any(value, outputs) is not None or id(value) in outputs for value in chain):
                prefix = "Post-LN: " if reason.startswith("Post-LN") else ""
                refused[id(stream)] = (stream, f"{prefix}its output feeds a chain of writers that need explicit "
                                               f"centring ({reason.removeprefix('Post-LN: ')})")
    return {stream: reason for stream, reason in refused.values()}


def _chain_reason(value: ir.Value, why: str, upstream: ir.Value, norm_outputs: set[int]) -> str:
    text = (f"the stream is written by {value.name!r}, which cannot be recentred by folding ({why}) and is "
            f"computed from another such writer ({upstream.name!r}): an exact conversion would need a centring "
            "op in every layer")
    return f"Post-LN: {text}" if id(_through_copies(value)) in norm_outputs else text


def _depends_on_any(value: ir.Value, targets: set[int]) -> ir.Value | None:
    """The first value whose id is in `targets` that `value` is computed from (itself excluded)."""
    seen, stack = set(), [i for i in (value.producer().inputs if value.producer() else ()) if i is not None]
    while stack:
        v = stack.pop()
        if id(v) in targets:
            return v
        if id(v) in seen or v.producer() is None:
            continue
        seen.add(id(v))
        stack.extend(i for i in v.producer().inputs if i is not None)
    return None



def _centre(value: ir.Value, use, model: ir.Model, target: str, keep: int | None) -> ir.Value:
    """Inserts value - mean(value), sliced to its first `keep` elements if given, and makes the given use
    (or every use) read it; returns it."""
    uses = [use] if use is not None else list(value.uses())
    order = {id(n): i for i, n in enumerate(uses[0][0].graph)}
    anchor = min((n for n, _ in uses), key=lambda n: order[id(n)])
    emitter = Emitter(model, anchor, target)
    centred = emitter.centre(value, name=f"{value.name}/recentre")
    centred.shape, centred.type = value.shape, value.type
    if keep is not None:
        centred = emitter.keep_first(centred, keep, name=f"{value.name}/drop_last")
        centred.type = value.type
    for node, index in uses:
        node.replace_input_with(index, centred)
    return centred
